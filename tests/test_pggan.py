import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reid_batch.errors import InputError
from reid_batch.models.pggan import (
    SEGAL_1024_DEPTHS,
    EqualizedLayer,
    PGGANConfig,
    PGGANGenerator,
    export_state_dict,
    generator_to_unit,
    latent_bins,
    latents_for_ids,
    load_generator,
    save_generator,
    with_class_offsets,
    write_checkpoint,
)

SMALL = (32, 32, 16, 8)
LATENT = 24


def random_generator(seed: int, **overrides) -> PGGANGenerator:
    torch.manual_seed(seed)
    config = PGGANConfig(latent_dim=LATENT, depths=SMALL, out_channels=overrides.pop("out_channels", 1), **overrides)
    generator = PGGANGenerator(config).eval()
    with torch.no_grad():
        for name, parameter in generator.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0.0, 0.5)  # non-zero biases, so their He scaling shows in the images
    return generator


def latents(n: int = 3) -> torch.Tensor:
    return latents_for_ids(7, torch.arange(n), LATENT)


def segal_keys(depths, with_buffers=True):
    keys = {"latent_linear.0.module.weight", "latent_linear.0.module.bias",
            "init_conv.0.module.weight", "init_conv.0.module.bias"}
    for i in range(len(depths) - 1):
        for conv in (0, 3):
            keys |= {f"ScaleBlocks.{i}.convolv.{conv}.module.weight", f"ScaleBlocks.{i}.convolv.{conv}.module.bias"}
    for i in range(len(depths)):
        keys |= {f"toRGB.{i}.module.weight", f"toRGB.{i}.module.bias"}
    return keys | ({"current_size", "current_depth", "alpha"} if with_buffers else set())


def test_state_dict_has_exactly_segal_keys_and_shapes():
    generator = random_generator(0)
    state = generator.state_dict()
    assert set(state) == segal_keys(SMALL)
    assert state["latent_linear.0.module.weight"].shape == (16 * 32, LATENT)
    assert state["ScaleBlocks.1.convolv.0.module.weight"].shape == (16, 32, 3, 3)
    assert state["ScaleBlocks.1.convolv.3.module.weight"].shape == (16, 16, 3, 3)
    assert state["toRGB.3.module.weight"].shape == (1, 8, 1, 1)
    assert int(state["current_size"]) == generator.resolution == 32
    assert int(state["current_depth"]) == 3


def test_full_segal_1024_config_parameter_count_and_keys():
    generator = PGGANGenerator(PGGANConfig())
    depths = SEGAL_1024_DEPTHS
    expected = 512 * 16 * 512 + 16 * 512 + 512 * 512 * 9 + 512
    for previous, current in zip(depths[:-1], depths[1:]):
        expected += previous * current * 9 + current + current * current * 9 + current
    expected += sum(d * 3 + 3 for d in depths)
    assert generator.resolution == 1024
    assert sum(p.numel() for p in generator.parameters()) == expected
    assert set(generator.state_dict()) == segal_keys(depths)


def test_equalized_layer_scales_bias_too():
    layer = EqualizedLayer(nn.Linear(8, 2))
    with torch.no_grad():
        layer.module.weight.zero_()
        layer.module.bias.copy_(torch.tensor([1.0, -3.0]))
    expected = torch.tensor([1.0, -3.0]) * (2.0 / 8) ** 0.5
    assert torch.allclose(layer(torch.randn(4, 8)), expected.expand(4, 2))


def test_segal_bare_and_lightning_checkpoints_give_identical_images(tmp_path):
    trained, shadow = random_generator(1), random_generator(2)
    z = latents()
    write_checkpoint(shadow, tmp_path / "bare.pt", "segal")
    write_checkpoint(trained, tmp_path / "lightning.ckpt", "segal_lightning", ema=shadow)
    write_checkpoint(trained, tmp_path / "no_ema.ckpt", "segal_lightning")

    bare, bare_config = load_generator(tmp_path / "bare.pt")
    lightning, _ = load_generator(tmp_path / "lightning.ckpt")
    no_ema, _ = load_generator(tmp_path / "no_ema.ckpt", format="segal_lightning")
    with torch.no_grad():
        assert torch.equal(bare(z), shadow(z))
        assert torch.equal(lightning(z), bare(z))  # the EMA gen_shadow was preferred over generator
        assert torch.equal(no_ema(z), trained(z))
    assert bare_config == shadow.config
    assert bare_config.depths == SMALL and bare_config.output_range == (0.0, 1.0)


def test_segal_state_dict_in_wrapper_and_data_parallel_prefix(tmp_path):
    generator = random_generator(3)
    state = export_state_dict(generator, "segal")
    torch.save({"state_dict": state, "settings": {"channel_depth": list(SMALL)}}, tmp_path / "wrapped.pth")
    torch.save({"module." + k: v for k, v in state.items()}, tmp_path / "dp.pth")
    z = latents()
    for name in ("wrapped.pth", "dp.pth"):
        loaded, _ = load_generator(tmp_path / name, format="segal")
        with torch.no_grad():
            assert torch.equal(loaded(z), generator(z))


def test_gan_zoo_round_trip_prefers_avgG_and_uses_its_layout(tmp_path):
    net_g = random_generator(4, variant="gan_zoo", output_range=(-1, 1), out_channels=3)
    avg_g = random_generator(5, variant="gan_zoo", output_range=(-1, 1), out_channels=3)
    checkpoint = export_state_dict(net_g, "gan_zoo", ema=avg_g)
    assert set(checkpoint) == {"config", "netG", "avgG"}
    assert "formatLayer.module.weight" in checkpoint["netG"]
    assert "groupScale0.0.module.bias" in checkpoint["netG"]
    assert checkpoint["netG"]["scaleLayers.2.1.module.weight"].shape == (8, 8, 3, 3)
    assert "toRGBLayers.3.module.weight" in checkpoint["netG"]
    torch.save(checkpoint, tmp_path / "pgan.pt")
    torch.save(export_state_dict(net_g, "gan_zoo"), tmp_path / "no_avg.pt")

    loaded, config = load_generator(tmp_path / "pgan.pt")
    loaded_net_g, _ = load_generator(tmp_path / "no_avg.pt", format="gan_zoo")
    z = latents()
    with torch.no_grad():
        assert torch.equal(loaded(z), avg_g(z))
        assert torch.equal(loaded_net_g(z), net_g(z))
    assert config == avg_g.config
    assert config.output_range == (-1.0, 1.0) and config.output_activation == "none"


def test_gan_zoo_legacy_keys_without_module_infix_and_data_parallel(tmp_path):
    generator = random_generator(6, variant="gan_zoo", output_range=(-1, 1))
    net_g = export_state_dict(generator, "gan_zoo")["netG"]
    legacy = {k.replace(".module.", "."): v for k, v in net_g.items()}
    torch.save({"config": {"lossCriterion": "WGANGP"}, "netG": legacy}, tmp_path / "legacy.pt")
    torch.save({"module." + k: v for k, v in net_g.items()}, tmp_path / "bare_dp.pt")
    z = latents()
    for name in ("legacy.pt", "bare_dp.pt"):
        loaded, _ = load_generator(tmp_path / name)
        with torch.no_grad():
            assert torch.equal(loaded(z), generator(z))


def test_gan_zoo_pickled_config_object_is_read_without_importing_gan_zoo(tmp_path):
    generator = random_generator(7, variant="gan_zoo", output_range=(-1, 1), output_activation="tanh")
    checkpoint = export_state_dict(generator, "gan_zoo")
    # gan_zoo pickles its config as models.utils.config.BaseConfig, which weights_only refuses.
    module = types.ModuleType("models.utils.config")

    class BaseConfig:
        pass

    BaseConfig.__module__, BaseConfig.__qualname__ = "models.utils.config", "BaseConfig"
    module.BaseConfig = BaseConfig
    pickled_config = BaseConfig()
    pickled_config.__dict__.update(checkpoint["config"])
    for name in ("models", "models.utils", "models.utils.config"):
        sys.modules.setdefault(name, module if name.endswith("config") else types.ModuleType(name))
    try:
        torch.save({**checkpoint, "config": pickled_config}, tmp_path / "pickled.pt")
    finally:
        for name in ("models.utils.config", "models.utils", "models"):
            sys.modules.pop(name, None)
    loaded, config = load_generator(tmp_path / "pickled.pt")
    assert config.output_activation == "tanh"  # read from the pickled lossCriterion "DCGAN"
    assert any(isinstance(m, nn.Tanh) for m in loaded.modules())
    with torch.no_grad():
        assert torch.equal(loaded(latents()), generator(latents()))


def test_variants_differ_only_by_pixel_norm_after_latent_layer():
    segal = random_generator(8)
    zoo = PGGANGenerator(PGGANConfig(latent_dim=LATENT, depths=SMALL, out_channels=1, variant="gan_zoo"))
    zoo.load_state_dict(segal.state_dict())
    with torch.no_grad():
        assert not torch.allclose(zoo(latents()), segal(latents()))


def test_checkpoint_pickle_cannot_run_code(tmp_path):
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"netG": {"x": Exploit()}}, tmp_path / "evil.pt")
    with pytest.raises(InputError) as raised:
        load_generator(tmp_path / "evil.pt")
    assert not marker.exists()
    assert "evil.pt" in str(raised.value)


def test_format_mismatch_and_bad_files_raise_input_errors(tmp_path):
    generator = random_generator(9)
    write_checkpoint(generator, tmp_path / "segal.pt", "segal")
    with pytest.raises(InputError, match="netG") as raised:
        load_generator(tmp_path / "segal.pt", format="gan_zoo")
    assert "latent_linear.0.module.weight" in str(raised.value)  # says what was found

    state = export_state_dict(generator, "segal")
    state["ScaleBlocks.1.convolv.3.module.weight"] = torch.zeros(16, 12, 3, 3)
    torch.save(state, tmp_path / "wrong_shape.pt")
    with pytest.raises(InputError, match=r"ScaleBlocks\.1\.convolv\.3\.module\.weight: expected \(16, 16, 3, 3\), "
                                         r"found \(16, 12, 3, 3\)"):
        load_generator(tmp_path / "wrong_shape.pt")

    del state["ScaleBlocks.1.convolv.3.module.weight"]
    torch.save(state, tmp_path / "missing.pt")
    with pytest.raises(InputError, match=r"missing ScaleBlocks\.1\.convolv\.3\.module\.weight"):
        load_generator(tmp_path / "missing.pt")

    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="not a recognised PGGAN"):
        load_generator(tmp_path / "other.pt")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(InputError, match="notes.txt"):
        load_generator(tmp_path / "notes.txt")
    with pytest.raises(InputError, match="not found"):
        load_generator(tmp_path / "absent.pt")
    with pytest.raises(InputError, match="format"):
        load_generator(tmp_path / "segal.pt", format="stylegan")


def test_reid_safetensors_round_trip(tmp_path):
    generator = random_generator(10, variant="gan_zoo", output_range=(-1, 1), output_activation="tanh")
    with torch.no_grad():
        generator.alpha.fill_(0.25)
    save_generator(generator, tmp_path / "g.safetensors")
    loaded, config = load_generator(tmp_path / "g.safetensors")
    assert config == generator.config
    assert loaded.checkpoint_fade_alpha == pytest.approx(0.75)
    with torch.no_grad():
        assert torch.equal(loaded(latents()), generator(latents()))


def test_class_offsets_move_only_their_class_and_survive_a_round_trip(tmp_path):
    """The collapse fix: a latent offset per class (z_0's bin). Zero offsets draw what the prior draws; an offset for
    class 2 changes the images of latents in bin 2 and no other; the reid format keeps offsets and class count."""
    prior = random_generator(12)
    conditioned = with_class_offsets(prior, 4)
    z = latents_for_ids(3, torch.arange(64), LATENT)
    with torch.no_grad():
        assert torch.equal(conditioned(z), prior(z))
        conditioned.class_offsets[2] = 0.5
        changed = (conditioned(z) - prior(z)).flatten(1).abs().amax(1) > 0
    assert torch.equal(changed, latent_bins(z[:, 0], 4) == 2) and changed.any() and not changed.all()
    save_generator(conditioned, tmp_path / "g.safetensors")
    loaded, config = load_generator(tmp_path / "g.safetensors")
    assert config.class_offsets == 4
    with torch.no_grad():
        assert torch.equal(loaded(z), conditioned(z))
    with pytest.raises(ValueError, match="offsets"):
        export_state_dict(conditioned, "segal")


def test_exports_refuse_to_change_declared_semantics():
    with pytest.raises(ValueError):
        export_state_dict(random_generator(11, variant="gan_zoo", output_range=(-1, 1)), "segal")
    with pytest.raises(ValueError):
        export_state_dict(random_generator(11), "gan_zoo")


def test_output_range_is_declared_and_no_tanh_on_unit_range_generator():
    generator = random_generator(12)
    assert generator.config.output_range == (0.0, 1.0)
    assert not any(isinstance(m, nn.Tanh) for m in generator.modules())
    with pytest.raises(InputError, match="tanh"):
        PGGANConfig(output_range=(0, 1), output_activation="tanh")
    tanh = random_generator(12, output_range=(-1, 1), output_activation="tanh")
    with torch.no_grad():
        images = tanh(latents())
    assert images.abs().max() < 1.0


def test_generator_to_unit_maps_then_clamps():
    values = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0])
    assert torch.equal(generator_to_unit(values, (-1, 1)), torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0, 1.0]))
    assert torch.equal(generator_to_unit(values, (0, 1)), torch.tensor([0.0, 0.0, 0.0, 0.5, 1.0, 1.0]))
    with pytest.raises(ValueError):
        generator_to_unit(values, (1, 1))


def test_fading_alpha_blends_with_upsampled_coarser_scale():
    generator = random_generator(13)
    z = latents()
    with torch.no_grad():
        shapes = [generator(z, depth=d).shape[-1] for d in range(4)]
        fine, coarse = generator(z, depth=2), generator(z, depth=1)
        coarse_up = F.interpolate(coarse, scale_factor=2, mode="nearest")
        assert torch.equal(generator(z, depth=2, alpha=1.0), fine)
        assert torch.equal(generator(z, depth=2, alpha=0.0), coarse_up)
        assert torch.allclose(generator(z, depth=2, alpha=0.3), 0.3 * fine + 0.7 * coarse_up)
        assert torch.equal(generator(z), generator(z, depth=3))
    assert shapes == [4, 8, 16, 32]
    with pytest.raises(ValueError):
        generator(z, depth=4)


def test_latents_for_ids_are_pure_functions_of_seed_and_id():
    alone = latents_for_ids(11, torch.tensor([5]), 512)
    batch = latents_for_ids(11, torch.tensor([3, 4, 5, 6]), 512)
    assert alone.dtype == torch.float32 and batch.shape == (4, 512)
    assert torch.equal(alone[0], batch[2])
    assert torch.equal(latents_for_ids(11, [6, 5], 512)[1], alone[0])
    assert not torch.equal(latents_for_ids(12, [5], 512), alone)
    assert not torch.equal(batch[0], batch[1])
    assert latents_for_ids(11, [5], 7).shape == (1, 7)
    draws = latents_for_ids(0, torch.arange(20), 512).flatten()  # 10,240 draws
    assert abs(draws.mean().item()) < 0.05
    assert abs(draws.std().item() - 1.0) < 0.05
    assert 0.60 < (draws.abs() < 1).float().mean().item() < 0.76  # N(0,1): 68% within one sd
