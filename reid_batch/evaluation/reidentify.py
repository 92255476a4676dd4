"""Re-identification by sample vote (validation only): is each likely sample nearer a training image than a held-out
image of equal number and label mix; and, on the synthetic world, does a matched patient's pacemaker reappear."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pandas as pd
import torch

from reid_batch.analysis.devices import (DETECTOR_MIN_AUC, DETECTOR_MIN_IMAGES, DEVICE_LEVEL_PERCENTILE, DEVICE_REGION,
                                         calibrate_device_detector, device_region)
from reid_batch.analysis.metrics import membership_auc, reidentification
from reid_batch.analysis.roles import matched_positions, pool_frame, train_pool, truth_for, world_truth
from reid_batch.evaluation.images import LoadedImages, load_images
from reid_batch.evaluation.likely import LikelySamples, flags
from reid_batch.evaluation.shared import CONFIDENCE, TargetRun


def reidentify(run: TargetRun, training: LoadedImages | None, heldout_pool: str, likely: LikelySamples) -> dict:
    """Fill the table's re-identification and device columns; return the summary."""
    manifest, spec = run.manifest, run.spec
    settings = manifest.evaluation
    reconstructions, table = likely.reconstructions, likely.table
    pool = train_pool(spec)
    if training is None or not len(training.frame):
        return {"available": False, "reason": "the target's training images are not available here"}
    heldout_found = pool_frame(manifest, heldout_pool)
    if heldout_found is None:
        return {"available": False, "reason": f"the held-out ({heldout_pool}) pool's images are not available here"}
    heldout_frame, heldout_on_error = heldout_found
    # Patients the target trained on must not sit in its held-out set (possible with real data sources).
    heldout_frame = heldout_frame[~heldout_frame["patient_id"].astype(str).isin(
        set(training.frame["patient_id"].astype(str)))].reset_index(drop=True)
    labelled = "label" in training.frame and "label" in heldout_frame
    train_positions, heldout_positions = matched_positions(
        training.frame["label"] if labelled else None, heldout_frame["label"] if labelled else None, settings.seed)
    size = len(train_positions)
    if size == 0:
        return {"available": False, "reason": f"the held-out ({heldout_pool}) pool has no labelled images"}
    if size < len(training.frame):
        run.notes.append(f"re-identification uses {size} of the {len(training.frame)} training images: the held-out "
                         "pool has too few images of some label to match the training set's label mix (equal, alike "
                         "sets keep chance at 0.5)")
    heldout = load_images(heldout_frame.iloc[heldout_positions].reset_index(drop=True), run.resolution,
                          heldout_on_error, manifest.compute.num_workers,
                          desc=f"{spec.name} held-out images ({heldout_pool})", space=run.space)
    train_features = training.features[train_positions]
    train_patients = training.frame["patient_id"].astype(str).to_numpy()[train_positions]
    result = reidentification(
        likely.features, train_features, train_patients, heldout.features,
        heldout.frame["patient_id"].astype(str).to_numpy(), confidence=CONFIDENCE,
    )
    reid_table = result.table
    table["reid_train_patient"] = reid_table["train_patient"].astype(str).to_numpy()
    table["reid_train_distance"] = reid_table["train_distance"].to_numpy()
    table["reid_heldout_patient"] = reid_table["control_patient"].astype(str).to_numpy()
    table["reid_heldout_distance"] = reid_table["control_distance"].to_numpy()
    table["member_closer"] = reid_table["member_closer"].to_numpy(dtype=bool)
    table["reidentified"] = reid_table["reidentified"].to_numpy(dtype=bool)
    summary = {"available": True, **result.summary, "train_pool": pool, "heldout_pool": heldout_pool,
               "heldout_images": len(heldout.frame), "chance_rate": 0.5,
               "matched_on": "label counts" if labelled else "size only",
               "feature_space": run.space.description,
               "membership_auc": membership_auc(table["reid_train_distance"], table["reid_heldout_distance"])
               if len(table) else None}
    summary["devices"] = devices(manifest, training, heldout, reconstructions, table, pools=(pool, heldout_pool))
    return summary


def devices(manifest, training: LoadedImages, heldout: LoadedImages, reconstructions: torch.Tensor, table: pd.DataFrame,
            *, pools: tuple[str, str]) -> dict:
    """Fill the table's device columns (synthetic world only); the detector's calibration and what it found."""
    pool, heldout_pool = pools
    train_truth, heldout_truth = world_truth(manifest, pool), world_truth(manifest, heldout_pool)
    if train_truth is None or heldout_truth is None:
        return {"available": False, "reason": "device ground truth exists only on the synthetic world"}
    has_device = np.concatenate([
        truth_for(training.frame["patient_id"], training.frame, train_truth)["pacemaker"].to_numpy(),
        truth_for(heldout.frame["patient_id"], heldout.frame, heldout_truth)["pacemaker"].to_numpy(),
    ])
    regions = np.concatenate([training.regions, heldout.regions])
    known = ~np.isnan(has_device)
    detector = calibrate_device_detector(regions[known], has_device[known] > 0.5)
    truth = truth_for(table["reid_train_patient"], table, train_truth)["pacemaker"].to_numpy()
    table["truth_pacemaker"] = flags(truth > 0.5, np.isnan(truth))
    summary = {"available": detector is not None and detector.reliable,
               "detector": None if detector is None else asdict(detector),
               "method": "fraction of pixels in the upper chest on the image's right (rows "
                         f"{DEVICE_REGION[0]:.2f}-{DEVICE_REGION[1]:.2f}, columns {DEVICE_REGION[2]:.2f}-"
                         f"{DEVICE_REGION[3]:.2f} of the image) brighter than the {DEVICE_LEVEL_PERCENTILE:g}th "
                         "percentile of device-free images there; threshold by Youden's J on the training and "
                         "held-out images",
               "matched_with_pacemaker": int(np.nansum(truth > 0.5))}
    if detector is None:
        summary["reason"] = "the calibration images lack either images with or without a pacemaker"
        return summary
    if not detector.reliable:
        summary["reason"] = (f"the detector cannot be trusted here: AUC {detector.auc:.2f} on {detector.with_device} "
                             f"images with and {detector.without_device} without a pacemaker (needs AUC >= "
                             f"{DETECTOR_MIN_AUC} and >= {DETECTOR_MIN_IMAGES} images of each kind; below about 64 px "
                             "a pacemaker is a few blurred pixels)")
        return summary
    recon_regions = device_region(reconstructions) if len(reconstructions) else np.zeros((0, 1, 1), np.uint8)
    scores = detector.scores(recon_regions)
    detected = scores >= detector.threshold
    table["recon_device_score"] = scores
    table["recon_pacemaker_detected"] = detected
    reproduced = (truth > 0.5) & detected
    table["device_reproduced"] = flags(reproduced, np.isnan(truth))
    # Detections on reconstructions whose matched patient has no pacemaker: the detector's false alarms on generated
    # images, which can be far more frequent than on real ones (1 - specificity) when the images are artefact-ridden.
    without = truth <= 0.5
    summary.update({"reconstructions_detected": int(detected.sum()), "reproduced": int(reproduced.sum()),
                    "reproduced_rate": float(reproduced.mean()) if len(reproduced) else None,
                    "matched_without_pacemaker": int(without.sum()),
                    "detected_without_pacemaker": int((detected & without).sum())})
    false_alarms = (detected & without).sum() / without.sum() if without.sum() else None
    summary["interpretable"] = bool(false_alarms is None
                                    or false_alarms <= max(0.25, 3 * (1 - detector.specificity)))
    return summary
