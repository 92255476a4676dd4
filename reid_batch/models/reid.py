"""The re-identification embedding: grey [0, 1] chest X-rays in, unit-length patient embeddings out.

Two images of one patient should lie close (cosine similarity near 1), images of two patients apart, whatever the
acquisition (pose, exposure, noise). Trained by stages/train_reid.py on the public pool only; evaluation measures
distances to training patients in this space instead of in grey pixels, which are blind to identity.

`reid_small` is a plain four-block CNN for the demo's small images (it trains in minutes on a CPU); `resnet18` /
`resnet50` are torchvision ResNets (random initialisation: no weights are downloaded) for study-sized images.
"""

from __future__ import annotations

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


@torch.inference_mode()
def embed(model: ReidNet, images01: torch.Tensor, device: torch.device | str = "cpu",
          batch_size: int = 256) -> torch.Tensor:
    """Embeddings of [0, 1] images (N, C, H, W; colour is averaged to grey), float32 on the CPU, in eval mode."""
    model.eval()
    parts = []
    for start in range(0, len(images01), batch_size):
        batch = images01[start:start + batch_size].to(device).float()
        if batch.shape[1] > 1:
            batch = batch.mean(dim=1, keepdim=True)
        parts.append(model(batch).float().cpu())
    dim = model.head.out_features
    return torch.cat(parts) if parts else torch.zeros(0, dim)


def load_reid(path: str | os.PathLike, arch: str, embedding_dim: int, width: int = 32) -> ReidNet:
    """A ReidNet with the weights of a safetensors/weights-only file (never unpickled), in eval mode."""
    model = ReidNet(arch, embedding_dim, width)
    load_into(model, load_state_dict(path), where=str(path))
    return model.eval()
