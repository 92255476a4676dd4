"""Training recipes on a tiny synthetic world: outputs, presets, resume after SIGKILL, idempotent re-runs."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from reid_batch.manifest import parse_manifest
from helpers import commit_marker, kill_and_resume_equals_clean_run, tiny_manifest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_target_normal_writes_record_and_exact_training_list(tiny_world, tmp_path):
    from reid_batch.data.datasets import patient_split, read_chexpert
    from reid_batch.stages.train_target import run

    manifest = parse_manifest(tiny_manifest(tiny_world, tmp_path))
    assert run(manifest) == 0
    out = tmp_path / "demo" / "targets" / "cnn"
    assert commit_marker(tmp_path, "targets/cnn").exists()
    record = yaml.safe_load((out / "training.json").read_text())
    assert record["recipe"]["lr"] == 1e-3 and record["recipe"]["weight_decay"] == 1e-3
    assert len(record["history"]) == 2
    for split in ("train", "val"):
        assert 0.0 <= record[split]["accuracy"] <= 1.0
    assert record["generalisation_gap"]["accuracy"] == pytest.approx(record["train"]["accuracy"] - record["val"]["accuracy"])
    # The training list is exactly the patient-grouped training side of the cohort: needed to score the attack.
    listed = pd.read_csv(out / "train_images.csv")
    cohort = read_chexpert(str(tiny_world / "private"))
    expected, held_out = patient_split(cohort, manifest.data.val_fraction, manifest.data.split_seed)
    assert sorted(listed["path"]) == sorted(expected["path"])
    assert not set(listed["patient_id"].astype(str)) & set(held_out["patient_id"].astype(str))
    assert not (tmp_path / "demo" / "resume").exists() or not any((tmp_path / "demo" / "resume").iterdir())

    # A committed target is not retrained: files untouched.
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert run(manifest) == 0
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp

    # The trained checkpoint loads through the safe loader as a binary classifier.
    from reid_batch.artifacts import load_attack_target

    model, num_classes = load_attack_target(manifest, manifest.targets[0])
    assert num_classes == 1 and not model.training


@pytest.mark.slow
def test_overfit_preset_memorises_its_few_images(tiny_world, tmp_path):
    from reid_batch.stages.train_target import run

    document = tiny_manifest(tiny_world, tmp_path, preset="overfit", images_per_class=3, epochs=30, batch_size=None)
    # Batch 1 needs BatchNorm maps larger than 1x1 at layer4 (as the study's 224 px): 64 px is the smallest.
    document["targets"][0]["input"]["size"] = 64
    manifest = parse_manifest(document)
    assert run(manifest) == 0
    record = yaml.safe_load((tmp_path / "demo" / "targets" / "cnn" / "training.json").read_text())
    assert record["recipe"]["batch_size"] == 1 and record["train_images"] == 6
    assert record["train"]["accuracy"] == 1.0
    assert len(record["history"]) < 30 or record["history"][-1]["train_accuracy"] == 1.0


@pytest.mark.slow
def test_identity_preset_trains_k_patients_as_k_classes_on_extra_studies(tiny_world, tmp_path):
    """P1's target: K patients as K classes, trained on rendered studies beyond the world's own (which stay held
    out); the negative's patients are others, of the same sex class by class."""
    from reid_batch.artifacts import load_attack_target
    from reid_batch.data.datasets import read_chexpert
    from reid_batch.data.phantoms import EXTRA_STUDY_FROM
    from reid_batch.stages.train_target import run

    identity = {"patients": 4, "studies": 6, "validation_studies": 2}
    document = tiny_manifest(tiny_world, tmp_path, preset="identity", epochs=3, batch_size=8, identity=identity)
    negative = copy.deepcopy(document["targets"][0])
    negative.update(name="cnn-negative")
    negative["train"]["identity"] = {**identity, "role": "negative"}
    document["targets"].append(negative)
    manifest = parse_manifest(document)
    assert run(manifest) == 0

    lists = {}
    for name in ("cnn", "cnn-negative"):
        out = tmp_path / "demo" / "targets" / name
        record = yaml.safe_load((out / "training.json").read_text())
        assert record["num_classes"] == 4 and record["recipe"]["keep"] == "best_val_accuracy"
        assert record["train_images"] == 24 and record["val_images"] == 8
        listed = pd.read_csv(out / "train_images.csv")
        assert sorted(listed["class"].value_counts().tolist()) == [6, 6, 6, 6]
        assert (listed["study"] > EXTRA_STUDY_FROM).all() and all(Path(p).is_file() for p in listed["path"])
        assert listed.groupby("class")["patient_id"].nunique().eq(1).all()
        lists[name] = listed.drop_duplicates("class").sort_values("class")
        model, num_classes = load_attack_target(manifest, manifest.target(name))
        assert num_classes == 4
    positive, negative = lists["cnn"], lists["cnn-negative"]
    assert list(positive["sex"]) == list(negative["sex"]) == ["M", "M", "F", "F"]
    assert not set(positive["patient_id"]) & set(negative["patient_id"])
    # The world's own studies of these patients are not trained on: they are the held-out studies.
    world_paths = set(read_chexpert(str(tiny_world / "private"))["path"])
    assert not world_paths & set(pd.read_csv(tmp_path / "demo" / "targets" / "cnn" / "train_images.csv")["path"])


@pytest.mark.slow
def test_a_defended_identity_control_trains_its_k_classes_with_dp_sgd(tiny_world, tmp_path):
    """identity.defence: the identity control trained with a mitigation's recipe; dp runs Opacus on the K classes
    (GroupNorm, clipping, the budget spent recorded), the recipes of the other defences are the presets' changes,
    and invalid combinations are refused naming the field."""
    from reid_batch.stages.train_target import resolve_recipe, run

    identity = {"patients": 4, "studies": 6, "validation_studies": 2, "defence": "dp"}
    document = tiny_manifest(tiny_world, tmp_path, preset="identity", epochs=2, batch_size=8, identity=identity,
                             target_epsilon=8.0)
    manifest = parse_manifest(document)
    recipe = resolve_recipe(manifest.targets[0])
    assert (recipe.norm, recipe.max_grad_norm, recipe.target_epsilon, recipe.num_classes) == ("group", 1.0, 8.0, 4)
    assert run(manifest) == 0
    record = yaml.safe_load((tmp_path / "demo" / "targets" / "cnn" / "training.json").read_text())
    assert record["num_classes"] == 4 and record["norm"] == "group"
    assert record["privacy"]["target_epsilon"] == 8.0 and 0 < record["privacy"]["epsilon"] <= 8.0 + 1e-6
    for defence, expected in (("regularised", {"optimizer": "adamw", "dropout": 0.5, "patience": 3}),
                              ("augmented", {"augment": True}), ("groupnorm", {"norm": "group"}),
                              ("none", {"norm": "batch", "augment": False, "optimizer": "adam"})):
        document["targets"][0]["train"] = {"preset": "identity", "identity": {**identity, "defence": defence}}
        recipe = resolve_recipe(parse_manifest(document).targets[0])
        assert {k: getattr(recipe, k) for k in expected} == expected, defence
    for train, message in (({"identity": {**identity, "defence": "dp"}}, "needs target_epsilon"),
                           ({"identity": {**identity, "defence": "none"}, "target_epsilon": 1.0}, "apply to preset dp")):
        document["targets"][0]["train"] = {"preset": "identity", **train}
        with pytest.raises(Exception, match=message):
            parse_manifest(document)


def test_cohort_trains_on_a_demographic_slice_only(tiny_world, tmp_path):
    """P4's target: only the slice's patients train and validate."""
    from reid_batch.stages.train_target import run

    manifest = parse_manifest(tiny_manifest(tiny_world, tmp_path, epochs=1, cohort={"sex": "F", "min_age": 40}))
    assert run(manifest) == 0
    out = tmp_path / "demo" / "targets" / "cnn"
    for listing in ("train_images.csv", "val_images.csv"):
        frame = pd.read_csv(out / listing)
        assert len(frame) > 0 and (frame["sex"] == "F").all() and (frame["age"] >= 40).all()


@pytest.mark.slow
def test_train_target_resumes_after_sigkill_to_the_same_weights(tiny_world, tmp_path):
    kill_and_resume_equals_clean_run(
        tmp_path, "train-target", lambda output: tiny_manifest(tiny_world, output, epochs=2, max_images=32),
        "resume/train-target-cnn.pt", "targets/cnn",
    )


def test_train_demographics_writes_metrics_and_plots(tiny_world, tmp_path):
    from reid_batch.stages.train_demographics import age_bin_weights, run

    manifest = parse_manifest(tiny_manifest(tiny_world, tmp_path))
    assert run(manifest) == 0
    out = tmp_path / "demo" / "demographics"
    metrics = yaml.safe_load((out / "metrics.json").read_text())["val"]
    assert set(metrics) == {"age_mae", "age_rmse", "age_r2", "sex_accuracy", "sex_auc"}
    assert metrics["age_rmse"] >= metrics["age_mae"] >= 0
    for png in ("age_distribution.png", "sex_confusion.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    predictions = pd.read_csv(out / "val_predictions.csv")
    assert predictions["sex_prob"].between(0, 1).all()

    # Inverse-frequency weights: every age bin gets the same total weight.
    ages = torch.tensor([25.0, 26, 27, 28, 75, 95]).numpy()
    weights = age_bin_weights(ages)
    assert weights[:4].sum() == pytest.approx(weights[4]) == pytest.approx(weights[5])

    from reid_batch.artifacts import load_demographic_model

    model = load_demographic_model(manifest)
    assert not model.training


def test_cli_train_target_with_bad_checkpoint_exits_2(tmp_path):
    """A manifest naming a checkpoint that would run code on load is refused with exit 2 at load time."""
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    checkpoint = tmp_path / "evil.pt"
    checkpoint.write_bytes(pickle.dumps({"state_dict": Payload()}))
    from reid_batch.artifacts import load_attack_target
    from reid_batch.errors import InputError

    document = yaml.safe_load((REPO / "manifests" / "demo.yaml").read_text())
    document["output"] = {"uri": str(tmp_path / "out")}
    document["targets"] = [{"name": "cnn", "arch": "resnet18", "checkpoint": str(checkpoint), "input": {"size": 32}}]
    manifest = parse_manifest(copy.deepcopy(document))
    with pytest.raises(InputError, match="evil.pt"):
        load_attack_target(manifest, manifest.targets[0])
    assert not (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_train_demographics_resumes_after_sigkill_to_the_same_weights(tiny_world, tmp_path):
    def make_manifest(output: Path) -> dict:
        document = tiny_manifest(tiny_world, output)
        document["demographics"]["train"] = {"epochs": 2, "batch_size": 16, "max_images": 48}
        return document

    kill_and_resume_equals_clean_run(tmp_path, "train-demographics", make_manifest,
                                     "resume/train-demographics.pt", "demographics")
