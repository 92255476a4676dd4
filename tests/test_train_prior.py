"""train-prior: discriminator, schedule, WGAN-GP pieces, EMA, outputs, resume after SIGKILL, load_prior."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load as load_safetensors

from reid_batch import artifacts, layout
from reid_batch.errors import InputError
from reid_batch.manifest import PriorTrainSpec, parse_manifest, read_yaml
from reid_batch.models.pggan import PGGANConfig, PGGANGenerator, write_checkpoint
from reid_batch.stages import train_prior as tp
from reid_batch.runtime import run_store, save_state

REPO = Path(__file__).resolve().parents[1]
DEPTHS = [32, 16, 8]  # 4 -> 16 px
LATENT = 16


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """GAN steps on 4-16 px images are too small to gain from threads; on a shared 2-core machine torch's
    OpenMP threads spin against other processes and made these tests 13x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from reid_batch.data.phantoms import WorldConfig, write_world

    root = tmp_path_factory.mktemp("world") / "world"
    write_world(root, WorldConfig(seed=0, image_size=32, private_patients=2, public_patients=60,
                                  control_patients=0, max_studies_per_patient=2, workers=1))
    return root


def make_manifest(world: Path, output: Path, generator: dict | None = None, **train):
    document = read_yaml(REPO / "manifests" / "demo.yaml")
    document["output"]["uri"] = str(output)
    document["data"]["synthetic"]["root"] = str(world)
    document["generator"] = generator or {
        "arch": "pggan", "latent_dim": LATENT, "depths": DEPTHS, "out_channels": 1, "output_range": [0.0, 1.0],
        "train": {"images_per_phase": 256, "batch_size": 8, "lr": 0.002, "checkpoint_every": 1000, **train},
    }
    return parse_manifest(document)


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    manifest = make_manifest(world, tmp_path_factory.mktemp("out"))
    return manifest, tp.train_prior(manifest)


class TensorPool:
    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, indices: torch.Tensor) -> torch.Tensor:
        return self.images[indices]


# ----------------------------------------------------------------------------------------- discriminator


def test_discriminator_scores_every_scale_and_rejects_wrong_sizes():
    torch.manual_seed(0)
    critic = tp.PGGANDiscriminator(tuple(DEPTHS), in_channels=3)
    assert len(critic.fromRGB) == 3 and len(critic.blocks) == 2
    assert [m.module.out_channels for m in critic.fromRGB] == DEPTHS
    # Each block ends in the channel count of the scale below, as the generator's mirror.
    assert [b[2].module.out_channels for b in critic.blocks] == [32, 16]
    assert critic.final_conv.module.in_channels == 33  # + the minibatch-stddev channel
    for depth in range(3):
        for alpha in (0.3, 1.0):
            scores = critic(torch.rand(6, 3, 4 * 2**depth, 4 * 2**depth), depth, alpha)
            assert scores.shape == (6,) and torch.isfinite(scores).all()
    assert critic(torch.rand(2, 3, 16, 16)).shape == (2,)  # depth None = full resolution
    with pytest.raises(ValueError, match="takes 8x8"):
        critic(torch.rand(2, 3, 16, 16), depth=1)
    with pytest.raises(ValueError, match="depth must be"):
        critic(torch.rand(2, 3, 32, 32), depth=3)


def test_discriminator_fade_path_interpolates_between_scales():
    torch.manual_seed(1)
    critic = tp.PGGANDiscriminator(tuple(DEPTHS), in_channels=1).double()
    images = torch.rand(4, 1, 16, 16, dtype=torch.float64)
    coarse = critic(F.avg_pool2d(images, 2), depth=1, alpha=1.0)
    new = critic(images, depth=2, alpha=1.0)
    # alpha 0: only the pooled image through the lower scale's fromRGB counts.
    torch.testing.assert_close(critic(images, depth=2, alpha=0.0), coarse)
    assert not torch.allclose(new, coarse)
    # At alpha 1 the older fromRGB is not on the path at all.
    critic.zero_grad(set_to_none=True)
    critic(images, depth=2, alpha=1.0).sum().backward()
    assert critic.fromRGB[1].module.weight.grad is None and critic.fromRGB[2].module.weight.grad is not None
    critic.zero_grad(set_to_none=True)
    critic(images, depth=2, alpha=0.5).sum().backward()
    assert critic.fromRGB[1].module.weight.grad.abs().sum() > 0


def test_minibatch_stddev_matches_a_loop_over_groups():
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    out = tp.minibatch_stddev(x, group_size=4)
    assert out.shape == (8, 4, 4, 4)
    torch.testing.assert_close(out[:, :3], x)
    columns = 2  # 8 samples in groups of 4: sample i belongs to group i % 2
    for i in range(8):
        members = x[i % columns::columns]
        expected = members.std(dim=0, unbiased=False).mean()
        torch.testing.assert_close(out[i, 3], torch.full((4, 4), float(expected), dtype=torch.float64),
                                   atol=1e-7, rtol=1e-6)
    # 6 is not divisible by 4: groups of 3, the largest divisor allowed.
    six = tp.minibatch_stddev(x[:6], group_size=4)
    torch.testing.assert_close(six[0, 3, 0, 0], x[0::2][:3].std(dim=0, unbiased=False).mean(), atol=1e-7, rtol=1e-6)


# ----------------------------------------------------------------------------------------- schedule, GP, EMA


def test_schedule_fades_every_scale_but_the_first():
    schedule = tp.Schedule(num_scales=3, steps_per_phase=4)
    assert schedule.total_steps == 20
    path = [schedule.at(s) for s in range(20)]
    assert path[:4] == [(0, 0, 1.0)] * 4
    assert path[4:8] == [(1, 1, 0.0), (1, 1, 0.25), (1, 1, 0.5), (1, 1, 0.75)]
    assert path[8:12] == [(2, 1, 1.0)] * 4
    assert [a for _, _, a in path[12:16]] == [0.0, 0.25, 0.5, 0.75] and {d for _, d, _ in path[12:]} == {2}
    assert [s for s in range(20) if schedule.starts_fade(s)] == [4, 12]
    with pytest.raises(ValueError):
        schedule.at(20)
    spec = PriorTrainSpec(images_per_phase=100, batch_size=16, n_critic=2)
    assert tp.Schedule.for_spec(5, spec) == tp.Schedule(5, 4)  # ceil(100 / 32) generator steps per phase
    # A longer last phase: the same path, then more full-resolution stabilising steps, and no fade starts there.
    longer = tp.Schedule(num_scales=3, steps_per_phase=4, final_steps=10)
    assert longer.total_steps == 26 and [longer.at(s) for s in range(16)] == path[:16]
    assert [longer.at(s) for s in range(16, 26)] == [(4, 2, 1.0)] * 10
    assert [s for s in range(26) if longer.starts_fade(s)] == [4, 12]
    with pytest.raises(ValueError):
        longer.at(26)
    spec = PriorTrainSpec(images_per_phase=100, final_phase_images=1000, batch_size=16, n_critic=2)
    assert tp.Schedule.for_spec(5, spec) == tp.Schedule(5, 4, 32)


def test_real_images_fade_like_the_generator():
    images = torch.rand(2, 1, 16, 16)
    pooled = F.avg_pool2d(images, 2)  # 8x8
    coarser = F.interpolate(F.avg_pool2d(pooled, 2), scale_factor=2, mode="nearest")
    torch.testing.assert_close(tp.real_at_scale(images, 1, 1.0), pooled)
    torch.testing.assert_close(tp.real_at_scale(images, 1, 0.0), coarser)
    torch.testing.assert_close(tp.real_at_scale(images, 1, 0.25), 0.25 * pooled + 0.75 * coarser)
    torch.testing.assert_close(tp.real_at_scale(images, 2, 0.5), images * 0.5 + 0.5 * F.interpolate(
        pooled, scale_factor=2, mode="nearest"))
    torch.testing.assert_close(tp.real_at_scale(images, 0, 1.0), F.avg_pool2d(images, 4))


def test_gradient_penalty_matches_an_independent_computation():
    torch.manual_seed(2)
    weight = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    real, fake = torch.randn(5, 2, 3, 3, dtype=torch.float64), torch.randn(5, 2, 3, 3, dtype=torch.float64)
    epsilon = torch.rand(5, 1, 1, 1, dtype=torch.float64)

    def critic(x):  # sum(w * x^2): gradient 2 w x
        return (weight * x.pow(2)).flatten(1).sum(dim=1)

    penalty = tp.gradient_penalty(critic, real, fake, epsilon)
    mixed = (epsilon * real + (1 - epsilon) * fake).numpy()
    norms = np.sqrt(((2 * weight.detach().numpy() * mixed) ** 2).reshape(5, -1).sum(axis=1))
    assert penalty.item() == pytest.approx(float(np.mean((norms - 1.0) ** 2)), rel=1e-12)
    # The penalty must train the critic: its gradient w.r.t. the weights equals the closed form's.
    (through_penalty,) = torch.autograd.grad(penalty, weight)
    closed_form = ((2 * weight * torch.from_numpy(mixed)).flatten(1).norm(dim=1) - 1).pow(2).mean()
    (expected,) = torch.autograd.grad(closed_form, weight)
    torch.testing.assert_close(through_penalty, expected)


def test_ema_beta_ramps_up_to_the_configured_decay():
    assert tp.ema_beta(0.999, 1) < 1e-5  # the first step copies the generator
    assert tp.ema_beta(0.999, 500) == pytest.approx(0.5 ** (1 / 5))  # half-life 1% of 500 steps
    assert tp.ema_beta(0.999, 10**6) == 0.999


def test_trainer_steps_update_ema_as_a_moving_average(monkeypatch):
    monkeypatch.setattr(tp, "EMA_RAMPUP", 1.0)  # a memory of several steps already at step 6
    config = PGGANConfig(latent_dim=LATENT, depths=tuple(DEPTHS), out_channels=1)
    spec = PriorTrainSpec(images_per_phase=32, batch_size=8, lr=0.002, ema_decay=0.9)
    trainer = tp.ProgressiveTrainer(config, spec)
    pool = TensorPool(torch.rand(20, 1, 16, 16))
    for _ in range(5):  # 32 / 8 = 4 steps per phase: step 5 is the second of the first fade
        trainer.train_step(pool)
    before = {k: v.clone() for k, v in trainer.ema.named_parameters()}
    row = trainer.train_step(pool)
    assert (row["depth"], row["alpha"]) == (1, 0.25) and trainer.step == 6
    beta = tp.ema_beta(0.9, 6)
    assert 0 < beta < 0.9
    current = dict(trainer.generator.named_parameters())
    for name, averaged in trainer.ema.named_parameters():
        torch.testing.assert_close(averaged, before[name] + (1 - beta) * (current[name] - before[name]))
    differing = [n for n, p in trainer.ema.named_parameters() if not torch.equal(p, current[n])]
    assert "latent_linear.0.module.weight" in differing
    assert set(row) == set(tp.ProgressiveTrainer.LOSS_COLUMNS)
    assert all(len(v) == 6 for v in trainer.losses.values())


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 5)) @ rng.normal(size=(5, 5))
    a -= a.mean(axis=0)
    shift = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    # Score arrays are used as they are (already projected), so the basis plays no part here.
    assert tp.pca_frechet_distance(None, a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-6)
    # Doubling: Tr(S + 4S - 2 * 2S) = Tr(S).
    assert tp.pca_frechet_distance(None, a, 2 * a) == pytest.approx(np.trace(np.cov(a, rowvar=False)), rel=1e-6)
    assert tp.pca_frechet_distance(None, a, a) == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------------------- the recipe


def test_train_prior_commits_outputs_and_the_prior_learns(trained):
    manifest, metrics = trained
    store = run_store(manifest)
    assert store.is_committed("prior")
    assert sorted(store.list("prior")) == sorted(f"prior/{name}" for name in (
        "_COMMITTED", "discriminator.safetensors", "generator.safetensors", "losses.parquet", "metrics.json",
        "samples.png", "samples_before.png"))
    assert store.read_json("prior/metrics.json") == metrics
    # 5 phases x ceil(256 / 8) steps; the distance is the "visibly learns" check.
    assert metrics["steps"] == 160 and metrics["images_seen"] == 160 * 8
    assert metrics["trained"] < 0.5 * metrics["untrained"], metrics
    assert metrics["real_vs_real"] < metrics["trained"]
    losses = pd.read_parquet(io.BytesIO(store.read_bytes("prior/losses.parquet")))
    assert list(losses["step"]) == list(range(160)) and np.isfinite(losses[["d_loss", "g_loss"]].to_numpy()).all()
    assert sorted(losses["depth"].unique()) == [0, 1, 2]
    grids = [np.asarray(Image.open(io.BytesIO(store.read_bytes(f"prior/{name}"))))
             for name in ("samples_before.png", "samples.png")]
    assert all(g.shape == (8 * 16 + 9 * 2, 8 * 16 + 9 * 2) for g in grids)  # 8x8 grayscale tiles, 2 px padding
    assert not np.array_equal(*grids)

    prior = artifacts.load_prior(manifest)
    stored = load_safetensors(store.read_bytes("prior/generator.safetensors"))
    assert prior.config.depths == tuple(DEPTHS) and prior.config.output_range == (0.0, 1.0)
    assert all(torch.equal(prior.state_dict()[k], v) for k, v in stored.items())
    images = prior(torch.randn(3, LATENT))
    assert images.shape == (3, 1, 16, 16)
    # Trained on [0, 1] images: most of the output lies in that range without any activation.
    assert float(((images >= -0.05) & (images <= 1.05)).float().mean()) > 0.9
    # The critic comes back as trained, and still tells the prior's images from noise of the same range.
    critic = artifacts.load_prior_discriminator(manifest)
    assert critic.depths == tuple(DEPTHS) and not any(p.requires_grad for p in critic.parameters())
    with torch.no_grad():
        assert critic(prior(torch.randn(64, LATENT))).mean() > critic(torch.rand(64, 1, 16, 16)).mean()


def test_a_committed_run_does_nothing(trained, monkeypatch):
    manifest, metrics = trained
    store = run_store(manifest)
    marker = store.read_bytes("prior/_COMMITTED")

    def must_not_train(*args, **kwargs):
        raise AssertionError("a committed prior was trained again")

    monkeypatch.setattr(tp, "ProgressiveTrainer", must_not_train)
    assert tp.run(manifest) == 0
    assert tp.train_prior(manifest) == metrics
    assert store.read_bytes("prior/_COMMITTED") == marker


_KILL_AT_CHECKPOINT = """
import json, os, signal, sys
from reid_batch.manifest import parse_manifest
from reid_batch.stages import train_prior
from reid_batch import artifacts
from reid_batch import layout

def kill(step):
    if step == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)

train_prior.train_prior(parse_manifest(json.loads(sys.argv[1])), on_checkpoint=kill)
"""


@pytest.mark.slow
def test_resume_after_sigkill_ends_equal_to_an_uninterrupted_run(world, tmp_path):
    # 32 / 8 = 4 steps per phase, 20 in all; the kill lands at step 6, in the middle of the first fade.
    settings = {"images_per_phase": 32, "batch_size": 8, "checkpoint_every": 3}
    straight = make_manifest(world, tmp_path / "straight", **settings)
    killed = make_manifest(world, tmp_path / "killed", **settings)
    tp.train_prior(straight)

    # Same thread count as this process, so both runs reduce in the same order.
    child = subprocess.run([sys.executable, "-c", _KILL_AT_CHECKPOINT, killed.model_dump_json(), "6"],
                           cwd=REPO, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    store = run_store(killed)
    assert store.exists(layout.PRIOR_RESUME_KEY) and not store.is_committed("prior")
    assert torch.load(io.BytesIO(store.read_bytes(layout.PRIOR_RESUME_KEY)), weights_only=True)["step"] == 6

    tp.train_prior(killed)
    reference = run_store(straight)
    assert not store.exists(layout.PRIOR_RESUME_KEY)
    resumed_weights = load_safetensors(store.read_bytes("prior/generator.safetensors"))
    straight_weights = load_safetensors(reference.read_bytes("prior/generator.safetensors"))
    assert resumed_weights.keys() == straight_weights.keys()
    assert all(torch.equal(resumed_weights[k], straight_weights[k]) for k in straight_weights)
    pd.testing.assert_frame_equal(pd.read_parquet(io.BytesIO(store.read_bytes("prior/losses.parquet"))),
                                  pd.read_parquet(io.BytesIO(reference.read_bytes("prior/losses.parquet"))))
    resumed, uninterrupted = store.read_json("prior/metrics.json"), reference.read_json("prior/metrics.json")
    for key in ("untrained", "trained", "trained_without_ema", "real_vs_real", "steps"):
        assert resumed[key] == uninterrupted[key]


def test_resume_state_from_other_settings_is_refused(world, tmp_path):
    manifest = make_manifest(world, tmp_path / "out", images_per_phase=64, batch_size=8)
    save_state(run_store(manifest), layout.PRIOR_RESUME_KEY, {"step": 3, "fingerprint": {"config": "another run"}})
    with pytest.raises(InputError, match="different generator/training/data settings"):
        tp.train_prior(manifest)


# ----------------------------------------------------------------------------------------- load_prior


def test_load_prior_needs_a_trained_prior(world, tmp_path):
    with pytest.raises(InputError, match="run train-prior first"):
        artifacts.load_prior(make_manifest(world, tmp_path / "empty"))


def test_load_prior_reads_a_checkpoint_in_the_manifests_format(world, tmp_path):
    torch.manual_seed(3)
    config = PGGANConfig(latent_dim=LATENT, depths=tuple(DEPTHS), out_channels=1)
    raw, ema = PGGANGenerator(config), PGGANGenerator(config)
    path = tmp_path / "prior.ckpt"
    write_checkpoint(raw, path, "segal_lightning", ema=ema)
    section = {"arch": "pggan", "checkpoint": str(path), "format": "segal_lightning", "latent_dim": LATENT,
               "depths": DEPTHS, "out_channels": 1}
    prior = artifacts.load_prior(make_manifest(world, tmp_path / "out", generator=section))
    assert all(torch.equal(prior.state_dict()[k], v) for k, v in ema.state_dict().items())  # gen_shadow (EMA)
    assert artifacts.FORMAT_ALIASES["lightning"] == "segal_lightning"
    assert tp.run(make_manifest(world, tmp_path / "out", generator=section)) == 0  # nothing to train

    wrong = {**section, "depths": [32, 16, 8, 4]}
    with pytest.raises(InputError, match="depths: manifest"):
        artifacts.load_prior(make_manifest(world, tmp_path / "out", generator=wrong))
    # A gan_zoo file is [-1, 1]; the manifest's default output_range must not override that.
    write_checkpoint(PGGANGenerator(PGGANConfig(latent_dim=LATENT, depths=tuple(DEPTHS), out_channels=1,
                                                variant="gan_zoo", output_range=(-1.0, 1.0))),
                     tmp_path / "zoo.pth", "gan_zoo")
    zoo = {"arch": "pggan", "checkpoint": str(tmp_path / "zoo.pth"), "format": "gan_zoo"}
    assert artifacts.load_prior(make_manifest(world, tmp_path / "out", generator=zoo)).config.output_range == (-1.0, 1.0)
    # ... also after the CLI's --output round trip, which marks every field as set.
    round_trip = make_manifest(world, tmp_path / "out", generator=zoo)
    round_trip = parse_manifest(round_trip.model_dump(mode="json"))
    assert artifacts.load_prior(round_trip).config.output_range == (-1.0, 1.0)
    # An output_range written in the manifest overrides the format's: a Segal-code run on [-1, 1] data.
    declared = {**section, "output_range": [-1.0, 1.0]}
    assert artifacts.load_prior(make_manifest(world, tmp_path / "out", generator=declared)).config.output_range == (-1.0, 1.0)
