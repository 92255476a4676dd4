"""The report's own figure: risk against utility for a mitigation study (the evaluations draw the others)."""

from __future__ import annotations

import matplotlib

from reid_batch.formats import figure_png


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
