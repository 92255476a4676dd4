"""Candidate sampling: id layout, resumable chunks on local disk and S3, Mahalanobis, multi-process, flat memory.

The shared builders (tiny checkpoints, the manifest) are in helpers.py.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from reid_batch import layout
from reid_batch.analysis import metrics
from reid_batch.attack import candidates, generation, mahalanobis, reference
from reid_batch.errors import InputError
from reid_batch.runtime import run_store
from reid_batch.stages import sample as sampling
from helpers import HostWork, all_rows, build_inputs, commit_finetuned, make_manifest, tiny_generator

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ builders


def output_location(kind: str, tmp_path: Path, request) -> tuple[str, str | None]:
    if kind == "local":
        return str(tmp_path / "out"), None
    uri, settings = request.getfixturevalue("s3_bucket")
    return uri, settings.endpoint


def object_versions(manifest, s3_client=None) -> dict[str, tuple]:
    """key -> (etag, last modified) on S3, or (size, mtime_ns) locally, for every object under the run."""
    store = run_store(manifest)
    if store.is_local:
        root = Path(store.root)
        return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}
    bucket, prefix = store.root.split("/", 1)
    found = {}
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            found[item["Key"]] = (item["ETag"], item["LastModified"])
    return found


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    return build_inputs(tmp_path_factory.mktemp("inputs"))


# ------------------------------------------------------------------------------------------------ pure pieces


@pytest.mark.parametrize("num_candidates", [1, 7, 24, 1000, 1001])
def test_shards_partition_ids_like_array_split(num_candidates):
    for num_shards in {1, 2, 3, 7, min(num_candidates, 13)}:
        if num_shards > num_candidates:
            continue
        expected = np.array_split(np.arange(num_candidates), num_shards)
        bounds = [layout.shard_bounds(num_candidates, num_shards, i) for i in range(num_shards)]
        assert [list(range(a, b)) for a, b in bounds] == [e.tolist() for e in expected]
    with pytest.raises(ValueError):
        layout.shard_bounds(10, 3, 3)


def test_chunks_cover_a_shard_in_order():
    chunks = layout.chunk_bounds(10, 23, 5)
    assert chunks == [(0, 10, 15), (1, 15, 20), (2, 20, 23)]
    assert layout.chunk_bounds(4, 4, 5) == []


def test_pixel_entropy_matches_skimage_on_8bit_images():
    from skimage.measure import shannon_entropy

    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.random((5, 1, 17, 13), dtype=np.float32))
    images[1] = 0.5  # one grey level: 0 bits
    images[2, 0, :8] = 0.0  # two-level image
    images[2, 0, 8:] = 1.0
    ours = metrics.pixel_entropy_on_device(images).numpy()
    reference = [shannon_entropy((images[i, 0].numpy() * 255).round().astype(np.uint8), base=2) for i in range(5)]
    np.testing.assert_allclose(ours, reference, atol=1e-9)
    assert ours[1] == 0.0 and ours[0] > 7.0
    stats = candidates.image_statistics(images)
    np.testing.assert_allclose(stats["image_std"].numpy(), images.flatten(1).numpy().std(1), rtol=1e-5)


def test_candidate_regenerated_alone_equals_it_within_its_batch(inputs):
    from reid_batch.models.pggan import load_generator

    generator, _ = load_generator(inputs["finetuned"], format="reid")
    batch = generation.regenerate_images(generator, np.arange(100, 164), seed=7, device=torch.device("cpu"))
    for k in (100, 131, 163):
        alone = generation.regenerate_images(generator, [k], seed=7, device=torch.device("cpu"))
        torch.testing.assert_close(alone[0], batch[k - 100], atol=1e-5, rtol=1e-5)
    other_seed = generation.regenerate_images(generator, [100], seed=8, device=torch.device("cpu"))
    assert not torch.allclose(other_seed[0], batch[0], atol=1e-3)


def test_auto_batch_size_halves_on_cuda_out_of_memory_and_keeps_every_item():
    sizer = generation.BatchSizer("auto", torch.device("cuda"), largest_useful=100)
    assert sizer.size == 128  # the power of two that covers a process's share of a chunk
    seen = []

    def work(batch):  # stands in for a GPU whose memory holds at most 24 candidates
        if len(batch) > 24:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        seen.append(batch.tolist())
        return len(batch)

    assert sum(sizer.run(np.arange(100), work)) == 100
    assert sizer.size == 16 and [i for b in seen for i in b] == list(range(100))
    assert generation.BatchSizer("auto", torch.device("cpu"), 5000).size == 256
    # On a CPU, auto keeps batch x pixels within a cache-sized budget: 256 small images, 2 at 1024 px, at least 1
    assert generation.BatchSizer("auto", torch.device("cpu"), 5000, pixels_per_item=32 * 32).size == 256
    assert generation.BatchSizer("auto", torch.device("cpu"), 5000, pixels_per_item=1024 * 1024).size == 2
    assert generation.BatchSizer("auto", torch.device("cpu"), 5000, pixels_per_item=300 * 300).size == 16
    assert generation.BatchSizer("auto", torch.device("cpu"), 5000, pixels_per_item=4096 * 4096).size == 1
    fixed = generation.BatchSizer(32, torch.device("cuda"), 100)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        fixed.run(np.arange(100), work)  # an explicit batch size is the user's choice: never changed



def test_auto_batch_size_on_cuda_comes_from_free_memory_and_a_measured_footprint():
    """`auto` on CUDA started at 4096 whatever the GPU and the images. It now measures one item's footprint on a
    probe batch and fills AUTO_MEMORY_FILL of the free memory (numbers injected; the reader is CudaMemory on a GPU)."""
    mib, gib = 2 ** 20, 2 ** 30
    assert generation.size_from_memory(10 * gib, 30 * mib, largest_useful=100_000) == 256  # 8 GiB / 30 MiB = 273
    assert generation.size_from_memory(10 * gib, 30 * mib, largest_useful=100) == 128  # no more than a share needs
    assert generation.size_from_memory(80 * gib, 1024, largest_useful=100_000) == generation.MAX_AUTO_BATCH_SIZE
    assert generation.size_from_memory(1 * gib, 4 * gib, largest_useful=100) == 1  # never 0

    class FakeGpu:  # 2 GiB free; the work allocates 40 MiB per item
        def __init__(self):
            self.allocated, self.peak = 0, 0

        def free_bytes(self):
            return 2 * gib

        def begin(self):
            self.peak = 0

        def peak_bytes(self):
            return self.peak

    gpu, batches = FakeGpu(), []

    def work(batch):
        gpu.peak = max(gpu.peak, 40 * mib * len(batch))
        batches.append(len(batch))
        return batch

    sizer = generation.BatchSizer("auto", torch.device("cuda"), largest_useful=1000, memory=gpu)
    assert sizer.size == 1024  # before the probe: the power of two covering a share
    done = sizer.run(np.arange(200), work)
    assert sizer.bytes_per_item == 40 * mib and sizer.size == 32  # 0.8 * 2 GiB / 40 MiB = 40.96 -> 32
    assert batches == [8, 32, 32, 32, 32, 32, 32] and np.concatenate(done).tolist() == list(range(200))
    # A CPU keeps its pixel budget and never probes.
    cpu = generation.BatchSizer("auto", torch.device("cpu"), 1000, pixels_per_item=64 * 64)
    assert cpu.memory is None and cpu.size == generation.CPU_BATCH_SIZE


def test_auto_batch_size_grows_back_after_a_transient_out_of_memory():
    """One transient out-of-memory halved `auto` for the rest of the run. Now GROW_AFTER_SUCCESSES good batches in
    a row double it again, up to its start; a regrown size that fails again waits twice as long before the next
    try, so a real limit costs ever fewer failed batches."""
    grow = generation.GROW_AFTER_SUCCESSES
    sizer = generation.BatchSizer("auto", torch.device("cuda"), largest_useful=32, memory=None)
    failures = iter([True])  # the first batch hits someone else's spike; the GPU is fine afterwards

    def transient(batch):
        if next(failures, False):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (transient)")
        return len(batch)

    assert sum(sizer.run(np.arange(16 * grow + 32 * 3), transient)) == 16 * grow + 32 * 3
    assert sizer.size == 32

    limited = generation.BatchSizer("auto", torch.device("cuda"), largest_useful=32, memory=None)
    sizes = []

    def at_most_16(batch):
        sizes.append(len(batch))
        if len(batch) > 16:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (a stand-in limit)")
        return len(batch)

    total = 16 * grow + 16 * 2 * grow + 32  # fails at 32, regrows after `grow`, fails, regrows after 2 x grow, fails
    assert sum(limited.run(np.arange(total), at_most_16)) == total
    failed = [i for i, n in enumerate(sizes) if n > 16]
    assert failed == [0, 1 + grow, 2 + 3 * grow] and limited.size == 16 and limited.grow_after == 4 * grow


class _SmallMemoryGenerator(torch.nn.Module):
    """A generator on a GPU whose memory holds `limit` images: larger batches raise CUDA's out-of-memory error."""

    def __init__(self, inner, limit: int):
        super().__init__()
        self.inner, self.config, self.limit, self.batches = inner, inner.config, limit, []

    def forward(self, latents):
        self.batches.append(len(latents))
        if len(latents) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (a stand-in limit)")
        return self.inner(latents)


def test_evaluate_generation_goes_through_the_sizer_and_survives_out_of_memory():
    """evaluate generated its image sets at a fixed 64 per batch, outside any out-of-memory handling. It now renders
    through the sizer: an `auto` one halves until a batch fits and the images are those of one big batch."""
    from reid_batch.analysis.metrics import to_grey
    from reid_batch.evaluation.images import generate

    inner = tiny_generator(0).eval()
    generator = _SmallMemoryGenerator(inner, limit=4)
    sizer = generation.BatchSizer("auto", torch.device("cuda"), largest_useful=12)  # adaptive: starts at 16
    ids = np.arange(100, 112)
    images = generate(generator, ids, seed=7, device=torch.device("cpu"), sizer=sizer)
    assert generator.batches == [12, 8, 4, 4, 4] and sizer.size == 4
    expected = to_grey(generation.regenerate_images(inner, ids, seed=7, device=torch.device("cpu")))
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=1e-5)


def test_generated_features_retry_a_batch_without_counting_it_twice():
    """The leak candidates' features (and, in the same pass, their predicted demographics) go through the sizer: a
    batch that runs out of memory in the feature model is retried smaller, and the second measure (each_batch) sees
    every image exactly once."""
    generator = tiny_generator(1).eval()
    sizer = generation.BatchSizer("auto", torch.device("cuda"), largest_useful=10)
    feature_batches, seen = [], []

    def features(grey):  # a feature model on a GPU whose memory holds 3 images
        feature_batches.append(len(grey))
        if len(grey) > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (a stand-in limit)")
        return grey.flatten(1).numpy()

    ids = np.arange(10)
    got = generation.generated_features(generator, ids, 7, torch.device("cpu"), features=features, sizer=sizer,
                                        each_batch=lambda images: seen.append(len(images)))
    assert feature_batches == [10, 8, 4, 2, 2, 2, 2, 2] and sizer.size == 2
    assert seen == [2] * 5 and got.shape[0] == 10
    whole = generation.regenerate_images(generator, ids, 7, torch.device("cpu")).flatten(1).numpy()
    np.testing.assert_allclose(got, whole, atol=1e-5)
    with pytest.raises(torch.cuda.OutOfMemoryError):  # a fixed batch size is the user's choice: never changed
        generation.generated_features(generator, ids, 7, torch.device("cpu"), features=features,
                                      sizer=generation.BatchSizer(8, torch.device("cuda"), 10))


# ------------------------------------------------------------------------------------------------ Mahalanobis


def _spd(d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.5 * np.eye(d)


def test_mahalanobis_full_and_diagonal_match_scipy():
    from scipy.spatial.distance import mahalanobis as scipy_mahalanobis

    rng = np.random.default_rng(1)
    d = 6
    mean, cov = rng.normal(size=d), _spd(d, 2)
    x = rng.normal(size=(9, d)) * 3
    model = mahalanobis.from_gaussian(torch.from_numpy(mean), torch.from_numpy(cov), epsilon=1e-9)
    expected = [scipy_mahalanobis(row, mean, np.linalg.inv(cov)) for row in x]
    np.testing.assert_allclose(model.distances(torch.from_numpy(x)).numpy(), expected, rtol=1e-10)
    assert model.regularisation["applied"] is False and not model.diagonal

    var = rng.uniform(0.1, 4.0, size=d)
    diagonal = mahalanobis.from_gaussian(torch.from_numpy(mean), torch.from_numpy(var), epsilon=1e-9)
    expected = [scipy_mahalanobis(row, mean, np.diag(1 / var)) for row in x]
    np.testing.assert_allclose(diagonal.distances(torch.from_numpy(x).float()).numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(mahalanobis.mahalanobis(torch.from_numpy(x), torch.from_numpy(mean), torch.from_numpy(cov)),
                               model.distances(torch.from_numpy(x)))


def test_singular_covariance_is_regularised_and_reported():
    from scipy.spatial.distance import mahalanobis as scipy_mahalanobis

    rng = np.random.default_rng(3)
    basis = rng.normal(size=(5, 2))
    cov = basis @ basis.T  # rank 2 of 5: singular
    mean = rng.normal(size=5)
    model = mahalanobis.from_gaussian(torch.from_numpy(mean), torch.from_numpy(cov), epsilon=1e-3, source="test")
    record = model.regularisation
    ridge = 1e-3 * np.trace(cov) / 5
    assert record["applied"] is True and record["ridge"] == pytest.approx(ridge)
    assert record["condition_number"] is None or record["condition_number"] > 1e6
    assert record["condition_number_used"] < 1e5
    x = rng.normal(size=(4, 5))
    expected = [scipy_mahalanobis(row, mean, np.linalg.inv(cov + ridge * np.eye(5))) for row in x]
    np.testing.assert_allclose(model.distances(torch.from_numpy(x)).numpy(), expected, rtol=1e-8)
    assert model.summary()["regularisation"]["applied"] is True

    dead_channel = mahalanobis.from_gaussian(torch.zeros(3), torch.tensor([1.0, 0.0, 2.0]), epsilon=1e-4)
    assert dead_channel.regularisation["applied"] and torch.isfinite(dead_channel.distances(torch.ones(2, 3))).all()
    with pytest.raises(ValueError, match="non-finite"):
        mahalanobis.from_gaussian(torch.zeros(2), torch.tensor([1.0, float("nan")]))


def test_ledoit_wolf_model_equals_sklearn_estimate():
    from scipy.spatial.distance import mahalanobis as scipy_mahalanobis
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(4)
    reference = rng.normal(size=(12, 20)) @ rng.normal(size=(20, 20))  # fewer samples than dimensions
    model = mahalanobis.fit_ledoit_wolf(reference, epsilon=1e-12)
    estimate = LedoitWolf().fit(reference)
    x = rng.normal(size=(3, 20))
    expected = [scipy_mahalanobis(row, estimate.location_, np.linalg.inv(estimate.covariance_)) for row in x]
    np.testing.assert_allclose(model.distances(torch.from_numpy(x)).numpy(), expected, rtol=1e-6)
    assert model.details["reference_count"] == 12 and 0 < model.details["shrinkage"] <= 1


# ------------------------------------------------------------------------------------------------ the stage


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_every_id_once_and_finished_shards_untouched(kind, inputs, tmp_path, request):
    output, endpoint = output_location(kind, tmp_path, request)
    manifest = make_manifest(inputs, output, endpoint, sampling_options={"num_shards": 3, "num_candidates": 3 * 7})
    commit_finetuned(manifest, inputs)
    assert sampling.sample(manifest) == 0

    rows = all_rows(manifest)
    assert rows["id"].tolist() == list(range(21))
    assert rows.groupby("shard")["id"].agg(list).tolist() == [list(range(0, 7)), list(range(7, 14)), list(range(14, 21))]
    expected_columns = ["id", "shard", "class", "logit", "probability", "term_bn_stats", "term_feature_stats",
                        "term_logits", "objective_total", "mahalanobis", "image_mean", "image_std", "pixel_entropy"]
    assert list(rows.columns) == expected_columns  # tv is excluded, as in the study
    weights = manifest.targets[0].terms
    recomputed = sum(weights[t] * rows[f"term_{t}"] for t in ("bn_stats", "feature_stats", "logits"))
    np.testing.assert_allclose(rows["objective_total"], recomputed, rtol=1e-5)
    assert np.isfinite(rows.drop(columns=["id", "shard", "class"]).to_numpy()).all()
    np.testing.assert_allclose(rows["probability"], 1 / (1 + np.exp(-rows["logit"])), rtol=1e-5)
    assert ((rows["logit"] > 0).astype(int) == rows["class"]).all()

    store = run_store(manifest)
    summary = store.read_json("cnn/candidates/shard=1/_SHARD.json")
    assert summary["rows"] == 7 and [c["rows"] for c in summary["chunks"]] == [5, 2]
    assert summary["mahalanobis"]["source"].startswith("last BatchNorm2d")
    assert "regularisation" in summary["mahalanobis"]
    first_chunk = pq.ParquetFile(store.path(summary["chunks"][0]["key"]), filesystem=store.filesystem)
    assert [first_chunk.metadata.row_group(i).num_rows for i in range(first_chunk.num_row_groups)] == [3, 2]

    before = object_versions(manifest, request.getfixturevalue("s3_client") if kind == "s3" else None)
    time.sleep(1.1)  # S3 LastModified has one-second resolution
    assert sampling.sample(manifest) == 0
    assert object_versions(manifest, request.getfixturevalue("s3_client") if kind == "s3" else None) == before


_KILLABLE = """
import json, sys
from reid_batch.manifest import parse_manifest
from reid_batch.stages.sample import sample
sample(parse_manifest(json.load(open(sys.argv[1]))), shard=0)
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["local", "s3"])
def test_shard_killed_mid_way_resumes_to_the_clean_result(kind, inputs, tmp_path, request):
    options = {"num_shards": 2, "num_candidates": 24, "chunk_size": 2, "batch_size": 2}
    output, endpoint = output_location(kind, tmp_path, request)
    manifest = make_manifest(inputs, output, endpoint, sampling_options=options)
    commit_finetuned(manifest, inputs)
    store = run_store(manifest)
    manifest_file = tmp_path / "manifest.json"
    manifest_file.write_text(json.dumps(manifest.model_dump(mode="json")))
    process = subprocess.Popen([sys.executable, "-c", _KILLABLE, str(manifest_file)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not store.is_committed("cnn/candidates/shard=0/chunk=0") and time.time() < deadline:
            assert process.poll() is None, "the sampler ended before its first chunk was committed"
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not store.exists("cnn/candidates/shard=0/_SHARD.json"), "killed too late to test a resume"
    committed_before = [k for k in store.list("cnn/candidates/shard=0") if k.endswith("_COMMITTED")]
    assert 1 <= len(committed_before) < 6

    assert sampling.sample(manifest, shard=0) == 0
    sampling.sample(manifest, shard=1)
    resumed = all_rows(manifest)

    clean = make_manifest(inputs, str(tmp_path / "clean"), sampling_options=options)
    commit_finetuned(clean, inputs)
    sampling.sample(clean)
    expected = all_rows(clean)
    assert resumed["id"].tolist() == list(range(24))
    assert resumed.columns.tolist() == expected.columns.tolist()
    np.testing.assert_allclose(resumed.to_numpy(dtype=np.float64), expected.to_numpy(dtype=np.float64), rtol=1e-4, atol=1e-5)
    chunk_files = [k for k in store.list("cnn/candidates/shard=0") if k.endswith(".parquet")]
    assert len(chunk_files) == 6  # no leftover file from the killed run


def test_changed_plan_is_refused(inputs, tmp_path):
    manifest = make_manifest(inputs, str(tmp_path / "out"), sampling_options={"num_candidates": 6, "num_shards": 1})
    commit_finetuned(manifest, inputs)
    sampling.sample(manifest)
    changed = make_manifest(inputs, str(tmp_path / "out"), sampling_options={"num_candidates": 6, "num_shards": 1, "seed": 8})
    with pytest.raises(InputError, match="different plan.*seed"):
        sampling.sample(changed)
    with pytest.raises(InputError, match="outside"):
        sampling.sample(manifest, shard=1)
    # The numerics are part of the plan: rows from a bf16 GPU must not be topped up on another device.
    store = run_store(manifest)
    summary_key = "cnn/candidates/shard=0/_SHARD.json"
    summary = store.read_json(summary_key)
    assert summary["plan"]["compute"] == {"device": "cpu", "mixed_precision": "no", "compile": False, "tf32": None}
    summary["plan"]["compute"] = {"device": "NVIDIA H100 80GB HBM3", "mixed_precision": "bf16", "compile": True, "tf32": True}
    store.write_json(summary_key, summary)
    with pytest.raises(InputError, match="different plan.*compute"):
        sampling.sample(manifest)


def test_saved_images_are_the_regenerated_candidates_and_rows_match_a_lone_rescore(inputs, tmp_path):
    from PIL import Image

    from reid_batch.models.pggan import load_generator

    manifest = make_manifest(inputs, str(tmp_path / "out"),
                             sampling_options={"num_candidates": 10, "num_shards": 2, "save_images": True})
    commit_finetuned(manifest, inputs)
    sampling.sample(manifest)
    store = run_store(manifest)
    generator, _ = load_generator(inputs["finetuned"], format="reid")
    rows = all_rows(manifest)
    for k, shard in ((0, 0), (7, 1)):
        png = Image.open(store.path(layout.image_key("cnn", shard, k)))
        image = generation.regenerate_images(generator, [k], seed=7, device=torch.device("cpu"))[0, 0]
        np.testing.assert_array_equal(np.asarray(png), (image.numpy() * 255).round().astype(np.uint8))
    assert len(store.list("cnn/candidates-images")) == 10

    # Candidate 7 scored alone gives the row it got inside its batch.
    from reid_batch.artifacts import load_attack_target
    from reid_batch.attack.objectives import TargetObjective

    spec = manifest.targets[0]
    model, classes = load_attack_target(manifest, spec)
    with TargetObjective(model, spec.terms, spec.objective) as objective:
        gaussian = reference.feature_gaussian(manifest, spec, objective, None, None)
        scorer = candidates.CandidateScorer(generator, objective, input_spec=generation.target_input_spec(spec),
                                            gaussian=gaussian, num_classes=classes, seed=7, device=torch.device("cpu"))
        alone, _ = scorer.score(np.array([7]), shard=1)
    row = rows[rows["id"] == 7].iloc[0]
    for column in ("objective_total", "mahalanobis", "logit", "pixel_entropy", "image_mean"):
        assert alone[column][0] == pytest.approx(row[column], rel=1e-4, abs=1e-6), column


def test_sampling_loop_leaves_png_encoding_to_the_writer_thread(inputs, tmp_path, monkeypatch):
    """save_images encoded each PNG in the GPU loop, after a copy of the batch and one per image (each a wait for
    the device). The loop now only starts the batch's copy; the chunk writer's thread encodes and writes, ahead of
    the chunk's commit. Three batches cost the loop no more host copies than one, and every image is saved."""
    main_thread = {}
    for count in (4, 12):
        manifest = make_manifest(inputs, str(tmp_path / f"n{count}"),
                                 sampling_options={"num_candidates": count, "num_shards": 1, "chunk_size": 12,
                                                   "batch_size": 4, "save_images": True})
        commit_finetuned(manifest, inputs)
        with pytest.MonkeyPatch.context() as patch:
            work = HostWork(patch)
            sampling.sample(manifest)
        main_thread[count] = work.on_main_thread()
        assert sum(n for name, n in work.pngs.items() if name.startswith("chunk-writer")) == count
        assert len(run_store(manifest).list("cnn/candidates-images")) == count
    assert main_thread[12] == main_thread[4] and main_thread[4][1] == 0, main_thread


def test_vit_target_with_ledoit_wolf_gaussian(inputs, tmp_path):
    selection = {"rule": "quantile", "mahalanobis": {"covariance": "ledoit_wolf", "reference_images": 12}}
    manifest = make_manifest(inputs, str(tmp_path / "out"), target="vit", selection=selection,
                             sampling_options={"num_candidates": 9, "num_shards": 1})
    commit_finetuned(manifest, inputs)
    sampling.sample(manifest)
    rows = all_rows(manifest, "vit")
    assert rows["id"].tolist() == list(range(9))
    assert {"term_ln_stats", "term_cls_magnitude", "term_attn_entropy", "term_attn_diversity"} <= set(rows.columns)
    assert "term_tv" not in rows.columns
    assert np.isfinite(rows["mahalanobis"]).all() and (rows["mahalanobis"] > 0).all()
    summary = run_store(manifest).read_json("vit/candidates/shard=0/_SHARD.json")
    assert summary["mahalanobis"]["covariance"] == "full"
    assert summary["mahalanobis"]["reference_count"] == 12


_TWO_PROCESSES = """
import json, sys
from accelerate import PartialState
from reid_batch.manifest import parse_manifest
from reid_batch.stages.sample import sample
sample(parse_manifest(json.load(open(sys.argv[1]))))
assert PartialState().num_processes == 2, PartialState()
"""


@pytest.mark.slow
def test_two_processes_write_the_rows_of_one(inputs, tmp_path):
    options = {"num_candidates": 11, "num_shards": 1, "chunk_size": 5}
    manifest = make_manifest(inputs, str(tmp_path / "two"), sampling_options=options)
    commit_finetuned(manifest, inputs)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest.model_dump(mode="json")))
    (tmp_path / "two_processes.py").write_text(_TWO_PROCESSES)
    torchrun = Path(sys.executable).with_name("torchrun")
    result = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2",
                             str(tmp_path / "two_processes.py"), str(tmp_path / "manifest.json")],
                            cwd=REPO, env={**os.environ, "ACCELERATE_USE_CPU": "true"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = run_store(manifest).read_json("cnn/candidates/shard=0/_SHARD.json")
    assert summary["last_run"]["processes"] == 2
    single = make_manifest(inputs, str(tmp_path / "one"), sampling_options=options)
    commit_finetuned(single, inputs)
    sampling.sample(single)
    two, one = all_rows(manifest), all_rows(single)
    assert two["id"].tolist() == list(range(11))
    np.testing.assert_allclose(two.to_numpy(dtype=np.float64), one.to_numpy(dtype=np.float64), rtol=1e-4, atol=1e-5)


_PEAK_RSS = """
import json, resource, sys
from reid_batch.cli import keep_freed_memory
keep_freed_memory()  # as every reid-batch process does: kept freed memory must not grow with the candidates either
from reid_batch.manifest import parse_manifest
from reid_batch.stages.sample import sample
from reid_batch import artifacts
from reid_batch.attack import candidates
from reid_batch.attack import generation
from reid_batch import layout
from reid_batch.analysis import metrics
from reid_batch.attack import reference
sample(parse_manifest(json.load(open(sys.argv[1]))))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_number_of_candidates(inputs, tmp_path):
    peaks = {}
    for count in (40, 400):
        manifest = make_manifest(inputs, str(tmp_path / f"n{count}"), target="vit",
                                 sampling_options={"num_candidates": count, "num_shards": 1, "chunk_size": 20,
                                                   "batch_size": 20, "row_group_size": 20})
        commit_finetuned(manifest, inputs)
        (tmp_path / f"n{count}.json").write_text(json.dumps(manifest.model_dump(mode="json")))
        result = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(tmp_path / f"n{count}.json")], cwd=REPO,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        peaks[count] = int(result.stdout.split()[-1])
        assert len(all_rows(manifest, "vit")) == count
    print(f"peak RSS (KiB) by number of candidates: {peaks}")
    assert peaks[400] < 1.10 * peaks[40], peaks


def test_a_generator_that_fails_to_compile_falls_back_to_eager_and_says_so(monkeypatch, capsys):
    """sampling.compile: compile errors surface at the first call (torch.compile is lazy); prepare_models makes that
    call itself, so a failing compiler costs the eager speed, not the shard."""
    from reid_batch.models.pggan import PGGANConfig, PGGANGenerator

    generator = PGGANGenerator(PGGANConfig(latent_dim=8, depths=(8, 4), out_channels=1)).eval()
    target = torch.nn.Conv2d(1, 1, 1)

    def broken_compile(model, **_):
        def run(*args, **kwargs):
            raise RuntimeError("InductorError: no working C compiler found")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    prepared, _ = generation.prepare_models(generator, target, torch.device("cpu"), compile=True)
    assert prepared is generator
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    failed = [e for e in events if e["event"] == "compile_failed"]
    assert len(failed) == 1 and "no working C compiler" in failed[0]["error"] and failed[0]["fallback"] == "eager"

    calls = []

    def working_compile(model, **_):
        def run(*args, **kwargs):
            calls.append(args[0].shape)
            return model(*args, **kwargs)
        return run

    monkeypatch.setattr(torch, "compile", working_compile)
    prepared, _ = generation.prepare_models(generator, target, torch.device("cpu"), compile=True)
    assert prepared is not generator and calls == [(2, 8)]  # warmed up once, on two latents


def test_one_compiled_graph_serves_every_batch_size(monkeypatch):
    """sampling.compile: Dynamo specialised the warm-up's batch of 2, recompiled at the first real size and again
    for a last batch of 1 (3 compilations, minutes each on a GPU). With the batch dimension marked dynamic and a
    lone latent run as a pair, the warm-up's graph serves 8, 5, 1 and 3 (a counting backend stands in for inductor:
    when to recompile is Dynamo's decision, not the backend's), and renders what the eager generator renders."""
    from reid_batch.models.pggan import PGGANConfig, PGGANGenerator

    torch.manual_seed(0)
    generator = PGGANGenerator(PGGANConfig(latent_dim=8, depths=(8, 4), out_channels=1)).eval()
    eager = copy.deepcopy(generator)
    compilations = []

    def counting_backend(graph, example_inputs):
        compilations.append([tuple(x.shape) for x in example_inputs if isinstance(x, torch.Tensor)][:1])
        return graph.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend=counting_backend, **kw))
    torch._dynamo.reset()
    try:
        prepared, _ = generation.prepare_models(generator, torch.nn.Conv2d(1, 1, 1), torch.device("cpu"), compile=True)
        assert len(compilations) == 1  # the warm-up
        for size in (8, 5, 1, 3):
            ids = np.arange(size)
            got = generation.regenerate_images(prepared, ids, seed=3, device=torch.device("cpu"))
            want = generation.regenerate_images(eager, ids, seed=3, device=torch.device("cpu"))
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert len(compilations) == 1, compilations
    finally:
        torch._dynamo.reset()


def test_ledoit_wolf_reference_images_go_through_the_sizer_and_survive_out_of_memory(inputs, tmp_path):
    """The reference images of selection.mahalanobis ledoit_wolf were generated in a loop at the sizer's first size,
    outside its out-of-memory handling (at 1024 px, batch 4096 is far beyond any GPU). An `auto` sizer now halves on
    out-of-memory there too (forced here by an objective that fails above 4 images) and fits the same Gaussian."""
    from accelerate import Accelerator

    from reid_batch.artifacts import load_attack_target
    from reid_batch.attack.objectives import TargetObjective

    selection = {"rule": "quantile", "mahalanobis": {"covariance": "ledoit_wolf", "reference_images": 12}}
    manifest = make_manifest(inputs, str(tmp_path / "out"), selection=selection)
    spec = manifest.targets[0]
    model, _ = load_attack_target(manifest, spec)
    accelerator = Accelerator(cpu=True)
    sizes = []

    with TargetObjective(model, spec.terms, spec.objective) as objective:
        def small_memory(target_input, **kwargs):
            sizes.append(len(target_input))
            if len(target_input) > 4:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (a stand-in limit)")
            return objective(target_input, **kwargs)

        small_memory.feature_prior = objective.feature_prior
        sizer = generation.BatchSizer("auto", torch.device("cuda"), largest_useful=12)  # adaptive: starts at 16
        halved = reference.fit_ledoit_wolf_reference(manifest, spec, small_memory, accelerator, sizer)
        fixed = generation.BatchSizer(12, torch.device("cpu"), 12)
        whole = reference.fit_ledoit_wolf_reference(manifest, spec, objective, accelerator, fixed)
    assert sizes == [12, 8, 4, 4, 4] and sizer.size == 4
    probe = torch.randn(5, halved.dim)
    torch.testing.assert_close(halved.distances(probe), whole.distances(probe), rtol=1e-4, atol=1e-4)


def test_every_stage_renders_a_candidate_the_same_way_whatever_the_mixed_precision(inputs, tmp_path, monkeypatch):
    """Sampling rendered candidates under bf16 autocast, score and evaluate re-rendered them in float32: the images
    reported were not the ones whose statistics selected them. Now the generator always renders in float32 and
    only the target runs under autocast. CPU bf16 autocast stands in for CUDA's here."""
    import contextlib

    from reid_batch.artifacts import load_attack_target
    from reid_batch.attack.objectives import TargetObjective
    from reid_batch.models.pggan import load_generator

    def cpu_autocast(device, mixed_precision):
        if mixed_precision == "no":
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=torch.bfloat16)

    monkeypatch.setattr(candidates, "autocast_context", cpu_autocast)
    monkeypatch.setattr(generation, "autocast_context", cpu_autocast)
    manifest = make_manifest(inputs, str(tmp_path / "out"))
    spec = manifest.targets[0]
    generator, _ = load_generator(inputs["finetuned"], format="reid")
    model, classes = load_attack_target(manifest, spec)
    ids = np.array([3, 11, 40])
    rendered = generation.regenerate_images(generator, ids, 7, torch.device("cpu"))  # what score/evaluate render
    logits = {}
    with TargetObjective(model, spec.terms, spec.objective) as objective:
        gaussian = reference.feature_gaussian(manifest, spec, objective, None, None)
        for precision in ("no", "bf16"):
            scorer = candidates.CandidateScorer(generator, objective, input_spec=generation.target_input_spec(spec),
                                                gaussian=gaussian, num_classes=classes, seed=7,
                                                device=torch.device("cpu"), mixed_precision=precision)
            columns, images = scorer.score(ids, shard=0, keep_images=True)
            assert torch.equal(images, rendered), precision  # bit for bit, in either precision
            logits[precision] = columns["logit"]
    assert not np.array_equal(logits["no"], logits["bf16"])  # the target did run in bf16


def _count_ledoit_wolf_fits(monkeypatch) -> list:
    """Counts calls of the real Ledoit-Wolf fit (it still runs)."""
    fits = []
    real = mahalanobis.fit_ledoit_wolf

    def counted(*args, **kwargs):
        fits.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(mahalanobis, "fit_ledoit_wolf", counted)
    return fits


def test_shards_of_a_target_score_against_one_committed_ledoit_wolf_gaussian_fitted_once(inputs, tmp_path,
                                                                                        monkeypatch):
    """Each shard fitted its own Ledoit-Wolf Gaussian (on a GPU: TF32, algorithm choice, another GPU after a resume).
    Now it is fitted once and committed: the mahalanobis-reference stage fits it (as the cluster plan runs it,
    before the sample array), and shards run one after the other as array tasks read it without fitting; without
    that stage, the first shard fits and commits it and the next one reads it."""
    from reid_batch.stages import mahalanobis_reference, select

    selection = {"rule": "quantile", "mahalanobis": {"covariance": "ledoit_wolf", "reference_images": 12}}
    options = {"num_candidates": 8, "num_shards": 2, "chunk_size": 4}
    fits = _count_ledoit_wolf_fits(monkeypatch)

    planned = make_manifest(inputs, str(tmp_path / "planned"), selection=selection, sampling_options=options)
    commit_finetuned(planned, inputs)
    assert mahalanobis_reference.run(planned) == 0
    assert len(fits) == 1
    store = run_store(planned)
    prefix = layout.mahalanobis_reference_prefix("cnn")
    committed = store.read_commit(prefix)["metadata"]["fingerprint"]
    assert mahalanobis_reference.run(planned) == 0 and len(fits) == 1  # found committed: not fitted again
    for shard in (0, 1):  # as two array tasks
        sampling.sample(planned, shard=shard)
    assert len(fits) == 1
    for shard in (0, 1):
        summary = store.read_json(f"cnn/candidates/shard={shard}/_SHARD.json")
        assert summary["mahalanobis"]["fingerprint"] == committed
        assert summary["mahalanobis_fingerprints"] == [committed]

    alone = make_manifest(inputs, str(tmp_path / "alone"), selection=selection, sampling_options=options)
    commit_finetuned(alone, inputs)
    sampling.sample(alone, shard=1)
    assert len(fits) == 2  # the first shard to need it fits it...
    sampling.sample(alone, shard=0)
    assert len(fits) == 2  # ...and the second reads the commit
    store = run_store(alone)
    fingerprints = {store.read_json(f"cnn/candidates/shard={k}/_SHARD.json")["mahalanobis"]["fingerprint"]
                    for k in (0, 1)}
    assert fingerprints == {store.read_commit(prefix)["metadata"]["fingerprint"]}
    assert select.select(alone) == 0
    # The same Gaussian gives the same bytes (safetensors wrote its metadata map in hash order: bytes differed).
    stored = store.read_bytes(f"{prefix}/{layout.GAUSSIAN_FILE}")
    assert reference._gaussian_bytes(reference.read_committed_ledoit_wolf(
        store, alone.targets[0], store.read_commit(prefix)["metadata"]["identity"])) == stored

    # A committed reference fitted for other settings is refused, never silently replaced or mixed.
    changed = make_manifest(inputs, str(tmp_path / "alone"), sampling_options=options,
                            selection={**selection, "mahalanobis": {"covariance": "ledoit_wolf",
                                                                    "reference_images": 10}})
    with pytest.raises(InputError, match="Ledoit-Wolf reference of a different plan.*mahalanobis"):
        mahalanobis_reference.run(changed)


def test_select_refuses_shards_scored_against_different_gaussians(inputs, tmp_path):
    """Every shard now reads one Gaussian, so differing fingerprints can no longer happen legitimately: select fails
    (exit 2) instead of warning and ranking distances to different Gaussians together."""
    from reid_batch.stages import select

    manifest = make_manifest(inputs, str(tmp_path / "out"), sampling_options={"num_candidates": 6, "num_shards": 2})
    commit_finetuned(manifest, inputs)
    sampling.sample(manifest)
    store = run_store(manifest)
    key = "cnn/candidates/shard=1/_SHARD.json"
    summary = store.read_json(key)
    summary["mahalanobis_fingerprints"] = ["0123456789abcdef"]  # as if scored on a Gaussian of its own
    store.write_json(key, summary)
    with pytest.raises(InputError, match="different Mahalanobis Gaussians.*0123456789abcdef"):
        select.select(manifest)
    assert not store.is_committed("cnn/selection")
