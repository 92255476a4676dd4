"""The report's tables as (header, rows) of display strings, shared by the HTML and Markdown renderers."""

from __future__ import annotations

from reid_batch.reporting.text import (interval, leak_cell, nested, number, p_value, percent, signed,
                                       signed_interval, significant)


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


def population_rows(document: dict) -> tuple[list[str], list[list[str]]]:
    """P4, cohort skew: the shift of the attacked generator's predicted age and male share from the prior's, beside
    what the target trained on and its pool."""
    header = ["Target", "Trained on", "Age shift [95% CI]", "Male share shift [95% CI]", "Members: age, male share",
              "Pool: age, male share"]
    rows = []
    for name, shift in (document.get("population_shift") or {}).items():
        members, pool = shift.get("truth_members") or {}, shift.get("truth_pool") or {}
        rows.append([name, str(shift.get("cohort")),
                     f"{signed(nested(shift, 'age', 'shift'), 1)} y{signed_interval(nested(shift, 'age', 'ci'), 1)}",
                     f"{signed(nested(shift, 'male_share', 'shift'), 3)}"
                     f"{signed_interval(nested(shift, 'male_share', 'ci'), 3)}",
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
        per_class = nested(training, "recipe", "images_per_class") if metrics.get("preset") == "overfit" else None
        entries.append((str(metrics.get("arch")), per_class if per_class is not None else float("inf"), name,
                        training, entry))
    # A dose-response needs one architecture at two or more sizes; a lone overfit target beside others is not one.
    doses = {arch: {e[1] for e in entries if e[0] == arch and e[1] != float("inf")} for arch, *_ in entries}
    rows = [[name, "all" if per_class == float("inf") else str(per_class), str(training.get("train_images")),
             leak_cell(nested(entry, "risk", "leak", "vs_prior")), str(nested(entry, "risk", "leak", "verdict"))]
            for arch, per_class, name, training, entry in sorted(entries, key=lambda e: (e[0], e[1], e[2]))
            if len(doses[arch]) >= 2]
    return header, rows


def has_controls(document: dict) -> bool:
    return bool(document.get("controls") or document.get("canaries") or document.get("population_shift")
                or dose_rows(document)[1])


def stage1_rows(document: dict) -> tuple[list[str], list[list[str]]]:
    """The study's Figure 4: per target 'prior -> fine-tuned' and 'reference' columns."""
    header = ["Metric"]
    for name in document["targets"]:
        header += [f"{name}: prior → fine-tuned", f"{name}: reference"]

    def pair(entry: dict, metric: str) -> list[str]:
        sets = nested(entry, "metrics", "stage1", "sets") or {}

        def value(name: str) -> str:
            block = nested(sets, name, metric)
            if not block:
                return "n/a"
            spread = f" ± {number(block.get('se'), 3)}" if block.get("se") is not None else ""
            return number(block.get("mean"), 3) + spread

        return [f"{value('prior')} → {value('finetuned')}", value("reference")]

    def fid_cell(entry: dict, a: str, b: str) -> str:
        for row in nested(entry, "metrics", "stage1", "fid") or []:
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
                     *[f"{percent(nested(tpr, 'attacked', k))} / {percent(nested(tpr, 'null', k))}" for k in ("0.01", "0.05")],
                     f"{nested(result, 'candidates', 'attacked')} / {nested(result, 'candidates', 'null')}"])
    return header, rows
