"""How well the generator prior draws chest X-rays: the attack can only reconstruct what its prior can draw.

Two measures of the prior's samples against real public images the prior did not see during the measurement:
  frechet    the Fréchet distance between Gaussians fitted to the two sets' features in the re-identification
             embedding (identity-sensitive: anatomy, not just exposure), beside its FLOOR, the distance between two
             disjoint real sets of the same size. A prior at the floor draws what real images look like to the
             ruler the leak is measured with.
  classifier a classifier two-sample test: a small CNN trained to tell the prior's samples from real images on
             one half of each set, scored on the other half. Accuracy 0.5 (within its Wilson interval) means the
             two cannot be told apart; 1.0 means every sample gives itself away.
Pure: tensors and arrays in, numbers out.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from reid_batch.analysis.metrics import feature_statistics, frechet_distance, wilson_interval


def embedding_frechet(samples: np.ndarray, real: np.ndarray, other_real: np.ndarray) -> dict:
    """Fréchet distance of samples to real, and of other_real to real (the floor); all (N, D) features."""
    reference = feature_statistics(real)
    distance = frechet_distance(*feature_statistics(samples), *reference)
    floor = frechet_distance(*feature_statistics(other_real), *reference)
    return {"distance": float(distance), "floor": float(floor), "ratio": float(distance / floor) if floor > 0 else None,
            "images": [len(samples), len(real), len(other_real)]}


class _Discriminator(nn.Module):
    """Three strided convolutions and a linear read-out of a 4 x 4 map: small enough to train in seconds on a CPU.
    The read-out keeps where things are, where a global average pool would not (see
    docs/results/2026-12-08-code-notes.md), since what gives a bad prior away is anatomy in the wrong place."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.head = nn.Linear(4 * width * 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).squeeze(1)


def two_sample_classifier(samples01: torch.Tensor, real01: torch.Tensor, seed: int = 0, epochs: int = 10,
                          batch_size: int = 64, confidence: float = 0.95) -> dict:
    """Held-out accuracy of a small CNN telling samples from real images ((N, 1, H, W) in [0, 1], equal sizes are
    best); each set is split in halves, the first halves train it, the second halves score it."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    fake = samples01[torch.randperm(len(samples01), generator=generator)].float()
    real = real01[torch.randperm(len(real01), generator=generator)].float()
    half_fake, half_real = len(fake) // 2, len(real) // 2
    train_x = torch.cat([fake[:half_fake], real[:half_real]])
    train_y = torch.cat([torch.zeros(half_fake), torch.ones(half_real)])
    test_x = torch.cat([fake[half_fake:], real[half_real:]])
    test_y = torch.cat([torch.zeros(len(fake) - half_fake), torch.ones(len(real) - half_real)])
    model = _Discriminator()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=generator)
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            F.binary_cross_entropy_with_logits(model(train_x[index]), train_y[index]).backward()
            optimizer.step()
    model.eval()
    with torch.inference_mode():
        predicted = torch.cat([model(test_x[i:i + 256]) for i in range(0, len(test_x), 256)]) > 0
    correct = int((predicted.float() == test_y).sum())
    low, high = wilson_interval(correct, len(test_y), confidence)
    return {"accuracy": correct / len(test_y), "ci": [low, high], "test_images": len(test_y),
            "train_images": len(train_x), "epochs": epochs}
