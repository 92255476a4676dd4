"""Mahalanobis distance of a candidate's target features to a Gaussian: stage 2's "in distribution" score.

    D_M(x) = sqrt( (x - mu)^T C^-1 (x - mu) )

Feature space (what x is)
-------------------------
CNN targets: the per-channel spatial means of the INPUT of the target's last BatchNorm2d, shape (N, C)
    (`ObjectiveResult.features`; for a ResNet18 the 512 channels entering layer4.1.bn2).
ViT targets: the CLS token after the encoder's final LayerNorm, shape (N, hidden).

Gaussian (what mu and C are): `selection.mahalanobis.covariance`
------------------------------------------------------------------
`diagonal` (default, the study's choice): mu and a diagonal C from the target's own statistics
    (`TargetObjective.feature_prior()`). CNN: the last BatchNorm2d's `running_mean` and `running_var`. ViT: the
    per-channel mean and variance of the CLS token over the reference images (`compute_reference_stats`).
    Caveat for CNNs, kept for fidelity to the study and stated here rather than hidden: `running_var` is the
    variance of SINGLE POSITIONS over (N, H, W) of the training data, while a feature is a SPATIAL MEAN. By the
    law of total variance, running_var = Var(image means) + E[within-image variance] >= Var(image means), so
    the diagonal Gaussian is too wide and its distances are deflated, by a per-channel factor that depends on
    how correlated neighbouring positions are. `running_mean` needs no correction (the mean of spatial means is
    the mean over positions). Distances are therefore comparable between candidates of one run (that is all
    selection uses) but are not calibrated chi-distributed values.
`ledoit_wolf`: mu and a FULL C estimated in the feature space itself, from a reference set: the PRIOR generator's
    samples (before fine-tuning; `selection.mahalanobis.reference_images` of them) through the frozen target,
    with sklearn's LedoitWolf shrinkage (well conditioned even with fewer images than channels). It measures
    distance to the chest X-rays the prior produces as the target sees them: channel correlations included and
    no position/mean mismatch, but the reference is the public-data prior, not the target's private data
    (which the attacker does not have).

Regularisation (never silent)
-----------------------------
C is used as given only if it is clearly positive definite. With d = mean of C's diagonal and
ridge = epsilon * d (`selection.mahalanobis.epsilon`), if C's smallest eigenvalue (a diagonal's smallest entry)
is below ridge -- singular, ill conditioned beyond about 1/epsilon, or indefinite by rounding -- then
C + ridge * I is used instead. Either way `MahalanobisModel.regularisation` records whether it was applied, the
ridge, and the smallest and largest eigenvalue and condition number before and after; stages log it and write it
into their summaries. C is never inverted: distances come from a Cholesky factor L (C = L L^T) by a triangular
solve, D_M(x) = ||L^-1 (x - mu)||, vectorised over samples in float64.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.covariance import LedoitWolf
from torch import Tensor

from reid_batch import log

COVARIANCES = ("diagonal", "ledoit_wolf")


@dataclass(frozen=True)
class MahalanobisModel:
    """A Gaussian ready to score features. Build with `from_gaussian` or `fit_ledoit_wolf`.

    mean (D,) float64. factor: for a diagonal Gaussian the (regularised) standard deviations (D,); for a full one
    the lower Cholesky factor L (D, D) of the (regularised) covariance. source: where the Gaussian came from.
    """

    mean: Tensor
    factor: Tensor
    diagonal: bool
    source: str
    regularisation: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    _on_device: dict = field(default_factory=dict, repr=False, compare=False)  # device -> (mean, factor)

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def distances(self, features: Tensor, on_device: bool = False) -> Tensor:
        """D_M of each row of features (N, D), float64, shape (N,): on the CPU, or with on_device on the features'
        device (no copy to the host, so no sync)."""
        x = torch.as_tensor(features).detach()
        device = x.device if on_device else torch.device("cpu")
        x = x.to(device=device, dtype=torch.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected features of shape (N, {self.dim}), got {tuple(x.shape)}")
        if device not in self._on_device:  # copied once per device, not once per batch
            self._on_device[device] = (self.mean.to(device), self.factor.to(device))
        mean, factor = self._on_device[device]
        centred = x - mean
        if self.diagonal:
            return (centred / factor).square().sum(1).sqrt()
        whitened = torch.linalg.solve_triangular(factor, centred.T, upper=False)
        return whitened.square().sum(0).sqrt()

    def fingerprint(self) -> str:
        """A short hash of the Gaussian actually used, to check that every shard scored against the same one."""
        digest = hashlib.sha256()
        for t in (self.mean, self.factor):
            digest.update(np.ascontiguousarray(t.numpy(), dtype="<f8").tobytes())
        digest.update(b"diag" if self.diagonal else b"full")
        return digest.hexdigest()[:16]

    def summary(self) -> dict:
        """JSON-ready description: source, kind, dimension, fingerprint, regularisation, details."""
        return {
            "source": self.source,
            "covariance": "diagonal" if self.diagonal else "full",
            "dim": self.dim,
            "fingerprint": self.fingerprint(),
            "regularisation": dict(self.regularisation),
            **self.details,
        }


def _regularise(eigenvalues: Tensor, diagonal_mean: float, epsilon: float, source: str) -> tuple[float, dict]:
    """The ridge to add (0.0 if none is needed) and the record of the decision."""
    smallest, largest = float(eigenvalues.min()), float(eigenvalues.max())
    ridge = epsilon * diagonal_mean
    applied = smallest < ridge

    def condition(low: float, high: float) -> float | None:
        return high / low if low > 0 else None  # None: singular or indefinite (JSON has no infinity)

    record = {
        "applied": bool(applied),
        "epsilon": float(epsilon),
        "ridge": float(ridge) if applied else 0.0,
        "min_eigenvalue": smallest,
        "max_eigenvalue": largest,
        "condition_number": condition(smallest, largest),
        "condition_number_used": condition(smallest + ridge, largest + ridge) if applied else condition(smallest, largest),
    }
    if applied:
        log.event("mahalanobis_regularised", source=source, **record)
    return (ridge if applied else 0.0), record


def from_gaussian(mean: Tensor, covariance: Tensor, epsilon: float = 1e-5, source: str = "given",
                  details: dict | None = None) -> MahalanobisModel:
    """A model for N(mean, covariance); covariance (D,) is a diagonal (variances), (D, D) a full matrix."""
    if not epsilon > 0 or not math.isfinite(epsilon):
        raise ValueError(f"epsilon must be finite and > 0, got {epsilon}")
    mu = torch.as_tensor(mean).detach().to("cpu", torch.float64).reshape(-1)
    cov = torch.as_tensor(covariance).detach().to("cpu", torch.float64)
    d = mu.shape[0]
    if d == 0:
        raise ValueError("the Gaussian has no dimensions")
    if cov.shape not in ((d,), (d, d)):
        raise ValueError(f"covariance must be ({d},) or ({d}, {d}) for a mean of {d} values, got {tuple(cov.shape)}")
    if not (torch.isfinite(mu).all() and torch.isfinite(cov).all()):
        raise ValueError(f"{source}: the Gaussian has non-finite values")
    diagonal = cov.ndim == 1
    diag = cov if diagonal else cov.diagonal()
    diagonal_mean = float(diag.mean())
    if not diagonal_mean > 0:
        raise ValueError(f"{source}: the covariance's diagonal averages {diagonal_mean:g}; it describes no spread")
    if diagonal:
        ridge, record = _regularise(cov, diagonal_mean, epsilon, source)
        factor = (cov + ridge).sqrt()
    else:
        cov = 0.5 * (cov + cov.T)  # rounding can leave it slightly asymmetric
        ridge, record = _regularise(torch.linalg.eigvalsh(cov), diagonal_mean, epsilon, source)
        used = cov + ridge * torch.eye(d, dtype=torch.float64) if ridge else cov
        factor, info = torch.linalg.cholesky_ex(used)
        if int(info) != 0:  # only possible if the eigenvalues were wrong by more than the ridge
            raise ValueError(f"{source}: the covariance is not positive definite even after regularisation")
    return MahalanobisModel(mu, factor, diagonal, source, record, dict(details or {}))


def fit_ledoit_wolf(features: Tensor | np.ndarray, epsilon: float = 1e-5, source: str = "ledoit_wolf") -> MahalanobisModel:
    """Mean and Ledoit-Wolf shrunk covariance of reference features (n, D), as a model (regularised if needed)."""
    x = np.asarray(torch.as_tensor(features).detach().to("cpu", torch.float64).numpy())
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need at least 2 reference feature vectors (n, D), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{source}: reference features contain non-finite values")
    estimator = LedoitWolf(store_precision=False, assume_centered=False).fit(x)
    details = {"reference_count": int(x.shape[0]), "shrinkage": float(estimator.shrinkage_)}
    return from_gaussian(torch.from_numpy(estimator.location_), torch.from_numpy(estimator.covariance_),
                         epsilon, source, details)


def mahalanobis(features: Tensor, mean: Tensor, covariance: Tensor, epsilon: float = 1e-5) -> Tensor:
    """D_M of each row of features to N(mean, covariance) (covariance diagonal (D,) or full (D, D)), (N,) float64."""
    return from_gaussian(mean, covariance, epsilon).distances(features)
