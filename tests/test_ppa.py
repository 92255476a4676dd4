"""Per-sample latent optimisation (attack/ppa.py): it raises the requested class's confidence, each latent's
trajectory does not depend on the batch it is in, and everything is a function of the seed."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from reid_batch.attack.ppa import PPASettings, _uniforms, attack_class, optimise_latents, random_views, view_confidence
from reid_batch.models.pggan import PGGANConfig, PGGANGenerator, generator_to_unit, latents_for_ids

LATENT = 16


def _models(dtype: torch.dtype = torch.float32):
    """A tiny generator and a confident 3-class target. In float64 a convolution's rounding no longer depends on
    the batch it runs in (CPU kernels pick their blocking by batch size; in float32 an Adam path of 25 steps turns
    those last-bit differences into 0.1 on some CPUs), so tests of batch independence use it."""
    torch.manual_seed(0)
    generator = PGGANGenerator(PGGANConfig(latent_dim=LATENT, depths=(16, 16, 8), out_channels=1)).eval()  # 16 px
    target = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                           nn.Linear(32, 3)).eval()
    with torch.no_grad():
        target[-1].weight.mul_(30.0)  # a random head is nearly uniform; a confident one gives the attack a slope
    for module in (generator, target):
        module.requires_grad_(False).to(dtype)

    def generate(z):
        return generator_to_unit(generator(z.to(dtype)), generator.config.output_range)

    return generate, target


SMALL = PPASettings(search=12, optimise=4, keep=2, steps=25, lr=5e-2, search_views=2, final_views=4)


def test_views_are_the_image_when_nothing_is_random_and_differ_per_key():
    images = torch.rand(3, 1, 16, 16)
    still = PPASettings(crop_scale=(1.0, 1.0), rotation_deg=0.0, brightness=0.0)
    torch.testing.assert_close(random_views(images, torch.rand(3, 5), still), images, atol=1e-5, rtol=0)
    keys = torch.tensor([5, 6, 5])
    u = _uniforms(0, 3, 7, keys, 5)
    assert torch.equal(u[0], u[2]) and not torch.equal(u[0], u[1]) and ((u >= 0) & (u <= 1)).all()
    views = random_views(images[[0, 0, 0]], u, PPASettings())
    assert torch.equal(views[0], views[2]) and not torch.equal(views[0], views[1])


def test_optimisation_raises_the_requested_class_confidence():
    generate, target = _models()
    keys = torch.arange(6)
    latents = latents_for_ids(1, keys, LATENT)
    classes = torch.tensor([0, 1, 2, 0, 1, 2])
    before = view_confidence(generate, target, latents, classes, keys, views=8, stream=2, settings=SMALL, seed=1)
    losses = []
    optimised = optimise_latents(generate, target, latents, classes, keys, SMALL, seed=1,
                                 on_step=lambda step, loss: losses.append(loss.mean().item()))
    after = view_confidence(generate, target, optimised, classes, keys, views=8, stream=2, settings=SMALL, seed=1)
    # In log-probability: a random generator reaches some classes only a little way, but every one moves.
    gain = torch.log(after) - torch.log(before)
    assert gain.mean() > 0.5 and (gain > 0).all() and losses[-1] < 0.8 * losses[0]
    assert not torch.equal(optimised, latents)


def test_a_latent_follows_the_same_path_alone_or_in_a_batch():
    generate, target = _models()
    keys = torch.tensor([11, 12, 13, 14])
    latents = latents_for_ids(2, keys, LATENT)
    classes = torch.tensor([2, 0, 1, 2])
    settings = replace(SMALL, steps=10)
    together = optimise_latents(generate, target, latents, classes, keys, settings, seed=4)
    alone = torch.cat([optimise_latents(generate, target, latents[i:i + 1], classes[i:i + 1], keys[i:i + 1],
                                        settings, seed=4) for i in range(4)])
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_attack_class_keeps_its_best_and_is_reproducible():
    generate, target = _models()
    ids = np.arange(100, 112)
    first = attack_class(generate, target, 1, ids, LATENT, SMALL, seed=3)
    again = attack_class(generate, target, 1, ids, LATENT, SMALL, seed=3)
    assert len(first.ids) == SMALL.keep and set(first.ids) <= set(ids.tolist())
    assert np.array_equal(first.ids, again.ids) and torch.equal(first.latents, again.latents)
    assert (first.confidence[:-1] >= first.confidence[1:]).all()  # best first
    assert (first.confidence.log() - first.searched_confidence.log()).mean() > 0


def test_a_penalty_the_target_returns_beside_its_logits_is_optimised_per_sample():
    """A target may return (logits, per-sample penalty) from one forward pass (the stage's per-sample BatchNorm
    term); the penalty then shapes the latents, and confidence reads only the logits."""
    generate, target = _models()
    keys = torch.arange(6)
    latents = latents_for_ids(5, keys, LATENT)
    classes = torch.tensor([0, 1, 2, 0, 1, 2])
    settings = replace(SMALL, steps=30)

    def dimmed(views):
        return target(views), 50.0 * views.mean(dim=(1, 2, 3))

    plain = optimise_latents(generate, target, latents, classes, keys, settings, seed=2)
    penalised = optimise_latents(generate, dimmed, latents, classes, keys, settings, seed=2)
    brightness = lambda z: generate(z).mean(dim=(1, 2, 3))  # noqa: E731
    assert brightness(penalised).mean() < brightness(plain).mean() - 0.05
    assert (brightness(penalised) < brightness(plain)).sum() >= 4
    torch.testing.assert_close(
        view_confidence(generate, dimmed, latents, classes, keys, views=4, stream=2, settings=SMALL, seed=1),
        view_confidence(generate, target, latents, classes, keys, views=4, stream=2, settings=SMALL, seed=1))


def test_the_margin_measure_is_the_class_logit_over_the_largest_other_and_can_rank_the_kept():
    generate, target = _models()
    keys = torch.arange(5)
    latents = latents_for_ids(7, keys, LATENT)
    classes = torch.tensor([0, 1, 2, 1, 0])
    still = PPASettings(crop_scale=(1.0, 1.0), rotation_deg=0.0, brightness=0.0)
    margin = view_confidence(generate, target, latents, classes, keys, views=3, stream=2, settings=still, seed=1,
                             measure="margin")
    with torch.no_grad():
        logits = target(generate(latents))
    for i, c in enumerate(classes.tolist()):
        others = torch.cat([logits[i, :c], logits[i, c + 1:]])
        assert margin[i].item() == pytest.approx((logits[i, c] - others.max()).item(), abs=1e-3)
    settings = replace(SMALL, keep_by="margin")
    kept = attack_class(generate, target, 2, np.arange(30, 42), LATENT, settings, seed=3)
    assert len(kept.ids) == SMALL.keep and len(set(kept.ids.tolist())) == SMALL.keep
    # Best first by margin, over the same final views the attack ranked them with (stream 2).
    again = view_confidence(generate, target, kept.latents, torch.full((SMALL.keep,), 2), torch.from_numpy(kept.ids),
                            views=SMALL.final_views, stream=2, settings=settings, seed=3, measure="margin")
    assert (again[:-1] >= again[1:] - 1e-5).all(), again


@pytest.mark.slow
def test_attack_class_in_small_groups_equals_one_batch():
    """attack_class optimises its latents in groups of batch_size (memory bounded whatever `optimise` is): groups of
    one give the kept ids, latents and confidences of a single batch."""
    generate, target = _models(torch.float64)
    settings = replace(SMALL, optimise=5, keep=3)
    ids = np.arange(100, 112)
    whole = attack_class(generate, target, 1, ids, LATENT, settings, seed=4, batch_size=64)
    grouped = attack_class(generate, target, 1, ids, LATENT, settings, seed=4, batch_size=2)
    assert whole.ids.tolist() == grouped.ids.tolist()
    torch.testing.assert_close(grouped.latents, whole.latents, atol=1e-4, rtol=0)
    torch.testing.assert_close(grouped.confidence, whole.confidence, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_attack_class_halves_its_groups_on_out_of_memory_and_gets_the_same_result():
    """batch_size auto on a GPU: an optimisation group that runs out of memory is halved until one fits, and the
    result is the single batch's (each latent's path is its own). The out-of-memory error is raised by the target
    when a backward pass would hold more than 2 latents, as a full GPU would."""
    from reid_batch.attack.generation import BatchSizer
    from reid_batch.attack.ppa import Sizers

    generate, target = _models(torch.float64)
    settings = replace(SMALL, optimise=5, keep=3)
    ids = np.arange(100, 112)
    whole = attack_class(generate, target, 1, ids, LATENT, settings, seed=4, batch_size=64)
    sizes = []

    def small_gpu(images):
        if torch.is_grad_enabled() and len(images) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        sizes.append((torch.is_grad_enabled(), len(images)))
        return target(images)

    gpu = torch.device("cuda")  # only its type: the sizer adapts; the tensors stay on the CPU
    sizers = Sizers(BatchSizer("auto", gpu, len(ids), memory=None), BatchSizer("auto", gpu, len(ids), memory=None))
    shrunk = attack_class(generate, small_gpu, 1, ids, LATENT, settings, seed=4, batch_size=sizers)
    assert sizers.optimise.size == 2 and max(n for grad, n in sizes if grad) == 2
    assert sizers.search.size >= len(ids)  # the passes without gradients never ran out
    assert whole.ids.tolist() == shrunk.ids.tolist()
    torch.testing.assert_close(shrunk.latents, whole.latents, atol=1e-4, rtol=0)
    # A fixed size is the user's choice: an out-of-memory error is raised, not hidden.
    with pytest.raises(torch.cuda.OutOfMemoryError):
        attack_class(generate, small_gpu, 1, ids, LATENT, settings, seed=4, batch_size=Sizers.of(4, gpu, len(ids)))


def test_poincare_loss_is_the_hyperbolic_distance_and_keeps_a_gradient_where_cross_entropy_has_none():
    from reid_batch.attack.ppa import poincare_loss

    logits = torch.tensor([[2.0, -1.0, 0.5], [-1.0, -1.0, 30.0]], dtype=torch.float64, requires_grad=True)
    classes = torch.tensor([0, 2])
    u = logits.detach() / logits.detach().abs().sum(1, keepdim=True)
    v = torch.nn.functional.one_hot(classes, 3).double().sub(1e-4).clamp(0, 1)
    expected = torch.acosh(1 + 2 * ((u - v) ** 2).sum(1) / ((1 - (u ** 2).sum(1)) * (1 - (v ** 2).sum(1))))
    loss = poincare_loss(logits, classes)
    torch.testing.assert_close(loss.detach(), expected)
    loss[1].backward()
    assert logits.grad[1].abs().max() > 1e-3  # a certain class (p = 1 - 1e-13) still pulls
    certain = logits.detach()[1:].clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(certain, classes[1:]).backward()
    assert certain.grad.abs().max() < 1e-10


def test_several_views_per_step_keep_each_latent_independent_of_its_batch():
    """step_views averages the class loss over that many random views per step: a latent still follows the same
    path alone or in a batch, and the path differs from one view per step."""
    generate, target = _models()
    settings = replace(SMALL, steps=6, step_views=3)
    keys = torch.arange(4)
    latents = latents_for_ids(2, keys, LATENT)
    classes = torch.tensor([0, 1, 2, 1])
    together = optimise_latents(generate, target, latents, classes, keys, settings, seed=2)
    alone = optimise_latents(generate, target, latents[2:3], classes[2:3], keys[2:3], settings, seed=2)
    torch.testing.assert_close(alone[0], together[2], atol=1e-5, rtol=0)
    one_view = optimise_latents(generate, target, latents, classes, keys, replace(settings, step_views=1), seed=2)
    assert not torch.allclose(one_view, together, atol=1e-4)
