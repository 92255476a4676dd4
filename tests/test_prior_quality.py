"""The prior's quality measures (analysis.prior_quality) against sets whose difference is known."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reid_batch.analysis.prior_quality import embedding_frechet, two_sample_classifier


def _blobs(n: int, seed: int, blur: float = 0.0) -> torch.Tensor:
    """Images with a bright disc at a random place; blurred ones stand in for a prior that draws mush."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(n, 2, generator=g) * 16 + 8
    grid = torch.stack(torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij"), -1)
    images = ((grid[None] - centres[:, None, None]).norm(dim=-1) < 5).float()[:, None]
    images = images * 0.7 + 0.1 + torch.randn(n, 1, 32, 32, generator=g) * 0.05
    if blur:
        kernel = torch.ones(1, 1, 9, 9) / 81
        images = F.conv2d(images, kernel, padding=4)
    return images.clamp(0, 1)


@pytest.mark.slow
def test_the_classifier_cannot_tell_a_set_from_itself_and_tells_blur_at_once():
    # Under the null a single run lands outside its 95% interval 1 time in 20: judge the mean of several.
    same = [two_sample_classifier(_blobs(300, 2 * k + 1), _blobs(300, 2 * k + 2), seed=k, epochs=5)
            for k in range(6)]
    assert all(result["test_images"] == 300 for result in same)
    assert abs(np.mean([result["accuracy"] for result in same]) - 0.5) < 0.04
    # The positive control trains as calibrate does (the default epochs): after 5, whether blur is seen at all
    # depends on the seed and on the CPU's float rounding.
    blurred = two_sample_classifier(_blobs(300, 3, blur=1.0), _blobs(300, 4), seed=0)
    assert blurred["accuracy"] > 0.9


def test_frechet_sits_at_its_floor_for_real_like_samples_and_above_it_for_shifted_ones():
    rng = np.random.default_rng(0)
    real, other = rng.normal(size=(500, 8)), rng.normal(size=(500, 8))
    alike = embedding_frechet(rng.normal(size=(500, 8)), real, other)
    shifted = embedding_frechet(rng.normal(size=(500, 8)) + 1.0, real, other)
    assert alike["ratio"] < 2.0 and shifted["ratio"] > 10.0
    assert alike["floor"] == shifted["floor"]
