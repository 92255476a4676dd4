"""The job manifest: one YAML document describes a whole reid-batch job.

Validated up front, before any work or write, so that a cluster job fails in its first second with a
message naming the field rather than after an hour of GPU time. Only pydantic and PyYAML are imported here:
`reid-batch validate` and `--help` must start fast, without torch.

Relative paths in a manifest resolve against the current working directory, as for any command-line tool.
"""

from __future__ import annotations

import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticUndefined

from reid_batch import MANIFEST_VERSION
from reid_batch.archs import (  # noqa: F401 - the term tables are re-exported for the schema's readers
    CNN_ALLOWED_TERMS, CNN_TERMS, DEFAULT_TERMS, FAMILY_TERMS, VIT_TERMS, arch_family, known_names)
from reid_batch.errors import InputError
from reid_batch.layout import RESERVED_NAMES

Slug = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
Seed = Annotated[int, Field(ge=0, lt=2**63)]
Weight = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
Probability = Annotated[float, Field(gt=0.0, le=1.0)]
ImageSize = Annotated[int, Field(ge=16, le=4096)]

RESERVED_TARGET_NAMES = RESERVED_NAMES
class Strict(BaseModel):
    # An unknown key is almost always a typo that would silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)


def _finite_positive(values: list[float], what: str) -> list[float]:
    if any(not math.isfinite(v) or v <= 0 for v in values):
        raise ValueError(f"every {what} must be finite and > 0")
    return values


def _check_uri(uri: str) -> str:
    if not uri or not uri.strip():
        raise ValueError("must not be empty")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in uri):
        raise ValueError("must not contain control characters (NUL, newline, ...)")
    if "://" in uri and not uri.startswith(("s3://", "file://")):
        raise ValueError(f"unsupported scheme in {uri!r}: use a local path or s3://bucket/prefix")
    if uri.startswith("s3://"):
        bucket = uri[5:].split("/", 1)[0]
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
            raise ValueError(f"invalid S3 bucket name {bucket!r}")
    parts = uri.split("://", 1)[-1].split("/")
    if ".." in parts:
        raise ValueError("must not contain '..' components")
    if "$" in uri:
        raise ValueError("environment variables are not expanded in manifests; write the value")
    return uri


# ---------------------------------------------------------------------------------------------- output


class S3Spec(Strict):
    endpoint: str | None = Field(None, description="S3-compatible endpoint URL, e.g. http://127.0.0.1:9000")
    region: str | None = None
    sse: Literal["AES256", "aws:kms"] | None = Field(None, description="server-side encryption for uploads")
    allow_bucket_creation: bool = False
    retry_max_attempts: Annotated[int, Field(ge=1, le=100)] = 5
    retry_budget_s: Annotated[float, Field(ge=0, le=86400, allow_inf_nan=False)] = 120.0

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+(:\d+)?/?", v):
            raise ValueError("must be an http(s)://host[:port] URL without credentials or path")
        return v


class OutputSpec(Strict):
    uri: str = Field(description="local directory or s3://bucket/prefix; the run writes under <uri>/<run_id>/")
    s3: S3Spec = S3Spec()

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return _check_uri(v)


# ------------------------------------------------------------------------------------------------ data


class SyntheticWorldSpec(Strict):
    """The built-in synthetic chest-X-ray world (known patients); written once, locally."""

    root: str = Field("runs/world", description="local directory the world is written to")
    seed: Seed = 0
    image_size: ImageSize = 128
    private_patients: PositiveInt = 600
    public_patients: PositiveInt = 1400
    control_patients: PositiveInt = 300
    max_studies_per_patient: Annotated[int, Field(ge=1, le=20)] = 3

    @field_validator("root")
    @classmethod
    def _local(cls, v: str) -> str:
        if v.startswith("s3://"):
            raise ValueError("the synthetic world is written to a local directory")
        return _check_uri(v)


class SourceSpec(Strict):
    format: Literal["chexpert", "nih", "folder", "dicom"]
    root: str
    csv: str | None = Field(None, description="CSV file name inside root (format default if omitted)")
    on_error: Literal["raise", "skip"] = Field("raise", description="unreadable image: fail naming it, or skip and count")

    @field_validator("root")
    @classmethod
    def _root(cls, v: str) -> str:
        return _check_uri(v)


class DataSpec(Strict):
    synthetic: SyntheticWorldSpec | None = None
    private: SourceSpec | None = Field(None, description="the target's training data (CheXpert in the study)")
    public: SourceSpec | None = Field(None, description="public data of the same modality (NIH in the study)")
    control: SourceSpec | None = Field(None, description="held-out patients never trained on")
    val_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2
    split_seed: Seed = 0

    @model_validator(mode="after")
    def _sources(self) -> "DataSpec":
        if self.synthetic is None:
            missing = [n for n in ("private", "public") if getattr(self, n) is None]
            if missing:
                raise ValueError(f"without data.synthetic, data.{' and data.'.join(missing)} must be given")
        return self


# --------------------------------------------------------------------------------------------- targets


class InputSpec(Strict):
    size: ImageSize = 224
    channels: Literal[1, 3] = 3
    mean: list[float] = [0.485, 0.456, 0.406]
    std: list[float] = [0.229, 0.224, 0.225]

    @model_validator(mode="after")
    def _per_channel(self) -> "InputSpec":
        for name in ("mean", "std"):
            if len(getattr(self, name)) != self.channels:
                raise ValueError(f"{name} needs {self.channels} value(s), one per channel")
        _finite_positive(self.std, "std")
        if any(not math.isfinite(m) for m in self.mean):
            raise ValueError("mean must be finite")
        return self


class VitSpec(Strict):
    """Shape of a custom (small) VisionTransformer; vit_b_16 etc. take torchvision's shapes."""

    patch_size: PositiveInt = 16
    num_layers: PositiveInt = 12
    num_heads: PositiveInt = 12
    hidden_dim: PositiveInt = 768
    mlp_dim: PositiveInt = 3072

    @model_validator(mode="after")
    def _heads_divide(self) -> "VitSpec":
        if self.hidden_dim % self.num_heads:
            raise ValueError("hidden_dim must be divisible by num_heads")
        return self


class IdentitySpec(Strict):
    """The identity-class positive control (preset identity): a classifier whose classes are patients."""

    patients: Annotated[int, Field(ge=2, le=1000)] = Field(
        10, description="K: classes, one patient each (half men, half women)")
    studies: Annotated[int, Field(ge=2, le=200)] = Field(
        24, description="studies rendered per patient to train on (the world's own studies of these patients stay "
        "held out: they are what the attack's samples are matched against)")
    validation_studies: Annotated[int, Field(ge=1, le=50)] = Field(
        4, description="further rendered studies per patient for validation accuracy")
    role: Literal["positive", "negative"] = Field(
        "positive", description="positive: classes are the pool's first K identity patients; negative: K others, "
        "of the same sexes class by class, scored against the positive's patients (it must stay at chance)")
    seed: Seed = Field(0, description="which patients are drawn (the same seed gives positive and negative sets "
                                      "that never overlap)")
    defence: Literal["none", "regularised", "augmented", "groupnorm", "dp"] = Field(
        "none", description="train the identity classes with a mitigation's recipe (as the presets of those names; "
        "dp needs train.target_epsilon): the defences measured where a leak is known to exist")


class CohortSpec(Strict):
    """A demographic slice of the pool to train on (cohort skew): the target's patients are only these."""

    sex: Literal["M", "F"] | None = Field(None, description="only patients of this sex")
    min_age: Annotated[float, Field(ge=0, le=120)] | None = Field(None, description="only patients at least this old")
    max_age: Annotated[float, Field(ge=0, le=120)] | None = Field(None, description="only patients at most this old")

    @model_validator(mode="after")
    def _some_rule(self) -> "CohortSpec":
        if self.sex is None and self.min_age is None and self.max_age is None:
            raise ValueError("give sex, min_age or max_age")
        if self.min_age is not None and self.max_age is not None and self.min_age > self.max_age:
            raise ValueError("min_age is above max_age")
        return self

    def describe(self) -> str:
        parts = [{"M": "men", "F": "women"}[self.sex]] if self.sex else ["patients"]
        if self.min_age is not None:
            parts.append(f"aged {self.min_age:g}+" if self.max_age is None else f"aged {self.min_age:g}-{self.max_age:g}")
        elif self.max_age is not None:
            parts.append(f"aged up to {self.max_age:g}")
        return " ".join(parts)


class CanarySpec(Strict):
    """Canaries in the study's task: atypical patients, each put in the training set by its own coin flip (the
    ones left out are the in-model control), with `d` training studies for each d of `duplicates`. Every canary is
    scored by a further study of it that no model trained on."""

    per_dose: Annotated[int, Field(ge=2, le=1000)] = Field(
        12, description="canary patients per duplication level; each is included with probability 1/2")
    duplicates: list[Annotated[int, Field(ge=1, le=64)]] = Field(
        [1, 4, 16], min_length=1, description="training studies per included canary, one group of canaries per value")
    flip_label: bool = Field(False, description="train the included canaries with the other class's label")
    seed: Seed = Field(0, description="the coin flips (the canaries themselves are fixed by the world's seed)")

    @model_validator(mode="after")
    def _distinct(self) -> "CanarySpec":
        if len(set(self.duplicates)) != len(self.duplicates):
            raise ValueError("duplicates must be distinct")
        return self


class TargetTrainSpec(Strict):
    preset: Literal["normal", "overfit", "regularised", "augmented", "dp", "identity"] = "normal"
    pool: Literal["private", "control"] = Field(
        "private", description="which patients the target trains on; 'control' makes a control model"
    )
    epochs: PositiveInt | None = None
    batch_size: PositiveInt | None = None
    lr: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    weight_decay: Weight | None = None
    images_per_class: PositiveInt | None = Field(None, description="overfit preset: images per class")
    freeze_backbone: bool = False
    max_images: PositiveInt | None = Field(None, description="cap on training images (CPU demos)")
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] | None = Field(None, description="regularised preset: dropout before the classifier")
    patience: PositiveInt | None = Field(None, description="stop after this many epochs without a better validation AUC")
    target_epsilon: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = Field(
        None, description="dp preset: the privacy budget epsilon (delta = 1 / training images)")
    max_grad_norm: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = Field(
        None, description="dp preset: per-sample gradient clipping norm")
    accountant: Literal["rdp", "prv"] = Field("rdp", description="dp preset: Opacus privacy accountant")
    norm: Literal["batch", "group"] | None = Field(
        None, description="CNN normalisation: batch (default) or group (GroupNorm, as DP-SGD needs; dp is always "
        "group): a non-DP GroupNorm arm separates 'DP protects' from 'the attack lost its BatchNorm statistics'")
    identity: IdentitySpec | None = Field(
        None, description="preset identity: K patients as K classes (synthetic world only; defaults if omitted)")
    cohort: CohortSpec | None = Field(
        None, description="train (and validate) on this demographic slice of the pool only (P4, cohort skew)")
    canaries: CanarySpec | None = Field(
        None, description="add atypical canary patients to the training set by coin flip (P2; synthetic world only)")
    seed: Seed = 0

    @model_validator(mode="after")
    def _preset_fields(self) -> "TargetTrainSpec":
        if self.identity is not None and self.preset != "identity":
            raise ValueError("an identity section applies to preset identity only")
        if self.preset == "identity":
            if self.identity is None:
                self.identity = IdentitySpec()
            if self.images_per_class is not None or self.max_images is not None or self.cohort is not None:
                raise ValueError("preset identity trains on identity.studies per patient; images_per_class, "
                                 "max_images and cohort do not apply")
            if self.canaries is not None:
                raise ValueError("canaries apply to the study's task (cardiomegaly), not to preset identity")
        private = self.dp
        if not private and (self.target_epsilon is not None or self.max_grad_norm is not None):
            raise ValueError("target_epsilon and max_grad_norm apply to preset dp only (and to identity.defence dp)")
        if private and self.norm == "batch":
            raise ValueError("preset dp trains GroupNorm models (Opacus cannot clip BatchNorm's per-sample gradients)")
        if private and self.target_epsilon is None:
            raise ValueError("preset dp needs target_epsilon (so does identity.defence dp)")
        return self


    @property
    def dp(self) -> bool:
        """Trained with DP-SGD: preset dp, or an identity control defended with it."""
        return self.preset == "dp" or (self.identity is not None and self.identity.defence == "dp")


class FeatureTargetSpec(Strict):
    """Statistics the feature-activation term pushes the chosen layer towards (per channel, over N,H,W)."""

    source: Literal["model", "fixed"] = Field(
        "model", description="model: the statistics of the normalisation layer that reads feature_layer's output "
        "(a BatchNorm's running statistics; a GroupNorm's reference statistics); fixed: mean and std below")
    mean: float = Field(0.0, allow_inf_nan=False, description="the fixed target mean (source: fixed)")
    std: Annotated[float, Field(gt=0, allow_inf_nan=False)] = Field(
        1.0, description="the fixed target standard deviation (source: fixed)")


class ReferenceSpec(Strict):
    """Where reference statistics come from for targets without running statistics (ViT, GroupNorm CNN)."""

    # Public images, not the prior's samples: statistics of the un-fine-tuned generator put it at the terms' minimum
    # from the start, so they could only pull stage 1 back to where it began.
    source: Literal["prior", "public"] = Field(
        "public", description="public: images of the public pool (default); prior: the un-fine-tuned generator's "
        "samples (its own statistics: the terms start at their minimum)")
    num_images: PositiveInt = 256


class ObjectiveSpec(Strict):
    terms: dict[str, Weight] | None = Field(None, description="term name -> weight; defaults per architecture")
    first_bn_multiplier: Weight = 1.0
    feature_layer: str = "layer4.1.conv2"
    feature_target: FeatureTargetSpec = FeatureTargetSpec()
    layernorm_layers: Literal["all"] | list[str] = "all"
    attention_blocks: Literal["all"] | list[str] = "all"
    reference: ReferenceSpec = ReferenceSpec()
    # Off by default: the study's method conditions only through z_0. With K > 2 classes that can collapse stage 1
    # onto one patient; a learned offset per class gives each class its own region of latent space.
    class_offsets: bool = Field(
        False, description="learn a latent offset per class beside the generator (the class is still read from z_0): "
        "the fix for stage 1 collapsing many classes onto one; off = the study's method")
    class_offset_lr: Annotated[float, Field(gt=0, allow_inf_nan=False)] = Field(
        0.01, description="Adam learning rate of the class offsets (the latents are N(0, 1) per coordinate)")


class TargetSpec(Strict):
    name: Slug
    arch: str
    checkpoint: str | None = Field(None, description="checkpoint path; omit to train it with `train`")
    train: TargetTrainSpec | None = None
    input: InputSpec = InputSpec()
    vit: VitSpec | None = None
    objective: ObjectiveSpec = ObjectiveSpec()
    training_list: str | None = Field(
        None, description="checkpoint targets: a CSV naming what the checkpoint was trained on, by `patient_id` or "
        "by image `path` in data.private; without it membership is reported as not available")
    attacks: list[Literal["study", "ppa"]] = Field(
        ["study"], description="the attack modes run on this target: study (the study's two stages, always run) "
        "and ppa (per-sample latent optimisation, settings in the ppa section); the report ranks them")
    baseline: Slug | None = Field(
        None, description="the undefended target this one defends (a mitigation arm trained on the same patients): "
        "the report measures the change of the baseline's strongest attack's L, paired on the shared patients")

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, v: str) -> str:
        # A target's outputs live at <run>/<name>/...: it must not shadow the run's other folders.
        if v in RESERVED_TARGET_NAMES:
            raise ValueError(f"{v!r} is reserved; choose another target name")
        return v

    @field_validator("arch")
    @classmethod
    def _arch(cls, v: str) -> str:
        if arch_family(v) is None:
            raise ValueError(f"unknown architecture {v!r}; known: {known_names()}")
        return v

    def plan_dump(self) -> dict:
        """The target's settings as the plans of its stages store them: everything but `attacks` and `baseline`
        (which modes run, and what the report compares with, do not change what a stage computes: adding ppa later
        must not invalidate stage 1 or the samples)."""
        return self.model_dump(mode="json", exclude={"attacks", "baseline"})

    @property
    def family(self) -> str:
        return arch_family(self.arch)  # type: ignore[return-value]

    @property
    def terms(self) -> dict[str, float]:
        return dict(self.objective.terms) if self.objective.terms is not None else dict(DEFAULT_TERMS[self.family])

    @model_validator(mode="after")
    def _consistent(self) -> "TargetSpec":
        if self.checkpoint is None and self.train is None:
            raise ValueError("give a checkpoint, or a train section to train the target")
        if self.checkpoint is not None and self.train is not None:
            raise ValueError("give either checkpoint or train, not both")
        if self.training_list is not None and self.train is not None:
            raise ValueError("training_list is for checkpoint targets; a trained target's members are its own "
                             "training list")
        if self.arch == "vit_custom" and self.vit is None:
            raise ValueError("arch vit_custom needs a vit section (patch_size, num_layers, ...)")
        if self.vit is not None and self.family != "vit":
            raise ValueError("a vit section only applies to ViT architectures")
        if self.train is not None and self.train.norm == "group" and self.family != "cnn":
            raise ValueError("train.norm: group applies to CNN targets")
        if self.vit is not None and self.input.size % self.vit.patch_size:
            raise ValueError("input.size must be divisible by vit.patch_size")
        if self.train is not None and self.train.dp and not self.arch.startswith("resnet"):
            # Opacus' hooks reject torchvision's in-place residual adds, and torch's expanded weights (used instead)
            # fail inside DenseNet's concatenations: ResNets are the architectures DP-SGD is known to train here.
            raise ValueError("preset dp trains ResNets (resnet18..152) with Opacus; train other architectures "
                             "elsewhere and give the checkpoint")
        if "study" not in self.attacks or len(set(self.attacks)) != len(self.attacks):
            raise ValueError("attacks: list each mode once, and keep study (the pipeline's stages always run it)")
        if self.objective.class_offsets and "logits" not in self.terms:
            raise ValueError("objective.class_offsets needs the logits term (the classes are what it conditions on)")
        allowed = FAMILY_TERMS[self.family]
        if self.objective.terms is not None:
            unknown = sorted(set(self.objective.terms) - set(allowed))
            if unknown:
                raise ValueError(f"objective terms {unknown} do not apply to a {self.family}; allowed: {list(allowed)}")
            if not any(w > 0 for w in self.objective.terms.values()):
                raise ValueError("at least one objective term needs a positive weight")
        return self


# ------------------------------------------------------------------------------------------- generator


class PriorTrainSpec(Strict):
    """Progressive WGAN-GP training of the prior on the public pool."""

    images_per_phase: PositiveInt = 20000
    final_phase_images: PositiveInt | None = Field(
        None, description="images of the last phase (the full resolution, stabilising); default images_per_phase: "
        "where a short run's minutes buy the most")
    batch_size: PositiveInt = 32
    lr: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1e-3
    n_critic: PositiveInt = 1
    gp_weight: Weight = 10.0
    ema_decay: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.999
    checkpoint_every: PositiveInt = 200
    seed: Seed = 0


class GeneratorSpec(Strict):
    arch: Literal["pggan"] = "pggan"
    checkpoint: str | None = Field(None, description="prior checkpoint; omit to train one with `train`")
    format: Literal["auto", "segal", "segal_lightning", "gan_zoo", "reid"] = "auto"
    latent_dim: PositiveInt = 512
    depths: list[PositiveInt] = [512, 512, 512, 256, 128, 64, 32, 16]
    out_channels: Literal[1, 3] = 3
    output_range: tuple[float, float] = Field((0.0, 1.0), description="declared value range of the raw output")
    train: PriorTrainSpec | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "GeneratorSpec":
        if self.checkpoint is None and self.train is None:
            raise ValueError("give a checkpoint, or a train section to train the prior")
        if self.checkpoint is not None and self.train is not None:
            raise ValueError("give either checkpoint or train, not both")
        if self.output_range not in ((0.0, 1.0), (-1.0, 1.0)):
            raise ValueError("output_range must be [0, 1] or [-1, 1]")
        return self

    @property
    def resolution(self) -> int:
        return 4 * 2 ** (len(self.depths) - 1)


# ------------------------------------------------------------------------------------------- the stages


class DiscriminatorTermSpec(Strict):
    """The study's future work: a critic trained on the public pool keeps stage-1 images on the chest-X-ray
    manifold. Adds weight * (-mean critic score of the generated images) to the fine-tuning loss."""

    weight: Annotated[float, Field(gt=0, allow_inf_nan=False)] = Field(
        ..., description="weight of the term (the critic's scores are unbounded: start near the objective's scale)")
    checkpoint: str | None = Field(
        None, description="the critic (a discriminator.safetensors from train-prior); default: the run's "
        "prior/discriminator.safetensors, which a trained prior writes")


class DemographicFeedbackSpec(Strict):
    """The study's other future work: the demographic model as feedback, "to encourage generation of images that can
    be more accurately predicted upon". Adds weight * (mean binary entropy, in nats, of the model's predicted sex
    probability) to the fine-tuning loss: 0 when every image's sex is read with certainty, log 2 at a coin flip."""

    weight: Annotated[float, Field(gt=0, allow_inf_nan=False)] = Field(
        ..., description="weight of the term (it lies in [0, log 2 = 0.69])")


class FinetuneSpec(Strict):
    optimizer: Literal["adam"] = "adam"
    lr: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1e-5
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
    steps: PositiveInt = 2500
    batch_size: PositiveInt = Field(8, description="global batch over all processes")
    grad_clip: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    checkpoint_every: PositiveInt = 100
    log_every: PositiveInt = 10
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: Seed = 0
    discriminator: DiscriminatorTermSpec | None = Field(
        None, description="adversarial fine-tuning: a critic's term beside the target's (off by default)")
    demographic_feedback: DemographicFeedbackSpec | None = Field(
        None, description="the demographic model's sex-prediction entropy as a term (off by default)")


class SamplingSpec(Strict):
    num_candidates: PositiveInt = 1000
    batch_size: PositiveInt | Literal["auto"] = 64
    num_shards: PositiveInt = 1
    chunk_size: PositiveInt = Field(4096, description="candidates per committed chunk (resume granularity)")
    row_group_size: PositiveInt = 1024
    seed: Seed = 0
    save_images: bool = False
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    compile: bool = False

    @model_validator(mode="after")
    def _shards(self) -> "SamplingSpec":
        if self.num_shards > self.num_candidates:
            raise ValueError(f"num_shards ({self.num_shards}) exceeds num_candidates ({self.num_candidates})")
        return self


class PPASpec(Strict):
    """The ppa attack (Plug & Play-style, per-sample latent optimisation) on targets listing ppa in `attacks`.

    Per class: search latents, optimise the best toward the class, keep the most confident (attack.ppa,
    stages.ppa). Defaults: chosen on the demo's identity control with bench/ppa_identity.py (attack.ppa.PPASettings
    says why)."""

    generator: Literal["prior", "finetuned"] = Field(
        "prior", description="the generator whose latents are optimised: the prior, or stage 1's fine-tuned one")
    search: Annotated[int, Field(gt=0, lt=2**24)] = Field(
        200, description="latents searched per class (by confidence over random views)")
    optimise: PositiveInt = Field(8, description="of those, the most confident optimised per class")
    keep: PositiveInt = Field(4, description="of those, kept per class (by confidence over final_views views)")
    steps: PositiveInt = Field(150, description="Adam steps on each latent")
    lr: Annotated[float, Field(gt=0, allow_inf_nan=False)] = Field(2e-2, description="Adam's learning rate on the latents")
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.1, 0.1), description="Adam's betas (PPA's 0.1, 0.1: short memory, each view's gradient counts)")
    search_views: PositiveInt = Field(4, description="random views averaged when ranking the searched latents")
    final_views: PositiveInt = Field(32, description="random views averaged when ranking the optimised latents")
    crop_scale: tuple[Annotated[float, Field(gt=0, le=1)], Annotated[float, Field(gt=0, le=1)]] = Field(
        (0.8, 1.0), description="area of each random crop, as a share of the image (low, high)")
    rotation_deg: Annotated[float, Field(ge=0, le=180)] = Field(5.0, description="largest rotation of a view")
    brightness: Annotated[float, Field(ge=0, le=1)] = Field(0.1, description="largest brightness shift of a view")
    latent_penalty: Annotated[float, Field(ge=0, allow_inf_nan=False)] = Field(
        1e-3, description="weight of (mean(z^2) - 1)^2: keeps each latent where the generator was trained")
    bn_stats: Annotated[float, Field(ge=0, allow_inf_nan=False)] = Field(
        0.0, description="weight of the per-sample BatchNorm term in each step (BatchNorm targets; 0: off)")
    keep_by: Literal["probability", "margin"] = Field(
        "probability", description="rank the optimised latents by the class's probability or its logit margin")
    step_views: PositiveInt = Field(1, description="random views per optimisation step, losses averaged (costs "
                                    "that many target passes per step)")
    loss: Literal["cross_entropy", "poincare"] = Field(
        "cross_entropy", description="the class loss of each step: cross-entropy, or PPA's Poincare loss (does "
        "not vanish once the class is certain)")
    batch_size: PositiveInt | Literal["auto"] = Field(
        64, description="latents per pass (searching, and each optimisation group), or auto: on a GPU sized from a "
        "measured probe and halved on an out-of-memory error (a latent's path does not depend on its group)")
    seed: Seed = Field(0, description="the searched latents and every random view are functions of (seed, id, step)")

    @model_validator(mode="after")
    def _counts(self) -> "PPASpec":
        if not self.keep <= self.optimise <= self.search:
            raise ValueError(f"need keep <= optimise <= search (got {self.keep}, {self.optimise}, {self.search})")
        if self.crop_scale[0] > self.crop_scale[1]:
            raise ValueError("crop_scale: low must not exceed high")
        return self


class MahalanobisSpec(Strict):
    covariance: Literal["diagonal", "ledoit_wolf"] = "diagonal"
    reference_images: PositiveInt = 512
    epsilon: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1e-5


class SelectionSpec(Strict):
    rule: Literal["quantile", "top_k", "absolute"] = "quantile"
    objective_quantile: Probability = 0.01
    mahalanobis_quantile: Probability = 0.01
    top_k: PositiveInt | None = None
    objective_max: float | None = Field(None, allow_inf_nan=False)
    mahalanobis_max: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    max_selected: PositiveInt | None = None
    mahalanobis: MahalanobisSpec = MahalanobisSpec()

    @model_validator(mode="after")
    def _rule_fields(self) -> "SelectionSpec":
        if self.rule == "top_k" and self.top_k is None:
            raise ValueError("rule top_k needs top_k")
        if self.rule == "absolute" and (self.objective_max is None or self.mahalanobis_max is None):
            raise ValueError("rule absolute needs objective_max and mahalanobis_max")
        return self


class DemographicsTrainSpec(Strict):
    epochs: PositiveInt = 10
    batch_size: PositiveInt = 32
    lr: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1e-4
    weight_decay: Weight = 1e-4
    max_images: PositiveInt | None = None
    seed: Seed = 0


class DemographicsSpec(Strict):
    arch: Literal["densenet121", "densenet_tiny"] = "densenet121"
    checkpoint: str | None = None
    image_size: ImageSize = 128
    train: DemographicsTrainSpec | None = None
    num_shards: PositiveInt = 1

    @model_validator(mode="after")
    def _consistent(self) -> "DemographicsSpec":
        if self.checkpoint is None and self.train is None:
            raise ValueError("give a checkpoint, or a train section to train the demographic model")
        if self.checkpoint is not None and self.train is not None:
            raise ValueError("give either checkpoint or train, not both")
        return self


class ReidTrainSpec(Strict):
    epochs: PositiveInt = 20
    patients_per_batch: Annotated[int, Field(ge=2)] = 64
    lr: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1e-3
    weight_decay: Weight = 1e-4
    temperature: Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)] = 0.1
    augment: Annotated[float, Field(ge=0, le=3, allow_inf_nan=False)] = 1.0
    max_patients: PositiveInt | None = None
    validate_every: PositiveInt = 5
    seed: Seed = 0


class ReidSpec(Strict):
    arch: Literal["reid_small", "resnet18", "resnet50"] = "reid_small"
    image_size: ImageSize = 64
    embedding_dim: PositiveInt = 128
    width: PositiveInt = 32
    checkpoint: str | None = None
    train: ReidTrainSpec | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "ReidSpec":
        if self.checkpoint is None and self.train is None:
            raise ValueError("give a checkpoint, or a train section to train the re-identification embedding")
        if self.checkpoint is not None and self.train is not None:
            raise ValueError("give either checkpoint or train, not both")
        return self


class EvaluationSpec(Strict):
    inception_weights: str | None = Field(None, description="Inception-v3 weights for FID; untrained if omitted")
    fid: bool = Field(True, description="compute FID (each needs a 2048 x 2048 matrix square root: slow on a CPU)")
    inception_image_size: Annotated[int, Field(ge=75, le=299)] = Field(
        299, description="side images are resized to for Inception-v3 (299 is standard FID; smaller is faster, CPU demos)"
    )
    num_images: PositiveInt = 256
    pca_components: PositiveInt = 50
    pca_fit_on: Literal["reference", "pooled"] = "reference"
    bootstrap: NonNegativeInt = 200
    membership_candidates: PositiveInt = Field(
        2000, description="raw candidates per generator for the leak statistic (fresh latent ids, none used in "
        "fine-tuning or sampling)"
    )
    membership_patients: PositiveInt = Field(
        1000, description="at most this many member patients, and as many non-members, in the leak statistic")
    leak_bootstrap: Annotated[int, Field(ge=100)] = Field(
        1000, description="resamples of patients and candidates for the leak statistic's interval")
    leak_permutations: Annotated[int, Field(ge=100)] = Field(
        1000, description="paired permutations for the leak statistic's p-value")
    population_shift: bool = Field(
        False, description="predict age and sex of the raw leak candidates of the attacked generator and the prior: "
        "the shift of their means (P4, cohort skew); costs a demographic-model pass over 2 x membership_candidates")
    seed: Seed = 0


class CalibrationSpec(Strict):
    """Spike-in calibration of the leak statistic (`reid-batch calibrate`)."""

    fractions: list[Annotated[float, Field(ge=0.0, le=1.0)]] = Field(
        [0.0, 0.01, 0.02, 0.05, 0.1], description="shares of the candidates replaced by images of member patients")
    ppa_fractions: list[Annotated[float, Field(ge=0.0, le=1.0)]] = Field(
        [0.0, 0.1, 0.25, 0.5], description="for targets attacked with ppa: shares of a pool as large as its kept "
        "samples replaced by images of member patients (a few dozen samples: larger shares than the study's)")
    seeds: Annotated[int, Field(ge=1)] = Field(5, description="repeats per non-zero fraction")
    null_seeds: Annotated[int, Field(ge=1)] = Field(20, description="repeats at fraction 0 (the false-positive rate)")
    detect_share: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        0.8, description="a fraction is detectable when L's interval excludes 0 in at least this share of its seeds")
    seed: Seed = 0

    @field_validator("fractions", "ppa_fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if 0.0 not in v:
            raise ValueError("fractions must include 0 (the false-positive rate)")
        if len(set(v)) != len(v):
            raise ValueError("fractions must not repeat")
        return sorted(v)


class ComputeSpec(Strict):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    tf32: bool = Field(True, description="on a CUDA GPU (Ampere or newer), float32 matrix products and convolutions "
                       "in TF32 (10-bit mantissa, several times the float32 rate); false for full float32. Part of "
                       "the sampling plan: a resumed shard keeps it")
    num_workers: NonNegativeInt = 0


class Manifest(Strict):
    version: int
    run_id: Slug
    output: OutputSpec
    data: DataSpec
    targets: Annotated[list[TargetSpec], Field(min_length=1)]
    generator: GeneratorSpec
    finetune: FinetuneSpec = FinetuneSpec()
    sampling: SamplingSpec = SamplingSpec()
    selection: SelectionSpec = SelectionSpec()
    ppa: PPASpec = PPASpec()
    demographics: DemographicsSpec
    reid: ReidSpec | None = None
    evaluation: EvaluationSpec = EvaluationSpec()
    calibration: CalibrationSpec = CalibrationSpec()
    compute: ComputeSpec = ComputeSpec()

    @field_validator("version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != MANIFEST_VERSION:
            raise ValueError(f"unsupported manifest version {v}; this reid-batch reads version {MANIFEST_VERSION}")
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> "Manifest":
        names = [t.name for t in self.targets]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"target names must be unique; repeated: {duplicates}")
        if self.data.synthetic is None and self.data.control is None:
            for t in self.targets:
                if t.train is not None and t.train.pool == "control":
                    raise ValueError(f"target {t.name!r} trains on the control pool but data.control is not given")
        for t in self.targets:
            if t.train is not None and t.train.preset == "identity" and self.data.synthetic is None:
                raise ValueError(f"target {t.name!r}: preset identity renders extra studies of its patients and "
                                 "needs data.synthetic")
            if t.train is not None and t.train.canaries is not None:
                # Imported here: the world's renderer (PIL, scipy.ndimage) stays off the path of every manifest
                # without canaries.
                from reid_batch.data.phantoms import CANARY_CAPACITY, canary_room

                pool = t.train.pool
                if self.data.synthetic is None or getattr(self.data, pool) is not None:
                    raise ValueError(f"target {t.name!r}: canaries are synthetic patients rendered into the world; "
                                     f"they need data.synthetic as the {pool} pool")
                most = canary_room(pool)
                if getattr(self.data.synthetic, f"{pool}_patients") > most:
                    raise ValueError(f"target {t.name!r}: with canaries, data.synthetic.{pool}_patients may be at "
                                     f"most {most} (the pool's last {CANARY_CAPACITY:,} ids are the canaries')")
        for t in self.targets:
            if t.baseline is not None and (t.baseline == t.name or t.baseline not in names):
                raise ValueError(f"target {t.name!r}: baseline {t.baseline!r} must name another target of this "
                                 f"manifest ({names})")
        critic = self.finetune.discriminator
        if critic is not None and critic.checkpoint is None and self.generator.checkpoint is not None:
            raise ValueError("finetune.discriminator needs a checkpoint: the prior comes from generator.checkpoint, "
                             "so no train-prior wrote a critic beside it")
        return self

    def source(self, pool: str) -> SourceSpec:
        """The data source for a pool; the synthetic world fills in any pool not given explicitly."""
        explicit = getattr(self.data, pool)
        if explicit is not None:
            return explicit
        if self.data.synthetic is None:
            raise InputError(f"no data source for the {pool} pool", f"data.{pool}")
        fmt = "nih" if pool == "public" else "chexpert"
        return SourceSpec(format=fmt, root=str(Path(self.data.synthetic.root) / pool))

    def target(self, name: str) -> TargetSpec:
        for t in self.targets:
            if t.name == name:
                return t
        raise InputError(f"no target named {name!r}; the manifest has {[t.name for t in self.targets]}", "--target")


# ------------------------------------------------------------------------------------------- loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys: PyYAML would silently keep the last one."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _location(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "<manifest>"


def _format_errors(source: str, error: ValidationError) -> str:
    lines = [f"{source}: invalid manifest ({error.error_count()} error(s))"]
    for e in error.errors(include_url=False):
        # pydantic adds the failing union branch / validator name to loc; they are noise to a user.
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {_location(loc)}: {msg}")
    return "\n".join(lines)


def parse_manifest(document: Any, source: str = "<manifest>") -> Manifest:
    """Validate an already-parsed YAML document (no file checks)."""
    if not isinstance(document, dict):
        raise InputError("a manifest must be a YAML mapping at the top level", source)
    try:
        return Manifest.model_validate(document)
    except ValidationError as e:
        raise InputError(_format_errors(source, e)) from None


def read_yaml(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError("manifest file not found", str(path)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read manifest: {e}", str(path)) from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise InputError(f"not valid YAML: {e}", str(path)) from None


def missing_files(manifest: Manifest) -> list[str]:
    """Field paths of every local input file or directory the manifest names that does not exist."""
    problems: list[str] = []

    def check(value: str | None, loc: str, kind: str = "file") -> None:
        if value is None or value.startswith("s3://"):
            return
        path = Path(value.removeprefix("file://"))
        ok = path.is_dir() if kind == "dir" else path.is_file()
        if not ok:
            problems.append(f"{loc}: {kind} not found: {value}")

    for name in ("private", "public", "control"):
        source = getattr(manifest.data, name)
        if source is not None:
            check(source.root, f"data.{name}.root", "dir")
    for i, t in enumerate(manifest.targets):
        check(t.checkpoint, f"targets[{i}].checkpoint")
        check(t.training_list, f"targets[{i}].training_list")
    check(manifest.generator.checkpoint, "generator.checkpoint")
    check(manifest.demographics.checkpoint, "demographics.checkpoint")
    if manifest.reid is not None:
        check(manifest.reid.checkpoint, "reid.checkpoint")
    check(manifest.evaluation.inception_weights, "evaluation.inception_weights")
    return problems


def load_manifest(path: str | os.PathLike, schema_only: bool = False) -> Manifest:
    """Read, validate and (unless schema_only) check that every named input exists. Raises InputError."""
    manifest = parse_manifest(read_yaml(path), str(path))
    if not schema_only:
        problems = missing_files(manifest)
        if problems:
            raise InputError("\n".join([f"{path}: missing input(s)"] + [f"  {p}" for p in problems]))
    return manifest


# Meanings for fields whose name alone does not say enough (docs/manifest.md's reference is generated from these).
FIELD_NOTES = {
    "version": f"manifest schema version; this reid-batch reads {MANIFEST_VERSION}",
    "run_id": "name of the run: letters, digits, '.', '_', '-'; outputs go to <output.uri>/<run_id>/",
    "output.s3.region": "bucket region (else from AWS_REGION / profile)",
    "output.s3.allow_bucket_creation": "create the bucket if missing (tests, private stores)",
    "output.s3.retry_max_attempts": "attempts per S3 request inside the AWS SDK (5xx, SlowDown, dropped connections)",
    "output.s3.retry_budget_s": "seconds each storage operation keeps retrying (exponential backoff, jitter) before the task fails with exit 1; 0 = SDK retries only",
    "data.synthetic.seed": "the world is a pure function of this seed and the counts",
    "data.synthetic.image_size": "side of the square images, in pixels",
    "data.synthetic.private_patients": "patients whose images train the target (the attack's victims)",
    "data.synthetic.public_patients": "patients of the public pool (prior and demographic model)",
    "data.synthetic.control_patients": "held-out patients, never trained on (membership baseline, control model)",
    "data.val_fraction": "share of patients held out for validation (patient-grouped split)",
    "data.split_seed": "seed of the patient-grouped train/validation split",
    "targets[].name": "short name used in output paths and the report",
    "targets[].arch": "torchvision architecture (reid_batch/archs.py): " + known_names(),
    "targets[].input.size": "side of the square input the target expects",
    "targets[].input.mean": "per-channel normalisation mean (images in [0, 1] before it)",
    "targets[].input.std": "per-channel normalisation std",
    "targets[].train.preset": "normal (best validation AUC), overfit (few images per class, to 100% train accuracy), or a mitigation: regularised, augmented, dp (Opacus DP-SGD, BatchNorm -> GroupNorm; ResNets), or the positive control identity (K patients as K classes; synthetic world)",
    "targets[].train.freeze_backbone": "train only the head (the study's overfit ViT); default trains the whole model",
    "targets[].objective.first_bn_multiplier": "extra weight on the first BatchNorm layer's term",
    "targets[].objective.feature_layer": "module path whose output the feature term reads (CNN)",
    "targets[].objective.layernorm_layers": "LayerNorm module paths for the ViT statistics term, or all",
    "targets[].objective.attention_blocks": "encoder blocks whose attention is recomputed for the attention terms, or all",
    "generator.depths": "channel depth per scale, from 4x4 up; resolution = 4 * 2^(len-1)",
    "generator.format": "checkpoint layout: segal (bare state_dict), segal_lightning, gan_zoo (pytorch_GAN_zoo), reid (ours), or auto",
    "generator.train.images_per_phase": "real images shown per fade-in and per stabilise phase of progressive growing",
    "finetune.checkpoint_every": "steps between atomic checkpoints (resume granularity)",
    "finetune.seed": "seed of the latent batches (reproducible, resumable)",
    "sampling.num_candidates": "candidates per target; ids 0..num_candidates-1",
    "sampling.batch_size": "candidates per forward pass, or auto (GPU: sized from free memory and a measured "
                           "per-candidate footprint, halved on out-of-memory, regrown after 16 good batches; CPU: "
                           "256, fewer for large images)",
    "sampling.num_shards": "array tasks; shard i owns a fixed contiguous id range",
    "sampling.seed": "candidate k's latent is a pure function of (seed, k)",
    "sampling.row_group_size": "Parquet row group size",
    "sampling.save_images": "also store PNGs (images are regenerable from ids anyway)",
    "sampling.compile": "torch.compile the generator (CUDA: worth it for long runs; costs a compile per process)",
    "selection.rule": "quantile: lowest q on both scores; top_k: best k by combined rank; absolute: fixed bounds",
    "selection.objective_quantile": "keep candidates whose objective total is in the lowest q",
    "selection.mahalanobis_quantile": "... and whose Mahalanobis distance is in the lowest q",
    "selection.mahalanobis.covariance": "diagonal (from running_var) or ledoit_wolf (shrinkage, from a reference set)",
    "demographics.arch": "densenet121 (the study) or densenet_tiny (tests)",
    "reid": "the re-identification embedding (`train-reid`, public pool only); omit to skip the stage",
    "reid.arch": "reid_small (a four-block CNN for small images, the demo) or a ResNet for study-sized images",
    "reid.width": "channels of reid_small's first block (doubled per block)",
    "reid.train.patients_per_batch": "patients per contrastive batch, two views each",
    "reid.train.temperature": "NT-Xent temperature of the cosine similarities",
    "reid.train.augment": "acquisition jitter strength (1 = +-5 degrees, +-4 % shift, +-5 % scale, gamma, contrast, noise)",
    "reid.train.max_patients": "train on a seeded sample of this many public patients",
    "reid.train.validate_every": "epochs between verification AUC / rank-1 measurements on held-out public patients",
    "demographics.num_shards": "array tasks for demographic scoring",
    "evaluation.pca_fit_on": "the ONE set the common PCA basis is fitted on",
    "evaluation.bootstrap": "bootstrap resamples for standard errors",
    "evaluation.membership_candidates": "raw candidates per generator for the leak statistic (fresh latent ids, none "
                                        "used in fine-tuning or sampling): a patient's score is its distance to the "
                                        "closest one",
    "calibration.seed": "seeds the spike positions, spiked patients and bootstrap of every repeat",
    "compute.device": "auto picks CUDA when present",
}


def reference_markdown() -> str:
    """The manifest field reference as a Markdown table, generated from the schema (docs/manifest.md embeds it)."""
    rows = ["| field | type | default | meaning |", "| --- | --- | --- | --- |"]

    def type_name(annotation: Any) -> str:
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if origin is typing.Annotated:
            return type_name(args[0])
        if origin is typing.Literal:
            return " \\| ".join(f"`{a!r}`" for a in args)
        if origin in (typing.Union, types.UnionType):
            return " \\| ".join(type_name(a) for a in args)
        if origin in (list, tuple, dict):
            return f"{origin.__name__}[{', '.join(type_name(a) for a in args if a is not Ellipsis)}]"
        if annotation is type(None):
            return "null"
        return getattr(annotation, "__name__", str(annotation))

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            path = f"{prefix}{name}"
            annotation = field.annotation
            nested = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type) and issubclass(a, BaseModel)]
            is_list = getattr(annotation, "__origin__", None) is list
            if field.default is PydanticUndefined:
                default = "**required**"
            elif isinstance(field.default, BaseModel):
                default = "(section)"
            else:
                default = f"`{field.default!r}`".replace("|", "\\|")
            note = FIELD_NOTES.get(path) or field.description or (nested[0].__doc__ or "" if nested else "")
            doc = note.strip().splitlines()
            kind = "section" if nested and not is_list else "list of sections" if nested else type_name(annotation)
            rows.append(f"| `{path}` | {kind} | {default} | {doc[0] if doc else ''} |")
            if nested:
                walk(nested[0], f"{path}[]." if is_list else f"{path}.")

    walk(Manifest, "")
    return "\n".join(rows)
