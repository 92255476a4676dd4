"""Stage 1 (`reid-batch finetune`): fine-tune the generator prior so its images make the FROZEN target behave as
its training data did (the study, section 3.3).

Each step draws the step's global batch of latents, generates images, maps them to [0, 1] and to the target's
input, and minimises the weighted objective (reid_batch.attack.objectives: BatchNorm or LayerNorm statistics, feature
or CLS statistics, attention, class-conditional logits, total variation). The target is in eval mode with no
parameter gradients; gradients flow through it into the generator, which Adam updates.

One code path for 1 CPU process, N CPU processes (gloo) and N GPUs on M nodes, through Accelerate:
* `finetune.batch_size` is the GLOBAL batch. Step s owns latent ids s*B .. s*B+B-1 (`latents_for_ids`, a pure
  function of (finetune.seed, id)), and process r takes the contiguous slice r*B/W .. (r+1)*B/W-1, so neither a
  resume nor a different process count replays or changes any random draw. Classes for the logits term are
  assigned over the global batch (each process offsets by the start of its slice).
* The objective's statistics are sums over the global batch: its one `reduce_sum` call is a differentiable
  all-reduce (torch.distributed.nn.functional.all_reduce), whose backward sums the upstream gradient over
  processes. Each process's generator gradient is then W times its own samples' share of the global loss's
  gradient, and DDP's averaging divides by W: the update is the gradient of the global loss, exactly what one
  process with the whole batch computes (tests/test_finetune.py checks 2 x 8 against 1 x 16).
* fp16 on CUDA is loss-scaled: Accelerate multiplies the loss by its GradScaler's scale in `backward`, unscales
  the gradients before clipping, skips a step whose gradients overflowed (halving the scale) and doubles the scale
  after 2000 clean steps. (bf16 and float32 need no scaling; Accelerate builds no scaler for them, nor on a CPU.)
* The generator is DDP-wrapped by `accelerator.prepare`. The toRGB layers of the coarser scales take no part in
  a full-resolution forward pass; they are frozen (and saved unchanged) so DDP sees no unused parameters.

Resumable: every `checkpoint_every` steps the main process commits <target>/finetune-checkpoints/step-<NNNNNNN>/
(state.pt: generator, Adam state, the fp16 GradScaler's state, step, loss rows, elapsed seconds, a settings
fingerprint); only committed
checkpoints are loaded, the last two are kept, and all are deleted once the output is committed. Because latents
come from (seed, id) and Adam's state is restored, a run killed and resumed ends with the generator an
uninterrupted run ends with (bit for bit on CPU). The GradScaler's state is part of it: a resume that restarted
at the default scale of 65536 would overflow and skip the first steps again, and then grow on another schedule.

ViT targets (and GroupNorm CNNs, e.g. DP-SGD targets) store no running statistics: reference statistics are measured once through the frozen target on the
prior's own samples (`objective.reference.source: prior`) or on public-pool images (`public`), shared out over the
processes, and cached at <target>/finetune-reference.safetensors with a fingerprint of the target's and the
source's weights and settings, so a changed target or prior is never compared with stale statistics.

Outputs, committed together under <target>/finetune/: generator.safetensors (pggan "reid" format),
losses.parquet (per step: each term's unweighted value, the weighted total, the gradient norm before clipping,
step seconds, elapsed seconds; with `finetune.discriminator`, its term as column `discriminator`: minus the prior's
critic's mean score of the batch, the study's future work of keeping stage-1 images on the X-ray manifold; with
`finetune.demographic_feedback`, column `demographics`: the demographic model's mean binary entropy of the predicted
sex, its other future work of images "that can be more accurately predicted upon"),
samples_before.png / samples_after.png (the same fixed latents, 4x4 grids), finetune.json (terms and weights,
reference source, steps, seconds per step, world size, ...).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import nn
import torch.nn.functional as F
from torch.distributed.nn.functional import all_reduce

from reid_batch import log, preemption
from reid_batch.artifacts import load_attack_target, load_demographic_model, load_prior, load_prior_discriminator
from reid_batch.attack.generation import effective_mixed_precision, generate_unit, id_latents, target_input_spec
from reid_batch.attack.objectives import (TargetObjective, assign_classes, check_classes, condition_latents,
                                         needs_reference_stats)
from reid_batch.attack.reference import reference_stats
from reid_batch.errors import InputError
from reid_batch.formats import grid_png, parquet_bytes
from reid_batch.layout import (FINETUNE_CHECKPOINT_PART, FINETUNE_STATE_FILE, GENERATOR_FILE, GRID_ID_OFFSET,
                               attack_prefix, checkpoint_prefix, finetune_prefix)
from reid_batch.manifest import FinetuneSpec, Manifest, TargetSpec
from reid_batch.models.pggan import (PGGANGenerator, generator_bytes, generator_to_unit, latents_for_ids,
                                     with_class_offsets)
from reid_batch.models.demographics import demographic_input
from reid_batch.models.targets import TargetInput, to_target_input
from reid_batch.runtime import load_state, pick_device, run_store, save_state
from reid_batch.storage import COMMIT_MARKER

KEEP_CHECKPOINTS = 2
GRID_SIDE = 4
_CHECKPOINT_DIR = re.compile(r"^step-(\d{7,})$")

ReduceSum = Callable[[torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------------------- distribution


def make_accelerator(manifest: Manifest):
    """The Accelerator for this launch; fails loudly when the launcher's world size did not take effect."""
    device = pick_device(manifest)
    # The one precision rule of every stage (generation.effective_mixed_precision): autocast on CUDA only, bf16
    # only where the GPU has it natively (Accelerate would accept emulated bf16 on a pre-Ampere GPU, slowly).
    asked = manifest.finetune.mixed_precision
    precision = effective_mixed_precision(device, asked)
    if precision != asked:
        log.event("mixed_precision_not_used", stage="finetune", asked=asked, device=str(device),
                  reason="autocast is used on CUDA only, bf16 where the GPU supports it natively")
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=precision)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        # The silent trap: a launcher started W processes but each runs alone, unsynchronised.
        raise RuntimeError(
            f"the launcher started {launched} processes (WORLD_SIZE) but Accelerate runs {accelerator.num_processes}; "
            "launch with `torchrun --nproc_per_node N` or `accelerate launch --multi_gpu --num_processes N` "
            "(not `accelerate launch --cpu`, which starts one process)"
        )
    return accelerator


def differentiable_sum(num_processes: int) -> ReduceSum | None:
    """The objective's reduce_sum: a SUM all-reduce whose backward sums gradients over processes; None alone."""
    if num_processes == 1:
        return None

    return lambda t: all_reduce(t, op=dist.ReduceOp.SUM)


def check_batch_size(batch_size: int, num_processes: int) -> int:
    """Samples per process; the global batch must split evenly so every process does the same work."""
    if batch_size % num_processes:
        raise InputError(
            f"the global batch {batch_size} does not divide among {num_processes} processes; "
            f"use a multiple of {num_processes}",
            where="finetune.batch_size",
        )
    return batch_size // num_processes


# ------------------------------------------------------------------------------------------------- the pure core


def step_ids(step: int, batch_size: int, rank: int, per_process: int) -> torch.Tensor:
    """Latent ids of process `rank`'s share of step `step`'s global batch."""
    start = step * batch_size + rank * per_process
    return torch.arange(start, start + per_process, dtype=torch.int64)


def freeze_unused_layers(generator: PGGANGenerator) -> list[nn.Parameter]:
    """Freeze what a full-resolution forward pass never uses (the coarser scales' toRGB); return the rest."""
    for layer in list(generator.toRGB)[:-1]:
        layer.requires_grad_(False)
    return [p for p in generator.parameters() if p.requires_grad]


@dataclass(kw_only=True)
class Finetuner:
    """One generator update per `step(s)`; the generator and optimizer are already `accelerator.prepare`d.
    Keyword-only: sixteen settings, several of the same type, are easy to pass in the wrong order."""

    generator: nn.Module
    optimizer: Any
    objective: Any
    accelerator: Any
    spec: FinetuneSpec
    input_spec: TargetInput
    output_range: tuple[float, float]
    latent_dim: int
    num_classes: int
    trainable: list[nn.Parameter]
    reduce_sum: ReduceSum | None = None
    critic: nn.Module | None = None  # finetune.discriminator: frozen, on the device
    critic_weight: float = 0.0
    demographic_model: nn.Module | None = None  # finetune.demographic_feedback: frozen, eval mode, on the device
    demographic_size: int = 0
    demographic_weight: float = 0.0
    per_process: int = field(init=False)
    classes: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.per_process = check_batch_size(self.spec.batch_size, self.accelerator.num_processes)
        # The same classes every step (they depend on the process's slice, not on the step): made and checked once
        # on the host, copied to the device once.
        classes = assign_classes(self.per_process, self.num_classes,
                                 offset=self.accelerator.process_index * self.per_process)
        check_classes(classes, self.per_process, 2 if self.num_classes == 1 else self.num_classes)
        self.classes = classes.to(self.accelerator.device)

    def step(self, step: int) -> dict[str, float]:
        """Train on step `step`'s batch; returns the global unweighted terms, the weighted 'total' and the
        generator's gradient norm before clipping ('grad_norm')."""
        accelerator = self.accelerator
        rank = accelerator.process_index
        ids = step_ids(step, self.spec.batch_size, rank, self.per_process)
        latents = latents_for_ids(self.spec.seed, ids, self.latent_dim).to(accelerator.device)
        classes = self.classes
        if "logits" in self.objective.weights:
            latents = condition_latents(latents, classes, self.num_classes)
        self.optimizer.zero_grad(set_to_none=True)
        with accelerator.autocast():
            raw = self.generator(latents)
            image = generator_to_unit(raw.float(), self.output_range)
            result = self.objective(to_target_input(image, self.input_spec, check_range=False), image01=image,
                                    classes=classes, reduce_sum=self.reduce_sum)
            total, extra = result.total, {}
            if self.critic is not None:
                # The critic judges images in the generator's declared range, as it saw real ones in training;
                # the batch mean is taken over every process, like the objective's terms.
                scores = self.critic(raw.float()).float()
                sums = torch.stack([scores.sum(), scores.new_tensor(float(scores.numel()))])
                sums = self.reduce_sum(sums) if self.reduce_sum is not None else sums
                extra["discriminator"] = -sums[0] / sums[1]
                total = total + self.critic_weight * extra["discriminator"]
            if self.demographic_model is not None:
                # The model's forward pass, not predict(): predict runs without gradients. Entropy of the sex
                # probability from its logit (stable: softplus), averaged over every process's images.
                _, sex_logit = self.demographic_model(demographic_input(image, self.demographic_size))
                sex_logit = sex_logit.float()
                p = torch.sigmoid(sex_logit)
                entropy = F.softplus(sex_logit) - p * sex_logit  # -p log p - (1 - p) log(1 - p)
                sums = torch.stack([entropy.sum(), entropy.new_tensor(float(entropy.numel()))])
                sums = self.reduce_sum(sums) if self.reduce_sum is not None else sums
                extra["demographics"] = sums[0] / sums[1]
                total = total + self.demographic_weight * extra["demographics"]
        accelerator.backward(total)
        # Always measured (an infinite bound clips nothing): Adam is blind to a constant factor in the gradient,
        # so this norm is what shows that N processes compute the one-process gradient.
        grad_norm = accelerator.clip_grad_norm_(self.trainable, self.spec.grad_clip or float("inf"))
        self.optimizer.step()
        named = {**result.terms, **extra}
        values = torch.stack([v.detach().float() for v in named.values()]
                             + [total.detach().float(), torch.as_tensor(grad_norm).float().to(total.device)])
        return dict(zip(list(named) + ["total", "grad_norm"], values.cpu().tolist()))


# ------------------------------------------------------------------------------------------------- checkpoints


def list_checkpoints(store, target: str) -> tuple[list[int], list[int]]:
    """(committed steps, all steps with visible files), each sorted; staging `_tmp-` leftovers are invisible."""
    root = attack_prefix(target, FINETUNE_CHECKPOINT_PART)
    committed, seen = set(), set()
    for key in store.list(root):
        parts = key[len(root) + 1:].split("/")
        match = _CHECKPOINT_DIR.match(parts[0])
        if not match:
            continue
        seen.add(int(match.group(1)))
        if parts[1:] == [COMMIT_MARKER]:
            committed.add(int(match.group(1)))
    return sorted(committed), sorted(seen)


def _delete_checkpoint(store, target: str, step: int) -> None:
    prefix = checkpoint_prefix(target, step)
    # Marker first: a deletion cut short must not leave a "committed" checkpoint with files missing.
    store.delete(store.commit_marker(prefix))
    store.delete(prefix)


def prune_checkpoints(store, target: str, keep: int = KEEP_CHECKPOINTS) -> None:
    """Keep the newest `keep` committed checkpoints; delete every other one, committed or half-written.
    keep=0 deletes the whole folder, staging leftovers of killed runs included."""
    committed, seen = list_checkpoints(store, target)
    kept = set(committed[-keep:]) if keep else set()
    for step in seen:
        if step not in kept:
            _delete_checkpoint(store, target, step)
    if not keep:
        store.delete(attack_prefix(target, FINETUNE_CHECKPOINT_PART))


def settings_fingerprint(manifest: Manifest, spec: TargetSpec) -> str:
    """What a checkpoint must agree with to be resumed (not steps or cadences, which may be extended)."""
    return json.dumps({
        "finetune": manifest.finetune.model_dump(mode="json", exclude={"steps", "checkpoint_every", "log_every"}),
        "target": spec.plan_dump(),
        "generator": manifest.generator.model_dump(mode="json"),
    }, sort_keys=True)


# ------------------------------------------------------------------------------------------------- the shell


def _train_step(trainer, step: int, *, rows: list[dict], seconds_before: float, started: float, name: str,
                fs: FinetuneSpec, start: int, main: bool) -> int:
    """One optimisation step, its loss row appended to `rows`; returns the number of steps done."""
    tic = time.perf_counter()
    row = trainer.step(step)
    now = time.perf_counter()
    row = {"step": step + 1, **row, "seconds": now - tic, "elapsed": seconds_before + now - started}
    rows.append(row)
    done = step + 1
    if main and (done % fs.log_every == 0 or done == fs.steps or done == start + 1):
        log.event("finetune_step", target=name, step=done,
                  **{k: round(v, 6) for k, v in row.items() if k not in ("step", "elapsed")})
    return done


def scaler_state(scaler) -> dict | None:
    """The fp16 GradScaler's state for a checkpoint: plain floats and ints (scale, growth tracker, factors), so
    the checkpoint still loads with weights_only=True. None when there is no scaler (bf16, float32, a CPU)."""
    return None if scaler is None else dict(scaler.state_dict())


def restore_scaler(scaler, saved: dict | None, target: str) -> None:
    """Put a checkpoint's GradScaler state back. A checkpoint from a run without a scaler (fp16 asked on a machine
    that ran float32, or a checkpoint from before scalers were saved) leaves the fresh scaler and says so; a saved
    state with no scaler to receive it (resumed where fp16 does not apply) is dropped, also with an event."""
    if scaler is None:
        if saved:
            log.event("loss_scale_not_restored", target=target, reason="this run does not scale the loss",
                      saved_scale=saved.get("scale"))
        return
    if not saved:
        log.event("loss_scale_not_restored", target=target, reason="the checkpoint holds no scaler state",
                  scale=scaler.get_scale())
        return
    scaler.load_state_dict(saved)
    log.event("loss_scale_restored", target=target, scale=saved.get("scale"),
              growth_tracker=saved.get("_growth_tracker"))


def resume_from_checkpoint(store, spec: TargetSpec, fs: FinetuneSpec, *, fingerprint: str, generator: nn.Module,
                           optimizer, scaler=None) -> tuple[list[dict], int, float]:
    """Load the newest committed checkpoint into the generator, optimizer and fp16 GradScaler (`scaler`, None
    without one), if there is one, refusing one of other settings: (loss rows so far, steps done, seconds spent)."""
    committed, _ = list_checkpoints(store, spec.name)
    if not committed:
        return [], 0, 0.0
    key = f"{checkpoint_prefix(spec.name, committed[-1])}/{FINETUNE_STATE_FILE}"
    state = load_state(store, key)
    if state is None or state.get("fingerprint") != fingerprint:
        raise InputError("this checkpoint was written with different finetune/target/generator settings; "
                         "restore them, or delete the finetune-checkpoints folder to start over",
                         where=store.uri(key))
    if int(state["step"]) > fs.steps:
        raise InputError(f"the latest checkpoint is at step {state['step']}, beyond the {fs.steps} steps asked "
                         "for", where="finetune.steps")
    generator.load_state_dict(state["generator"])
    optimizer.load_state_dict(state["optimizer"])
    restore_scaler(scaler, state.get("scaler"), spec.name)
    start = int(state["step"])
    log.event("finetune_resumed", target=spec.name, step=start, uri=store.uri(key))
    return list(state["losses"]), start, float(state["seconds"])


def finetune_record(spec: TargetSpec, fs: FinetuneSpec, objective, *, num_classes: int, reference_info: dict | None,
                    world: int, device, start: int, total_seconds: float, rows: list[dict]) -> dict:
    """finetune.json: what was fine-tuned, how, and the first and last losses."""
    step_seconds = [r["seconds"] for r in rows]
    record = {
        "target": spec.name,
        "arch": spec.arch,
        "family": spec.family,
        "terms": objective.weights,
        "terms_configured": spec.terms,
        "discriminator": (None if fs.discriminator is None else
                          {"weight": fs.discriminator.weight,
                           "critic": fs.discriminator.checkpoint or "the prior's (train-prior)"}),
        "demographic_feedback": (None if fs.demographic_feedback is None else
                                 {"weight": fs.demographic_feedback.weight,
                                  "term": "mean binary entropy of the demographic model's predicted sex (nats)"}),
        "objective_fallback": objective.fallback,
        "num_classes": num_classes,
        "reference": reference_info,
        "feature_target": objective.feature_target_from if "feature_stats" in objective.weights else None,
        "steps": fs.steps,
        "batch_size": fs.batch_size,
        "lr": fs.lr,
        "betas": list(fs.betas),
        "grad_clip": fs.grad_clip,
        "mixed_precision": fs.mixed_precision,
        "seed": fs.seed,
        "world_size": world,
        "device": str(device),
        "resumed_from_step": start or None,
        "seconds": round(total_seconds, 3),
        "seconds_per_step": round(float(np.median(step_seconds)), 5) if step_seconds else None,
        "first": {k: v for k, v in rows[0].items() if k not in ("seconds", "elapsed")} if rows else None,
        "last": {k: v for k, v in rows[-1].items() if k not in ("seconds", "elapsed")} if rows else None,
    }
    return record


def finetune_target(manifest: Manifest, index: int, accelerator,
                    on_checkpoint: Callable[[int], None] | None = None) -> dict:
    """Fine-tune (or resume, or skip if committed) the generator for manifest.targets[index]; returns finetune.json.
    `on_checkpoint(step)` runs on the main process after each committed checkpoint."""
    spec = manifest.targets[index]
    fs = manifest.finetune
    store = run_store(manifest)
    output = finetune_prefix(spec.name)
    if store.is_committed(output):
        log.event("finetune_skipped", target=spec.name, reason="already committed", uri=store.uri(output))
        return store.read_json(f"{output}/finetune.json")
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    per_process = check_batch_size(fs.batch_size, world)
    device = accelerator.device

    prior = load_prior(manifest)
    model, num_classes = load_attack_target(manifest, spec)
    model = model.to(device).eval().requires_grad_(False)
    latent_dim = prior.config.latent_dim
    grid = id_latents(fs.seed, GRID_ID_OFFSET, GRID_SIDE * GRID_SIDE, latent_dim)
    before_png = grid_png(generate_unit(prior.to(device), grid), GRID_SIDE) if main else b""

    reference, reference_info = None, None
    if needs_reference_stats(model, spec.family):
        reference, reference_info = reference_stats(manifest, spec, model, prior, accelerator, store)
    objective = TargetObjective(model, spec.terms, spec.objective, reference,
                                field_prefix=f"targets[{index}].objective")

    generator = prior.to(device).train()
    if spec.objective.class_offsets:
        generator = with_class_offsets(generator, 2 if num_classes == 1 else num_classes).train()
    trainable = freeze_unused_layers(generator)
    offsets = [p for p in trainable if p is getattr(generator, "class_offsets", None)]
    groups = [{"params": [p for p in trainable if not any(p is o for o in offsets)]}]
    if offsets:
        groups.append({"params": offsets, "lr": spec.objective.class_offset_lr})
    optimizer = torch.optim.Adam(groups, lr=fs.lr, betas=tuple(fs.betas))
    fingerprint = settings_fingerprint(manifest, spec)
    rows, start, seconds_before = resume_from_checkpoint(store, spec, fs, fingerprint=fingerprint, generator=generator,
                                                         optimizer=optimizer, scaler=accelerator.scaler)
    # No process may see a checkpoint the main process writes during training as its starting point.
    accelerator.wait_for_everyone()

    critic = None
    if fs.discriminator is not None:
        critic = load_prior_discriminator(manifest)
        resolution = 4 * 2 ** (len(critic.depths) - 1)
        if resolution != prior.config.resolution or critic.fromRGB[0].module.in_channels != prior.config.out_channels:
            raise InputError(f"the critic judges {resolution} px images with {critic.fromRGB[0].module.in_channels} "
                             f"channel(s); the generator draws {prior.config.resolution} px with "
                             f"{prior.config.out_channels}", where="finetune.discriminator")
        critic = critic.to(device)
    demographic_model = None
    if fs.demographic_feedback is not None:
        demographic_model = load_demographic_model(manifest).to(device).eval().requires_grad_(False)
    prepared_generator, prepared_optimizer = accelerator.prepare(generator, optimizer)
    trainer = Finetuner(generator=prepared_generator, optimizer=prepared_optimizer, objective=objective,
                        accelerator=accelerator, spec=fs, input_spec=target_input_spec(spec),
                        output_range=tuple(generator.config.output_range), latent_dim=latent_dim,
                        num_classes=num_classes, trainable=trainable, reduce_sum=differentiable_sum(world),
                        critic=critic, critic_weight=fs.discriminator.weight if critic is not None else 0.0,
                        demographic_model=demographic_model, demographic_size=manifest.demographics.image_size,
                        demographic_weight=fs.demographic_feedback.weight if demographic_model is not None else 0.0)
    log.event("finetune_start", target=spec.name, arch=spec.arch, terms=objective.weights, steps=fs.steps,
              from_step=start, batch_size=fs.batch_size, per_process=per_process, world_size=world, rank=rank,
              device=str(device), mixed_precision=fs.mixed_precision)
    started = time.perf_counter()
    steps = range(start, fs.steps)

    def save_checkpoint(done: int, seconds: float) -> None:
        with store.committed(checkpoint_prefix(spec.name, done),
                             {"stage": "finetune-checkpoint", "target": spec.name, "step": done}) as out:
            save_state(out, FINETUNE_STATE_FILE, {
                "generator": {k: v.detach().cpu().clone() for k, v in generator.state_dict().items()},
                "optimizer": prepared_optimizer.state_dict(),
                "scaler": scaler_state(accelerator.scaler),
                "step": done, "losses": rows, "seconds": seconds, "fingerprint": fingerprint,
            })
        prune_checkpoints(store, spec.name)
        if on_checkpoint is not None:
            on_checkpoint(done)

    # SIGTERM waits for the end of the step it lands in: that step is checkpointed, then the task stops.
    with preemption.deferred_region():
        for step in (log.progress(steps, desc=f"finetune {spec.name}", total=len(steps)) if main else steps):
            done = _train_step(trainer, step, rows=rows, seconds_before=seconds_before, started=started,
                               name=spec.name, fs=fs, start=start, main=main)
            checkpoint_due = done % fs.checkpoint_every == 0 and done < fs.steps
            if checkpoint_due and main:
                save_checkpoint(done, rows[-1]["elapsed"])
            if done < fs.steps and preemption.requested(accelerator):
                if main and not checkpoint_due:
                    save_checkpoint(done, rows[-1]["elapsed"])
                accelerator.wait_for_everyone()
                preemption.stop(f"finetune {spec.name} step {done}")
    accelerator.wait_for_everyone()
    total_seconds = seconds_before + time.perf_counter() - started

    record = finetune_record(spec, fs, objective, num_classes=num_classes, reference_info=reference_info, world=world,
                             device=device, start=start, total_seconds=total_seconds, rows=rows)
    record["mixed_precision_used"] = accelerator.mixed_precision
    # The fp16 loss scale reached: one far below 65536 says the gradients overflowed often (steps were skipped).
    record["loss_scale"] = accelerator.scaler.get_scale() if accelerator.scaler is not None else None
    objective.close()
    if main:
        with store.committed(output, {"stage": "finetune", "target": spec.name, "steps": fs.steps}) as out:
            out.write_bytes(GENERATOR_FILE, generator_bytes(generator))
            out.write_bytes("losses.parquet", parquet_bytes(rows))
            out.write_bytes("samples_before.png", before_png)
            out.write_bytes("samples_after.png", grid_png(generate_unit(generator.eval(), grid), GRID_SIDE))
            out.write_json("finetune.json", record)
        # The output makes the resume state useless; a kill before this line only leaves it behind.
        prune_checkpoints(store, spec.name, keep=0)
        log.event("finetune_done", target=spec.name, steps=fs.steps, seconds=record["seconds"],
                  seconds_per_step=record["seconds_per_step"], world_size=world, last=record["last"])
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    return record


def run(manifest: Manifest, target: str | None = None) -> int:
    names = [target] if target else [t.name for t in manifest.targets]
    indices = [manifest.targets.index(manifest.target(name)) for name in names]
    accelerator = make_accelerator(manifest)
    for index in indices:
        finetune_target(manifest, index, accelerator)
    return 0
