"""P1's measures (analysis.identity): a positive control passes, a collapse and a sex-only signal do not."""

import numpy as np
import pytest
from scipy.stats import binomtest

from reid_batch.analysis.identity import identity_control, within_sex_permutations

K = 10
SEXES = np.array(["M"] * 5 + ["F"] * 5)


def _gallery(rng, dims=16, studies=2):
    centres = rng.normal(size=(2 * K, dims)) * 3.0  # K scored patients (0..K-1) then K distractors
    features = np.repeat(centres, studies, axis=0) + rng.normal(size=(2 * K * studies, dims)) * 0.3
    return centres, features, np.repeat(np.arange(2 * K), studies)


def _run(samples, classes, gallery, patients, permutations=999):
    return identity_control(samples, classes, gallery, patients, np.arange(K), SEXES, permutations=permutations,
                            bootstrap=500, seed=1)


def test_samples_of_the_asked_patient_pass_with_a_small_permutation_p():
    rng = np.random.default_rng(0)
    centres, gallery, patients = _gallery(rng)
    classes = np.repeat(np.arange(K), 8)
    result = _run(centres[classes] + rng.normal(size=(len(classes), 16)) * 0.5, classes, gallery, patients)
    assert result["top1"] == 1.0 and result["top5"] == 1.0 and result["distinct"] == K
    assert result["p_value"] == pytest.approx(1 / 1000)
    assert result["null_top1"] < 0.35 and result["ci"][0] > 0.9


def test_a_collapse_onto_one_patient_is_not_significant_though_a_binomial_says_so():
    """The pilot's failure: every sample is patient 0. A binomial against 1/2K calls its 10% hits significant."""
    rng = np.random.default_rng(1)
    centres, gallery, patients = _gallery(rng)
    classes = np.repeat(np.arange(K), 20)
    result = _run(centres[[0] * len(classes)] + rng.normal(size=(len(classes), 16)) * 0.5, classes, gallery, patients)
    assert result["distinct"] == 1 and result["top1"] == pytest.approx(0.1)
    assert binomtest(int(result["top1"] * len(classes)), len(classes), 1 / (2 * K), alternative="greater").pvalue < 0.05
    assert result["p_value"] == 1.0  # every within-sex permutation maps some class to patient 0: the same hits
    assert result["null_top1"] == pytest.approx(0.1)


def test_a_sex_only_signal_is_not_identity():
    """Samples that land on a random patient of the asked patient's sex: far above 1/2K, at the within-sex null."""
    rng = np.random.default_rng(2)
    centres, gallery, patients = _gallery(rng)
    classes = np.repeat(np.arange(K), 20)
    same_sex = np.where(classes < 5, rng.integers(0, 5, len(classes)), rng.integers(5, 10, len(classes)))
    result = _run(centres[same_sex] + rng.normal(size=(len(classes), 16)) * 0.5, classes, gallery, patients)
    assert result["top1"] > 2 / (2 * K)
    assert result["p_value"] > 0.01


def test_permutation_p_values_are_uniform_under_the_null():
    """Random samples, many seeds: p <= 0.05 about 5% of the time (a true null)."""
    rng = np.random.default_rng(3)
    centres, gallery, patients = _gallery(rng)
    classes = np.repeat(np.arange(K), 6)
    p_values = [_run(centres[rng.integers(0, 2 * K, len(classes))] + rng.normal(size=(len(classes), 16)) * 0.5,
                     classes, gallery, patients, permutations=199)["p_value"] for _ in range(200)]
    assert 0.01 <= np.mean(np.array(p_values) <= 0.05) <= 0.10


def test_within_sex_permutations_never_mix_sexes():
    rows = within_sex_permutations(SEXES, 300, np.random.default_rng(4))
    assert (SEXES[rows] == SEXES[None, :]).all()
    assert all(sorted(row) == list(range(K)) for row in rows)
    assert len({tuple(row) for row in rows}) > 250


def test_the_null_in_blocks_equals_the_null_at_once(monkeypatch):
    """Bounded memory: permutations are compared a block at a time, with the same p-value as all at once."""
    from reid_batch.analysis import identity

    rng = np.random.default_rng(5)
    centres, gallery, patients = _gallery(rng)
    classes = rng.integers(0, K, 300)
    samples = centres[rng.integers(0, 2 * K, 300)] + rng.normal(size=(300, 16)) * 0.5
    at_once = _run(samples, classes, gallery, patients)
    monkeypatch.setattr(identity, "NULL_BLOCK_CELLS", 1000)  # 3 permutations per block
    in_blocks = _run(samples, classes, gallery, patients)
    assert (in_blocks["p_value"], in_blocks["null_top1"]) == (at_once["p_value"], at_once["null_top1"])
