"""Where evaluation compares images: the re-identification embedding, or grey pixels when there is none.

In the embedding (models.reid: unit vectors, compared by Euclidean distance, which orders pairs as cosine similarity
does) two studies of one patient lie close whatever the acquisition. Grey pixels area-averaged to PIXEL_SIZE are the
fallback when the manifest has no `reid` section: they are blind to identity, and every result measured in them says
so (`description`).
"""

from __future__ import annotations

import numpy as np
import torch

from reid_batch.analysis.metrics import pixel_features
from reid_batch.models.reid import ReidNet, embed

PIXEL_SIZE = 32


class FeatureSpace:
    """images01 (N, C, H, W) in [0, 1] -> (N, dims) float32 features; `description` names the space."""

    def __init__(self, model: ReidNet | None, image_size: int | None, device: torch.device | str = "cpu"):
        self.model = model.to(device).eval() if model is not None else None
        self.device = device
        if model is not None:
            self.size, self.dims = image_size, model.head.out_features
            self.description = (f"re-identification embedding ({model.arch}, {image_size} px, {self.dims}-d unit "
                                "vectors), Euclidean")
        else:
            self.size, self.dims = PIXEL_SIZE, PIXEL_SIZE ** 2
            self.description = (f"grey pixels area-averaged to {PIXEL_SIZE}x{PIXEL_SIZE}, Euclidean (no reid section: "
                                "blind to identity)")

    @property
    def identity_sensitive(self) -> bool:
        return self.model is not None

    def __call__(self, images01: torch.Tensor) -> np.ndarray:
        if not len(images01):
            return np.zeros((0, self.dims), np.float32)
        if self.model is None:
            return pixel_features(images01, PIXEL_SIZE)
        return embed(self.model, images01, self.device, size=self.size).numpy()
