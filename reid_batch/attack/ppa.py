"""Per-sample latent optimisation, the core of a Plug & Play-style attack (Struppek et al. 2022).

The study's stage 1 learns a distribution: fresh latents every step, statistics of a whole training set, so nothing
pulls one candidate toward one patient. Here each latent is its own optimisation problem, for a requested class:

  1. search:   `search` latents per class, keep the `optimise` with the highest target confidence for the class,
               averaged over `search_views` random views (crop, rotation, brightness);
  2. optimise: Adam on the latents only (the generator and the target stay frozen), loss per sample
               -log p(class | random view of G(z)) + latent_penalty * (mean(z^2) - 1)^2, plus any per-sample
               prior term the target returns beside its logits (the stage's per-sample BatchNorm term);
  3. keep:     the `keep` with the highest confidence averaged over `final_views` random views.

Pure torch: a generator (latents -> [0, 1] images, differentiable) and a target (a callable [0, 1] images ->
logits, or -> (logits, per-sample penalty (N,)) to add a term computed in the same forward pass) in, latents and
confidences out; the pipeline stage that shards, resumes and writes Parquet is built on it.

Batched and exact: every random draw of sample i at step t comes from a counter-based stream keyed by (seed, t,
sample key) (pggan.latents_for_ids), and the loss is a sum of per-sample terms, so each latent's gradient, and with
Adam's element-wise update its whole trajectory, is the same whether it is optimised alone or in any batch (up to
floating-point summation order in batched convolutions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from reid_batch.attack.generation import BatchSizer
from reid_batch.models.pggan import latents_for_ids

# Keys of the random streams: a search or final view, and an optimisation step, never share one.
_SEARCH_STREAM, _FINAL_STREAM, _STEP_STREAM = 1, 2, 3


@dataclass(frozen=True)
class PPASettings:
    """Defaults sized for the demo's world, far smaller than PPA's CelebA config (search 5,000, optimise 200 for 70
    epochs, keep 50 per class). lr 2e-2, not PPA's 5e-3, and these crops, because they found the identity control's
    patients most often of the settings tried with bench/ppa_identity.py (docs/results/2026-12-08-code-notes.md)."""

    search: int = 200
    optimise: int = 8
    keep: int = 4
    steps: int = 150
    lr: float = 2e-2
    betas: tuple[float, float] = (0.1, 0.1)
    search_views: int = 4
    final_views: int = 32
    crop_scale: tuple[float, float] = (0.8, 1.0)  # area of the random crop, as a share of the image
    rotation_deg: float = 5.0
    brightness: float = 0.1
    latent_penalty: float = 1e-3
    # What the kept samples are ranked by over the final views: "probability" (PPA's confidence) saturates at 1.0
    # after optimisation, "margin" (the class logit minus the largest other) keeps ranking where it does.
    keep_by: str = "probability"
    # The class loss of each step: "cross_entropy", or PPA's "poincare" (the Poincare distance between the
    # L1-normalised logits and the one-hot class), whose gradient does not vanish once the class is certain.
    loss: str = "cross_entropy"
    # Random views of each image per optimisation step, their losses averaged (PPA: 1; more views average the
    # gradient over transformations, at that many times the cost of a step).
    step_views: int = 1


def _uniforms(seed: int, stream: int, step: int, keys: Tensor, count: int) -> Tensor:
    """(N, count) U(0, 1) draws, a pure function of (seed, stream, step, key) for each key."""
    mixed = (np.asarray(keys.cpu(), np.int64) * 1_000_003 + step * 7_919 + stream) & ((1 << 62) - 1)
    normals = latents_for_ids(seed, mixed, count)
    return 0.5 * (1.0 + torch.erf(normals.double() / math.sqrt(2.0))).float()


def random_views(images01: Tensor, uniforms: Tensor, settings: PPASettings) -> Tensor:
    """One random view of each image: a crop of area in crop_scale at a random place, resized back to the full size,
    rotated by up to +-rotation_deg, brightness shifted by up to +-brightness, clamped to [0, 1]. Differentiable
    (one affine grid per image). uniforms: (N, 5) in [0, 1)."""
    u = uniforms.to(images01.device, images01.dtype)
    low, high = settings.crop_scale
    side = torch.sqrt(low + (high - low) * u[:, 0])  # the crop's side, as a share of the image's
    # The crop's centre moves within what the crop leaves free; grid coordinates span [-1, 1].
    shift_x = (1 - side) * (2 * u[:, 1] - 1)
    shift_y = (1 - side) * (2 * u[:, 2] - 1)
    angle = torch.deg2rad(settings.rotation_deg * (2 * u[:, 3] - 1))
    cos, sin = torch.cos(angle) * side, torch.sin(angle) * side
    theta = torch.stack([torch.stack([cos, -sin, shift_x], 1), torch.stack([sin, cos, shift_y], 1)], 1)
    grid = F.affine_grid(theta, list(images01.shape), align_corners=False)
    views = F.grid_sample(images01, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return (views + settings.brightness * (2 * u[:, 4:5, None, None] - 1)).clamp(0.0, 1.0)


def _logits_and_penalty(output) -> tuple[Tensor, Tensor | None]:
    return (output[0], output[1]) if isinstance(output, tuple) else (output, None)


def view_confidence(generator: Callable[[Tensor], Tensor], target: Callable[[Tensor], Tensor], latents: Tensor,
                    classes: Tensor, keys: Tensor, *, views: int, stream: int, settings: PPASettings,
                    seed: int, measure: str = "probability") -> Tensor:
    """(N,) the target's softmax probability of each latent's class (measure "margin": its logit minus the largest
    other logit), averaged over `views` random views."""
    with torch.no_grad():
        images = generator(latents)
        total = torch.zeros(len(latents), device=latents.device)
        for view in range(views):
            logits, _ = _logits_and_penalty(target(random_views(images, _uniforms(seed, stream, view, keys, 5),
                                                                settings)))
            logits = logits.float()
            if measure == "margin":
                own = logits.gather(1, classes[:, None]).squeeze(1)
                total += own - logits.scatter(1, classes[:, None], float("-inf")).amax(dim=1)
            else:
                total += torch.softmax(logits, dim=1).gather(1, classes[:, None]).squeeze(1)
    return total / max(views, 1)


def poincare_loss(logits: Tensor, classes: Tensor, xi: float = 1e-4) -> Tensor:
    """(N,) PPA's Poincare loss (Struppek et al. 2022, after Li et al. 2019): the hyperbolic distance between the
    logits scaled to unit L1 norm and the one-hot class pulled xi inside the unit ball."""
    u = logits / logits.abs().sum(dim=1, keepdim=True).clamp_min(1e-12)
    v = (F.one_hot(classes, logits.shape[1]).to(logits.dtype) - xi).clamp(0.0, 1.0)
    # |u|_2 <= |u|_1 = 1, reaching 1 only when a single logit is non-zero: kept off the boundary, where the distance
    # is infinite.
    inside = (1 - u.pow(2).sum(dim=1)).clamp_min(1e-6) * (1 - v.pow(2).sum(dim=1))
    return torch.acosh(1 + 2 * (u - v).pow(2).sum(dim=1) / inside)


def optimise_latents(generator: Callable[[Tensor], Tensor], target: Callable[[Tensor], Tensor], latents: Tensor,
                     classes: Tensor, keys: Tensor, settings: PPASettings, *, seed: int,
                     on_step: Callable[[int, Tensor], None] | None = None) -> Tensor:
    """Adam on a copy of `latents` (N, D) toward `classes` (N,); keys (N,) name each sample's random stream.
    Returns the optimised latents (detached). on_step(step, per-sample loss) sees every step."""
    z = latents.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=settings.lr, betas=settings.betas)
    count = settings.step_views
    for step in range(settings.steps):
        images = generator(z)
        # `step_views` random views of each image in one target pass; the class loss is their mean (the per-sample
        # penalty the target returns beside the logits too).
        views = torch.cat([random_views(images, _uniforms(seed, _STEP_STREAM, step * count + v, keys, 5), settings)
                           for v in range(count)]) if count > 1 else \
            random_views(images, _uniforms(seed, _STEP_STREAM, step, keys, 5), settings)
        logits, penalty = _logits_and_penalty(target(views))
        repeated = classes.repeat(count)
        class_loss = poincare_loss(logits.float(), repeated) if settings.loss == "poincare" else \
            F.cross_entropy(logits.float(), repeated, reduction="none")
        class_loss = class_loss.view(count, -1).mean(dim=0)
        if penalty is not None:
            penalty = penalty.float().view(count, -1).mean(dim=0)
        norm_loss = settings.latent_penalty * (z.pow(2).mean(dim=1) - 1.0).pow(2)
        loss = class_loss + norm_loss + (0.0 if penalty is None else penalty.float())
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()  # a sum, not a mean: each latent's gradient is independent of the batch
        optimizer.step()
        if on_step is not None:
            on_step(step, loss.detach())
    return z.detach()


@dataclass(frozen=True)
class PPAResult:
    """The kept samples of one class: their search ids, optimised latents and final confidences (best first)."""

    ids: np.ndarray
    latents: Tensor
    confidence: Tensor
    searched_confidence: Tensor  # the same samples' confidence before optimisation


@dataclass
class Sizers:
    """The batch sizes of one attack: `search` for the passes without gradients (search and final views), `optimise`
    for the Adam groups (their backward pass holds far more memory per latent). With `auto` on a GPU each halves on
    an out-of-memory error until a group fits (attack.generation.BatchSizer), which changes the result only by
    floating-point rounding: a latent's path does not depend on its group (in float32 some CPUs' convolutions round
    differently by batch size, and Adam can grow that; tests compare groups in float64). Made once per target, so a size learnt on one class serves the next."""

    search: BatchSizer
    optimise: BatchSizer

    @classmethod
    def of(cls, batch_size: int | str, device: torch.device | str, count: int) -> "Sizers":
        device = torch.device(device)
        return cls(BatchSizer(batch_size, device, count), BatchSizer(batch_size, device, count))


def attack_class(generator: Callable[[Tensor], Tensor], target: Callable[[Tensor], Tensor], cls: int,
                 search_ids: np.ndarray, latent_dim: int, settings: PPASettings, *, seed: int,
                 device: torch.device | str = "cpu", batch_size: int | str | Sizers = 64) -> PPAResult:
    """Search, optimise and keep for class `cls`. search_ids: the ids whose latents (latents_for_ids(seed, id))
    are searched; the kept samples are named by them. batch_size: latents per pass (an int, "auto", or Sizers)."""
    sizers = batch_size if isinstance(batch_size, Sizers) else Sizers.of(batch_size, device, len(search_ids))
    search_ids = np.asarray(search_ids, np.int64)
    keys = torch.from_numpy(search_ids.copy())
    classes = torch.full((len(search_ids),), int(cls), dtype=torch.long, device=device)
    latents = latents_for_ids(seed, search_ids, latent_dim).to(device)

    def confidence(rows: np.ndarray, candidates: Tensor, views: int, stream: int, measure: str) -> Tensor:
        """(len(rows),) confidence of candidates[rows], whose random streams are keys[rows], in sized batches."""
        return torch.cat(sizers.search.run(np.arange(len(rows)), lambda at: view_confidence(
            generator, target, candidates[torch.from_numpy(at).to(device)], classes[:len(at)],
            keys[torch.from_numpy(rows[at])], views=views, stream=stream, settings=settings, seed=seed,
            measure=measure).cpu()))

    everything = np.arange(len(search_ids))
    scores = confidence(everything, latents, settings.search_views, _SEARCH_STREAM, "probability")
    chosen = torch.argsort(-scores, stable=True)[:settings.optimise].numpy()
    # In sized groups: memory stays bounded whatever `optimise` is, and each latent's trajectory does not depend on
    # the group it is in (see the module docstring), so the groups give what one batch would.
    optimised = torch.cat(sizers.optimise.run(chosen, lambda group: optimise_latents(
        generator, target, latents[torch.from_numpy(group).to(device)], classes[:len(group)],
        keys[torch.from_numpy(group)], settings, seed=seed)))
    final = confidence(chosen, optimised, settings.final_views, _FINAL_STREAM, "probability")
    rank = final if settings.keep_by == "probability" else \
        confidence(chosen, optimised, settings.final_views, _FINAL_STREAM, settings.keep_by)
    best = torch.argsort(-rank, stable=True)[:settings.keep]
    return PPAResult(search_ids[chosen[best.numpy()]], optimised[best.to(device)].cpu(), final[best],
                     scores[torch.from_numpy(chosen[best.numpy()])])
