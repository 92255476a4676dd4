"""What a stage reads of earlier stages' committed outputs, and of the models the manifest names: one loader each.

Where each output lives is reid_batch.layout's business; this module loads it. A stage never imports another
stage: what it needs of one is here (models) or in the layout (keys). Every multi-file output is a committed
prefix (storage.COMMIT_MARKER): an uncommitted one is missing, and the error names the command that makes it.
Model files a manifest names may be local paths or s3:// objects (storage.input_path fetches those once).
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
from torch import nn

from reid_batch import layout
from reid_batch.errors import InputError
from reid_batch.manifest import Manifest, TargetSpec
from reid_batch.models.demographics import DemographicNet, load_demographics
from reid_batch.models.pggan import (PGGANConfig, PGGANDiscriminator, PGGANGenerator, load_discriminator,
                                     load_generator)
from reid_batch.models.reid import ReidNet, load_reid
from reid_batch.models.targets import load_target
from reid_batch.storage import Store, input_path, run_store

# The manifest's name for a format where it differs from pggan's.
FORMAT_ALIASES = {"lightning": "segal_lightning"}
DENSENET_TINY = {"arch": "densenet121", "growth_rate": 8, "block_config": (2, 2, 2, 2), "num_init_features": 16}


@contextmanager
def local_file(store: Store, key: str, suffix: str = "") -> Iterator[Path]:
    """A local path holding the object's bytes while the block runs (the object itself when the store is local).
    A temporary copy of an s3:// object is removed on leaving: loaders read it whole, and every array task loading
    a model from S3 would otherwise leave one more model-sized file in the node's /tmp."""
    if store.is_local:
        yield Path(store.path(key))
        return
    handle, name = tempfile.mkstemp(prefix="reid-batch-", suffix=suffix)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(store.read_bytes(key))
        yield Path(name)
    finally:
        os.unlink(name)


def require_committed(store: Store, prefix: str, produced_by: str) -> None:
    if not store.is_committed(prefix):
        raise InputError(f"{store.uri(prefix)} is missing or incomplete; run `reid-batch {produced_by}` first", prefix)


# ------------------------------------------------------------------------------------------------ models


def load_attack_target(manifest: Manifest, spec: TargetSpec) -> tuple[nn.Module, int]:
    """The frozen target (eval mode, no parameter gradients) and its number of outputs."""
    vit = spec.vit.model_dump() if spec.vit is not None else {}
    if spec.checkpoint is not None:
        where = f"targets[{manifest.targets.index(spec)}].checkpoint"
        return load_target(spec.arch, input_path(spec.checkpoint, manifest, where), image_size=spec.input.size, **vit)
    store = run_store(manifest)
    prefix = layout.target_prefix(spec.name)
    require_committed(store, prefix, f"train-target --target {spec.name}")
    with local_file(store, f"{prefix}/{layout.MODEL_FILE}", ".safetensors") as path:
        return load_target(spec.arch, path, image_size=spec.input.size, **vit)


def demographic_arch(arch: str) -> dict:
    """The DenseNet settings of `demographics.arch` (densenet_tiny: a small DenseNet121 for tests and the demo)."""
    return dict(DENSENET_TINY) if arch == "densenet_tiny" else {"arch": arch}


def load_demographic_model(manifest: Manifest) -> DemographicNet:
    spec = manifest.demographics
    arch = demographic_arch(spec.arch)
    if spec.checkpoint is not None:
        return load_demographics(input_path(spec.checkpoint, manifest, "demographics.checkpoint"), **arch)
    store = run_store(manifest)
    require_committed(store, layout.DEMOGRAPHICS_PREFIX, "train-demographics")
    with local_file(store, f"{layout.DEMOGRAPHICS_PREFIX}/{layout.MODEL_FILE}", ".safetensors") as path:
        return load_demographics(path, **arch)


def load_reid_model(manifest: Manifest) -> ReidNet | None:
    """The re-identification embedding (eval mode, CPU): reid.checkpoint, or what train-reid committed; None when
    the manifest has no reid section."""
    spec = manifest.reid
    if spec is None:
        return None
    if spec.checkpoint is not None:
        return load_reid(input_path(spec.checkpoint, manifest, "reid.checkpoint"), spec.arch, spec.embedding_dim,
                         spec.width)
    store = run_store(manifest)
    require_committed(store, layout.REID_PREFIX, "train-reid")
    with local_file(store, f"{layout.REID_PREFIX}/{layout.MODEL_FILE}", ".safetensors") as path:
        return load_reid(path, spec.arch, spec.embedding_dim, spec.width)


def load_finetuned_generator(manifest: Manifest, target: str) -> PGGANGenerator:
    """Stage 1's generator for a target (eval mode, CPU)."""
    store = run_store(manifest)
    prefix = layout.finetune_prefix(target)
    require_committed(store, prefix, f"finetune --target {target}")
    with local_file(store, f"{prefix}/{layout.GENERATOR_FILE}", ".safetensors") as path:
        generator, _ = load_generator(path, format="reid")
    return generator


def load_prior_discriminator(manifest: Manifest) -> PGGANDiscriminator:
    """The critic of fine-tuning's `discriminator` term (frozen, eval mode, CPU): finetune.discriminator.checkpoint,
    or the one train-prior committed beside the prior."""
    spec = manifest.finetune.discriminator
    if spec is not None and spec.checkpoint is not None:
        return load_discriminator(input_path(spec.checkpoint, manifest, "finetune.discriminator.checkpoint"))
    store = run_store(manifest)
    require_committed(store, layout.PRIOR_PREFIX, "train-prior")
    key = f"{layout.PRIOR_PREFIX}/{layout.DISCRIMINATOR_FILE}"
    if not store.exists(key):
        raise InputError(f"{store.uri(key)} is missing: the prior was trained before train-prior kept its critic; "
                         "retrain it or give finetune.discriminator.checkpoint", where="finetune.discriminator")
    with local_file(store, key, ".safetensors") as path:
        return load_discriminator(path)


def prior_config(manifest: Manifest) -> PGGANConfig:
    """The PGGAN the manifest's `generator` section describes (what train-prior trains)."""
    spec = manifest.generator
    return PGGANConfig(latent_dim=spec.latent_dim, depths=tuple(spec.depths), out_channels=spec.out_channels,
                       output_range=tuple(spec.output_range), variant="segal", output_activation="none")


def _given(spec, name: str) -> bool:
    """Whether the manifest sets `name` to something other than its default. Not model_fields_set: a manifest
    re-parsed from model_dump() (the CLI's --output) has every field set."""
    value = getattr(spec, name)
    default = type(spec).model_fields[name].default
    return (list(value) if isinstance(value, (list, tuple)) else value) != (
        list(default) if isinstance(default, (list, tuple)) else default)


def load_prior(manifest: Manifest) -> PGGANGenerator:
    """The prior later stages start from, in eval mode on CPU.

    With `generator.checkpoint`: that file, read by pggan.load_generator in the manifest's format ("lightning"
    is accepted for pggan's "segal_lightning"); an output_range written in the manifest overrides the format's
    declared one, the default [0, 1] does not (gan_zoo files are [-1, 1]); latent_dim, depths and out_channels
    come from the weights and must match the manifest's where it gives non-default values.
    Otherwise <run>/prior/generator.safetensors.
    """
    spec = manifest.generator
    if spec.checkpoint is not None:
        fmt = FORMAT_ALIASES.get(spec.format, spec.format)
        override = tuple(spec.output_range) if _given(spec, "output_range") else None
        path = input_path(spec.checkpoint, manifest, "generator.checkpoint")
        generator, config = load_generator(path, fmt, output_range=override)
        mismatched = [f"{name}: manifest {want}, checkpoint {have}" for name, want, have in (
            ("latent_dim", spec.latent_dim, config.latent_dim),
            ("depths", list(spec.depths), list(config.depths)),
            ("out_channels", spec.out_channels, config.out_channels)) if _given(spec, name) and want != have]
        if mismatched:
            raise InputError("the checkpoint's architecture differs from the manifest: " + "; ".join(mismatched),
                             where="generator.checkpoint")
        return generator
    store = run_store(manifest)
    if not store.is_committed(layout.PRIOR_PREFIX):
        raise InputError(f"no trained prior at {store.uri(layout.PRIOR_PREFIX)}: run train-prior first",
                         where="generator")
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, layout.GENERATOR_FILE)
        with open(path, "wb") as handle:
            handle.write(store.read_bytes(f"{layout.PRIOR_PREFIX}/{layout.GENERATOR_FILE}"))
        generator, _ = load_generator(path, "reid")
    return generator


# ------------------------------------------------------------------------------------------------ attack outputs


def finetune_identity(store: Store, target: str) -> dict:
    """What identifies stage 1's result: its commit marker's time and file sizes."""
    prefix = layout.finetune_prefix(target)
    require_committed(store, prefix, f"finetune --target {target}")
    marker = store.read_commit(prefix)
    return {"created": marker.get("created"), "files": marker.get("files")}


def read_shard_summaries(store: Store, target: str, num_shards: int) -> tuple[dict[int, dict], list[int]]:
    """({shard: its _SHARD.json}, [shards without one]) for a target."""
    summaries, missing = {}, []
    for shard in range(num_shards):
        key = f"{layout.shard_prefix(target, shard)}/{layout.SUMMARY_FILE}"
        if store.exists(key):
            summaries[shard] = store.read_json(key)
        else:
            missing.append(shard)
    return summaries, missing


def selected_ids(store: Store, target: str) -> np.ndarray:
    """The ids `select` kept for a target, sorted."""
    prefix = layout.selection_prefix(target)
    require_committed(store, prefix, f"select --target {target}")
    table = store.read_parquet(f"{prefix}/{layout.SELECTION_FILE}", columns=["id"])
    return np.sort(table.column("id").to_numpy())


def require_ppa_shards(store: Store, manifest: Manifest, spec: TargetSpec) -> list[str]:
    """The _SHARD.json keys of a target's ppa attack (none if it does not list ppa); a missing one is an error that
    names the command to run: evaluate must not score a partial attack."""
    if "ppa" not in spec.attacks:
        return []
    keys = [f"{layout.ppa_shard_prefix(spec.name, shard)}/{layout.SUMMARY_FILE}"
            for shard in range(manifest.sampling.num_shards)]
    missing = [shard for shard, key in enumerate(keys) if not store.exists(key)]
    if missing:
        raise InputError(f"ppa shard(s) {missing} are not complete; run `reid-batch ppa --target {spec.name}`",
                         where=store.uri(f"{layout.ppa_shard_prefix(spec.name, missing[0])}/{layout.SUMMARY_FILE}"))
    return keys


def read_ppa_kept(store: Store, manifest: Manifest, spec: TargetSpec) -> "pa.Table | None":
    """Every kept row of a target's ppa attack, by (class, rank); None if the target does not list ppa (or no
    shard attacked a class)."""
    if "ppa" not in spec.attacks:
        return None
    tables = [store.read_parquet(key) for summary_key in require_ppa_shards(store, manifest, spec)
              for key in store.read_json(summary_key)["files"]]
    if not tables:
        return None
    table = pa.concat_tables(tables)
    order = np.lexsort((table["rank"].to_numpy(), table["class"].to_numpy()))
    return table.take(pa.array(order))
