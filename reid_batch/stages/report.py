"""`reid-batch report`: read what `evaluate` and `calibrate` committed and write one risk report.

Reads `<target>/evaluation/` and `<target>/calibration/` of every target (or one), the control models' and baselines'
candidates (the second null and the paired change of a defence), and the embedding's and demographic model's
metrics.json; writes `<run>/report/` (or `<run>/report-<target>/`): report.html, report.md, report.json. A committed
report is re-rendered only when an evaluation it was made from has changed since (commit markers). What the numbers
mean: docs/method.md; the pieces of the report: reid_batch.reporting. Imports no torch.
"""

from __future__ import annotations

from reid_batch import log
from reid_batch.analysis.leak import control_leak, defence_change
from reid_batch.errors import InputError
from reid_batch.layout import (CALIBRATION_FIGURE, CALIBRATION_FILE, DEMOGRAPHICS_PREFIX, FIGURES, HTML_FILE,
                               JSON_FILE, LEAK_CANDIDATES_FILE, MARKDOWN_FILE, METRICS_FILE, MITIGATION_FIGURE,
                               MODEL_METRICS_FILE, PRIOR_QUALITY_FILE, PRIOR_QUALITY_PREFIX, PRIOR_QUALITY_STRIP,
                               RECORDS_FILE, REID_PREFIX, TABLE_FILE, calibration_prefix, evaluation_prefix, pair_key,
                               report_prefix)
from reid_batch.manifest import Manifest
from reid_batch.reporting.document import ReportInputs, build_report
from reid_batch.reporting.figures import mitigation_png
from reid_batch.reporting.html import render_html
from reid_batch.reporting.markdown import render_markdown
from reid_batch.reporting.verdicts import attack_ranking, choose_control
from reid_batch.results import Calibration, Evaluation, read
from reid_batch.storage import run_store


def _control_leaks(store, manifest: Manifest, evaluations: dict[str, Evaluation], controls: dict[str, Evaluation]
                   ) -> dict[str, dict]:
    """Per target with a leak statistic: L of its attacked candidates against its control model's, on its records."""
    settings = manifest.evaluation
    leaks = {}
    for name, evaluation in evaluations.items():
        control = choose_control(evaluation, {**controls, name: evaluation})
        if control is None or not evaluation.leak.available:
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


def _defence_changes(store, manifest: Manifest, evaluations: dict[str, Evaluation]) -> dict[str, dict]:
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
        theirs = evaluations.get(baseline) or read(Evaluation, store, f"{evaluation_prefix(baseline)}/{METRICS_FILE}")
        ranking = attack_ranking(theirs.attacks)
        mode = ranking[0]["mode"] if ranking else "study"
        if not theirs.leak.available or not evaluations[name].leak.available:
            result = {"available": False, "mode": mode, "reason": "membership is not available for both targets"}
        else:
            mine, other = evaluation_prefix(name), evaluation_prefix(baseline)
            result = defence_change(mode, table(f"{mine}/{RECORDS_FILE}"), table(f"{other}/{RECORDS_FILE}"),
                                    table(f"{mine}/{LEAK_CANDIDATES_FILE}"), table(f"{other}/{LEAK_CANDIDATES_FILE}"),
                                    bootstrap=settings.leak_bootstrap, permutations=settings.leak_permutations,
                                    seed=settings.seed)
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
    for key in (REID_PREFIX, PRIOR_QUALITY_PREFIX):  # the instrument section reads them: new ones, a new report
        if store.is_committed(key):
            inputs[key] = store.read_commit(key)["created"]
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
        evaluations[name] = read(Evaluation, store, f"{base}/{METRICS_FILE}")
        tables[name] = store.read_parquet(f"{base}/{TABLE_FILE}").to_pandas()
        figures[name] = {key: store.read_bytes(f"{base}/{path}") for key, path in FIGURES.items()
                         if store.exists(f"{base}/{path}")}
        calibrations[name] = read(Calibration, store, f"{calibration_prefix(name)}/{CALIBRATION_FILE}")
        if store.exists(f"{calibration_prefix(name)}/{CALIBRATION_FIGURE}"):
            figures[name]["dose_response"] = store.read_bytes(f"{calibration_prefix(name)}/{CALIBRATION_FIGURE}")
        pairs[name] = {int(i): store.read_bytes(f"{base}/{pair_key(int(i))}") for i in tables[name]["id"]
                       if store.exists(f"{base}/{pair_key(int(i))}")}
    model_metrics = f"{DEMOGRAPHICS_PREFIX}/{MODEL_METRICS_FILE}"
    demographic_model = store.read_json(model_metrics) \
        if store.is_committed(DEMOGRAPHICS_PREFIX) and store.exists(model_metrics) else None
    reid_metrics = f"{REID_PREFIX}/{MODEL_METRICS_FILE}"
    reid_model = store.read_json(reid_metrics) if store.is_committed(REID_PREFIX) and store.exists(reid_metrics) else None
    # A control model reported beside its targets is read once.
    control_evaluations = {n: evaluations.get(n) or read(Evaluation, store, f"{evaluation_prefix(n)}/{METRICS_FILE}")
                           for n in controls}
    made_from = ReportInputs(evaluations=evaluations, tables=tables, calibrations=calibrations,
                             control_leaks=_control_leaks(store, manifest, evaluations, control_evaluations),
                             defence_changes=_defence_changes(store, manifest, evaluations),
                             demographic_model=demographic_model, reid_model=reid_model)
    document = build_report(manifest.run_id, made_from, manifest.model_dump(mode="json"))
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
