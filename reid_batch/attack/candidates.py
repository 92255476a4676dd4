"""Stage 2's per-candidate statistics: candidate ids in, one row of columns per candidate out (the pure core of
`sample`; the row schema is documented in reid_batch.stages.sample)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from reid_batch import log
from reid_batch.analysis.metrics import pixel_entropy_on_device
from reid_batch.artifacts import load_attack_target
from reid_batch.attack.generation import (BatchSizer, autocast_context, effective_mixed_precision, prepare_models,
                                          regenerate_images, target_input_spec)
from reid_batch.attack.objectives import SCORING_EXCLUDES, TargetObjective, needs_reference_stats
from reid_batch.attack.reference import feature_gaussian, vit_reference_stats
from reid_batch.manifest import Manifest, TargetSpec
from reid_batch.models.targets import to_target_input


def image_statistics(images01: Tensor) -> dict[str, Tensor]:
    """Per-image mean, (population) standard deviation and pixel entropy of [0, 1] images (N, C, H, W)."""
    # Reduced in place over (C, H, W): flattening a channels_last batch would copy it first.
    std, mean = torch.std_mean(images01.detach().float(), dim=(1, 2, 3), correction=0)
    return {"image_mean": mean, "image_std": std, "pixel_entropy": pixel_entropy_on_device(images01).float()}


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

    def __init__(self, generator, objective, *, input_spec, gaussian, num_classes: int, seed: int,
                 device: torch.device, mixed_precision: str = "no"):
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
        return to_numpy_columns(columns), (images.cpu() if images is not None else None)

    def score_on_device(self, ids: np.ndarray, shard: int, keep_images: bool = False) -> tuple[dict, Tensor | None]:
        """As `score`, but the computed columns, and the images if asked, stay tensors on the device: no host-device
        sync per batch; the caller moves a whole chunk at once (`concat_columns`), and images in a writer thread
        (formats.png_files_job)."""
        ids = np.asarray(ids, dtype=np.int64)
        images = regenerate_images(self.generator, ids, self.seed, self.device)  # float32: the one rendering rule
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
        return columns, (images if keep_images else None)

    def table(self, columns: dict[str, np.ndarray]) -> pa.Table:
        return pa.Table.from_arrays([pa.array(columns[f.name], type=f.type) for f in self.schema], schema=self.schema)


def concat_columns(parts: list[dict]) -> dict[str, np.ndarray]:
    """One table's columns from batches' columns (numpy arrays, or device tensors: moved once, here)."""
    parts = [p for p in parts if p and len(p["id"])]
    if not parts:
        return {}
    return {k: torch.cat([p[k] for p in parts]).cpu().numpy() if isinstance(parts[0][k], Tensor)
            else np.concatenate([p[k] for p in parts]) for k in parts[0]}


def build_objective(manifest: Manifest, spec: TargetSpec, model, accelerator) -> TargetObjective:
    """The frozen target's objective as sampling scores it (with its reference statistics where it needs them)."""
    reference = vit_reference_stats(manifest, spec, model, accelerator) \
        if needs_reference_stats(model, spec.family) else None
    index = manifest.targets.index(spec)
    objective = TargetObjective(model, spec.terms, spec.objective, reference, family=spec.family,
                                field_prefix=f"targets[{index}].objective")
    if objective.fallback is not None:
        log.event("scoring_objective_fallback", target=spec.name, **objective.fallback)
    return objective


def build_scorer(manifest: Manifest, spec: TargetSpec, generator, accelerator, sizer: BatchSizer) -> CandidateScorer:
    """A generator (on the accelerator's device, eval mode) scored against the frozen target with the target's
    objective terms and Mahalanobis model: sample's scorer for the fine-tuned generator, evaluate's for the prior."""
    device = accelerator.device
    model, num_classes = load_attack_target(manifest, spec)
    generator, model = prepare_models(generator, model.to(device), device, manifest.sampling.compile)
    objective = build_objective(manifest, spec, model, accelerator)
    gaussian = feature_gaussian(manifest, spec, objective, accelerator, sizer)
    log.event("mahalanobis_model", target=spec.name, **gaussian.summary())
    precision = effective_mixed_precision(device, manifest.sampling.mixed_precision)
    if precision != manifest.sampling.mixed_precision:
        log.event("mixed_precision_not_used", asked=manifest.sampling.mixed_precision, device=str(device),
                  reason="autocast is used on CUDA only (bf16 where the GPU supports it)")
    return CandidateScorer(generator, objective, input_spec=target_input_spec(spec), gaussian=gaussian,
                           num_classes=num_classes, seed=manifest.sampling.seed, device=device,
                           mixed_precision=precision)
