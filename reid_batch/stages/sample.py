"""Stage 2, sampling: every candidate id -> one row of statistics, sharded, chunked, resumable, streamed to Parquet.

Ids, shards, chunks
-------------------
Candidate k (0 <= k < sampling.num_candidates) has the latent `latents_for_ids(sampling.seed, [k], latent_dim)`, a
pure function of (seed, k), and its image is the FINE-TUNED generator's output for it; any stage can regenerate
it from k alone. Shard i of `sampling.num_shards` owns the contiguous ids [start_i, stop_i) of
`numpy.array_split` (the first num_candidates % num_shards shards hold one id more): shards never overlap and
together cover every id, whatever machine runs them. Within a shard the ids go in chunks of
`sampling.chunk_size`; chunk j is one Parquet file committed on its own (storage's commit marker):

    <target>/candidates/shard=<i>/chunk=<j>/candidates.parquet + _COMMITTED
    <target>/candidates/shard=<i>/_SHARD.json ........ written last: the shard is complete
    <target>/candidates-images/shard=<i>/<id>.png ...... only with sampling.save_images

A shard killed at any moment keeps its committed chunks; re-run, it redoes only the others, so it ends with
exactly its ids, none twice. `_SHARD.json` (one atomic object, written after every chunk is committed) is the
shard-level marker: a re-run that finds it, for the same plan, returns at once and writes nothing. Each chunk's
commit metadata and the summary carry the PLAN (seed, counts, chunk size, the target's manifest section, the
Mahalanobis settings, the identity of the fine-tuned generator's commit): resuming or re-running against outputs
of a different plan is refused (InputError), because mixing them would silently corrupt the statistics.

Processes and batches
---------------------
Under Accelerate, every process of a task takes a contiguous part of each chunk's ids
(`split_between_processes`); the main process gathers the rows (rank order = id order), writes and commits the
chunk, and all processes then move to the next chunk together. Forward passes run under `torch.inference_mode()`,
with autocast (bf16 or fp16, `sampling.mixed_precision`) on CUDA for the TARGET only: the generator renders
in float32 in every stage (generation.regenerate_images), so sample, score and evaluate see the same images;
statistics are always computed in float32 or float64. `sampling.batch_size: auto` is 256 on a CPU (fewer for
large images); on CUDA a probe batch of 8 measures one candidate's peak memory and the size is the largest power of
two (at most 4096, and no more than a process's share of a chunk) that fills 80 % of the free memory; it halves on
every out-of-memory error until a batch fits, and grows back after a run of good batches (generation.BatchSizer).
Memory stays flat: only one chunk's rows (and no images) are ever held.

Row schema (one row per candidate; float32 unless noted)
--------------------------------------------------------
id (int64), shard (int32), class (int32: the class the target predicts, which the `logits` term measures
against); one-logit binary targets: logit, probability (sigmoid, P(class 1)); C > 1 classes: logit_<k> and
probability_<k> (softmax) per class; term_<name>: the UNWEIGHTED per-sample value of every objective term of
fine-tuning (same definitions, reid_batch.attack.objectives) EXCEPT `tv` (as in the study: smoothness says nothing about
membership); objective_total: their sum weighted with fine-tuning's weights; mahalanobis (float64; see
reid_batch.attack.mahalanobis); image_mean, image_std, pixel_entropy (Shannon entropy in bits of the
256-level grey histogram, analysis.metrics.pixel_entropy_on_device: the one definition evaluation uses too).

Reference statistics
--------------------
ViT targets need reference statistics (objective terms, CLS Gaussian): stage 1's, through
`attack.reference.reference_stats` (its fingerprinted cache `<target>/finetune-reference.safetensors`, measured
the same way if absent or stale), so both stages compare with the same numbers. `ledoit_wolf` needs reference
features: `selection.mahalanobis.reference_images` PRIOR samples at ids layout.MAHALANOBIS_REFERENCE_ID_OFFSET + k (never a
candidate's), fitted ONCE per target (stage mahalanobis-reference, or the first shard) and committed at
<target>/mahalanobis-reference/; every shard reads that commit. Its fingerprint is stored per chunk, and `select`
refuses shards that disagree.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from reid_batch import log, preemption
from reid_batch.artifacts import finetune_identity, load_finetuned_generator
from reid_batch.attack.candidates import CandidateScorer, build_scorer, concat_columns
from reid_batch.attack.generation import BatchSizer, effective_mixed_precision
from reid_batch.attack.reference import gather_object_list, my_share
from reid_batch.errors import InputError, require_same_plan
from reid_batch.formats import png_files_job
from reid_batch.layout import (CHUNK_FILE, SUMMARY_FILE, chunk_bounds, chunk_prefix, image_key, shard_bounds,
                               shard_prefix)
from reid_batch.manifest import Manifest, TargetSpec
from reid_batch.runtime import check_shard, chosen_targets, pick_device, run_store
from reid_batch.storage import COMMIT_MARKER, BackgroundWriter

PLAN_FORMAT = 1
_CHUNK_MARKER = re.compile(rf"^chunk=(\d+)/{re.escape(COMMIT_MARKER)}$")


# ------------------------------------------------------------------------------------------------ the pure core


class ChunkWriter(BackgroundWriter):
    """Commits chunks, and writes `save_images` PNGs, on one background thread while the next batch computes. At
    most two jobs wait behind the one being written (so at most two chunks' rows, or batches' images, are held);
    jobs run in submission order, so a chunk's images are written before its commit; the first failure is raised by
    the next submit() or by close(), which waits for every job."""

    def __init__(self) -> None:
        super().__init__("chunk-writer")


# ------------------------------------------------------------------------------------------------ plan and resume


def shard_plan(manifest: Manifest, spec: TargetSpec, shard: int, finetune: dict, device: torch.device) -> dict:
    """Everything a shard's rows depend on; outputs of a different plan must not be mixed with this one's. The
    target's precision, the compile flag and the device are part of it: a shard resumed on other hardware would
    otherwise mix rows of two numerics."""
    sampling = manifest.sampling
    start, stop = shard_bounds(sampling.num_candidates, sampling.num_shards, shard)
    plan = {
        "format": PLAN_FORMAT,
        "target": spec.plan_dump(),
        "seed": sampling.seed,
        "num_candidates": sampling.num_candidates,
        "num_shards": sampling.num_shards,
        "shard": shard,
        "first_id": start,
        "stop_id": stop,
        "chunk_size": sampling.chunk_size,
        "mahalanobis": manifest.selection.mahalanobis.model_dump(mode="json"),
        "finetune": finetune,
        "compute": {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
                    "mixed_precision": effective_mixed_precision(device, sampling.mixed_precision),
                    "compile": sampling.compile, "tf32": manifest.compute.tf32 if device.type == "cuda" else None},
    }
    return json.loads(json.dumps(plan))  # the form it takes once stored, so comparisons are exact


def _check_plan(found: dict | None, plan: dict, uri: str) -> None:
    require_same_plan(found, plan, uri, "candidates", "use a new run_id, or delete that target's candidates/ "
                      "(and selection/, scores/) to sample again")


@dataclass
class ShardProgress:
    done: bool
    committed: dict[int, dict]  # chunk index -> its commit metadata


def shard_progress(store, target: str, shard: int, plan: dict) -> ShardProgress:
    """Which chunks of a shard are committed, refusing outputs of another plan; done = the summary exists."""
    prefix = shard_prefix(target, shard)
    summary_key = f"{prefix}/{SUMMARY_FILE}"
    if store.exists(summary_key):
        _check_plan(store.read_json(summary_key).get("plan"), plan, store.uri(summary_key))
        return ShardProgress(True, {})
    committed = {}
    for key in store.list(prefix):
        match = _CHUNK_MARKER.match(key[len(prefix) + 1:])
        if match:
            chunk = int(match.group(1))
            metadata = store.read_commit(chunk_prefix(target, shard, chunk)).get("metadata", {})
            _check_plan(metadata.get("plan"), plan, store.uri(chunk_prefix(target, shard, chunk)))
            committed[chunk] = metadata
    return ShardProgress(False, committed)


# ------------------------------------------------------------------------------------------------ the shell


@preemption.deferred  # SIGTERM: the chunk in progress is finished and committed, then the task stops
def _sample_shard(manifest: Manifest, spec: TargetSpec, shard: int, *, plan: dict, progress: ShardProgress,
                  scorer: CandidateScorer, accelerator, sizer: BatchSizer) -> dict | None:
    store = run_store(manifest)
    sampling = manifest.sampling
    main = accelerator.is_main_process
    chunks = chunk_bounds(plan["first_id"], plan["stop_id"], sampling.chunk_size)
    pending = [c for c in chunks if c[0] not in progress.committed]
    fingerprint = scorer.gaussian.fingerprint()
    log.event("sample_shard_start", target=spec.name, shard=shard, ids=f"{plan['first_id']}..{plan['stop_id'] - 1}",
              chunks=len(chunks), already_committed=len(chunks) - len(pending), processes=accelerator.num_processes,
              batch_size=sizer.size)
    started = time.perf_counter()
    done_rows = 0
    chunk_writer = ChunkWriter()
    try:
        for chunk, first, stop in (log.progress(pending, desc=f"{spec.name} shard {shard}", total=len(pending)) if main else pending):
            preemption.check(f"{spec.name} shard {shard} chunk {chunk}", accelerator)
            chunk_started = time.perf_counter()
            ids = my_share(accelerator, np.arange(first, stop, dtype=np.int64))

            def work(batch: np.ndarray) -> dict:
                columns, images = scorer.score_on_device(batch, shard, keep_images=sampling.save_images)
                if images is not None:  # the batch's last step: a batch retried after out-of-memory wrote nothing
                    keys = [image_key(spec.name, shard, candidate) for candidate in batch.tolist()]
                    chunk_writer.submit(png_files_job(images, keys, store.write_bytes))
                return columns

            local = concat_columns(sizer.run(ids, work))
            if not main and sampling.save_images:
                # The main process commits the chunk once the rows are gathered; this process's images must be
                # written by then, or a task killed after the commit would resume without them. (The main process's
                # own images are ahead of its commit in the writer's queue.)
                chunk_writer.drain()
            gathered = gather_object_list(accelerator, local)
            if main:
                columns = concat_columns(gathered)
                if not np.array_equal(columns.get("id", np.empty(0)), np.arange(first, stop)):
                    raise RuntimeError(f"chunk {chunk} of shard {shard}: gathered ids are not exactly {first}..{stop - 1}")
                metadata = {"plan": plan, "chunk": chunk, "first_id": first, "stop_id": stop, "rows": stop - first,
                            "mahalanobis_fingerprint": fingerprint}

                def commit(chunk=chunk, first=first, stop=stop, columns=columns, metadata=metadata,
                           chunk_started=chunk_started) -> None:
                    with store.committed(chunk_prefix(spec.name, shard, chunk), metadata) as staging:
                        with staging.parquet_writer(CHUNK_FILE, scorer.schema, sampling.row_group_size) as writer:
                            writer.write_table(scorer.table(columns))
                    seconds = time.perf_counter() - chunk_started
                    log.event("sample_chunk_committed", target=spec.name, shard=shard, chunk=chunk, rows=stop - first,
                              seconds=round(seconds, 3), candidates_per_second=round((stop - first) / max(seconds, 1e-9), 1))
                    progress.committed[chunk] = metadata

                chunk_writer.submit(commit)
            done_rows += stop - first
            accelerator.wait_for_everyone()
    except BaseException:
        # Pre-empted (or failed) between chunks: what was handed to the writer is still committed first.
        with contextlib.suppress(Exception):
            chunk_writer.close()
        raise
    chunk_writer.close()
    if not main:
        return None
    seconds = time.perf_counter() - started
    fingerprints = sorted({m.get("mahalanobis_fingerprint") for m in progress.committed.values()})
    summary = {
        "plan": plan,
        "rows": plan["stop_id"] - plan["first_id"],
        "chunks": [{"chunk": j, "key": f"{chunk_prefix(spec.name, shard, j)}/{CHUNK_FILE}", "first_id": a,
                    "stop_id": b, "rows": b - a} for j, a, b in chunks],
        "columns": scorer.schema.names,
        "num_classes": scorer.num_classes,
        "mahalanobis": scorer.gaussian.summary(),
        "mahalanobis_fingerprints": fingerprints,
        "last_run": {"rows": done_rows, "seconds": round(seconds, 3),
                     "candidates_per_second": round(done_rows / seconds, 2) if seconds > 0 and done_rows else None,
                     "processes": accelerator.num_processes, "device": str(accelerator.device),
                     "batch_size": sizer.size, "mixed_precision": scorer.mixed_precision},
    }
    if len(fingerprints) > 1:
        log.event("mahalanobis_reference_changed", target=spec.name, shard=shard, fingerprints=fingerprints,
                  reason="chunks of this shard were scored against different Gaussians (resumed on other hardware?)")
    store.write_json(f"{shard_prefix(spec.name, shard)}/{SUMMARY_FILE}", summary)
    log.event("sample_shard_done", target=spec.name, shard=shard, shard_rows=summary["rows"], **summary["last_run"])
    return summary


def sample_target(manifest: Manifest, spec: TargetSpec, shards: list[int], accelerator) -> list[dict]:
    """Sample the given shards of one target, skipping finished ones before loading any model."""
    store = run_store(manifest)
    work: list = [None]
    if accelerator.is_main_process:
        try:
            finetune = finetune_identity(store, spec.name)
            todo = []
            for shard in shards:
                plan = shard_plan(manifest, spec, shard, finetune, accelerator.device)
                progress = shard_progress(store, spec.name, shard, plan)
                if progress.done:
                    log.event("sample_shard_skipped", target=spec.name, shard=shard, reason="already complete")
                else:
                    todo.append((shard, plan, progress))
            work = [todo]
        except InputError as error:
            work = [error]  # every process must learn of it, or the others would wait for the broadcast forever
    if accelerator.num_processes > 1:
        broadcast_object_list(work)
    if isinstance(work[0], Exception):
        raise work[0]
    todo = work[0]
    if not todo:
        return []
    shard_ids = [p["stop_id"] - p["first_id"] for _, p, _ in todo]
    largest_share = -(-min(manifest.sampling.chunk_size, max(shard_ids)) // accelerator.num_processes)
    sizer = BatchSizer(manifest.sampling.batch_size, accelerator.device, largest_share,
                       manifest.generator.resolution**2)
    generator = load_finetuned_generator(manifest, spec.name).to(accelerator.device).eval()
    scorer = build_scorer(manifest, spec, generator, accelerator, sizer)
    try:
        summaries = [_sample_shard(manifest, spec, shard, plan=plan, progress=progress, scorer=scorer,
                                   accelerator=accelerator, sizer=sizer)
                     for shard, plan, progress in todo]
    finally:
        scorer.objective.close()
    return [s for s in summaries if s is not None]


def sample(manifest: Manifest, target: str | None = None, shard: int | None = None) -> int:
    """`reid-batch sample`: the given shard (None = every shard in turn) of each target (None = all targets)."""
    shards = check_shard(shard, manifest.sampling.num_shards)
    specs = chosen_targets(manifest, target)
    device = pick_device(manifest)
    accelerator = Accelerator(cpu=device.type == "cpu")
    for spec in specs:
        sample_target(manifest, spec, shards, accelerator)
    accelerator.wait_for_everyone()  # a following stage on any rank sees every shard summary
    return 0
