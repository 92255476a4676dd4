"""`reid-batch run --jobs N`: the pipeline as a graph of (stage, target) tasks, N processes at a time, on one machine.

On a cluster the scheduler runs the stages (slurm/, k8s/); on a laptop or a workstation `run` does. With `--jobs 1`
the stages run one after another in this process. With N > 1 every task is its own `reid-batch <stage> MANIFEST
--target T` process, started as soon as the tasks it needs have finished (the task graph comes from the stage
registry's `needs`; docs/pipeline.md draws it).

Why processes and not threads: small convolutions use a second core poorly inside one PyTorch process, but two
single-threaded processes use it fully (each child gets OMP_NUM_THREADS = cores // N unless the caller set it; a
task that runs alone, like calibrate and report at the end, gets every core).
Every stage commits its outputs atomically and skips what is already committed, so a task is safe to re-run:
after a failure or a kill, `run` again redoes only what is missing. The first failing task stops new starts; the
running ones finish; the run returns the failure's exit code (2 for invalid input).

What a person sees: the children write JSON lines to a pipe; this process reads them and draws the terminal (one line
per task as it ends, one live status line with every running task's progress, warnings and errors in full), or,
through a pipe, passes every line on unchanged. Every task also keeps its events in `<run>/logs/<task>.jsonl`.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from reid_batch import log
from reid_batch.errors import InputError, StorageError
from reid_batch.layout import RUN_LOG, task_log_key
from reid_batch.manifest import Manifest
from reid_batch.registry import BY_NAME, JOBS, STAGES, Stage

# Array-task variables must not reach the children: each child runs every shard of its stage.
_ARRAY_VARIABLES = ("SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX")
_POLL_SECONDS = 0.2
_LIVE_PROGRESS_SECONDS = "0.5"  # how often a child reports progress to a parent that draws a terminal
_ERROR_TAIL = 40  # stderr lines kept per task for the failure summary


@dataclass(frozen=True)
class Task:
    stage: str
    target: str | None = None

    @property
    def label(self) -> str:
        return self.stage if self.target is None else f"{self.stage}[{self.target}]"


@dataclass
class Outcome:
    """How a run ended, for the closing summary."""
    exit_code: int = 0
    tasks: int = 0
    seconds: float = 0.0
    failed_task: str | None = None
    error: str | None = None  # the failing task's last error line
    log_key: str | None = None  # the failing task's log file


# ------------------------------------------------------------------------------------------------ task log files


def save_task_log(manifest: Manifest, key: str, records: list[str]) -> None:
    """Append a task's records to its log file in the run's output (a re-run appends: no attempt is lost)."""
    if not records:
        return
    from reid_batch.storage import run_store  # pyarrow: only once there is something to write

    try:
        store = run_store(manifest)
        earlier = store.read_bytes(key) if store.exists(key) else b""
        store.write_bytes(key, earlier + "".join(r + "\n" for r in records).encode("utf-8"))
    except Exception as e:  # noqa: BLE001 - the task's own outcome matters more than its log file
        log.write_line(f"reid-batch: warning: task log {key} not written: {type(e).__name__}: {e}")


@contextmanager
def logged_task(manifest: Manifest, key: str, label: str) -> Iterator[None]:
    """Run a task with its live line on a terminal and its events kept in <run>/<key>.

    Not written after invalid input (nothing ran; the error names the field, and a failed input check leaves
    nothing behind) nor after a storage failure (the store is what failed: a log write would only retry it)."""
    with log.capture() as records:
        try:
            with log.task(label):
                yield
        except (InputError, StorageError):
            raise
        except BaseException:
            save_task_log(manifest, key, records)
            raise
        save_task_log(manifest, key, records)


def stage_log_key(stage: str, target: str | None, shard: int | None) -> str:
    """The log file of one stage task; each process of a multi-process fine-tuning (RANK) writes its own."""
    world = int(os.environ.get("WORLD_SIZE") or 1)
    rank = int(os.environ["RANK"]) if world > 1 and os.environ.get("RANK", "").isdigit() else None
    return task_log_key(stage, target, shard, rank)


# ------------------------------------------------------------------------------------------------ the graph


def task_graph(manifest: Manifest) -> dict[Task, frozenset[Task]]:
    """Every task and the tasks it needs, from the stage registry, in a good start order: the run-level stages
    and every target's training first (the long prior leads), then each target's attack chain, target by target."""

    def tasks(stage: Stage) -> list[Task]:
        if not stage.per_target:
            return [Task(stage.name)]
        return [Task(stage.name, t.name) for t in manifest.targets if stage.applies_to(t)]

    def needs(stage: Stage, target: str | None) -> frozenset[Task]:
        found = set()
        for need in map(BY_NAME.get, stage.needs_for(manifest)):
            if not need.per_target:
                found.add(Task(need.name))
            elif target is not None:
                if need.applies_to(manifest.target(target)):
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
    for spec in manifest.targets:
        graph.update((Task(stage.name, spec.name), needs(stage, spec.name)) for stage in attacking
                     if stage.applies_to(spec))
    for stage in concluding:
        graph[Task(stage.name)] = needs(stage, None)
    return graph


def resolve_jobs(jobs: str | int) -> int:
    """'auto' = the machine's cores, at most 4 (more processes than that mostly contend for memory bandwidth)."""
    if jobs == "auto":
        return max(1, min(4, os.cpu_count() or 1))
    return int(jobs)


class Watcher:
    """What run_graph tells about its tasks; the base class tells nothing (tests, a plain graph run)."""

    def started(self, task: Task, index: int, total: int) -> None: ...

    def finished(self, task: Task, code: int, seconds: float) -> None: ...

    def tick(self) -> None: ...


def run_graph(graph: dict[Task, frozenset[Task]], start: Callable[[Task, bool], subprocess.Popen], jobs: int,
              watcher: Watcher | None = None) -> int:
    """Run the graph with at most `jobs` tasks at once; 0, or the exit code of the first task that failed.

    start(task, alone): `alone` is True when nothing else runs or is ready, so nothing else can start before the
    task ends (calibrate and report, at the end): the shell gives such a task every core."""
    watcher = watcher or Watcher()
    pending = dict(graph)
    running: dict[Task, tuple[subprocess.Popen, float]] = {}
    done: set[Task] = set()
    failure = 0
    started = 0
    while running or (pending and not failure):
        if not failure:
            ready = [t for t, needs in pending.items() if needs <= done]
            for task in ready:
                if len(running) >= jobs:
                    break
                alone = not running and len(ready) == 1
                started += 1
                log.event("task_start", task=task.label, running=len(running) + 1, alone=alone)
                watcher.started(task, started, len(graph))
                running[task] = (start(task, alone), time.monotonic())
                del pending[task]
        if not running:
            break
        time.sleep(_POLL_SECONDS)
        watcher.tick()
        for task, (process, began) in list(running.items()):
            code = process.poll()
            if code is None:
                continue
            del running[task]
            seconds = round(time.monotonic() - began, 1)
            watcher.finished(task, code, seconds)
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


class Child:
    """A task's process with its stderr read line by line on a thread: the runner never blocks on a full pipe."""

    def __init__(self, task: Task, process: subprocess.Popen, lines: "queue.Queue[tuple[Task, str]]"):
        self.task, self.process = task, process
        self._reader = threading.Thread(target=self._read, args=(lines,), daemon=True)
        self._reader.start()

    def _read(self, lines: "queue.Queue[tuple[Task, str]]") -> None:
        for line in self.process.stderr:
            lines.put((self.task, line.rstrip("\n")))

    def poll(self) -> int | None:
        code = self.process.poll()
        if code is not None:
            # Every line the task wrote is read before its end is reported (a grandchild that keeps the pipe open
            # cannot hold the run: after 10 s its remaining lines are dropped).
            self._reader.join(timeout=10)
        return code


class ChildOutput(Watcher):
    """Reads the children's lines. Through a pipe it passes each on unchanged (cluster logs see what a single task
    would write); on a terminal it draws: one permanent line per task as it ends, a live line with the progress of
    every running task, warnings and errors in full (every event with -v). Keeps each task's last lines for the
    failure summary."""

    def __init__(self, lines: "queue.Queue[tuple[Task, str]]", draw: bool, verbose: bool):
        self.lines, self.draw, self.verbose = lines, draw, verbose
        self.began = time.monotonic()
        self.index: dict[Task, int] = {}
        self.total = 0
        self.finished_count = 0
        self.running: dict[Task, str] = {}  # task -> its progress text
        self.tails: dict[Task, deque[str]] = {}
        self.first_failure: Task | None = None

    def started(self, task: Task, index: int, total: int) -> None:
        self.index[task], self.total = index, total
        self.running[task] = ""
        self.tails[task] = deque(maxlen=_ERROR_TAIL)
        self._status(force=True)

    def tick(self) -> None:
        while True:
            try:
                task, line = self.lines.get_nowait()
            except queue.Empty:
                break
            self._line(task, line)
        self._status()

    def finished(self, task: Task, code: int, seconds: float) -> None:
        self.tick()
        self.running.pop(task, None)
        self.finished_count += 1
        if code != 0 and self.first_failure is None:
            self.first_failure = task
        if self.draw:
            outcome = log.duration(seconds) if code == 0 else f"failed (exit {code}) after {log.duration(seconds)}"
            log.screen.line(f"{self._name(task)} ... {outcome}")
            self._status(force=True)

    def last_error(self, task: Task) -> str | None:
        """The task's last line that is not a record (its error message), else its last error-level record."""
        for line in reversed(self.tails.get(task, ())):
            if line.strip():
                return line.strip()
        return None

    def _name(self, task: Task) -> str:
        return f"[{self.index[task]}/{self.total}] {task.label}"

    def _line(self, task: Task, line: str) -> None:
        record = _parse(line)
        if record is None:
            self.tails[task].append(line)
        if not self.draw:
            log.write_line(line)
            return
        if record is None:  # tracebacks, Python warnings, anything not ours: in full
            log.screen.line(f"{task.label}: {line}")
            return
        name = str(record.pop("event"))
        record.pop("ts", None)
        if name == "progress":
            self.running[task] = f"{record.get('desc')} {log.bar(int(record.get('done') or 0), record.get('total'))}"
            return
        if self.verbose:
            log.screen.line(f"[reid-batch] {task.label}: {log.human_text(name, record)}")
        elif log.is_warning(name, record):
            log.screen.line(f"warning: {task.label}: {log.human_text(name, record)}")

    def _status(self, force: bool = False) -> None:
        if not self.draw:
            return
        elapsed = log.duration(time.monotonic() - self.began)
        parts = [f"{log.bar(self.finished_count, self.total, width=10)} tasks, {elapsed}"]
        parts += [f"{task.label} {text}".rstrip() for task, text in self.running.items()]
        log.screen.show(" | ".join(parts), force=force)


def _parse(line: str) -> dict | None:
    if not line.startswith("{"):
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and "event" in record else None


def run_parallel(manifest: Manifest, manifest_path: str, jobs: int, output: str | None = None) -> Outcome:
    """The shell: one `python -m reid_batch` child per task, writing JSON lines that this process reads."""
    draw = log.human()
    environment = {k: v for k, v in os.environ.items() if k not in _ARRAY_VARIABLES}
    environment[log.FORMAT_VARIABLE] = "json"
    environment[log.RUN_TASK_VARIABLE] = "1"
    if draw:
        environment[log.PROGRESS_SECONDS_VARIABLE] = _LIVE_PROGRESS_SECONDS
    cores = os.cpu_count() or 1
    chosen = "OMP_NUM_THREADS" in environment
    graph = task_graph(manifest)
    lines: "queue.Queue[tuple[Task, str]]" = queue.Queue()
    output_reader = ChildOutput(lines, draw=draw, verbose=log.verbose())

    def start(task: Task, alone: bool) -> Child:
        command = [sys.executable, "-m", "reid_batch", task.stage, manifest_path]
        if task.target is not None:
            command += ["--target", task.target]
        if output is not None:
            command += ["--output", output]
        threads = environment["OMP_NUM_THREADS"] if chosen else str(cores if alone else max(1, cores // jobs))
        process = subprocess.Popen(command, env={**environment, "OMP_NUM_THREADS": threads}, stderr=subprocess.PIPE,
                                   text=True, encoding="utf-8", errors="replace", bufsize=1)
        return Child(task, process, lines)

    began = time.monotonic()
    with log.capture() as records:
        try:
            code = run_graph(graph, start, jobs, output_reader)
        finally:
            if draw:
                log.screen.clear()
        outcome = Outcome(exit_code=code, tasks=len(graph), seconds=round(time.monotonic() - began, 1))
        failed = output_reader.first_failure
        if failed is not None:
            outcome.failed_task = failed.label
            outcome.error = output_reader.last_error(failed)
            outcome.log_key = task_log_key(failed.stage, failed.target)
        log.event("run_done" if code == 0 else "run_failed", jobs=jobs, tasks=len(graph), seconds=outcome.seconds,
                  exit_code=code)
    save_task_log(manifest, task_log_key(RUN_LOG), records)
    return outcome
