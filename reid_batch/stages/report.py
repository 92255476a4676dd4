"""`reid-batch report`: render the evaluation outputs as one risk report (HTML, Markdown, JSON).

Reads only what `evaluate` and `calibrate` committed (`<target>/evaluation/`: metrics.json, evaluation.parquet,
records.parquet, leak_candidates.parquet, figures, pairs; `<target>/calibration/`) and, when present, the embedding's
and the demographic model's metrics.json; it imports no torch.
Output, committed: `<run>/report/` (every target of the manifest) or `<run>/report-<target>/` (one target):
  report.html  self-contained (figures embedded as base64 PNG): threat model, risk summary first, the side-by-side
               comparison, then per target: stage 1 table and figures, likely samples beside their nearest training
               image with SSIM, demographic and re-identification tables, loss curves; what each number does and does
               not show; the resolved manifest and software versions.
  report.md    the summary in Markdown (no images).
  report.json  everything machine-readable, including every likely sample's row.
A committed report is re-rendered only when an evaluation it was made from has changed since (commit markers).

The headline risk of a target is the leak statistic L (reid_batch.analysis.leak): the membership AUC of the attacked
generator's raw candidates minus a null generator's, on the same member and non-member patients, in the
re-identification embedding; with its two-way bootstrap interval, permutation p-value and TPR at 1% and 5% FPR.
Nulls: the un-fine-tuned prior (evaluate computes it), and the generator fine-tuned against a control model (a target
with `train.pool: control`, the same architecture family preferred), whose candidates this stage scores on the
target's own records. The verdict is worded from the spike-in calibration: "leak detected" when L's interval against
the prior lies above 0, else "no leak larger than <the minimum detectable effect> detected", never "no leak". The
per-sample vote (re-identification rate) and the demographic errors are reported per target, not as the headline:
likely samples crowd onto a few "hub" images, so one image's membership can decide that vote for dozens of samples.
Reconstructions are sensitive data: everything is written only under the run's output URI.

Mitigations: when the targets differ in training preset (a mitigation study: overfit, regularised, augmented, DP-SGD
at several epsilons, a control), a side-by-side table sets each target's utility (validation AUC and accuracy)
beside the attack's outcome (the leak statistic, likely samples, nearest-neighbour SSIM, demographic accuracy,
re-identification rate), with a risk-vs-utility plot (`mitigation.png`). Every target states the objective terms its attack
used (a GroupNorm target's `bn_stats` falls back to `gn_stats`, see reid_batch.attack.objectives).
"""

from __future__ import annotations

import base64
import html
import math
from datetime import datetime, timezone
from typing import Any

import matplotlib
import pandas as pd
import pyarrow.compute as pc
import yaml

from reid_batch import log
from reid_batch.analysis.leak import committed_records, generator_scores, leak_test
from reid_batch.errors import InputError
from reid_batch.formats import clean_json, feature_matrix, figure_png, software_versions
from reid_batch.layout import (CALIBRATION_FIGURE, CALIBRATION_FILE, DEMOGRAPHICS_PREFIX, FIGURES, HTML_FILE,
                               JSON_FILE, LEAK_CANDIDATES_FILE, MARKDOWN_FILE, METRICS_FILE, MITIGATION_FIGURE,
                               MODEL_METRICS_FILE, PRIOR_QUALITY_FILE, PRIOR_QUALITY_PREFIX, PRIOR_QUALITY_STRIP,
                               RECORDS_FILE, REID_PREFIX, TABLE_FILE, calibration_prefix,
                               evaluation_prefix, pair_key, report_prefix)
from reid_batch.log import redact
from reid_batch.archs import CNN_ALLOWED_TERMS, VIT_TERMS
from reid_batch.manifest import Manifest
from reid_batch.storage import run_store

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


# ------------------------------------------------------------------------------------------------ pure core


def safe_manifest(document: Any) -> Any:
    """The manifest dump with anything credential-like replaced by "***" (the schema holds none; this checks)."""
    return redact(document)


def _get(mapping: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(mapping, dict):
            return None
        mapping = mapping.get(key)
    return mapping


def choose_control(metrics: dict, evaluations: dict[str, dict]) -> str | None:
    """The control model a target's leak is also measured against: a target trained on the control pool with a leak
    statistic of its own (its candidates were embedded), the same architecture family first; None for a control."""
    if metrics.get("train_pool") == "control":
        return None
    usable = [name for name, m in evaluations.items()
              if m.get("train_pool") == "control" and _get(m, "leak", "available")]
    same_family = [name for name in usable if evaluations[name].get("family") == metrics.get("family")]
    return (same_family or usable or [None])[0]


def _sample_records(table: pd.DataFrame) -> list[dict]:
    """Every likely sample's row, exactly as in evaluation.parquet (full float precision), by id."""
    return [{k: clean_json(v) for k, v in row.items()} for row in table.sort_values("id").to_dict(orient="records")]


def leak_verdict(leak: dict) -> str:
    """The risk wording: from L against the prior and the calibration; never a bare "no leak"."""
    if not leak.get("available"):
        return f"membership: not available ({leak.get('reason')})"
    raw = leak["vs_prior"]
    if raw.get("ci") and raw["ci"][0] > 0:
        return f"leak detected: L = {signed(raw['leak'])}{signed_interval(raw['ci'])} against the prior"
    calibration = leak.get("calibration") or {}
    if not calibration.get("available"):
        return ("no leak detected; the instrument is not calibrated for this target (run `reid-batch calibrate`), so "
                "the smallest leak it could see is unknown")
    smallest = calibration.get("minimum_detectable_effect")
    if smallest is None:
        return (f"no leak detected, but the instrument did not reliably see even {percent(calibration['largest_fraction'])} "
                "of candidates being member patients here: no conclusion")
    return f"no leak larger than {percent(smallest)} of candidates being training patients detected"


def attack_ranking(metrics: dict) -> list[dict]:
    """Every attack mode run on a target with its L against the prior, strongest first: a detected leak before an
    undetected one, then by L. A risk estimate is a lower bound set by the strongest attack tried."""
    ranked = []
    for mode, attack in (metrics.get("attacks") or {}).items():
        leak = attack.get("leak") or {}
        if leak.get("available"):
            result = leak["vs_prior"]
            # Both the interval and the permutation test: with a few dozen optimised samples the candidate bootstrap
            # is coarse, and an interval alone can clear 0 where the permutation p does not.
            detected = bool((result.get("ci") or [0])[0] > 0 and (result.get("p_value") or 1.0) <= 0.05)
            ranked.append({"mode": mode, "vs_prior": result, "detected": detected,
                           "compared": leak.get("compared"), "description": attack.get("description")})
    return sorted(ranked, key=lambda r: (not r["detected"], -float(r["vs_prior"].get("leak") or 0.0)))


def leak_entry(metrics: dict, control_leak: dict | None, calibration: dict | None) -> dict:
    """A target's headline risk: L against the prior and the control model, the calibration, the verdict, and the
    attack modes ranked (the headline names the strongest)."""
    leak = metrics.get("leak") or {}
    if not leak.get("available"):
        entry = {"available": False, "reason": leak.get("reason", "the evaluation has no leak statistic")}
    else:
        entry = {"available": True, "vs_prior": leak["raw"]["vs_prior"], "feature_space": leak.get("feature_space"),
                 "selected_vs_prior": (leak.get("selected") or {}).get("vs_prior"),
                 "identity_sensitive": leak.get("identity_sensitive"),
                 "members_known_by": leak.get("members_known_by"),
                 "member_patients": leak.get("member_patients"), "nonmember_patients": leak.get("nonmember_patients")}
        entry["control"] = (control_leak or {}).get("control")
        entry["vs_control"] = control_leak
        if calibration is not None:
            entry["calibration"] = {k: calibration.get(k) for k in (
                "available", "reason", "minimum_detectable_effect", "false_positive_rate", "null_repeats",
                "largest_fraction", "detect_share", "fractions", "spikes", "ppa")}
    entry["verdict"] = leak_verdict(entry)
    entry["detected"] = bool(entry.get("available") and (entry["vs_prior"].get("ci") or [0])[0] > 0)
    ranking = attack_ranking(metrics) if entry.get("available") else []
    entry["attacks"] = ranking
    entry["strongest"] = ranking[0]["mode"] if ranking else "study"
    if ranking and ranking[0]["mode"] != "study" and ranking[0]["detected"]:
        strongest = ranking[0]["vs_prior"]
        entry["detected"] = True
        entry["verdict"] = (f"leak detected by the {ranking[0]['mode']} attack: L = {signed(strongest['leak'])}"
                            f"{signed_interval(strongest['ci'])} against the prior")
    elif ranking and ranking[0]["mode"] == "ppa" and not entry["detected"]:
        # The strongest attack is ppa and nothing was detected: its own calibration (at its pool size) words it.
        entry["verdict"] = ppa_verdict((entry.get("calibration") or {}).get("ppa"), ranking[0]["compared"])
    return entry


def ppa_verdict(calibration: dict | None, samples: int | None) -> str:
    """No leak detected by the ppa attack, with the smallest share of its samples the calibration saw."""
    if not calibration:
        return ("no leak detected; the instrument is not calibrated at the ppa attack's pool size (run `reid-batch "
                "calibrate`), so the smallest leak it could see is unknown")
    smallest = calibration.get("minimum_detectable_effect")
    if smallest is None:
        return (f"no leak detected, but at the ppa attack's {samples} samples the instrument did not reliably see even "
                f"{percent(calibration['largest_fraction'])} of them being member patients: no conclusion")
    return f"no leak larger than {percent(smallest)} of the ppa samples being training patients detected"


def headline(leak: dict) -> str:
    """A target's headline risk in one line (the ending of `run` prints it): L against the prior, the verdict."""
    if not leak.get("available"):
        return leak["verdict"]
    ranking = leak.get("attacks") or []
    if len(ranking) > 1:  # several attack modes: the strongest speaks, named
        best = ranking[0]
        if best["detected"]:
            return f"leak detected by {best['mode']}: L {leak_cell(best['vs_prior'])} against the prior"
        return f"L {leak_cell(best['vs_prior'])} ({best['mode']}, the strongest of {len(ranking)} attacks): " \
               f"{leak['verdict']}"
    if leak.get("detected"):
        return f"leak detected: L {leak_cell(leak.get('vs_prior'))} against the prior"
    return f"L {leak_cell(leak.get('vs_prior'))}: {leak['verdict']}"


def build_report(run_id: str, evaluations: dict[str, dict], tables: dict[str, pd.DataFrame],
                 manifest_document: dict, demographic_model: dict | None = None, reid_model: dict | None = None,
                 calibrations: dict[str, dict] | None = None, control_leaks: dict[str, dict] | None = None,
                 defence_changes: dict[str, dict] | None = None) -> dict:
    """The machine-readable report: per target its metrics, headline risk and samples, plus the comparison."""
    calibrations, control_leaks, defence_changes = calibrations or {}, control_leaks or {}, defence_changes or {}
    targets = {}
    for name, metrics in evaluations.items():
        table = tables[name]
        reid = metrics.get("reidentification") or {}
        demographics = metrics.get("demographics") or {}
        risk = {
            "leak": leak_entry(metrics, control_leaks.get(name), calibrations.get(name)),
            "likely_samples": int(len(table)),
            "candidates": _get(metrics, "stage2", "candidates"),
            "age_mae": _get(demographics, "reconstruction", "age_mae"),
            "age_mae_ci": _get(demographics, "reconstruction", "age_mae_ci"),
            "sex_accuracy": _get(demographics, "reconstruction", "sex_accuracy"),
            "sex_accuracy_ci": _get(demographics, "reconstruction", "sex_accuracy_ci"),
            "neighbour_age_mae": _get(demographics, "neighbour", "age_mae"),
            "neighbour_sex_accuracy": _get(demographics, "neighbour", "sex_accuracy"),
            "reidentification_rate": reid.get("rate") if reid.get("available") else None,
            "reidentification_ci": reid.get("rate_ci") if reid.get("available") else None,
            "reidentification_p": reid.get("p_value") if reid.get("available") else None,
            "distinct_patients": reid.get("distinct_train_patients") if reid.get("available") else None,
            "membership_auc": reid.get("membership_auc") if reid.get("available") else None,
            "ssim_mean": _get(metrics, "stage2", "ssim_mean"),
            "defence": defence_changes.get(name),
            "devices_reproduced": _get(reid, "devices", "reproduced")
            if _get(reid, "devices", "available") and _get(reid, "devices", "interpretable") else None,
        }
        targets[name] = {"metrics": metrics, "risk": risk, "samples": _sample_records(table),
                         "headline": headline(risk["leak"])}
    return clean_json({
        "run_id": run_id,
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "threat_model": next(iter(evaluations.values()))["threat_model"] if evaluations else None,
        "validation_note": next(iter(evaluations.values()))["validation_note"] if evaluations else None,
        "targets": targets,
        "mitigation": mitigation_summary(targets),
        "controls": {name: entry["metrics"]["identity_control"] for name, entry in targets.items()
                     if entry["metrics"].get("identity_control")},
        "population_shift": {name: entry["metrics"]["population_shift"] for name, entry in targets.items()
                             if entry["metrics"].get("population_shift")},
        "canaries": {name: entry["metrics"]["canaries"] for name, entry in targets.items()
                     if entry["metrics"].get("canaries")},
        "demographic_model": demographic_model,
        "instrument": instrument_summary(reid_model, configured=_get(manifest_document, "reid") is not None),
        "meanings": [{"metric": m, "shows": s, "does_not_show": d} for m, s, d in MEANINGS],
        "manifest": safe_manifest(manifest_document),
        "software": {"report": software_versions(),
                     "evaluation": {n: m.get("software") for n, m in evaluations.items()}},
    })


def control_leak(records, target_candidates, control_candidates, bootstrap: int, permutations: int, seed: int
                 ) -> dict | None:
    """L of the target's attacked candidates against a control model's, on the TARGET's records (Arrow tables of
    records.parquet and leak_candidates.parquet); None when the two were embedded in different spaces."""
    features, patients, member = committed_records(records)
    attacked, null = (feature_matrix(t.filter(pc.equal(t.column("generator"), "attacked")).column("features"))
                      for t in (target_candidates, control_candidates))
    if attacked.shape[1] != features.shape[1] or null.shape[1] != features.shape[1]:
        return None
    count = len(member)
    result = leak_test(member, generator_scores(features, patients, count, attacked),
                       generator_scores(features, patients, count, null), bootstrap, permutations, seed)
    return result


# Which rows of leak_candidates.parquet hold an attack mode's candidates.
MODE_CANDIDATES = {"study": "attacked", "ppa": "ppa"}


def defence_change(mode: str, records, baseline_records, candidates, baseline_candidates, bootstrap: int,
                   permutations: int, seed: int) -> dict:
    """The change of an attack mode's L from a baseline target to a defended one, paired on their shared patients:
    change = AUC(defended's candidates) - AUC(baseline's) on the same members and non-members (the prior null is the
    same for both, so this is L(defended) - L(baseline)), with analysis.leak's two-way bootstrap interval and paired
    permutation p ("the defence lowers L", one-sided). Tables as in records.parquet and leak_candidates.parquet."""
    columns = ("patient_id", "path", "member")
    if any(records.column(c).to_pylist() != baseline_records.column(c).to_pylist() for c in columns):
        return {"available": False, "mode": mode,
                "reason": "the two targets were measured on different member and non-member images"}
    wanted = MODE_CANDIDATES[mode]
    defended, baseline = (feature_matrix(t.filter(pc.equal(t.column("generator"), wanted)).column("features"))
                          for t in (candidates, baseline_candidates))
    if not len(defended) or not len(baseline):
        missing = "the defended target" if not len(defended) else "the baseline"
        return {"available": False, "mode": mode, "reason": f"no {mode} candidates committed for {missing}"}
    features, patients, member = committed_records(records)
    if defended.shape[1] != features.shape[1] or baseline.shape[1] != features.shape[1]:
        return {"available": False, "mode": mode, "reason": "the candidates were embedded in different spaces"}
    count = len(member)
    # leak_test measures AUC(first) - AUC(second): the baseline first, so its L is the drop; negated for the change.
    drop = leak_test(member, generator_scores(features, patients, count, baseline),
                     generator_scores(features, patients, count, defended), bootstrap, permutations, seed)
    low, high = drop["ci"] if drop["ci"] is not None else (None, None)
    return {"available": True, "mode": mode, "change": -drop["leak"],
            "ci": None if low is None else [-high, -low], "p_value": drop["p_value"],
            # As for a detected leak (attack_ranking): the interval and the permutation test both.
            "lowered": bool(low is not None and low > 0 and (drop["p_value"] or 1.0) <= 0.05),
            "members": drop["members"], "nonmembers": drop["nonmembers"], "candidates": {"defended": len(defended), "baseline": len(baseline)},
            "auc_defended": drop["auc_null"], "auc_baseline": drop["auc_attacked"], "bootstrap": bootstrap,
            "permutations": permutations}


def _canonical(terms: dict) -> dict:
    # JSON records keep keys sorted; show terms in the objective's own order.
    order = list(CNN_ALLOWED_TERMS) + [t for t in VIT_TERMS if t not in CNN_ALLOWED_TERMS]
    return dict(sorted(terms.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)))


def attack_terms_text(attack: dict | None) -> str:
    """The objective terms the attack used, with the fallback's reason when bn_stats could not be used."""
    if not attack or not attack.get("terms"):
        return "n/a"
    used = ", ".join(f"{t} {w:g}" for t, w in _canonical(attack["terms"]).items())
    fallback = attack.get("fallback")
    if fallback:
        added = f", replaced by {', '.join(fallback['added'])}" if fallback.get("added") else ""
        used += f" (fallback: {', '.join(fallback['dropped'])} dropped{added}: {fallback.get('reason')})"
    target = f"; feature_stats target: {attack['feature_target']}" if attack.get("feature_target") else ""
    return f"{used}; {reference_text(attack.get('reference'))}{target}"


def reference_text(reference: dict | None) -> str:
    """Where the statistics the attack pulls toward came from (finetune.json's `reference`)."""
    if not reference:
        return "statistics compared with: the target's own BatchNorm running statistics"
    count = reference.get("images", reference.get("num_images"))
    if reference.get("source") == "prior":
        return (f"reference statistics from {count} samples of the un-fine-tuned prior (its own statistics: the terms "
                "start at their minimum)")
    return f"reference statistics from {count} public-pool images"


def mitigation_summary(targets: dict[str, dict]) -> dict:
    """Utility and attack outcome per target, side by side; `shown` when the targets differ in preset."""
    rows = []
    for name, entry in targets.items():
        metrics, risk = entry["metrics"], entry["risk"]
        trained = metrics.get("target_training") or {}
        ranking = _get(risk, "leak", "attacks") or []
        strongest = ranking[0] if ranking else {"mode": "study", "vs_prior": _get(risk, "leak", "vs_prior")}
        privacy = trained.get("privacy") or {}
        rows.append({
            "target": name, "preset": _preset_label(metrics), "role": metrics.get("role"),
            "epsilon": privacy.get("epsilon"), "target_epsilon": privacy.get("target_epsilon"),
            "delta": privacy.get("delta"), "norm": trained.get("norm"),
            "val_auc": _get(trained, "val", "auc"), "val_accuracy": _get(trained, "val", "accuracy"),
            "val_auc_ci": _get(trained, "val", "auc_ci"), "val_accuracy_ci": _get(trained, "val", "accuracy_ci"),
            "train_accuracy": _get(trained, "train", "accuracy"),
            "likely_samples": risk["likely_samples"], "candidates": risk["candidates"],
            "ssim_mean": risk["ssim_mean"], "sex_accuracy": risk["sex_accuracy"], "age_mae": risk["age_mae"],
            "reidentification_rate": risk["reidentification_rate"], "reidentification_ci": risk["reidentification_ci"],
            # The strongest attack run on the target: a defence is judged by what the best attack still recovers.
            "leak": _get(strongest, "vs_prior", "leak"), "leak_ci": _get(strongest, "vs_prior", "ci"),
            "attack": strongest.get("mode", "study"),
            "leak_vs_control": _get(risk, "leak", "vs_control", "leak"),
            "leak_vs_control_ci": _get(risk, "leak", "vs_control", "ci"),
            "verdict": _get(risk, "leak", "verdict"),
            "defence": risk.get("defence"),
            "attack_terms": list(_canonical(_get(metrics, "attack_terms", "terms") or {})),
            "fallback": _get(metrics, "attack_terms", "fallback") is not None,
        })
    presets = {r["preset"] for r in rows}
    return {"shown": len(presets) > 1 or any(r["epsilon"] is not None for r in rows), "rows": rows}


def _preset_label(metrics: dict) -> str:
    """The training recipe's name: the preset, with the defence of a defended identity control."""
    defence = _get(metrics, "target_training", "identity_defence")
    preset = metrics.get("preset") or "checkpoint"
    return f"{preset} ({defence})" if defence not in (None, "none") else preset


def mitigation_rows(document: dict) -> tuple[list[str], list[list[str]]]:
    header = ["Target", "Preset", "ε (δ)", "Val AUC", "Val acc.", "Train acc.", "Leak L vs prior (strongest attack)",
              "Change of L vs baseline (paired)", "L vs control", "Likely samples", "NN SSIM", "Sex accuracy",
              "Age MAE", "Re-id rate (sample vote)", "Attack terms"]
    rows = []
    paired = any(r.get("defence") for r in document["mitigation"]["rows"])
    if not paired:  # no target names a baseline: no column of dashes
        header.remove("Change of L vs baseline (paired)")
    for r in document["mitigation"]["rows"]:
        epsilon = f"{number(r['epsilon'], 2)} ({significant(r['delta'], 2)})" if r["epsilon"] is not None else "—"
        role = " (control)" if r["role"] == "control model" else ""
        rows.append([r["target"], r["preset"] + role, epsilon,
                     number(r["val_auc"], 3) + interval(r.get("val_auc_ci"), digits=3),
                     number(r["val_accuracy"], 3) + interval(r.get("val_accuracy_ci"), digits=3),
                     number(r["train_accuracy"], 3),
                     signed(r["leak"]) + signed_interval(r["leak_ci"]) + (f" ({r['attack']})" if r.get("attack") else ""),
                     *([defence_cell(r.get("defence"))] if paired else []),
                     signed(r["leak_vs_control"]) + signed_interval(r["leak_vs_control_ci"]),
                     f"{r['likely_samples']} of {r['candidates']}",
                     number(r["ssim_mean"], 3), percent(r["sex_accuracy"]), number(r["age_mae"], 1),
                     percent(r["reidentification_rate"]) + interval(r["reidentification_ci"], as_percent=True),
                     ", ".join(r["attack_terms"]) + (" (fallback)" if r["fallback"] else "")])
    return header, rows


def defence_cell(change: dict | None) -> str:
    """A defended target's change of L against its baseline: value, interval, p, the attack and the baseline."""
    if not change:
        return "—"
    if not change.get("available"):
        return f"n/a vs {change['baseline']}: {change.get('reason')}"
    return (f"{signed(change['change'])}{signed_interval(change['ci'])}, p {p_value(change['p_value'])} "
            f"({change['mode']} vs {change['baseline']})")


def defence_sentences(document: dict) -> list[str]:
    """One sentence per defended target: did the defence lower the strongest attack's L, at what utility."""
    sentences = []
    rows = {r["target"]: r for r in document["mitigation"]["rows"]}
    for r in rows.values():
        change = r.get("defence")
        if not change:
            continue
        base = rows.get(change["baseline"], {})
        if not change.get("available"):
            sentences.append(f"{r['target']}: its change against {change['baseline']} could not be measured "
                             f"({change.get('reason')}).")
            continue
        utility = (f" Validation accuracy {number(r['val_accuracy'], 3)}{interval(r.get('val_accuracy_ci'), digits=3)} "
                   f"against {number(base.get('val_accuracy'), 3)}{interval(base.get('val_accuracy_ci'), digits=3)}."
                   if base else "")
        what = f"falls by {abs(change['change']):.3f}" if change["lowered"] else \
            f"changes by {signed(change['change'])}"
        sentences.append(f"{r['target']}, {r['preset']}: the {change['mode']} attack's L {what} against "
                         f"{change['baseline']}{signed_interval(change['ci'])}, p {p_value(change['p_value'])} (paired "
                         f"on {change['members']} members and {change['nonmembers']} non-members)"
                         + ("." if change["lowered"] else ": within chance.") + utility)
    return sentences


def _label_groups(rows: list[dict], risk: str) -> list[tuple[float, float, list[str]]]:
    """(x, y, names) per group of points closer than 1% of the axes' spans (their labels would overlap)."""
    xs, ys = [r["val_auc"] for r in rows], [r[risk] for r in rows]
    span_x, span_y = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    groups: list[tuple[float, float, list[str]]] = []
    for r in rows:
        name = r["target"] + (f" (ε={r['epsilon']:.2g})" if r["epsilon"] is not None else "")
        for x, y, names in groups:
            if abs(r["val_auc"] - x) <= 0.01 * span_x and abs(r[risk] - y) <= 0.01 * span_y:
                names.append(name)
                break
        else:
            groups.append((r["val_auc"], r[risk], [name]))
    return groups


def mitigation_png(document: dict) -> bytes | None:
    """Risk (the leak L against the prior, else the sample-vote rate) against utility (validation AUC), each with its
    95% interval (the utility's: a bootstrap of the validation patients, where training.json has one)."""
    rows = document["mitigation"]["rows"]
    record = any(r["leak"] is not None for r in rows)
    risk, risk_ci = ("leak", "leak_ci") if record else ("reidentification_rate", "reidentification_ci")
    rows = [r for r in rows if r["val_auc"] is not None and r[risk] is not None]
    if not rows:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pyplot only after the Agg backend is chosen

    figure, axes = plt.subplots(figsize=(6.5, 4.5))
    rows = sorted(rows, key=lambda r: (r["val_auc"], r[risk]))
    for r in rows:
        low, high = r[risk_ci] or (r[risk],) * 2
        left, right = r.get("val_auc_ci") or (r["val_auc"],) * 2
        control = r["role"] == "control model"
        axes.errorbar(r["val_auc"], r[risk],
                      # Interval bounds can miss the value by a rounding error at 0 or 1; matplotlib refuses < 0.
                      yerr=[[max(0.0, r[risk] - low)], [max(0.0, high - r[risk])]],
                      xerr=[[max(0.0, r["val_auc"] - left)], [max(0.0, right - r["val_auc"])]],
                      fmt="s" if control else "o", color="grey" if control else "C3" if r["epsilon"] is not None
                      else "C0", capsize=3)
    groups = _label_groups(rows, risk)
    right = max(x for x, _, _ in groups) - 0.15 * ((max(x for x, _, _ in groups) - min(x for x, _, _ in groups)) or 1)
    for i, (x, y, names) in enumerate(groups):
        # Points that coincide share one label (a line each); neighbours along the utility axis take turns above and
        # below; labels of points at the right edge extend to the left, inside the axes.
        at_right, rise = x >= right and len(groups) > 1, (6, -12, 18, -24)[i % 4]
        axes.annotate("\n".join(names), (x, y), textcoords="offset points", fontsize=8,
                      xytext=(-6 if at_right else 5, rise), ha="right" if at_right else "left",
                      va="bottom" if rise > 0 else "top")
    axes.axhline(0.0 if record else 0.5, color="grey", linestyle=":", linewidth=1)
    axes.set(xlabel="utility: validation AUC (95% CI)",
             ylabel="risk: " + ("leak L vs prior, strongest attack (none: 0)" if record else "re-identification rate (chance 0.5)"),
             title="Mitigations: risk vs utility")
    figure.tight_layout()
    png = figure_png(figure, dpi=110)
    plt.close(figure)
    return png


# ------------------------------------------------------------------------------------------------ formatting


def number(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def signed(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:+.{digits}f}"


def signed_interval(values: Any, digits: int = 3) -> str:
    if not values or any(v is None for v in values):
        return ""
    return f" [{values[0]:+.{digits}f}, {values[1]:+.{digits}f}]"


def significant(value: Any, digits: int = 4) -> str:
    """4 significant digits: FIDs range from ~1e-13 (untrained features) to hundreds."""
    return "n/a" if value is None else f"{value:.{digits}g}"


def p_value(value: Any) -> str:
    return "n/a" if value is None else "< 0.001" if value < 0.001 else f"{value:.3f}"


def percent(value: Any) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def interval(values: Any, as_percent: bool = False, digits: int = 2) -> str:
    if not values or any(v is None for v in values):
        return ""
    low, high = values
    return f" [{percent(low)}, {percent(high)}]" if as_percent else f" [{number(low, digits)}, {number(high, digits)}]"


def inception_text(inception: dict | None) -> str:
    if not inception:
        return "FID not computed (evaluation.fid: false)."
    if not inception.get("trained"):
        return (f"FID features from UNTRAINED (seeded random) Inception-v3 weights at {inception.get('image_size')} "
                "px: a relative measure between these sets only, not comparable with published FIDs.")
    return f"FID features from Inception-v3 weights {inception.get('weights')} at {inception.get('image_size')} px."


def leak_cell(result: dict | None) -> str:
    """L [interval], p."""
    if not result:
        return "n/a"
    return f"{signed(result['leak'])}{signed_interval(result.get('ci'))}, p {p_value(result.get('p_value'))}"


def risk_rows(document: dict) -> list[dict[str, str]]:
    """One row of display strings per target: the headline risk only (the rest is in the per-target sections)."""
    rows = []
    several_modes = any(len(entry["risk"]["leak"].get("attacks") or []) > 1 for entry in document["targets"].values())
    for name, entry in document["targets"].items():
        metrics, leak = entry["metrics"], entry["risk"]["leak"]
        calibration = leak.get("calibration") or {}
        rows.append({
            "Target": name,
            "Model": f"{metrics.get('arch')} ({metrics.get('preset') or 'checkpoint'}, {metrics.get('train_pool')} "
                     "pool)",
            "Leak L vs prior [95% CI], p": leak_cell(leak.get("vs_prior")),
            "L vs control model": (leak_cell(leak.get("vs_control")) + f" ({leak['control']})"
                                   if leak.get("vs_control") else "control model"
                                   if metrics.get("train_pool") == "control" else "n/a"),
            "Smallest detectable leak": percent(calibration.get("minimum_detectable_effect"))
            if calibration.get("available") and calibration.get("minimum_detectable_effect") is not None
            else "not reached" if calibration.get("available") else "n/a",
            **({"Attacks ranked (L vs prior)": "; ".join(
                f"{a['mode']} {signed(a['vs_prior']['leak'])}{signed_interval(a['vs_prior'].get('ci'))}"
                for a in leak.get("attacks") or [])} if several_modes else {}),
            "Verdict": leak["verdict"],
        })
    return rows


CONTROL_SETS = (("likely", "likely samples"), ("raw", "raw candidates"), ("prior_raw", "prior (no attack)"),
                ("ppa", "ppa (latents optimised per sample)"))


def control_rows(document: dict) -> tuple[list[str], list[list[str]]]:
    """Identity-class controls (P1): per target and sample set, top-1 with its interval against the permutation
    null and uniform chance, top-5, distinct patients hit, the permutation p-value."""
    header = ["Control", "Samples", "n", "Top-1 [95% CI]", "Null top-1 / uniform", "Top-5", "Distinct patients",
              "Permutation p"]
    rows, priors = [], set()
    for name, control in (document.get("controls") or {}).items():
        for key, label in CONTROL_SETS:
            result = control.get(key)
            if not result:
                continue
            if key == "prior_raw":  # one prior: its row repeats for every control scored against the same patients
                seen = (tuple(control.get("scored_against") or ()), result.get("top1"), result.get("p_value"))
                if seen in priors:
                    continue
                priors.add(seen)
            rows.append([f"{name} ({control.get('role')}; {control.get('attack')})", label, str(result.get("samples")),
                         percent(result.get("top1")) + interval(result.get("ci"), as_percent=True),
                         f"{percent(result.get('null_top1'))} / {percent(result.get('chance_top1'))}",
                         percent(result.get("top5")),
                         f"{result.get('distinct')} of {result.get('gallery_patients')}",
                         p_value(result.get("p_value"))])
    return header, rows


def canary_rows(document: dict) -> tuple[list[str], list[list[str]]]:
    """Canaries (P2): per target, sample set and duplication level, the AUC of included vs excluded canaries with its
    interval, the counts and the permutation p-value."""
    header = ["Target", "Samples", "Training studies per canary", "Included / excluded", "AUC [95% CI]",
              "Median distance: included / excluded", "Permutation p"]
    rows = []
    for name, canaries in (document.get("canaries") or {}).items():
        flipped = " (labels flipped)" if canaries.get("flip_label") else ""
        for key, label in CONTROL_SETS:
            for dose, result in sorted((canaries.get(key) or {}).items(), key=lambda item: int(item[0])):
                rows.append([name + flipped, label, dose, f"{result.get('included')} / {result.get('excluded')}",
                             number(result.get("auc"), 2) + interval(result.get("ci")),
                             f"{number(result.get('included_median'), 3)} / {number(result.get('excluded_median'), 3)}",
                             p_value(result.get("p_value"))])
    return header, rows


def canary_sentence(name: str, canaries: dict) -> str:
    """What one canary target shows: the duplication levels at which the attack's candidates came closer to the
    canaries the target trained on, at p <= 0.01 Bonferroni-corrected over every (level, sample set) tested."""
    tested = [(key, dose, result) for key in ("raw", "likely", "ppa") for dose, result in (canaries.get(key) or {}).items()
              if result.get("p_value") is not None]
    if not tested:
        return f"{name}: no duplication level had canaries on both sides of the coin."
    bar = 0.01 / len(tested)
    labels = {"raw": "raw candidates", "likely": "likely samples", "ppa": "ppa samples"}
    found = [f"{dose} ({labels[key]}, AUC {number(result.get('auc'), 2)}, "
             f"p {p_value(result['p_value'])})" for key, dose, result in tested if result["p_value"] <= bar]
    levels = ", ".join(sorted({dose for _, dose, _ in tested}, key=int))
    if found:
        return (f"{name}: the attack came closer to the canaries the target trained on than to the excluded ones at "
                f"{', '.join(found)} training studies per canary (p <= {bar:.2g}, 0.01 over {len(tested)} tests): "
                "this target gives away individual canaries; read it beside the other levels and the prior's row, "
                "which must stay at chance.")
    return (f"{name}: at no duplication level ({levels} studies per canary) did the attack come measurably closer to "
            f"included canaries than to excluded ones (p > {bar:.2g}, 0.01 over {len(tested)} tests): with this many "
            "canaries only a large effect could have shown; the AUC intervals give the size ruled out.")


def population_rows(document: dict) -> tuple[list[str], list[list[str]]]:
    """P4, cohort skew: the shift of the attacked generator's predicted age and male share from the prior's, beside
    what the target trained on and its pool."""
    header = ["Target", "Trained on", "Age shift [95% CI]", "Male share shift [95% CI]", "Members: age, male share",
              "Pool: age, male share"]
    rows = []
    for name, shift in (document.get("population_shift") or {}).items():
        members, pool = shift.get("truth_members") or {}, shift.get("truth_pool") or {}
        rows.append([name, str(shift.get("cohort")),
                     f"{signed(_get(shift, 'age', 'shift'), 1)} y{signed_interval(_get(shift, 'age', 'ci'), 1)}",
                     f"{signed(_get(shift, 'male_share', 'shift'), 3)}"
                     f"{signed_interval(_get(shift, 'male_share', 'ci'), 3)}",
                     f"{number(members.get('age'), 1)} y, {percent(members.get('male_share'))}",
                     f"{number(pool.get('age'), 1)} y, {percent(pool.get('male_share'))}"])
    return header, rows


def dose_rows(document: dict) -> tuple[list[str], list[list[str]]]:
    """P3, dose-response: L against the prior for targets of one recipe trained on fewer or more images per class
    (overfit targets by images per class; a normal target of the same architecture as 'all')."""
    header = ["Target", "Images per class", "Training images", "Leak L vs prior [95% CI], p", "Verdict"]
    entries = []
    for name, entry in document["targets"].items():
        metrics = entry["metrics"]
        training = metrics.get("target_training") or {}
        if metrics.get("train_pool") != "private" or metrics.get("preset") not in ("overfit", "normal"):
            continue
        if training.get("cohort") or training.get("canaries"):  # another training set, not another size of it
            continue
        per_class = _get(training, "recipe", "images_per_class") if metrics.get("preset") == "overfit" else None
        entries.append((str(metrics.get("arch")), per_class if per_class is not None else float("inf"), name,
                        training, entry))
    # A dose-response needs one architecture at two or more sizes; a lone overfit target beside others is not one.
    doses = {arch: {e[1] for e in entries if e[0] == arch and e[1] != float("inf")} for arch, *_ in entries}
    rows = [[name, "all" if per_class == float("inf") else str(per_class), str(training.get("train_images")),
             leak_cell(_get(entry, "risk", "leak", "vs_prior")), str(_get(entry, "risk", "leak", "verdict"))]
            for arch, per_class, name, training, entry in sorted(entries, key=lambda e: (e[0], e[1], e[2]))
            if len(doses[arch]) >= 2]
    return header, rows


def control_sentence(name: str, control: dict) -> str:
    """What one identity control means for the study's targets (and, when run, for the ppa attack)."""
    return _study_control_sentence(name, control) + _ppa_control_sentence(control)


def _study_control_sentence(name: str, control: dict) -> str:
    likely = control.get("likely") or {}
    raw = control.get("raw") or {}
    # The stronger of the two sample sets speaks for the attack (the report's table shows both).
    best = min((r for r in (likely, raw) if r.get("p_value") is not None), key=lambda r: r["p_value"], default=None)
    if best is None:
        return f"{name}: no samples to score."
    # Two sets tested: the positive must pass at 0.01 / 2 (Bonferroni); the negative fails at 0.01 on either.
    found = best["p_value"] <= (0.01 if control.get("role") == "negative" else 0.005)
    numbers = (f"top-1 {percent(best.get('top1'))} against a null of {percent(best.get('null_top1'))}, "
               f"{best.get('distinct')} of {best.get('gallery_patients')} patients hit, p {p_value(best['p_value'])}")
    agrees = control.get("target_agrees")
    agreement = (f"; the target itself sees the requested class in {percent(agrees)} of the likely samples"
                 if agrees is not None else "")
    name = f"{name}, {control.get('attack')}"
    if control.get("role") == "negative":
        return (f"{name} (negative): {numbers}{agreement}. " + (
            "Within chance, as it must be: the measure does not invent identities." if not found else
            "ABOVE chance although this model never saw these patients: the measure is biased (e.g. by sex or "
            "pose), and the positive control cannot be read."))
    return (f"{name} (positive): {numbers}{agreement}. " + (
        "The attack reproduced the requested patients: where a model encodes identity, this attack can extract it, "
        "so a null on the study's targets is informative." if found else
        "The attack did NOT reproduce the requested patients although the model encodes them: a null on the "
        "study's targets is therefore weak evidence of safety, bounded by this attack's reach."))


def _ppa_control_sentence(control: dict) -> str:
    result = control.get("ppa") or {}
    if result.get("p_value") is None:
        return ""
    found = result["p_value"] <= 0.01
    numbers = (f"top-1 {percent(result.get('top1'))} against a null of {percent(result.get('null_top1'))}, "
               f"{result.get('distinct')} of {result.get('gallery_patients')} patients hit, "
               f"p {p_value(result['p_value'])}")
    if control.get("role") == "negative":
        return f" The ppa attack (latents optimised per sample): {numbers}: " + (
            "within chance, as it must be." if not found else "ABOVE chance on a model that never saw these patients.")
    return f" The ppa attack (latents optimised per sample): {numbers}: " + (
        "it reproduced the requested patients." if found else "it did not reproduce the requested patients.")


def stage1_rows(document: dict) -> tuple[list[str], list[list[str]]]:
    """The study's Figure 4: per target 'prior -> fine-tuned' and 'reference' columns."""
    header = ["Metric"]
    for name in document["targets"]:
        header += [f"{name}: prior → fine-tuned", f"{name}: reference"]

    def pair(entry: dict, metric: str) -> list[str]:
        sets = _get(entry, "metrics", "stage1", "sets") or {}

        def value(name: str) -> str:
            block = _get(sets, name, metric)
            if not block:
                return "n/a"
            spread = f" ± {number(block.get('se'), 3)}" if block.get("se") is not None else ""
            return number(block.get("mean"), 3) + spread

        return [f"{value('prior')} → {value('finetuned')}", value("reference")]

    def fid_cell(entry: dict, a: str, b: str) -> str:
        for row in _get(entry, "metrics", "stage1", "fid") or []:
            if {row["a"], row["b"]} == {a, b}:
                return significant(row["value"]) + (" *" if row.get("underdetermined") else "")
        return "n/a"

    rows = [["Pixel entropy (bits)"], ["PCA kurtosis (mean excess)"], ["FID prior ↔ fine-tuned"],
            ["FID fine-tuned ↔ reference"], ["FID prior ↔ reference"]]
    for entry in document["targets"].values():
        rows[0] += pair(entry, "entropy")
        rows[1] += pair(entry, "kurtosis")
        rows[2] += [fid_cell(entry, "prior", "finetuned"), ""]
        rows[3] += ["", fid_cell(entry, "finetuned", "reference")]
        rows[4] += ["", fid_cell(entry, "prior", "reference")]
    return header, rows


def demographic_rows(samples: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["id", "PredAge_Recon", "PredAge_NN", "Age_GT", "AbsErr_Recon", "AbsErr_NN", "PredSex_Recon",
              "PredSex_NN", "Sex_GT", "Correct_Recon", "Correct_NN"]
    rows = [[str(s["id"]), number(s.get("recon_pred_age"), 1), number(s.get("nn_pred_age"), 1),
             number(s.get("true_age"), 0), number(s.get("recon_age_abs_error"), 1),
             number(s.get("nn_age_abs_error"), 1),
             s.get("recon_pred_sex") or "n/a", s.get("nn_pred_sex") or "n/a", s.get("true_sex") or "n/a",
             number(s.get("recon_sex_correct")), number(s.get("nn_sex_correct"))] for s in samples]
    return header, rows


def reid_rows(samples: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["id", "Nearest training patient", "Distance", "Nearest held-out patient", "Distance",
              "Training closer", "Re-identified", "Patient has pacemaker", "Pacemaker detected", "Device reproduced"]
    rows = [[str(s["id"]), s.get("reid_train_patient") or "n/a", number(s.get("reid_train_distance"), 3),
             s.get("reid_heldout_patient") or "n/a", number(s.get("reid_heldout_distance"), 3),
             number(s.get("member_closer")), number(s.get("reidentified")), number(s.get("truth_pacemaker")),
             number(s.get("recon_pacemaker_detected")), number(s.get("device_reproduced"))] for s in samples]
    return header, rows


def interpretation(name: str, entry: dict) -> str:
    """One cautious plain-language sentence per target for the top of the report."""
    risk, metrics = entry["risk"], entry["metrics"]
    leak = risk["leak"]
    parts = [leak["verdict"]]
    if leak.get("available"):
        raw = leak["vs_prior"]
        parts.append(f"membership AUC {number(raw['auc_attacked'], 3)} for the attacked generator, "
                     f"{number(raw['auc_null'], 3)} for the prior, on {raw['members']} member and {raw['nonmembers']} "
                     f"non-member patients (p {p_value(raw.get('p_value'))})")
        if leak.get("vs_control"):
            other = leak["vs_control"]
            parts.append(f"against control model {leak['control']}: L = {signed(other['leak'])}"
                         f"{signed_interval(other.get('ci'))} ({'excludes' if other['ci'][0] > 0 or other['ci'][1] < 0 else 'includes'} 0)")
    parts.append(f"{risk['likely_samples']} likely sample(s) of {risk['candidates']} candidates")
    rate = risk["reidentification_rate"]
    if rate is not None:
        low, high = risk["reidentification_ci"]
        verdict = ("above chance" if low > 0.5 else "below chance" if high < 0.5 else "not distinguishable from chance")
        parts.append(f"{percent(rate)} nearer a training image than a held-out one (chance 50%; 95% CI "
                     f"{percent(low)}-{percent(high)}: {verdict}); the re-identified ones point at "
                     f"{risk['distinct_patients']} distinct training patient(s)")
    if risk["sex_accuracy"] is not None:
        parts.append(f"sex read correctly from {percent(risk['sex_accuracy'])} of reconstructions, age within "
                     f"{number(risk['age_mae'], 1)} years on average")
    if risk["devices_reproduced"] is not None:
        parts.append(f"{risk['devices_reproduced']} reconstruction(s) show the matched patient's pacemaker")
    if metrics.get("train_pool") == "control":
        parts.append("control model: its attacked generator is the second null of the targets trained on other "
                     "patients")
    return f"{name}: " + "; ".join(parts) + "."


# ------------------------------------------------------------------------------------------------ HTML


CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;color:#222;
line-height:1.45;padding:0 1em}
h1{font-size:1.6em;border-bottom:2px solid #333;padding-bottom:.2em}
h2{font-size:1.3em;margin-top:2em;border-bottom:1px solid #aaa}
h3{font-size:1.1em;margin-top:1.5em}
table{border-collapse:collapse;margin:.6em 0;font-size:.88em}
th,td{border:1px solid #bbb;padding:.25em .5em;text-align:left;vertical-align:middle}
th{background:#eef1f5}
tr:nth-child(even) td{background:#fafafa}
.box{border:1px solid #c9a227;background:#fff8e1;padding:.6em 1em;margin:1em 0}
.note{color:#555;font-size:.9em}
img.pair{image-rendering:pixelated;height:96px}
img.strip{image-rendering:pixelated;width:66%;min-width:420px;border:1px solid #ddd}
img.figure{max-width:100%;border:1px solid #ddd;margin:.4em 0}
.figures{display:flex;flex-wrap:wrap;gap:.4em}
.figures img.figure{width:32%;min-width:280px}
pre{background:#f6f6f6;border:1px solid #ddd;padding:.8em;overflow-x:auto;font-size:.8em}
"""


def _table_html(header: list[str], rows: list[list[str]], raw_columns: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell if i in raw_columns else html.escape(str(cell))}</td>"
                                    for i, cell in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _image_html(png: bytes | None, alt: str, css_class: str = "figure") -> str:
    if not png:
        return f"<p class='note'>({html.escape(alt)}: not available)</p>"
    data = base64.b64encode(png).decode("ascii")
    return f"<img class='{css_class}' alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"


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


def instrument_rows(document: dict) -> tuple[list[str], list[list[str]]]:
    embedding = (document.get("instrument") or {}).get("embedding") or {}
    header = ["Patients", "Images", "Verification AUC", "Rank-1"]
    names = {"public_heldout": "held-out public patients", "private": "private patients (2+ studies; validation only)"}
    # Four digits: 0.9997 is not 1.000.
    rows = [[names.get(pool, pool), str(result.get("patients")), str(result.get("images")),
             number(result.get("auc"), 4), number(result.get("rank1"), 3)]
            for pool, result in embedding.items() if isinstance(result, dict)]
    return ["Set", *header], rows


def prior_rows(document: dict) -> tuple[list[str], list[list[str]]]:
    """How well the attack's prior draws chest X-rays (calibrate's prior-quality)."""
    quality = document.get("prior_quality")
    if not quality:
        return [], []
    frechet, classifier = quality.get("frechet") or {}, quality.get("classifier") or {}
    header = ["Images per set", "Fréchet distance in the embedding", "Real-vs-real floor", "Ratio",
              "Two-sample classifier accuracy [95% CI]"]
    ratio = frechet.get("ratio")
    return header, [[str(quality.get("images")), number(frechet.get("distance"), 4), number(frechet.get("floor"), 4),
                     f"{ratio:.1f}x" if ratio is not None else "n/a",
                     number(classifier.get("accuracy"), 3) + interval(classifier.get("ci"), digits=3)]]


def calibration_rows(document: dict) -> tuple[list[str], list[list[str]]]:
    """Per target: the false-positive rate at f = 0, the detected share per spike fraction, the smallest detectable;
    a second row at a ppa attack's pool size where the target was attacked with ppa."""
    measured = []  # (row label, calibration, the target's leak entry)
    for name, entry in document["targets"].items():
        leak = entry["risk"]["leak"]
        calibration = leak.get("calibration") or {}
        measured.append((name, calibration, leak))
        if calibration.get("ppa"):
            measured.append((f"{name} · ppa ({calibration['ppa']['candidates']} samples)", calibration["ppa"], leak))
    fractions = sorted({row["fraction"] for _, calibration, _ in measured
                        for row in (calibration.get("fractions") or [])})
    header = ["Target", "Members / non-members", "False positives at 0%"] + \
        [f"Detected at {100 * f:g}%" for f in fractions if f > 0] + ["Smallest detectable leak"]
    rows = []
    for label, calibration, leak in measured:
        if not calibration.get("available", True):
            rows.append([label, "n/a", calibration.get("reason") or leak.get("reason") or "not calibrated"]
                        + [""] * (len(header) - 3))
            continue
        if not calibration.get("fractions"):
            rows.append([label, "n/a", leak.get("reason") or "not calibrated"] + [""] * (len(header) - 3))
            continue
        by_fraction = {row["fraction"]: row for row in calibration["fractions"]}
        null = by_fraction.get(0.0, {})
        cells = [f"{by_fraction[f]['detected']} of {by_fraction[f]['repeats']} (L {signed(by_fraction[f]['leak_mean'])})"
                 if f in by_fraction else "" for f in fractions if f > 0]
        smallest = calibration.get("minimum_detectable_effect")
        rows.append([label, f"{leak.get('member_patients')} / {leak.get('nonmember_patients')}",
                     f"{null.get('detected')} of {null.get('repeats')}", *cells,
                     percent(smallest) if smallest is not None else
                     f"not reached by {percent(calibration.get('largest_fraction'))}"])
    return header, rows


def render_html(document: dict, figures: dict[str, dict[str, bytes]], pairs: dict[str, dict[int, bytes]]) -> str:
    """The HTML report: one renderer per section, in reading order."""
    out = _html_header(document)
    out += _html_instrument(document, figures)
    out += _html_risk_summary(document)
    if has_controls(document):
        out += _html_controls(document)
    if document["mitigation"]["shown"]:
        out += _html_mitigations(document, figures)
    out += _html_comparison(document)
    for index, (name, entry) in enumerate(document["targets"].items(), start=1):
        out += _html_target(index, name, entry, figures[name], pairs[name])
    out += _html_meanings(document)
    out += _html_reproducibility(document)
    out.append("</body></html>")
    return "\n".join(out)


def _html_header(document: dict) -> list[str]:
    """Title, provenance, threat model."""
    esc = html.escape
    out = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
           f"<title>Re-identification risk report: {esc(document['run_id'])}</title><style>{CSS}</style></head><body>"]
    out.append(f"<h1>Re-identification risk report: run {esc(document['run_id'])}</h1>")
    out.append(f"<p class='note'>Generated {esc(document['generated'])} by reid-batch "
               f"{esc(str(document['software']['report'].get('reid-batch')))}. Targets: "
               f"{esc(', '.join(document['targets']))}.</p>")
    out.append(f"<div class='box'><b>Threat model.</b> {esc(document['threat_model'] or '')}<br><b>Validation.</b> "
               f"{esc(document['validation_note'] or '')}<br><b>Sensitive content.</b> This report shows reconstructed "
               "and real patient images; keep it where the run's output is kept.</div>")
    return out


def _html_instrument(document: dict, figures: dict[str, dict[str, bytes]] | None = None) -> list[str]:
    """0. The instrument: how well the re-identification embedding tells patients apart."""
    esc = html.escape
    instrument = document.get("instrument") or {}
    embedding = instrument.get("embedding")
    out = ["<h2>0. Instrument</h2>"]
    if not embedding:
        out.append(f"<p class='note'>{esc(instrument.get('note') or 'not available')}. {esc(measured_in(document))}</p>")
        if document.get("targets"):
            out += _html_calibration(document, figures or {})
        return out
    out.append(f"<p>Re-identification embedding {esc(str(embedding.get('arch')))} at {embedding.get('image_size')} px, "
               f"trained on {embedding.get('train_patients')} public patients only.</p>")
    header, rows = instrument_rows(document)
    out.append(_table_html(header, rows))
    out.append(f"<p class='note'>{esc(instrument.get('note') or '')}. {esc(measured_in(document))}</p>")
    out += _html_prior(document, figures or {})
    if document.get("targets"):
        out += _html_calibration(document, figures or {})
    return out


def _html_prior(document: dict, figures: dict[str, dict[str, bytes]]) -> list[str]:
    """The attack's reach: how well its prior draws chest X-rays, with a strip of samples over real images."""
    header, rows = prior_rows(document)
    if not rows:
        return []
    return ["<h3>The generator prior: what the attack can draw</h3>", _table_html(header, rows),
            _image_html(figures.get("_report", {}).get("prior_strip"), "prior samples (top) over public images", "strip"),
            "<p class='note'>Top row: the prior's samples; bottom row: public images. The Fréchet distance compares "
            "Gaussians fitted to both sets in the re-identification embedding; the floor is the distance between "
            "two disjoint real sets. A small CNN trained to tell samples from real images scores 0.5 when it "
            "cannot. The attack can only reconstruct what this prior can draw.</p>"]


def _html_calibration(document: dict, figures: dict[str, dict[str, bytes]]) -> list[str]:
    """Spike-in calibration per target: how large a leak the statistic sees, and how often it sees one that is not."""
    out = ["<h3>Calibration: the smallest leak this instrument sees</h3>",
           "<p class='note'>Prior candidates with a share of them replaced by new images of the target's member "
           "patients, against other prior candidates: detected = L's 95% interval above 0. The smallest detectable "
           "leak is the smallest share detected in most repeats; at 0% every detection is a false positive. A "
           "'· ppa' row repeats it at the ppa attack's pool size (as many candidates as it kept, larger shares), "
           "detected as attacks are ranked: the interval above 0 and permutation p <= 0.05.</p>"]
    header, rows = calibration_rows(document)
    out.append(_table_html(header, rows))
    plots = [_image_html(figures[name]["dose_response"], f"{name}: dose-response") for name in document["targets"]
             if figures.get(name, {}).get("dose_response")]
    if plots:
        out.append("<div class='figures'>" + "".join(plots) + "</div>")
    return out


def measured_in(document: dict) -> str:
    """Which space this report's distances were measured in (evaluation records it per target)."""
    spaces = sorted({str(_get(e, "metrics", "leak", "feature_space") or _get(e, "metrics", "stage2", "feature_space"))
                     for e in document.get("targets", {}).values()})
    return f"The distances behind the risk numbers below are measured in: {'; '.join(spaces)}." if spaces else ""


def _html_risk_summary(document: dict) -> list[str]:
    """1. The risk table and one interpretation per target."""
    esc = html.escape
    out = []
    out.append("<h2>1. Risk summary</h2>")
    rows = risk_rows(document)
    if rows:
        out.append(_table_html(list(rows[0]), [list(r.values()) for r in rows]))
    out.append("<ul>" + "".join(f"<li>{esc(interpretation(n, e))}</li>" for n, e in document["targets"].items())
               + "</ul>")
    out.append("<p class='note'>L = membership AUC of the attacked generator's raw candidates minus the null's, on the "
               "same member and non-member patients; 95% interval from a bootstrap over patients and candidates; p "
               "from a paired permutation test. The verdict reads L against the prior with the calibration above. "
               "Per target below: TPR at low FPR, the likely samples, demographics and the sample vote.</p>")
    if document.get("demographic_model"):
        model = document["demographic_model"]
        # train-demographics writes its validation under "val" (metrics.json); a checkpoint's record may be flat.
        validation = model.get("val") or model
        out.append(f"<p class='note'>The age/sex model's own validation (public pool): age MAE "
                   f"{esc(number(validation.get('age_mae'), 2))} years, sex accuracy "
                   f"{esc(number(validation.get('sex_accuracy'), 3))}.</p>")
    return out


def has_controls(document: dict) -> bool:
    return bool(document.get("controls") or document.get("canaries") or document.get("population_shift")
                or dose_rows(document)[1])


def _html_controls(document: dict) -> list[str]:
    """1a. Positive and negative controls: can this attack extract an identity where a model encodes one?"""
    esc = html.escape
    out = ["<h2>1a. Controls: targets known to leak</h2>"]
    if document.get("controls"):
        out += _html_identity_controls(document)
    out += _html_section("Canaries in the study's task", canary_rows(document),
                         "Atypical patients, each put in the training set by its own coin flip, with the number of "
                         "studies the table gives; the excluded ones are the in-model control. A canary's distance is "
                         "from a study of it that no model trained on to the closest candidate. AUC: P(an included "
                         "canary is closer than an excluded one), chance 0.5; p permutes the coins.")
    if document.get("canaries"):
        out.append("<ul>" + "".join(f"<li>{esc(canary_sentence(n, c))}</li>"
                                    for n, c in document["canaries"].items()) + "</ul>")
    out += _html_section("Dose-response: the leak against training-set size", dose_rows(document),
                         "The same recipe on fewer or more images per class; privacy risk is expected to fall as "
                         "examples per class grow. Each L has its own interval: read the trend against them.")
    out += _html_section("Cohort skew: population attributes of the reconstructions", population_rows(document),
                         "Predicted by the demographic model on the raw leak candidates of the attacked generator and "
                         "of the prior; a shift toward the members' age and male share that a whole-pool target does "
                         "not show is a population-level leak (the study's re-identification claim, with ground "
                         "truth).")
    return out


def _html_section(title: str, table: tuple[list[str], list[list[str]]], note: str) -> list[str]:
    """A titled table with its note, or nothing when the table has no rows."""
    header, rows = table
    return [f"<h3>{title}</h3>", _table_html(header, rows), f"<p class='note'>{note}</p>"] if rows else []


def _html_identity_controls(document: dict) -> list[str]:
    esc = html.escape
    out = ["<h3>Identity classes</h3>",
           "<p class='note'>Identity-class controls: a classifier whose classes are patients, attacked like the "
           "targets above. Each sample asks for the class its latent encodes; it hits when its nearest patient, "
           "in the re-identification embedding, among the scored patients and as many distractors (held-out studies "
           "only), is the requested one. The null permutes which class belongs to which patient within sex; "
           "uniform chance is 1 / patients in the gallery. The negative control's classes are other patients of "
           "the same sexes, scored against the positive's patients.</p>"]
    header, rows = control_rows(document)
    out.append(_table_html(header, rows))
    out.append("<ul>" + "".join(f"<li>{esc(control_sentence(n, c))}</li>"
                                for n, c in document["controls"].items()) + "</ul>")
    return out


def _html_mitigations(document: dict, figures: dict[str, dict[str, bytes]]) -> list[str]:
    """1b. Utility and risk side by side (mitigation manifests only)."""
    out = []
    out.append("<h2>1b. Mitigations: utility and risk side by side</h2>")
    header, rows = mitigation_rows(document)
    out.append(_table_html(header, rows))
    out.append("<p class='note'>Utility is the target's own validation split (patient-grouped; the identity "
               "control's is other studies of its patients), with 95% intervals; risk is the "
               "attack's outcome on that target. ε is the Opacus accountant's for the steps taken, at δ = 1/N. "
               "Targets marked fallback were attacked without BatchNorm statistics (GroupNorm model): their "
               "attack used the terms listed. Few likely samples give wide intervals."
               + (" The change of L is measured on the patients both targets share (the baseline's strongest attack, "
                  "the same mode on both): patient-level chance cancels, so it is tighter than the difference of the "
                  "two intervals." if any(r.get("defence") for r in document["mitigation"]["rows"]) else "")
               + "</p>")
    sentences = defence_sentences(document)
    if sentences:
        out.append("<ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in sentences) + "</ul>")
    out.append(_image_html(figures.get("_report", {}).get("mitigation"), "risk vs utility"))
    return out


def _html_comparison(document: dict) -> list[str]:
    """2. Stage 1 across targets."""
    esc = html.escape
    out = []
    out.append("<h2>2. Side-by-side comparison (stage 1, distribution level)</h2>")
    header, rows = stage1_rows(document)
    out.append(_table_html(header, rows))
    out.append("<p class='note'>Mean ± standard error (entropy: over images; kurtosis: bootstrap). * FID with fewer "
               "images than feature dimensions (biased upwards; compare only between equal-size sets). "
               + esc(" ".join(sorted({inception_text(_get(e, "metrics", "stage1", "inception"))
                                      for e in document["targets"].values()}))) + "</p>")
    return out


def _html_target(index: int, name: str, entry: dict, figures: dict[str, bytes], pairs: dict[int, bytes]) -> list[str]:
    """3.<index>: one target's stage 1, likely samples, demographics, re-identification and fine-tuning."""
    esc = html.escape
    metrics, samples = entry["metrics"], entry["samples"]
    ordered = sorted(samples, key=lambda s: (s.get("rank_combined") or 0, s["id"]))
    out = [f"<h2>3.{index} Target {esc(name)}</h2>", f"<p>{esc(interpretation(name, entry))}</p>",
           f"<p class='note'>Attack objective terms: {esc(attack_terms_text(metrics.get('attack_terms')))}</p>"]
    out += _html_leak(entry["risk"]["leak"])
    out += _html_stage1(metrics["stage1"], figures)
    out += _html_likely_samples(metrics, ordered, len(samples), pairs)
    out += _html_ppa(metrics, figures)
    out += _html_demographics(metrics, ordered)
    out += _html_reidentification(metrics["reidentification"], ordered)
    out += _html_losses_and_selection(metrics, figures)
    return out


def _html_ppa(metrics: dict, figures: dict[str, bytes]) -> list[str]:
    """The ppa attack's kept samples, one row per class (when the target was attacked with ppa)."""
    attack = (metrics.get("attacks") or {}).get("ppa")
    if not attack:
        return []
    esc = html.escape
    return ["<h3>The ppa attack's samples</h3>", _image_html(figures.get("ppa_samples"), "ppa samples"),
            f"<p class='note'>{attack.get('kept')} samples, {attack.get('kept_per_class')} per class (rows), each "
            f"the most confident of {esc(str(_get(attack, 'settings', 'optimise')))} latents of the "
            f"{esc(str(attack.get('generator')))} optimised for {esc(str(_get(attack, 'settings', 'steps')))} steps "
            f"toward its class; mean confidence {number(attack.get('mean_confidence'), 3)} (before optimisation "
            f"{number(attack.get('mean_searched_confidence'), 3)}).</p>"]


def leak_rows(leak: dict) -> tuple[list[str], list[list[str]]]:
    header = ["Candidates", "Null generator", "AUC attacked", "AUC null", "L [95% CI]", "p",
              "TPR at 1% FPR (attacked / null)", "TPR at 5% FPR (attacked / null)", "Candidates (attacked / null)"]
    rows = []
    selected = leak.get("selected_vs_prior") or {}
    for kind, label, result in (("raw", "prior (un-fine-tuned)", leak.get("vs_prior")),
                          ("raw", f"control model {leak.get('control')}", leak.get("vs_control")),
                          (f"selected (stage 2, from {selected.get('pool')} each)", "prior, same rule",
                           selected if selected.get("available") else None),
                          *[(f"{a['mode']} (kept samples)", "prior, as many raw candidates", a["vs_prior"])
                            for a in leak.get("attacks") or [] if a["mode"] != "study"]):
        if not result:
            continue
        tpr = result.get("tpr_at_fpr") or {}
        rows.append([kind, label, number(result["auc_attacked"], 3), number(result["auc_null"], 3),
                     signed(result["leak"]) + signed_interval(result.get("ci")), p_value(result.get("p_value")),
                     *[f"{percent(_get(tpr, 'attacked', k))} / {percent(_get(tpr, 'null', k))}" for k in ("0.01", "0.05")],
                     f"{_get(result, 'candidates', 'attacked')} / {_get(result, 'candidates', 'null')}"])
    return header, rows


def _html_leak(leak: dict) -> list[str]:
    """The headline risk in full: L against each null, TPR at low FPR, and who the members are."""
    esc = html.escape
    out = ["<h3>Leak statistic</h3>", f"<p><b>{esc(leak['verdict'])}.</b></p>"]
    if not leak.get("available"):
        return out
    header, rows = leak_rows(leak)
    out.append(_table_html(header, rows))
    control = "" if leak.get("vs_control") else " No control model was available as a second null."
    selected = leak.get("selected_vs_prior") or {}
    if selected and not selected.get("available"):
        control += f" Selected candidates: not compared ({selected.get('reason')})."
    out.append(f"<p class='note'>Members: {esc(str(leak.get('members_known_by')))}; {leak.get('member_patients')} "
               f"member and {leak.get('nonmember_patients')} non-member patients (same pool, same label mix). "
               f"Feature space: {esc(str(leak.get('feature_space')))}.{control}</p>")
    return out


def _html_stage1(stage1: dict, figures: dict[str, bytes]) -> list[str]:
    """Stage 1: the generated sets' entropy, kurtosis and FID."""
    esc = html.escape
    out = []
    out.append("<h3>Stage 1: distribution of generated images</h3>")
    set_rows = []
    for set_name, block in stage1["sets"].items():
        set_rows.append([set_name, str(block["images"]),
                         number(_get(block, "entropy", "mean")) + " ± " + number(_get(block, "entropy", "se")),
                         number(_get(block, "kurtosis", "mean")) + " ± " + number(_get(block, "kurtosis", "se"))])
    out.append(_table_html(["Set", "Images", "Pixel entropy (bits)", "PCA kurtosis"], set_rows))
    fid_rows = [[f"{r['a']} ↔ {r['b']}", significant(r["value"]), f"{r['num_a']} / {r['num_b']}",
                 number(r["underdetermined"])] for r in stage1.get("fid") or []]
    if fid_rows:
        out.append(_table_html(["FID", "Value", "Images", "Fewer images than dims"], fid_rows))
    pca = stage1["pca"]
    out.append(f"<p class='note'>PCA basis: {pca['components']} components fitted on {esc(str(pca['fitted_on']))} "
               f"({pca['fit_images']} images, {percent(pca['explained_variance'])} of variance). "
               f"{esc(inception_text(stage1.get('inception')))}</p>")
    for note in stage1.get("notes") or []:
        out.append(f"<p class='note'>Note: {esc(note)}</p>")
    out.append(_image_html(figures.get("kurtosis"), "kurtosis curves"))
    out.append(_image_html(figures.get("stage1_examples"), "example images per set"))
    return out


def _html_likely_samples(metrics: dict, ordered: list[dict], total: int, pairs: dict[int, bytes]) -> list[str]:
    """Stage 2: likely samples beside their nearest training image."""
    esc = html.escape
    stage2 = metrics["stage2"]
    out = []
    out.append("<h3>Stage 2: likely samples beside their nearest training image (validation only)</h3>")
    out.append(f"<p class='note'>Nearest neighbour among {stage2.get('training_images')} training images in "
               f"{esc(str(stage2.get('feature_space')))}; SSIM at the generator's resolution "
               f"({metrics.get('resolution')} px). Mean SSIM {number(stage2.get('ssim_mean'))}, "
               f"{stage2.get('distinct_neighbours', 'n/a')} distinct neighbours of "
               f"{stage2.get('distinct_neighbour_patients', 'n/a')} patients.</p>")
    sample_rows = [[str(s["id"]), _image_html(pairs.get(s["id"]), f"sample {s['id']} and neighbour", "pair"),
                    number(s.get("ssim")), number(s.get("nn_distance")), esc(s.get("nn_patient") or "n/a"),
                    str(s.get("rank_combined"))] for s in ordered[:HTML_MAX_SAMPLES]]
    out.append(_table_html(["id", "Reconstruction | nearest training image", "SSIM", "Distance", "Patient",
                            "Combined rank"], sample_rows, raw_columns={1}))
    if total > HTML_MAX_SAMPLES:
        out.append(f"<p class='note'>First {HTML_MAX_SAMPLES} of {total} by combined rank; all are in "
                   "report.json and evaluation.parquet.</p>")
    return out


def _html_demographics(metrics: dict, ordered: list[dict]) -> list[str]:
    """Predicted age and sex of reconstructions and neighbours against the truth."""
    esc = html.escape
    out = []
    out.append("<h3>Demographics of reconstructions and their nearest neighbours</h3>")
    demographics = metrics.get("demographics") or {}
    if demographics.get("available"):
        rec, nn = demographics.get("reconstruction") or {}, demographics.get("neighbour") or {}
        out.append(_table_html(["Images", "Age MAE (years)", "Sex accuracy", "n"], [
            ["reconstructions", number(rec.get("age_mae"), 1) + interval(rec.get("age_mae_ci"), digits=1),
             percent(rec.get("sex_accuracy")) + interval(rec.get("sex_accuracy_ci"), as_percent=True),
             str(rec.get("n"))],
            ["nearest neighbours (real)", number(nn.get("age_mae"), 1) + interval(nn.get("age_mae_ci"), digits=1),
             percent(nn.get("sex_accuracy")) + interval(nn.get("sex_accuracy_ci"), as_percent=True),
             str(nn.get("n", "n/a"))]]))
        out.append(f"<p class='note'>Ground truth: {esc(str(demographics.get('ground_truth')))}.</p>")
        header, rows = demographic_rows(ordered[:HTML_MAX_SAMPLES])
        out.append(_table_html(header, rows))
    else:
        out.append("<p class='note'>Not available: the target's training images are not known here.</p>")
    return out


def _html_reidentification(reid: dict, ordered: list[dict]) -> list[str]:
    """Re-identification and devices (synthetic ground truth)."""
    esc = html.escape
    out = []
    out.append("<h3>Re-identification (synthetic ground truth, validation only)</h3>")
    if reid.get("available"):
        out.append(f"<p>{reid['reidentified']} of {reid['num_samples']} likely samples are nearer a training image "
                   f"({reid['train_pool']} pool, {reid['num_train']} images) than a held-out image "
                   f"({reid['heldout_pool']} pool, {reid['num_control']} images): rate "
                   f"{percent(reid['rate'])}{interval(reid['rate_ci'], as_percent=True)}, one-sided p "
                   f"{p_value(reid['p_value'])} against chance 0.5; they point at "
                   f"{reid['distinct_train_patients']} "
                   f"distinct training patient(s). Membership AUC {number(reid.get('membership_auc'), 2)}.</p>")
        devices = reid.get("devices") or {}
        detector = devices.get("detector") or {}
        if devices.get("available"):
            out.append(f"<p>Devices: {devices.get('reproduced')} reconstruction(s) reproduce the matched patient's "
                       f"pacemaker ({devices.get('matched_with_pacemaker')} matched patients have one). "
                       "Detector on "
                       f"real images: sensitivity {number(detector.get('sensitivity'), 2)}, specificity "
                       f"{number(detector.get('specificity'), 2)}, AUC {number(detector.get('auc'), 2)}. It also "
                       f"fires on {devices.get('detected_without_pacemaker')} of "
                       f"{devices.get('matched_without_pacemaker')} reconstructions whose matched patient has no "
                       "pacemaker; where that share is far above 1 - specificity, the detector is reacting to "
                       "artefacts of the generated images and the reproduction count means little.</p>")
        else:
            out.append(f"<p class='note'>Devices: not assessed. {esc(str(devices.get('reason', '')))}</p>")
        header, rows = reid_rows(ordered[:HTML_MAX_SAMPLES])
        out.append(_table_html(header, rows))
    else:
        out.append(f"<p class='note'>Not available: {esc(str(reid.get('reason')))}.</p>")
    return out


def _html_losses_and_selection(metrics: dict, figures: dict[str, bytes]) -> list[str]:
    """Fine-tuning losses, the selection rule, and the target's notes."""
    esc = html.escape
    out = []
    out.append("<h3>Stage 1 fine-tuning losses</h3>")
    out.append(_image_html(figures.get("losses"), "loss curves"))
    selection = metrics.get("selection") or {}
    thresholds, counts = selection.get("thresholds") or {}, selection.get("counts") or {}
    out.append(f"<p class='note'>Selection: rule {esc(str(selection.get('rule')))}; objective total ≤ "
               f"{significant(thresholds.get('objective_total'))} ({counts.get('low_objective')} candidates), "
               f"Mahalanobis ≤ {significant(thresholds.get('mahalanobis'))} ({counts.get('low_mahalanobis')}); "
               f"{counts.get('selected')} selected of {counts.get('candidates')} "
               f"({counts.get('non_finite')} with non-finite scores).</p>")
    for note in metrics.get("notes") or []:
        out.append(f"<p class='note'>Note: {esc(note)}</p>")
    return out


def _html_meanings(document: dict) -> list[str]:
    """4. What each number shows and does not show."""
    out = []
    out.append("<h2>4. What these numbers show and do not show</h2>")
    out.append(_table_html(["Number", "Shows", "Does not show"],
                           [[m["metric"], m["shows"], m["does_not_show"]] for m in document["meanings"]]))
    return out


def _html_reproducibility(document: dict) -> list[str]:
    """5. Software versions and the resolved manifest."""
    esc = html.escape
    out = []
    out.append("<h2>5. Reproducibility</h2>")
    versions = document["software"]
    first = next(iter(versions["evaluation"].values()), None) or {}
    out.append(_table_html(["Package", "Evaluation", "Report"],
                           [[k, str(first.get(k)), str(versions["report"].get(k))]
                            for k in sorted(set(first) | set(versions["report"]))]))
    out.append("<h3>Manifest (resolved)</h3><pre>" + esc(yaml.safe_dump(document["manifest"], sort_keys=False))
               + "</pre>")
    return out


# ------------------------------------------------------------------------------------------------ Markdown


def _table_markdown(header: list[str], rows: list[list[str]]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(document: dict) -> str:
    lines = [f"# Re-identification risk report: run {document['run_id']}", "",
             f"Generated {document['generated']}. Full report with images: `{HTML_FILE}`; all numbers: `{JSON_FILE}`.",
             "", f"**Threat model.** {document['threat_model']}", "", f"**Validation.** {document['validation_note']}",
             "", "## Instrument", ""]
    header, rows = instrument_rows(document)
    lines.append(_table_markdown(header, rows) if rows else (document.get("instrument") or {}).get("note", ""))
    lines += ["", measured_in(document), ""]
    header, rows = prior_rows(document)
    if rows:
        lines += ["### The generator prior", "", _table_markdown(header, rows), ""]
    lines += ["### Calibration", ""]
    header, rows = calibration_rows(document)
    lines.append(_table_markdown(header, rows))
    lines += ["", "## Risk summary", ""]
    rows = risk_rows(document)
    if rows:
        lines.append(_table_markdown(list(rows[0]), [list(r.values()) for r in rows]))
    lines += [""] + [f"- {interpretation(n, e)}" for n, e in document["targets"].items()]
    if has_controls(document):
        lines += ["", "## Controls: targets known to leak", ""]
        for title, (header, rows) in (("Identity classes", control_rows(document)),
                                      ("Canaries", canary_rows(document)),
                                      ("Dose-response", dose_rows(document)),
                                      ("Cohort skew", population_rows(document))):
            if rows:
                lines += [f"### {title}", "", _table_markdown(header, rows), ""]
        lines += [f"- {control_sentence(n, c)}" for n, c in (document.get("controls") or {}).items()]
        lines += [f"- {canary_sentence(n, c)}" for n, c in (document.get("canaries") or {}).items()]
    if document["mitigation"]["shown"]:
        lines += ["", "## Mitigations: utility and risk side by side", ""]
        header, rows = mitigation_rows(document)
        lines.append(_table_markdown(header, rows))
        sentences = defence_sentences(document)
        if sentences:
            lines += [""] + [f"- {s}" for s in sentences]
        lines += ["", f"Risk vs utility plot: `{MITIGATION_FIGURE}`."]
    lines += ["", "## Attack objective terms", ""]
    lines += [f"- {n}: {attack_terms_text(_get(e, 'metrics', 'attack_terms'))}" for n, e in document["targets"].items()]
    lines += ["", "## Stage 1 comparison", ""]
    header, rows = stage1_rows(document)
    lines.append(_table_markdown(header, rows))
    for name, entry in document["targets"].items():
        lines += ["", f"## {name}: demographics of likely samples", ""]
        header, rows = demographic_rows(sorted(entry["samples"], key=lambda s: s["id"])[:HTML_MAX_SAMPLES])
        lines.append(_table_markdown(header, rows) if rows else "No likely samples.")
        notes = (entry["metrics"].get("notes") or []) + (_get(entry, "metrics", "stage1", "notes") or [])
        lines += [""] + [f"- Note: {n}" for n in notes]
    lines += ["", "## What these numbers show and do not show", ""]
    lines.append(_table_markdown(["Number", "Shows", "Does not show"],
                                 [[m["metric"], m["shows"], m["does_not_show"]] for m in document["meanings"]]))
    lines += ["", "## Software", ""]
    lines.append(_table_markdown(["Package", "Version (report)"], [[k, str(v)] for k, v in
                                                                    document["software"]["report"].items()]))
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ the shell


def _control_leaks(store, manifest: Manifest, evaluations: dict[str, dict], controls: dict[str, dict]
                   ) -> dict[str, dict]:
    """Per target with a leak statistic: L of its attacked candidates against its control model's, on its records."""
    settings = manifest.evaluation
    leaks = {}
    for name, metrics in evaluations.items():
        control = choose_control(metrics, {**controls, name: metrics})
        if control is None or not _get(metrics, "leak", "available"):
            continue
        mine, theirs = evaluation_prefix(name), evaluation_prefix(control)
        result = control_leak(store.read_parquet(f"{mine}/{RECORDS_FILE}"),
                              store.read_parquet(f"{mine}/{LEAK_CANDIDATES_FILE}"),
                              store.read_parquet(f"{theirs}/{LEAK_CANDIDATES_FILE}"),
                              settings.leak_bootstrap, settings.leak_permutations, settings.seed)
        if result is not None:
            leaks[name] = {**result, "control": control}
            log.event("report_leak_vs_control", target=name, control=control, leak=round(result["leak"], 4),
                      ci=[round(v, 4) for v in result["ci"]])
    return leaks


def _defence_changes(store, manifest: Manifest, evaluations: dict[str, dict]) -> dict[str, dict]:
    """Per target with a baseline (both evaluated): the change of the baseline's strongest attack's L, paired."""
    settings = manifest.evaluation
    changes = {}
    tables: dict[str, object] = {}

    def table(key: str):  # a baseline shared by several defended arms is read once
        if key not in tables:
            tables[key] = store.read_parquet(key)
        return tables[key]

    for name in evaluations:
        baseline = manifest.target(name).baseline
        if baseline is None or not store.is_committed(evaluation_prefix(baseline)):
            continue
        theirs = evaluations.get(baseline) or store.read_json(f"{evaluation_prefix(baseline)}/{METRICS_FILE}")
        ranking = attack_ranking(theirs)
        mode = ranking[0]["mode"] if ranking else "study"
        if not _get(theirs, "leak", "available") or not _get(evaluations[name], "leak", "available"):
            result = {"available": False, "mode": mode, "reason": "membership is not available for both targets"}
        else:
            mine, other = evaluation_prefix(name), evaluation_prefix(baseline)
            result = defence_change(mode, table(f"{mine}/{RECORDS_FILE}"), table(f"{other}/{RECORDS_FILE}"),
                                    table(f"{mine}/{LEAK_CANDIDATES_FILE}"), table(f"{other}/{LEAK_CANDIDATES_FILE}"),
                                    settings.leak_bootstrap, settings.leak_permutations, settings.seed)
        changes[name] = {**result, "baseline": baseline}
        log.event("report_defence_change", target=name, baseline=baseline, mode=mode,
                  change=round(result["change"], 4) if result.get("available") else None,
                  ci=[round(v, 4) for v in result["ci"]] if result.get("ci") else None)
    return changes


def report(manifest: Manifest, target: str | None = None) -> int:
    """`reid-batch report`: render every target's evaluation (or one target's) into one report."""
    store = run_store(manifest)
    names = [manifest.target(target).name] if target else [t.name for t in manifest.targets]
    for stage, prefix_of in (("evaluate", evaluation_prefix), ("calibrate", calibration_prefix)):
        missing = [n for n in names if not store.is_committed(prefix_of(n))]
        if missing:
            raise InputError(f"no committed {stage} output for target(s) {missing}; run `reid-batch {stage}` "
                             + " ".join(f"--target {n}" for n in missing[:1]) + " first",
                             where=store.uri(prefix_of(missing[0])))
    # Control models are read too (their candidates are the second null): a new one means a new report.
    controls = [t.name for t in manifest.targets if t.train is not None and t.train.pool == "control"
                and store.is_committed(evaluation_prefix(t.name))]
    # So are the baselines of defended targets (the change of L is measured against their candidates).
    baselines = [b for b in sorted({manifest.target(n).baseline for n in names} - {None})
                 if store.is_committed(evaluation_prefix(b))]
    inputs = {n: store.read_commit(evaluation_prefix(n))["created"]
              for n in sorted(set(names) | set(controls) | set(baselines))}
    inputs.update({f"{n}/calibration": store.read_commit(calibration_prefix(n))["created"] for n in names})
    for read in (REID_PREFIX, PRIOR_QUALITY_PREFIX):  # the instrument section reads them: new ones, a new report
        if store.is_committed(read):
            inputs[read] = store.read_commit(read)["created"]
    prefix = report_prefix(target)
    if store.is_committed(prefix):
        if store.read_commit(prefix).get("metadata", {}).get("inputs") == inputs:
            log.event("report_skipped", uri=store.uri(prefix), reason="already committed from these evaluations")
            return 0
        store.delete(store.commit_marker(prefix))
        store.delete(prefix)
    evaluations, tables, figures, pairs, calibrations = {}, {}, {}, {}, {}
    for name in names:
        base = evaluation_prefix(name)
        evaluations[name] = store.read_json(f"{base}/{METRICS_FILE}")
        tables[name] = store.read_parquet(f"{base}/{TABLE_FILE}").to_pandas()
        figures[name] = {key: store.read_bytes(f"{base}/{path}") for key, path in FIGURES.items()
                         if store.exists(f"{base}/{path}")}
        calibrations[name] = store.read_json(f"{calibration_prefix(name)}/{CALIBRATION_FILE}")
        if store.exists(f"{calibration_prefix(name)}/{CALIBRATION_FIGURE}"):
            figures[name]["dose_response"] = store.read_bytes(f"{calibration_prefix(name)}/{CALIBRATION_FIGURE}")
        pairs[name] = {int(i): store.read_bytes(f"{base}/{pair_key(int(i))}") for i in tables[name]["id"]
                       if store.exists(f"{base}/{pair_key(int(i))}")}
    model_metrics = f"{DEMOGRAPHICS_PREFIX}/{MODEL_METRICS_FILE}"
    demographic_model = store.read_json(model_metrics) \
        if store.is_committed(DEMOGRAPHICS_PREFIX) and store.exists(model_metrics) else None
    reid_metrics = f"{REID_PREFIX}/{MODEL_METRICS_FILE}"
    reid_model = store.read_json(reid_metrics) if store.is_committed(REID_PREFIX) and store.exists(reid_metrics) else None
    control_metrics = {n: store.read_json(f"{evaluation_prefix(n)}/{METRICS_FILE}") for n in controls}
    control_leaks = _control_leaks(store, manifest, evaluations, control_metrics)
    document = build_report(manifest.run_id, evaluations, tables, manifest.model_dump(mode="json"), demographic_model,
                            reid_model, calibrations, control_leaks, _defence_changes(store, manifest, evaluations))
    prior_strip = None
    if store.is_committed(PRIOR_QUALITY_PREFIX):
        document["prior_quality"] = store.read_json(f"{PRIOR_QUALITY_PREFIX}/{PRIOR_QUALITY_FILE}")
        prior_strip = store.read_bytes(f"{PRIOR_QUALITY_PREFIX}/{PRIOR_QUALITY_STRIP}")
    plot = mitigation_png(document) if document["mitigation"]["shown"] else None
    page = render_html(document, {**figures, "_report": {"mitigation": plot, "prior_strip": prior_strip}}, pairs)
    with store.committed(prefix, {"stage": "report", "targets": names, "inputs": inputs}) as out:
        out.write_bytes(HTML_FILE, page.encode("utf-8"))
        out.write_bytes(MARKDOWN_FILE, render_markdown(document).encode("utf-8"))
        out.write_json(JSON_FILE, document)
        if plot is not None:
            out.write_bytes(MITIGATION_FIGURE, plot)
    log.event("report_done", uri=store.uri(prefix), targets=names, html_bytes=len(page))
    return 0
