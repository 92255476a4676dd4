"""report.html: one self-contained page (figures embedded as base64 PNG), one renderer per section in reading order.
"""

from __future__ import annotations

import base64
import html

import yaml

from reid_batch.reporting.document import HTML_MAX_SAMPLES
from reid_batch.reporting.sentences import (canary_sentence, control_sentence, defence_sentences, interpretation,
                                            measured_in)
from reid_batch.reporting.tables import (calibration_rows, canary_rows, control_rows, demographic_rows, dose_rows,
                                         has_controls, instrument_rows, leak_rows, mitigation_rows, population_rows,
                                         prior_rows, reid_rows, risk_rows, stage1_rows)
from reid_batch.reporting.text import (attack_terms_text, inception_text, interval, nested, number, p_value, percent,
                                       significant)


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


def table_html(header: list[str], rows: list[list[str]], raw_columns: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell if i in raw_columns else html.escape(str(cell))}</td>"
                                    for i, cell in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def image_html(png: bytes | None, alt: str, css_class: str = "figure") -> str:
    if not png:
        return f"<p class='note'>({html.escape(alt)}: not available)</p>"
    data = base64.b64encode(png).decode("ascii")
    return f"<img class='{css_class}' alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"


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
    out.append(table_html(header, rows))
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
    return ["<h3>The generator prior: what the attack can draw</h3>", table_html(header, rows),
            image_html(figures.get("_report", {}).get("prior_strip"), "prior samples (top) over public images", "strip"),
            "<p class='note'>Top row: the prior's samples; bottom row: public images. The Fréchet distance compares "
            "Gaussians fitted to both sets in the re-identification embedding; the floor is the distance between "
            "two disjoint real sets. A small CNN trained to tell samples from real images scores 0.5 when it "
            "cannot. The attack can only reconstruct what this prior can draw.</p>"]


def _html_calibration(document: dict, figures: dict[str, dict[str, bytes]]) -> list[str]:
    """Spike-in calibration per target: how large a leak the statistic sees, and how often it sees one that is not."""
    out = _noted_table("Calibration: the smallest leak this instrument sees", calibration_rows(document), (
        "Prior candidates with a share of them replaced by new images of the target's member patients, against other "
        "prior candidates: detected = L's 95% interval above 0. The smallest detectable leak is the smallest share "
        "detected in most repeats; at 0% every detection is a false positive. A '· ppa' row repeats it at the ppa "
        "attack's pool size (as many candidates as it kept, larger shares), detected as attacks are ranked: the "
        "interval above 0 and permutation p <= 0.05."))
    plots = [image_html(figures[name]["dose_response"], f"{name}: dose-response") for name in document["targets"]
             if figures.get(name, {}).get("dose_response")]
    if plots:
        out.append("<div class='figures'>" + "".join(plots) + "</div>")
    return out


def _html_risk_summary(document: dict) -> list[str]:
    """1. The risk table and one interpretation per target."""
    esc = html.escape
    out = []
    out.append("<h2>1. Risk summary</h2>")
    rows = risk_rows(document)
    if rows:
        out.append(table_html(list(rows[0]), [list(r.values()) for r in rows]))
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
    return [f"<h3>{title}</h3>", table_html(header, rows), f"<p class='note'>{note}</p>"] if rows else []


def _noted_table(title: str, table: tuple[list[str], list[list[str]]], note: str) -> list[str]:
    """A titled table whose note, read first, says how to read it."""
    header, rows = table
    return [f"<h3>{title}</h3>", f"<p class='note'>{note}</p>", table_html(header, rows)]


def _html_identity_controls(document: dict) -> list[str]:
    esc = html.escape
    out = _noted_table("Identity classes", control_rows(document), (
        "Identity-class controls: a classifier whose classes are patients, attacked like the targets above. Each "
        "sample asks for the class its latent encodes; it hits when its nearest patient, in the re-identification "
        "embedding, among the scored patients and as many distractors (held-out studies only), is the requested one. "
        "The null permutes which class belongs to which patient within sex; uniform chance is 1 / patients in the "
        "gallery. The negative control's classes are other patients of the same sexes, scored against the positive's "
        "patients."))
    out.append("<ul>" + "".join(f"<li>{esc(control_sentence(n, c))}</li>"
                                for n, c in document["controls"].items()) + "</ul>")
    return out


def _html_mitigations(document: dict, figures: dict[str, dict[str, bytes]]) -> list[str]:
    """1b. Utility and risk side by side (mitigation manifests only)."""
    out = ["<h2>1b. Mitigations: utility and risk side by side</h2>", table_html(*mitigation_rows(document))]
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
    out.append(image_html(figures.get("_report", {}).get("mitigation"), "risk vs utility"))
    return out


def _html_comparison(document: dict) -> list[str]:
    """2. Stage 1 across targets."""
    esc = html.escape
    out = ["<h2>2. Side-by-side comparison (stage 1, distribution level)</h2>", table_html(*stage1_rows(document))]
    out.append("<p class='note'>Mean ± standard error (entropy: over images; kurtosis: bootstrap). * FID with fewer "
               "images than feature dimensions (biased upwards; compare only between equal-size sets). "
               + esc(" ".join(sorted({inception_text(nested(e, "metrics", "stage1", "inception"))
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
    return ["<h3>The ppa attack's samples</h3>", image_html(figures.get("ppa_samples"), "ppa samples"),
            f"<p class='note'>{attack.get('kept')} samples, {attack.get('kept_per_class')} per class (rows), each "
            f"the most confident of {esc(str(nested(attack, 'settings', 'optimise')))} latents of the "
            f"{esc(str(attack.get('generator')))} optimised for {esc(str(nested(attack, 'settings', 'steps')))} steps "
            f"toward its class; mean confidence {number(attack.get('mean_confidence'), 3)} (before optimisation "
            f"{number(attack.get('mean_searched_confidence'), 3)}).</p>"]


def _html_leak(leak: dict) -> list[str]:
    """The headline risk in full: L against each null, TPR at low FPR, and who the members are."""
    esc = html.escape
    out = ["<h3>Leak statistic</h3>", f"<p><b>{esc(leak['verdict'])}.</b></p>"]
    if not leak.get("available"):
        return out
    header, rows = leak_rows(leak)
    out.append(table_html(header, rows))
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
                         number(nested(block, "entropy", "mean")) + " ± " + number(nested(block, "entropy", "se")),
                         number(nested(block, "kurtosis", "mean")) + " ± " + number(nested(block, "kurtosis", "se"))])
    out.append(table_html(["Set", "Images", "Pixel entropy (bits)", "PCA kurtosis"], set_rows))
    fid_rows = [[f"{r['a']} ↔ {r['b']}", significant(r["value"]), f"{r['num_a']} / {r['num_b']}",
                 number(r["underdetermined"])] for r in stage1.get("fid") or []]
    if fid_rows:
        out.append(table_html(["FID", "Value", "Images", "Fewer images than dims"], fid_rows))
    pca = stage1["pca"]
    out.append(f"<p class='note'>PCA basis: {pca['components']} components fitted on {esc(str(pca['fitted_on']))} "
               f"({pca['fit_images']} images, {percent(pca['explained_variance'])} of variance). "
               f"{esc(inception_text(stage1.get('inception')))}</p>")
    for note in stage1.get("notes") or []:
        out.append(f"<p class='note'>Note: {esc(note)}</p>")
    out.append(image_html(figures.get("kurtosis"), "kurtosis curves"))
    out.append(image_html(figures.get("stage1_examples"), "example images per set"))
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
    sample_rows = [[str(s["id"]), image_html(pairs.get(s["id"]), f"sample {s['id']} and neighbour", "pair"),
                    number(s.get("ssim")), number(s.get("nn_distance")), esc(s.get("nn_patient") or "n/a"),
                    str(s.get("rank_combined"))] for s in ordered[:HTML_MAX_SAMPLES]]
    out.append(table_html(["id", "Reconstruction | nearest training image", "SSIM", "Distance", "Patient",
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
        out.append(table_html(["Images", "Age MAE (years)", "Sex accuracy", "n"], [
            ["reconstructions", number(rec.get("age_mae"), 1) + interval(rec.get("age_mae_ci"), digits=1),
             percent(rec.get("sex_accuracy")) + interval(rec.get("sex_accuracy_ci"), as_percent=True),
             str(rec.get("n"))],
            ["nearest neighbours (real)", number(nn.get("age_mae"), 1) + interval(nn.get("age_mae_ci"), digits=1),
             percent(nn.get("sex_accuracy")) + interval(nn.get("sex_accuracy_ci"), as_percent=True),
             str(nn.get("n", "n/a"))]]))
        out.append(f"<p class='note'>Ground truth: {esc(str(demographics.get('ground_truth')))}.</p>")
        header, rows = demographic_rows(ordered[:HTML_MAX_SAMPLES])
        out.append(table_html(header, rows))
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
        out.append(table_html(header, rows))
    else:
        out.append(f"<p class='note'>Not available: {esc(str(reid.get('reason')))}.</p>")
    return out


def _html_losses_and_selection(metrics: dict, figures: dict[str, bytes]) -> list[str]:
    """Fine-tuning losses, the selection rule, and the target's notes."""
    esc = html.escape
    out = []
    out.append("<h3>Stage 1 fine-tuning losses</h3>")
    out.append(image_html(figures.get("losses"), "loss curves"))
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
    out.append(table_html(["Number", "Shows", "Does not show"],
                          [[m["metric"], m["shows"], m["does_not_show"]] for m in document["meanings"]]))
    return out


def _html_reproducibility(document: dict) -> list[str]:
    """5. Software versions and the resolved manifest."""
    esc = html.escape
    out = []
    out.append("<h2>5. Reproducibility</h2>")
    versions = document["software"]
    first = next(iter(versions["evaluation"].values()), None) or {}
    out.append(table_html(["Package", "Evaluation", "Report"],
                          [[k, str(first.get(k)), str(versions["report"].get(k))]
                           for k in sorted(set(first) | set(versions["report"]))]))
    out.append("<h3>Manifest (resolved)</h3><pre>" + esc(yaml.safe_dump(document["manifest"], sort_keys=False))
               + "</pre>")
    return out
