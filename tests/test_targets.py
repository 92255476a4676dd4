"""Target zoo, demographic model and untrusted-checkpoint loading."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
import torchvision
from torch import nn

from reid_batch.checkpoints import load_into, load_state_dict, save_state_dict
from reid_batch.errors import InputError
from reid_batch.models.demographics import DemographicNet, load_demographics
from reid_batch.models.targets import (
    KNOWN_ARCHS,
    TargetInput,
    build_target,
    family,
    infer_num_classes,
    load_target,
    to_target_input,
)

TINY_VIT = dict(patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128)
TINY_DENSENET = dict(growth_rate=4, block_config=(1, 1), num_init_features=8)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _tiny_vit(num_classes: int = 1) -> nn.Module:
    return build_target("vit_custom", num_classes, image_size=32, **TINY_VIT).eval()


def _resnet18(num_classes: int) -> nn.Module:
    model = build_target("resnet18", num_classes).eval()
    # Non-default BatchNorm statistics, so a checkpoint that lost its buffers would change the outputs.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model


# --- (a) malicious pickles are refused without running them ---------------------------------------------


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class _OpensFile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _write_payload(path, payload, as_torch_save: bool) -> None:
    # A plausible-looking checkpoint: real weights with the payload hidden next to them.
    # The payload comes first so that it, not the tensor (plain pickles reach tensors through another
    # disallowed global), is what the refusal names.
    checkpoint = {"extra": payload, "state_dict": {"fc.1.weight": torch.zeros(1, 4)}}
    if as_torch_save:
        torch.save(checkpoint, path)
    else:
        with open(path, "wb") as f:
            # Protocol 2 is what torch itself writes, so the payload reaches the allowlist check.
            pickle.dump(checkpoint, f, protocol=2)


@pytest.mark.parametrize("payload_type", [_RunsShell, _OpensFile])
@pytest.mark.parametrize("as_torch_save", [True, False], ids=["torch_save", "plain_pickle"])
def test_malicious_pickle_is_refused_and_never_executed(tmp_path, payload_type, as_torch_save):
    # Control: the payload is live, i.e. an ordinary unpickle really would run it.
    control_marker = tmp_path / "control_marker"
    control = tmp_path / "control.pt"
    _write_payload(control, payload_type(control_marker), as_torch_save)
    if as_torch_save:
        torch.load(control, weights_only=False)
    else:
        with open(control, "rb") as f:
            pickle.load(f)
    assert control_marker.exists()

    marker = tmp_path / "pwned_marker"
    evil = tmp_path / "evil.pt"
    _write_payload(evil, payload_type(marker), as_torch_save)
    with pytest.raises(InputError) as caught:
        load_state_dict(evil)
    assert not marker.exists()
    assert str(evil) in str(caught.value)
    assert "execute code" in str(caught.value)
    assert "system" in str(caught.value) or "open" in str(caught.value)  # names what it would have called
    # Never pass on torch's advice to switch the check off or allowlist the payload.
    assert "weights_only` set to `False`" not in str(caught.value)
    assert "add_safe_globals" not in str(caught.value)
    with pytest.raises(InputError):
        load_target("resnet18", evil)
    assert not marker.exists()


# --- (b) wrapped / prefixed / safetensors checkpoints load to the same function ---------------------------


def _save_variant(model: nn.Module, path, variant: str) -> None:
    state = model.state_dict()
    if variant == "safetensors":
        save_state_dict(state, path)
        return
    wrapped = {
        "plain": state,
        "state_dict": {"state_dict": state, "epoch": 7},
        "model": {"model": state, "optimizer": {"lr": 0.1}},
        "model_state_dict": {"model_state_dict": state, "epoch": 3},
        "ddp": {f"module.{k}": v for k, v in state.items()},
        "compiled_ddp_nested": {"state_dict": {f"_orig_mod.module.{k}": v for k, v in state.items()}},
    }[variant]
    torch.save(wrapped, path)


VARIANTS = ["plain", "state_dict", "model", "model_state_dict", "ddp", "compiled_ddp_nested", "safetensors"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_wrapped_vit_checkpoints_give_identical_outputs(tmp_path, variant):
    original = _tiny_vit(num_classes=3)
    path = tmp_path / ("target.safetensors" if variant == "safetensors" else "target.pt")
    _save_variant(original, path, variant)

    loaded, num_classes = load_target("vit_custom", path, image_size=32, **TINY_VIT)

    x = torch.randn(2, 3, 32, 32)
    assert num_classes == 3
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    assert torch.equal(loaded(x), original(x))


@pytest.mark.parametrize("num_classes", [1, 3])
def test_resnet_checkpoint_round_trip_infers_outputs(tmp_path, num_classes):
    original = _resnet18(num_classes)
    path = tmp_path / "resnet.pt"
    _save_variant(original, path, "ddp")

    loaded, inferred = load_target("resnet18", path)

    x = torch.randn(2, 3, 32, 32)
    assert inferred == num_classes
    assert loaded(x).shape == (2, num_classes)
    assert torch.equal(loaded(x), original(x))


def test_plain_torchvision_resnet_head_is_remapped(tmp_path):
    original = torchvision.models.resnet18(weights=None, num_classes=1).eval()
    path = tmp_path / "torchvision_head.pt"
    torch.save(original.state_dict(), path)

    loaded, num_classes = load_target("resnet18", path)

    x = torch.randn(2, 3, 32, 32)
    assert num_classes == 1
    assert isinstance(loaded.fc, nn.Sequential)
    assert torch.equal(loaded(x), original(x))


# --- (c) wrong architecture: every mismatch is listed --------------------------------------------------------


def test_resnet18_checkpoint_as_resnet34_lists_missing_keys(tmp_path):
    path = tmp_path / "r18.safetensors"
    save_state_dict(_resnet18(1).state_dict(), path)
    with pytest.raises(InputError) as caught:
        load_target("resnet34", path)
    message = str(caught.value)
    assert "resnet34" in message and str(path) in message
    assert "missing from checkpoint: layer1.2.conv1.weight" in message
    assert "more" in message  # resnet34 has far more extra keys than are listed one by one
    assert caught.value.where == str(path)


def test_resnet18_checkpoint_as_vit_lists_mismatched_keys(tmp_path):
    path = tmp_path / "r18.safetensors"  # stores keys sorted, so BatchNorm counters would come first
    save_state_dict(_resnet18(1).state_dict(), path)
    with pytest.raises(InputError) as caught:
        load_target("vit_custom", path, image_size=32, **TINY_VIT)
    message = str(caught.value)
    assert "vit_custom" in message
    assert "missing from checkpoint: conv_proj.weight" in message
    assert "not in vit_custom: conv1.weight" in message


def test_vit_checkpoint_at_wrong_image_size_names_the_trained_size(tmp_path):
    path = tmp_path / "vit.safetensors"
    save_state_dict(_tiny_vit().state_dict(), path)
    with pytest.raises(InputError) as caught:
        load_target("vit_custom", path, image_size=64, **TINY_VIT)
    message = str(caught.value)
    assert "shape mismatch encoder.pos_embedding: checkpoint (1, 17, 64) vs model (1, 65, 64)" in message
    assert "image_size 32" in message


def test_load_into_lists_shape_mismatches():
    model = nn.Linear(4, 2)
    with pytest.raises(InputError) as caught:
        load_into(model, {"weight": torch.zeros(3, 4), "bias": torch.zeros(2)}, where="ckpt", expected="probe")
    assert "weight: checkpoint (3, 4) vs model (2, 4)" in str(caught.value)


# --- (d) output count and architecture families --------------------------------------------------------------


@pytest.mark.parametrize("num_classes", [1, 3])
def test_infer_num_classes_for_vit(num_classes):
    assert infer_num_classes(_tiny_vit(num_classes).state_dict(), "vit_custom") == num_classes


def test_full_size_vit_and_densenet_heads():
    vit = build_target("vit_b_16", 3)
    assert tuple(vit.heads.head.weight.shape) == (3, 768)
    assert infer_num_classes(vit.state_dict(), "vit_b_16") == 3
    assert family(vit) == family("vit_b_16") == family("vit_tiny") == "vit"

    densenet = build_target("densenet121", 1)
    assert tuple(densenet.classifier.weight.shape) == (1, 1024)
    assert infer_num_classes(densenet.state_dict(), "densenet121") == 1
    assert family(densenet) == family("resnet50") == "cnn"


def test_unknown_arch_and_bad_vit_settings_are_input_errors():
    with pytest.raises(InputError) as caught:
        build_target("resnet19", 1)
    assert all(arch in str(caught.value) for arch in KNOWN_ARCHS)
    with pytest.raises(InputError, match="vit_custom"):
        build_target("vit_b_16", 1, num_layers=2)
    with pytest.raises(InputError, match="patch_size"):
        build_target("vit_custom", 1, image_size=30, **TINY_VIT)
    with pytest.raises(InputError, match="num_heads"):
        build_target("vit_custom", 1, image_size=32, **{**TINY_VIT, "num_heads": 3})
    with pytest.raises(InputError, match="mlp_ratio"):
        build_target("vit_custom", 1, image_size=32, mlp_ratio=4)


# --- (e) corrupt files ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("keep", [0, 10, 0.5])
def test_truncated_checkpoint_is_input_error(tmp_path, suffix, keep):
    whole = tmp_path / f"whole{suffix}"
    state = {"w": torch.randn(64, 64)}
    save_state_dict(state, whole) if suffix == ".safetensors" else torch.save(state, whole)
    data = whole.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(InputError) as caught:
        load_state_dict(cut)
    assert str(cut) in str(caught.value)


def test_missing_checkpoint_is_input_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_state_dict(tmp_path / "nope.pt")


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_weights_are_input_error(tmp_path, bad_value):
    state = _tiny_vit().state_dict()
    state["encoder.layers.encoder_layer_1.mlp.0.weight"][0, 0] = bad_value
    path = tmp_path / "diverged.safetensors"
    save_state_dict(state, path)
    with pytest.raises(InputError) as caught:
        load_target("vit_custom", path, image_size=32, **TINY_VIT)
    assert "encoder.layers.encoder_layer_1.mlp.0.weight" in str(caught.value)
    assert "conv_proj.weight" not in str(caught.value)


def test_non_tensor_entries_are_input_error(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"weights": {"a": torch.zeros(1)}, "epoch": 3}, path)
    with pytest.raises(InputError, match="not tensors"):
        load_state_dict(path)


def test_save_state_dict_handles_shared_storage(tmp_path):
    shared = torch.randn(4, 4)
    path = tmp_path / "tied.safetensors"
    save_state_dict({"a": shared, "b": shared, "row": shared[1]}, path)
    loaded = load_state_dict(path)
    assert torch.equal(loaded["b"], shared) and torch.equal(loaded["row"], shared[1])
    assert not (tmp_path / "tied.safetensors.partial").exists()


# --- (f) target input --------------------------------------------------------------------------------------------


def test_to_target_input_gray_to_rgb_ranges_and_shape():
    spec = TargetInput(size=32)
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)

    x = to_target_input(torch.rand(2, 1, 64, 48), spec)
    assert x.shape == (2, 3, 32, 32)
    assert torch.all(x >= -mean / std - 1e-5) and torch.all(x <= (1 - mean) / std + 1e-5)
    # One gray image repeated: every channel holds the same pixels before normalisation.
    assert torch.allclose(x[:, 0] * spec.std[0] + spec.mean[0], x[:, 1] * spec.std[1] + spec.mean[1], atol=1e-6)
    assert torch.allclose(to_target_input(torch.zeros(1, 1, 8, 8), spec), (-mean / std).expand(1, 3, 32, 32))
    assert torch.allclose(to_target_input(torch.ones(1, 1, 8, 8), spec), ((1 - mean) / std).expand(1, 3, 32, 32))


def test_to_target_input_rgb_to_gray_and_gradients():
    spec = TargetInput(size=16, channels=1, mean=(0.5,), std=(0.25,))
    images = torch.rand(3, 3, 16, 16, requires_grad=True)
    x = to_target_input(images, spec)
    assert x.shape == (3, 1, 16, 16)
    assert torch.allclose(x, (images.detach().mean(1, keepdim=True) - 0.5) / 0.25)
    x.sum().backward()
    assert images.grad is not None and torch.all(images.grad != 0)


def test_to_target_input_rejects_bad_images():
    spec = TargetInput(size=16)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_target_input(torch.rand(1, 1, 8, 8) * 255, spec)
    with pytest.raises(ValueError, match="shape"):
        to_target_input(torch.rand(1, 2, 8, 8), spec)
    with pytest.raises(InputError):
        TargetInput(size=16, channels=1)  # ImageNet's 3-channel mean/std cannot describe one channel


# --- (g) demographic model ----------------------------------------------------------------------------------


def test_demographic_predict_applies_sigmoid_exactly_once():
    model = DemographicNet(**TINY_DENSENET)
    with torch.no_grad():
        model.sex_head.bias.fill_(-2.0)  # sigmoid once < 0.5; twice > 0.5, so the study's bug flips the label
    model.train()
    x = torch.randn(4, 3, 32, 32)

    predicted = model.predict(x)

    assert model.training  # predict leaves the caller's mode alone
    model.eval()
    with torch.no_grad():
        age, sex_logit = model(x)
    assert age.shape == sex_logit.shape == (4,)
    assert set(predicted) == {"age", "sex_prob", "sex"}
    assert torch.allclose(predicted["age"], age)
    assert torch.allclose(predicted["sex_prob"], torch.sigmoid(sex_logit))
    assert not torch.allclose(predicted["sex_prob"], torch.sigmoid(torch.sigmoid(sex_logit)), atol=1e-2)
    assert torch.equal(predicted["sex"], (torch.sigmoid(sex_logit) >= 0.5).long())
    assert predicted["sex"].sum() == 0


def test_demographics_round_trip_and_wrong_arch(tmp_path):
    model = DemographicNet(**TINY_DENSENET).eval()
    path = tmp_path / "demographics.safetensors"
    save_state_dict(model.state_dict(), path)

    loaded = load_demographics(path, **TINY_DENSENET)
    x = torch.randn(2, 3, 32, 32)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert torch.equal(loaded(x)[0], model(x)[0]) and torch.equal(loaded(x)[1], model(x)[1])

    with pytest.raises(InputError, match="missing from checkpoint"):
        load_demographics(path, growth_rate=4, block_config=(1, 1, 1), num_init_features=8)


def test_default_demographic_net_is_densenet121():
    model = DemographicNet()
    assert model.age_head.in_features == model.sex_head.in_features == 1024
    with pytest.raises(InputError, match="densenet121"):
        DemographicNet(arch="resnet18")
