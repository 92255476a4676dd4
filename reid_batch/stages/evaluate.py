"""`reid-batch evaluate`: what the attack recovered, per target, measured against the data it was run on.

Everything here but stage 1's generator metrics is VALIDATION ONLY: it uses the target's training images (and, on
the synthetic world, who the patients are), which an attacker holding only the parameters would not have. The
phases live in reid_batch.evaluation, one module each; what they measure and why: docs/method.md.

Output, committed once per target: `<target>/evaluation/` metrics.json, evaluation.parquet (one row per likely
sample), records.parquet and leak_candidates.parquet (the leak statistic's inputs, which report and calibrate
read), figures/ and pairs/<id:09d>.png. A committed evaluation is left as it is; delete it to evaluate again.
"""

from __future__ import annotations

import numpy as np

from reid_batch import log
from reid_batch.analysis.roles import OTHER_POOL, train_pool
from reid_batch.artifacts import load_finetuned_generator, require_committed, require_ppa_shards
from reid_batch.errors import InputError
from reid_batch.evaluation import controls
from reid_batch.evaluation.likely import likely_samples, neighbours_and_demographics
from reid_batch.evaluation.membership import leak_candidates_bytes, measure_leak
from reid_batch.evaluation.outputs import metrics_document, write_outputs
from reid_batch.evaluation.ppa import attacks_summary, ppa_attack
from reid_batch.evaluation.reidentify import reidentify
from reid_batch.evaluation.shared import Shared, TargetRun
from reid_batch.evaluation.stage1 import stage1_metrics, stage1_sets
from reid_batch.formats import clean_json
from reid_batch.layout import (FIGURES, LEAK_CANDIDATES_FILE, LEAK_ID_OFFSET, METRICS_FILE, evaluation_prefix,
                               finetune_prefix, scores_prefix, selection_prefix)
from reid_batch.manifest import Manifest, TargetSpec
from reid_batch.results import Evaluation, read, record_of
from reid_batch.runtime import pick_device, run_single_writer, run_store


def evaluate(manifest: Manifest, target: str | None = None) -> int:
    """`reid-batch evaluate`: metrics for one target (None = every target), one commit per target."""
    shared = Shared()
    return run_single_writer(manifest, target, lambda spec: evaluate_target(manifest, spec, shared))


def evaluate_target(manifest: Manifest, spec: TargetSpec, shared: Shared) -> Evaluation:
    """Evaluate one target, phase by phase, then commit everything at once."""
    store = run_store(manifest)
    prefix = evaluation_prefix(spec.name)
    if store.is_committed(prefix):
        log.event("evaluate_skipped", target=spec.name, reason="already committed")
        return read(Evaluation, store, f"{prefix}/{METRICS_FILE}")
    require_inputs(store, manifest, spec)
    device = pick_device(manifest)
    finetuned = load_finetuned_generator(manifest, spec.name).to(device).eval()
    run = TargetRun(manifest, spec, shared, device, space=shared.feature_space(manifest, device),
                    resolution=finetuned.config.resolution)
    sizer = shared.generation_sizer(manifest, device, run.resolution)

    # Stage 1: the prior's and the fine-tuned generator's images beside the training images.
    sets, training, origin, on_error = stage1_sets(run, finetuned)
    stage1, kurtosis_png = stage1_metrics(run, sets)

    # Stage 2: the likely samples, their nearest training images, their demographics, the sample vote.
    likely = likely_samples(store, run, finetuned, sizer)
    neighbours, stage2, demographics = neighbours_and_demographics(run, likely, training, origin, on_error)
    reid = reidentify(run, training, OTHER_POOL[train_pool(spec)], likely)

    # The leak statistic: the study's raw candidates, then the ppa attack's kept samples, against the prior.
    leak, leak_tables, raw = measure_leak(run, finetuned)
    raw_features = raw.features if raw is not None else None
    attacked = ppa_attack(store, run, raw)
    if raw is not None:
        leak_tables[LEAK_CANDIDATES_FILE] = leak_candidates_bytes(
            LEAK_ID_OFFSET + np.arange(len(raw.features), dtype=np.int64), raw.features,
            shared.prior_candidate_features, attacked.ids if attacked is not None else None,
            attacked.features if attacked is not None else None)

    # Positive controls, on targets built to leak.
    identity = controls.identity(run, likely, raw_features, finetuned.config.latent_dim, attacked)
    canaries = controls.canaries(run, likely, raw_features, attacked)

    metrics = metrics_document(store, run, likely, stage1=stage1, stage2=stage2, demographics=demographics,
                               reid=reid, leak=leak)
    metrics["attacks"] = clean_json(attacks_summary(leak, attacked))
    if attacked is not None:
        leak_tables[FIGURES["ppa_samples"]] = attacked.figure
    if identity is not None:
        metrics["identity_control"] = clean_json(identity)
    if canaries is not None:
        metrics["canaries"] = clean_json(canaries)
    if manifest.evaluation.population_shift:
        metrics["population_shift"] = clean_json(controls.population_shift(
            run, finetuned, raw.demographics if raw is not None else None))
    evaluation = record_of(Evaluation, metrics, where=store.uri(f"{prefix}/{METRICS_FILE}"))
    write_outputs(store, run, evaluation, likely, neighbours=neighbours, sets=sets, kurtosis_png=kurtosis_png,
                  leak_tables=leak_tables)
    raw_leak = leak.get("raw", {}).get("vs_prior", {})
    log.event("evaluate_done", target=spec.name, likely=len(likely.ids), ssim_mean=stage2.get("ssim_mean"),
              reid_rate=reid.get("rate"), leak_vs_prior=raw_leak.get("leak"), leak_ci=raw_leak.get("ci"))
    return evaluation


def require_inputs(store, manifest: Manifest, spec: TargetSpec) -> None:
    """Every input evaluate reads is committed, or a clear error naming the stage to run."""
    require_committed(store, finetune_prefix(spec.name), f"finetune --target {spec.name}")
    require_committed(store, selection_prefix(spec.name), f"select --target {spec.name}")
    missing = [i for i in range(manifest.demographics.num_shards)
               if not store.is_committed(scores_prefix(spec.name, i))]
    if missing:
        raise InputError(f"score shard(s) {missing} are not committed; run `reid-batch score --target {spec.name}`",
                         where=store.uri(f"{spec.name}/scores"))
    require_ppa_shards(store, manifest, spec)
