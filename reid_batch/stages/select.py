"""Stage 2, selection: the "likely" candidates, low on BOTH the objective total and the Mahalanobis distance.

Input: every shard of `<target>/candidates/` (see sample.py). Selection refuses to run while any shard lacks its
`_SHARD.json` marker, naming those shards, and checks that the shards together hold each id
0..num_candidates-1 exactly once. It reads only three columns (id, objective_total, mahalanobis) of every chunk
with pyarrow and places each value at its id, so everything below depends on the multiset of (id, scores) only:
the same candidates give the same selection whatever the number of shards, chunks or processes that made them.

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
from reid_batch.artifacts import read_shard_summaries
from reid_batch.errors import InputError
from reid_batch.layout import SELECTION_FILE, THRESHOLDS_FILE, candidates_prefix, selection_prefix
from reid_batch.manifest import Manifest, SelectionSpec, TargetSpec
from reid_batch.runtime import run_single_writer, run_store

QUANTILE_METHOD = "inverted_cdf"


# ------------------------------------------------------------------------------------------------ pure core


def ordinal_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of values (index = id) ascending, ties by lower index; non-finite values rank after all finite."""
    values = np.asarray(values, dtype=np.float64)
    # Non-finite values become +inf, above every finite value; a stable sort breaks ties by index. One stable
    # argsort, several times faster than a three-key lexsort at 10^7 values.
    order = np.argsort(np.where(np.isfinite(values), values, np.inf), kind="stable")
    ranks = np.empty(len(values), dtype=np.int64)
    ranks[order] = np.arange(1, len(values) + 1)
    return ranks


def ranks_at(values: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """ordinal_ranks(values)[ids] without ranking every value: one unstable sort and a search per id, ties among
    equal values resolved by id only where they occur (10^7 values: one sort instead of one stable argsort)."""
    values = np.asarray(values, dtype=np.float64)
    ids = np.asarray(ids, dtype=np.int64)
    if 8 * len(ids) > len(values):
        return ordinal_ranks(values)[ids]
    keys = np.where(np.isfinite(values), values, np.inf)
    ordered = np.sort(keys)
    at = keys[ids]
    below = np.searchsorted(ordered, at, side="left")
    tied = np.searchsorted(ordered, at, side="right") - below > 1
    before = np.zeros(len(ids), dtype=np.int64)
    if tied.any():  # float32 scores repeat at 10^7 candidates: count, per tied id, the lower ids of equal value
        shared = np.unique(at[tied])
        slot = np.minimum(np.searchsorted(shared, keys), len(shared) - 1)
        holders = np.flatnonzero(shared[slot] == keys)  # every id holding one of those values, ascending
        order = np.argsort(keys[holders], kind="stable")  # by value, ids ascending within a value
        position = np.empty(len(holders), dtype=np.int64)
        position[order] = np.arange(len(holders))
        first = np.searchsorted(keys[holders][order], at[tied], side="left")
        before[tied] = position[np.searchsorted(holders, ids[tied])] - first
    return below + before + 1


def exact_quantile(values: np.ndarray, q: float) -> float | None:
    """The order statistic x_(ceil(q n)) of the values (None when there are none)."""
    if len(values) == 0:
        return None
    return float(np.quantile(values, q, method=QUANTILE_METHOD))


def select_candidates(objective: np.ndarray, distance: np.ndarray, settings: SelectionSpec) -> dict:
    """Which candidates are likely. objective, distance: (N,) indexed by id.

    Returns {"selected": sorted ids, "ranks": (rank_objective, rank_mahalanobis, rank_combined) of the selected
    ids, in that order, "thresholds": {...}, "counts": {...}, "capped": bool}. Only top_k ranks every candidate;
    the other rules rank only the candidates they keep (or cap).
    """
    objective = np.asarray(objective, dtype=np.float64)
    distance = np.asarray(distance, dtype=np.float64)
    n = len(objective)
    finite_o, finite_m = np.isfinite(objective), np.isfinite(distance)
    finite = finite_o & finite_m
    ids = np.arange(n, dtype=np.int64)

    def ranks(candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rank_o, rank_m = ranks_at(objective, candidates), ranks_at(distance, candidates)
        return rank_o, rank_m, rank_o + rank_m

    def best_first(candidates: np.ndarray) -> np.ndarray:
        return candidates[np.lexsort((candidates, ranks(candidates)[2]))]

    if settings.rule == "quantile":
        t_o = exact_quantile(objective[finite_o], settings.objective_quantile)
        t_m = exact_quantile(distance[finite_m], settings.mahalanobis_quantile)
    elif settings.rule == "absolute":
        t_o, t_m = float(settings.objective_max), float(settings.mahalanobis_max)
    else:
        chosen = best_first(ids[finite])[: settings.top_k]
        t_o = float(objective[chosen].max()) if len(chosen) else None
        t_m = float(distance[chosen].max()) if len(chosen) else None
    low_o = finite_o & (objective <= t_o) if t_o is not None else np.zeros(n, bool)
    low_m = finite_m & (distance <= t_m) if t_m is not None else np.zeros(n, bool)
    both = low_o & low_m
    if settings.rule == "top_k":
        selected = chosen
    else:
        selected = ids[both]
    before_cap = len(selected)
    capped = settings.max_selected is not None and before_cap > settings.max_selected
    if capped:
        selected = best_first(selected)[: settings.max_selected]
    counts = {
        "candidates": int(n),
        "non_finite": int(n - finite.sum()),
        "low_objective": int(low_o.sum()),
        "low_mahalanobis": int(low_m.sum()),
        "both": int(both.sum()),
        "before_cap": int(before_cap),
        "selected": int(len(selected)),
    }
    selected = np.sort(selected)
    return {
        "selected": selected,
        "ranks": ranks(selected),
        "thresholds": {"objective_total": t_o, "mahalanobis": t_m},
        "counts": counts,
        "capped": bool(capped),
    }


# ------------------------------------------------------------------------------------------------ reading shards


def committed_summaries(store, target: str, num_candidates: int, num_shards: int) -> dict[int, dict]:
    """Every shard's summary; InputError naming the shards not committed, or outputs of another layout."""
    summaries, missing = read_shard_summaries(store, target, num_shards)
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise InputError(f"{len(missing)} of {num_shards} shard(s) are not committed: {shown}; run "
                         f"`reid-batch sample --target {target} --shard <i>` for each", where=store.uri(candidates_prefix(target)))
    for shard, summary in summaries.items():
        plan = summary.get("plan", {})
        if plan.get("num_candidates") != num_candidates or plan.get("num_shards") != num_shards:
            raise InputError(f"shard {shard} was sampled with num_candidates={plan.get('num_candidates')}, "
                             f"num_shards={plan.get('num_shards')}; the manifest says {num_candidates}, {num_shards}",
                             where=store.uri(candidates_prefix(target)))
    return summaries


def read_scores(store, summaries: dict[int, dict], num_candidates: int) -> tuple[np.ndarray, np.ndarray]:
    """(objective_total, mahalanobis) indexed by id, from a column-only pass over every chunk."""
    objective = np.full(num_candidates, np.nan)
    distance = np.full(num_candidates, np.nan)
    seen = np.zeros(num_candidates, dtype=np.int64)
    for shard in sorted(summaries):
        for chunk in summaries[shard]["chunks"]:
            table = store.read_parquet(chunk["key"], columns=["id", "objective_total", "mahalanobis"])
            ids = table.column("id").to_numpy()
            if len(ids) and (ids.min() < 0 or ids.max() >= num_candidates):
                raise InputError(f"holds ids outside 0..{num_candidates - 1}", where=store.uri(chunk["key"]))
            objective[ids] = table.column("objective_total").to_numpy(zero_copy_only=False)
            distance[ids] = table.column("mahalanobis").to_numpy(zero_copy_only=False)
            np.add.at(seen, ids, 1)
    if (seen != 1).any():
        duplicated, absent = np.flatnonzero(seen > 1), np.flatnonzero(seen == 0)
        raise InputError(f"the shards do not hold every candidate exactly once: {len(duplicated)} id(s) repeated "
                         f"(e.g. {duplicated[:5].tolist()}), {len(absent)} missing (e.g. {absent[:5].tolist()})",
                         where="sampling")
    return objective, distance


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
    objective, distance = read_scores(store, summaries, sampling.num_candidates)
    chosen = select_candidates(objective, distance, settings)
    selected = chosen["selected"]
    consistency = mahalanobis_consistency(summaries)
    if not consistency["consistent"]:
        log.event("mahalanobis_reference_inconsistent", target=spec.name, fingerprints=consistency["fingerprints"],
                  reason="shards scored against different Gaussians; their distances are not exactly comparable")
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
