"""Stage 2, selection: the "likely" candidates, low on BOTH the objective total and the Mahalanobis distance.

The rule itself (ranks, quantiles, the three rules) is reid_batch.attack.selection, shared with evaluate.

Input: every shard of `<target>/candidates/` (see sample.py). Selection refuses to run while any shard lacks its
`_SHARD.json` marker, naming those shards, and checks that the shards together hold each id
0..num_candidates-1 exactly once. It reads only three columns (id, objective_total, mahalanobis) of every chunk
with pyarrow and places each value at its id, so everything below depends on the multiset of (id, scores) only:
the same candidates give the same selection whatever the number of shards, chunks or processes that made them.

Mahalanobis consistency: every shard records the fingerprint of the Gaussian it scored against; selection refuses
(InputError) when they differ, since distances to different Gaussians cannot be ranked together. It cannot happen in
a normal run: every shard derives or reads the same one (reid_batch.attack.reference).

Scores: a candidate with a non-finite score (NaN or infinity) is counted (`non_finite`) and never selected.

Ranks: rank_objective and rank_mahalanobis are 1 for the lowest value, ordinal, ties broken by the lower id;
rank_combined = rank_objective + rank_mahalanobis. "Best by combined rank" orders by (rank_combined, id).

Rules (`selection.rule`):
  quantile  low on a score = at or below that score's EXACT q-quantile over all finite candidates, the order
            statistic x_(k) with k = ceil(q * n) (numpy's `inverted_cdf`: an observed value, no interpolation, no
            approximate sketch); selected = low on both. With q_o = q_m = q, at most q * n candidates are selected,
            and only as many as the two scores agree on.
  top_k     the k best by combined rank among candidates finite on both.
  absolute  objective_total <= objective_max and mahalanobis <= mahalanobis_max.
`selection.max_selected` then keeps the best by combined rank. thresholds.json reports, for every rule, the
thresholds that bound the selection (for top_k: the largest objective and Mahalanobis value among those selected)
and the counts: candidates, non_finite, low_objective and low_mahalanobis (at or below each threshold), both,
selected (after the cap).

Output `<target>/selection/` (committed): selected.parquet, the full candidate rows of the selected ids sorted by
id, plus rank_objective, rank_mahalanobis, rank_combined (int64); thresholds.json. A committed selection is left
as it is; delete it to select again (e.g. with other rule settings).
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from reid_batch import log
from reid_batch.attack.selection import QUANTILE_METHOD, committed_summaries, read_scores, select_candidates
from reid_batch.errors import InputError
from reid_batch.layout import SELECTION_FILE, THRESHOLDS_FILE, candidates_prefix, selection_prefix
from reid_batch.manifest import Manifest, TargetSpec
from reid_batch.runtime import run_single_writer, run_store

# ------------------------------------------------------------------------------------------------ reading shards


def read_selected_rows(store, summaries: dict[int, dict], selected: np.ndarray) -> pa.Table:
    """Full candidate rows of the selected ids, read only from the chunks that hold them, sorted by id."""
    parts = []
    wanted = pa.array(selected, type=pa.int64())
    for shard in sorted(summaries):
        for chunk in summaries[shard]["chunks"]:
            lo, hi = np.searchsorted(selected, [chunk["first_id"], chunk["stop_id"]])
            if hi > lo:
                ids = selected[lo:hi]
                table = store.read_parquet_row_groups(chunk["key"], lambda parquet: _row_groups_holding(parquet, ids))
                parts.append(table.filter(pc.is_in(table.column("id"), value_set=wanted)))
    if not parts:
        return None
    return pa.concat_tables(parts).sort_by("id")


def _row_groups_holding(parquet: pq.ParquetFile, ids: np.ndarray) -> list[int]:
    """Row groups whose id range (from their statistics) may hold one of the sorted ids; all if none are known."""
    metadata = parquet.metadata
    column = parquet.schema_arrow.get_field_index("id")
    groups = []
    for g in range(metadata.num_row_groups):
        stats = metadata.row_group(g).column(column).statistics
        if stats is None or not stats.has_min_max:
            return list(range(metadata.num_row_groups))
        lo, hi = np.searchsorted(ids, [stats.min, stats.max + 1])
        if hi > lo:
            groups.append(g)
    return groups


def mahalanobis_consistency(summaries: dict[int, dict]) -> dict:
    fingerprints = sorted({f for s in summaries.values() for f in s.get("mahalanobis_fingerprints", [])})
    first = summaries[min(summaries)]["mahalanobis"] if summaries else {}
    return {"consistent": len(fingerprints) <= 1, "fingerprints": fingerprints, "model": first}


# ------------------------------------------------------------------------------------------------ the shell


def select_target(manifest: Manifest, spec: TargetSpec) -> dict | None:
    store = run_store(manifest)
    prefix = selection_prefix(spec.name)
    if store.is_committed(prefix):
        log.event("select_skipped", target=spec.name, reason="already committed")
        return store.read_json(f"{prefix}/{THRESHOLDS_FILE}")
    sampling, settings = manifest.sampling, manifest.selection
    summaries = committed_summaries(store, spec.name, sampling.num_candidates, sampling.num_shards)
    consistency = mahalanobis_consistency(summaries)
    if not consistency["consistent"]:
        # Every shard reads one Gaussian (the target's running statistics, or the committed Ledoit-Wolf reference):
        # different fingerprints mean candidates from different Gaussians, whose distances cannot be ranked together.
        raise InputError(
            f"the shards' candidates were scored against different Mahalanobis Gaussians (fingerprints "
            f"{', '.join(consistency['fingerprints'])}); delete the target's candidates/ (and mahalanobis-reference/ "
            "if it is not the one you want) and sample again", where=store.uri(candidates_prefix(spec.name)))
    objective, distance = read_scores(store, summaries, sampling.num_candidates)
    chosen = select_candidates(objective, distance, settings)
    selected = chosen["selected"]
    rank_o, rank_m, combined = chosen["ranks"]
    rows = read_selected_rows(store, summaries, selected)
    if rows is None:
        rows = pa.Table.from_batches([], schema=_schema_of(store, summaries))
    rows = rows.append_column("rank_objective", pa.array(rank_o, pa.int64()))
    rows = rows.append_column("rank_mahalanobis", pa.array(rank_m, pa.int64()))
    rows = rows.append_column("rank_combined", pa.array(combined, pa.int64()))
    record = {
        "target": spec.name,
        "rule": settings.rule,
        "settings": settings.model_dump(mode="json"),
        "quantile_method": f"exact order statistic x_(ceil(q n)) (numpy {QUANTILE_METHOD})",
        "thresholds": chosen["thresholds"],
        "counts": chosen["counts"],
        "capped": chosen["capped"],
        "shards": sampling.num_shards,
        "mahalanobis": consistency,
    }
    with store.committed(prefix, {"stage": "select", "target": spec.name, "selected": len(selected)}) as out:
        with out.parquet_writer(SELECTION_FILE, rows.schema, max(1, sampling.row_group_size)) as writer:
            writer.write_table(rows)
        out.write_json(THRESHOLDS_FILE, record)
    log.event("select_done", target=spec.name, rule=settings.rule, **chosen["counts"],
              objective_threshold=_rounded(chosen["thresholds"]["objective_total"]),
              mahalanobis_threshold=_rounded(chosen["thresholds"]["mahalanobis"]))
    return record


def _schema_of(store, summaries: dict[int, dict]) -> pa.Schema:
    first = summaries[min(summaries)]["chunks"][0]["key"]
    return store.read_parquet_schema(first)


def _rounded(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, 6)


def select(manifest: Manifest, target: str | None = None) -> int:
    """`reid-batch select`: stage 2's selection for one target (None = every target)."""
    return run_single_writer(manifest, target, lambda spec: select_target(manifest, spec))
