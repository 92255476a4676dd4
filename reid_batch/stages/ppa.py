"""The ppa attack: per-sample latent optimisation toward each class, beside the study's two stages, because a
per-sample attack can pull a candidate toward one patient where stage 1's distribution does not.

For each target that lists `ppa` in `attacks`, every class c of the target is attacked on its own
(reid_batch.attack.ppa.attack_class): `ppa.search` latents (ids layout.ppa_search_ids(c), latent = a pure function
of (ppa.seed, id)) are ranked by the target's confidence for c over random views, the `ppa.optimise` best are
optimised (Adam on the latents; the generator and the target stay frozen) and the `ppa.keep` most confident are
kept. The generator is the prior (default) or stage 1's fine-tuned one (`ppa.generator`).

Shards, resume, plan
--------------------
The stage runs as an array task beside `sample` (the cluster plan's sample job runs `ppa` then `sample` in each
task): shard i of `sampling.num_shards` attacks classes i, i + num_shards, ... (layout.ppa_shard_classes). Each
class is committed on its own:

    <target>/ppa/shard=<i>/class=<c>/kept.parquet + _COMMITTED
    <target>/ppa/shard=<i>/_SHARD.json ............ written last: the shard is complete

so a task killed (or pre-empted: SIGTERM finishes the class in progress) keeps its finished classes and a re-run
redoes only the others; every class's result is a pure function of the plan (counter-based random streams keyed by
id and step), so resuming gives what never stopping gives. The plan (the target's section, the ppa section, the
generator's commit, the device) is stored with every commit; a re-run against another plan is refused (exit 2).

Rows (kept.parquet, best first): id (int64, the searched latent's id), class (int32), rank (int32, 0 = most
confident), confidence (float32, mean softmax probability of the class over ppa.final_views random views after
optimisation), searched_confidence (float32, the same latent's confidence over ppa.search_views views before),
latent (fixed-size list of float32: the optimised latent; the image is the generator's output for it, in [0, 1]).
A one-logit binary target is attacked as two classes (logits [-l/2, l/2]: softmax = sigmoid).
"""

from __future__ import annotations

import json
import time
from dataclasses import fields

import numpy as np
import pyarrow as pa
import torch

from reid_batch import log, preemption
from reid_batch.artifacts import finetune_identity, load_attack_target, load_finetuned_generator, load_prior
from reid_batch.attack import ppa
from reid_batch.attack.generation import target_input_spec
from reid_batch.attack.objectives import TargetObjective
from reid_batch.errors import InputError, require_same_plan
from reid_batch.formats import feature_column, parquet_bytes
from reid_batch.layout import (PPA_FILE, PRIOR_PREFIX, SUMMARY_FILE, ppa_class_prefix, ppa_search_ids,
                               ppa_shard_classes, ppa_shard_prefix)
from reid_batch.manifest import Manifest, TargetSpec
from reid_batch.models.pggan import generator_to_unit
from reid_batch.models.targets import to_target_input
from reid_batch.runtime import check_shard, chosen_targets, pick_device, run_store

PLAN_FORMAT = 1


def settings_of(manifest: Manifest) -> ppa.PPASettings:
    spec = manifest.ppa
    return ppa.PPASettings(**{f.name: getattr(spec, f.name) for f in fields(ppa.PPASettings)})


def attack_classes(outputs: int) -> int:
    """Classes of a target with `outputs` logits: a one-logit binary target has two."""
    return 2 if outputs == 1 else outputs


def generator_identity(manifest: Manifest, target: str) -> dict:
    """What identifies the attacked generator: stage 1's commit, the prior's commit, or the prior's file."""
    store = run_store(manifest)
    if manifest.ppa.generator == "finetuned":
        return {"finetuned": finetune_identity(store, target)}
    if manifest.generator.checkpoint is not None:
        return {"checkpoint": manifest.generator.checkpoint}
    if not store.is_committed(PRIOR_PREFIX):
        raise InputError(f"{store.uri(PRIOR_PREFIX)} is not committed: run train-prior first", where="ppa.generator")
    marker = store.read_commit(PRIOR_PREFIX)
    return {"prior": {"created": marker.get("created"), "files": marker.get("files")}}


def shard_plan(manifest: Manifest, spec: TargetSpec, shard: int, classes: int, device: torch.device) -> dict:
    # Not the batch size: a latent's path does not depend on its group, so a task resumed with a smaller one (after
    # an out-of-memory error) continues the same attack.
    plan = {"format": PLAN_FORMAT, "target": spec.plan_dump(),
            "ppa": manifest.ppa.model_dump(mode="json", exclude={"batch_size"}),
            "num_shards": manifest.sampling.num_shards, "shard": shard, "classes": classes,
            "generator": generator_identity(manifest, spec.name),
            "compute": {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type}}
    return json.loads(json.dumps(plan))  # the form it takes once stored, so comparisons are exact


def _check_plan(found: dict | None, plan: dict, uri: str) -> None:
    if found is not None and isinstance(found.get("ppa"), dict):
        # Plans committed before the batch size left them still hold it; it never changed a result.
        found = {**found, "ppa": {k: v for k, v in found["ppa"].items() if k != "batch_size"}}
    require_same_plan(found, plan, uri, "ppa results", "use a new run_id, or delete that target's ppa/ "
                      "(and evaluation/) to attack again")


def kept_table(result: ppa.PPAResult, cls: int) -> pa.Table:
    count = len(result.ids)
    return pa.table({
        "id": pa.array(np.asarray(result.ids, np.int64)),
        "class": pa.array(np.full(count, cls, np.int32)),
        "rank": pa.array(np.arange(count, dtype=np.int32)),
        "confidence": pa.array(result.confidence.numpy().astype(np.float32)),
        "searched_confidence": pa.array(result.searched_confidence.numpy().astype(np.float32)),
        "latent": feature_column(result.latents.numpy()),
    })


class AttackedModels:
    """The generator (latents -> [0, 1] images) and the target (images -> logits, or (logits, per-sample BatchNorm
    term)) the attack differentiates through, both frozen."""

    def __init__(self, manifest: Manifest, spec: TargetSpec, device: torch.device) -> None:
        settings = manifest.ppa
        generator = load_finetuned_generator(manifest, spec.name) if settings.generator == "finetuned" \
            else load_prior(manifest)
        self.generator = generator.to(device).eval().requires_grad_(False)
        self.latent_dim = generator.config.latent_dim
        self._range = tuple(generator.config.output_range)
        model, outputs = load_attack_target(manifest, spec)
        self.model = model.to(device).eval().requires_grad_(False)
        self.classes = attack_classes(outputs)
        self._binary = outputs == 1
        self._input = target_input_spec(spec)
        self._bn = settings.bn_stats
        self.objective = TargetObjective(self.model, {"bn_stats": 1.0}, spec.objective,
                                         field_prefix="ppa.bn_stats") if self._bn > 0 else None
        # One pair of batch sizers for every class of the target: what `auto` learns on one class serves the next.
        self.sizers = ppa.Sizers.of(settings.batch_size, device, settings.search)

    def generate(self, latents: torch.Tensor) -> torch.Tensor:
        return generator_to_unit(self.generator(latents), self._range)

    def _logits(self, logits: torch.Tensor) -> torch.Tensor:
        # Two classes with the same softmax as sigmoid(l): [-l/2, l/2], not [0, l], whose L1-normalised form would
        # sit on the Poincare loss's boundary.
        return torch.cat([-logits / 2, logits / 2], dim=1) if self._binary else logits

    def target(self, images01: torch.Tensor):
        inputs = to_target_input(images01, self._input, check_range=False)
        if self.objective is None:
            return self._logits(self.model(inputs))
        result = self.objective(inputs)
        return self._logits(result.logits), self._bn * result.per_sample["bn_stats"]

    def close(self) -> None:
        if self.objective is not None:
            self.objective.close()


@preemption.deferred  # SIGTERM: the class in progress is finished and committed, then the task stops
def _attack_shard(manifest: Manifest, spec: TargetSpec, shard: int, *, plan: dict, pending: list[int],
                  models: AttackedModels, device: torch.device) -> None:
    store = run_store(manifest)
    settings = settings_of(manifest)
    for cls in log.progress(pending, desc=f"ppa {spec.name} shard {shard}", total=len(pending)):
        preemption.check(f"ppa {spec.name} shard {shard} class {cls}")
        started = time.perf_counter()
        result = ppa.attack_class(models.generate, models.target, cls,
                                  np.asarray(ppa_search_ids(cls, settings.search), np.int64), models.latent_dim,
                                  settings, seed=manifest.ppa.seed, device=device, batch_size=models.sizers)
        with store.committed(ppa_class_prefix(spec.name, shard, cls), {"plan": plan, "class": cls}) as staging:
            staging.write_bytes(PPA_FILE, parquet_bytes(kept_table(result, cls)))
        log.event("ppa_class_committed", target=spec.name, shard=shard, cls=cls, kept=len(result.ids),
                  confidence=round(float(result.confidence.mean()), 4),
                  searched_confidence=round(float(result.searched_confidence.mean()), 4),
                  seconds=round(time.perf_counter() - started, 2))


def attack_target(manifest: Manifest, spec: TargetSpec, shards: list[int], device: torch.device) -> None:
    if "ppa" not in spec.attacks:
        log.event("ppa_skipped", target=spec.name, reason="ppa is not in the target's attacks")
        return
    store = run_store(manifest)
    models = None
    try:
        for shard in shards:
            summary_key = f"{ppa_shard_prefix(spec.name, shard)}/{SUMMARY_FILE}"
            if models is None and not store.exists(summary_key):
                models = AttackedModels(manifest, spec, device)
            classes = models.classes if models is not None else store.read_json(summary_key)["plan"]["classes"]
            plan = shard_plan(manifest, spec, shard, classes, device)
            if store.exists(summary_key):
                _check_plan(store.read_json(summary_key).get("plan"), plan, store.uri(summary_key))
                log.event("ppa_shard_skipped", target=spec.name, shard=shard, reason="already complete")
                continue
            mine = ppa_shard_classes(classes, manifest.sampling.num_shards, shard)
            pending = []
            for cls in mine:
                prefix = ppa_class_prefix(spec.name, shard, cls)
                if store.is_committed(prefix):
                    _check_plan(store.read_commit(prefix).get("metadata", {}).get("plan"), plan, store.uri(prefix))
                else:
                    pending.append(cls)
            log.event("ppa_shard_start", target=spec.name, shard=shard, classes=mine,
                      already_committed=len(mine) - len(pending), generator=manifest.ppa.generator)
            started = time.perf_counter()
            _attack_shard(manifest, spec, shard, plan=plan, pending=pending, models=models, device=device)
            store.write_json(summary_key, {
                "plan": plan, "classes": mine, "kept_per_class": manifest.ppa.keep,
                "files": [f"{ppa_class_prefix(spec.name, shard, c)}/{PPA_FILE}" for c in mine],
                "last_run": {"classes": len(pending), "seconds": round(time.perf_counter() - started, 3),
                             "device": str(device)}})
            log.event("ppa_shard_done", target=spec.name, shard=shard, classes=len(mine), attacked=len(pending))
    finally:
        if models is not None:
            models.close()


def run(manifest: Manifest, target: str | None = None, shard: int | None = None) -> int:
    """`reid-batch ppa`: the given shard (None = every shard in turn) of each target (None = all) listing ppa."""
    shards = check_shard(shard, manifest.sampling.num_shards)
    specs = chosen_targets(manifest, target)
    if not any("ppa" in spec.attacks for spec in specs):
        log.event("ppa_skipped", reason="no chosen target lists ppa in its attacks")
        return 0
    device = pick_device(manifest)
    for spec in specs:
        attack_target(manifest, spec, shards, device)
    return 0
