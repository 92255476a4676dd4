"""Where every stage's outputs live under <output.uri>/<run_id>/, and how later stages load them.

One place, so that stages (and array tasks on different machines) agree on keys:

    world/ ............................ (local, data.synthetic.root) the synthetic world
    targets/<name>/ ................... trained target: model.safetensors, training.json, train_images.csv
    prior/ ............................ trained PGGAN prior: generator.safetensors, samples.png, metrics.json
    demographics/ ..................... age/sex model: model.safetensors, metrics.json, plots
    <target>/finetune/ ................ stage 1 result: generator.safetensors, losses.parquet, samples PNGs
    <target>/finetune-checkpoints/ .... resumable stage 1 state, one committed prefix per checkpoint
    <target>/candidates/shard=<I>/ .... per-candidate rows (Parquet), committed per chunk
    <target>/selection/ ............... stage 2: selected ids, thresholds
    <target>/scores/shard=<I>/ ........ demographic predictions of the selected candidates (+ PNGs)
    evaluation/, report/ .............. metrics and the risk report
    resume/ ........................... in-progress training state (deleted once a stage commits)

Every multi-file output is a committed prefix (see storage.py): readers treat an uncommitted one as absent.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from reid_batch.errors import InputError
from reid_batch.manifest import Manifest, TargetSpec


def target_prefix(name: str) -> str:
    return f"targets/{name}"


def attack_prefix(target: str, part: str) -> str:
    """<target>/<part>: finetune, finetune-checkpoints, candidates, selection, scores."""
    return f"{target}/{part}"


def run_store(manifest: Manifest):
    from reid_batch.recipes.common import run_store as _run_store

    return _run_store(manifest)


def local_file(store, key: str, suffix: str = "") -> Path:
    """A local path holding the object's bytes (the object itself when the store is local)."""
    if store.is_local:
        return Path(store.path(key))
    handle, name = tempfile.mkstemp(prefix="reid-batch-", suffix=suffix)
    with os.fdopen(handle, "wb") as out:
        out.write(store.read_bytes(key))
    return Path(name)


def require_committed(store, prefix: str, produced_by: str) -> None:
    if not store.is_committed(prefix):
        raise InputError(f"{store.uri(prefix)} is missing or incomplete; run `reid-batch {produced_by}` first", prefix)


def load_attack_target(manifest: Manifest, spec: TargetSpec):
    """The frozen target (eval mode, no parameter gradients) and its number of outputs."""
    from reid_batch.models.targets import load_target

    vit = spec.vit.model_dump() if spec.vit is not None else {}
    if spec.checkpoint is not None:
        return load_target(spec.arch, spec.checkpoint, image_size=spec.input.size, **vit)
    store = run_store(manifest)
    prefix = target_prefix(spec.name)
    require_committed(store, prefix, f"train-target --target {spec.name}")
    return load_target(spec.arch, local_file(store, f"{prefix}/model.safetensors", ".safetensors"),
                       image_size=spec.input.size, **vit)


def load_demographic_model(manifest: Manifest):
    from reid_batch.models.demographics import load_demographics

    spec = manifest.demographics
    arch = {"arch": "densenet121", "growth_rate": 8, "block_config": (2, 2, 2, 2), "num_init_features": 16} \
        if spec.arch == "densenet_tiny" else {"arch": spec.arch}
    if spec.checkpoint is not None:
        return load_demographics(spec.checkpoint, **arch)
    store = run_store(manifest)
    require_committed(store, "demographics", "train-demographics")
    return load_demographics(local_file(store, "demographics/model.safetensors", ".safetensors"), **arch)


def load_finetuned_generator(manifest: Manifest, target: str):
    """Stage 1's generator for a target (eval mode, CPU)."""
    from reid_batch.models.pggan import load_generator

    store = run_store(manifest)
    prefix = attack_prefix(target, "finetune")
    require_committed(store, prefix, f"finetune --target {target}")
    generator, _ = load_generator(local_file(store, f"{prefix}/generator.safetensors", ".safetensors"), format="reid")
    return generator
