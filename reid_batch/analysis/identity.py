"""The identity-class positive control: did the attack on class k produce patient k? See docs/method.md.

A target whose classes are K patients (train preset `identity`) is attacked like any other; its likely samples each
carry the class the attack asked for. Every sample is matched, in the re-identification embedding, against a gallery
of 2K patients: the K patients the classes are scored against and K distractors, each represented by held-out
studies (images the target never saw). A sample's distance to a patient is its distance to the patient's closest
gallery image.

Measures (pure numpy; tables in, a dict out):
  top1, top5     share of samples whose scored patient is the nearest (among the five nearest) of the 2K.
  distinct       how many of the 2K patients are some sample's nearest: 1 means the attack collapsed onto one.
  p_value        label permutation: the class -> patient assignment is permuted, within sex (sex alone carries
                 identity, and the negative control's classes match the scored patients' sexes class by class), and
                 top1 recomputed; p = (1 + #{permuted >= observed}) / (1 + permutations). Not a binomial against
                 1 / 2K: a generator collapsed onto one patient hits that patient's class every time, which a
                 binomial test calls significant and this test does not.
  null_top1      the mean permuted top1: the chance level of THIS set of samples (1 / 2K only if they spread evenly).
  ci             percentile interval of top1 over classes resampled with replacement (samples of one class move
                 together: they come from one region of one generator).
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.distance import cdist


def patient_distances(sample_features: np.ndarray, gallery_features: np.ndarray, gallery_patient: np.ndarray,
                      patients: int) -> np.ndarray:
    """(samples, patients) distance from each sample to each patient's closest gallery image."""
    distances = cdist(np.asarray(sample_features, np.float64), np.asarray(gallery_features, np.float64))
    out = np.full((distances.shape[0], patients), np.inf)
    for patient in range(patients):
        columns = np.flatnonzero(gallery_patient == patient)
        if len(columns):
            out[:, patient] = distances[:, columns].min(axis=1)
    return out


def _ranks(distances: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Rank (0 = nearest) of patient wanted[i] in row i; ties count against the wanted patient."""
    mine = distances[np.arange(len(wanted)), wanted]
    return (distances < mine[:, None]).sum(axis=1) + ((distances == mine[:, None]).sum(axis=1) - 1)


def within_sex_permutations(sexes: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """(count, K) permutations of range(K) that only exchange positions of the same sex."""
    k = len(sexes)
    out = np.tile(np.arange(k), (count, 1))
    for sex in np.unique(sexes):
        positions = np.flatnonzero(sexes == sex)
        for row in range(count):
            out[row, positions] = positions[rng.permutation(len(positions))]
    return out


# Cheap (one comparison per sample and permutation), and a p-value floor of 1e-4 keeps "at the floor" rare.
PERMUTATIONS = 9999
NULL_BLOCK_CELLS = 4_000_000  # permutations x samples compared at once (~4 MB of booleans, ~32 MB of indices)


def identity_control(sample_features: np.ndarray, sample_classes: np.ndarray, gallery_features: np.ndarray,
                     gallery_patient: np.ndarray, scored: np.ndarray, sexes: np.ndarray,
                     permutations: int = PERMUTATIONS,
                     bootstrap: int = 1000, seed: int = 0, confidence: float = 0.95) -> dict:
    """The control's measures (module docstring). sample_classes: the class each sample was asked for, 0..K-1;
    gallery_patient: each gallery image's patient, 0..2K-1; scored[k]: the patient (0..2K-1) class k is scored against; sexes[k]: that
    patient's sex (the permutation strata)."""
    sample_classes = np.asarray(sample_classes, np.int64)
    scored = np.asarray(scored, np.int64)
    patients = int(gallery_patient.max()) + 1 if len(gallery_patient) else 0
    k = len(scored)
    result = {"samples": int(len(sample_classes)), "classes": k, "gallery_patients": patients,
              "gallery_images": int(len(gallery_patient)), "chance_top1": 1.0 / patients if patients else None,
              "chance_top5": min(5, patients) / patients if patients else None,
              "permutations": permutations, "bootstrap": bootstrap, "confidence": confidence}
    if len(sample_classes) == 0 or patients == 0:
        return {**result, "top1": None, "top5": None, "distinct": 0, "p_value": None, "null_top1": None,
                "ci": [None, None], "per_class": []}
    distances = patient_distances(sample_features, gallery_features, gallery_patient, patients)
    nearest = distances.argmin(axis=1)
    ranks = _ranks(distances, scored[sample_classes])
    hits = ranks == 0
    top1 = float(hits.mean())

    rng = np.random.default_rng(seed)
    permuted = within_sex_permutations(np.asarray(sexes), permutations, rng)
    # nearest == scored[perm[class]], a block of permutations at a time: memory stays bounded with many samples
    block = max(1, NULL_BLOCK_CELLS // len(sample_classes))
    null = np.concatenate([(nearest[None, :] == scored[permuted[i:i + block][:, sample_classes]]).mean(axis=1)
                           for i in range(0, permutations, block)])
    p_value = float((1 + np.sum(null >= top1 - 1e-12)) / (1 + permutations))

    present = np.unique(sample_classes)
    by_class = {c: hits[sample_classes == c] for c in present}
    draws = rng.choice(present, size=(bootstrap, len(present)), replace=True)
    sums = np.array([[by_class[c].sum() for c in row] for row in draws]).sum(axis=1)
    counts = np.array([[len(by_class[c]) for c in row] for row in draws]).sum(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(sums / counts, [alpha, 1 - alpha])
    per_class = [{"class": int(c), "samples": int(len(by_class[c])), "top1": float(by_class[c].mean()),
                  "nearest": int(np.bincount(nearest[sample_classes == c], minlength=patients).argmax())}
                 for c in present]
    return {**result, "top1": top1, "top5": float((ranks < 5).mean()), "distinct": int(len(np.unique(nearest))),
            "p_value": p_value, "null_top1": float(null.mean()), "ci": [float(low), float(high)],
            "per_class": per_class}
