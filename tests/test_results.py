"""The typed records between evaluate, calibrate and report (reid_batch.results): what a reader gets from a file that
does not hold the record it should, and that a record written and read back is the same JSON.

The records of a real pipeline are read back in test_evaluate_report.py; here, small hand-made documents."""

from __future__ import annotations

import copy
import json

import pytest

from reid_batch.results import (SCHEMA_VERSION, Calibration, Evaluation, LeakSummary, LeakTest, RecordError, parse,
                                read, record_of, write)
from reid_batch.storage import open_store

LEAK_TEST = {"leak": 0.05, "ci": [0.01, 0.09], "p_value": 0.02, "confidence": 0.95, "auc_attacked": 0.6,
             "auc_null": 0.55, "tpr_at_fpr": {"attacked": {"0.01": 0.1, "0.05": None}, "null": {"0.01": 0.0,
                                                                                                 "0.05": 0.1}},
             "members": 10, "nonmembers": 10, "candidates": {"attacked": 100, "null": 100}, "bootstrap": 50,
             "permutations": 50, "detected": True}


def evaluation_document() -> dict:
    """A complete metrics.json of one target, as evaluate writes it (small, but every required field)."""
    return copy.deepcopy({
        "schema_version": SCHEMA_VERSION, "target": "cnn", "arch": "resnet18", "family": "cnn", "preset": "normal",
        "train_pool": "private", "heldout_pool": "control", "role": "target", "checkpoint": None,
        "target_training": None,
        "attack_terms": {"terms": {"bn_stats": 1.0}, "configured": None, "fallback": None, "reference": None,
                         "feature_target": None},
        "threat_model": "parameters only", "validation_note": "validation only",
        "selection": {"rule": "quantile", "thresholds": {"objective_total": 1.0}, "counts": {"selected": 3}},
        "finetune": {"steps": 2, "first_total": 3.0, "last_total": 2.5},
        "stage1": {"sets": {"prior": {"images": 8}}, "pca": {"components": 4}, "fid": [], "notes": [],
                   "num_images": 8, "latent_ids": "2**40 + k", "inception": None},
        "stage2": {"likely": 3, "candidates": 64, "feature_space": "embedding", "training_images": 40,
                   "reference_source": "world", "ssim_mean": None},
        "demographics": {"available": False},
        "reidentification": {"available": False, "reason": "no held-out images"},
        "leak": {"available": True, "feature_space": "embedding", "member_patients": 10, "nonmember_patients": 10,
                 "raw": {"vs_prior": LEAK_TEST}},
        "attacks": {"study": {"mode": "study", "description": "the study's two stages",
                              "leak": {"available": True, "vs_prior": LEAK_TEST,
                                       "compared": {"attacked": 100, "null": 100}}}},
        "notes": [], "figures": {"kurtosis": "figures/kurtosis.png"}, "table": "evaluation.parquet",
        "pairs": "pairs/<id:09d>.png", "evaluation": {"seed": 0}, "software": {"torch": "2"}, "resolution": 32,
    })


def test_an_evaluation_reads_back_as_the_same_json():
    document = evaluation_document()
    evaluation = parse(Evaluation, copy.deepcopy(document), "metrics.json")
    assert evaluation.to_json() == document  # an optional field read as null (stage2.ssim_mean) stays null
    assert evaluation.leak.raw.vs_prior.ci == [0.01, 0.09] and evaluation.attacks["study"].leak.compared["null"] == 100
    # An optional field that was absent stays absent; one set on a record built in code appears.
    assert "reason" not in evaluation.to_json()["leak"]
    assert LeakSummary(available=False, reason="no list").to_json() == {"available": False, "reason": "no list"}


@pytest.mark.parametrize("change, message", [
    (lambda d: d["leak"]["raw"]["vs_prior"].pop("p_value"), "field 'leak.raw.vs_prior.p_value' is missing"),
    (lambda d: d.pop("attacks"), "field 'attacks' is missing"),
    (lambda d: d["attacks"]["study"]["leak"].update(vs_prior={"leak": "high", "ci": None, "p_value": None}),
     "field 'attacks.study.leak.vs_prior.leak' must be float, not str"),
    (lambda d: d["stage2"].update(likely=None), "field 'stage2.likely' must not be null"),
    (lambda d: d["leak"].update(avaliable=True), "unexpected field 'leak.avaliable'"),
    (lambda d: d.update(schema_version=0), "schema version 0, this reid-batch reads"),
    (lambda d: d.pop("schema_version"), "schema version None"),
])
def test_a_file_that_does_not_hold_the_record_is_refused_naming_the_file_and_field(change, message):
    document = evaluation_document()
    change(document)
    with pytest.raises(RecordError) as refused:
        parse(Evaluation, document, "s3://bucket/run/cnn/evaluation/metrics.json")
    assert message in str(refused.value)
    assert refused.value.where == "s3://bucket/run/cnn/evaluation/metrics.json" and refused.value.exit_code == 2


def test_records_go_through_a_store_and_a_bad_file_is_an_input_error(tmp_path):
    store = open_store(str(tmp_path))
    calibration = record_of(Calibration, {"available": False, "reason": "no records", "target": "cnn"}, where="x")
    write(store, "cnn/calibration/calibration.json", calibration)
    assert read(Calibration, store, "cnn/calibration/calibration.json") == calibration
    assert json.loads((tmp_path / "cnn/calibration/calibration.json").read_text())["schema_version"] == SCHEMA_VERSION
    (tmp_path / "cnn/calibration/calibration.json").write_text("{not json")
    with pytest.raises(RecordError, match="not valid JSON"):
        read(Calibration, store, "cnn/calibration/calibration.json")


def test_a_stage_cannot_write_what_the_report_could_not_read():
    with pytest.raises(RecordError, match="field 'target' is missing"):
        record_of(Calibration, {"available": False, "reason": "no records"}, where="calibrate")
    with pytest.raises(RecordError, match="field 'leak' is missing"):
        LeakTest.from_json({"ci": None, "p_value": None}, where="evaluate")
