"""Stage 2, sampling: every candidate id -> one row of statistics, sharded, chunked, resumable, streamed to Parquet.

Ids, shards, chunks
-------------------
Candidate k (0 <= k < sampling.num_candidates) has the latent `latents_for_ids(sampling.seed, [k], latent_dim)`, a
pure function of (seed, k), and its image is the FINE-TUNED generator's output for it; any stage can regenerate
it from k alone. Shard i of `sampling.num_shards` owns the contiguous ids [start_i, stop_i) of
`numpy.array_split` (the first num_candidates % num_shards shards hold one id more): shards never overlap and
together cover every id, whatever machine runs them. Within a shard the ids go in chunks of
`sampling.chunk_size`; chunk j is one Parquet file committed on its own (storage's commit marker):

    <target>/candidates/shard=<i>/chunk=<j>/candidates.parquet + _COMMITTED
    <target>/candidates/shard=<i>/_SHARD.json ........ written last: the shard is complete
    <target>/candidates-images/shard=<i>/<id>.png ...... only with sampling.save_images

A shard killed at any moment keeps its committed chunks; re-run, it redoes only the others, so it ends with
exactly its ids, none twice. `_SHARD.json` (one atomic object, written after every chunk is committed) is the
shard-level marker: a re-run that finds it, for the same plan, returns at once and writes nothing. Each chunk's
commit metadata and the summary carry the PLAN (seed, counts, chunk size, the target's manifest section, the
Mahalanobis settings, the identity of the fine-tuned generator's commit): resuming or re-running against outputs
of a different plan is refused (InputError), because mixing them would silently corrupt the statistics.

Processes and batches
---------------------
Under Accelerate, every process of a task takes a contiguous part of each chunk's ids
(`split_between_processes`); the main process gathers the rows (rank order = id order), writes and commits the
chunk, and all processes then move to the next chunk together. Forward passes run under `torch.inference_mode()`,
with autocast (bf16 or fp16, `sampling.mixed_precision`) on CUDA only; statistics are always computed in float32
or float64. `sampling.batch_size: auto` is 256 on a CPU; on CUDA it starts at the largest power of two up to
4096 that a process's share of a chunk needs and halves on every out-of-memory error until a batch fits. Memory
stays flat: only one chunk's rows (and no images) are ever held.

Row schema (one row per candidate; float32 unless noted)
--------------------------------------------------------
id (int64), shard (int32), class (int32: the class the target predicts, which the `logits` term measures
against); one-logit binary targets: logit, probability (sigmoid, P(class 1)); C > 1 classes: logit_<k> and
probability_<k> (softmax) per class; term_<name>: the UNWEIGHTED per-sample value of every objective term of
fine-tuning (same definitions, reid_batch.objectives) EXCEPT `tv` (as in the study: smoothness says nothing about
membership); objective_total: their sum weighted with fine-tuning's weights; mahalanobis (float64; see
reid_batch.mahalanobis); image_mean, image_std, pixel_entropy (Shannon entropy in bits of the 256-level histogram
of round(255 x) over all pixels of the [0, 1] image, as of its 8-bit PNG).

Reference statistics
--------------------
ViT targets need reference statistics (objective terms, CLS Gaussian): stage 1's, through
`recipes.finetune.reference_stats` (its fingerprinted cache `<target>/finetune-reference.safetensors`, measured
the same way if absent or stale), so both stages compare with the same numbers. `ledoit_wolf` needs reference
features: `selection.mahalanobis.reference_images` PRIOR samples at ids REFERENCE_ID_OFFSET + k (never a
candidate's). Every shard computes the same Gaussian deterministically; its fingerprint is stored per chunk so
that `select` can verify that all shards agree.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from reid_batch import log, preemption
from reid_batch.errors import InputError
from reid_batch.manifest import Manifest, TargetSpec

SUMMARY_FILE = "_SHARD.json"
CHUNK_FILE = "candidates.parquet"
PLAN_FORMAT = 1
# Reference latents use ids no candidate can have, so reference and candidates never share an image.
REFERENCE_ID_OFFSET = 2**62
CPU_BATCH_SIZE = 256
# On a CPU a batch is best kept cache-sized: with the 1024 px PGGAN a compiled forward cost 1.38 / 1.46 / 1.52 s
# per candidate at batch 2 / 4 / 8 (one thread). `auto` keeps batch x generator pixels within this budget.
CPU_AUTO_PIXELS = 2 * 1024 * 1024
MAX_AUTO_BATCH_SIZE = 4096
# Pixels per bincount call when histogramming: bounds the index tensor to ~512 MB of int64.
_HISTOGRAM_PIXELS = 64 * 2**20
_CHUNK_MARKER = re.compile(r"^chunk=(\d+)/_COMMITTED$")


# ------------------------------------------------------------------------------------------------ id layout


def shard_bounds(num_candidates: int, num_shards: int, shard: int) -> tuple[int, int]:
    """[start, stop) of the ids shard `shard` owns: numpy.array_split's partition of range(num_candidates)."""
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} is outside 0..{num_shards - 1}")
    base, extra = divmod(num_candidates, num_shards)
    start = shard * base + min(shard, extra)
    return start, start + base + (1 if shard < extra else 0)


def chunk_bounds(start: int, stop: int, chunk_size: int) -> list[tuple[int, int, int]]:
    """(chunk index, first id, stop id) of each chunk of [start, stop); the index counts from 0 within the shard."""
    return [(j, a, min(a + chunk_size, stop)) for j, a in enumerate(range(start, stop, chunk_size))]


def candidates_prefix(target: str) -> str:
    return f"{target}/candidates"


def shard_prefix(target: str, shard: int) -> str:
    return f"{candidates_prefix(target)}/shard={shard}"


def chunk_prefix(target: str, shard: int, chunk: int) -> str:
    return f"{shard_prefix(target, shard)}/chunk={chunk}"


def image_key(target: str, shard: int, candidate_id: int) -> str:
    return f"{target}/candidates-images/shard={shard}/{candidate_id}.png"


# ------------------------------------------------------------------------------------------------ image statistics


def pixel_entropy(images01: Tensor) -> Tensor:
    """Shannon entropy (bits) of each image's 256-level histogram of round(255 x), all channels pooled, (N,)."""
    levels = images01.detach().float().clamp(0, 1).mul(255).round_()
    n, pixels = levels.shape[0], levels[0].numel()
    if levels.device.type == "cpu":  # a bincount of one-byte levels per image: 3x faster than scatter_add_ here
        levels = levels.to(torch.uint8)
        counts = torch.stack([torch.bincount(image.reshape(-1), minlength=256) for image in levels]).double()
    else:
        levels = levels.to(torch.int64).flatten(1)
        counts = torch.empty(n, 256, dtype=torch.float64, device=levels.device)
        step = max(1, _HISTOGRAM_PIXELS // max(pixels, 1))
        for at in range(0, n, step):
            part = levels[at : at + step]
            offsets = torch.arange(part.shape[0], device=part.device).unsqueeze(1) * 256
            index = (part + offsets).reshape(-1)
            # scatter_add_, not bincount: CUDA's bincount reads the maximum back to the host (a sync per batch).
            # Adding ones is exact in float64 whatever the order.
            counts[at : at + step] = torch.zeros(part.shape[0] * 256, dtype=torch.float64, device=part.device).scatter_add_(
                0, index, torch.ones(1, dtype=torch.float64, device=part.device).expand(index.shape[0])).view(-1, 256)
    p = counts / pixels
    return -(p * torch.where(p > 0, p.log2(), torch.zeros_like(p))).sum(1)


def image_statistics(images01: Tensor) -> dict[str, Tensor]:
    """Per-image mean, (population) standard deviation and pixel entropy of [0, 1] images (N, C, H, W)."""
    # Reduced in place over (C, H, W): flattening a channels_last batch would copy it first.
    std, mean = torch.std_mean(images01.detach().float(), dim=(1, 2, 3), correction=0)
    return {"image_mean": mean, "image_std": std, "pixel_entropy": pixel_entropy(images01)}


def png_bytes(image01: Tensor) -> bytes:
    """An 8-bit PNG of one [0, 1] image (C, H, W), C = 1 (grey) or 3 (RGB)."""
    from PIL import Image

    array = (image01.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    picture = Image.fromarray(array[0], mode="L") if array.shape[0] == 1 else Image.fromarray(array.transpose(1, 2, 0), mode="RGB")
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------ the pure core


def autocast_context(device: torch.device, mixed_precision: str):
    """Autocast on CUDA for bf16/fp16 (bf16 only where the GPU supports it natively); a null context otherwise."""
    if device.type != "cuda" or mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def effective_mixed_precision(device: torch.device, mixed_precision: str) -> str:
    if mixed_precision == "no" or device.type != "cuda":
        return "no"
    if mixed_precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return "no"
    return mixed_precision


def regenerate_images(generator, ids: Iterable[int] | np.ndarray, seed: int, device: torch.device,
                      mixed_precision: str = "no") -> Tensor:
    """[0, 1] float32 images of candidates `ids`, from their counter-based latents (the same in any batch)."""
    from reid_batch.models.pggan import generator_to_unit, latents_for_ids

    # A copy: ids read from Parquet are read-only arrays, which torch warns about sharing.
    ids = torch.from_numpy(np.array(ids, dtype=np.int64))
    latents = latents_for_ids(seed, ids, generator.config.latent_dim).to(device)
    with torch.inference_mode(), autocast_context(device, mixed_precision):
        raw = generator(latents)
    return generator_to_unit(raw.float(), generator.config.output_range)


def prepare_models(generator, target, device: torch.device, compile: bool = False):
    """(generator, target) ready for inference: channels_last (NHWC convolutions: tensor cores take them without
    transposes; oneDNN on a CPU ran the 256 px PGGAN 25 % faster), and the generator torch.compile'd if asked (the
    target is left as is: the objective's hooks record its activations, which a compiled graph would not expose
    as they are). Converts the modules in place."""
    generator = generator.to(memory_format=torch.channels_last)
    target = target.to(memory_format=torch.channels_last)
    if compile:
        generator = torch.compile(generator)
    return generator, target


def logit_tensors(logits: Tensor) -> dict[str, Tensor]:
    logits = logits.detach().float()
    if logits.shape[1] == 1:
        return {"logit": logits[:, 0], "probability": torch.sigmoid(logits[:, 0])}
    probabilities = logits.softmax(dim=1)
    columns = {f"logit_{k}": logits[:, k] for k in range(logits.shape[1])}
    columns.update({f"probability_{k}": probabilities[:, k] for k in range(logits.shape[1])})
    return columns


def logit_columns(logits: Tensor) -> dict[str, np.ndarray]:
    return {k: v.cpu().numpy() for k, v in logit_tensors(logits).items()}


def to_numpy_columns(columns: dict) -> dict[str, np.ndarray]:
    return {k: v.cpu().numpy() if isinstance(v, Tensor) else v for k, v in columns.items()}


def candidate_schema(num_classes: int, terms: list[str]) -> pa.Schema:
    """The Parquet schema of candidate rows (see the module docstring)."""
    f32 = pa.float32()
    fields = [pa.field("id", pa.int64()), pa.field("shard", pa.int32()), pa.field("class", pa.int32())]
    if num_classes == 1:
        fields += [pa.field("logit", f32), pa.field("probability", f32)]
    else:
        fields += [pa.field(f"logit_{k}", f32) for k in range(num_classes)]
        fields += [pa.field(f"probability_{k}", f32) for k in range(num_classes)]
    fields += [pa.field(f"term_{t}", f32) for t in terms]
    fields += [pa.field("objective_total", f32), pa.field("mahalanobis", pa.float64())]
    fields += [pa.field(n, f32) for n in ("image_mean", "image_std", "pixel_entropy")]
    return pa.schema(fields)


class CandidateScorer:
    """Generator + frozen target objective + Mahalanobis model: candidate ids in, statistic columns out."""

    def __init__(self, generator, objective, input_spec, gaussian, num_classes: int, seed: int,
                 device: torch.device, mixed_precision: str = "no"):
        from reid_batch.objectives import SCORING_EXCLUDES

        self.generator = generator
        self.objective = objective
        self.input_spec = input_spec
        self.gaussian = gaussian
        self.num_classes = num_classes
        self.seed = seed
        self.device = device
        self.mixed_precision = mixed_precision
        self.terms = [t for t in objective.weights if t not in SCORING_EXCLUDES]
        self.schema = candidate_schema(num_classes, self.terms)

    def score(self, ids: np.ndarray, shard: int, keep_images: bool = False) -> tuple[dict[str, np.ndarray], Tensor | None]:
        """Columns for candidates `ids` (in order), and their [0, 1] images on the CPU if asked."""
        columns, images = self.score_on_device(ids, shard, keep_images)
        return to_numpy_columns(columns), images

    def score_on_device(self, ids: np.ndarray, shard: int, keep_images: bool = False) -> tuple[dict, Tensor | None]:
        """As `score`, but the computed columns stay tensors on the device: no host-device sync per batch; the
        caller moves a whole chunk at once (`concat_columns`)."""
        from reid_batch.models.targets import to_target_input

        ids = np.asarray(ids, dtype=np.int64)
        images = regenerate_images(self.generator, ids, self.seed, self.device, self.mixed_precision)
        with torch.inference_mode():
            target_input = to_target_input(images, self.input_spec, check_range=False)
            with autocast_context(self.device, self.mixed_precision):
                result = self.objective(target_input, image01=images, classes=None)
        if result.features is None:
            raise RuntimeError("the objective produced no features for the Mahalanobis distance")
        columns: dict = {
            "id": ids,
            "shard": np.full(len(ids), shard, dtype=np.int32),
            "class": result.classes.to(torch.int32),
            **logit_tensors(result.logits),
        }
        for t in self.terms:
            columns[f"term_{t}"] = result.per_sample[t].float()
        columns["objective_total"] = result.per_sample_total.float()
        columns["mahalanobis"] = self.gaussian.distances(result.features.float(), on_device=True)
        columns.update(image_statistics(images))
        return columns, (images.cpu() if keep_images else None)

    def table(self, columns: dict[str, np.ndarray]) -> pa.Table:
        return pa.Table.from_arrays([pa.array(columns[f.name], type=f.type) for f in self.schema], schema=self.schema)


def concat_columns(parts: list[dict]) -> dict[str, np.ndarray]:
    """One table's columns from batches' columns (numpy arrays, or device tensors: moved once, here)."""
    parts = [p for p in parts if p and len(p["id"])]
    if not parts:
        return {}
    return {k: torch.cat([p[k] for p in parts]).cpu().numpy() if isinstance(parts[0][k], Tensor)
            else np.concatenate([p[k] for p in parts]) for k in parts[0]}


class BatchSizer:
    """A fixed batch size, or `auto`: on CUDA the largest power of two that fits, halving on OOM; on a CPU the
    largest power of two up to 256 whose images (pixels_per_item each) stay within CPU_AUTO_PIXELS."""

    def __init__(self, configured: int | str, device: torch.device, largest_useful: int,
                 pixels_per_item: int | None = None):
        self.adaptive = configured == "auto" and device.type == "cuda"
        if configured != "auto":
            self.size = int(configured)
        elif device.type == "cuda":
            self.size = min(MAX_AUTO_BATCH_SIZE, 1 << max(0, int(largest_useful) - 1).bit_length())
        else:
            fits = max(1, CPU_AUTO_PIXELS // max(1, pixels_per_item or 1))
            self.size = min(CPU_BATCH_SIZE, 1 << (fits.bit_length() - 1))

    def run(self, items: np.ndarray, work: Callable[[np.ndarray], Any]) -> list[Any]:
        results, at = [], 0
        while at < len(items):
            batch = items[at : at + self.size]
            out_of_memory = False
            try:
                results.append(work(batch))
            except torch.cuda.OutOfMemoryError:
                if not self.adaptive or self.size == 1:
                    raise
                out_of_memory = True
            if out_of_memory:  # handled outside `except`, once the failed batch's tensors are released
                torch.cuda.empty_cache()
                self.size //= 2
                log.event("batch_size_halved", batch_size=self.size, reason="CUDA out of memory")
                continue
            at += len(batch)
        return results


class ChunkWriter:
    """Commits chunks on one background thread while the next chunk computes. At most one commit waits behind the
    one being written (so at most two chunks' rows are held); commits run in submission order; the first failure
    is raised by the next submit() or by close(), which waits for every commit."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chunk-writer")
        self._pending: list = []

    def submit(self, commit: Callable[[], None]) -> None:
        while len(self._pending) >= 2:
            self._pending.pop(0).result()
        self._pending.append(self._pool.submit(commit))

    def close(self) -> None:
        try:
            while self._pending:
                self._pending.pop(0).result()
        finally:
            for future in self._pending:
                future.cancel()
            self._pool.shutdown(wait=True)


# ------------------------------------------------------------------------------------------------ reference statistics


def _gather(accelerator, obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every process."""
    if accelerator.num_processes == 1:
        return [obj]
    from accelerate.utils import gather_object

    return gather_object([obj])


def _my_share(accelerator, ids: np.ndarray) -> np.ndarray:
    with accelerator.split_between_processes(ids.tolist()) as mine:
        return np.asarray(mine, dtype=np.int64)


def reference_ids(count: int) -> np.ndarray:
    return REFERENCE_ID_OFFSET + np.arange(count, dtype=np.int64)


def _prior_reference_images(manifest: Manifest, accelerator, count: int, sizer: BatchSizer) -> Iterable[Tensor]:
    """This process's share of the prior generator's reference images, batch by batch ([0, 1], on the device)."""
    from reid_batch.recipes.train_prior import load_prior

    prior = load_prior(manifest).to(accelerator.device).eval()
    mine = _my_share(accelerator, reference_ids(count))
    for at in range(0, len(mine), sizer.size):
        yield regenerate_images(prior, mine[at : at + sizer.size], manifest.sampling.seed, accelerator.device)


def vit_reference_stats(manifest: Manifest, spec: TargetSpec, model, accelerator) -> dict[str, Tensor]:
    """The reference statistics of a ViT or GroupNorm CNN, exactly stage 1's: its cache when it matches, else measured the same way."""
    from reid_batch.artifacts import run_store
    from reid_batch.recipes.finetune import reference_stats
    from reid_batch.recipes.train_prior import load_prior

    stats, info = reference_stats(manifest, spec, model, load_prior(manifest), accelerator, run_store(manifest))
    log.event("reference_stats_ready", target=spec.name, **info)
    return {k: v.cpu() for k, v in stats.items()}


def feature_gaussian(manifest: Manifest, spec: TargetSpec, objective, accelerator, sizer: BatchSizer):
    """The Mahalanobis model of `selection.mahalanobis` for this target (see reid_batch.mahalanobis)."""
    from reid_batch import mahalanobis
    from reid_batch.models.targets import to_target_input

    settings = manifest.selection.mahalanobis
    if settings.covariance == "diagonal":
        prior = objective.feature_prior()
        if prior is None:
            raise InputError("the target offers no feature statistics for a diagonal Gaussian (no BatchNorm2d, "
                             "or ViT reference statistics without CLS statistics); use covariance: ledoit_wolf",
                             where="selection.mahalanobis.covariance")
        source = ("reference CLS mean/var" if spec.family == "vit" else
                  "last GroupNorm input, reference mean/var" if objective.fallback is not None else
                  "last BatchNorm2d running_mean/running_var")
        return mahalanobis.from_gaussian(prior[0], prior[1], settings.epsilon, source)
    input_spec = target_input_spec(spec)
    features = []
    with torch.inference_mode():
        for images in _prior_reference_images(manifest, accelerator, settings.reference_images, sizer):
            result = objective(to_target_input(images, input_spec, check_range=False), image01=images)
            features.append(result.features.float().cpu().numpy())
    dim = 0 if not features else features[0].shape[1]
    mine = np.concatenate(features) if features else np.zeros((0, dim), dtype=np.float32)
    gathered = [part for part in _gather(accelerator, mine) if len(part)]
    return mahalanobis.fit_ledoit_wolf(np.concatenate(gathered), settings.epsilon,
                                       source=f"Ledoit-Wolf on {settings.reference_images} prior samples")


# ------------------------------------------------------------------------------------------------ plan and resume


def target_input_spec(spec: TargetSpec):
    from reid_batch.models.targets import TargetInput

    return TargetInput(size=spec.input.size, channels=spec.input.channels, mean=tuple(spec.input.mean),
                       std=tuple(spec.input.std))


def finetune_identity(store, target: str) -> dict:
    """What identifies stage 1's result: its commit marker's time and file sizes."""
    from reid_batch.artifacts import attack_prefix, require_committed

    prefix = attack_prefix(target, "finetune")
    require_committed(store, prefix, f"finetune --target {target}")
    marker = store.read_commit(prefix)
    return {"created": marker.get("created"), "files": marker.get("files")}


def shard_plan(manifest: Manifest, spec: TargetSpec, shard: int, finetune: dict) -> dict:
    """Everything a shard's rows depend on; outputs of a different plan must not be mixed with this one's."""
    sampling = manifest.sampling
    start, stop = shard_bounds(sampling.num_candidates, sampling.num_shards, shard)
    plan = {
        "format": PLAN_FORMAT,
        "target": spec.model_dump(mode="json"),
        "seed": sampling.seed,
        "num_candidates": sampling.num_candidates,
        "num_shards": sampling.num_shards,
        "shard": shard,
        "first_id": start,
        "stop_id": stop,
        "chunk_size": sampling.chunk_size,
        "mahalanobis": manifest.selection.mahalanobis.model_dump(mode="json"),
        "finetune": finetune,
    }
    return json.loads(json.dumps(plan))  # the form it takes once stored, so comparisons are exact


def _check_plan(found: dict | None, plan: dict, uri: str) -> None:
    if found == plan:
        return
    differing = sorted(k for k in set(plan) | set(found or {}) if (found or {}).get(k) != plan.get(k))
    raise InputError(
        f"holds candidates of a different plan (differs in: {', '.join(differing)}); use a new run_id, or delete "
        "that target's candidates/ (and selection/, scores/) to sample again", where=uri)


@dataclass
class ShardProgress:
    done: bool
    committed: dict[int, dict]  # chunk index -> its commit metadata


def shard_progress(store, target: str, shard: int, plan: dict) -> ShardProgress:
    """Which chunks of a shard are committed, refusing outputs of another plan; done = the summary exists."""
    prefix = shard_prefix(target, shard)
    summary_key = f"{prefix}/{SUMMARY_FILE}"
    if store.exists(summary_key):
        _check_plan(store.read_json(summary_key).get("plan"), plan, store.uri(summary_key))
        return ShardProgress(True, {})
    committed = {}
    for key in store.list(prefix):
        match = _CHUNK_MARKER.match(key[len(prefix) + 1:])
        if match:
            chunk = int(match.group(1))
            metadata = store.read_commit(chunk_prefix(target, shard, chunk)).get("metadata", {})
            _check_plan(metadata.get("plan"), plan, store.uri(chunk_prefix(target, shard, chunk)))
            committed[chunk] = metadata
    return ShardProgress(False, committed)


def read_shard_summaries(store, target: str, num_shards: int) -> tuple[dict[int, dict], list[int]]:
    """({shard: its _SHARD.json}, [shards without one]) for a target."""
    summaries, missing = {}, []
    for shard in range(num_shards):
        key = f"{shard_prefix(target, shard)}/{SUMMARY_FILE}"
        if store.exists(key):
            summaries[shard] = store.read_json(key)
        else:
            missing.append(shard)
    return summaries, missing


# ------------------------------------------------------------------------------------------------ the shell


def launched_state(manifest: Manifest):
    """Accelerate's process state when this stage runs under a multi-process launcher, else None.

    Single-writer stages (select, score) let only the main process work; the others wait for it."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    from reid_batch.recipes.common import pick_device

    return PartialState(cpu=pick_device(manifest).type == "cpu")


def _check_shard(manifest: Manifest, shard: int | None) -> list[int]:
    count = manifest.sampling.num_shards
    if shard is None:
        return list(range(count))
    if not 0 <= shard < count:
        raise InputError(f"shard {shard} is outside 0..{count - 1}", where="--shard")
    return [shard]


def _build_scorer(manifest: Manifest, spec: TargetSpec, accelerator, sizer: BatchSizer):
    from reid_batch.artifacts import load_attack_target, load_finetuned_generator
    from reid_batch.objectives import TargetObjective, needs_reference_stats

    device = accelerator.device
    model, num_classes = load_attack_target(manifest, spec)
    generator = load_finetuned_generator(manifest, spec.name).to(device).eval()
    generator, model = prepare_models(generator, model.to(device), device, manifest.sampling.compile)
    reference = vit_reference_stats(manifest, spec, model, accelerator) \
        if needs_reference_stats(model, spec.family) else None
    index = manifest.targets.index(spec)
    objective = TargetObjective(model, spec.terms, spec.objective, reference, family=spec.family,
                                field_prefix=f"targets[{index}].objective")
    if objective.fallback is not None:
        log.event("sample_objective_fallback", target=spec.name, **objective.fallback)
    gaussian = feature_gaussian(manifest, spec, objective, accelerator, sizer)
    log.event("mahalanobis_model", target=spec.name, **gaussian.summary())
    precision = effective_mixed_precision(device, manifest.sampling.mixed_precision)
    if precision != manifest.sampling.mixed_precision:
        log.event("mixed_precision_not_used", asked=manifest.sampling.mixed_precision, device=str(device),
                  reason="autocast is used on CUDA only (bf16 where the GPU supports it)")
    return CandidateScorer(generator, objective, target_input_spec(spec), gaussian, num_classes,
                           manifest.sampling.seed, device, precision)


@preemption.deferred  # SIGTERM: the chunk in progress is finished and committed, then the task stops
def _sample_shard(manifest: Manifest, spec: TargetSpec, shard: int, plan: dict, progress: ShardProgress,
                  scorer: CandidateScorer, accelerator, sizer: BatchSizer) -> dict | None:
    from reid_batch.artifacts import run_store

    store = run_store(manifest)
    sampling = manifest.sampling
    main = accelerator.is_main_process
    chunks = chunk_bounds(plan["first_id"], plan["stop_id"], sampling.chunk_size)
    pending = [c for c in chunks if c[0] not in progress.committed]
    fingerprint = scorer.gaussian.fingerprint()
    log.event("sample_shard_start", target=spec.name, shard=shard, ids=f"{plan['first_id']}..{plan['stop_id'] - 1}",
              chunks=len(chunks), already_committed=len(chunks) - len(pending), processes=accelerator.num_processes,
              batch_size=sizer.size)
    started = time.perf_counter()
    done_rows = 0
    chunk_writer = ChunkWriter()
    try:
        for chunk, first, stop in (log.progress(pending, desc=f"{spec.name} shard {shard}", total=len(pending)) if main else pending):
            preemption.check(f"{spec.name} shard {shard} chunk {chunk}", accelerator)
            chunk_started = time.perf_counter()
            ids = _my_share(accelerator, np.arange(first, stop, dtype=np.int64))

            def work(batch: np.ndarray) -> dict:
                columns, images = scorer.score_on_device(batch, shard, keep_images=sampling.save_images)
                if images is not None:
                    for candidate, image in zip(batch.tolist(), images):
                        store.write_bytes(image_key(spec.name, shard, candidate), png_bytes(image))
                return columns

            local = concat_columns(sizer.run(ids, work))
            gathered = _gather(accelerator, local)
            if main:
                columns = concat_columns(gathered)
                if not np.array_equal(columns.get("id", np.empty(0)), np.arange(first, stop)):
                    raise RuntimeError(f"chunk {chunk} of shard {shard}: gathered ids are not exactly {first}..{stop - 1}")
                metadata = {"plan": plan, "chunk": chunk, "first_id": first, "stop_id": stop, "rows": stop - first,
                            "mahalanobis_fingerprint": fingerprint}

                def commit(chunk=chunk, first=first, stop=stop, columns=columns, metadata=metadata,
                           chunk_started=chunk_started) -> None:
                    with store.committed(chunk_prefix(spec.name, shard, chunk), metadata) as staging:
                        with staging.parquet_writer(CHUNK_FILE, scorer.schema, sampling.row_group_size) as writer:
                            writer.write_table(scorer.table(columns))
                    seconds = time.perf_counter() - chunk_started
                    log.event("sample_chunk_committed", target=spec.name, shard=shard, chunk=chunk, rows=stop - first,
                              seconds=round(seconds, 3), candidates_per_second=round((stop - first) / max(seconds, 1e-9), 1))
                    progress.committed[chunk] = metadata

                chunk_writer.submit(commit)
            done_rows += stop - first
            accelerator.wait_for_everyone()
    except BaseException:
        # Pre-empted (or failed) between chunks: what was handed to the writer is still committed first.
        with contextlib.suppress(Exception):
            chunk_writer.close()
        raise
    chunk_writer.close()
    if not main:
        return None
    seconds = time.perf_counter() - started
    fingerprints = sorted({m.get("mahalanobis_fingerprint") for m in progress.committed.values()})
    summary = {
        "plan": plan,
        "rows": plan["stop_id"] - plan["first_id"],
        "chunks": [{"chunk": j, "key": f"{chunk_prefix(spec.name, shard, j)}/{CHUNK_FILE}", "first_id": a,
                    "stop_id": b, "rows": b - a} for j, a, b in chunks],
        "columns": scorer.schema.names,
        "num_classes": scorer.num_classes,
        "mahalanobis": scorer.gaussian.summary(),
        "mahalanobis_fingerprints": fingerprints,
        "last_run": {"rows": done_rows, "seconds": round(seconds, 3),
                     "candidates_per_second": round(done_rows / seconds, 2) if seconds > 0 and done_rows else None,
                     "processes": accelerator.num_processes, "device": str(accelerator.device),
                     "batch_size": sizer.size, "mixed_precision": scorer.mixed_precision},
    }
    if len(fingerprints) > 1:
        log.event("mahalanobis_reference_changed", target=spec.name, shard=shard, fingerprints=fingerprints,
                  reason="chunks of this shard were scored against different Gaussians (resumed on other hardware?)")
    store.write_json(f"{shard_prefix(spec.name, shard)}/{SUMMARY_FILE}", summary)
    log.event("sample_shard_done", target=spec.name, shard=shard, shard_rows=summary["rows"], **summary["last_run"])
    return summary


def sample_target(manifest: Manifest, spec: TargetSpec, shards: list[int], accelerator) -> list[dict]:
    """Sample the given shards of one target, skipping finished ones before loading any model."""
    from accelerate.utils import broadcast_object_list

    from reid_batch.artifacts import run_store

    store = run_store(manifest)
    work: list = [None]
    if accelerator.is_main_process:
        try:
            finetune = finetune_identity(store, spec.name)
            todo = []
            for shard in shards:
                plan = shard_plan(manifest, spec, shard, finetune)
                progress = shard_progress(store, spec.name, shard, plan)
                if progress.done:
                    log.event("sample_shard_skipped", target=spec.name, shard=shard, reason="already complete")
                else:
                    todo.append((shard, plan, progress))
            work = [todo]
        except InputError as error:
            work = [error]  # every process must learn of it, or the others would wait for the broadcast forever
    if accelerator.num_processes > 1:
        broadcast_object_list(work)
    if isinstance(work[0], Exception):
        raise work[0]
    todo = work[0]
    if not todo:
        return []
    shard_ids = [p["stop_id"] - p["first_id"] for _, p, _ in todo]
    largest_share = -(-min(manifest.sampling.chunk_size, max(shard_ids)) // accelerator.num_processes)
    sizer = BatchSizer(manifest.sampling.batch_size, accelerator.device, largest_share,
                       manifest.generator.resolution**2)
    scorer = _build_scorer(manifest, spec, accelerator, sizer)
    try:
        summaries = [_sample_shard(manifest, spec, shard, plan, progress, scorer, accelerator, sizer)
                     for shard, plan, progress in todo]
    finally:
        scorer.objective.close()
    return [s for s in summaries if s is not None]


def sample(manifest: Manifest, target: str | None = None, shard: int | None = None) -> int:
    """`reid-batch sample`: the given shard (None = every shard in turn) of each target (None = all targets)."""
    from accelerate import Accelerator

    from reid_batch.recipes.common import pick_device

    shards = _check_shard(manifest, shard)
    specs = [manifest.target(target)] if target else list(manifest.targets)
    device = pick_device(manifest)
    accelerator = Accelerator(cpu=device.type == "cpu")
    for spec in specs:
        sample_target(manifest, spec, shards, accelerator)
    accelerator.wait_for_everyone()  # a following stage on any rank sees every shard summary
    return 0
