"""The re-identification embedding: grey [0, 1] chest X-rays in, unit-length patient embeddings out.

Two images of one patient should lie close (cosine similarity near 1), images of two patients apart, whatever the
acquisition (pose, exposure, noise). Trained by stages/train_reid.py on the public pool only; evaluation measures
distances to training patients in this space instead of in grey pixels, which are blind to identity.

`reid_small` is a plain four-block CNN for the demo's small images (it trains in minutes on a CPU); `resnet18` /
`resnet50` are torchvision ResNets (random initialisation: no weights are downloaded) for study-sized images.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from reid_batch.checkpoints import load_into, load_state_dict
from reid_batch.errors import InputError

ARCHS = ("reid_small", "resnet18", "resnet50")
_RESNETS = {"resnet18": torchvision.models.resnet18, "resnet50": torchvision.models.resnet50}
# Grey levels are centred and scaled inside the network, so callers always pass [0, 1] images.
_CENTRE, _SCALE = 0.5, 0.25


def _block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True), nn.MaxPool2d(2),
    )


class ReidNet(nn.Module):
    """images01 (N, 1, H, W) in [0, 1] -> (N, embedding_dim) embeddings of unit length."""

    def __init__(self, arch: str = "reid_small", embedding_dim: int = 128, width: int = 32):
        super().__init__()
        if arch not in ARCHS:
            raise InputError(f"unknown re-identification architecture {arch!r}; known: {', '.join(ARCHS)}",
                             where="reid.arch")
        self.arch = arch
        if arch == "reid_small":
            widths = [width, 2 * width, 4 * width, 8 * width]
            layers, channels = [], 1
            for w in widths:
                layers.append(_block(channels, w))
                channels = w
            self.features = nn.Sequential(*layers)
            features = channels
        else:
            backbone = _RESNETS[arch](weights=None)
            backbone.conv1 = nn.Conv2d(1, 64, 7, stride=2, padding=3, bias=False)  # grey in: no fake RGB channels
            features = backbone.fc.in_features
            backbone.fc = nn.Identity()
            self.features = backbone
        self.head = nn.Linear(features, embedding_dim)

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        x = (images01 - _CENTRE) / _SCALE
        x = self.features(x)
        if x.ndim == 4:
            x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return F.normalize(self.head(x), dim=1)


def augment(images01: torch.Tensor, generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """One independent acquisition jitter per image of a [0, 1] batch (N, 1, H, W), drawn from `generator`: the
    changes the embedding must ignore (small rotation, shift, scale; gamma, contrast, brightness, noise; never a
    horizontal flip: laterality is anatomy)."""
    n = images01.shape[0]
    device = images01.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return (low + (high - low) * torch.rand(n, generator=generator)).to(device)

    angle = uniform(-5.0, 5.0) * strength * math.pi / 180
    scale = 1 + uniform(-0.05, 0.05) * strength
    shift_x, shift_y = uniform(-0.04, 0.04) * strength, uniform(-0.04, 0.04) * strength
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift_x], 1), torch.stack([sin, cos, shift_y], 1)], 1)
    grid = F.affine_grid(theta, list(images01.shape), align_corners=False)
    # Border padding: the rim of a radiograph continues past the frame, it does not turn black.
    x = F.grid_sample(images01, grid, mode="bilinear", padding_mode="border", align_corners=False)
    gamma = torch.exp(uniform(-0.2, 0.2) * strength).view(n, 1, 1, 1)
    contrast = (1 + uniform(-0.15, 0.15) * strength).view(n, 1, 1, 1)
    brightness = (uniform(-0.08, 0.08) * strength).view(n, 1, 1, 1)
    x = x.clamp(1e-6, 1).pow(gamma)
    x = (x - 0.5) * contrast + 0.5 + brightness
    noise = uniform(0.0, 0.02 * strength).view(n, 1, 1, 1)
    x = x + noise * torch.randn(x.shape, generator=generator).to(device)
    return x.clamp(0, 1)


@torch.inference_mode()
def embed(model: ReidNet, images01: torch.Tensor, device: torch.device | str = "cpu",
          batch_size: int = 256, size: int | None = None) -> torch.Tensor:
    """Embeddings of [0, 1] images (N, C, H, W; colour is averaged to grey), float32 on the CPU, in eval mode.

    size: the side the embedding was trained at; other sizes are resized to it first (antialiased bilinear, as the
    image loader resizes files)."""
    model.eval()
    parts = []
    for start in range(0, len(images01), batch_size):
        batch = images01[start:start + batch_size].to(device).float()
        if batch.shape[1] > 1:
            batch = batch.mean(dim=1, keepdim=True)
        if size is not None and tuple(batch.shape[-2:]) != (size, size):
            batch = F.interpolate(batch, size=(size, size), mode="bilinear", antialias=True,
                                  align_corners=False).clamp(0, 1)
        parts.append(model(batch).float().cpu())
    dim = model.head.out_features
    return torch.cat(parts) if parts else torch.zeros(0, dim)


def load_reid(path: str | os.PathLike, arch: str, embedding_dim: int, width: int = 32) -> ReidNet:
    """A ReidNet with the weights of a safetensors/weights-only file (never unpickled), in eval mode."""
    model = ReidNet(arch, embedding_dim, width)
    load_into(model, load_state_dict(path), where=str(path))
    return model.eval()
