"""The target classifiers we audit: building each architecture exactly as the study trained it, and feeding it.

Heads follow the study's training code, so its checkpoints load key for key:
- ResNets: `fc = Sequential(Dropout(0.5), Linear(in_features, C))`, weights at `fc.1.*`. Checkpoints with
  torchvision's plain `fc = Linear` head (`fc.*`) are accepted and remapped (the dropout has no weights).
- DenseNets: torchvision's `classifier = Linear(in_features, C)`.
- Vision Transformers: torchvision's `heads = Sequential(head=Linear(hidden, C))`, weights at `heads.head.*`.
A binary classifier has C = 1 output (a logit); multi-class classifiers have one output per class.

Normalisation: `norm="batch"` is torchvision's BatchNorm; `norm="group"` is the same network with every BatchNorm
replaced by GroupNorm(gcd(32, C), C) by Opacus' `ModuleValidator.fix` (DP-SGD cannot train BatchNorm: it mixes
samples). A GroupNorm CNN keeps no running statistics. `load_target` tells the two apart from the checkpoint's
safetensors metadata ("norm"), or else from its keys (norm layers with weights but no running_mean).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from reid_batch import log
from reid_batch.archs import ARCHS
from reid_batch.checkpoints import load_into, load_state_dict
from reid_batch.errors import InputError

_RESNETS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
    "resnet101": torchvision.models.resnet101,
    "resnet152": torchvision.models.resnet152,
}
_DENSENETS: dict[str, Callable[..., nn.Module]] = {
    "densenet121": torchvision.models.densenet121,
    "densenet161": torchvision.models.densenet161,
    "densenet169": torchvision.models.densenet169,
    "densenet201": torchvision.models.densenet201,
}
_FIXED_VITS: dict[str, Callable[..., nn.Module]] = {
    "vit_b_16": torchvision.models.vit_b_16,
    "vit_b_32": torchvision.models.vit_b_32,
    "vit_l_16": torchvision.models.vit_l_16,
    "vit_l_32": torchvision.models.vit_l_32,
}
# Small enough to train and attack on a laptop CPU; dimensions of DeiT-Tiny unless overridden.
CONFIGURABLE_VIT_DEFAULTS = {
    "patch_size": 16,
    "num_layers": 12,
    "num_heads": 3,
    "hidden_dim": 192,
    "mlp_dim": 768,
    "dropout": 0.0,
    "attention_dropout": 0.0,
}
_CONFIGURABLE_VITS = tuple(name for name, arch in ARCHS.items() if arch.kind == "vit_configurable")

KNOWN_ARCHS: tuple[str, ...] = tuple(ARCHS)
# The builder builds exactly the table's architectures (reid_batch/archs.py), no more, no fewer.
assert set(_RESNETS) | set(_DENSENETS) | set(_FIXED_VITS) | set(_CONFIGURABLE_VITS) == set(ARCHS)

RESNET_DROPOUT = 0.5
NORMS = ("batch", "group")
NORM_METADATA_KEY = "norm"


def to_groupnorm(model: nn.Module) -> nn.Module:
    """The model with every BatchNorm replaced by GroupNorm(gcd(32, C), C), as Opacus does it (and validates)."""
    from opacus.validators import ModuleValidator  # a slow import, paid only by GroupNorm (DP-SGD) targets

    fixed = ModuleValidator.fix(model)
    for module in fixed.modules():
        # Opacus' per-sample gradient hooks forbid modifying a hooked module's output in place.
        if isinstance(module, nn.ReLU):
            module.inplace = False
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fixed.modules()):
        raise RuntimeError("BatchNorm left after conversion to GroupNorm")
    return fixed


def checkpoint_norm(state_dict: dict[str, torch.Tensor], arch: str, metadata: dict[str, str] | None = None) -> str:
    """'batch' or 'group': from the checkpoint's metadata if it says, else from its keys."""
    said = (metadata or {}).get(NORM_METADATA_KEY)
    if said is not None:
        if said not in NORMS:
            raise InputError(f"checkpoint metadata names an unknown norm {said!r}; known: {', '.join(NORMS)}",
                             where="checkpoint")
        return said
    if family(arch) != "cnn":
        return "batch"
    # A CNN whose stem norm has an affine weight but no running statistics was trained with GroupNorm.
    stem = "bn1" if arch in _RESNETS else "features.norm0"
    if f"{stem}.weight" in state_dict and f"{stem}.running_mean" not in state_dict:
        return "group"
    return "batch"


def _check_arch(arch: str) -> str:
    if arch not in KNOWN_ARCHS:
        raise InputError(f"unknown target architecture '{arch}'; known: {', '.join(KNOWN_ARCHS)}", where="arch")
    return arch


def family(model_or_arch: nn.Module | str) -> str:
    """"vit" for Vision Transformers, "cnn" for the convolutional targets (ResNet, DenseNet)."""
    if isinstance(model_or_arch, str):
        return ARCHS[_check_arch(model_or_arch)].family
    return "vit" if isinstance(model_or_arch, VisionTransformer) else "cnn"


def _vit_config(arch: str, image_size: int, overrides: dict) -> dict:
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if arch not in _CONFIGURABLE_VITS:
        if overrides:
            raise InputError(
                f"'{arch}' has fixed dimensions and takes no overrides ({', '.join(sorted(overrides))}); "
                f"use arch 'vit_custom' for a ViT of your own dimensions",
                where="arch",
            )
        return {}
    unknown = sorted(set(overrides) - set(CONFIGURABLE_VIT_DEFAULTS))
    if unknown:
        raise InputError(
            f"unknown ViT setting(s) {', '.join(unknown)}; allowed: {', '.join(CONFIGURABLE_VIT_DEFAULTS)}",
            where="vit",
        )
    config = {**CONFIGURABLE_VIT_DEFAULTS, **overrides}
    if image_size % config["patch_size"]:
        raise InputError(
            f"image_size {image_size} is not a multiple of patch_size {config['patch_size']}", where="vit.patch_size"
        )
    if config["hidden_dim"] % config["num_heads"]:
        raise InputError(
            f"hidden_dim {config['hidden_dim']} is not divisible by num_heads {config['num_heads']}",
            where="vit.num_heads",
        )
    return config


def build_target(arch: str, num_classes: int, image_size: int = 224, norm: str = "batch", **vit_overrides) -> nn.Module:
    """A freshly initialised (never pretrained) target network with the study's head for `num_classes` outputs.

    `image_size` only matters for ViTs (it fixes the positional embedding); CNNs pool adaptively.
    `vit_overrides` (patch_size, num_layers, num_heads, hidden_dim, mlp_dim, dropout, attention_dropout)
    apply to 'vit_tiny'/'vit_custom' only. `norm="group"` (CNNs) replaces BatchNorm by GroupNorm.
    """
    _check_arch(arch)
    if norm not in NORMS:
        raise InputError(f"unknown norm {norm!r}; known: {', '.join(NORMS)}", where="norm")
    if norm == "group":
        if family(arch) != "cnn":
            raise InputError(f"GroupNorm applies to the CNN targets, not '{arch}'", where="norm")
        return to_groupnorm(build_target(arch, num_classes, image_size, **vit_overrides))
    if num_classes < 1:
        raise InputError(f"num_classes must be at least 1, got {num_classes}", where="num_classes")
    if arch in _RESNETS:
        if any(v is not None for v in vit_overrides.values()):
            raise InputError(f"ViT settings given for the CNN '{arch}'", where="arch")
        model = _RESNETS[arch](weights=None)
        model.fc = nn.Sequential(nn.Dropout(RESNET_DROPOUT), nn.Linear(model.fc.in_features, num_classes))
        return model
    if arch in _DENSENETS:
        if any(v is not None for v in vit_overrides.values()):
            raise InputError(f"ViT settings given for the CNN '{arch}'", where="arch")
        return _DENSENETS[arch](weights=None, num_classes=num_classes)
    config = _vit_config(arch, image_size, vit_overrides)
    if arch in _FIXED_VITS:
        return _FIXED_VITS[arch](weights=None, num_classes=num_classes, image_size=image_size)
    return VisionTransformer(image_size=image_size, num_classes=num_classes, **config)


def _head_keys(arch: str) -> tuple[str, ...]:
    return ARCHS[arch].head_keys


def infer_num_classes(state_dict: dict[str, torch.Tensor], arch: str) -> int:
    """Number of outputs of the checkpoint's final Linear layer (1 means a binary classifier with one logit)."""
    keys = _head_keys(_check_arch(arch))
    key = next((k for k in keys if k in state_dict), None)
    if key is None or state_dict[key].ndim != 2:
        raise InputError(
            f"cannot find the classification head of a '{arch}' in the checkpoint (looked for {', '.join(keys)}); "
            "is `arch` set to the architecture the model was trained as?",
            where="checkpoint",
        )
    num_classes = int(state_dict[key].shape[0])
    if num_classes == 1:
        log.event("target_outputs", num_classes=1, message="target has 1 output: binary classification")
    else:
        log.event("target_outputs", num_classes=num_classes, message=f"target has {num_classes} outputs: one per class")
    return num_classes


def adapt_head(state_dict: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """Remap a torchvision-style ResNet head (`fc.*`) onto the study's Dropout+Linear head (`fc.1.*`).

    Equivalent at inference time: the dropout layer has no weights and is inactive in eval mode.
    """
    if arch not in _RESNETS or "fc.weight" not in state_dict or "fc.1.weight" in state_dict:
        return state_dict
    log.event("target_head_remapped", arch=arch, message="checkpoint has a plain fc head; loaded as fc = Dropout + Linear")
    return {("fc.1." + k[len("fc."):] if k in ("fc.weight", "fc.bias") else k): v for k, v in state_dict.items()}


def load_target(
    arch: str, checkpoint_path: str | os.PathLike, image_size: int = 224, **vit_overrides
) -> tuple[nn.Module, int]:
    """Safely load a trained target: returns (frozen model in eval mode, number of outputs).

    BatchNorm or GroupNorm (DP-trained) is read from the checkpoint (see `checkpoint_norm`)."""
    state_dict = adapt_head(load_state_dict(checkpoint_path), _check_arch(arch))
    where = str(checkpoint_path)
    norm = checkpoint_norm(state_dict, arch, safetensors_metadata(checkpoint_path))
    if norm != "batch":
        vit_overrides = {**vit_overrides, "norm": norm}
    try:
        num_classes = infer_num_classes(state_dict, arch)
    except InputError:
        # No head where `arch` keeps it: most likely a different architecture altogether. The full key
        # listing from load_into shows the user what the checkpoint really is.
        load_into(build_target(arch, 1, image_size=image_size, **vit_overrides), state_dict, where=where, expected=arch)
        raise
    if num_classes < 1:
        raise InputError("the classification head has no outputs; a classifier needs at least one", where=where)
    model = build_target(arch, num_classes, image_size=image_size, **vit_overrides)
    load_into(model, state_dict, where=where, expected=arch, hint=_vit_size_hint(model, state_dict))
    model.eval().requires_grad_(False)
    log.event("target_loaded", arch=arch, file=where, num_classes=num_classes, image_size=image_size, norm=norm)
    return model, num_classes


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The `__metadata__` of a safetensors file; {} for other formats or an unreadable header."""
    try:
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if not 0 < length < 100_000_000:
                return {}
            header = json.loads(handle.read(length))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}


def _vit_size_hint(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> str | None:
    # A ViT's positional embedding length encodes the image size it was trained at; say so rather than
    # leave the user to decode "(1, 197, 768) vs (1, 50, 768)".
    if not isinstance(model, VisionTransformer):
        return None
    saved = state_dict.get("encoder.pos_embedding")
    if saved is None or saved.ndim != 3 or saved.shape == model.encoder.pos_embedding.shape:
        return None
    side = int(round((saved.shape[1] - 1) ** 0.5))
    if side * side != saved.shape[1] - 1:
        return None
    return (
        f"hint: the checkpoint's positional embedding has {side}x{side} patches, i.e. image_size "
        f"{side * model.patch_size} with patch_size {model.patch_size}; this run uses image_size {model.image_size}"
    )


@dataclass(frozen=True)
class TargetInput:
    """What a target network expects as input.

    size: side of the square image the target was trained on, in pixels.
    channels: 1 (grayscale) or 3 (grayscale repeated, as ImageNet-style models expect).
    mean, std: per-channel normalisation applied after scaling pixels to [0, 1]; the network sees (x - mean) / std.
    """

    size: int
    channels: int = 3
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        if self.size < 1:
            raise InputError(f"image size must be positive, got {self.size}", where="target.image_size")
        if self.channels not in (1, 3):
            raise InputError(f"channels must be 1 or 3, got {self.channels}", where="target.channels")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != self.channels:
                raise InputError(
                    f"{name} has {len(values)} values but the target takes {self.channels} channels",
                    where=f"target.{name}",
                )
        if any(s <= 0 for s in self.std):
            raise InputError(f"std values must be positive, got {self.std}", where="target.std")


def to_target_input(images01: torch.Tensor, spec: TargetInput, check_range: bool = True) -> torch.Tensor:
    """Turn images with pixel values in [0, 1], shape (N, C, H, W) with C in {1, 3}, into the target's input.

    Matches channels (1->3 by repetition, 3->1 by averaging), resizes to spec.size x spec.size (bilinear,
    antialiased so downscaling does not alias), then normalises to (x - mean) / std, whose range is
    [-mean/std, (1 - mean)/std] per channel. Differentiable, so attacks can optimise through it.
    `check_range=False` skips the [0, 1] check, which costs a device sync, inside optimisation loops.
    """
    if images01.ndim != 4 or images01.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (N, 1|3, H, W), got {tuple(images01.shape)}")
    if not images01.is_floating_point():
        raise ValueError(f"expected floating-point images in [0, 1], got dtype {images01.dtype}")
    if check_range and images01.numel():
        low, high = float(images01.detach().min()), float(images01.detach().max())
        if low < -1e-4 or high > 1 + 1e-4:
            raise ValueError(f"expected pixel values in [0, 1], got range [{low:.4g}, {high:.4g}]")
    x = images01
    if x.shape[1] != spec.channels:
        x = x.expand(-1, 3, -1, -1) if spec.channels == 3 else x.mean(dim=1, keepdim=True)
    if tuple(x.shape[-2:]) != (spec.size, spec.size):
        x = F.interpolate(x, size=(spec.size, spec.size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std
