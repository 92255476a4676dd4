"""`reid-batch bench`: the measurement runs and reports sane numbers, FLOPs are counted right, the baseline (the
study's way) computes exactly what the fast path computes, and selection at scale equals a plain numpy reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from reid_batch import bench, cli
from reid_batch.attack.generation import target_input_spec
from reid_batch.manifest import load_manifest, parse_manifest
from reid_batch.models.pggan import generator_to_unit
from reid_batch.models.targets import to_target_input
from reid_batch.runtime import run_store
from reid_batch.stages import select as selection

REPO = Path(__file__).resolve().parents[1]
VIT = {"name": "vit", "arch": "vit_custom", "train": {"preset": "normal", "epochs": 1}, "input": {"size": 32},
       "vit": {"patch_size": 8, "num_layers": 2, "num_heads": 2, "hidden_dim": 16, "mlp_dim": 32}}


def tiny_document(output: Path) -> dict:
    document = yaml.safe_load((REPO / "manifests" / "demo.yaml").read_text())
    document["output"] = {"uri": str(output)}
    document["targets"] = [{**document["targets"][0], "input": {"size": 32, "channels": 3}}, VIT]
    document["generator"].update(latent_dim=16, depths=[32, 16, 8], out_channels=1)
    document["sampling"].update(batch_size=8, seed=3)
    return document


@pytest.fixture
def manifest_path(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_document(tmp_path / "runs")))
    return path


@pytest.mark.slow
def test_bench_sample_cli_writes_json_with_positive_figures(manifest_path, tmp_path, capsys):
    out = tmp_path / "bench.json"
    # A fast batch smaller than the baseline's 8 and more baseline batches than fast ones: both get their ids.
    code = cli.main(["bench", str(manifest_path), "--stage", "sample", "--device", "cpu", "--batches", "2",
                     "--batch-size", "2", "--baseline-batches", "3", "--peak-size", "512", "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["stage"] == "sample" and result["target"] == "cnn"
    assert "randomly initialised" in result["models"]["generator"] and "randomly initialised" in result["models"]["target"]
    for key in ("candidates_per_second", "mfu", "flops_per_candidate", "speedup"):
        assert result[key] > 0, key
    assert 0 < result["mfu"] < 1 and 0 < result["baseline"]["mfu"] < 1
    assert result["peak"]["flops_per_second"] > 0 and result["peak"]["dtype"] == "float32"
    assert result["peak"]["size"] == 512 and len(result["peak"]["measurements"]) == 2
    for part, batches in (("fast", 2), ("baseline", 3)):
        assert result[part]["items"] == batches * result[part]["batch_size"] and result[part]["rss_peak_mib"] > 0
    assert result["baseline"]["batch_size"] == 8 and result["fast"]["batch_size"] == 2
    assert "candidates/s" in capsys.readouterr().out
    assert not (tmp_path / "runs" / "demo").exists() or not any((tmp_path / "runs" / "demo").rglob("*.parquet"))


def test_flop_counter_matches_the_formula():
    linear = torch.nn.Linear(64, 32)
    assert bench.count_flops(lambda: linear(torch.randn(10, 64))) == 2 * 10 * 64 * 32
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    assert bench.count_flops(lambda: conv(torch.randn(2, 3, 16, 16))) == 2 * 2 * 8 * 16 * 16 * 3 * 3 * 3


@pytest.mark.parametrize("target", ["cnn", "vit"])
def test_baseline_and_fast_path_give_the_same_statistics(tmp_path, target):
    document = tiny_document(tmp_path / "runs")
    if target == "cnn":
        document["selection"]["mahalanobis"] = {"covariance": "diagonal"}
    else:
        document["selection"]["mahalanobis"] = {"covariance": "ledoit_wolf"}
    manifest = parse_manifest(document)
    spec = manifest.target(target)
    device = torch.device("cpu")
    models = bench.load_models(manifest, spec, device)
    if target == "cnn":  # BatchNorm statistics of some "training data", so the terms are not trivial
        models.target.train()
        with torch.no_grad():
            for _ in range(3):
                models.target(torch.rand(8, 3, 32, 32) * 2 - 1)
        models.target.eval()
    fast = bench.fast_scorer(manifest, spec, models, device)
    baseline = bench.BaselineScorer(models.generator.requires_grad_(True), models.target, spec,
                                    reference=models.reference, gaussian=fast.gaussian,
                                    num_classes=models.num_classes, seed=manifest.sampling.seed, device=device)
    ids = np.arange(100, 124)
    fast_columns, _ = fast.score(ids, shard=0)
    slow_columns = {}
    for at in range(0, len(ids), 8):  # the baseline's batch of 8
        for key, values in baseline.score(ids[at:at + 8]).items():
            slow_columns.setdefault(key, []).append(values)
    slow_columns = {k: np.concatenate(v) for k, v in slow_columns.items()}
    fast.objective.close()
    baseline.close()
    assert set(slow_columns) == set(fast_columns)
    assert fast.terms == baseline.terms and len(fast.terms) >= 3
    np.testing.assert_array_equal(slow_columns["id"], ids)
    np.testing.assert_array_equal(slow_columns["class"], fast_columns["class"])
    for key in fast_columns:
        if key not in ("id", "shard", "class"):
            np.testing.assert_allclose(slow_columns[key], fast_columns[key], rtol=2e-4, atol=1e-5, err_msg=key)
    assert np.ptp(fast_columns["mahalanobis"]) > 0 and np.ptp(fast_columns["objective_total"]) > 0


def test_select_on_synthetic_shards_equals_numpy(tmp_path):
    document = tiny_document(tmp_path / "runs")
    document["selection"] = {"rule": "quantile", "objective_quantile": 0.1, "mahalanobis_quantile": 0.2}
    rows, files = 5003, 7
    manifest = bench.select_manifest(parse_manifest(document), str(tmp_path / "sel"), rows, files)
    spec = manifest.targets[0]
    store = run_store(manifest)
    bench.synthetic_candidate_shards(store, spec.name, rows, files, seed=1, row_group_size=97)
    record = selection.select_target(manifest, spec)

    tables = [pq.read_table(p).to_pandas() for p in sorted((tmp_path / "sel").rglob("candidates.parquet"))]
    assert len(tables) == files
    objective = np.concatenate([t["objective_total"].to_numpy(np.float64) for t in tables])
    distance = np.concatenate([t["mahalanobis"].to_numpy(np.float64) for t in tables])
    ids = np.concatenate([t["id"].to_numpy() for t in tables])
    order = np.argsort(ids)
    objective, distance = objective[order], distance[order]
    t_o = np.sort(objective)[int(np.ceil(0.1 * rows)) - 1]
    t_m = np.sort(distance)[int(np.ceil(0.2 * rows)) - 1]
    expected = np.flatnonzero((objective <= t_o) & (distance <= t_m))
    selected = pq.read_table(store.path(f"{spec.name}/selection/selected.parquet"), filesystem=store.filesystem)
    assert selected.column("id").to_numpy().tolist() == expected.tolist()
    np.testing.assert_array_equal(selected.column("objective_total").to_numpy(), objective[expected].astype(np.float32))
    np.testing.assert_array_equal(selected.column("mahalanobis").to_numpy(), distance[expected])
    assert record["thresholds"] == {"objective_total": t_o, "mahalanobis": t_m}
    assert record["counts"]["selected"] == len(expected) > 0


def test_bench_select_reports_rows_per_second(manifest_path, tmp_path):
    from reid_batch.manifest import load_manifest

    result = bench.run(load_manifest(manifest_path, schema_only=True), stage="select", rows=20000, files=4,
                       workdir=str(tmp_path), json_out=str(tmp_path / "select.json"))
    assert result["rows"] == 20000 and result["rows_per_second"] > 0 and result["rss_peak_mib"] > 0
    assert json.loads((tmp_path / "select.json").read_text())["selected"] == result["selected"] > 0


def test_chunk_writer_commits_in_order_in_the_background_and_reports_failures():
    import threading
    import time

    from reid_batch.stages.sample import ChunkWriter

    done, threads = [], set()

    def commit(i):
        def run():
            time.sleep(0.02)
            threads.add(threading.current_thread().name)
            done.append(i)
        return run

    writer = ChunkWriter()
    for i in range(5):
        writer.submit(commit(i))
    writer.close()
    assert done == list(range(5)) and all(name.startswith("chunk-writer") for name in threads)

    def broken():
        raise OSError("disk full")

    writer = ChunkWriter()
    writer.submit(broken)
    with pytest.raises(OSError, match="disk full"):
        writer.submit(commit(9))
        writer.submit(commit(10))
        writer.close()


def test_bench_finetune_times_the_real_step(tmp_path):
    document = tiny_document(tmp_path / "runs")
    document["finetune"].update(batch_size=4)
    result = bench.run(parse_manifest(document), stage="finetune", device="cpu", steps=2)
    assert result["processes"] == 1 and result["steps"] == 2 and result["batch_size"] == 4
    assert result["steps_per_second"] > 0 and result["images_per_second"] == pytest.approx(4 * result["steps_per_second"])


def test_bench_ppa_times_batched_and_one_by_one_optimisation(manifest_path, tmp_path, capsys):
    out = tmp_path / "ppa.json"
    code = cli.main(["bench", str(manifest_path), "--stage", "ppa", "--device", "cpu", "--steps", "2",
                     "--batch-size", "4", "--baseline-batches", "2", "--peak-size", "512", "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["stage"] == "ppa" and result["fast"]["latents"] == 4 and result["baseline"]["latents"] == 2
    assert result["fast"]["steps"] == result["baseline"]["steps"] == 2
    # One latent-step is a generator and target forward and backward to the input only (the weights are frozen):
    # twice the forward alone, where training the weights too would cost three times.
    manifest = load_manifest(manifest_path, schema_only=True)
    models = bench.load_models(manifest, manifest.targets[0], torch.device("cpu"), random_init=True)
    z = torch.randn(1, manifest.generator.latent_dim)
    forward = bench.count_flops(lambda: models.target(to_target_input(
        generator_to_unit(models.generator(z), (0.0, 1.0)), target_input_spec(manifest.targets[0]))))
    assert 1.9 * forward < result["flops_per_latent_step"] < 2.5 * forward and 0 < result["mfu"] < 1 and 0 < result["baseline"]["mfu"] < 1
    assert result["speedup"] == pytest.approx(result["latent_steps_per_second"]
                                              / result["baseline"]["latent_steps_per_second"])
    assert "latent-steps/s" in capsys.readouterr().out
