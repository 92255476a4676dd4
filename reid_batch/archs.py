"""The target architectures reid-batch knows: one torch-free table, read by the manifest (validation) and by the
model builder (reid_batch.models.targets), so a name the manifest accepts is always one the builder builds.

To add an architecture: a row here and its torchvision constructor in models/targets.py (an import-time check
fails if the two disagree); its objective terms follow from its family.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    name: str
    family: str  # "cnn" (BatchNorm/GroupNorm terms) or "vit" (LayerNorm, CLS and attention terms)
    kind: str  # "resnet", "densenet", "vit" (torchvision's fixed sizes) or "vit_configurable" (manifest's targets[].vit)
    head_keys: tuple[str, ...]  # state-dict keys of the final Linear layer's weight, in the order to try
    default_input: int = 224  # the input size the architecture was designed for (targets[].input.size overrides)


_RESNET_HEAD = ("fc.1.weight", "fc.weight")  # fc.1: the head behind the dropout reid-batch's training adds
_DENSENET_HEAD = ("classifier.weight",)
_VIT_HEAD = ("heads.head.weight",)

ARCHS: dict[str, Arch] = {a.name: a for a in (
    *(Arch(f"resnet{d}", "cnn", "resnet", _RESNET_HEAD) for d in (18, 34, 50, 101, 152)),
    *(Arch(f"densenet{d}", "cnn", "densenet", _DENSENET_HEAD) for d in (121, 161, 169, 201)),
    *(Arch(f"vit_{s}_{p}", "vit", "vit", _VIT_HEAD) for s in ("b", "l") for p in (16, 32)),
    Arch("vit_tiny", "vit", "vit_configurable", _VIT_HEAD),  # DeiT-Tiny dimensions unless targets[].vit overrides
    Arch("vit_custom", "vit", "vit_configurable", _VIT_HEAD),
)}


def arch_family(name: str) -> str | None:
    """'cnn' or 'vit' for a known architecture, None for an unknown name."""
    arch = ARCHS.get(name)
    return arch.family if arch is not None else None


def known_names() -> str:
    return ", ".join(ARCHS)
