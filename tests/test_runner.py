"""`reid-batch run --jobs N`: the task graph, and a real parallel run of the tiny pipeline in child processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from reid_batch.manifest import parse_manifest
from reid_batch.runner import Task, run_graph, task_graph
from test_evaluate_report import _inputs, make_manifest


def _demo_manifest():
    document = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), "..", "manifests", "demo.yaml")))
    return parse_manifest(document)


def test_graph_orders_every_stage_of_every_target():
    manifest = _demo_manifest()
    graph = task_graph(manifest)
    names = [t.name for t in manifest.targets]
    # run-level: phantoms, prior, demographics, reid, calibrate, report; per target: train-target,
    # mahalanobis-reference, finetune, sample, select, score, evaluate
    assert len(graph) == 6 + 7 * len(names)
    for name in names:
        assert graph[Task("sample", name)] == {Task("finetune", name), Task("mahalanobis-reference", name)}
        assert graph[Task("finetune", name)] == {Task("train-prior"), Task("train-target", name)}
        assert graph[Task("score", name)] == {Task("select", name), Task("train-demographics")}
        assert graph[Task("evaluate", name)] == {Task("score", name), Task("train-reid")}
    assert graph[Task("calibrate")] == {Task("evaluate", n) for n in names}
    assert graph[Task("report")] == {Task("calibrate"), Task("train-reid")}
    # Insertion order is a valid topological order: every task comes after what it needs.
    seen: set[Task] = set()
    for task, needs in graph.items():
        assert needs <= seen, task
        seen.add(task)


class _Child:
    """A stand-in process whose exit code the test sets: run_graph only polls."""

    def __init__(self, code: int, log: list, task: Task):
        self.code, self.polls = code, 0
        log.append(task)

    def poll(self):
        self.polls += 1
        return self.code if self.polls > 1 else None


def test_a_failure_stops_new_starts_and_is_returned():
    manifest = _demo_manifest()
    graph = task_graph(manifest)
    started: list[Task] = []
    code = run_graph(graph, lambda task, alone: _Child(2 if task.stage == "train-prior" else 0, started, task), jobs=2)
    assert code == 2
    assert Task("train-prior") in started
    assert not any(t.stage in {"finetune", "sample", "report"} for t in started)


def test_parallel_run_matches_the_pipeline_contract(tmp_path):
    """The tiny pipeline as child processes, two at a time: every task starts after what it needs is done."""
    from reid_batch.runtime import run_store

    document = make_manifest(tmp_path, _inputs(tmp_path), str(tmp_path / "out")).model_dump(mode="json")
    document["targets"] = document["targets"][:1]  # one target keeps it short: ~11 processes, each importing torch
    manifest = parse_manifest(document)
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump(manifest.model_dump(mode="json")))
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "SLURM_ARRAY_TASK_ID": "1"}  # must not leak to children
    result = subprocess.run([sys.executable, "-m", "reid_batch", "run", str(path), "--jobs", "2"],
                            capture_output=True, text=True, env=environment, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    starts = {e["task"]: i for i, e in enumerate(events) if e["event"] == "task_start"}
    finishes = {e["task"]: i for i, e in enumerate(events) if e["event"] == "task_done"}
    graph = task_graph(manifest)
    assert set(starts) == set(finishes) == {t.label for t in graph}
    for task, needs in graph.items():
        assert all(finishes[n.label] < starts[task.label] for n in needs), task
    assert max(e["running"] for e in events if e["event"] == "task_start") == 2
    store = run_store(manifest)
    assert store.is_committed("report")
    name = manifest.targets[0].name
    # Every shard of every sharded stage ran (the SLURM variable did not reach the children).
    assert store.read_json(f"{name}/selection/thresholds.json")["counts"]["candidates"] == 64
    assert store.read_json("report/report.json")["targets"][name]["risk"]["likely_samples"] == 7


def test_a_task_that_runs_alone_is_told_so():
    """calibrate and report start when nothing else runs or waits: the shell gives them every core."""
    manifest = _demo_manifest()
    graph = task_graph(manifest)
    alone: dict[str, bool] = {}

    def start(task, by_itself):
        alone[task.label] = by_itself
        return _Child(0, [], task)

    assert run_graph(graph, start, jobs=2) == 0
    assert alone["calibrate"] and alone["report"]
    assert alone["make-phantoms"] and not alone["train-prior"]  # phantoms first, then prior, targets... side by side
    assert sum(alone.values()) < len(alone) / 2


@pytest.mark.parametrize("jobs", ["0", "-1", "many"])
def test_bad_jobs_value_exits_2(jobs, tmp_path):
    result = subprocess.run([sys.executable, "-m", "reid_batch", "run", "missing.yaml", "--jobs", jobs],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "--jobs" in result.stderr
