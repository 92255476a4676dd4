"""The target architectures reid-batch knows: one torch-free table, read by the manifest (validation) and by the
model builder (reid_batch.models.targets), so a name the manifest accepts is always one the builder builds.

To add an architecture: a row here and its torchvision constructor in models/targets.py (an import-time check
fails if the two disagree); its objective terms follow from its family. To add a family: its terms and default
weights here, their implementation in attack/objectives.py, and its architectures as above.
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


# The objective terms of each family (reid_batch/attack/objectives.py implements them), and their default weights.
CNN_TERMS = ("bn_stats", "feature_stats", "logits", "tv")
CNN_ALLOWED_TERMS = ("bn_stats", "gn_stats", "feature_stats", "logits", "tv")
VIT_TERMS = ("ln_stats", "cls_magnitude", "attn_entropy", "attn_diversity", "logits", "tv")
DEFAULT_TERMS = {
    "cnn": {"bn_stats": 1.0, "feature_stats": 1.0, "logits": 1.0, "tv": 1e-5},
    "vit": {"ln_stats": 1.0, "cls_magnitude": 1.0, "attn_entropy": 1.0, "attn_diversity": 1.0, "logits": 1.0, "tv": 1e-5},
}
FAMILY_TERMS = {"cnn": CNN_ALLOWED_TERMS, "vit": VIT_TERMS}  # every term a manifest may name, per family


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
