"""Mitigations on a tiny synthetic world: regularised, augmented and DP-SGD targets are trained by the recipe, the
whole attack runs on each (the DP target is a GroupNorm model: its objective falls back from bn_stats to gn_stats),
and the report sets utility beside risk for every target.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from reid_batch.manifest import parse_manifest
from reid_batch.runtime import run_store
# The same tiny prior and demographic model as test_evaluate_report.
from helpers import EVALUATION_DEPTHS as DEPTHS, LATENT, evaluation_inputs

SIZE = 32
WORLD = {"seed": 0, "image_size": SIZE, "private_patients": 14, "public_patients": 1, "control_patients": 10,
         "max_studies_per_patient": 2}
TARGETS = ("dp", "regularised", "augmented", "control")


def make_manifest(root: Path, inputs: dict[str, Path]):
    one = {"epochs": 1, "batch_size": 8}
    document = {
        "version": 1, "run_id": "mitigations", "output": {"uri": str(root / "out")},
        "data": {"synthetic": {"root": str(root / "world"), **WORLD}, "val_fraction": 0.2, "split_seed": 0},
        "targets": [
            # Defences of the augmented arm (the same training patients): the report pairs their L with its.
            {"name": "dp", "arch": "resnet18", "input": {"size": SIZE}, "baseline": "augmented",
             "train": {"preset": "dp", "target_epsilon": 8.0, "max_grad_norm": 1.0, **one}},
            {"name": "regularised", "arch": "resnet18", "input": {"size": SIZE}, "baseline": "augmented",
             "train": {"preset": "regularised", "epochs": 2, "patience": 1, "batch_size": 8}},
            {"name": "augmented", "arch": "resnet18", "input": {"size": SIZE}, "train": {"preset": "augmented", **one}},
            {"name": "control", "arch": "resnet18", "input": {"size": SIZE},
             "train": {"preset": "normal", "pool": "control", **one}},
        ],
        "generator": {"checkpoint": str(inputs["prior"]), "format": "reid", "latent_dim": LATENT, "depths": DEPTHS,
                      "out_channels": 1},
        "finetune": {"steps": 2, "batch_size": 4, "lr": 1e-4, "checkpoint_every": 100, "log_every": 1},
        "sampling": {"num_candidates": 32, "batch_size": 32, "num_shards": 1, "chunk_size": 32, "row_group_size": 32,
                     "seed": 3},
        "selection": {"rule": "top_k", "top_k": 5},
        "demographics": {"arch": "densenet_tiny", "checkpoint": str(inputs["demographics"]), "image_size": SIZE},
        "evaluation": {"num_images": 8, "pca_components": 4, "bootstrap": 10, "fid": False,
                       "membership_candidates": 32, "leak_bootstrap": 100, "leak_permutations": 100},
        # No reid section: distances in grey pixels, which the report labels as blind to identity.
        "calibration": {"fractions": [0.0, 0.1], "seeds": 1, "null_seeds": 1},
        "compute": {"device": "cpu"},
    }
    for target in document["targets"]:
        target["objective"] = {"reference": {"source": "prior", "num_images": 16}}
    return parse_manifest(document)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from reid_batch.data.phantoms import WorldConfig, write_world
    from reid_batch.stages import finetune, train_target
    from reid_batch.stages import calibrate, evaluate, report, sample, score, select

    root = tmp_path_factory.mktemp("mitigations")
    manifest = make_manifest(root, evaluation_inputs(root))
    write_world(manifest.data.synthetic.root, WorldConfig(**WORLD, device_rate=0.3, workers=1))
    train_target.run(manifest)
    finetune.run(manifest)
    sample.sample(manifest)
    select.select(manifest)
    score.score(manifest)
    assert evaluate.evaluate(manifest) == 0
    assert calibrate.calibrate(manifest) == 0
    assert report.report(manifest) == 0
    return manifest, root


def _training(manifest, name: str) -> dict:
    return run_store(manifest).read_json(f"targets/{name}/training.json")


@pytest.mark.slow
def test_dp_epsilon_is_the_accountants(pipeline):
    from opacus.accountants import RDPAccountant

    manifest, _ = pipeline
    record = _training(manifest, "dp")
    privacy = record["privacy"]
    assert privacy["delta"] == pytest.approx(1.0 / record["train_images"])
    assert privacy["noise_multiplier"] > 0 and privacy["steps"] > 0
    assert privacy["sample_rate"] == pytest.approx(1.0 / -(-record["train_images"] // 8))
    # Recomputed from the recorded mechanism alone, by a fresh accountant.
    accountant = RDPAccountant()
    accountant.history = [(privacy["noise_multiplier"], privacy["sample_rate"], privacy["steps"])]
    assert privacy["epsilon"] == pytest.approx(accountant.get_epsilon(privacy["delta"]), rel=1e-9)
    # The noise was calibrated for the planned epochs; early stopping can only spend less.
    assert privacy["epsilon"] <= privacy["target_epsilon"] * 1.01
    assert record["history"][-1]["epsilon"] == pytest.approx(privacy["epsilon"])


@pytest.mark.slow
def test_dp_target_is_a_groupnorm_model_that_loads_back(pipeline, tmp_path):
    from safetensors.torch import load_file

    from reid_batch.artifacts import load_attack_target
    from reid_batch.models.targets import load_target, safetensors_metadata

    manifest, _ = pipeline
    store = run_store(manifest)
    path = store.path("targets/dp/model.safetensors")
    assert safetensors_metadata(path)["norm"] == "group"
    model, num_classes = load_attack_target(manifest, manifest.target("dp"))
    assert num_classes == 1
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert sum(isinstance(m, nn.GroupNorm) for m in model.modules()) == 20
    saved = load_file(path)
    assert set(model.state_dict()) == set(saved)
    assert all(torch.equal(model.state_dict()[k], saved[k]) for k in saved)
    # Without the metadata (a plain .pt state dict), the keys alone say GroupNorm.
    torch.save(saved, tmp_path / "dp.pt")
    again, _ = load_target("resnet18", tmp_path / "dp.pt", image_size=SIZE)
    x = torch.rand(2, 3, SIZE, SIZE)
    assert torch.equal(again(x), model(x))
    # The BatchNorm targets stay BatchNorm.
    plain, _ = load_attack_target(manifest, manifest.target("augmented"))
    assert any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())


@pytest.mark.slow
def test_attack_on_the_groupnorm_target_falls_back_and_says_so(pipeline):
    manifest, _ = pipeline
    store = run_store(manifest)
    record = store.read_json("dp/finetune/finetune.json")
    assert record["objective_fallback"]["dropped"] == ["bn_stats"]
    assert record["objective_fallback"]["added"] == ["gn_stats"]
    assert set(record["terms"]) == {"gn_stats", "feature_stats", "logits", "tv"}
    assert record["reference"]["source"] == "prior" and record["reference"]["images"] == 16
    losses = store.read_parquet("dp/finetune/losses.parquet").to_pandas()
    assert losses["gn_stats"].notna().all() and (losses["gn_stats"] > 0).all()
    candidates = store.read_parquet("dp/candidates").to_pandas()
    assert "term_gn_stats" in candidates and "term_bn_stats" not in candidates
    assert candidates["term_gn_stats"].notna().all() and candidates["mahalanobis"].notna().all()
    # A BatchNorm target keeps bn_stats.
    normal = store.read_json("augmented/finetune/finetune.json")
    assert normal["objective_fallback"] is None and "bn_stats" in normal["terms"]


def test_groupnorm_objective_fires_every_hook_and_matches_its_reference():
    from reid_batch.models.targets import build_target
    from reid_batch.attack.objectives import TargetObjective, compute_reference_stats, needs_reference_stats

    torch.manual_seed(0)
    model = build_target("resnet18", 1, image_size=SIZE, norm="group").eval().requires_grad_(False)
    assert needs_reference_stats(model)
    images = torch.rand(6, 3, SIZE, SIZE)
    reference = compute_reference_stats(model, [images[:3], images[3:]])
    terms = {"bn_stats": 1.0, "feature_stats": 1.0, "logits": 1.0, "tv": 1e-5}
    with TargetObjective(model, terms, reference_stats=reference) as objective:
        assert objective.fallback["added"] == ["gn_stats"]
        result = objective(images, image01=images[:, :1])
        recorder = objective._recorder
        assert set(recorder.calls) == set(recorder.expected) and len(recorder.expected) == 21
        # Scored on exactly the reference batch, the GroupNorm inputs match their reference statistics.
        assert float(result.terms["gn_stats"]) < 1e-3
        assert result.features.shape == (6, 512)
        mean, var = objective.feature_prior()
        assert mean.shape == var.shape == (512,)
    with TargetObjective(model, terms) as objective:  # no reference: bn_stats is dropped, the rest apply
        assert objective.fallback["added"] == [] and list(objective.weights) == ["feature_stats", "logits", "tv"]


@pytest.mark.slow
def test_regularised_and_augmented_presets_train(pipeline):
    from reid_batch.stages.train_target import augmentation

    manifest, _ = pipeline
    regularised = _training(manifest, "regularised")
    assert regularised["recipe"]["optimizer"] == "adamw" and regularised["recipe"]["dropout"] == 0.5
    assert regularised["recipe"]["weight_decay"] == 0.05
    epochs = [row["epoch"] for row in regularised["history"]]
    best, best_auc = -1, -1.0
    for row in regularised["history"]:  # the first epoch of the best finite validation AUC, as the recipe keeps
        if row["val_auc"] is not None and row["val_auc"] > best_auc:
            best, best_auc = row["epoch"], row["val_auc"]
    # Early stopping with patience 1: training ends one epoch without improvement after the best, or at the last.
    assert epochs == list(range(min(2, best + 2)))
    assert regularised["kept_epoch"] == (best if best >= 0 else epochs[-1])
    augmented = _training(manifest, "augmented")
    assert augmented["recipe"]["augment"] is True and augmented["norm"] == "batch"
    torch.manual_seed(0)
    image = torch.rand(1, SIZE, SIZE)
    transform = augmentation(SIZE)
    first, second = transform(image), transform(image)
    assert first.shape == image.shape and not torch.equal(first, second)


@pytest.mark.slow
def test_report_sets_utility_beside_risk_for_every_target(pipeline):
    from reid_batch.layout import MITIGATION_FIGURE, report_prefix

    manifest, _ = pipeline
    store = run_store(manifest)
    prefix = report_prefix()
    document = json.loads(store.read_bytes(f"{prefix}/report.json"))
    rows = {r["target"]: r for r in document["mitigation"]["rows"]}
    assert document["mitigation"]["shown"] and set(rows) == set(TARGETS)
    assert rows["dp"]["epsilon"] == pytest.approx(_training(manifest, "dp")["privacy"]["epsilon"])
    assert rows["dp"]["fallback"] and "gn_stats" in rows["dp"]["attack_terms"]
    for name in TARGETS:
        recorded = _training(manifest, name)["val"]["auc"]  # NaN when the tiny validation split has one class
        assert rows[name]["val_auc"] == (None if math.isnan(recorded) else recorded)
        evaluation = store.read_json(f"{name}/evaluation/metrics.json")
        assert rows[name]["reidentification_rate"] == evaluation["reidentification"]["rate"]
        assert rows[name]["likely_samples"] == 5
        assert rows[name]["leak"] == evaluation["leak"]["raw"]["vs_prior"]["leak"]
        # Utility with its interval: a bootstrap of the validation patients, recorded at training.
        trained = _training(manifest, name)["val"]
        assert trained["resampled"] == "patients" and rows[name]["val_accuracy_ci"] == trained["accuracy_ci"]
        low, high = trained["accuracy_ci"]
        assert low <= trained["accuracy"] <= high
    # The defences' change of L against their baseline, paired on the same patients: with the same records and the
    # same null, it is the difference of the two targets' attacked AUCs, which each evaluation computed alone.
    assert rows["augmented"]["defence"] is None
    for name in ("dp", "regularised"):
        change = rows[name]["defence"]
        assert change["available"] and change["baseline"] == "augmented" and change["mode"] == "study"
        auc = {n: store.read_json(f"{n}/evaluation/metrics.json")["leak"]["raw"]["vs_prior"]["auc_attacked"]
               for n in (name, "augmented")}
        assert change["change"] == pytest.approx(auc[name] - auc["augmented"], abs=1e-9)
        assert change["ci"][0] <= change["change"] <= change["ci"][1] and 0 < change["p_value"] <= 1
    markdown = store.read_bytes(f"{prefix}/report.md").decode()
    section = markdown.split("## Mitigations")[1].split("\n## ")[0]
    assert all(f"| {name} |" in section for name in TARGETS)
    assert "- dp, dp: the study attack's L " in section and "against augmented" in section
    assert "- regularised, regularised: " in section
    assert "dp: gn_stats 1, feature_stats 1, logits 1, tv 1e-05 (fallback: bn_stats dropped, replaced by gn_stats" \
        in markdown
    page = store.read_bytes(f"{prefix}/report.html").decode()
    assert "Mitigations: utility and risk side by side" in page and "alt='risk vs utility'" in page
    assert store.read_bytes(f"{prefix}/{MITIGATION_FIGURE}")[:4] == b"\x89PNG"
    table = pd.read_csv(io.BytesIO(store.read_bytes("targets/dp/train_images.csv")))
    assert len(table) == _training(manifest, "dp")["train_images"]


def test_a_one_image_remainder_batch_is_skipped_not_fatal():
    from reid_batch.models.targets import TargetInput, build_target
    from reid_batch.stages.train_target import train_one_epoch

    # 17 images in batches of 16 at 32 px: the remainder of one would reach layer4's BatchNorm as a 1x1 map.
    torch.manual_seed(0)
    model = build_target("resnet18", 1, image_size=SIZE)
    images, labels = torch.rand(17, 1, SIZE, SIZE), torch.tensor([0.0, 1.0] * 8 + [1.0])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    loss = train_one_epoch(model, optimizer, images, labels, input_spec=TargetInput(SIZE), batch_size=16,
                           generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    assert math.isfinite(loss)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        model.train()(torch.rand(1, 3, SIZE, SIZE))


def test_dp_preset_needs_an_epsilon_and_a_resnet(tmp_path):
    from reid_batch.errors import InputError

    inputs = {"prior": tmp_path / "prior.safetensors", "demographics": tmp_path / "demographics.safetensors"}
    document = make_manifest(tmp_path, inputs).model_dump(mode="json")
    for change, message in [({"arch": "densenet121"}, "preset dp trains ResNets"),
                            ({"train": {"preset": "dp"}}, "preset dp needs target_epsilon"),
                            ({"train": {"preset": "normal", "target_epsilon": 1.0}}, "apply to preset dp only")]:
        broken = {**document, "targets": [{**document["targets"][0], **change}]}
        with pytest.raises(InputError, match=message):
            parse_manifest(broken)


def test_a_groupnorm_arm_without_dp(tmp_path):
    """GroupNorm alone, no DP: the control that separates 'DP protects' from 'the attack lost bn_stats'."""
    from reid_batch.errors import InputError
    from reid_batch.models.targets import build_target
    from reid_batch.stages.train_target import resolve_recipe

    inputs = {"prior": tmp_path / "prior.safetensors", "demographics": tmp_path / "demographics.safetensors"}
    document = make_manifest(tmp_path, inputs).model_dump(mode="json")
    arm = {"name": "groupnorm", "arch": "resnet18", "input": {"size": SIZE},
           "train": {"preset": "normal", "norm": "group", "epochs": 1}}
    spec = parse_manifest({**document, "targets": [arm]}).targets[0]
    recipe = resolve_recipe(spec)
    assert recipe.norm == "group" and recipe.target_epsilon is None and recipe.max_grad_norm is None
    model = build_target(spec.arch, 1, image_size=SIZE, norm=recipe.norm)
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    normal = parse_manifest({**document, "targets": [{**arm, "train": {"preset": "normal"}}]}).targets[0]
    assert resolve_recipe(normal).norm == "batch"
    dp = {**arm, "train": {"preset": "dp", "target_epsilon": 8.0, "norm": "batch"}}
    with pytest.raises(InputError, match="GroupNorm"):
        parse_manifest({**document, "targets": [dp]})
    vit = {"name": "vit", "arch": "vit_custom", "input": {"size": SIZE},
           "vit": {"patch_size": 4, "num_layers": 1, "num_heads": 2, "hidden_dim": 8, "mlp_dim": 16},
           "train": {"preset": "normal", "norm": "group"}}
    with pytest.raises(InputError, match="CNN targets"):
        parse_manifest({**document, "targets": [vit]})


def test_defence_sentences_say_lowered_only_when_interval_and_p_agree():
    from reid_batch.reporting.tables import defence_cell
    from reid_batch.reporting.sentences import defence_sentences

    def row(name, preset, defence=None, accuracy=1.0):
        return {"target": name, "preset": preset, "val_accuracy": accuracy, "val_accuracy_ci": [accuracy - 0.1, accuracy],
                "defence": defence}

    lowered = {"available": True, "mode": "ppa", "baseline": "identity", "change": -0.19, "ci": [-0.33, -0.05],
               "p_value": 0.004, "lowered": True, "members": 10, "nonmembers": 213}
    chance = {**lowered, "change": -0.05, "ci": [-0.2, 0.1], "p_value": 0.3, "lowered": False}
    missing = {"available": False, "mode": "study", "baseline": "identity", "reason": "different images"}
    document = {"mitigation": {"rows": [row("identity", "identity"), row("dp1", "identity (dp)", lowered, 0.225),
                                        row("gn", "identity (groupnorm)", chance), row("other", "normal", missing)]}}
    first, second, third = defence_sentences(document)
    assert first.startswith("dp1, identity (dp): the ppa attack's L falls by 0.190 against identity [-0.330, -0.050], "
                            "p 0.004 (paired on 10 members and 213 non-members). Validation accuracy 0.225")
    assert "changes by -0.050 against identity" in second and second.endswith(
        "within chance. Validation accuracy 1.000 [0.900, 1.000] against 1.000 [0.900, 1.000].")
    assert third == "other: its change against identity could not be measured (different images)."
    assert defence_cell(lowered) == "-0.190 [-0.330, -0.050], p 0.004 (ppa vs identity)"
    assert defence_cell(None) == "—" and defence_cell(missing).startswith("n/a vs identity")


def test_the_paired_column_is_left_out_when_no_target_names_a_baseline():
    from reid_batch.reporting.tables import mitigation_rows

    row = {"target": "a", "preset": "normal", "role": None, "epsilon": None, "delta": None, "val_auc": 0.9,
           "val_accuracy": 0.8, "train_accuracy": 1.0, "leak": 0.1, "leak_ci": [0.0, 0.2], "attack": "study",
           "leak_vs_control": None, "leak_vs_control_ci": None, "likely_samples": 3, "candidates": 10,
           "ssim_mean": 0.5, "sex_accuracy": 0.5, "age_mae": 10.0, "reidentification_rate": None,
           "reidentification_ci": None, "attack_terms": ["tv"], "fallback": False, "defence": None}
    header, rows = mitigation_rows({"mitigation": {"rows": [row]}})
    assert "Change of L vs baseline (paired)" not in header and len(rows[0]) == len(header)
    change = {"available": True, "mode": "study", "baseline": "a", "change": -0.1, "ci": [-0.2, 0.0],
              "p_value": 0.06, "lowered": False, "members": 3, "nonmembers": 3}
    header, rows = mitigation_rows({"mitigation": {"rows": [row, {**row, "target": "b", "defence": change}]}})
    column = header.index("Change of L vs baseline (paired)")
    assert len(rows[0]) == len(header) and rows[0][column] == "—" and rows[1][column].startswith("-0.100")
