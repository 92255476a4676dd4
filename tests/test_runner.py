"""`reid-batch run --jobs N`: the task graph (a real parallel run of the tiny pipeline: tests/test_terminal.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from reid_batch.manifest import parse_manifest
from reid_batch.runner import Task, run_graph, task_graph


def _demo_manifest():
    document = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), "..", "manifests", "demo.yaml")))
    return parse_manifest(document)


def test_graph_orders_every_stage_of_every_target():
    manifest = _demo_manifest()
    graph = task_graph(manifest)
    names = [t.name for t in manifest.targets]
    attacked = [t.name for t in manifest.targets if "ppa" in t.attacks]
    assert attacked == ["identity", "identity-negative"]
    # run-level: phantoms, prior, demographics, reid, calibrate, report; per target: train-target,
    # mahalanobis-reference, finetune, sample, select, score, evaluate; ppa only where a target lists it
    assert len(graph) == 6 + 7 * len(names) + len(attacked)
    for name in names:
        assert graph[Task("sample", name)] == {Task("finetune", name), Task("mahalanobis-reference", name)}
        assert graph[Task("finetune", name)] == {Task("train-prior"), Task("train-target", name)}
        assert graph[Task("score", name)] == {Task("select", name), Task("train-demographics")}
        ppa = {Task("ppa", name)} if name in attacked else set()
        assert graph[Task("evaluate", name)] == {Task("score", name), Task("train-reid")} | ppa
        assert (Task("ppa", name) in graph) == (name in attacked)
    for name in attacked:
        assert graph[Task("ppa", name)] == {Task("train-prior"), Task("train-target", name), Task("finetune", name)}
    assert graph[Task("calibrate")] == {Task("evaluate", n) for n in names}
    assert graph[Task("report")] == {Task("calibrate"), Task("train-reid")}
    # Insertion order is a valid topological order: every task comes after what it needs.
    seen: set[Task] = set()
    for task, needs in graph.items():
        assert needs <= seen, task
        seen.add(task)


def test_demographic_feedback_makes_finetune_wait_for_the_demographic_model():
    document = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), "..", "manifests", "demo.yaml")))
    document["finetune"]["demographic_feedback"] = {"weight": 1.0}
    manifest = parse_manifest(document)
    graph = task_graph(manifest)
    for spec in manifest.targets:
        assert graph[Task("finetune", spec.name)] == {Task("train-prior"), Task("train-target", spec.name),
                                                      Task("train-demographics")}
    assert Task("train-demographics") not in task_graph(_demo_manifest())[Task("finetune", "cnn")]


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


def test_the_cluster_plan_runs_ppa_in_the_sample_tasks_only_where_a_target_lists_it():
    from reid_batch.deploy import plan, shell_summary

    with_ppa = _demo_manifest()
    document = with_ppa.model_dump(mode="json")
    for target in document["targets"]:
        target["attacks"] = ["study"]
    without = parse_manifest(document)
    assert [j.stages for j in plan(with_ppa) if j.name == "sample"] == [("ppa", "sample")]
    assert [j.stages for j in plan(without) if j.name == "sample"] == [("sample",)]
    assert "sample_stages='ppa sample'" in shell_summary(with_ppa)
    assert "sample_stages=sample\n" in shell_summary(without)
