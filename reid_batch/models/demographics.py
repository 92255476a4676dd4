"""The demographic model: one DenseNet backbone predicting a patient's age and sex from a chest X-ray.

It scores how much demographic information reconstructions carry. Input: (N, 3, H, W) float images,
grayscale repeated to 3 channels, normalised as the model was trained (ImageNet mean/std by default; see
`reid_batch.models.targets.TargetInput`), H = W = 224 for the study's checkpoints.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from reid_batch import log
from reid_batch.checkpoints import load_into, load_state_dict
from reid_batch.errors import InputError

_DENSENETS = {
    "densenet121": torchvision.models.densenet121,
    "densenet161": torchvision.models.densenet161,
    "densenet169": torchvision.models.densenet169,
    "densenet201": torchvision.models.densenet201,
}


class DemographicNet(nn.Module):
    """DenseNet features -> ReLU -> global average pool -> Dropout -> two linear heads.

    `age_head` regresses age in years; `sex_head` emits a LOGIT for sex label 1 (trained with
    BCEWithLogitsLoss; what label 1 means, e.g. male, is fixed by the training data's encoding).
    Pass growth_rate/block_config/num_init_features to build a custom (e.g. tiny, for tests) DenseNet
    instead of the named `arch`.
    """

    def __init__(
        self,
        arch: str = "densenet121",
        growth_rate: int | None = None,
        block_config: Sequence[int] | None = None,
        num_init_features: int | None = None,
        dropout: float = 0.5,
    ):
        super().__init__()
        custom = {
            k: v
            for k, v in (
                ("growth_rate", growth_rate),
                ("block_config", tuple(block_config) if block_config is not None else None),
                ("num_init_features", num_init_features),
            )
            if v is not None
        }
        if custom:
            backbone = torchvision.models.DenseNet(**custom)
        elif arch in _DENSENETS:
            backbone = _DENSENETS[arch](weights=None)
        else:
            raise InputError(
                f"unknown demographic model architecture '{arch}'; known: {', '.join(_DENSENETS)}", where="arch"
            )
        self.features = backbone.features
        num_features = backbone.classifier.in_features
        self.dropout = nn.Dropout(dropout)
        self.age_head = nn.Linear(num_features, 1)
        self.sex_head = nn.Linear(num_features, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (age in years, sex logit), each of shape (N,)."""
        pooled = torch.flatten(F.adaptive_avg_pool2d(F.relu(self.features(x)), 1), 1)
        pooled = self.dropout(pooled)
        return self.age_head(pooled).squeeze(1), self.sex_head(pooled).squeeze(1)

    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Eval-mode predictions: age (years), sex_prob = P(sex label 1), sex = 1 where sex_prob >= 0.5.

        The sigmoid is applied exactly once, to the logit. (The study applied it twice, squashing every
        probability into [0.5, 0.73] so that every patient was predicted as label 1.)
        """
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                age, sex_logit = self(x)
                sex_prob = torch.sigmoid(sex_logit)
        finally:
            self.train(was_training)
        return {"age": age, "sex_prob": sex_prob, "sex": (sex_prob >= 0.5).long()}


def load_demographics(path: str | os.PathLike, **arch) -> DemographicNet:
    """Safely load a DemographicNet checkpoint into a frozen eval-mode model; `arch` as DemographicNet's args."""
    model = DemographicNet(**arch)
    expected = "DemographicNet(" + ", ".join(f"{k}={v}" for k, v in arch.items()) + ")"
    load_into(model, load_state_dict(path), where=str(path), expected=expected)
    model.eval().requires_grad_(False)
    log.event("demographics_loaded", file=str(path), **{k: str(v) for k, v in arch.items()})
    return model


IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


def to_model_input(images01: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) in [0, 1] -> (N, 3, H, W) normalised as torchvision's DenseNet expects."""
    x = images01.expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def demographic_input(images01: torch.Tensor, size: int) -> torch.Tensor:
    """[0, 1] images (N, 1|3, H, W) -> the demographic model's input (N, 3, size, size)."""
    x = images01.float()
    if x.shape[1] == 3:  # BT.601 luma, as datasets.load_image reads RGB files for the model's training
        x = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    return to_model_input(x)


def predict_demographics(model, images01: torch.Tensor, size: int,
                         on_device: bool = False) -> dict[str, np.ndarray | torch.Tensor]:
    """age, sex_prob, sex for a batch of [0, 1] images (on the model's device): numpy arrays, or with `on_device`
    tensors left on the device (float32, float32, int8), for a caller that moves many batches to the host at once."""
    out = model.predict(demographic_input(images01, size))
    if on_device:
        return {"age": out["age"].float(), "sex_prob": out["sex_prob"].float(), "sex": out["sex"].to(torch.int8)}
    return {"age": out["age"].float().cpu().numpy(), "sex_prob": out["sex_prob"].float().cpu().numpy(),
            "sex": out["sex"].to(torch.int8).cpu().numpy()}
