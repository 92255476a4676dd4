"""What the phases of one `evaluate` call share: models and features made once per call (`Shared`), and one target's
run of the phases (`TargetRun`: the manifest, the target, the device, the feature space, the notes it collects)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from reid_batch.analysis.metrics import InceptionFeatures
from reid_batch.analysis.space import FeatureSpace
from reid_batch.artifacts import load_demographic_model, load_reid_model
from reid_batch.attack.generation import BatchSizer
from reid_batch.manifest import Manifest, TargetSpec
from reid_batch.models.demographics import predict_demographics
from reid_batch.storage import input_path

CONFIDENCE = 0.95  # every interval of the evaluation


@dataclass
class Shared:
    """What every target of one `evaluate` call shares: the Inception network, the feature space, the prior's image
    set and its raw candidates' features."""
    inception_network: object | None = None
    space: FeatureSpace | None = None
    prior_images: torch.Tensor | None = None
    prior_features: np.ndarray | None = None
    prior_candidate_features: np.ndarray | None = None
    prior_candidate_demographics: dict[str, np.ndarray] | None = None
    demographic_model: object | None = None
    prior_identity: dict = field(default_factory=dict)  # the prior's identity-control result, per gallery
    sizer: BatchSizer | None = None  # every generation and target pass of this call; see generation_sizer

    def generation_sizer(self, manifest: Manifest, device: torch.device, resolution: int) -> BatchSizer:
        """The one batch sizer of this `evaluate` call (`sampling.batch_size`, as sampling and score use): `auto`
        halves on CUDA out-of-memory, and a size that had to be halved stays halved for the next set and target
        rather than running out of memory again."""
        if self.sizer is None:
            settings = manifest.evaluation
            largest = max(settings.num_images, settings.membership_candidates, 1)
            self.sizer = BatchSizer(manifest.sampling.batch_size, device, largest, resolution ** 2)
        return self.sizer

    def feature_space(self, manifest: Manifest, device: torch.device) -> FeatureSpace:
        if self.space is None:
            self.space = FeatureSpace(load_reid_model(manifest), manifest.reid.image_size if manifest.reid else None,
                                      device)
        return self.space

    def inception(self, manifest: Manifest, device: torch.device):
        """The one Inception network of this call (FID features), built on first use."""
        if self.inception_network is None:
            weights = manifest.evaluation.inception_weights
            if weights is not None:
                weights = input_path(weights, manifest, "evaluation.inception_weights")
            self.inception_network = InceptionFeatures(weights, image_size=manifest.evaluation.inception_image_size,
                                                       device=device, seed=manifest.evaluation.seed)
        return self.inception_network


@dataclass
class TargetRun:
    """One target's evaluation: what every phase reads, and the notes the phases add for the report."""

    manifest: Manifest
    spec: TargetSpec
    shared: Shared
    device: torch.device
    space: FeatureSpace
    resolution: int  # the fine-tuned generator's
    notes: list[str] = field(default_factory=list)


def demographics_sink(manifest: Manifest, shared: Shared, device, parts: list) -> Callable[[torch.Tensor], None]:
    """A callable that appends the predicted age and sex (1 = M) of each batch of [0, 1] images to `parts`."""
    if shared.demographic_model is None:
        shared.demographic_model = load_demographic_model(manifest).to(device).eval()
    model = shared.demographic_model

    @torch.inference_mode()
    def predict(images: torch.Tensor) -> None:
        parts.append(predict_demographics(model, images, manifest.demographics.image_size))

    return predict


def joined(parts: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) if parts else np.zeros(0) for k in ("age", "sex")}
