"""Selection: exact global thresholds, rules, independence from the number of shards, refusal of missing shards."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from reid_batch.errors import InputError
from reid_batch.manifest import SelectionSpec
from reid_batch.runtime import run_store
from reid_batch.stages import sample as sampling
from reid_batch.attack import selection as rule
from reid_batch.stages import select as selection
from helpers import all_rows, build_inputs, commit_finetuned, make_manifest


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return build_inputs(tmp_path_factory.mktemp("inputs"))


# ------------------------------------------------------------------------------------------------ pure rules


def test_ranks_are_ordinal_with_ties_by_id_and_non_finite_last():
    values = np.array([3.0, 1.0, np.nan, 1.0, -np.inf, 2.0])
    assert rule.ordinal_ranks(values).tolist() == [4, 1, 5, 2, 6, 3]


def test_ranks_of_a_few_ids_equal_the_full_ranking_with_ties_and_non_finite_values():
    rng = np.random.default_rng(3)
    values = rng.integers(0, 50, 4000).astype(np.float64)  # many ties
    values[rng.choice(4000, 40, replace=False)] = np.nan
    values[rng.choice(4000, 20, replace=False)] = np.inf
    values[rng.choice(4000, 20, replace=False)] = -np.inf
    full = rule.ordinal_ranks(values)
    for size in (1, 37, 400, 3000):
        ids = np.sort(rng.choice(4000, size, replace=False))
        assert rule.ranks_at(values, ids).tolist() == full[ids].tolist()


def test_quantile_rule_uses_exact_order_statistics():
    rng = np.random.default_rng(0)
    objective, distance = rng.normal(size=1000), rng.gamma(2.0, size=1000)
    objective[[5, 17]] = np.nan
    result = rule.select_candidates(objective, distance, SelectionSpec(objective_quantile=0.1, mahalanobis_quantile=0.2))
    finite = np.sort(objective[np.isfinite(objective)])
    assert result["thresholds"]["objective_total"] == finite[int(np.ceil(0.1 * 998)) - 1]
    assert result["thresholds"]["mahalanobis"] == np.sort(distance)[200 - 1]
    counts = result["counts"]
    assert counts["low_objective"] == 100 and counts["low_mahalanobis"] == 200 and counts["non_finite"] == 2
    expected = np.flatnonzero((objective <= result["thresholds"]["objective_total"])
                              & (distance <= result["thresholds"]["mahalanobis"]))
    assert result["selected"].tolist() == expected.tolist() and counts["selected"] == len(expected)
    assert 5 not in result["selected"] and 17 not in result["selected"]


def test_top_k_absolute_and_cap_keep_the_best_by_combined_rank():
    objective = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 9.0])
    distance = np.array([5.0, 0.1, 0.2, 0.3, 4.0, 0.0])
    # combined ranks: [1+6, 2+2, 3+3, 4+4, 5+5, 6+1] = [7, 4, 6, 8, 10, 7]
    top = rule.select_candidates(objective, distance, SelectionSpec(rule="top_k", top_k=3))
    assert top["selected"].tolist() == [0, 1, 2]  # 4, 6, then 7 (id 0 beats id 5 on the tie)
    assert top["thresholds"] == {"objective_total": 0.3, "mahalanobis": 5.0}
    absolute = rule.select_candidates(
        objective, distance, SelectionSpec(rule="absolute", objective_max=0.45, mahalanobis_max=1.0))
    assert absolute["selected"].tolist() == [1, 2, 3]
    capped = rule.select_candidates(
        objective, distance, SelectionSpec(rule="absolute", objective_max=0.45, mahalanobis_max=1.0, max_selected=2))
    assert capped["selected"].tolist() == [1, 2] and capped["capped"] and capped["counts"]["before_cap"] == 3
    nothing = rule.select_candidates(objective, distance, SelectionSpec(rule="absolute", objective_max=-1.0,
                                                                             mahalanobis_max=1.0))
    assert nothing["selected"].tolist() == [] and nothing["counts"]["both"] == 0


# ------------------------------------------------------------------------------------------------ the stage


def _selected(manifest):
    store = run_store(manifest)
    table = pq.read_table(store.path("cnn/selection/selected.parquet"), filesystem=store.filesystem)
    return table.to_pandas(), store.read_json("cnn/selection/thresholds.json")


def test_one_shard_and_seven_shards_select_the_same_ids(inputs, tmp_path, s3_bucket):
    uri, settings = s3_bucket
    options = {"num_candidates": 28, "chunk_size": 3}
    rule = {"rule": "quantile", "objective_quantile": 0.4, "mahalanobis_quantile": 0.5}
    one = make_manifest(inputs, str(tmp_path / "one"), sampling_options={**options, "num_shards": 1}, selection=rule)
    seven = make_manifest(inputs, uri, settings.endpoint, sampling_options={**options, "num_shards": 7}, selection=rule)
    for manifest in (one, seven):
        commit_finetuned(manifest, inputs)
        sampling.sample(manifest)
        assert selection.select(manifest) == 0
    (rows_one, record_one), (rows_seven, record_seven) = _selected(one), _selected(seven)
    assert len(rows_one) > 0
    assert rows_one["id"].tolist() == rows_seven["id"].tolist()
    assert record_one["counts"] == record_seven["counts"]
    assert record_one["thresholds"] == pytest.approx(record_seven["thresholds"], rel=1e-5)
    assert record_one["mahalanobis"]["consistent"] and record_seven["mahalanobis"]["consistent"]

    candidates = all_rows(one)
    t = record_one["thresholds"]
    expected = candidates[(candidates["objective_total"] <= t["objective_total"])
                          & (candidates["mahalanobis"] <= t["mahalanobis"])]["id"].tolist()
    assert rows_one["id"].tolist() == expected
    assert record_one["counts"]["low_objective"] == int(np.ceil(0.4 * 28))
    chosen = candidates.set_index("id").loc[rows_one["id"]]
    np.testing.assert_allclose(rows_one["objective_total"], chosen["objective_total"])
    ranks = candidates["objective_total"].rank(method="first").astype(int)
    assert rows_one["rank_objective"].tolist() == ranks[rows_one["id"]].tolist()
    assert (rows_one["rank_combined"] == rows_one["rank_objective"] + rows_one["rank_mahalanobis"]).all()


def test_selection_refuses_until_every_shard_is_committed(inputs, tmp_path):
    manifest = make_manifest(inputs, str(tmp_path / "out"), sampling_options={"num_candidates": 9, "num_shards": 3})
    commit_finetuned(manifest, inputs)
    sampling.sample(manifest, shard=1)
    with pytest.raises(InputError, match=r"2 of 3 shard\(s\) are not committed: 0, 2"):
        selection.select(manifest)
    assert not run_store(manifest).is_committed("cnn/selection")
    sampling.sample(manifest)
    selection.select(manifest)
    store = run_store(manifest)
    record = store.read_json("cnn/selection/thresholds.json")
    assert record["counts"]["candidates"] == 9
    marker = store.read_commit("cnn/selection")
    selection.select(manifest)  # committed: nothing changes
    assert store.read_commit("cnn/selection") == marker


def test_top_k_with_cap_writes_the_best_rows(inputs, tmp_path):
    manifest = make_manifest(inputs, str(tmp_path / "out"), sampling_options={"num_candidates": 12, "num_shards": 2},
                             selection={"rule": "top_k", "top_k": 5, "max_selected": 3})
    commit_finetuned(manifest, inputs)
    sampling.sample(manifest)
    selection.select(manifest)
    rows, record = _selected(manifest)
    candidates = all_rows(manifest)
    combined = (candidates["objective_total"].rank(method="first") + candidates["mahalanobis"].rank(method="first"))
    best = sorted(candidates.assign(c=combined).sort_values(["c", "id"])["id"].tolist()[:3])
    assert rows["id"].tolist() == best
    assert record["capped"] and record["counts"]["before_cap"] == 5 and record["counts"]["selected"] == 3
