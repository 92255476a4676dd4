"""`reid-batch bench`: a short, warmed-up measurement of the real code path, with the study's way as a baseline.

What is measured (all in one process, one after another, on the same machine):
  sample    candidates/s of `attack.candidates.CandidateScorer` (one generator + target forward per batch for every
            term, vectorised statistics, inference mode), and the same ids scored the study notebooks' way
            (`BaselineScorer`: batch 8, fp32, autograd on, one target forward per objective term, a per-sample
            Python loop for the Mahalanobis distance) -> speed-up ratio.
  finetune  steps/s and images/s of `stages.finetune.Finetuner.step` (the real training step, under whatever
            launcher started the process: run it under `torchrun --nproc_per_node 2` for 2 processes).
  select    rows/s of `stages.select` (thresholds + selection + reading the selected rows) over synthetic
            candidate shards written in the real layout (`--rows`, `--files`).
  ppa       latent-steps/s of `attack.ppa.optimise_latents` (per-sample latent optimisation: one generator and
            target forward and backward per latent and step), batched as the attack runs it, against the same
            latents optimised one at a time (a per-sample Python loop, the way model-inversion code is often
            written) -> speed-up ratio. MFU counts the FLOPs of one latent's step, forward and backward.

Model FLOPs utilisation (MFU) = achieved FLOP/s / peak FLOP/s. Achieved: the FLOPs of ONE generator + target
forward per candidate, counted once with torch.utils.flop_counter.FlopCounterMode, times candidates/s (the
baseline's redundant forwards are not counted: MFU measures useful work). Peak: a timed large matmul in the
dtype the fast path computes in (float32 on a CPU; bf16/fp16 under autocast on CUDA), measured in the same run.
Peak host memory is the process's ru_maxrss (so it includes imports and the model weights); GPU peak is
torch.cuda.max_memory_allocated.

Models: the run's own artifacts when they exist (fine-tuned generator, else the prior; the target's checkpoint or
trained weights); otherwise RANDOMLY INITIALISED models of the manifest's architectures, which cost exactly the
same FLOPs (the output says which was used). Nothing is written to the run's storage.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis
from torch.utils.flop_counter import FlopCounterMode

from reid_batch import layout, log
from reid_batch.artifacts import load_attack_target, load_finetuned_generator, load_prior, prior_config
from reid_batch.attack import candidates, generation, mahalanobis, ppa
from reid_batch.attack.candidates import candidate_schema, image_statistics, logit_columns
from reid_batch.attack.generation import regenerate_images, target_input_spec
from reid_batch.attack.objectives import SCORING_EXCLUDES, TargetObjective, compute_reference_stats
from reid_batch.errors import InputError
from reid_batch.manifest import Manifest, TargetSpec, parse_manifest
from reid_batch.models.pggan import PGGANGenerator, generator_to_unit, latents_for_ids
from reid_batch.models.targets import build_target, to_target_input
from reid_batch.runtime import pick_device, run_store
from reid_batch.stages import finetune as ft
from reid_batch.stages import select as selection

BASELINE_BATCH_SIZE = 8
CPU_MATMUL_SIZE = 2048
CUDA_MATMUL_SIZE = 8192


# ------------------------------------------------------------------------------------------------ measuring


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float | None:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss / 2**20


def _sync(device) -> None:

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs torch's flop counter attributes to one call of fn (matmuls and convolutions, forward only here)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def peak_matmul_flops(device, dtype, size: int | None = None, seconds: float = 1.0) -> dict:
    """FLOP/s of a timed square matmul (2 n^3 FLOPs each) in `dtype`: the device's practical peak."""
    n = size or (CUDA_MATMUL_SIZE if device.type == "cuda" else CPU_MATMUL_SIZE)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    with torch.inference_mode():
        for _ in range(2):
            a @ b
        _sync(device)
        calls, started = 0, time.perf_counter()
        while True:
            a @ b
            calls += 1
            if calls % 4 == 0 or device.type != "cuda":
                _sync(device)
                if time.perf_counter() - started >= seconds:
                    break
        elapsed = time.perf_counter() - started
    return {"size": n, "dtype": str(dtype).replace("torch.", ""), "flops_per_second": 2 * n**3 * calls / elapsed}


def timed(run_batch: Callable[[np.ndarray], Any], ids: np.ndarray, batch_size: int, batches: int, device,
          warmup: int = 1, finish: Callable[[], Any] | None = None) -> dict:
    """Run `warmup` batches untimed, then `batches` timed ones of consecutive ids, then `finish` (timed too);
    seconds and items/s."""
    at = 0

    def next_ids() -> np.ndarray:
        nonlocal at
        out = ids[at : at + batch_size]
        at += batch_size
        if len(out) < batch_size:
            raise ValueError("not enough ids for the batches asked for")
        return out

    for _ in range(warmup):
        run_batch(next_ids())
    _sync(device)
    started = time.perf_counter()
    for _ in range(batches):
        run_batch(next_ids())
    if finish is not None:
        finish()
    _sync(device)
    seconds = time.perf_counter() - started
    items = batches * batch_size
    return {"batches": batches, "batch_size": batch_size, "items": items, "seconds": round(seconds, 4),
            "items_per_second": items / seconds}


# ------------------------------------------------------------------------------------------------ models


@dataclass
class BenchModels:
    generator: Any
    target: Any
    num_classes: int
    reference: dict | None
    sources: dict[str, str]


def load_models(manifest: Manifest, spec: TargetSpec, device, random_init: bool = False) -> BenchModels:
    """The run's generator and target if they exist (and random_init is False), else random ones of its shapes."""
    torch.manual_seed(0)
    sources = {}
    generator = None
    if not random_init:
        for source, loader in (("fine-tuned generator of this run", lambda: load_finetuned_generator(manifest, spec.name)),
                               ("prior", lambda: load_prior(manifest))):
            try:
                generator, sources["generator"] = loader(), source
                break
            except (InputError, FileNotFoundError, OSError):
                continue
    if generator is None:
        generator = PGGANGenerator(prior_config(manifest))
        sources["generator"] = "randomly initialised (no artifact found)"
    target = None
    if not random_init:
        try:
            (target, num_classes), sources["target"] = load_attack_target(manifest, spec), "trained target"
        except (InputError, FileNotFoundError, OSError):
            target = None
    if target is None:
        vit = spec.vit.model_dump() if spec.vit is not None else {}
        target, num_classes = build_target(spec.arch, 1, image_size=spec.input.size, **vit), 1
        sources["target"] = "randomly initialised (no artifact found)"
    generator = generator.to(device).eval()
    target = target.to(device).eval().requires_grad_(False)
    reference = None
    if spec.family == "vit":
        reference = _bench_reference(manifest, spec, generator, target, device)
        sources["reference"] = "measured on 32 of the generator's own images (bench only)"
    return BenchModels(generator, target, num_classes, reference, sources)


def _bench_reference(manifest, spec, generator, target, device) -> dict:
    input_spec = target_input_spec(spec)
    batches = (to_target_input(regenerate_images(generator, np.arange(a, a + 8) + layout.MAHALANOBIS_REFERENCE_ID_OFFSET,
                                                 manifest.sampling.seed, device), input_spec, check_range=False)
               for a in range(0, 32, 8))
    return {k: v.to(device) for k, v in compute_reference_stats(target, batches).items()}


def bench_gaussian(manifest: Manifest, spec: TargetSpec, objective, models: BenchModels, device):
    """The Mahalanobis model the stage would use: the diagonal prior, or Ledoit-Wolf on 64 generator images."""
    settings = manifest.selection.mahalanobis
    if settings.covariance == "diagonal":
        mean, var = objective.feature_prior()
        return mahalanobis.from_gaussian(mean, var, settings.epsilon, "bench: target's own statistics")

    features = []
    with torch.inference_mode():
        for a in range(0, 64, 16):
            images = regenerate_images(models.generator, np.arange(a, a + 16) + layout.MAHALANOBIS_REFERENCE_ID_OFFSET,
                                       manifest.sampling.seed, device)
            features.append(objective(to_target_input(images, target_input_spec(spec), check_range=False),
                                      image01=images).features.float().cpu())
    return mahalanobis.fit_ledoit_wolf(torch.cat(features), settings.epsilon, "bench: Ledoit-Wolf on 64 images")


# ------------------------------------------------------------------------------------------------ the baseline


class BaselineScorer:
    """Candidates scored the way the study's notebooks did, for comparison: fp32, autograd ON (the generator's
    parameters require gradients, nothing runs under no_grad), a separate target forward per objective term
    (one single-term TargetObjective each), and the Mahalanobis distance per sample in a Python loop
    (scipy.spatial.distance.mahalanobis with the inverse covariance). Same definitions, so the same numbers."""

    def __init__(self, generator, target, spec: TargetSpec, *, reference, gaussian, num_classes: int, seed: int,
                 device):
        self.generator = generator
        self.device = device
        self.seed = seed
        self.input_spec = target_input_spec(spec)
        self.gaussian = gaussian
        weights = {t: w for t, w in spec.terms.items() if w > 0}
        self.weights = {t: w for t, w in weights.items() if t not in SCORING_EXCLUDES}
        self.objectives = {t: TargetObjective(target, {t: 1.0}, spec.objective, reference, family=spec.family)
                           for t in self.weights}
        # Any of them yields logits and features (a CNN objective always hooks the last BatchNorm).
        self.features_objective = next(iter(self.objectives.values()))
        self.num_classes = num_classes
        self.terms = list(self.objectives)
        self.schema = candidate_schema(num_classes, self.terms)
        mean = gaussian.mean.numpy()
        covariance = (np.diag(gaussian.factor.numpy() ** 2) if gaussian.diagonal
                      else gaussian.factor.numpy() @ gaussian.factor.numpy().T)
        self._mean, self._inverse = mean, np.linalg.inv(covariance)

    def score(self, ids: np.ndarray, shard: int = 0) -> dict[str, np.ndarray]:

        ids = np.asarray(ids, dtype=np.int64)
        latents = latents_for_ids(self.seed, torch.as_tensor(ids), self.generator.config.latent_dim).to(self.device)
        images = generator_to_unit(self.generator(latents).float(), self.generator.config.output_range)
        target_input = to_target_input(images, self.input_spec, check_range=False)
        columns: dict[str, np.ndarray] = {"id": ids, "shard": np.full(len(ids), shard, dtype=np.int32)}
        total = np.zeros(len(ids), dtype=np.float64)
        features = None
        for name, objective in self.objectives.items():
            result = objective(target_input, image01=images, classes=None)
            values = result.per_sample[name].detach().float().cpu().numpy()
            columns[f"term_{name}"] = values
            total += self.weights[name] * values.astype(np.float64)
            if objective is self.features_objective:
                features = result.features.detach().double().cpu().numpy()
                columns["class"] = result.classes.to(torch.int32).cpu().numpy()
                columns.update(logit_columns(result.logits))
        columns["objective_total"] = total.astype(np.float32)
        columns["mahalanobis"] = np.array([scipy_mahalanobis(f, self._mean, self._inverse) for f in features])
        columns.update({k: v.detach().cpu().numpy() for k, v in image_statistics(images).items()})
        return columns

    def close(self) -> None:
        for objective in self.objectives.values():
            objective.close()


# ------------------------------------------------------------------------------------------------ stages


def _device(manifest: Manifest, device: str | None):

    if device is None:
        return pick_device(manifest)
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("CUDA was asked for but no GPU is visible", where="--device")
    return torch.device(device)


def _target(manifest: Manifest, name: str | None) -> TargetSpec:
    return manifest.target(name) if name else manifest.targets[0]


def fast_scorer(manifest: Manifest, spec: TargetSpec, models: BenchModels, device, gaussian=None):
    """The stage's own CandidateScorer around these models, prepared as the stage prepares them."""
    precision = generation.effective_mixed_precision(device, manifest.sampling.mixed_precision)
    generator, target = generation.prepare_models(models.generator, models.target, device,
                                                getattr(manifest.sampling, "compile", False))
    objective = TargetObjective(target, spec.terms, spec.objective, models.reference, family=spec.family)
    gaussian = gaussian or bench_gaussian(manifest, spec, objective, models, device)
    return candidates.CandidateScorer(generator, objective, input_spec=generation.target_input_spec(spec),
                                      gaussian=gaussian, num_classes=models.num_classes, seed=manifest.sampling.seed,
                                      device=device, mixed_precision=precision)


def bench_sample(manifest: Manifest, spec: TargetSpec, device, *, batches: int = 4, baseline: bool = True,
                 baseline_batches: int | None = None, batch_size: int | None = None, random_init: bool = False,
                 warmup: int = 1, peak_size: int | None = None) -> dict:

    models = load_models(manifest, spec, device, random_init)
    scorer = fast_scorer(manifest, spec, models, device)
    sizer = generation.BatchSizer(batch_size or manifest.sampling.batch_size, device,
                                min(manifest.sampling.chunk_size, manifest.sampling.num_candidates),
                                manifest.generator.resolution**2)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # `auto` on CUDA finds its size here: the warm-up batch halves until it fits.
    sizer.run(np.arange(sizer.size, dtype=np.int64), lambda ids: scorer.score(ids, 0))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(scorer.mixed_precision, torch.float32)
    # The peak, before and after the timed batches: on a shared machine the larger is closer to the truth.
    peak_before = peak_matmul_flops(device, dtype, peak_size)
    size = sizer.size
    # Convolutions and matmuls are linear in the batch: one candidate's count is every candidate's.
    flops_per_candidate = count_flops(lambda: scorer.score(np.arange(1, dtype=np.int64), 0))
    # Enough ids for both ways: the fast batches, and the baseline's batches of 8 (the same ids, from 0).
    ids = np.arange((max(batches, baseline_batches or batches) + warmup) * max(size, BASELINE_BATCH_SIZE),
                    dtype=np.int64)
    # As the stage does: columns stay on the device until the "chunk" (here: the timed batches) is complete.
    pending: list = []
    fast = timed(lambda b: pending.append(scorer.score_on_device(b, 0)[0]), ids, size, batches, device, warmup,
                 finish=lambda: scorer.table(candidates.concat_columns(pending[warmup:])))
    pending.clear()
    fast["rss_peak_mib"] = round(peak_rss_mib(), 1)
    if device.type == "cuda":
        fast["gpu_peak_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    peak_after = peak_matmul_flops(device, dtype, peak_size)
    peak = dict(max(peak_before, peak_after, key=lambda p: p["flops_per_second"]))
    peak["measurements"] = [peak_before["flops_per_second"], peak_after["flops_per_second"]]
    fast["achieved_flops_per_second"] = flops_per_candidate * fast["items_per_second"]
    fast["mfu"] = fast["achieved_flops_per_second"] / peak["flops_per_second"]
    record = {
        "stage": "sample", "target": spec.name, "arch": spec.arch, "input_size": spec.input.size,
        "generator": {"depths": list(manifest.generator.depths), "latent_dim": manifest.generator.latent_dim,
                      "resolution": manifest.generator.resolution},
        "models": models.sources, "mixed_precision": scorer.mixed_precision,
        "compile": bool(getattr(manifest.sampling, "compile", False)),
        "flops_per_candidate": flops_per_candidate, "peak": peak,
        "candidates_per_second": fast["items_per_second"], "mfu": fast["mfu"], "fast": fast,
    }
    scorer.objective.close()
    if baseline:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        # The notebooks' layout: prepare_models converted the modules to channels_last in place.
        models.generator.to(memory_format=torch.contiguous_format)
        models.target.to(memory_format=torch.contiguous_format)
        base_scorer = BaselineScorer(models.generator.requires_grad_(True), models.target, spec,
                                     reference=models.reference, gaussian=scorer.gaussian,
                                     num_classes=models.num_classes, seed=manifest.sampling.seed, device=device)
        try:
            base = timed(base_scorer.score, ids, BASELINE_BATCH_SIZE, baseline_batches or batches, device, warmup)
        finally:
            base_scorer.close()
        base["rss_peak_mib"] = round(peak_rss_mib(), 1)
        if device.type == "cuda":
            base["gpu_peak_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        base["achieved_flops_per_second"] = flops_per_candidate * base["items_per_second"]
        base["mfu"] = base["achieved_flops_per_second"] / peak["flops_per_second"]
        record["baseline"] = base
        record["speedup"] = fast["items_per_second"] / base["items_per_second"]
    return record


def bench_finetune(manifest: Manifest, spec: TargetSpec, device, steps: int = 3, random_init: bool = False,
                   warmup: int = 1) -> dict:
    """Steps/s of the real fine-tuning step; under a launcher every process runs it and rank 0 reports."""
    accelerator = ft.make_accelerator(manifest)
    device = accelerator.device
    models = load_models(manifest, spec, device, random_init)
    generator = models.generator.train()
    trainable = ft.freeze_unused_layers(generator)
    optimizer = torch.optim.Adam(trainable, lr=manifest.finetune.lr)
    objective = TargetObjective(models.target, spec.terms, spec.objective, models.reference, family=spec.family)
    prepared, prepared_optimizer = accelerator.prepare(generator, optimizer)
    trainer = ft.Finetuner(generator=prepared, optimizer=prepared_optimizer, objective=objective,
                           accelerator=accelerator, spec=manifest.finetune,
                           input_spec=generation.target_input_spec(spec),
                           output_range=tuple(generator.config.output_range), latent_dim=generator.config.latent_dim,
                           num_classes=models.num_classes, trainable=trainable,
                           reduce_sum=ft.differentiable_sum(accelerator.num_processes))
    for step in range(warmup):
        trainer.step(step)
    accelerator.wait_for_everyone()
    started = time.perf_counter()
    for step in range(warmup, warmup + steps):
        trainer.step(step)
    accelerator.wait_for_everyone()
    seconds = time.perf_counter() - started
    objective.close()
    return {
        "stage": "finetune", "target": spec.name, "arch": spec.arch, "models": models.sources,
        "processes": accelerator.num_processes, "device": str(device), "batch_size": manifest.finetune.batch_size,
        "steps": steps, "seconds": round(seconds, 4), "seconds_per_step": seconds / steps,
        "steps_per_second": steps / seconds, "images_per_second": steps * manifest.finetune.batch_size / seconds,
        "rss_peak_mib": round(peak_rss_mib(), 1), "main": accelerator.is_main_process,
    }


# ------------------------------------------------------------------------------------------------ ppa


def bench_ppa(manifest: Manifest, spec: TargetSpec, device, *, steps: int = 3, batch_size: int | None = None,
              baseline: bool = True, baseline_latents: int | None = None, random_init: bool = False,
              peak_size: int | None = None) -> dict:
    """Latent-steps/s of per-sample latent optimisation, batched against a per-sample loop over the same latents."""
    models = load_models(manifest, spec, device, random_init)
    generator, model = models.generator.requires_grad_(False), models.target
    output_range, input_spec = tuple(generator.config.output_range), target_input_spec(spec)

    def generate(z):
        return generator_to_unit(generator(z), output_range)

    def target(images01):
        return model(to_target_input(images01, input_spec, check_range=False))

    batch = int(batch_size) if isinstance(batch_size, int) else 32
    settings = ppa.PPASettings(steps=steps)
    ids = np.arange(batch, dtype=np.int64)
    keys = torch.from_numpy(ids)
    latents = latents_for_ids(manifest.sampling.seed, ids, generator.config.latent_dim).to(device)
    classes = torch.zeros(batch, dtype=torch.long, device=device)

    def optimise(rows: slice, how_many_steps: int) -> None:
        ppa.optimise_latents(generate, target, latents[rows], classes[rows], keys[rows],
                             ppa.PPASettings(steps=how_many_steps), seed=manifest.sampling.seed)

    optimise(slice(0, batch), 1)  # warm-up
    flops_per_latent_step = count_flops(lambda: optimise(slice(0, 1), 1))
    peak = peak_matmul_flops(device, torch.float32, peak_size)

    def timed_run(groups: list[slice]) -> dict:
        _sync(device)
        started = time.perf_counter()
        for rows in groups:
            optimise(rows, settings.steps)
        _sync(device)
        seconds = time.perf_counter() - started
        count = sum(r.stop - r.start for r in groups)
        rate = count * settings.steps / seconds
        return {"latents": count, "steps": settings.steps, "seconds": round(seconds, 4),
                "latent_steps_per_second": rate, "mfu": flops_per_latent_step * rate / peak["flops_per_second"]}

    fast = {**timed_run([slice(0, batch)]), "batch_size": batch}
    record = {"stage": "ppa", "target": spec.name, "arch": spec.arch, "input_size": spec.input.size,
              "models": models.sources, "flops_per_latent_step": flops_per_latent_step, "peak": peak,
              "latent_steps_per_second": fast["latent_steps_per_second"], "mfu": fast["mfu"], "fast": fast}
    if baseline:
        alone = min(batch, baseline_latents or batch)
        base = {**timed_run([slice(i, i + 1) for i in range(alone)]), "batch_size": 1}
        record["baseline"] = base
        record["speedup"] = fast["latent_steps_per_second"] / base["latent_steps_per_second"]
    record["rss_peak_mib"] = round(peak_rss_mib(), 1)
    return record


# ------------------------------------------------------------------------------------------------ selection


def synthetic_candidate_shards(store, target: str, rows: int, files: int, seed: int = 0,
                               num_classes: int = 1, terms: tuple[str, ...] = ("bn_stats", "feature_stats", "logits"),
                               row_group_size: int = 4096) -> None:
    """`files` shards of one chunk each, in the layout and schema `sample` writes (random statistics); row groups
    of 4096 rows by default, as the study's manifest."""
    schema = candidates.candidate_schema(num_classes, list(terms))
    rng = np.random.default_rng(seed)
    for shard in range(files):
        first, stop = layout.shard_bounds(rows, files, shard)
        n = stop - first
        columns = {"id": np.arange(first, stop, dtype=np.int64), "shard": np.full(n, shard, np.int32),
                   "class": rng.integers(0, 2, n, dtype=np.int32), "mahalanobis": rng.gamma(4.0, size=n)}
        for field in schema:
            if field.name not in columns:
                columns[field.name] = rng.random(n, dtype=np.float32)
        table = pa.Table.from_arrays([pa.array(columns[f.name], type=f.type) for f in schema], schema=schema)
        chunk = layout.chunk_prefix(target, shard, 0)
        with store.committed(chunk, {"chunk": 0}) as staging:
            with staging.parquet_writer(layout.CHUNK_FILE, schema, row_group_size) as writer:
                writer.write_table(table)
        plan = {"num_candidates": rows, "num_shards": files}
        store.write_json(f"{layout.shard_prefix(target, shard)}/{layout.SUMMARY_FILE}", {
            "plan": plan, "rows": n, "columns": schema.names, "num_classes": num_classes,
            "chunks": [{"chunk": 0, "key": f"{chunk}/{layout.CHUNK_FILE}", "first_id": first, "stop_id": stop,
                        "rows": n}],
            "mahalanobis": {"fingerprint": "synthetic"}, "mahalanobis_fingerprints": ["synthetic"]})


def select_manifest(manifest: Manifest, output: str, rows: int, files: int) -> Manifest:
    document = manifest.model_dump(mode="json")
    document["output"] = {"uri": output}
    document["sampling"].update(num_candidates=rows, num_shards=files, chunk_size=-(-rows // files))
    return parse_manifest(document, "bench select")


def bench_select(manifest: Manifest, spec: TargetSpec, rows: int = 10**6, files: int = 100,
                 directory: str | None = None) -> dict:
    """Time `stages.select.select_target` on `rows` synthetic candidates in `files` shards."""
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        local = select_manifest(manifest, tmp, rows, files)
        store = run_store(local)
        started = time.perf_counter()
        synthetic_candidate_shards(store, spec.name, rows, files)
        written = time.perf_counter() - started
        rss_before = peak_rss_mib()
        started = time.perf_counter()
        record = selection.select_target(local, spec)
        seconds = time.perf_counter() - started
    return {"stage": "select", "target": spec.name, "rows": rows, "files": files, "write_seconds": round(written, 2),
            "seconds": round(seconds, 3), "rows_per_second": rows / seconds, "selected": record["counts"]["selected"],
            "rss_peak_mib": round(peak_rss_mib(), 1), "rss_peak_before_select_mib": round(rss_before, 1)}


# ------------------------------------------------------------------------------------------------ the shell


def machine() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "load_average": [round(x, 2) for x in os.getloadavg()]}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def run(manifest: Manifest, stage: str = "sample", device: str | None = None, target: str | None = None,
        baseline: bool = True, batches: int = 4, baseline_batches: int | None = None, batch_size: int | None = None,
        steps: int = 3, rows: int = 10**6, files: int = 100, random_init: bool = False, json_out: str | None = None,
        workdir: str | None = None, peak_size: int | None = None) -> dict:
    if device is not None and device != manifest.compute.device:  # every stage's own device choice follows it

        document = manifest.model_dump(mode="json")
        document["compute"]["device"] = device
        manifest = parse_manifest(document, f"bench (--device {device})")
    spec = _target(manifest, target)
    if stage == "select":
        result = bench_select(manifest, spec, rows, files, workdir)
    else:
        dev = _device(manifest, device)
        if stage == "sample":
            result = bench_sample(manifest, spec, dev, batches=batches, baseline=baseline,
                                  baseline_batches=baseline_batches, batch_size=batch_size, random_init=random_init,
                                  peak_size=peak_size)
        elif stage == "ppa":
            result = bench_ppa(manifest, spec, dev, steps=steps, batch_size=batch_size, baseline=baseline,
                               baseline_latents=baseline_batches, random_init=random_init, peak_size=peak_size)
        else:
            result = bench_finetune(manifest, spec, dev, steps, random_init)
    result = {**result, "machine": machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if result.get("main", True):
        print(summary_text(result))
        if json_out:
            Path(json_out).parent.mkdir(parents=True, exist_ok=True)
            Path(json_out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    log.event("bench_done", stage=stage, target=spec.name)
    return result


def summary_text(r: dict) -> str:
    lines = [f"bench {r['stage']} target={r['target']} on {r['machine'].get('gpu') or r['machine']['processor']} "
             f"({r['machine']['cpus']} CPUs, load {r['machine']['load_average']})"]
    if r["stage"] == "sample":
        lines.append(f"  models: {r['models']}")
        lines.append(f"  fast:     {r['fast']['items_per_second']:.2f} candidates/s (batch {r['fast']['batch_size']}, "
                     f"{r['mixed_precision']}), MFU {100 * r['fast']['mfu']:.2f}% of "
                     f"{r['peak']['flops_per_second'] / 1e9:.1f} GFLOP/s ({r['peak']['dtype']} matmul), "
                     f"{r['flops_per_candidate'] / 1e9:.3f} GFLOP/candidate, peak RSS {r['fast']['rss_peak_mib']} MiB"
                     + (f", GPU peak {r['fast']['gpu_peak_mib']} MiB" if "gpu_peak_mib" in r["fast"] else ""))
        if "baseline" in r:
            b = r["baseline"]
            lines.append(f"  baseline: {b['items_per_second']:.2f} candidates/s (batch {b['batch_size']}, fp32, "
                         f"autograd on), MFU {100 * b['mfu']:.2f}%; speed-up {r['speedup']:.2f}x")
    elif r["stage"] == "ppa":
        f = r["fast"]
        lines.append(f"  models: {r['models']}")
        lines.append(f"  batched:  {f['latent_steps_per_second']:.2f} latent-steps/s ({f['latents']} latents x "
                     f"{f['steps']} steps together), MFU {100 * f['mfu']:.2f}% of "
                     f"{r['peak']['flops_per_second'] / 1e9:.1f} GFLOP/s, "
                     f"{r['flops_per_latent_step'] / 1e9:.4f} GFLOP per latent-step, peak RSS {r['rss_peak_mib']} MiB")
        if "baseline" in r:
            b = r["baseline"]
            lines.append(f"  one by one: {b['latent_steps_per_second']:.2f} latent-steps/s ({b['latents']} latents), "
                         f"MFU {100 * b['mfu']:.2f}%; speed-up {r['speedup']:.2f}x")
    elif r["stage"] == "finetune":
        lines.append(f"  {r['processes']} process(es): {r['seconds_per_step']:.3f} s/step, "
                     f"{r['steps_per_second']:.3f} steps/s, {r['images_per_second']:.2f} images/s "
                     f"(global batch {r['batch_size']}), peak RSS {r['rss_peak_mib']} MiB")
    else:
        lines.append(f"  {r['rows']} rows in {r['files']} files: thresholds + selection {r['seconds']} s "
                     f"({r['rows_per_second']:.0f} rows/s), {r['selected']} selected, peak RSS {r['rss_peak_mib']} MiB "
                     f"(writing the shards took {r['write_seconds']} s)")
    return "\n".join(lines)
