"""report.json: the machine-readable report assembled from the committed evaluations and calibrations.

Everything the HTML and Markdown renderers show is in this document, so a reader of report.json sees the same
numbers as a reader of the page.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pandas as pd

from reid_batch.formats import clean_json, software_versions
from reid_batch.log import redact
from reid_batch.reporting.text import canonical_terms, nested
from reid_batch.reporting.verdicts import headline, leak_entry
from reid_batch.results import Calibration, Evaluation


HTML_MAX_SAMPLES = 50


MEANINGS = [
    ("Likely samples",
     "How many of the candidates passed both selection thresholds (objective and Mahalanobis distance).",
     "With the quantile rule the count is bounded by the quantiles by design: it shows how far the two scores agree, "
     "not by itself that anything leaked."),
    ("Pixel entropy, PCA kurtosis, FID (stage 1)",
     "Whether fine-tuning moved the generator's image distribution, and whether towards the target's training "
     "images (compare prior vs reference with fine-tuned vs reference). Kurtosis curves share one PCA basis.",
     "Nothing about any individual patient. FID from untrained Inception weights is only a relative measure; with "
     "fewer images than 2048 it is biased upwards and comparable only between sets of equal size."),
    ("Leak L (headline)",
     "Membership AUC of the attacked generator minus a null generator's, on the same member and non-member "
     "patients: a patient's score is the distance from its closest image to the closest raw candidate in the "
     "re-identification embedding. Null: the un-fine-tuned prior; beside it, a generator attacked the same way against "
     "a control model trained on other patients. 0 = the attack adds nothing; anything the two patient sets differ "
     "in cancels.",
     "A leak smaller than the smallest detectable leak: an interval covering 0 means 'no leak larger than that', "
     "not 'no leak'. A stronger attack or a better embedding could see more."),
    ("Smallest detectable leak (calibration)",
     "The smallest share of candidates replaced by new images of member patients that the statistic detects (its "
     "interval above 0) in most repeats, and how often it 'detects' a leak when none was planted.",
     "What a real leak looks like: a generator can leak in ways other than reproducing whole patients."),
    ("TPR at 1% / 5% FPR",
     "The share of member patients an auditor flags while flagging at most 1% / 5% of non-members.",
     "With few non-members the 1% threshold is the closest non-member itself: a coarse number."),
    ("Nearest neighbour and SSIM (validation only)",
     "How close each likely sample is to the nearest real training image in the re-identification embedding (the "
     "pixel distance to that image beside it), and their structural similarity.",
     "That the neighbour is the same person; low SSIM is usual even for genuine matches."),
    ("Demographic accuracy (validation only)",
     "Age error and sex accuracy of the age/sex model on the reconstructions, against the nearest neighbour's true "
     "age and sex; the same model on the real neighbour image is the floor.",
     "That the reconstruction shows that person: a population-typical image can get age and sex right by chance. "
     "Few likely samples give wide intervals."),
    ("Re-identification rate (sample vote)",
     "The share of likely samples whose nearest image, among equally many training and held-out images, is a "
     "training image. Chance is 0.5.",
     "That a person could be named from a reconstruction in practice; samples collapsing onto a few patients make the "
     "evidence weaker than the count suggests (see distinct patients)."),
    ("Device reproduction (synthetic world)",
     "Whether a pacemaker of the matched training patient reappears in the reconstruction, by a simple calibrated "
     "brightness detector.",
     "Anything when the detector is reported unreliable at this resolution."),
]


def safe_manifest(document: Any) -> Any:
    """The manifest dump with anything credential-like replaced by "***" (the schema holds none; this checks)."""
    return redact(document)


def sample_records(table: pd.DataFrame) -> list[dict]:
    """Every likely sample's row, exactly as in evaluation.parquet (full float precision), by id."""
    return [{k: clean_json(v) for k, v in row.items()} for row in table.sort_values("id").to_dict(orient="records")]


@dataclass(kw_only=True)
class ReportInputs:
    """What one report is made from, besides the manifest: the committed records of every target it covers, and the
    comparisons between targets that the report stage measured."""

    evaluations: dict[str, Evaluation]
    tables: dict[str, pd.DataFrame]  # evaluation.parquet per target
    calibrations: dict[str, Calibration] = field(default_factory=dict)
    control_leaks: dict[str, dict] = field(default_factory=dict)  # L against a control model's generator
    defence_changes: dict[str, dict] = field(default_factory=dict)  # the paired change of L against a baseline
    demographic_model: dict | None = None  # train-demographics' metrics.json
    reid_model: dict | None = None  # train-reid's metrics.json


def build_report(run_id: str, inputs: ReportInputs, manifest_document: dict) -> dict:
    """The machine-readable report: per target its metrics, headline risk and samples, plus the comparison."""
    evaluations = inputs.evaluations
    targets = {}
    for name, evaluation in evaluations.items():
        table = inputs.tables[name]
        reid, demographics = evaluation.reidentification, evaluation.demographics
        reconstruction, neighbour = demographics.reconstruction or {}, demographics.neighbour or {}
        devices = reid.devices or {}
        risk = {
            "leak": leak_entry(evaluation.leak, evaluation.attacks, inputs.control_leaks.get(name),
                               inputs.calibrations.get(name)),
            "likely_samples": int(len(table)),
            "candidates": evaluation.stage2.candidates,
            "age_mae": reconstruction.get("age_mae"),
            "age_mae_ci": reconstruction.get("age_mae_ci"),
            "sex_accuracy": reconstruction.get("sex_accuracy"),
            "sex_accuracy_ci": reconstruction.get("sex_accuracy_ci"),
            "neighbour_age_mae": neighbour.get("age_mae"),
            "neighbour_sex_accuracy": neighbour.get("sex_accuracy"),
            "reidentification_rate": reid.rate if reid.available else None,
            "reidentification_ci": reid.rate_ci if reid.available else None,
            "reidentification_p": reid.p_value if reid.available else None,
            "distinct_patients": reid.distinct_train_patients if reid.available else None,
            "membership_auc": reid.membership_auc if reid.available else None,
            "ssim_mean": evaluation.stage2.ssim_mean,
            "defence": inputs.defence_changes.get(name),
            "devices_reproduced": devices.get("reproduced")
            if devices.get("available") and devices.get("interpretable") else None,
        }
        targets[name] = {"metrics": evaluation.to_json(), "risk": risk, "samples": sample_records(table),
                         "headline": headline(risk["leak"])}
    return clean_json({
        "run_id": run_id,
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "threat_model": next(iter(evaluations.values())).threat_model if evaluations else None,
        "validation_note": next(iter(evaluations.values())).validation_note if evaluations else None,
        "targets": targets,
        "mitigation": mitigation_summary(targets),
        "controls": {name: entry["metrics"]["identity_control"] for name, entry in targets.items()
                     if entry["metrics"].get("identity_control")},
        "population_shift": {name: entry["metrics"]["population_shift"] for name, entry in targets.items()
                             if entry["metrics"].get("population_shift")},
        "canaries": {name: entry["metrics"]["canaries"] for name, entry in targets.items()
                     if entry["metrics"].get("canaries")},
        "demographic_model": inputs.demographic_model,
        "instrument": instrument_summary(inputs.reid_model, configured=nested(manifest_document, "reid") is not None),
        "meanings": [{"metric": m, "shows": s, "does_not_show": d} for m, s, d in MEANINGS],
        "manifest": safe_manifest(manifest_document),
        "software": {"report": software_versions(),
                     "evaluation": {n: e.software for n, e in evaluations.items()}},
    })


def mitigation_summary(targets: dict[str, dict]) -> dict:
    """Utility and attack outcome per target, side by side; `shown` when the targets differ in preset."""
    rows = []
    for name, entry in targets.items():
        metrics, risk = entry["metrics"], entry["risk"]
        trained = metrics.get("target_training") or {}
        ranking = nested(risk, "leak", "attacks") or []
        strongest = ranking[0] if ranking else {"mode": "study", "vs_prior": nested(risk, "leak", "vs_prior")}
        privacy = trained.get("privacy") or {}
        rows.append({
            "target": name, "preset": preset_label(metrics), "role": metrics.get("role"),
            "epsilon": privacy.get("epsilon"), "target_epsilon": privacy.get("target_epsilon"),
            "delta": privacy.get("delta"), "norm": trained.get("norm"),
            "val_auc": nested(trained, "val", "auc"), "val_accuracy": nested(trained, "val", "accuracy"),
            "val_auc_ci": nested(trained, "val", "auc_ci"), "val_accuracy_ci": nested(trained, "val", "accuracy_ci"),
            "train_accuracy": nested(trained, "train", "accuracy"),
            "likely_samples": risk["likely_samples"], "candidates": risk["candidates"],
            "ssim_mean": risk["ssim_mean"], "sex_accuracy": risk["sex_accuracy"], "age_mae": risk["age_mae"],
            "reidentification_rate": risk["reidentification_rate"], "reidentification_ci": risk["reidentification_ci"],
            # The strongest attack run on the target: a defence is judged by what the best attack still recovers.
            "leak": nested(strongest, "vs_prior", "leak"), "leak_ci": nested(strongest, "vs_prior", "ci"),
            "attack": strongest.get("mode", "study"),
            "leak_vs_control": nested(risk, "leak", "vs_control", "leak"),
            "leak_vs_control_ci": nested(risk, "leak", "vs_control", "ci"),
            "verdict": nested(risk, "leak", "verdict"),
            "defence": risk.get("defence"),
            "attack_terms": list(canonical_terms(nested(metrics, "attack_terms", "terms") or {})),
            "fallback": nested(metrics, "attack_terms", "fallback") is not None,
        })
    presets = {r["preset"] for r in rows}
    return {"shown": len(presets) > 1 or any(r["epsilon"] is not None for r in rows), "rows": rows}


def preset_label(metrics: dict) -> str:
    """The training recipe's name: the preset, with the defence of a defended identity control."""
    defence = nested(metrics, "target_training", "identity_defence")
    preset = metrics.get("preset") or "checkpoint"
    return f"{preset} ({defence})" if defence not in (None, "none") else preset


def instrument_summary(reid_model: dict | None, configured: bool = False) -> dict:
    """What the report says of its ruler: the re-identification embedding's own verification (reid/metrics.json)."""
    if not reid_model:
        why = ("the manifest's reid section was not trained: run `reid-batch train-reid`" if configured else
               "no re-identification embedding in this run (no reid section)")
        return {"embedding": None, "note": why + "; grey-pixel distances are blind to identity"}
    verification = reid_model.get("verification") or {}
    return {"embedding": {"arch": reid_model.get("arch"), "image_size": reid_model.get("image_size"),
                          "train_patients": reid_model.get("train_patients"),
                          **{pool: {k: result.get(k) for k in ("auc", "rank1", "patients", "images")}
                             for pool, result in verification.items()}},
            "note": "verification AUC: same-patient image pairs against different-patient pairs by cosine similarity; "
                    "rank-1: the nearest other image is the same patient's"}
