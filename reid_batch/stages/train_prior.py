"""Recipe: train the PGGAN prior on the public pool (progressive growing, WGAN-GP, EMA generator).

Karras et al. (2018), "Progressive Growing of GANs": training starts at 4x4 and adds one scale at a time. Each
new scale is first faded in (alpha 0 -> 1, weight of the newest scale) and then stabilised; the 4x4 scale has only
a stabilise phase. Every phase shows the critic `images_per_phase` real images (the last, at the full resolution,
`final_phase_images` when given), drawn from the public pool
(NIH in the study, its synthetic stand-in by default), loaded at the generator's resolution and average-pooled to
the current scale. During a fade the real images are blended the same way as the generator's output
(alpha * current scale + (1 - alpha) * upsampled half scale, Karras' "lerp" of the training data), so the
critic never sees a resolution mismatch between real and generated images.

Loss: WGAN-GP, critic loss D(fake) - D(real) + gp_weight * (||grad D(x_hat)|| - 1)^2 + 0.001 * D(real)^2 (the
drift term keeps the critic's scores near zero), generator loss -D(fake); Adam with betas (0, 0.99) for both,
whose state is reset when a new scale starts fading in (Karras' reset_opt_for_new_lod). The generator is
Segal et al.'s architecture (reid_batch.models.pggan) declared in [0, 1] with no output activation, so real
images enter the critic in the generator's declared range and no tanh is ever added.

EMA: the output prior is an exponential moving average of the generator's weights with decay `ema_decay`, whose
half-life is additionally capped at 1% of the generator steps done so far (StyleGAN2's ema_rampup, smaller):
a longer memory averages in weights from the fade-in, when the newest scale's toRGB was still near its
initialisation, and the averaged generator comes out dark; 1% was the cap with the lowest Fréchet-PCA distance
of those tried (docs/results/2026-12-08-code-notes.md). Long runs reach the `ema_decay` cap and are governed by it.

Resumable: every `checkpoint_every` generator steps <run>/prior/resume.pt holds G, D, the EMA, both optimisers,
the step (from which the phase, alpha and images seen follow) and the loss history, written atomically. No RNG
state is saved because none is carried: every random draw of step s (real-batch indices, latents, interpolation
weights) comes from a generator seeded by (seed, s), and initial weights from the seed alone, so a resumed run
draws exactly what an uninterrupted one would and ends equal to it on CPU.

Outputs under <run>/prior/ (committed together): generator.safetensors (the EMA generator, pggan's "reid"
format), discriminator.safetensors (the critic at the end of training, for fine-tuning's optional `discriminator`
term; pggan.discriminator_bytes), samples_before.png / samples.png (8x8 grids from fixed latents, untrained and trained), metrics.json
(the distribution distance below, before and after), losses.parquet (one row per generator step).

Distribution distance, "Fréchet-PCA": the Fréchet distance between Gaussians fitted to features of generated and
real images, where the features are the coordinates in a fixed basis of (up to) 64 principal components fitted
on real public images at the final resolution. FID's Inception-v3 weights cannot be downloaded here (and an
untrained Inception measures nothing); the PCA basis is cheap, deterministic and captures the dominant modes
of chest-X-ray structure (overall exposure, lung fields, heart, mediastinum), and the Fréchet distance compares
both the mean and the covariance of those modes, so it catches mode collapse as well as wrong image content.
The same number of images enters each set, and the distance between two disjoint real sets of that size is
reported as the floor a perfect generator would reach.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from reid_batch import log
from reid_batch.analysis.metrics import feature_statistics, fit_pca, frechet_distance
from reid_batch.artifacts import prior_config
from reid_batch.attack.generation import generate_unit, id_latents
from reid_batch.data.datasets import ImageDataset, read_source
from reid_batch.errors import InputError
from reid_batch.formats import grid_png, parquet_bytes
from reid_batch.layout import DISCRIMINATOR_FILE, GENERATOR_FILE, PRIOR_DISTANCE_ID_OFFSET, PRIOR_PREFIX, PRIOR_RESUME_KEY
from reid_batch.manifest import Manifest, PriorTrainSpec
from reid_batch.models.pggan import (PGGANConfig, PGGANDiscriminator, PGGANGenerator, discriminator_bytes,
                                     generator_bytes, minibatch_stddev)
from reid_batch.runtime import load_state, pick_device, run_store, save_state


ADAM_BETAS = (0.0, 0.99)
DRIFT_WEIGHT = 0.001
EMA_RAMPUP = 0.01

GRID_SIDE = 8
DISTANCE_COMPONENTS = 64
DISTANCE_IMAGES = 512
PCA_FIT_IMAGES = 2048
GENERATION_BATCH = 128
# Above this the public pool is read from disk batch by batch instead of being held in memory.
IN_MEMORY_LIMIT_BYTES = 4 * 2**30
LOG_EVERY = 50

def gradient_penalty(critic: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor, fake: torch.Tensor,
                     epsilon: torch.Tensor) -> torch.Tensor:
    """Mean of (||grad_x critic(x)|| - 1)^2 at x = epsilon * real + (1 - epsilon) * fake (Gulrajani et al.).

    `epsilon` (N, 1, 1, 1) is passed in so the caller's seeded generator decides it. The graph is kept so the
    penalty trains the critic (double backward).
    """
    mixed = (epsilon * real.detach() + (1.0 - epsilon) * fake.detach()).requires_grad_(True)
    scores = critic(mixed)
    (gradient,) = torch.autograd.grad(scores.sum(), mixed, create_graph=True)
    return (gradient.flatten(1).norm(2, dim=1) - 1.0).pow(2).mean()


# ------------------------------------------------------------------------------------------------ schedule


@dataclass(frozen=True)
class Schedule:
    """Phase p of a run: p = 0 stabilises 4x4; then for each further scale a fade-in (odd p) and a stabilise phase.
    Each phase is `steps_per_phase` generator steps but the last (the full resolution, stabilising), which is
    `final_steps` (default: the same); everything is a pure function of the step."""

    num_scales: int
    steps_per_phase: int
    final_steps: int | None = None

    @classmethod
    def for_spec(cls, num_scales: int, spec: PriorTrainSpec) -> "Schedule":
        images_per_step = spec.batch_size * spec.n_critic
        final = (None if spec.final_phase_images is None
                 else max(1, math.ceil(spec.final_phase_images / images_per_step)))
        return cls(num_scales, max(1, math.ceil(spec.images_per_phase / images_per_step)), final)

    @property
    def num_phases(self) -> int:
        return 2 * self.num_scales - 1

    @property
    def last_phase_steps(self) -> int:
        return self.steps_per_phase if self.final_steps is None else self.final_steps

    @property
    def total_steps(self) -> int:
        return (self.num_phases - 1) * self.steps_per_phase + self.last_phase_steps

    def at(self, step: int) -> tuple[int, int, float]:
        """(phase, depth, alpha) of generator step `step` (0-based)."""
        if not 0 <= step < self.total_steps:
            raise ValueError(f"step must be in [0, {self.total_steps}), got {step}")
        phase, within = divmod(step, self.steps_per_phase)
        phase = min(phase, self.num_phases - 1)  # the last phase may be longer than the others
        depth = (phase + 1) // 2
        alpha = within / self.steps_per_phase if phase % 2 == 1 else 1.0
        return phase, depth, alpha

    def starts_fade(self, step: int) -> bool:
        phase, within = divmod(step, self.steps_per_phase)
        return phase < self.num_phases - 1 and phase % 2 == 1 and within == 0


def real_at_scale(images: torch.Tensor, depth: int, alpha: float) -> torch.Tensor:
    """Full-resolution images average-pooled to scale `depth`; during a fade blended with the upsampled half
    scale exactly as the generator's output is."""
    size = 4 * 2**depth
    factor = images.shape[-1] // size
    if factor * size != images.shape[-1]:
        raise ValueError(f"cannot pool {tuple(images.shape)} images to {size}x{size}")
    current = F.avg_pool2d(images, factor) if factor > 1 else images
    if depth > 0 and alpha < 1.0:
        coarser = F.interpolate(F.avg_pool2d(current, 2), scale_factor=2, mode="nearest")
        current = alpha * current + (1.0 - alpha) * coarser
    return current


def step_generator(seed: int, step: int) -> torch.Generator:
    """The only source of randomness of generator step `step`; independent of everything drawn before it."""
    state = np.random.SeedSequence([int(seed), int(step), 0x5052494F52]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def ema_beta(ema_decay: float, steps_done: int) -> float:
    """Per-step EMA decay: `ema_decay`, with the half-life capped at EMA_RAMPUP * steps_done (see module doc)."""
    ramped = 0.5 ** (1.0 / max(EMA_RAMPUP * steps_done, 1e-8))
    return min(float(ema_decay), ramped)


# ------------------------------------------------------------------------------------------------ real images


class RealPool:
    """The public pool's images at the generator's resolution, in [0, 1]: held in memory when they fit, else
    loaded from disk for each batch."""

    def __init__(self, frame: pd.DataFrame, size: int, channels: int, on_error: str):
        self.dataset = ImageDataset(frame, size=size, channels=channels, on_error=on_error)
        if len(self.dataset) == 0:
            raise InputError("the public pool has no readable images to train the prior on", where="data.public")
        self.cached: torch.Tensor | None = None
        if len(self.dataset) * channels * size * size * 4 <= IN_MEMORY_LIMIT_BYTES:
            self.cached = torch.stack([self.dataset[i]["image"] for i in
                                       log.progress(range(len(self.dataset)), desc="load public images",
                                                    total=len(self.dataset), every=500)])

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, indices: torch.Tensor) -> torch.Tensor:
        if self.cached is not None:
            return self.cached[indices]
        return torch.stack([self.dataset[int(i)]["image"] for i in indices])


def unit_to_range(images01: torch.Tensor, output_range: tuple[float, float]) -> torch.Tensor:
    low, high = output_range
    return low + images01 * (high - low)


# ------------------------------------------------------------------------------------------------ the loop


def build_networks(config: PGGANConfig, seed: int) -> tuple[PGGANGenerator, PGGANDiscriminator]:
    """Initial G and D, a pure function of (config, seed); the caller's global RNG is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = PGGANGenerator(config)
        discriminator = PGGANDiscriminator(config.depths, config.out_channels, config.leakiness)
    return generator, discriminator


class ProgressiveTrainer:
    """G, D, the EMA generator and both optimisers; `train_step(s)` runs generator step s of the schedule."""

    LOSS_COLUMNS = ("step", "phase", "depth", "alpha", "d_loss", "g_loss", "gradient_penalty", "wasserstein")

    def __init__(self, config: PGGANConfig, spec: PriorTrainSpec, device: torch.device | str = "cpu"):
        self.config = config
        self.spec = spec
        self.device = torch.device(device)
        self.schedule = Schedule.for_spec(len(config.depths), spec)
        generator, discriminator = build_networks(config, spec.seed)
        self.generator = generator.to(self.device).train()
        self.discriminator = discriminator.to(self.device).train()
        self.ema = copy.deepcopy(self.generator).eval().requires_grad_(False)
        self.g_optimizer = torch.optim.Adam(self.generator.parameters(), lr=spec.lr, betas=ADAM_BETAS)
        self.d_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=spec.lr, betas=ADAM_BETAS)
        self.step = 0
        self.losses: dict[str, list[float]] = {c: [] for c in self.LOSS_COLUMNS}

    @property
    def images_seen(self) -> int:
        return self.step * self.spec.batch_size * self.spec.n_critic

    @property
    def done(self) -> bool:
        return self.step >= self.schedule.total_steps

    def _real_batch(self, pool, rng: torch.Generator, depth: int, alpha: float) -> torch.Tensor:
        indices = torch.randint(len(pool), (self.spec.batch_size,), generator=rng)
        images = unit_to_range(pool.batch(indices), self.config.output_range).to(self.device)
        return real_at_scale(images, depth, alpha)

    def _latents(self, rng: torch.Generator) -> torch.Tensor:
        return torch.randn(self.spec.batch_size, self.config.latent_dim, generator=rng).to(self.device)

    def train_step(self, pool) -> dict[str, float]:
        step = self.step
        phase, depth, alpha = self.schedule.at(step)
        if self.schedule.starts_fade(step):
            self.g_optimizer.state.clear()
            self.d_optimizer.state.clear()
        rng = step_generator(self.spec.seed, step)
        G, D = self.generator, self.discriminator

        D.requires_grad_(True)
        for _ in range(self.spec.n_critic):
            real = self._real_batch(pool, rng, depth, alpha)
            latents = self._latents(rng)
            epsilon = torch.rand(self.spec.batch_size, 1, 1, 1, generator=rng).to(self.device)
            with torch.no_grad():
                fake = G(latents, depth, alpha)
            real_scores = D(real, depth, alpha)
            fake_scores = D(fake, depth, alpha)
            penalty = gradient_penalty(lambda x: D(x, depth, alpha), real, fake, epsilon)
            wasserstein = real_scores.mean() - fake_scores.mean()
            d_loss = -wasserstein + self.spec.gp_weight * penalty + DRIFT_WEIGHT * real_scores.pow(2).mean()
            self.d_optimizer.zero_grad(set_to_none=True)
            d_loss.backward()
            self.d_optimizer.step()

        D.requires_grad_(False)  # the generator step needs gradients through D, not into it
        g_loss = -D(G(self._latents(rng), depth, alpha), depth, alpha).mean()
        self.g_optimizer.zero_grad(set_to_none=True)
        g_loss.backward()
        self.g_optimizer.step()
        D.requires_grad_(True)

        self.step += 1
        self._update_ema(ema_beta(self.spec.ema_decay, self.step))
        row = {"step": step, "phase": phase, "depth": depth, "alpha": alpha, "d_loss": d_loss.item(),
               "g_loss": g_loss.item(), "gradient_penalty": penalty.item(), "wasserstein": wasserstein.item()}
        for name in self.LOSS_COLUMNS:
            self.losses[name].append(row[name])
        return row

    @torch.no_grad()
    def _update_ema(self, beta: float) -> None:
        for averaged, current in zip(self.ema.parameters(), self.generator.parameters()):
            averaged.lerp_(current, 1.0 - beta)
        for averaged, current in zip(self.ema.buffers(), self.generator.buffers()):
            averaged.copy_(current)

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "phase": self.schedule.at(min(self.step, self.schedule.total_steps - 1))[0],
            "images_seen": self.images_seen,
            "generator": self.generator.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "ema": self.ema.state_dict(),
            "g_optimizer": self.g_optimizer.state_dict(),
            "d_optimizer": self.d_optimizer.state_dict(),
            "losses": {k: list(v) for k, v in self.losses.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.ema.load_state_dict(state["ema"])
        self.g_optimizer.load_state_dict(state["g_optimizer"])
        self.d_optimizer.load_state_dict(state["d_optimizer"])
        self.step = int(state["step"])
        self.losses = {k: list(state["losses"][k]) for k in self.LOSS_COLUMNS}


# ------------------------------------------------------------------------------------------------ distance


def pca_frechet_distance(basis, a: torch.Tensor | np.ndarray, reference: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to the PCA scores of images `a` and precomputed `reference`."""
    scores = a if isinstance(a, np.ndarray) else basis.project(a)
    return frechet_distance(*feature_statistics(scores), *feature_statistics(reference))


class DistanceReference:
    """Fixed real sets and PCA basis for the Fréchet-PCA distance (see module doc)."""

    def __init__(self, pool: RealPool, seed: int, images: int = DISTANCE_IMAGES):
        order = torch.from_numpy(np.random.default_rng(seed).permutation(len(pool)))
        self.count = max(2, min(images, len(pool) // 2))

        self.basis = fit_pca(pool.batch(order[: min(len(pool), PCA_FIT_IMAGES)]), DISTANCE_COMPONENTS, "public pool")
        self.reference = self.basis.project(pool.batch(order[: self.count]))
        self.held_out = self.basis.project(pool.batch(order[self.count: 2 * self.count]))
        self.seed = seed

    def real_floor(self) -> float:
        return pca_frechet_distance(self.basis, self.held_out, self.reference)

    def distance(self, generator: PGGANGenerator) -> float:
        latents = id_latents(self.seed, PRIOR_DISTANCE_ID_OFFSET, self.count, generator.config.latent_dim)
        return pca_frechet_distance(self.basis, generate_unit(generator, latents, GENERATION_BATCH), self.reference)


# ------------------------------------------------------------------------------------------------ outputs


def sample_grid_png(generator: PGGANGenerator, seed: int, side: int = GRID_SIDE) -> bytes:
    """The prior's side x side sample grid at ids 0 .. side^2 - 1 of the training seed."""
    latents = id_latents(seed, 0, side * side, generator.config.latent_dim)
    return grid_png(generate_unit(generator, latents, GENERATION_BATCH), side)


# ------------------------------------------------------------------------------------------------ the shell


def _fingerprint(manifest: Manifest, config: PGGANConfig) -> dict:
    """What a resume state must match: a changed setting would silently mix two different runs."""
    source = manifest.source("public")
    train = manifest.generator.train.model_dump_json(exclude={"checkpoint_every"})  # cadence changes nothing
    return {"config": config.to_json(), "train": train, "public": f"{source.format}:{source.root}"}


def train_prior(manifest: Manifest, on_checkpoint: Callable[[int], None] | None = None) -> dict:
    """Train, or resume, the prior; commit <run>/prior/. Returns metrics.json's content.
    `on_checkpoint(step)` runs after each resume state is written (tests kill the process there)."""
    store = run_store(manifest)
    if store.is_committed(PRIOR_PREFIX):
        log.event("train_prior_skipped", reason="already committed", uri=store.uri(PRIOR_PREFIX))
        return store.read_json(f"{PRIOR_PREFIX}/metrics.json")
    spec = manifest.generator.train
    if spec is None:
        raise InputError("the manifest gives a generator checkpoint; there is no prior to train",
                         where="generator.train")
    config = prior_config(manifest)
    device = pick_device(manifest)
    source = manifest.source("public")
    frame = read_source(source.format, source.root, **({"csv_name": source.csv} if source.csv else {}))
    pool = RealPool(frame, config.resolution, config.out_channels, source.on_error)

    trainer = ProgressiveTrainer(config, spec, device)
    fingerprint = _fingerprint(manifest, config)
    state = load_state(store, PRIOR_RESUME_KEY)
    seconds = 0.0
    if state is not None:
        if state.get("fingerprint") != fingerprint:
            raise InputError(f"{store.uri(PRIOR_RESUME_KEY)} was written with different generator/training/data "
                             "settings; restore them, or delete the file to start over", where="generator")
        trainer.load_state_dict(state)
        seconds = float(state["seconds"])
        log.event("train_prior_resumed", step=trainer.step, images_seen=trainer.images_seen)
    schedule = trainer.schedule
    log.event("train_prior_start", images=len(pool), resolution=config.resolution, depths=list(config.depths),
              steps=schedule.total_steps, steps_per_phase=schedule.steps_per_phase, from_step=trainer.step,
              device=str(device))

    started = time.perf_counter()
    for _ in log.progress(range(trainer.step, schedule.total_steps), desc="prior steps",
                          total=schedule.total_steps - trainer.step, every=LOG_EVERY):
        row = trainer.train_step(pool)
        if trainer.step % LOG_EVERY == 0 or trainer.done or row["step"] % schedule.steps_per_phase == 0:
            log.event("train_prior_step", **{k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()},
                      images_seen=trainer.images_seen)
        if trainer.step % spec.checkpoint_every == 0 and not trainer.done:
            elapsed = seconds + time.perf_counter() - started
            save_state(store, PRIOR_RESUME_KEY, {**trainer.state_dict(), "seconds": elapsed, "fingerprint": fingerprint})
            if on_checkpoint is not None:
                on_checkpoint(trainer.step)
    seconds += time.perf_counter() - started

    untrained, _ = build_networks(config, spec.seed)
    reference = DistanceReference(pool, spec.seed)
    metrics = {
        "distance": "frechet_pca",
        "pca_components": int(reference.basis.components.shape[0]),
        "images_per_set": reference.count,
        "resolution": config.resolution,
        "untrained": reference.distance(untrained),
        "trained": reference.distance(trainer.ema),
        "trained_without_ema": reference.distance(trainer.generator),
        "real_vs_real": reference.real_floor(),
        "steps": trainer.step,
        "steps_per_phase": schedule.steps_per_phase,
        "images_seen": trainer.images_seen,
        "public_images": len(pool),
        "train_seconds": round(seconds, 2),
        "device": str(device),
    }
    with store.committed(PRIOR_PREFIX, {"stage": "train-prior"}) as out:
        out.write_bytes(GENERATOR_FILE, generator_bytes(trainer.ema))
        out.write_bytes(DISCRIMINATOR_FILE, discriminator_bytes(trainer.discriminator))
        out.write_bytes("samples_before.png", sample_grid_png(untrained, spec.seed))
        out.write_bytes("samples.png", sample_grid_png(trainer.ema, spec.seed))
        out.write_json("metrics.json", metrics)
        out.write_bytes("losses.parquet", parquet_bytes(pd.DataFrame(trainer.losses)))
    store.delete(PRIOR_RESUME_KEY)
    log.event("train_prior_done", **{k: metrics[k] for k in ("untrained", "trained", "real_vs_real", "steps",
                                                              "train_seconds")})
    return metrics


def run(manifest: Manifest, target: str | None = None) -> int:
    if manifest.generator.train is None:
        log.event("train_prior_skipped", reason="the manifest gives a generator checkpoint")
        return 0
    train_prior(manifest)
    return 0
