"""The verdict: what a target's leak statistic, its attack ranking and its calibration allow the report to say.

The wording is decided here and nowhere else: "leak detected" when L's interval against the prior lies above 0,
else "no leak larger than <the smallest detectable leak> detected", never a bare "no leak". See docs/method.md.
"""

from __future__ import annotations

from reid_batch.reporting.text import leak_cell, percent, signed, signed_interval
from reid_batch.results import Attack, Calibration, Evaluation, LeakSummary, as_json


def choose_control(evaluation: Evaluation, evaluations: dict[str, Evaluation]) -> str | None:
    """The control model a target's leak is also measured against: a target trained on the control pool with a leak
    statistic of its own (its candidates were embedded), the same architecture family first; None for a control."""
    if evaluation.train_pool == "control":
        return None
    usable = [name for name, other in evaluations.items() if other.train_pool == "control" and other.leak.available]
    same_family = [name for name in usable if evaluations[name].family == evaluation.family]
    return (same_family or usable or [None])[0]


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


def attack_ranking(attacks: dict[str, Attack]) -> list[dict]:
    """Every attack mode run on a target with its L against the prior, strongest first: a detected leak before an
    undetected one, then by L. A risk estimate is a lower bound set by the strongest attack tried."""
    ranked = []
    for mode, attack in attacks.items():
        if attack.leak.available:
            result = attack.leak.vs_prior
            # Both the interval and the permutation test: with a few dozen optimised samples the candidate bootstrap
            # is coarse, and an interval alone can clear 0 where the permutation p does not.
            detected = bool((result.ci or [0])[0] > 0 and (result.p_value or 1.0) <= 0.05)
            ranked.append({"mode": mode, "vs_prior": result.to_json(), "detected": detected,
                           "compared": attack.leak.compared, "description": attack.description})
    return sorted(ranked, key=lambda r: (not r["detected"], -float(r["vs_prior"].get("leak") or 0.0)))


def leak_entry(leak: LeakSummary, attacks: dict[str, Attack], control_leak: dict | None,
               calibration: Calibration | None) -> dict:
    """A target's headline risk (the report's `risk.leak`): L against the prior and the control model, the
    calibration, the verdict, and the attack modes ranked (the headline names the strongest)."""
    if not leak.available:
        entry = {"available": False, "reason": leak.reason or "the evaluation has no leak statistic"}
    else:
        entry = {"available": True, "vs_prior": leak.raw.vs_prior.to_json(), "feature_space": leak.feature_space,
                 "selected_vs_prior": leak.selected.vs_prior.to_json() if leak.selected else None,
                 "identity_sensitive": leak.identity_sensitive, "members_known_by": leak.members_known_by,
                 "member_patients": leak.member_patients, "nonmember_patients": leak.nonmember_patients}
        entry["control"] = (control_leak or {}).get("control")
        entry["vs_control"] = control_leak
        if calibration is not None:
            entry["calibration"] = {k: as_json(getattr(calibration, k)) for k in (
                "available", "reason", "minimum_detectable_effect", "false_positive_rate", "null_repeats",
                "largest_fraction", "detect_share", "fractions", "spikes", "ppa")}
    entry["verdict"] = leak_verdict(entry)
    entry["detected"] = bool(entry.get("available") and (entry["vs_prior"].get("ci") or [0])[0] > 0)
    ranking = attack_ranking(attacks) if entry.get("available") else []
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

