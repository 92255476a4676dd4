"""The pipeline's one stage list: every stage, what it needs, how it shards, which scheduler job runs it.

The CLI (one subcommand per stage), `run` / `--jobs` (the local task graph), `plan`, Slurm and Kubernetes rendering
all read this table; none writes the list again. Torch-free: `--help`, `validate` and `plan` stay fast. To add a
stage: write reid_batch/stages/<name>.py with an entry function `(manifest, target=None[, shard=None]) -> int`,
add a Stage here, and (if it is new kind of work) put it in a Job.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from reid_batch.errors import InputError
from reid_batch.manifest import Manifest, TargetSpec


@dataclass(frozen=True)
class Stage:
    name: str  # the `reid-batch` subcommand
    summary: str
    entry: str  # "module:function" under reid_batch.stages
    per_target: bool = True  # runs once per target (False: once per run)
    needs: tuple[str, ...] = ()  # stages whose outputs it reads: the same target's, or every target's for a per-run stage
    shards: Callable[[Manifest], int] | None = None  # an array task: the manifest's shard count
    # Whether a per-target stage has work for a target (None: every target); `run` starts no task where it has none,
    # and a scheduler's task for such a target returns at once.
    applies: Callable[[TargetSpec], bool] | None = None
    # Stages it needs only under some manifests (e.g. finetune reads the demographic model with
    # finetune.demographic_feedback); the cluster plan's job order already covers them.
    needs_if: Callable[[Manifest], tuple[str, ...]] | None = None

    @property
    def sharded(self) -> bool:
        return self.shards is not None

    def function(self):
        """The callable that runs the stage (imports its module: torch and all)."""
        module, function = self.entry.split(":")
        return getattr(importlib.import_module(f"reid_batch.stages.{module}"), function)

    def needs_for(self, manifest: Manifest) -> tuple[str, ...]:
        return self.needs + (self.needs_if(manifest) if self.needs_if is not None else ())

    def applies_to(self, target: TargetSpec) -> bool:
        return self.applies is None or self.applies(target)

    def shard_count(self, manifest: Manifest) -> int:
        return self.shards(manifest) if self.shards is not None else 1


STAGES: tuple[Stage, ...] = (
    Stage("make-phantoms", "write the synthetic chest-X-ray world", "make_phantoms:make_phantoms", per_target=False),
    Stage("train-prior", "train the PGGAN prior on the public pool", "train_prior:run", per_target=False,
          needs=("make-phantoms",)),
    # The embedding trains longest after the prior: listed early so that `run --jobs` starts it early.
    Stage("train-reid", "train the re-identification embedding on the public pool", "train_reid:run",
          per_target=False, needs=("make-phantoms",)),
    Stage("train-demographics", "train the age/sex model", "train_demographics:run", per_target=False,
          needs=("make-phantoms",)),
    Stage("train-target", "train the target model(s)", "train_target:run", needs=("make-phantoms",)),
    # Before any sampling shard: the one Gaussian every shard scores against (selection.mahalanobis ledoit_wolf).
    Stage("mahalanobis-reference", "fit and commit the Ledoit-Wolf Gaussian of selection.mahalanobis",
          "mahalanobis_reference:run", needs=("train-prior", "train-target")),
    Stage("finetune", "stage 1: fine-tune the generator toward a target", "finetune:run",
          needs=("train-prior", "train-target"),
          needs_if=lambda manifest: ("train-demographics",) if manifest.finetune.demographic_feedback else ()),
    # The stronger attack beside the study's (targets listing ppa in `attacks`); sharded by class with sample's
    # shard count, so each sample array task runs its shard of both.
    Stage("ppa", "the ppa attack: optimise latents toward each class, keep the most confident", "ppa:run",
          needs=("train-prior", "train-target", "finetune"), shards=lambda manifest: manifest.sampling.num_shards,
          applies=lambda target: "ppa" in target.attacks),
    Stage("sample", "sample candidates, score them, write Parquet shards", "sample:sample",
          needs=("finetune", "mahalanobis-reference"),
          shards=lambda manifest: manifest.sampling.num_shards),
    Stage("select", "stage 2: keep candidates low on objective and Mahalanobis", "select:select", needs=("sample",)),
    Stage("score", "predict age and sex of the selected candidates", "score:score",
          needs=("select", "train-demographics"), shards=lambda manifest: manifest.demographics.num_shards),
    Stage("evaluate", "metrics: entropy, PCA kurtosis, FID, SSIM, re-id, the leak statistic", "evaluate:evaluate",
          needs=("score", "train-reid", "ppa")),
    # Once per run: every target's calibration uses the same prior candidates, generated and embedded once.
    Stage("calibrate", "spike-in calibration: the smallest leak the instrument sees", "calibrate:calibrate",
          per_target=False, needs=("evaluate",)),
    Stage("report", "write the HTML/Markdown/JSON risk report", "report:report", per_target=False,
          needs=("calibrate", "train-reid")),
)
BY_NAME = {stage.name: stage for stage in STAGES}


# What an array job's task index selects (the index is SLURM_ARRAY_TASK_ID / JOB_COMPLETION_INDEX):
ARRAY_OVER_SHARDS = "shards"  # task i: shard i of every target
ARRAY_OVER_TARGETS = "targets"  # task i: the manifest's i-th target (its whole stage)
ARRAY_OVER_TARGET_SHARDS = "target-shards"  # task i: target i // num_shards, shard i % num_shards


@dataclass(frozen=True)
class Job:
    """One scheduler job (Slurm job, Kubernetes Job): its stages run in sequence in each task. An array job
    (`array_over` set) runs `tasks` tasks at once, each on what its index selects (see ARRAY_OVER_*)."""

    name: str
    stages: tuple[str, ...]
    array_over: str | None = None
    tasks: int = 1  # filled in from the manifest by deploy.plan (job_tasks)
    distributed: bool = False  # one multi-process (multi-GPU, multi-node) Accelerate launch per task
    uses_gpu: bool = True

    @property
    def array(self) -> bool:
        return self.array_over is not None

    def stage_arguments(self) -> tuple[str, ...]:
        """What a task adds to `reid-batch STAGE MANIFEST` so that it takes its part from its task index."""
        if self.array_over in (ARRAY_OVER_TARGETS, ARRAY_OVER_TARGET_SHARDS):
            return ("--array-over", self.array_over)
        return ()  # shards: a sharded stage reads its shard from the index by default


# Targets are independent: each is trained, given its reference and fine-tuned in its own array task, so a study of
# N targets takes the time of one (given N GPUs) instead of N times as long; sampling runs target x shard.
JOBS: tuple[Job, ...] = (
    Job("prepare", ("make-phantoms", "train-prior", "train-reid", "train-demographics")),
    # mahalanobis-reference needs the prior, hence after prepare; it ends before the sample array starts.
    Job("train-target", ("train-target", "mahalanobis-reference"), array_over=ARRAY_OVER_TARGETS),
    Job("finetune", ("finetune",), array_over=ARRAY_OVER_TARGETS, distributed=True),
    Job("sample", ("ppa", "sample"), array_over=ARRAY_OVER_TARGET_SHARDS),
    Job("select", ("select",), uses_gpu=False),
    Job("score", ("score",), array_over=ARRAY_OVER_SHARDS),
    Job("report", ("evaluate", "calibrate", "report")),
)


def job_stages(manifest: Manifest, job: Job) -> tuple[str, ...]:
    """A job's stages that have work under this manifest: a stage that applies to no target (ppa where no target
    lists it) is left out, so the scheduler starts no process for it."""
    return tuple(name for name in job.stages
                 if not BY_NAME[name].per_target or any(BY_NAME[name].applies_to(t) for t in manifest.targets))


def stage_shards(manifest: Manifest, job: Job) -> int:
    """The shard count of a job's sharded stage (1 if none is sharded)."""
    return max(BY_NAME[stage].shard_count(manifest) for stage in job.stages)


def job_tasks(manifest: Manifest, job: Job) -> int:
    """An array job's task count from the manifest (1 for a plain job)."""
    if job.array_over == ARRAY_OVER_SHARDS:
        return stage_shards(manifest, job)
    if job.array_over == ARRAY_OVER_TARGETS:
        return len(manifest.targets)
    if job.array_over == ARRAY_OVER_TARGET_SHARDS:
        return len(manifest.targets) * stage_shards(manifest, job)
    return 1


def array_task(manifest: Manifest, stage: Stage, over: str, index: int, where: str) -> tuple[str, int | None]:
    """(target name, shard or None) of array task `index` of an array over targets or target x shard: the
    manifest's target order; `where` names the variable the index came from (for the error)."""
    count = len(manifest.targets) * (stage.shard_count(manifest) if over == ARRAY_OVER_TARGET_SHARDS else 1)
    if over == ARRAY_OVER_TARGET_SHARDS and not stage.sharded:
        raise InputError(f"{stage.name} has no shards: use --array-over {ARRAY_OVER_TARGETS}", "--array-over")
    if not 0 <= index < count:
        what = f"{len(manifest.targets)} target(s)" + \
            (f" x {stage.shard_count(manifest)} shard(s)" if over == ARRAY_OVER_TARGET_SHARDS else "")
        raise InputError(f"task index {index} is outside 0..{count - 1}: the manifest has {what}", where)
    if over == ARRAY_OVER_TARGETS:
        return manifest.targets[index].name, None
    shards = stage.shard_count(manifest)
    return manifest.targets[index // shards].name, index % shards


# Every stage runs in exactly one job, and jobs run in pipeline order.
assert tuple(s for job in JOBS for s in job.stages) == tuple(stage.name for stage in STAGES)
