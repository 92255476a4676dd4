"""P2 canaries: the atypical patients the world renders for them, and the coin-flip test that scores them."""

from __future__ import annotations

import numpy as np
import pytest

from reid_batch.analysis.canaries import canary_test, canary_tests
from reid_batch.data.phantoms import (CANARY_CAPACITY, WorldConfig, canary_patient, canary_room, sample_patient,
                                      sample_patients)
from reid_batch.errors import InputError

WORLD = WorldConfig(image_size=32, private_patients=40, control_patients=10, public_patients=10, workers=1)


def test_canaries_are_atypical_distinct_and_outside_every_table():
    canaries = [canary_patient(WORLD, "private", n) for n in range(40)]
    assert canary_patient(WORLD, "private", 3) == canaries[3]  # fixed by the world's seed
    ids = [c.patient_id for c in canaries]
    assert len(set(ids)) == 40 and min(ids) > max(p.patient_id for p in sample_patients(WORLD, "private"))
    assert min(ids) == canary_room("private") + 1 and canary_room("private") + CANARY_CAPACITY == 60_000
    # Each canary differs from the patient it was drawn as in its rare traits only; the population rarely has them.
    edges = {"pacemaker": lambda p: p.pacemaker and p.sternal_wires, "lung_top": lambda p: p.lung_top == -0.72,
             "lung_asymmetry": lambda p: abs(p.lung_asymmetry) == 0.06, "heart": lambda p: p.heart_half_height == 0.34,
             "mediastinum": lambda p: p.mediastinum_half_width == 0.07, "knob": lambda p: p.aortic_knob_radius == 0.11,
             "clavicle": lambda p: p.clavicle_angle_deg in (4.0, 26.0)}
    population = sample_patients(WorldConfig(image_size=32, private_patients=400, workers=1), "private")
    rare_in_population = np.mean([sum(test(p) for test in edges.values()) for p in population])
    rare_in_canaries = np.mean([sum(test(c) for test in edges.values()) for c in canaries])
    assert rare_in_canaries >= 1.9 and rare_in_population < 0.3
    plain = sample_patient(WORLD, "private", canary_room("private"))
    assert canaries[0].age == plain.age and canaries[0].sex == plain.sex and canaries[0].ctr == plain.ctr
    with pytest.raises(InputError, match="at most"):
        canary_patient(WorldConfig(image_size=32, private_patients=55_000, workers=1), "private", 0)


def test_the_coin_test_has_a_true_null_and_sees_a_planted_effect():
    rng = np.random.default_rng(0)
    # Null: scores independent of the coins; p-values are (conservatively) uniform.
    p_values = []
    for repeat in range(300):
        included = rng.random(16) < 0.5
        result = canary_test(rng.normal(size=16), included, bootstrap=0, permutations=499, seed=repeat)
        if result["p_value"] is not None:
            p_values.append(result["p_value"])
    p_values = np.array(p_values)
    assert 0.02 <= (p_values <= 0.1).mean() <= 0.13 and (p_values <= 0.01).mean() <= 0.025
    # Positive control: included canaries closer by 1.5 standard deviations, 24 canaries.
    included = np.arange(24) % 2 == 0
    scores = rng.normal(size=24) - 1.5 * included
    result = canary_test(scores, included, bootstrap=500, seed=1)
    assert result["auc"] > 0.75 and result["p_value"] <= 0.01 and result["ci"][0] > 0.5
    assert result["included_median"] < result["excluded_median"]
    # The same data with the coins reversed: the one-sided test does not fire.
    assert canary_test(scores, ~included, bootstrap=0, seed=1)["p_value"] > 0.9


def test_groups_with_one_side_only_are_not_measured_and_doses_are_apart():
    scores = np.arange(6, dtype=float)
    result = canary_tests(scores, np.array([1, 1, 1, 0, 1, 0], bool), np.array([1, 1, 1, 4, 4, 4]), bootstrap=10)
    assert set(result) == {"1", "4"}
    assert result["1"]["auc"] is None and "one side" in result["1"]["reason"]
    assert result["4"]["included"] == 1 and result["4"]["excluded"] == 2 and result["4"]["auc"] == 0.5


def test_the_report_sentence_corrects_for_every_level_and_set_tested():
    from reid_batch.reporting.tables import canary_rows
    from reid_batch.reporting.sentences import canary_sentence

    def level(p):
        return {"included": 6, "excluded": 6, "auc": 0.9, "ci": [0.6, 1.0], "p_value": p}

    passing = {"raw": {"1": level(0.5), "4": level(0.0011)}, "likely": {"1": level(0.3), "4": level(0.004)}}
    sentence = canary_sentence("c", passing)
    assert "at 4 (raw candidates" in sentence and "likely samples" not in sentence and "over 4 tests" in sentence
    assert "at no duplication level" in canary_sentence("c", {"raw": {"1": level(0.006)}, "likely": {"1": level(0.02)}})
    assert "both sides" in canary_sentence("c", {"raw": {"1": {"p_value": None}}})
    header, rows = canary_rows({"canaries": {"c": {**passing, "flip_label": True}}})
    assert len(rows) == 4 and rows[0][0] == "c (labels flipped)" and rows[0][2] == "1"
