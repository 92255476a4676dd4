"""The re-identification embedding (`train-reid`): its metric held against a pairwise reference with a null and a
positive control, its augmentation and loss, and the stage on a tiny synthetic world (outputs, skip, resume)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from reid_batch.analysis.metrics import patient_verification
from reid_batch.artifacts import load_reid_model
from reid_batch.manifest import parse_manifest
from reid_batch.stages import train_reid
from helpers import kill_and_resume_equals_clean_run, tiny_manifest

REID = {"arch": "reid_small", "image_size": 32, "width": 8, "embedding_dim": 16,
        "train": {"epochs": 2, "patients_per_batch": 16, "lr": 2.0e-3, "validate_every": 1}}


def clustered(patients: int, per_patient: int, spread: float, seed: int) -> tuple[np.ndarray, list[str]]:
    """Unit embeddings around one random centre per patient."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(patients, 16))
    x = np.repeat(centres, per_patient, axis=0) + spread * rng.normal(size=(patients * per_patient, 16))
    return x / np.linalg.norm(x, axis=1, keepdims=True), [f"p{i}" for i in range(patients) for _ in range(per_patient)]


def test_verification_matches_a_pairwise_reference():
    x, ids = clustered(12, 3, 1.0, seed=0)
    ids[5] = "single"  # a patient with one image: no probe, but it is in every gallery and in negative pairs
    result = patient_verification(x, ids)
    pairs = list(itertools.combinations(range(len(ids)), 2))
    labels = [ids[i] == ids[j] for i, j in pairs]
    scores = [float(x[i] @ x[j]) for i, j in pairs]
    assert result.auc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert result.positive_pairs == sum(labels) and result.negative_pairs == len(labels) - sum(labels)
    hits = []
    for i in range(len(ids)):
        if sum(p == ids[i] for p in ids) < 2:
            continue
        nearest = max((j for j in range(len(ids)) if j != i), key=lambda j: float(x[i] @ x[j]))
        hits.append(ids[nearest] == ids[i])
    assert result.probes == len(hits) and result.rank1 == pytest.approx(np.mean(hits))


def test_verification_sees_identity_and_not_shuffled_labels():
    x, ids = clustered(40, 3, 0.3, seed=1)
    identity = patient_verification(x, ids)
    assert identity.auc > 0.99 and identity.rank1 > 0.95  # positive control: the metric can pass
    shuffled = list(np.random.default_rng(2).permutation(ids))
    null = patient_verification(x, shuffled)
    assert abs(null.auc - 0.5) < 0.08 and null.rank1 < 0.2  # null: the same embeddings, patients permuted


def test_augmentation_is_seeded_bounded_and_never_flips():
    images = torch.zeros(4, 1, 32, 32)
    images[:, :, 8:24, 2:10] = 1.0  # bright on the image's left only
    first = train_reid.augment(images, torch.Generator().manual_seed(0))
    again = train_reid.augment(images, torch.Generator().manual_seed(0))
    other = train_reid.augment(images, torch.Generator().manual_seed(1))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.min() >= 0 and first.max() <= 1
    left, right = first[..., :16].mean(), first[..., 16:].mean()
    assert left > right + 0.2  # laterality is anatomy: the bright side stays left
    unchanged = train_reid.augment(images, torch.Generator().manual_seed(0), strength=0.0)
    torch.testing.assert_close(unchanged, images, atol=1e-4, rtol=0)


def test_nt_xent_rewards_matching_views():
    z = torch.nn.functional.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    matched = train_reid.nt_xent(z, z, temperature=0.1)
    mismatched = train_reid.nt_xent(z, z.roll(1, dims=0), temperature=0.1)
    assert matched < 0.1 < mismatched


def test_train_reid_commits_its_embedding_and_metrics(tiny_world, tmp_path):
    document = tiny_manifest(tiny_world, tmp_path)
    document["reid"] = REID
    manifest = parse_manifest(document)
    assert train_reid.run(manifest) == 0
    out = tmp_path / "demo" / "reid"
    assert (out / "_COMMITTED").exists()
    record = json.loads((out / "metrics.json").read_text())
    assert [row["epoch"] for row in record["history"]] == [0, 1]
    public, private = record["verification"]["public_heldout"], record["verification"]["private"]
    assert 0 <= public["auc"] <= 1 and public["patients"] > 1 and public["positive_pairs"] > 0
    assert 0 <= private["auc"] <= 1 and private["probes"] > 0
    # Only the public pool trains it: no private image among the training images.
    assert record["train_images"] > 0
    model = load_reid_model(manifest)
    assert not model.training and model(torch.rand(2, 1, 32, 32)).norm(dim=1).allclose(torch.ones(2))

    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert train_reid.run(manifest) == 0  # committed: not trained again
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp

    del document["reid"]
    assert train_reid.run(parse_manifest(document)) == 0  # no reid section: nothing to do
    assert load_reid_model(parse_manifest(document)) is None


@pytest.mark.slow
def test_train_reid_resumes_after_sigkill_to_the_same_weights(tiny_world, tmp_path):
    def make_manifest(output):
        document = tiny_manifest(tiny_world, output)
        document["reid"] = {**REID, "train": {**REID["train"], "epochs": 6}}
        return document

    kill_and_resume_equals_clean_run(tmp_path, "train-reid", make_manifest, "resume/train-reid.pt", "reid")
