"""report.md: the report's summary in Markdown, without images."""

from __future__ import annotations

from reid_batch.layout import HTML_FILE, JSON_FILE, MITIGATION_FIGURE
from reid_batch.reporting.document import HTML_MAX_SAMPLES
from reid_batch.reporting.sentences import (canary_sentence, control_sentence, defence_sentences, interpretation,
                                            measured_in)
from reid_batch.reporting.tables import (calibration_rows, canary_rows, control_rows, demographic_rows, dose_rows,
                                         has_controls, instrument_rows, mitigation_rows, population_rows, prior_rows,
                                         risk_rows, stage1_rows)
from reid_batch.reporting.text import attack_terms_text, nested


def table_markdown(header: list[str], rows: list[list[str]]) -> str:
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
    lines.append(table_markdown(header, rows) if rows else (document.get("instrument") or {}).get("note", ""))
    lines += ["", measured_in(document), ""]
    header, rows = prior_rows(document)
    if rows:
        lines += ["### The generator prior", "", table_markdown(header, rows), ""]
    lines += ["### Calibration", ""]
    header, rows = calibration_rows(document)
    lines.append(table_markdown(header, rows))
    lines += ["", "## Risk summary", ""]
    rows = risk_rows(document)
    if rows:
        lines.append(table_markdown(list(rows[0]), [list(r.values()) for r in rows]))
    lines += [""] + [f"- {interpretation(n, e)}" for n, e in document["targets"].items()]
    if has_controls(document):
        lines += ["", "## Controls: targets known to leak", ""]
        for title, (header, rows) in (("Identity classes", control_rows(document)),
                                      ("Canaries", canary_rows(document)),
                                      ("Dose-response", dose_rows(document)),
                                      ("Cohort skew", population_rows(document))):
            if rows:
                lines += [f"### {title}", "", table_markdown(header, rows), ""]
        lines += [f"- {control_sentence(n, c)}" for n, c in (document.get("controls") or {}).items()]
        lines += [f"- {canary_sentence(n, c)}" for n, c in (document.get("canaries") or {}).items()]
    if document["mitigation"]["shown"]:
        lines += ["", "## Mitigations: utility and risk side by side", ""]
        header, rows = mitigation_rows(document)
        lines.append(table_markdown(header, rows))
        sentences = defence_sentences(document)
        if sentences:
            lines += [""] + [f"- {s}" for s in sentences]
        lines += ["", f"Risk vs utility plot: `{MITIGATION_FIGURE}`."]
    lines += ["", "## Attack objective terms", ""]
    lines += [f"- {n}: {attack_terms_text(nested(e, 'metrics', 'attack_terms'))}" for n, e in document["targets"].items()]
    lines += ["", "## Stage 1 comparison", ""]
    header, rows = stage1_rows(document)
    lines.append(table_markdown(header, rows))
    for name, entry in document["targets"].items():
        lines += ["", f"## {name}: demographics of likely samples", ""]
        header, rows = demographic_rows(sorted(entry["samples"], key=lambda s: s["id"])[:HTML_MAX_SAMPLES])
        lines.append(table_markdown(header, rows) if rows else "No likely samples.")
        notes = (entry["metrics"].get("notes") or []) + (nested(entry, "metrics", "stage1", "notes") or [])
        lines += [""] + [f"- Note: {n}" for n in notes]
    lines += ["", "## What these numbers show and do not show", ""]
    lines.append(table_markdown(["Number", "Shows", "Does not show"],
                                [[m["metric"], m["shows"], m["does_not_show"]] for m in document["meanings"]]))
    lines += ["", "## Software", ""]
    lines.append(table_markdown(["Package", "Version (report)"],
                                [[k, str(v)] for k, v in document["software"]["report"].items()]))
    return "\n".join(lines) + "\n"
