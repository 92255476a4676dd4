"""`reid-batch run --jobs N`: the pipeline as a graph of (stage, target) tasks, N processes at a time, on one machine.

On a cluster the scheduler runs the stages (slurm/, k8s/); on a laptop or a workstation `run` does. With `--jobs 1`
the stages run one after another in this process. With N > 1 every task is its own `reid-batch <stage> MANIFEST
--target T` process, started as soon as the tasks it needs have finished:

    make-phantoms -> train-prior, train-reid, train-target[t], train-demographics
    train-prior + train-target[t] -> finetune[t] -> sample[t] -> select[t]
    select[t] + train-demographics -> score[t] -> evaluate[t] (+ train-reid);  every evaluate[t] -> calibrate -> report

Why processes and not threads: small convolutions use a second core poorly inside one PyTorch process, but two
single-threaded processes use it fully (each child gets OMP_NUM_THREADS = cores // N unless the caller set it; a
task that runs alone, like calibrate and report at the end, gets every core).
Every stage commits its outputs atomically and skips what is already committed, so a task is safe to re-run:
after a failure or a kill, `run` again redoes only what is missing. The first failing task stops new starts; the
running ones finish; the run returns the failure's exit code (2 for invalid input).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

from reid_batch import log
from reid_batch.manifest import Manifest
from reid_batch.registry import BY_NAME, JOBS, STAGES, Stage

# Array-task variables must not reach the children: each child runs every shard of its stage.
_ARRAY_VARIABLES = ("SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX")
_POLL_SECONDS = 0.2


@dataclass(frozen=True)
class Task:
    stage: str
    target: str | None = None

    @property
    def label(self) -> str:
        return self.stage if self.target is None else f"{self.stage}[{self.target}]"


def task_graph(manifest: Manifest) -> dict[Task, frozenset[Task]]:
    """Every task and the tasks it needs, from the stage registry, in a good start order: the run-level stages
    and every target's training first (the long prior leads), then each target's attack chain, target by target."""
    names = [t.name for t in manifest.targets]

    def tasks(stage: Stage) -> list[Task]:
        return [Task(stage.name, name) for name in names] if stage.per_target else [Task(stage.name)]

    def needs(stage: Stage, target: str | None) -> frozenset[Task]:
        found = set()
        for need in map(BY_NAME.get, stage.needs):
            if not need.per_target:
                found.add(Task(need.name))
            elif target is not None:
                found.add(Task(need.name, target))
            else:  # a run-level stage after per-target ones needs them for every target
                found.update(tasks(need))
        return frozenset(found)

    preparing = [BY_NAME[name] for job in JOBS if job.name == "prepare" for name in job.stages]
    attacking = [stage for stage in STAGES if stage.per_target and stage not in preparing]
    concluding = [stage for stage in STAGES if not stage.per_target and stage not in preparing]
    graph: dict[Task, frozenset[Task]] = {}
    for stage in preparing:
        graph.update((task, needs(stage, task.target)) for task in tasks(stage))
    for name in names:
        graph.update((Task(stage.name, name), needs(stage, name)) for stage in attacking)
    for stage in concluding:
        graph[Task(stage.name)] = needs(stage, None)
    return graph


def resolve_jobs(jobs: str | int) -> int:
    """'auto' = the machine's cores, at most 4 (more processes than that mostly contend for memory bandwidth)."""
    if jobs == "auto":
        return max(1, min(4, os.cpu_count() or 1))
    return int(jobs)


def run_graph(graph: dict[Task, frozenset[Task]], start: Callable[[Task, bool], subprocess.Popen], jobs: int) -> int:
    """Run the graph with at most `jobs` tasks at once; 0, or the exit code of the first task that failed.

    start(task, alone): `alone` is True when nothing else runs or is ready, so nothing else can start before the
    task ends (calibrate and report, at the end): the shell gives such a task every core."""
    pending = dict(graph)
    running: dict[Task, tuple[subprocess.Popen, float]] = {}
    done: set[Task] = set()
    failure = 0
    while running or (pending and not failure):
        if not failure:
            ready = [t for t, needs in pending.items() if needs <= done]
            for task in ready:
                if len(running) >= jobs:
                    break
                alone = not running and len(ready) == 1
                log.event("task_start", task=task.label, running=len(running) + 1, alone=alone)
                running[task] = (start(task, alone), time.monotonic())
                del pending[task]
        if not running:
            break
        time.sleep(_POLL_SECONDS)
        for task, (process, began) in list(running.items()):
            code = process.poll()
            if code is None:
                continue
            del running[task]
            seconds = round(time.monotonic() - began, 1)
            if code == 0:
                done.add(task)
                log.event("task_done", task=task.label, seconds=seconds)
            else:
                log.event("task_failed", task=task.label, exit_code=code, seconds=seconds)
                failure = failure or code
    if pending and not failure:
        raise RuntimeError(f"tasks never became ready: {sorted(t.label for t in pending)}")
    if pending:
        log.event("run_stopped", not_started=sorted(t.label for t in pending))
    return failure


def run_parallel(manifest: Manifest, manifest_path: str, jobs: int, output: str | None = None) -> int:
    """The shell: one `python -m reid_batch` child per task."""
    environment = {k: v for k, v in os.environ.items() if k not in _ARRAY_VARIABLES}
    cores = os.cpu_count() or 1
    chosen = "OMP_NUM_THREADS" in environment
    graph = task_graph(manifest)

    def start(task: Task, alone: bool) -> subprocess.Popen:
        command = [sys.executable, "-m", "reid_batch", task.stage, manifest_path]
        if task.target is not None:
            command += ["--target", task.target]
        if output is not None:
            command += ["--output", output]
        threads = environment["OMP_NUM_THREADS"] if chosen else str(cores if alone else max(1, cores // jobs))
        return subprocess.Popen(command, env={**environment, "OMP_NUM_THREADS": threads})

    began = time.monotonic()
    code = run_graph(graph, start, jobs)
    log.event("run_done" if code == 0 else "run_failed", jobs=jobs, tasks=len(graph),
              seconds=round(time.monotonic() - began, 1), exit_code=code)
    return code
