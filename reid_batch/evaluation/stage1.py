"""Stage 1, distribution level: the prior's and the fine-tuned generator's images at the same latents beside a sample
of the training images; pixel entropy, PCA kurtosis in one basis, and FID between every two sets. See
docs/method.md."""

from __future__ import annotations

import math

import numpy as np
import torch

from reid_batch import log
from reid_batch.analysis.metrics import fid, fit_pca, kurtosis_curve_png, pca_kurtosis, pixel_entropy
from reid_batch.analysis.roles import reference_images, sample_positions
from reid_batch.artifacts import load_prior
from reid_batch.evaluation.images import LoadedImages, generate, load_images
from reid_batch.evaluation.shared import TargetRun
from reid_batch.layout import STAGE1_ID_OFFSET


def entropy_summary(images01: torch.Tensor) -> dict:
    values = pixel_entropy(images01)
    n = int(values.size)
    return {"mean": float(values.mean()) if n else None,
            "se": float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else None, "n": n}


def distribution_metrics(sets: dict[str, torch.Tensor], fit_on: str, components: int, bootstrap: int, seed: int,
                         features: dict[str, np.ndarray] | None = None) -> tuple[dict, bytes]:
    """Stage 1's table for image sets (name -> (N, 1, H, W) in [0, 1], all the same size) and the kurtosis plot.

    The PCA basis is fitted on sets["reference"] when fit_on == "reference" and that set exists, else on all sets
    pooled. `features` (name -> (N, 2048) Inception features) adds FID between every two sets.
    """
    notes = []
    if fit_on == "reference" and "reference" in sets:
        basis_images, fitted_on = sets["reference"], "reference"
    else:
        basis_images, fitted_on = torch.cat(list(sets.values())), "pooled (" + " + ".join(sets) + ")"
        if fit_on == "reference":
            notes.append("no training images known: the PCA basis is fitted on the generated sets pooled")
    basis = fit_pca(basis_images, components, fitted_on=fitted_on, seed=seed)
    result = {"sets": {}, "pca": {"fitted_on": fitted_on, "fit_images": basis.num_fit_images,
                                  "components": basis.num_components,
                                  "explained_variance": float(basis.explained_variance_ratio.sum())},
              "fid": [], "notes": notes}
    curves, errors = {}, {}
    for name, images in sets.items():
        row = {"images": int(images.shape[0]), "entropy": entropy_summary(images), "kurtosis": None}
        if images.shape[0] >= 4:
            kurtosis = pca_kurtosis(images, basis, bootstrap=bootstrap, seed=seed)
            row["kurtosis"] = {"mean": kurtosis.mean, "se": kurtosis.bootstrap_se,
                               "per_component": kurtosis.per_component.tolist(),
                               "per_component_se": kurtosis.per_component_se.tolist()}
            curves[name], errors[name] = kurtosis.per_component, kurtosis.per_component_se
        else:
            notes.append(f"{name}: kurtosis needs at least 4 images, has {images.shape[0]}")
        result["sets"][name] = row
    if features is not None:
        names = [n for n in sets if n in features]
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                if min(len(features[a]), len(features[b])) < 2:
                    notes.append(f"FID {a} vs {b}: needs at least 2 images per set")
                    continue
                value = fid(features[a], features[b])
                result["fid"].append({"a": a, "b": b, "value": value.value, "num_a": value.num_a,
                                      "num_b": value.num_b, "dims": value.dims,
                                      "underdetermined": value.underdetermined})
        if any(r["underdetermined"] for r in result["fid"]):
            notes.append("FID: fewer images than the 2048 feature dimensions; the covariances are singular and FID "
                         "is biased upwards, comparable only between sets of equal size")
    png = kurtosis_curve_png(curves, standard_errors=errors,
                             title=f"Excess kurtosis per principal component (basis: {fitted_on})")
    return result, png


def stage1_sets(run: TargetRun, finetuned) -> tuple[dict[str, torch.Tensor], LoadedImages | None, str | None, str]:
    """Stage 1's image sets (prior and fine-tuned at the same latents, a sample of the training images), and the
    training images loaded once: (sets, training or None, where they came from, their on_error)."""
    manifest, spec, shared, device = run.manifest, run.spec, run.shared, run.device
    settings = manifest.evaluation
    resolution = finetuned.config.resolution
    stage1_ids = STAGE1_ID_OFFSET + np.arange(settings.num_images, dtype=np.int64)
    if shared.prior_images is None:
        prior = load_prior(manifest).to(device).eval()
        shared.prior_images = generate(prior, stage1_ids, settings.seed, device, shared.sizer)
        del prior
    sets = {"prior": shared.prior_images,
            "finetuned": generate(finetuned, stage1_ids, settings.seed, device, shared.sizer)}

    # The target's training images: the nearest-neighbour pool, and a sample of them is stage 1's reference set.
    found = reference_images(manifest, spec)
    training = None
    if found is not None:
        frame, origin, on_error = found
        frame = frame.reset_index(drop=True)
        keep = set(sample_positions(len(frame), settings.num_images, settings.seed).tolist())
        training = load_images(frame, resolution, on_error, manifest.compute.num_workers, keep=keep,
                               desc=f"{spec.name} training images", space=run.space)
        if training.kept:
            sets["reference"] = torch.stack([training.kept[p] for p in sorted(training.kept)])
    else:
        origin, on_error = None, "raise"
        run.notes.append("the target's training images are not available here: no reference set, nearest neighbours, "
                         "demographic ground truth or re-identification")
    for name, images in sets.items():
        if 0 < len(images) < 2048:
            log.event("evaluate_small_set", target=spec.name, set=name, images=len(images), feature_dims=2048)
    return sets, training, origin, on_error


def stage1_metrics(run: TargetRun, sets: dict[str, torch.Tensor]) -> tuple[dict, bytes]:
    """Entropy, PCA kurtosis and FID of stage 1's sets, and the kurtosis figure."""
    manifest, shared = run.manifest, run.shared
    settings = manifest.evaluation
    features = None
    if settings.fid:
        inception = shared.inception(manifest, run.device)
        if shared.prior_features is None:
            shared.prior_features = inception(sets["prior"])
        features = {"prior": shared.prior_features, **{n: inception(sets[n]) for n in sets if n != "prior"}}
    stage1, kurtosis_png = distribution_metrics(sets, settings.pca_fit_on, settings.pca_components,
                                                settings.bootstrap, settings.seed, features)
    stage1["num_images"] = settings.num_images
    stage1["latent_ids"] = f"{STAGE1_ID_OFFSET} + k, k < {settings.num_images} (seed {settings.seed})"
    if settings.fid:
        stage1["inception"] = {"trained": inception.trained, "weights": settings.inception_weights,
                               "image_size": settings.inception_image_size}
        if not inception.trained:
            stage1["notes"].append("FID from UNTRAINED (seeded random) Inception-v3 weights: a relative measure "
                                   "between these sets only, not comparable with published FIDs")
    else:
        stage1["inception"] = None
        stage1["notes"].append("FID not computed (evaluation.fid: false)")
    return stage1, kurtosis_png
