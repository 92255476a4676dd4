"""How the report writes numbers: one formatter per kind of value, and the attack's objective terms in words.

Every table and sentence of the report formats through these, so "n/a", signs, intervals and p-values read the same
everywhere.
"""

from __future__ import annotations

import math
from typing import Any

from reid_batch.archs import CNN_ALLOWED_TERMS, VIT_TERMS


def nested(mapping: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(mapping, dict):
            return None
        mapping = mapping.get(key)
    return mapping


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


def leak_cell(result: dict | None) -> str:
    """L [interval], p."""
    if not result:
        return "n/a"
    return f"{signed(result['leak'])}{signed_interval(result.get('ci'))}, p {p_value(result.get('p_value'))}"


def inception_text(inception: dict | None) -> str:
    if not inception:
        return "FID not computed (evaluation.fid: false)."
    if not inception.get("trained"):
        return (f"FID features from UNTRAINED (seeded random) Inception-v3 weights at {inception.get('image_size')} "
                "px: a relative measure between these sets only, not comparable with published FIDs.")
    return f"FID features from Inception-v3 weights {inception.get('weights')} at {inception.get('image_size')} px."


def canonical_terms(terms: dict) -> dict:
    # JSON records keep keys sorted; show terms in the objective's own order.
    order = list(CNN_ALLOWED_TERMS) + [t for t in VIT_TERMS if t not in CNN_ALLOWED_TERMS]
    return dict(sorted(terms.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)))


def attack_terms_text(attack: dict | None) -> str:
    """The objective terms the attack used, with the fallback's reason when bn_stats could not be used."""
    if not attack or not attack.get("terms"):
        return "n/a"
    used = ", ".join(f"{t} {w:g}" for t, w in canonical_terms(attack["terms"]).items())
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
