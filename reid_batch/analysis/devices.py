"""Device detection on the synthetic world: a deliberately simple pacemaker detector (see stages/evaluate.py).

score = the fraction of pixels in the upper chest on the image's right (the patient's left, where the world places
the generator box) brighter than the 99.9th percentile of that region in device-free images; the threshold
maximises Youden's J on images with known devices. It reports itself unreliable instead of guessing where it
cannot separate them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from reid_batch.analysis.metrics import to_grey


# Pacemaker detector region as fractions of the image: rows top..bottom, columns left..right.
DEVICE_REGION = (0.15, 0.45, 0.55, 0.90)


DEVICE_LEVEL_PERCENTILE = 99.9


DETECTOR_MIN_AUC = 0.75


DETECTOR_MIN_IMAGES = 10


def device_region(images01: torch.Tensor) -> np.ndarray:
    """(N, h, w) uint8 grey levels of the detector's region of each image."""
    grey = to_grey(images01)
    h, w = grey.shape[-2:]
    top, bottom, left, right = DEVICE_REGION
    crop = grey[:, 0, int(top * h):max(int(top * h) + 1, int(bottom * h)),
                int(left * w):max(int(left * w) + 1, int(right * w))]
    return (crop.clamp(0, 1) * 255).round().byte().cpu().numpy()


@dataclass(frozen=True)
class DeviceDetector:
    """score = fraction of region pixels above `level`; a pacemaker is detected when score >= threshold."""

    level: float
    threshold: float
    auc: float
    sensitivity: float
    specificity: float
    with_device: int
    without_device: int
    reliable: bool

    def scores(self, regions: np.ndarray) -> np.ndarray:
        if len(regions) == 0:
            return np.zeros(0)
        return (regions.reshape(len(regions), -1).astype(np.float64) / 255.0 > self.level).mean(axis=1)

    def detect(self, regions: np.ndarray) -> np.ndarray:
        return self.scores(regions) >= self.threshold


def calibrate_device_detector(regions: np.ndarray, has_device: np.ndarray) -> DeviceDetector | None:
    """Fit the detector's level and threshold on images with known devices; None without both kinds."""
    has_device = np.asarray(has_device, dtype=bool)
    positives, negatives = int(has_device.sum()), int((~has_device).sum())
    if positives == 0 or negatives == 0:
        return None
    flat = regions.reshape(len(regions), -1).astype(np.float64) / 255.0
    level = float(np.percentile(flat[~has_device], DEVICE_LEVEL_PERCENTILE))
    scores = (flat > level).mean(axis=1)
    auc = float(roc_auc_score(has_device, scores))
    fpr, tpr, thresholds = roc_curve(has_device, scores)
    finite = np.isfinite(thresholds)
    best = np.flatnonzero(finite)[np.argmax((tpr - fpr)[finite])]
    # At least one pixel must be above the level: a zero threshold would flag every image.
    threshold = max(float(thresholds[best]), 1.0 / flat.shape[1])
    detected = scores >= threshold
    return DeviceDetector(
        level=level, threshold=threshold, auc=auc,
        sensitivity=float(detected[has_device].mean()), specificity=float((~detected[~has_device]).mean()),
        with_device=positives, without_device=negatives,
        reliable=auc >= DETECTOR_MIN_AUC and min(positives, negatives) >= DETECTOR_MIN_IMAGES,
    )
