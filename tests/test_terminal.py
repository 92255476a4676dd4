"""The terminal experience: what a person sees on a terminal, what a pipe gets, what the run keeps.

One tiny pipeline run under a pseudo-terminal, the way a person runs it; then the same run, already complete, through a
pipe; the log files the first run left in its output.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time

import pytest
import yaml

from reid_batch import log
from reid_batch.manifest import parse_manifest
from reid_batch.runner import task_graph
from helpers import evaluation_inputs, evaluation_manifest

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_TASK_LINE = re.compile(r"^\[(\d+)/(\d+)\] (\S+) \.\.\. (\d+\.\d s|\d+ min \d\d s)$")


def run_in_terminal(command: list[str], environment: dict, timeout: float, columns: int = 160) -> tuple[int, str]:
    """Run `command` with stdin, stdout and stderr on a pseudo-terminal; its exit code and everything it wrote."""
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    process = subprocess.Popen(command, stdin=follower, stdout=follower, stderr=follower, env=environment,
                               close_fds=True)
    os.close(follower)
    written = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed: every process that held it has exited
                break
            if not chunk:
                break
            written += chunk
        elif process.poll() is not None:
            break
    else:
        process.kill()
        raise AssertionError(f"timed out; last output:\n{written[-3000:].decode(errors='replace')}")
    os.close(leader)
    return process.wait(timeout=30), written.decode("utf-8", errors="replace")


def lines_a_person_sees(written: str) -> list[str]:
    """The lines left on the screen: each newline-ended line as its last carriage return left it, without colours.
    The live status line is only ever redrawn with a carriage return, so it adds no line of its own."""
    text = written.replace("\r\n", "\n")  # the terminal's own output translation
    return [_ANSI.sub("", line.rsplit("\r", 1)[-1]) for line in text.split("\n")[:-1]]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("terminal")
    document = evaluation_manifest(root, evaluation_inputs(root), str(root / "out")).model_dump(mode="json")
    document["targets"] = document["targets"][:1]
    manifest = parse_manifest(document)
    path = root / "manifest.yaml"
    path.write_text(yaml.safe_dump(manifest.model_dump(mode="json")))
    environment = {k: v for k, v in os.environ.items() if not k.startswith("REID_BATCH_")}
    # An array variable in the caller's environment must not reach the children: each runs every shard.
    environment.update(OMP_NUM_THREADS="1", TERM="xterm", SLURM_ARRAY_TASK_ID="1")
    code, written = run_in_terminal([sys.executable, "-m", "reid_batch", "run", str(path), "--jobs", "2"],
                                    environment, timeout=900)
    assert code == 0, written[-5000:]
    return manifest, path, environment, written


@pytest.mark.slow
def test_a_terminal_shows_one_line_per_task_the_warnings_and_a_summary_naming_the_report(tiny_run):
    manifest, _, _, written = tiny_run
    graph = task_graph(manifest)
    seen = lines_a_person_sees(written)
    tasks = [m for m in map(_TASK_LINE.match, seen) if m]
    assert sorted(m.group(3) for m in tasks) == sorted(t.label for t in graph)  # each task once, with its time
    assert sorted(int(m.group(1)) for m in tasks) == list(range(1, len(graph) + 1))
    assert all(int(m.group(2)) == len(graph) for m in tasks)
    summary_start = next(i for i, line in enumerate(seen) if line.startswith("Report: "))
    summary = seen[summary_start:]
    report = summary[0].removeprefix("Report: ")
    assert os.path.isabs(report) and report.endswith("report/report.html") and os.path.isfile(report)
    name = manifest.targets[0].name
    assert re.match(rf"^  {re.escape(name)}  (leak detected|L [+-]\d\.\d{{3}}) ", summary[1]), summary
    assert re.match(r"^Done in (\d+\.\d s|\d+ min \d\d s)\.$", summary[-1]) and len(summary) == 3
    others = [line for line in seen[:summary_start] if not _TASK_LINE.match(line)]
    # Nothing but task lines and warnings in full: no event lines, no JSON, no stray blank lines.
    assert all(line.startswith("warning: ") for line in others), others
    assert len(seen) <= len(graph) + len(others) + len(summary)
    # The live line drew progress bars (overwritten in place, so absent from the lines above).
    assert re.search(r"\[#*\.*\] \d+/\d+", _ANSI.sub("", written))


@pytest.mark.slow
def test_parallel_run_matches_the_pipeline_contract(tiny_run):
    """Two tasks at a time, each a child process: every task starts after what it needs is done (from the run's log)."""
    from reid_batch.runtime import run_store

    manifest = tiny_run[0]
    records = _run_log(manifest)
    first = records[: next(i for i, r in enumerate(records) if r["event"] == "run_done") + 1]
    starts = {r["task"]: i for i, r in enumerate(first) if r["event"] == "task_start"}
    finishes = {r["task"]: i for i, r in enumerate(first) if r["event"] == "task_done"}
    graph = task_graph(manifest)
    assert set(starts) == set(finishes) == {t.label for t in graph}
    for task, needs in graph.items():
        assert all(finishes[n.label] < starts[task.label] for n in needs), task
    assert max(r["running"] for r in first if r["event"] == "task_start") == 2
    store = run_store(manifest)
    name = manifest.targets[0].name
    # Every shard of every sharded stage ran (the SLURM variable did not reach the children).
    assert store.read_json(f"{name}/selection/thresholds.json")["counts"]["candidates"] == 64
    assert store.read_json("report/report.json")["targets"][name]["risk"]["likely_samples"] == 7


@pytest.mark.slow
def test_every_event_of_every_task_is_kept_in_the_run(tiny_run):
    from reid_batch.runtime import run_store

    manifest, _, _, _ = tiny_run
    store = run_store(manifest)
    logs = store.list("logs")
    name = manifest.targets[0].name
    expected = {f"logs/{t.stage}" + (f"-{t.target}" if t.target else "") + ".jsonl" for t in task_graph(manifest)}
    assert expected | {"logs/run.jsonl"} == set(logs)
    records = {key: [json.loads(line) for line in store.read_bytes(key).decode().splitlines()] for key in logs}
    assert {"task_start", "task_done", "run_done"} <= {r["event"] for r in records["logs/run.jsonl"]}
    sample = [r["event"] for r in records[f"logs/sample-{name}.jsonl"]]
    assert "sample_shard_done" in sample and "progress" in sample
    assert not any(r.get("live") for rs in records.values() for r in rs)  # the parent's live updates stay out
    finetune = [r for r in records[f"logs/finetune-{name}.jsonl"] if r["event"] == "finetune_done"]
    assert len(finetune) == 1 and finetune[0]["target"] == name


@pytest.mark.slow
def test_through_a_pipe_only_json_lines_and_a_json_summary(tiny_run):
    """The same, already complete run again through pipes (a cluster's log): JSON lines only, as before."""
    manifest, path, environment, _ = tiny_run
    done = subprocess.run([sys.executable, "-m", "reid_batch", "run", str(path), "--jobs", "2"],
                          capture_output=True, text=True, env=environment, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in done.stderr.splitlines()]  # a line that is not JSON fails here
    assert {"task_start", "task_done", "run_done"} <= {r["event"] for r in records}
    assert not any(r.get("live") for r in records)
    (summary,) = [json.loads(line) for line in done.stdout.splitlines()]
    assert summary["event"] == "run_summary" and summary["exit_code"] == 0
    assert summary["report"].endswith("report/report.html")
    assert set(summary["headlines"]) == {manifest.targets[0].name}
    # A re-run appends to the task's log: both attempts are kept.
    store_runs = [r for r in _run_log(manifest) if r["event"] == "run_done"]
    assert len(store_runs) == 2


def _run_log(manifest) -> list[dict]:
    from reid_batch.runtime import run_store

    return [json.loads(line) for line in run_store(manifest).read_bytes("logs/run.jsonl").decode().splitlines()]


def test_a_failed_run_ends_with_the_failing_task_its_exit_code_and_error(tmp_path):
    """A world root that is a file: make-phantoms fails; the ending names the task, the code and the error."""
    document = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), "..", "manifests", "demo.yaml")))
    (tmp_path / "world").write_text("not a directory")
    document["data"]["synthetic"]["root"] = str(tmp_path / "world")
    document["output"] = {"uri": str(tmp_path / "out")}
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump(document))
    environment = {k: v for k, v in os.environ.items() if not k.startswith("REID_BATCH_")}
    code, written = run_in_terminal([sys.executable, "-m", "reid_batch", "run", str(path), "--jobs", "2"],
                                    {**environment, "TERM": "xterm"}, timeout=300)
    seen = lines_a_person_sees(written)
    assert code != 0
    failed = [line for line in seen if line.startswith("Failed in make-phantoms")]
    assert failed == [f"Failed in make-phantoms (exit {code}) after {failed[0].split(' after ')[1]}"], seen
    error = seen[seen.index(failed[0]) + 1]
    assert error.startswith("  reid-batch: "), seen


def test_progress_is_a_bar_on_a_terminal_and_records_on_a_pipe(capsys, monkeypatch):
    monkeypatch.delenv(log.FORMAT_VARIABLE, raising=False)
    log.configure(format="json")
    try:
        with log.capture() as records:
            assert list(log.progress(range(120), desc="things", total=120, every=50)) == list(range(120))
        stderr = capsys.readouterr().err
        kept = [json.loads(r) for r in records]
        assert [r["done"] for r in kept] == [50, 100, 120] and stderr.count("\n") == 3
        log.configure(format="human")
        with log.task("[1/1] things"), log.capture() as records:
            list(log.progress(range(30), desc="things", total=30))
            log.event("quiet_event", n=1)
            log.event("compile_failed", error="no compiler")
        stderr = capsys.readouterr().err
        seen = lines_a_person_sees(stderr)
        assert seen[0] == "warning: compile_failed error=no compiler"
        assert _TASK_LINE.match(seen[1]) and len(seen) == 2
        assert "[####################] 30/30" in stderr  # the bar, drawn on the live line
        assert [json.loads(r)["event"] for r in records] == ["progress", "quiet_event", "compile_failed"]
    finally:
        log.configure()
