"""The id -> latent -> image contract, and how generation is batched on a device.

Every image the attack makes is `generator(latents_for_ids(seed, id))` mapped to [0, 1]: a pure function of
(seed, id), the same in any batch, on any number of processes. Stages regenerate an image from its id alone; the id
ranges that keep the sets apart are in reid_batch.layout.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn

from reid_batch import log
from reid_batch.manifest import TargetSpec
from reid_batch.models.pggan import PGGANGenerator, generator_to_unit, latents_for_ids
from reid_batch.models.targets import TargetInput

CPU_BATCH_SIZE = 256
# On a CPU a batch is best kept cache-sized: a large generator's time per candidate grows with the batch (measured
# in docs/results/2026-12-08-code-notes.md). `auto` keeps batch x generator pixels within this budget.
CPU_AUTO_PIXELS = 2 * 1024 * 1024
MAX_AUTO_BATCH_SIZE = 4096


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


def regenerate_images(generator, ids: Iterable[int] | np.ndarray, seed: int, device: torch.device) -> Tensor:
    """[0, 1] float32 images of candidates `ids`, from their counter-based latents (the same in any batch).

    Always in float32, whatever `mixed_precision` says: sample, score, evaluate and the Ledoit-Wolf reference all
    render through here, so the images scored and reported are the ones whose statistics selected them (bf16
    rendering changes a sizeable share of the 8-bit levels). Mixed precision applies to the target only."""
    # A copy: ids read from Parquet are read-only arrays, which torch warns about sharing.
    ids = torch.from_numpy(np.array(ids, dtype=np.int64))
    latents = latents_for_ids(seed, ids, generator.config.latent_dim).to(device)
    with torch.inference_mode(), torch.autocast(device.type, enabled=False):
        raw = generator(latents)
    return generator_to_unit(raw.float(), generator.config.output_range)


class DynamicBatch(nn.Module):
    """A compiled generator whose one graph serves every batch size.

    Left to itself, Dynamo compiles a graph specialised to the first batch size (the warm-up's 2), recompiles a
    dynamic one at the next size, and again for a batch of 1 (sizes 0 and 1 are always specialised): three
    compilations of minutes each for a 1024 px PGGAN on a GPU, and more with an `auto` sizer that halves and grows.
    Marking the batch dimension dynamic from the first call makes the first graph symbolic in the batch size, and a
    lone latent is run as two copies of itself (the generator renders each latent alone: the copy changes nothing),
    so that graph also serves a last batch of 1."""

    def __init__(self, compiled: Callable[[Tensor], Tensor], eager: nn.Module):
        super().__init__()
        self.compiled = compiled
        self.eager = eager  # the parameters and `config` that the callers look up
        self.config = eager.config

    def forward(self, latents: Tensor) -> Tensor:
        count = len(latents)
        if count == 0:  # no graph for nothing: an empty batch would only add a specialised compilation
            return self.eager(latents)
        # Dynamo also guards on how the input was made: a tensor made under inference_mode (the warm-up's) and one
        # made outside it (regenerate_images' latents) differ in dispatch keys, and the second recompiled. A copy made
        # here under inference_mode gives every call the same kind of input (B x latent_dim floats: nothing to copy).
        with torch.inference_mode():
            latents = latents.repeat(2, *([1] * (latents.dim() - 1))) if count == 1 else latents.clone()
            torch._dynamo.mark_dynamic(latents, 0)
            return self.compiled(latents)[:count]


def prepare_models(generator, target, device: torch.device, compile: bool = False):
    """(generator, target) ready for inference: channels_last (NHWC convolutions: tensor cores take them without
    transposes, and oneDNN's CPU convolutions are faster in it too), and the generator torch.compile'd if asked (the
    target is left as is: the objective's hooks record its activations, which a compiled graph would not expose
    as they are). Converts the modules in place.

    A compiled generator is run once here on two latents: torch.compile compiles lazily, so a failure (no C
    compiler for Triton in the runtime image, an inductor error) would otherwise kill the shard at its first batch.
    On failure the eager generator is used and a `compile_failed` event says why. The compiled generator is wrapped
    in DynamicBatch, so that this warm-up's graph is the one every later batch size runs."""
    generator = generator.to(memory_format=torch.channels_last)
    target = target.to(memory_format=torch.channels_last)
    if compile:
        compiled = DynamicBatch(torch.compile(generator), generator)
        try:
            with torch.inference_mode():
                compiled(torch.zeros(2, generator.config.latent_dim, device=device))
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 -- any compiler failure: the eager model computes the same thing
            log.event("compile_failed", error=f"{type(exc).__name__}: {exc}"[:500], fallback="eager")
        else:
            generator = compiled
    return generator, target


def target_input_spec(spec: TargetSpec) -> TargetInput:
    """How the manifest says the target reads an image (size, channels, normalisation)."""
    return TargetInput(size=spec.input.size, channels=spec.input.channels, mean=tuple(spec.input.mean),
                       std=tuple(spec.input.std))


# `auto` on CUDA: the first batch is a probe of this many items, whose peak allocation gives the bytes one item needs.
PROBE_BATCH_SIZE = 8
# The share of the free memory that batches are sized to fill: the rest absorbs fragmentation of the caching
# allocator and whatever the work allocates that the probe did not see (a longer chunk's columns, another stage).
AUTO_MEMORY_FILL = 0.8
# Successful batches in a row after which a halved `auto` size is doubled again (towards its start). Doubled each
# time a regrown size runs out of memory again, so a size that really does not fit is retried ever more rarely
# (one failed batch per 16, 32, 64, ... good ones) while a transient out-of-memory costs only 16 slower batches.
GROW_AFTER_SUCCESSES = 16


def power_of_two_at_most(value: int) -> int:
    return 1 << (max(1, int(value)).bit_length() - 1)


def size_from_memory(free_bytes: int, bytes_per_item: int, largest_useful: int,
                     fill: float = AUTO_MEMORY_FILL) -> int:
    """The `auto` batch on CUDA: the largest power of two whose items (bytes_per_item each, as measured) fit in
    `fill` of the free memory, no more than MAX_AUTO_BATCH_SIZE nor than the power of two covering
    `largest_useful` items (a process's share of a chunk); at least 1."""
    cover = 1 << max(0, int(largest_useful) - 1).bit_length()
    fits = int(free_bytes * fill) // max(1, int(bytes_per_item))
    return power_of_two_at_most(min(MAX_AUTO_BATCH_SIZE, cover, max(1, fits)))


class CudaMemory:
    """What the `auto` sizer reads of one CUDA device: the memory free to this process (the driver's free memory
    plus what PyTorch's caching allocator holds unused) and the peak allocation of the work since `begin`."""

    def __init__(self, device: torch.device):
        self.device = device
        self._base = 0

    def free_bytes(self) -> int:
        free, _ = torch.cuda.mem_get_info(self.device)
        cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        return int(free + cached)

    def begin(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._base = torch.cuda.memory_allocated(self.device)

    def peak_bytes(self) -> int:
        torch.cuda.synchronize(self.device)
        return max(0, torch.cuda.max_memory_allocated(self.device) - self._base)


class BatchSizer:
    """A fixed batch size, or `auto`.

    `auto` on a CPU: the largest power of two up to 256 whose images (pixels_per_item each) stay within
    CPU_AUTO_PIXELS. `auto` on CUDA: the first batch is a probe of PROBE_BATCH_SIZE items whose peak allocation is
    the per-item footprint; the size is then the largest power of two that fills AUTO_MEMORY_FILL of the free
    memory (size_from_memory). Any size halves on an out-of-memory error until a batch fits, and after
    GROW_AFTER_SUCCESSES good batches in a row it doubles again, up to the size it started from: one transient
    out-of-memory (another process's spike, a fragmented cache) does not slow the rest of a long run. Without a
    memory reader (`memory`: CudaMemory on a real GPU; tests pass a stand-in) it starts from the power of two that
    covers `largest_useful` items, capped at MAX_AUTO_BATCH_SIZE."""

    def __init__(self, configured: int | str, device: torch.device, largest_useful: int,
                 pixels_per_item: int | None = None, memory: Any = "default"):
        self.adaptive = configured == "auto" and device.type == "cuda"
        self.largest_useful = int(largest_useful)
        if memory == "default":
            memory = CudaMemory(device) if self.adaptive and torch.cuda.is_available() else None
        self.memory = memory if self.adaptive else None
        self.bytes_per_item: int | None = None  # measured by the probe batch
        if configured != "auto":
            self.size = int(configured)
        elif device.type == "cuda":
            self.size = min(MAX_AUTO_BATCH_SIZE, 1 << max(0, self.largest_useful - 1).bit_length())
        else:
            fits = max(1, CPU_AUTO_PIXELS // max(1, pixels_per_item or 1))
            self.size = min(CPU_BATCH_SIZE, 1 << (fits.bit_length() - 1))
        self.ceiling = self.size  # growth returns to the start size, never beyond it
        self.grow_after = GROW_AFTER_SUCCESSES
        self._successes = 0
        self._regrown = False  # the current size was reached by growing back

    def run(self, items: np.ndarray, work: Callable[[np.ndarray], Any]) -> list[Any]:
        results, at = [], 0
        while at < len(items):
            probing = self.memory is not None and self.bytes_per_item is None
            size = min(self.size, PROBE_BATCH_SIZE) if probing else self.size
            batch = items[at : at + size]
            if probing:
                self.memory.begin()
            out_of_memory = False
            try:
                results.append(work(batch))
            except torch.cuda.OutOfMemoryError:
                if not self.adaptive or size == 1:
                    raise
                out_of_memory = True
            if out_of_memory:  # handled outside `except`, once the failed batch's tensors are released
                torch.cuda.empty_cache()
                self._shrink(size)
                continue
            if probing:
                self._size_from_probe(len(batch))
            elif self.adaptive:
                self._count_success()
            at += len(batch)
        return results

    def _shrink(self, failed: int) -> None:
        self.size = max(1, min(self.size, failed) // 2)
        if self._regrown:  # the size grown back to did not fit again: wait twice as long before the next try
            self.grow_after *= 2
        self._regrown, self._successes = False, 0
        log.event("batch_size_halved", batch_size=self.size, reason="CUDA out of memory")

    def _count_success(self) -> None:
        self._successes += 1
        if self._successes >= self.grow_after and self.size < self.ceiling:
            self.size = min(self.ceiling, self.size * 2)
            self._regrown, self._successes = True, 0
            log.event("batch_size_grown", batch_size=self.size, after_successes=self.grow_after)

    def _size_from_probe(self, probed: int) -> None:
        self.bytes_per_item = max(1, self.memory.peak_bytes() // max(1, probed))
        free = self.memory.free_bytes()
        self.size = self.ceiling = size_from_memory(free, self.bytes_per_item, self.largest_useful)
        log.event("batch_size_measured", batch_size=self.size, bytes_per_item=self.bytes_per_item,
                  free_bytes=free, probe=probed)


@torch.inference_mode()
def generate_unit(generator: PGGANGenerator, latents: Tensor, batch_size: int = 16) -> Tensor:
    """Float32 [0, 1] images of given latents on the CPU, `batch_size` at a time on the generator's device."""
    device = next(generator.parameters()).device
    out = [generator_to_unit(generator(latents[i:i + batch_size].to(device)).float(), generator.config.output_range).cpu()
           for i in range(0, len(latents), batch_size)]
    return torch.cat(out)


def id_latents(seed: int, first_id: int, count: int, latent_dim: int) -> Tensor:
    """Latents of ids first_id .. first_id + count - 1 (a figure's or a reference set's reserved range)."""
    return latents_for_ids(seed, first_id + torch.arange(count), latent_dim)


def generated_features(generator, ids: np.ndarray, seed: int, device, *, features: Callable[[Tensor], np.ndarray],
                       sizer: BatchSizer, each_batch: Callable[[Tensor], None] | None = None) -> np.ndarray:
    """features() of the grey [0, 1] CPU images of latent ids, batch by batch through `sizer` (an `auto` one halves
    on CUDA out-of-memory): never more than one batch of images in memory, whatever the number of ids (evaluate's
    leak candidates, calibrate's prior sets).

    each_batch, if given, also sees every batch of images as generated (for a second measure in the same pass). It
    runs after features(), as the batch's last step: a batch that runs out of memory is retried smaller, and one
    that failed in features() must not have left a result in each_batch's list already."""

    def work(batch: np.ndarray) -> np.ndarray:
        images = regenerate_images(generator, batch, seed, device)
        grey = images.mean(dim=1, keepdim=True) if images.shape[1] > 1 else images
        result = features(grey.float().cpu())
        if each_batch is not None:
            each_batch(images)
        return result

    parts = sizer.run(np.asarray(ids, dtype=np.int64), work)
    if parts:
        return np.concatenate(parts)
    size = generator.config.resolution
    return features(torch.zeros(0, 1, size, size))
