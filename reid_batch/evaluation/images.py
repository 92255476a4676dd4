"""Real and generated images for evaluation: one pass over a table of real images (features, detector regions, the
few kept whole), rows loaded again by position, and generated images from latent ids."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from reid_batch import log
from reid_batch.analysis.devices import device_region
from reid_batch.analysis.metrics import to_grey
from reid_batch.analysis.space import FeatureSpace
from reid_batch.attack.generation import BatchSizer, regenerate_images
from reid_batch.data.datasets import ImageDataset

LOADER_BATCH = 64


@dataclass
class LoadedImages:
    """One pass over a table of real images: what evaluation needs from each, never all images at once."""

    frame: pd.DataFrame  # the rows that loaded, in order (positions index everything below)
    features: np.ndarray  # (N, D) features in the evaluation's FeatureSpace
    regions: np.ndarray  # (N, h, w) uint8 detector regions
    kept: dict[int, torch.Tensor] = field(default_factory=dict)  # position -> (1, R, R) image, for `keep` positions


def load_images(frame: pd.DataFrame, size: int, on_error: str, num_workers: int, *, space: FeatureSpace,
                desc: str, keep: frozenset[int] | set[int] = frozenset()) -> LoadedImages:
    """Load the rows of `frame` at `size` px in one pass: their features in `space`, their device regions, and the
    images at positions `keep`."""
    dataset = ImageDataset(frame.reset_index(drop=True), size=size, channels=1, on_error=on_error)
    loader = torch.utils.data.DataLoader(dataset, batch_size=LOADER_BATCH, num_workers=num_workers)
    features, regions, positions, kept = [], [], [], {}
    for batch in log.progress(loader, desc=desc, total=len(loader)):
        images = batch["image"]
        features.append(space(images))
        regions.append(device_region(images))
        for row, position in enumerate(batch["index"].tolist()):
            if position in keep:
                kept[position] = images[row].clone()
        positions.append(batch["index"].numpy())
    order = np.concatenate(positions) if positions else np.zeros(0, dtype=np.int64)
    # Positions in the loaded table (skipped rows drop out); `kept` is re-keyed to match.
    remap = {int(p): i for i, p in enumerate(order)}
    empty_regions = np.zeros((0, 1, 1), dtype=np.uint8)
    return LoadedImages(
        frame=dataset.df.iloc[order].reset_index(drop=True),
        features=np.concatenate(features) if features else np.zeros((0, space.dims), np.float32),
        regions=np.concatenate(regions) if regions else empty_regions,
        kept={remap[p]: image for p, image in kept.items()},
    )


def load_rows(frame: pd.DataFrame, positions: np.ndarray, size: int, on_error: str) -> torch.Tensor:
    """(len(positions), 1, size, size) images of the given rows, in that order (repeats allowed)."""
    unique = np.unique(positions)
    if len(unique) == 0:
        return torch.zeros(0, 1, size, size)
    dataset = ImageDataset(frame.iloc[unique].reset_index(drop=True), size=size, channels=1, on_error=on_error)
    loaded = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    where = {int(p): i for i, p in enumerate(unique)}
    return loaded[[where[int(p)] for p in positions]]


def generate(generator, ids: np.ndarray, seed: int, device: torch.device, sizer: BatchSizer) -> torch.Tensor:
    """[0, 1] grey CPU images of latent ids, batch by batch through `sizer` (an `auto` one halves on CUDA
    out-of-memory, as in sampling)."""
    parts = sizer.run(np.asarray(ids, dtype=np.int64),
                      lambda batch: to_grey(regenerate_images(generator, batch, seed, device)).cpu())
    size = generator.config.resolution
    return torch.cat(parts) if parts else torch.zeros(0, 1, size, size)
