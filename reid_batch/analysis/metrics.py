"""Evaluation metrics: pure functions, images or features in, numbers and tables out (no manifest, no I/O).

Conventions shared by every function here:
- Images are (N, H, W), (N, 1, H, W) or (N, C, H, W), torch tensors or numpy arrays, either uint8 (0..255) or
  float in [0, 1]. Where a metric needs the 256 grey levels of a float image, it bins with
  ``clip(floor(x * 255 + 0.5), 0, 255)`` (round half up), so a float image that came from a uint8 one maps
  back to exactly the same levels. Colour images are averaged over channels where a metric is grey-level.
- Results are numpy float64 arrays / Python floats (they go into tables and JSON, not back into models).

What the study did and what we do differently: it fitted a PCA per image set, so its kurtosis curves were in
different bases and not comparable; here one basis is fitted on a stated set (:func:`fit_pca`) and every set
is projected onto it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from os import PathLike
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import pandas as pd
from matplotlib.figure import Figure  # a bare Figure renders with Agg, never touching pyplot's global state
from scipy import linalg, stats
from scipy.stats import kurtosis
from sklearn.decomposition import PCA
from sklearn.metrics import roc_auc_score

from torchvision.models import inception_v3

from reid_batch import log
from reid_batch.checkpoints import load_into, load_state_dict
from reid_batch.formats import figure_png

ArrayLike = torch.Tensor | np.ndarray


# ----------------------------------------------------------------------------------------------------------------
# Image handling shared by the image metrics


def _as_tensor(images: ArrayLike) -> torch.Tensor:
    return images.detach().cpu() if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))


def _as_nchw(images: ArrayLike) -> torch.Tensor:
    tensor = _as_tensor(images)
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(1)
    if tensor.ndim != 4:
        raise ValueError(f"expected images of shape (N, H, W) or (N, C, H, W), got {tuple(tensor.shape)}")
    return tensor


def _unit_float(images: ArrayLike, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, C, H, W) in [0, 1]; uint8 is divided by 255, floats are taken as already in [0, 1]."""
    tensor = _as_nchw(images)
    if tensor.dtype == torch.uint8:
        return tensor.to(dtype) / 255.0
    if not tensor.is_floating_point():
        raise ValueError(f"images must be uint8 or float in [0, 1], got {tensor.dtype}")
    return tensor.to(dtype)


def _grey(images: ArrayLike, dtype: torch.dtype) -> torch.Tensor:
    tensor = _unit_float(images, dtype)
    return tensor.mean(dim=1, keepdim=True) if tensor.shape[1] > 1 else tensor


# ----------------------------------------------------------------------------------------------------------------
# Pixel-space entropy


# Pixels per histogram pass on a GPU: bounds the index tensor to ~512 MB of int64.
_HISTOGRAM_PIXELS = 64 * 2**20


def pixel_entropy_on_device(images: torch.Tensor) -> torch.Tensor:
    """(N,) float64 Shannon entropy in bits of each image's 256-bin grey-level histogram, on the images' device.

    The one definition of pixel entropy (sampling's per-candidate column and evaluation's summaries both use it):
    colour images are averaged over channels first, floats are binned as in the module docstring. On a CPU, one
    bincount of one-byte levels per image; on a GPU, scatter_add_ (CUDA's bincount reads its maximum back to the
    host, a sync per batch); adding ones is exact in float64 whatever the order.
    """
    tensor = images.detach()
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(1)
    if tensor.ndim != 4:
        raise ValueError(f"expected images of shape (N, H, W) or (N, C, H, W), got {tuple(tensor.shape)}")
    if tensor.dtype != torch.uint8 and not tensor.is_floating_point():
        raise ValueError(f"images must be uint8 or float in [0, 1], got {tensor.dtype}")
    if tensor.shape[1] > 1:
        unit = tensor.float() / 255.0 if tensor.dtype == torch.uint8 else tensor.float()
        tensor = unit.mean(dim=1, keepdim=True)
    if tensor.dtype == torch.uint8:
        levels = tensor
    else:
        levels = torch.floor(tensor.double() * 255.0 + 0.5).clamp_(0, 255).to(torch.uint8)
    count, pixels = levels.shape[0], levels[0].numel()
    if count == 0:
        return torch.zeros(0, dtype=torch.float64, device=levels.device)
    if levels.device.type == "cpu":
        histograms = torch.stack([torch.bincount(image.reshape(-1), minlength=256) for image in levels]).double()
    else:
        histograms = scatter_histograms(levels.flatten(1))
    probabilities = histograms / pixels
    # 0 * log 0 is taken as 0: xlogy does exactly that.
    return -torch.special.xlogy(probabilities, probabilities).sum(dim=1) / math.log(2.0)


def scatter_histograms(levels: torch.Tensor, chunk_pixels: int = _HISTOGRAM_PIXELS) -> torch.Tensor:
    """(N, 256) float64 histograms of (N, P) uint8 levels by scatter_add_, about `chunk_pixels` pixels at a time:
    the int64 indices exist for one chunk only (for a whole batch of 1024 px images they were 8 bytes per pixel,
    25 MB per image, before any chunking)."""
    count, pixels = levels.shape
    histograms = torch.empty(count, 256, dtype=torch.float64, device=levels.device)
    step = max(1, chunk_pixels // max(pixels, 1))
    for at in range(0, count, step):
        part = levels[at : at + step].to(torch.int64)
        index = (part + torch.arange(part.shape[0], device=part.device).unsqueeze(1) * 256).reshape(-1)
        ones = torch.ones(1, dtype=torch.float64, device=part.device).expand(index.shape[0])
        histograms[at : at + step] = torch.zeros(part.shape[0] * 256, dtype=torch.float64,
                                                 device=part.device).scatter_add_(0, index, ones).view(-1, 256)
    return histograms


def pixel_entropy(images: ArrayLike) -> np.ndarray:
    """(N,) Shannon entropy in bits of each image's 256-bin grey-level histogram (see pixel_entropy_on_device).

    0 for a constant image, 8 for one using all 256 levels equally.
    """
    return pixel_entropy_on_device(_as_nchw(images)).numpy()


# ----------------------------------------------------------------------------------------------------------------
# PCA kurtosis


@dataclass(frozen=True)
class PCABasis:
    """One common PCA basis: every image set is projected onto it, so kurtosis curves are comparable."""

    mean: np.ndarray  # (D,)
    components: np.ndarray  # (K, D), rows are unit principal axes, by decreasing variance
    explained_variance_ratio: np.ndarray  # (K,)
    fitted_on: str  # which set the basis was fitted on, for the report
    num_fit_images: int

    @property
    def num_components(self) -> int:
        return int(self.components.shape[0])

    def project(self, images: ArrayLike) -> np.ndarray:
        """(N, K) scores of the flattened [0, 1] images on the basis."""
        flat = _flatten_images(images)
        if flat.shape[1] != self.mean.shape[0]:
            raise ValueError(
                f"images flatten to {flat.shape[1]} values but the basis was fitted on {self.mean.shape[0]} "
                "(same image size and channels needed)"
            )
        return (flat - self.mean) @ self.components.T


def _flatten_images(images: ArrayLike) -> np.ndarray:
    return _unit_float(images, torch.float64).flatten(1).numpy()


def fit_pca(reference_images: ArrayLike, n_components: int, fitted_on: str = "reference", seed: int = 0) -> PCABasis:
    """Fit ONE PCA basis on the flattened [0, 1] `reference_images` (sklearn PCA, centred, not whitened).

    `fitted_on` names the set (e.g. "reference" for real images, or "pooled") and travels with the basis into
    the report. PCA cannot have more components than min(images, pixels): a larger request is reduced to that
    and logged.
    """
    flat = _flatten_images(reference_images)
    possible = min(flat.shape)
    if n_components > possible:
        log.event("pca_components_reduced", requested=n_components, used=possible, images=flat.shape[0],
                  pixels=flat.shape[1], fitted_on=fitted_on)
        n_components = possible
    if n_components < 1:
        raise ValueError("PCA needs at least one image and one pixel")
    pca = PCA(n_components=n_components, random_state=seed).fit(flat)
    return PCABasis(
        mean=pca.mean_.copy(),
        components=pca.components_.copy(),
        explained_variance_ratio=pca.explained_variance_ratio_.copy(),
        fitted_on=fitted_on,
        num_fit_images=int(flat.shape[0]),
    )


def _excess_kurtosis(scores: np.ndarray, axis: int, bias: bool) -> np.ndarray:

    with np.errstate(divide="ignore", invalid="ignore"):
        return kurtosis(scores, axis=axis, fisher=True, bias=bias)


@dataclass(frozen=True)
class KurtosisResult:
    per_component: np.ndarray  # (K,) excess kurtosis of each component's scores
    per_component_se: np.ndarray  # (K,) bootstrap standard error of each component's kurtosis
    mean: float  # average over components
    bootstrap_se: float  # bootstrap standard error of `mean` (NaN if bootstrap == 0)
    num_images: int
    bias_corrected: bool


def pca_kurtosis(
    images: ArrayLike, basis: PCABasis, bootstrap: int = 200, seed: int = 0, bias: bool = False
) -> KurtosisResult:
    """Excess (Fisher) kurtosis of each principal component's scores over `images`, and their average.

    `bias=False` (the default) is scipy's bias-corrected G2 estimator (the same as pandas' kurt), because the
    sets we compare can be small; it needs at least 4 images. `bias=True` gives the plain moment ratio g2.
    The standard errors come from `bootstrap` resamples of the images with replacement (seeded). A component
    with zero variance over the images has NaN kurtosis, and then the mean is NaN too rather than silently
    dropping it.
    """
    scores = basis.project(images)
    count = scores.shape[0]
    if count < (1 if bias else 4):
        raise ValueError(f"kurtosis needs at least {1 if bias else 4} images, got {count}")
    per_component = _excess_kurtosis(scores, axis=0, bias=bias)
    per_component_se = np.full(basis.num_components, np.nan)
    mean_se = float("nan")
    if bootstrap > 0:
        rng = np.random.default_rng(seed)
        resampled = np.empty((bootstrap, basis.num_components))
        # Bounded memory: resample a block of bootstrap replicates at a time.
        block = max(1, 4_000_000 // max(1, count * basis.num_components))
        for start in range(0, bootstrap, block):
            stop = min(bootstrap, start + block)
            picks = rng.integers(0, count, size=(stop - start, count))
            resampled[start:stop] = _excess_kurtosis(scores[picks], axis=1, bias=bias)
        per_component_se = resampled.std(axis=0, ddof=1) if bootstrap > 1 else np.zeros(basis.num_components)
        mean_se = float(resampled.mean(axis=1).std(ddof=1)) if bootstrap > 1 else 0.0
    return KurtosisResult(
        per_component=per_component,
        per_component_se=per_component_se,
        mean=float(per_component.mean()),
        bootstrap_se=mean_se,
        num_images=int(count),
        bias_corrected=not bias,
    )


def kurtosis_curve_png(
    curves: Mapping[str, np.ndarray],
    path: str | PathLike | None = None,
    standard_errors: Mapping[str, np.ndarray] | None = None,
    title: str = "Excess kurtosis per principal component (common basis)",
) -> bytes:
    """Plot each set's per-component kurtosis over component index (shaded +-1 SE where given).

    Returns the PNG bytes, and also writes them to `path` if one is given.
    """
    figure = Figure(figsize=(7, 4.5), dpi=100)
    axes = figure.add_subplot()
    for name, values in curves.items():
        values = np.asarray(values, dtype=float)
        components = np.arange(1, values.shape[0] + 1)
        (line,) = axes.plot(components, values, label=name)
        if standard_errors is not None and name in standard_errors:
            error = np.asarray(standard_errors[name], dtype=float)
            axes.fill_between(components, values - error, values + error, color=line.get_color(), alpha=0.2)
    axes.axhline(0.0, color="grey", linewidth=0.8, linestyle=":")
    axes.set_xlabel("principal component")
    axes.set_ylabel("excess kurtosis (0 = Gaussian)")
    axes.set_title(title)
    if curves:
        axes.legend()
    figure.tight_layout()
    png = figure_png(figure)
    if path is not None:
        with open(path, "wb") as handle:
            handle.write(png)
    return png


# ----------------------------------------------------------------------------------------------------------------
# Frechet Inception Distance


INCEPTION_SIZE = 299
INCEPTION_MIN_SIZE = 75  # smallest input Inception-v3's stride/pool stack accepts


class InceptionFeatures:
    """2048-d pool features of torchvision's Inception-v3, for FID.

    With `weights_path` (a torchvision-layout state dict, e.g. ``inception_v3(weights="DEFAULT").state_dict()``
    saved as .pth or .safetensors, with or without the AuxLogits head) the features are the usual ones, loaded
    safely (no code executed from the file). Without it the network keeps seeded random weights: `trained` is
    False and FID values are only a relative measure between sets scored by the same instance, never
    comparable to published FIDs; the report must say so.

    Inputs are [0, 1] images; grey images are repeated to 3 channels, resized (bilinear) to 299 x 299 unless
    `image_size=None`, and mapped to [-1, 1], the range torchvision's ported weights expect (what torchvision's
    ``transform_input=True`` produces from ImageNet-normalised input).
    """

    def __init__(
        self,
        weights_path: str | PathLike | None = None,
        image_size: int | None = INCEPTION_SIZE,
        device: str | torch.device = "cpu",
        seed: int = 0,
    ):
        # Seeded so untrained features (and so relative FIDs) are the same from run to run.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False)
        self.trained = weights_path is not None
        if weights_path is not None:
            state_dict = load_state_dict(weights_path)
            # Checkpoints saved from aux_logits=False models, or with the classifier dropped, are fine too.
            if not any(key.startswith("AuxLogits.") for key in state_dict):
                model.AuxLogits = None
            if "fc.weight" not in state_dict:
                model.fc = torch.nn.Identity()
            load_into(model, state_dict, where=str(weights_path), expected="torchvision inception_v3")
        model.fc = torch.nn.Identity()
        model.AuxLogits = None  # only used in training mode; dropping it saves memory
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.image_size = image_size
        self.weights_path = None if weights_path is None else str(weights_path)
        log.event("inception_features_ready", trained=self.trained, weights=self.weights_path, image_size=image_size)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device)
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        elif images.shape[1] != 3:
            raise ValueError(f"expected 1 or 3 channels, got {images.shape[1]}")
        if self.image_size is not None and tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False)
        if min(images.shape[-2:]) < INCEPTION_MIN_SIZE:
            raise ValueError(f"Inception-v3 needs images of at least {INCEPTION_MIN_SIZE} px, got "
                             f"{tuple(images.shape[-2:])}")
        return images * 2.0 - 1.0

    @torch.inference_mode()
    def __call__(self, images: ArrayLike, batch_size: int = 32) -> np.ndarray:
        """(N, 2048) float64 features of `images` ((N, H, W) or (N, C, H, W), uint8 or [0, 1] float)."""
        tensor = _unit_float(images)
        out = [self.model(self._prepare(tensor[start:start + batch_size])).double().cpu()
               for start in range(0, tensor.shape[0], batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, 2048))


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features, in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need at least 2 feature rows of shape (N, D), got {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))``.

    As pytorch-fid does: if the square root of the product is not finite (near-singular covariances, e.g.
    fewer images than dimensions), eps * I is added to both covariances and it is recomputed; a square root
    with a non-negligible imaginary part (> 1e-3 on the diagonal) is an error, a negligible one is dropped.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"inconsistent shapes: mu {mu1.shape}/{mu2.shape}, sigma {sigma1.shape}/{sigma2.shape}")
    difference = mu1 - mu2
    with np.errstate(all="ignore"):
        product_root = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(product_root).all():
        log.event("fid_covariance_regularised", eps=eps, dims=int(mu1.shape[0]))
        offset = np.eye(mu1.shape[0]) * eps
        with np.errstate(all="ignore"):
            product_root = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if not np.isfinite(product_root).all():
            raise ValueError("the covariance product has no finite square root even after regularisation")
    if np.iscomplexobj(product_root):
        largest_imaginary = float(np.max(np.abs(np.diagonal(product_root).imag)))
        if largest_imaginary > 1e-3:
            raise ValueError(f"square root of the covariance product has imaginary part {largest_imaginary:.3g}; "
                             "the covariances are not valid (not positive semi-definite?)")
        product_root = product_root.real
    return float(difference @ difference + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(product_root))


@dataclass(frozen=True)
class FIDResult:
    value: float
    num_a: int
    num_b: int
    dims: int
    # Fewer images than feature dimensions: the covariance estimates are singular and FID is biased upwards
    # (and noisy); fine for comparing sets of the same size, not as an absolute number.
    underdetermined: bool


def fid(features_a: np.ndarray, features_b: np.ndarray, eps: float = 1e-6) -> FIDResult:
    """FID between two (N, D) feature sets (e.g. from :class:`InceptionFeatures`)."""
    mu_a, sigma_a = feature_statistics(features_a)
    mu_b, sigma_b = feature_statistics(features_b)
    num_a, num_b, dims = int(np.shape(features_a)[0]), int(np.shape(features_b)[0]), int(mu_a.shape[0])
    underdetermined = min(num_a, num_b) < dims
    if underdetermined:
        log.event("fid_underdetermined", num_a=num_a, num_b=num_b, dims=dims,
                  note="fewer images than feature dimensions: singular covariances, FID biased; compare only "
                       "between sets of equal size")
    return FIDResult(frechet_distance(mu_a, sigma_a, mu_b, sigma_b, eps=eps), num_a, num_b, dims, underdetermined)


# ----------------------------------------------------------------------------------------------------------------
# SSIM


SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


def _gaussian_window(sigma: float, dtype: torch.dtype) -> torch.Tensor:
    # scipy.ndimage.gaussian_filter's kernel at truncate=3.5 (what skimage uses): radius int(3.5 * 1.5 + 0.5) = 5.
    radius = (SSIM_WINDOW - 1) // 2
    offsets = torch.arange(-radius, radius + 1, dtype=dtype)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return weights / weights.sum()


def ssim(a: ArrayLike, b: ArrayLike, data_range: float = 1.0, k1: float = 0.01, k2: float = 0.03) -> np.ndarray:
    """(N,) mean SSIM of each pair (a[i], b[i]): Gaussian window 11, sigma 1.5, population covariances.

    Matches ``skimage.metrics.structural_similarity(a, b, data_range=..., gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False)``: skimage averages the SSIM map only where the whole window lies inside the
    image, so a 'valid' separable convolution gives the same map without any border handling. Colour images
    are compared on their channel mean. Computed in float64; images must be at least 11 x 11.
    """
    x, y = _grey(a, torch.float64), _grey(b, torch.float64)
    if x.shape != y.shape:
        raise ValueError(f"image batches differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW} x {SSIM_WINDOW}, got {tuple(x.shape[-2:])}")
    window = _gaussian_window(SSIM_SIGMA, torch.float64)
    rows, cols = window.view(1, 1, -1, 1), window.view(1, 1, 1, -1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, rows), cols)

    # One pass over all five moments: stack them as a batch.
    moments = blur(torch.cat([x, y, x * x, y * y, x * y]))
    mu_x, mu_y, xx, yy, xy = moments.chunk(5)
    var_x, var_y, cov_xy = xx - mu_x * mu_x, yy - mu_y * mu_y, xy - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1).numpy()


# ----------------------------------------------------------------------------------------------------------------
# Nearest neighbours


def pixel_features(images: ArrayLike, size: int = 32) -> np.ndarray:
    """(N, size*size) float32 pixel feature vectors: grey [0, 1] images area-averaged to size x size, flattened.

    The pixel space used for nearest-neighbour search when no learned feature space is wanted; its Euclidean
    distance is the root of the summed squared differences of the downsampled grey levels.
    """
    grey = _grey(images, torch.float32)
    return F.interpolate(grey, size=(size, size), mode="area").flatten(1).numpy()


def _as_float64(values: ArrayLike) -> np.ndarray:
    array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    return array.astype(np.float64, copy=False)


def nearest_neighbours(
    queries: ArrayLike, references: ArrayLike, k: int = 1, chunk: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean k nearest references of each query: (distances (N, k) ascending, indices (N, k) int64).

    Blocks of `chunk` queries against `chunk` references at a time (memory ~ chunk^2 doubles whatever the set
    sizes), keeping a running top k. Candidates are ranked by the fast ||q||^2 + ||r||^2 - 2 q.r expansion and
    the returned distances recomputed exactly as ||q - r|| (the expansion loses precision near 0).
    """
    query_array, reference_array = _as_float64(queries), _as_float64(references)
    if query_array.ndim != 2 or reference_array.ndim != 2 or query_array.shape[1] != reference_array.shape[1]:
        raise ValueError(f"expected (N, D) queries and (M, D) references, got {query_array.shape} and "
                         f"{reference_array.shape}")
    num_references = reference_array.shape[0]
    if not 1 <= k <= num_references:
        raise ValueError(f"k must be between 1 and the number of references ({num_references}), got {k}")
    query_t, reference_t = torch.from_numpy(query_array), torch.from_numpy(reference_array)
    reference_norms = (reference_t * reference_t).sum(dim=1)
    all_distances, all_indices = [], []
    for q_start in range(0, query_t.shape[0], chunk):
        block = query_t[q_start:q_start + chunk]
        block_norms = (block * block).sum(dim=1, keepdim=True)
        best_squared = torch.full((block.shape[0], 0), 0.0, dtype=torch.float64)
        best_index = torch.zeros((block.shape[0], 0), dtype=torch.long)
        for r_start in range(0, num_references, chunk):
            stop = min(num_references, r_start + chunk)
            squared = block_norms + reference_norms[r_start:stop] - 2.0 * block @ reference_t[r_start:stop].T
            merged_squared = torch.cat([best_squared, squared], dim=1)
            merged_index = torch.cat([best_index, torch.arange(r_start, stop).expand(block.shape[0], -1)], dim=1)
            keep = torch.topk(merged_squared, min(k, merged_squared.shape[1]), dim=1, largest=False).indices
            best_squared, best_index = merged_squared.gather(1, keep), merged_index.gather(1, keep)
        exact = (block.unsqueeze(1) - reference_t[best_index]).norm(dim=2)
        order = torch.argsort(exact, dim=1, stable=True)
        all_distances.append(exact.gather(1, order))
        all_indices.append(best_index.gather(1, order))
    if not all_distances:
        return np.zeros((0, k)), np.zeros((0, k), dtype=np.int64)
    return torch.cat(all_distances).numpy(), torch.cat(all_indices).numpy()


# ----------------------------------------------------------------------------------------------------------------
# Intervals and membership signal


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval (no continuity correction) for a binomial proportion successes / n.

    Unlike the normal interval it stays inside [0, 1] and is sensible at 0 or n successes and small n.
    With n == 0 nothing is known: (0, 1).
    """
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n == 0:
        return 0.0, 1.0
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    proportion = successes / n
    denominator = 1 + z * z / n
    centre = (proportion + z * z / (2 * n)) / denominator
    half_width = z * math.sqrt(proportion * (1 - proportion) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half_width), min(1.0, centre + half_width)


def membership_auc(distances_to_members: ArrayLike, distances_to_nonmembers: ArrayLike) -> float:
    """ROC AUC of "lower distance means member": the probability that a random member's distance is below a
    random non-member's (ties count half). 0.5 = no membership signal, 1 = members always closer."""
    members, nonmembers = _as_float64(distances_to_members).ravel(), _as_float64(distances_to_nonmembers).ravel()
    if members.size == 0 or nonmembers.size == 0:
        raise ValueError("membership AUC needs at least one member and one non-member distance")
    labels = np.concatenate([np.ones(members.size), np.zeros(nonmembers.size)])
    return float(roc_auc_score(labels, -np.concatenate([members, nonmembers])))


# ----------------------------------------------------------------------------------------------------------------
# Demographic errors


def _sex_labels(values: ArrayLike | Sequence) -> np.ndarray:
    """Sex as 0/1 floats with 1 = male (the demographic model's label 1); accepts 0/1 or "M"/"F" strings."""
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().double().numpy()
    array = np.asarray(values, dtype=object)
    if array.size and isinstance(array.flat[0], str):
        mapping = {"M": 1.0, "MALE": 1.0, "F": 0.0, "FEMALE": 0.0}
        unknown = sorted({v for v in array.ravel() if str(v).strip().upper() not in mapping})
        if unknown:
            raise ValueError(f"unknown sex values {unknown[:5]}; expected M/F or 0/1")
        return np.array([mapping[str(v).strip().upper()] for v in array.ravel()])
    return array.astype(np.float64)


def _mean_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    if values.size < 2:
        return float("nan"), float("nan")
    half_width = float(stats.t.ppf(0.5 + confidence / 2, values.size - 1) * values.std(ddof=1) / math.sqrt(values.size))
    centre = float(values.mean())
    return max(0.0, centre - half_width), centre + half_width


def demographic_errors(
    pred_age: ArrayLike,
    pred_sex_prob: ArrayLike,
    true_age: ArrayLike,
    true_sex: ArrayLike | Sequence,
    confidence: float = 0.95,
) -> dict:
    """Age mean absolute error (years) and sex accuracy of predictions against ground truth.

    Sex: predicted male where pred_sex_prob >= 0.5; true_sex is 0/1 (1 = male) or "M"/"F". Pairs with a missing
    (NaN) true age or sex are left out of that metric, so the two `n`s can differ. Intervals: age_mae_ci is the
    Student-t interval of the mean absolute error (NaN below 2 pairs; approximate, errors are skewed),
    sex_accuracy_ci the Wilson interval.
    """
    predicted_age, probability = _as_float64(pred_age).ravel(), _as_float64(pred_sex_prob).ravel()
    actual_age, actual_sex = _as_float64(true_age).ravel(), _sex_labels(true_sex).ravel()
    if not (predicted_age.size == probability.size == actual_age.size == actual_sex.size):
        raise ValueError("pred_age, pred_sex_prob, true_age and true_sex must have the same length")
    age_known = ~np.isnan(actual_age)
    sex_known = ~np.isnan(actual_sex)
    absolute_errors = np.abs(predicted_age[age_known] - actual_age[age_known])
    correct = (probability[sex_known] >= 0.5) == (actual_sex[sex_known] >= 0.5)
    return {
        "age_mae": float(absolute_errors.mean()) if absolute_errors.size else float("nan"),
        "age_mae_ci": _mean_interval(absolute_errors, confidence),
        "age_n": int(absolute_errors.size),
        "sex_accuracy": float(correct.mean()) if correct.size else float("nan"),
        "sex_accuracy_ci": wilson_interval(int(correct.sum()), int(correct.size), confidence),
        "sex_n": int(correct.size),
        "n": int(predicted_age.size),
    }


# ----------------------------------------------------------------------------------------------------------------
# Re-identification on the synthetic world


@dataclass(frozen=True)
class ReidentificationResult:
    """Per-sample table and summary of :func:`reidentification`."""

    table: "pd.DataFrame"  # one row per sample
    rate: float  # fraction of samples counted as re-identifying (see `reidentification`)
    rate_ci: tuple[float, float]  # Wilson interval
    p_value: float  # one-sided binomial test of rate > 0.5
    num_samples: int
    num_train: int
    num_control: int
    distinct_train_patients: int  # how many different training patients the re-identifying samples point at
    threshold: float | None
    summary: dict = field(default_factory=dict)


def reidentification(
    sample_features: ArrayLike,
    train_features: ArrayLike,
    train_patient_ids: Sequence,
    control_features: ArrayLike,
    control_patient_ids: Sequence,
    threshold: float | None = None,
    confidence: float = 0.95,
    chunk: int = 1024,
) -> ReidentificationResult:
    """Does each sample sit closer to the target's training images than to unseen images of the same kind?

    For each sample (e.g. a likely sample's feature vector) this finds, by Euclidean distance in the given
    feature space, its nearest training image (patient id, distance, index) and its nearest control image
    (images of other patients from the same distribution that the target never saw). `member_closer` is
    d_train < d_control. A sample counts as re-identifying when member_closer holds and, if `threshold` is
    given, also d_train <= threshold (an absolute "this is that patient's image" bound).

    What it measures: if the samples carried nothing specific to the training patients, a sample's nearest
    neighbour would be equally likely to come from either set, so the rate would be about 0.5 — PROVIDED the
    two sets are the same size (a larger set has closer nearest neighbours by chance alone) and drawn from the
    same distribution. Use equal-size training and control sets; a size mismatch is logged. `p_value` tests
    rate > 0.5 (one-sided exact binomial), meaningful only under that proviso. A rate well above 0.5 says the
    samples are pulled towards specific training images; `train_patient` says whose, and
    `distinct_train_patients` whether they spread over many patients or collapse onto a few.

    The interval and p-value treat the samples as independent draws given these fixed training and control
    sets. Samples that land next to each other share their answer, so when many collapse onto a few training
    images the evidence is weaker than the sample count suggests: read the rate together with
    `distinct_train_patients`.
    """
    train_ids, control_ids = np.asarray(train_patient_ids, dtype=object), np.asarray(control_patient_ids, dtype=object)
    train_array, control_array = _as_float64(train_features), _as_float64(control_features)
    if train_ids.shape[0] != train_array.shape[0] or control_ids.shape[0] != control_array.shape[0]:
        raise ValueError("each feature set needs exactly one patient id per row")
    if train_array.shape[0] != control_array.shape[0]:
        log.event("reidentification_unequal_sets", train=int(train_array.shape[0]),
                  control=int(control_array.shape[0]),
                  note="chance rate is not 0.5 when the training and control sets differ in size")
    train_distance, train_index = nearest_neighbours(sample_features, train_array, k=1, chunk=chunk)
    control_distance, control_index = nearest_neighbours(sample_features, control_array, k=1, chunk=chunk)
    train_distance, train_index = train_distance[:, 0], train_index[:, 0]
    control_distance, control_index = control_distance[:, 0], control_index[:, 0]
    member_closer = train_distance < control_distance
    reidentified = member_closer if threshold is None else member_closer & (train_distance <= threshold)
    table = pd.DataFrame({
        "sample": np.arange(train_distance.shape[0]),
        "train_index": train_index,
        "train_patient": train_ids[train_index] if train_index.size else np.array([], dtype=object),
        "train_distance": train_distance,
        "control_index": control_index,
        "control_patient": control_ids[control_index] if control_index.size else np.array([], dtype=object),
        "control_distance": control_distance,
        "member_closer": member_closer,
        "reidentified": reidentified,
    })
    count, hits = int(reidentified.size), int(reidentified.sum())
    rate = hits / count if count else float("nan")
    p_value = float(stats.binomtest(hits, count, 0.5, alternative="greater").pvalue) if count else float("nan")
    distinct = int(table.loc[table["reidentified"], "train_patient"].nunique())
    summary = {
        "rate": rate,
        "rate_ci": wilson_interval(hits, count, confidence),
        "p_value": p_value,
        "reidentified": hits,
        "num_samples": count,
        "num_train": int(train_array.shape[0]),
        "num_control": int(control_array.shape[0]),
        "distinct_train_patients": distinct,
        "threshold": threshold,
    }
    return ReidentificationResult(
        table=table,
        rate=rate,
        rate_ci=summary["rate_ci"],
        p_value=p_value,
        num_samples=count,
        num_train=summary["num_train"],
        num_control=summary["num_control"],
        distinct_train_patients=distinct,
        threshold=threshold,
        summary=summary,
    )


def binary_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy (threshold 0.5 on the probability) and ROC AUC of one-logit binary predictions."""
    probabilities = torch.sigmoid(logits.float()).numpy()
    y = labels.numpy().astype(int)
    accuracy = float(((probabilities >= 0.5).astype(int) == y).mean()) if len(y) else float("nan")
    auc = float(roc_auc_score(y, probabilities)) if len(np.unique(y)) == 2 else float("nan")
    return {"accuracy": accuracy, "auc": auc}


def classifier_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy and ROC AUC: one-logit binary, or K outputs (accuracy of the argmax, one-vs-rest macro AUC)."""
    if logits.shape[1] == 1:
        return binary_metrics(logits[:, 0], labels)
    y = labels.numpy().astype(int)
    probabilities = torch.softmax(logits.float(), dim=1).numpy()
    accuracy = float((probabilities.argmax(1) == y).mean()) if len(y) else float("nan")
    present = len(np.unique(y)) == logits.shape[1]
    scores = probabilities[:, 1] if logits.shape[1] == 2 else probabilities  # sklearn reads two classes as binary
    auc = float(roc_auc_score(y, scores, multi_class="ovr")) if present else float("nan")
    return {"accuracy": accuracy, "auc": auc}


def resampled_classifier_metrics(logits: torch.Tensor, labels: torch.Tensor, groups: Sequence | None,
                                 bootstrap: int, seed: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """classifier_metrics' accuracy and AUC on `bootstrap` resamples of the images, vectorised: (the image rows of
    each resample, accuracy (B,), AUC (B,), NaN where a resample misses a class). groups: each image's cluster, the
    unit resampled with replacement (None: each image alone)."""
    y = labels.numpy().astype(int)
    predicted = _predictions(logits)
    if logits.shape[1] == 1:
        score = torch.sigmoid(logits.float()[:, 0]).numpy()
        columns = [(score, 1)]
    else:
        probabilities = torch.softmax(logits.float(), dim=1).numpy()
        columns = [(probabilities[:, 1], 1)] if logits.shape[1] == 2 else \
            [(probabilities[:, k], k) for k in range(logits.shape[1])]
    cluster = np.arange(len(y)) if groups is None else pd.factorize(pd.Series(list(groups)).astype(str))[0]
    members = [np.flatnonzero(cluster == c) for c in range(cluster.max() + 1)]
    rng = np.random.default_rng(seed)
    rows = [np.concatenate([members[c] for c in draw]) for draw in rng.integers(0, len(members),
                                                                                (bootstrap, len(members)))]
    # Clusters differ in size, so resamples differ in length: each is padded to the longest with -1.
    index = np.full((bootstrap, max(len(r) for r in rows)), -1)
    for b, r in enumerate(rows):
        index[b, :len(r)] = r
    valid = index >= 0
    safe = np.where(valid, index, 0)
    accuracy = np.where(valid, predicted[safe] == y[safe], False).sum(1) / valid.sum(1)
    pad = (~valid).sum(1)[:, None]
    aucs = []
    for score, k in columns:
        # A padding score is below every real one (probabilities are >= 0), so a real image's rank among the real
        # ones is its rank minus the padding count; Mann-Whitney with ties counted half, as roc_auc_score.
        ranks = stats.rankdata(np.where(valid, score[safe], -1.0), axis=1) - pad
        positive, negative = valid & (y[safe] == k), valid & (y[safe] != k)
        m, n = positive.sum(1), negative.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            aucs.append((np.where(positive, ranks, 0.0).sum(1) - m * (m + 1) / 2) / (m * n))
    return rows, accuracy, np.mean(aucs, axis=0)


def classifier_intervals(logits: torch.Tensor, labels: torch.Tensor, groups: Sequence | None = None,
                         bootstrap: int = 200, seed: int = 0, confidence: float = 0.95) -> dict:
    """Percentile intervals of classifier_metrics' accuracy and AUC over `bootstrap` resamples of the validation set.

    groups: the cluster of each image (its patient, where validation patients are unseen in training: a patient's
    images move together); None resamples images. A resample missing a class has no AUC and is left out of the AUC's
    interval; with fewer than half the resamples left, that interval is None.

    Accuracy over independent images is a binomial proportion: its interval is Wilson's, which, unlike a percentile
    bootstrap, does not collapse to [1, 1] when every image is right. Over patients it is the bootstrap's, or, when
    every patient is all right (or all wrong), Wilson's over the patients."""
    if not len(labels) or bootstrap <= 0:
        return {"accuracy_ci": None, "auc_ci": None, "bootstrap": bootstrap, "resampled": None}
    _, accuracy, auc = resampled_classifier_metrics(logits, labels, groups, bootstrap, seed)
    tail = (1 - confidence) / 2
    correct = _predictions(logits) == labels.numpy().astype(int)
    units = len(correct) if groups is None else len(set(map(str, groups)))
    wilson = None
    if groups is None or correct.all() or not correct.any():
        wilson = list(wilson_interval(int(round(correct.mean() * units)), units, confidence))

    def interval(values: np.ndarray) -> list[float] | None:
        values = values[np.isfinite(values)]
        if len(values) < bootstrap / 2:
            return None
        return [float(np.quantile(values, tail)), float(np.quantile(values, 1 - tail))]

    return {"accuracy_ci": wilson or interval(accuracy), "auc_ci": interval(auc), "bootstrap": bootstrap,
            "resampled": "images" if groups is None else "patients"}


def _predictions(logits: torch.Tensor) -> np.ndarray:
    """classifier_metrics' predicted class: probability >= 0.5 of one logit, or the argmax of K."""
    if logits.shape[1] == 1:
        return (torch.sigmoid(logits.float()[:, 0]).numpy() >= 0.5).astype(int)
    return logits.float().argmax(1).numpy()


def mean_shift(attacked: ArrayLike, null: ArrayLike, bootstrap: int, seed: int, confidence: float = 0.95) -> dict:
    """mean(attacked) - mean(null) with a percentile interval over both sets resampled with replacement (cohort
    skew: the shift of the predicted age or male share of a generator's samples from the prior's)."""
    attacked, null = np.asarray(attacked, np.float64), np.asarray(null, np.float64)
    rng = np.random.default_rng(seed)
    draws = (attacked[rng.integers(0, len(attacked), (bootstrap, len(attacked)))].mean(1)
             - null[rng.integers(0, len(null), (bootstrap, len(null)))].mean(1))
    alpha = (1 - confidence) / 2
    low, high = np.quantile(draws, [alpha, 1 - alpha])
    return {"shift": float(attacked.mean() - null.mean()), "ci": [float(low), float(high)],
            "attacked": float(attacked.mean()), "null": float(null.mean()), "n": [len(attacked), len(null)]}


def to_grey(images01: torch.Tensor) -> torch.Tensor:
    return images01.mean(dim=1, keepdim=True) if images01.shape[1] > 1 else images01


# ----------------------------------------------------------------------------------------------------------------
# Re-identification embedding quality


@dataclass(frozen=True)
class VerificationResult:
    """How well an embedding tells patients apart (Packhaeuser et al. 2022 report both)."""

    auc: float  # same-patient vs different-patient image pairs, scored by cosine similarity
    rank1: float  # share of images (of patients with >= 2) whose nearest other image is the same patient's
    images: int
    patients: int
    positive_pairs: int
    negative_pairs: int
    probes: int  # images that took part in rank-1 (their patient has another image)


def patient_verification(embeddings: ArrayLike, patients: Sequence, max_negative_pairs: int = 200_000,
                         seed: int = 0) -> VerificationResult:
    """Verification AUC and rank-1 of unit-length embeddings (N, D) of images with patient ids (N,).

    AUC: every same-patient pair against every different-patient pair, or a seeded uniform sample of
    `max_negative_pairs` of them when there are more. Rank-1: each image of a patient with at least two images is a
    probe; the gallery is every other image. NaN where a quantity has no pairs or probes.
    """
    x = _as_float64(embeddings)
    ids = np.asarray([str(p) for p in patients], dtype=object)
    if x.ndim != 2 or x.shape[0] != ids.shape[0]:
        raise ValueError(f"need one patient id per embedding row, got {x.shape} and {ids.shape}")
    n = x.shape[0]
    _, codes = np.unique(ids, return_inverse=True)
    similarity = x @ x.T
    upper_i, upper_j = np.triu_indices(n, k=1)
    same = codes[upper_i] == codes[upper_j]
    positives = similarity[upper_i[same], upper_j[same]]
    negative_i, negative_j = upper_i[~same], upper_j[~same]
    if len(negative_i) > max_negative_pairs:
        chosen = np.random.default_rng(seed).choice(len(negative_i), size=max_negative_pairs, replace=False)
        negative_i, negative_j = negative_i[chosen], negative_j[chosen]
    negatives = similarity[negative_i, negative_j]
    auc = (float(roc_auc_score(np.r_[np.ones(len(positives)), np.zeros(len(negatives))], np.r_[positives, negatives]))
           if len(positives) and len(negatives) else float("nan"))
    counts = np.bincount(codes, minlength=codes.max() + 1 if n else 0)
    probes = np.flatnonzero(counts[codes] >= 2) if n else np.zeros(0, dtype=np.int64)
    if len(probes):
        scores = similarity[probes].copy()
        scores[np.arange(len(probes)), probes] = -np.inf
        rank1 = float((codes[scores.argmax(axis=1)] == codes[probes]).mean())
    else:
        rank1 = float("nan")
    return VerificationResult(auc=auc, rank1=rank1, images=n, patients=int(len(np.unique(codes))),
                              positive_pairs=int(len(positives)), negative_pairs=int(len(negatives)),
                              probes=int(len(probes)))
