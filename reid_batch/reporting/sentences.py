"""The report's plain-language sentences: one per target, per control and per defence.

Each sentence states its numbers and the bar they were held to, so that it cannot read stronger than they are.
"""

from __future__ import annotations

from reid_batch.reporting.text import interval, nested, number, p_value, percent, signed, signed_interval


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


def measured_in(document: dict) -> str:
    """Which space this report's distances were measured in (evaluation records it per target)."""
    spaces = sorted({str(nested(e, "metrics", "leak", "feature_space") or nested(e, "metrics", "stage2", "feature_space"))
                     for e in document.get("targets", {}).values()})
    return f"The distances behind the risk numbers below are measured in: {'; '.join(spaces)}." if spaces else ""
