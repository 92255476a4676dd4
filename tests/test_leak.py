"""The leak statistic (analysis.leak), its calibration pieces (stages.calibrate) and who the members are
(analysis.roles.membership_records).

The statistic is tested on a world of identities in a feature space, where who leaks is known: a patient is a point,
its images are noisy copies, a generator's candidates are random points plus, when it leaks, noisy copies of the
patients it trained on. That is what the re-identification embedding gives the real pipeline, without its cost.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from reid_batch.analysis.leak import (GeneratorScores, auc_rows, generator_scores, leak_test, pairwise_min_distance,
                                      tpr_at_fpr)
from reid_batch.errors import InputError
from reid_batch.manifest import parse_manifest
from helpers import tiny_manifest

DIMS = 16
NOISE = 0.3


def _images(identities: np.ndarray, per_patient: int, rng) -> tuple[np.ndarray, np.ndarray]:
    images = np.repeat(identities, per_patient, axis=0)
    return images + NOISE * rng.normal(size=images.shape), np.repeat(np.arange(len(identities)), per_patient)


def _candidates(count: int, rng, leaked: np.ndarray | None = None, share: float = 0.0) -> np.ndarray:
    """Random candidates; a share of them noisy copies of `leaked` identities (a generator that memorised them)."""
    candidates = rng.normal(size=(count, DIMS))
    spikes = int(round(share * count))
    if spikes:
        chosen = leaked[rng.integers(0, len(leaked), spikes)]
        candidates[:spikes] = chosen + NOISE * rng.normal(size=chosen.shape)
    return candidates


def _world(rng, patients: int = 60, nonmember_scale: float = 1.0):
    members = rng.normal(size=(patients, DIMS))
    nonmembers = nonmember_scale * rng.normal(size=(patients, DIMS))
    images, groups = _images(np.concatenate([members, nonmembers]), 2, rng)
    member = np.r_[np.ones(patients, bool), np.zeros(patients, bool)]
    return members, images, groups, member


def _scores(images, groups, candidates) -> GeneratorScores:
    return generator_scores(images, groups, int(groups.max()) + 1, candidates)


def test_auc_rows_and_distances_match_their_references():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(5, 30)).round(1)  # ties on purpose
    member = rng.random(30) < 0.4
    for row, expected in zip(auc_rows(scores, member), scores):
        assert row == pytest.approx(roc_auc_score(member, -expected))
    records, candidates = rng.normal(size=(13, 4)), rng.normal(size=(7, 4))
    groups = np.array([0, 0, 1, 2, 2, 2, 3, 4, 4, 5, 5, 5, 5])
    brute = np.linalg.norm(records[:, None] - candidates[None], axis=2)
    expected = np.stack([brute[groups == g].min(axis=0) for g in range(6)])
    np.testing.assert_allclose(pairwise_min_distance(records, candidates, groups, 6), expected, rtol=1e-5, atol=1e-5)
    assert tpr_at_fpr(np.array([0.03, 0.2, 0.9]), np.arange(1, 101) / 100, 0.05) == pytest.approx(1 / 3)


def test_both_generators_leaking_equally_is_still_a_leak_of_the_target():
    """Target and control generators each memorise 30% of their own training patients. On the target's records the
    control's leak is of other people, so L against it is clearly positive. The removed statistic, the target's AUC
    on its pools minus the control's AUC on its own swapped pools, cancels the two leaks to about 0."""
    rng = np.random.default_rng(1)
    members, images, groups, member = _world(rng)
    control_members = rng.normal(size=(60, DIMS))
    attacked = _candidates(1000, rng, members, 0.3)
    control = _candidates(1000, rng, control_members, 0.3)
    result = leak_test(member, _scores(images, groups, attacked), _scores(images, groups, control), seed=1)
    assert result["leak"] > 0.2 and result["ci"][0] > 0 and result["p_value"] < 0.01 and result["detected"]
    assert result["tpr_at_fpr"]["attacked"]["0.05"] > result["tpr_at_fpr"]["null"]["0.05"]
    # The old statistic: the control measured on its own members (control_members) against the target's members.
    control_images, control_groups = _images(np.concatenate([control_members, members]), 2, rng)
    old = result["auc_attacked"] - leak_test(member, _scores(control_images, control_groups, control),
                                             _scores(control_images, control_groups, control),
                                             bootstrap=100, permutations=100)["auc_attacked"]
    assert abs(old) < 0.1


def test_nothing_leaks_but_the_pools_differ_the_interval_covers_zero():
    """Members and non-members from slightly different pools (3% wider): both generators see the difference alike,
    so it cancels; the 95% interval covers 0 in (about) 95% of worlds, and the p-value is not small."""
    covered, small_p = 0, 0
    for seed in range(20):
        rng = np.random.default_rng(100 + seed)
        _, images, groups, member = _world(rng, nonmember_scale=1.03)
        result = leak_test(member, _scores(images, groups, _candidates(1000, rng)),
                           _scores(images, groups, _candidates(1000, rng)), bootstrap=500, permutations=500,
                           seed=seed)
        covered += result["ci"][0] <= 0 <= result["ci"][1]
        small_p += result["p_value"] < 0.01
    assert covered >= 18 and small_p <= 1


def test_a_small_leak_is_seen_and_labels_permuted_remove_it():
    rng = np.random.default_rng(7)
    members, images, groups, member = _world(rng)
    attacked = _scores(images, groups, _candidates(1000, rng, members, 0.05))
    null = _scores(images, groups, _candidates(1000, rng))
    seen = leak_test(member, attacked, null, seed=0)
    assert seen["detected"] and seen["p_value"] < 0.01
    # The positive control's null: the same scores with member labels shuffled carry no leak.
    shuffled = leak_test(rng.permutation(member), attacked, null, seed=0)
    assert shuffled["ci"][0] <= 0 <= shuffled["ci"][1]
    with pytest.raises(ValueError, match="member"):
        leak_test(np.ones(len(member), bool), attacked, null)


def test_spike_in_replaces_the_asked_share_and_the_summary_finds_the_smallest_detectable():
    from reid_batch.stages.calibrate import spiked, summarise

    rng = np.random.default_rng(0)
    base = GeneratorScores(np.full((4, 100), 5.0))
    spikes = np.zeros((4, 20))
    out = spiked(base, spikes, 0.05, rng)
    assert (out.distances == 0).sum(axis=1).tolist() == [5] * 4 and (base.distances == 5).all()
    with pytest.raises(ValueError):
        spiked(base, spikes, 0.5, rng)
    runs = [{"fraction": f, "repeat": r, "leak": 0.1 * f, "ci_low": -0.1 + f, "ci_high": 0.2 + f,
             "detected": -0.1 + f > 0} for f in (0.0, 0.05, 0.2) for r in range(5)]
    summary = summarise(runs, [0.0, 0.05, 0.2], 0.8)
    assert summary["false_positive_rate"] == 0 and summary["minimum_detectable_effect"] == 0.2
    assert summarise(runs, [0.0, 0.05], 0.8)["minimum_detectable_effect"] is None


def _checkpoint_manifest(world, tmp_path, training_list=None):
    document = tiny_manifest(world, tmp_path)
    target = {"name": "given", "arch": "resnet18", "checkpoint": str(tmp_path / "given.safetensors"),
              "input": {"size": 32, "channels": 3}}
    if training_list is not None:
        target["training_list"] = str(training_list)
    document["targets"] = [target]
    return parse_manifest(document)


def test_checkpoint_membership_comes_from_its_training_list_or_is_not_available(tiny_world, tmp_path):
    from reid_batch.analysis.roles import NO_TRAINING_LIST, membership_records, pool_frame
    from reid_batch.reporting.verdicts import leak_entry
    from reid_batch.results import LeakSummary

    manifest = _checkpoint_manifest(tiny_world, tmp_path)
    records, reason, _ = membership_records(manifest, manifest.targets[0], 1000, 0)
    assert records is None and reason == NO_TRAINING_LIST
    entry = leak_entry(LeakSummary(available=False, reason=reason), {}, None, None)
    assert entry["verdict"] == "membership: not available (no training list)"

    rows, _ = pool_frame(manifest, "private")
    listed = rows.groupby("patient_id").head(1).iloc[:6]
    (tmp_path / "list.csv").write_text(listed[["path"]].to_csv(index=False))
    manifest = _checkpoint_manifest(tiny_world, tmp_path, tmp_path / "list.csv")
    records, known_by, _ = membership_records(manifest, manifest.targets[0], 1000, 0)
    members = set(records.loc[records["member"], "patient_id"])
    assert members <= set(listed["patient_id"].astype(str)) and "training_list" in known_by
    nonmembers = set(records.loc[~records["member"], "patient_id"])
    assert not nonmembers & set(listed["patient_id"].astype(str)) and len(nonmembers) > 0 and len(members) > 0
    # Every labelled image of a chosen patient is a record (a patient is scored by its closest image).
    assert len(records) == rows["patient_id"].astype(str).isin(members | nonmembers).sum()

    (tmp_path / "bad.csv").write_text("path\nnot/a/file.jpg\n")
    manifest = _checkpoint_manifest(tiny_world, tmp_path, tmp_path / "bad.csv")
    with pytest.raises(InputError, match="not in data.private") as error:
        membership_records(manifest, manifest.targets[0], 1000, 0)
    assert "bad.csv" in str(error.value.where)
    with pytest.raises(Exception, match="training_list is for checkpoint targets"):
        parse_manifest({**tiny_manifest(tiny_world, tmp_path), "targets": [
            {"name": "t", "arch": "resnet18", "train": {"preset": "normal"}, "training_list": "x.csv"}]})


def test_non_members_take_the_members_label_mix():
    from reid_batch.analysis.roles import patient_labels, same_label_mix

    frame = pd.DataFrame({"patient_id": ["a", "a", "a", "b", "c", "c"], "label": [1, 1, 0, 0, None, 1]})
    assert patient_labels(frame).to_dict() == {"a": 1, "b": 0, "c": 1}
    members = pd.Series([0] * 20 + [1] * 20)             # class-balanced, like the overfit preset
    pool = pd.Series([0] * 200 + [1] * 30 + [2] * 5)     # natural prevalence, and a label members lack
    chosen = same_label_mix(members, pool, cap=1000, seed=0)
    assert pool[chosen].value_counts().to_dict() == {0: 30, 1: 30}  # as many as the rarer label allows
    assert list(chosen) == sorted(set(chosen.tolist()))
    assert pool[same_label_mix(members, pool, cap=10, seed=0)].value_counts().to_dict() == {0: 5, 1: 5}
    assert len(same_label_mix(members, pd.Series([2, 2]), cap=10, seed=0)) == 0


# ------------------------------------------------------------------------------------------------ defence change


def _tables(images, groups, member, paths=None):
    """records.parquet as evaluate writes it, from the test world."""
    import pyarrow as pa

    from reid_batch.formats import feature_column

    paths = paths or [f"img{i}.png" for i in range(len(images))]
    return pa.table({"path": paths, "patient_id": [f"p{g}" for g in groups], "patient": groups.astype(np.int64),
                     "member": member[groups], "label": np.zeros(len(images)),
                     "features": feature_column(images.astype(np.float32))})


def _candidate_table(**by_generator):
    import pyarrow as pa

    from reid_batch.formats import feature_column

    names = [name for name, rows in by_generator.items() for _ in rows]
    features = np.concatenate(list(by_generator.values())).astype(np.float32)
    return pa.table({"generator": names, "id": np.arange(len(names), dtype=np.int64),
                     "features": feature_column(features)})


def test_defence_change_sees_a_defence_that_removes_a_leak_and_not_one_that_changes_nothing():
    from reid_batch.analysis.leak import defence_change

    rng = np.random.default_rng(11)
    members, images, groups, member = _world(rng)
    records = _tables(images, groups, member)
    prior = _candidates(400, rng)
    # Positive control: the baseline's ppa samples are 30% copies of members, the defended target's are not.
    baseline = _candidate_table(attacked=_candidates(400, rng), prior=prior, ppa=_candidates(200, rng, members, 0.3))
    defended = _candidate_table(attacked=_candidates(400, rng), prior=prior, ppa=_candidates(200, rng))
    seen = defence_change("ppa", records, records, defended, baseline, bootstrap=500, permutations=500, seed=0)
    assert seen["available"] and seen["lowered"] and seen["change"] < -0.1
    assert seen["ci"][1] < 0 and seen["p_value"] < 0.01 and seen["candidates"] == {"defended": 200, "baseline": 200}
    # Its null: the same tables with the two targets swapped is an increase, never "lowered".
    swapped = defence_change("ppa", records, records, baseline, defended, bootstrap=500, permutations=500, seed=0)
    assert not swapped["lowered"] and swapped["change"] == pytest.approx(-seen["change"])
    # A defence that changes nothing (both generators random): the interval covers 0 in about 95% of worlds.
    covered = lowered = 0
    for seed in range(10):
        rng = np.random.default_rng(200 + seed)
        _, images, groups, member = _world(rng, patients=30)
        records = _tables(images, groups, member)
        a, b = (_candidate_table(attacked=_candidates(300, rng), prior=prior) for _ in range(2))
        result = defence_change("study", records, records, a, b, bootstrap=300, permutations=300, seed=seed)
        covered += result["ci"][0] <= 0 <= result["ci"][1]
        lowered += result["lowered"]
    assert covered >= 8 and lowered <= 1


def test_defence_change_needs_the_same_patients_and_the_modes_candidates():
    from reid_batch.analysis.leak import defence_change

    rng = np.random.default_rng(3)
    _, images, groups, member = _world(rng, patients=10)
    records = _tables(images, groups, member)
    other = _tables(images, groups, member, paths=[f"other{i}.png" for i in range(len(images))])
    study_only = _candidate_table(attacked=_candidates(50, rng), prior=_candidates(50, rng))
    with_ppa = _candidate_table(attacked=_candidates(50, rng), prior=_candidates(50, rng), ppa=_candidates(8, rng))
    result = defence_change("study", records, other, study_only, study_only, bootstrap=100, permutations=100, seed=0)
    assert not result["available"] and "different member and non-member images" in result["reason"]
    result = defence_change("ppa", records, records, study_only, with_ppa, bootstrap=100, permutations=100, seed=0)
    assert not result["available"] and "no ppa candidates" in result["reason"] and "defended" in result["reason"]
    same = defence_change("ppa", records, records, with_ppa, with_ppa, bootstrap=100, permutations=100, seed=0)
    assert same["change"] == 0.0


def test_ppa_calibration_sees_a_spiked_small_pool_and_not_its_null():
    """calibrate.ppa_repeat at a ppa attack's pool size (40): the whole pool replaced by member spikes is detected
    (interval and permutation p both), no spikes is not; half is seen by L but not reliably at this size."""
    from types import SimpleNamespace

    from reid_batch.stages.calibrate import ppa_repeat, summarise

    rng = np.random.default_rng(5)
    members, images, groups, member = _world(rng, patients=30)
    base, null = (_scores(images, groups, _candidates(400, rng)) for _ in range(2))
    spikes = _scores(images, groups, members[rng.integers(0, 30, 40)] + NOISE * rng.normal(size=(40, DIMS)))
    settings = SimpleNamespace(ppa_fractions=[0.0, 0.5, 1.0], seeds=3, null_seeds=3, seed=0)
    evaluation = SimpleNamespace(leak_bootstrap=300, leak_permutations=300)
    runs = []
    for repeat in range(3):
        runs += ppa_repeat(member, base, null, spikes.distances, pool=40, settings=settings, evaluation=evaluation,
                           repeat=repeat, rng=rng)
    summary = summarise(runs, settings.ppa_fractions, 0.8)
    assert summary["minimum_detectable_effect"] == 1.0 and summary["false_positive_rate"] == 0.0
    means = {row["fraction"]: row["leak_mean"] for row in summary["fractions"]}
    assert abs(means[0.0]) < 0.1 < means[0.5] < means[1.0]
    assert all(r["detected"] == (r["ci_low"] > 0 and r["p_value"] <= 0.05) for r in runs)
