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

from reid_batch.manifest import Manifest


@dataclass(frozen=True)
class Stage:
    name: str  # the `reid-batch` subcommand
    summary: str
    entry: str  # "module:function" under reid_batch.stages
    per_target: bool = True  # runs once per target (False: once per run)
    needs: tuple[str, ...] = ()  # stages whose outputs it reads: the same target's, or every target's for a per-run stage
    shards: Callable[[Manifest], int] | None = None  # an array task: the manifest's shard count

    @property
    def sharded(self) -> bool:
        return self.shards is not None

    def function(self):
        """The callable that runs the stage (imports its module: torch and all)."""
        module, function = self.entry.split(":")
        return getattr(importlib.import_module(f"reid_batch.stages.{module}"), function)

    def shard_count(self, manifest: Manifest) -> int:
        return self.shards(manifest) if self.shards is not None else 1


STAGES: tuple[Stage, ...] = (
    Stage("make-phantoms", "write the synthetic chest-X-ray world", "make_phantoms:make_phantoms", per_target=False),
    Stage("train-prior", "train the PGGAN prior on the public pool", "train_prior:run", per_target=False,
          needs=("make-phantoms",)),
    # The embedding trains longest after the prior: listed early so that `run --jobs` starts it early.
    Stage("train-reid", "train the re-identification embedding on the public pool", "train_reid:run",
          per_target=False, needs=("make-phantoms",)),
    Stage("train-target", "train the target model(s)", "train_target:run", needs=("make-phantoms",)),
    Stage("train-demographics", "train the age/sex model", "train_demographics:run", per_target=False,
          needs=("make-phantoms",)),
    # Before any sampling shard: the one Gaussian every shard scores against (selection.mahalanobis ledoit_wolf).
    Stage("mahalanobis-reference", "fit and commit the Ledoit-Wolf Gaussian of selection.mahalanobis",
          "mahalanobis_reference:run", needs=("train-prior", "train-target")),
    Stage("finetune", "stage 1: fine-tune the generator toward a target", "finetune:run",
          needs=("train-prior", "train-target")),
    Stage("sample", "sample candidates, score them, write Parquet shards", "sample:sample",
          needs=("finetune", "mahalanobis-reference"),
          shards=lambda manifest: manifest.sampling.num_shards),
    Stage("select", "stage 2: keep candidates low on objective and Mahalanobis", "select:select", needs=("sample",)),
    Stage("score", "predict age and sex of the selected candidates", "score:score",
          needs=("select", "train-demographics"), shards=lambda manifest: manifest.demographics.num_shards),
    Stage("evaluate", "metrics: entropy, PCA kurtosis, FID, SSIM, re-id, the leak statistic", "evaluate:evaluate",
          needs=("score", "train-reid")),
    # Once per run: every target's calibration uses the same prior candidates, generated and embedded once.
    Stage("calibrate", "spike-in calibration: the smallest leak the instrument sees", "calibrate:calibrate",
          per_target=False, needs=("evaluate",)),
    Stage("report", "write the HTML/Markdown/JSON risk report", "report:report", per_target=False,
          needs=("calibrate", "train-reid")),
)
BY_NAME = {stage.name: stage for stage in STAGES}


@dataclass(frozen=True)
class Job:
    """One scheduler job (Slurm job, Kubernetes Job): its stages run in sequence; `shards` > 1 makes it an array."""

    name: str
    stages: tuple[str, ...]
    shards: int = 1
    array: bool = False
    distributed: bool = False  # one multi-process (multi-GPU, multi-node) Accelerate launch
    uses_gpu: bool = True


JOBS: tuple[Job, ...] = (
    Job("prepare", ("make-phantoms", "train-prior", "train-reid", "train-target", "train-demographics",
                    "mahalanobis-reference")),
    Job("finetune", ("finetune",), distributed=True),
    Job("sample", ("sample",), array=True),
    Job("select", ("select",), uses_gpu=False),
    Job("score", ("score",), array=True),
    Job("report", ("evaluate", "calibrate", "report")),
)


def job_shards(manifest: Manifest, job: Job) -> int:
    """An array job's task count: its stage's shard count (1 for a plain job)."""
    return max(BY_NAME[stage].shard_count(manifest) for stage in job.stages) if job.array else 1


# Every stage runs in exactly one job, and jobs run in pipeline order.
assert tuple(s for job in JOBS for s in job.stages) == tuple(stage.name for stage in STAGES)
