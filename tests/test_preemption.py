"""Pre-emption and concurrency: SIGKILL at random points + resume == an uninterrupted run, for finetune, sample,
select and score; SIGTERM -> exit 75 after committing, then resume == uninterrupted; two tasks racing on one
shard (local and S3) never corrupt it.

The stages run as `reid-batch <stage> MANIFEST` (reid_batch.cli.main) in processes forked from a fork server
that imported torch and reid-batch once, so a kill costs no interpreter start-up; each is a real process,
killed with a real SIGKILL/SIGTERM. Kill times come from a seeded RNG and are printed (pytest -s shows them).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from reid_batch.manifest import parse_manifest
from reid_batch.preemption import EXIT_REQUEUE
from reid_batch.runtime import run_store
from reid_batch.stages import score as scoring
from reid_batch import layout
from helpers import build_inputs, make_manifest

REPO = Path(__file__).resolve().parents[1]
SEED = 9009
STAGES = ("finetune", "sample", "select", "score")
KILLS = {"finetune": 6, "sample": 6, "select": 4, "score": 5}  # 21 SIGKILLs in all
ATTEMPT_TIMEOUT_S = 120
STAGE_COMMITS = {"finetune": "finetune*/**/_COMMITTED", "sample": "candidates/**/_COMMITTED",
                 "select": "selection/_COMMITTED", "score": "scores*/**/_COMMITTED"}


# ------------------------------------------------------------------------------------------ forked CLI runs


def _cli_child(argv: list[str], log_path: str, env: dict[str, str]) -> None:
    os.environ.update(env)  # the fork server's environment is the one it started with
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    torch.set_num_threads(1)
    from reid_batch.cli import main

    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@pytest.fixture(scope="module")
def forks():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "accelerate", "reid_batch.cli", "reid_batch.stages.finetune",
                                    "reid_batch.stages.sample", "reid_batch.stages.select", "reid_batch.stages.score"])
    warm_up = context.Process(target=os.getpid)  # starts the server: its imports are not part of any timing
    warm_up.start()
    warm_up.join(ATTEMPT_TIMEOUT_S)
    assert warm_up.exitcode == 0
    return context


def start(forks, stage: str, manifest_path: Path, log_path: Path, *options: str, env: dict[str, str] | None = None):
    env = {**{k: v for k, v in os.environ.items() if k.startswith("AWS_")}, **(env or {})}
    process = forks.Process(target=_cli_child, args=([stage, str(manifest_path), *options], str(log_path), env))
    process.start()
    return process


def run_to_end(forks, stage: str, manifest_path: Path, log_path: Path) -> float:
    started = time.monotonic()
    process = start(forks, stage, manifest_path, log_path)
    process.join(ATTEMPT_TIMEOUT_S)
    assert process.exitcode == 0, f"{stage} exited {process.exitcode}: {log_path.read_text()[-3000:]}"
    return time.monotonic() - started


def events(log_path: Path, name: str) -> list[dict]:
    found = []
    for line in log_path.read_text().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("event") == name:
                found.append(record)
    return found


# ------------------------------------------------------------------------------------------ the tiny pipeline


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    found = build_inputs(tmp_path_factory.mktemp("inputs"))
    private = tmp_path_factory.mktemp("private")
    rng = np.random.default_rng(0)
    for i, patient in enumerate(["p1", "p1", "p2"]):
        (private / patient).mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(24, 24), dtype=np.uint8), mode="L").save(private / patient / f"{i}.png")
    return {**found, "private": private}


def document(inputs: dict[str, Path], output: str, s3_endpoint: str | None = None) -> dict:
    data = {"private": {"format": "folder", "root": str(inputs["private"])},
            "public": {"format": "folder", "root": str(inputs["private"])}}
    manifest = make_manifest(inputs, output, s3_endpoint, data=data,
                             sampling_options={"num_candidates": 24, "num_shards": 2, "chunk_size": 2, "batch_size": 2},
                             demographics={"num_shards": 3})
    doc = manifest.model_dump(mode="json")
    doc["finetune"].update(steps=12, batch_size=8, checkpoint_every=3, log_every=100, lr=1e-3)
    return doc


def write_manifest(doc: dict, output: Path) -> Path:
    path = output.parent / f"{output.name}.yaml"
    path.write_text(yaml.safe_dump({**doc, "output": {**doc["output"], "uri": str(output)}}))
    return path


@pytest.fixture(scope="module")
def clean(forks, inputs, tmp_path_factory) -> dict:
    """The uninterrupted pipeline: the output before each stage (copied), after the last, and stage durations."""
    root = tmp_path_factory.mktemp("clean")
    doc = document(inputs, str(root / "out"))
    output = root / "out"
    output.mkdir()
    path = write_manifest(doc, output)
    before, seconds = {}, {}
    for stage in STAGES:
        before[stage] = root / f"before-{stage}"
        shutil.copytree(output, before[stage])
        seconds[stage] = run_to_end(forks, stage, path, root / f"{stage}.log")
    print(f"clean run seconds per stage: { {k: round(v, 2) for k, v in seconds.items()} }")
    return {"doc": doc, "before": before, "after": output, "seconds": seconds, "run_id": doc["run_id"]}


def _frame(path: Path) -> pd.DataFrame:
    return pq.read_table(path).to_pandas()


def assert_same_outputs(stage: str, got_root: Path, clean: dict) -> None:
    """The stage's outputs under got_root equal the uninterrupted run's (bit for bit where it is deterministic)."""
    got, want = got_root / clean["run_id"] / "cnn", clean["after"] / clean["run_id"] / "cnn"
    if stage == "finetune":
        assert (got / "finetune" / "_COMMITTED").exists()
        expected, actual = load_file(str(want / "finetune/generator.safetensors")), load_file(str(got / "finetune/generator.safetensors"))
        assert expected.keys() == actual.keys()
        for key in expected:
            assert torch.equal(actual[key], expected[key]), key
        columns = ["step", "bn_stats", "feature_stats", "logits", "tv", "total", "grad_norm"]
        pd.testing.assert_frame_equal(_frame(got / "finetune/losses.parquet")[columns],
                                      _frame(want / "finetune/losses.parquet")[columns])
        assert (got / "finetune/samples_after.png").read_bytes() == (want / "finetune/samples_after.png").read_bytes()
        assert not (got / "finetune-checkpoints").exists()
    elif stage == "sample":
        store = run_store(parse_manifest({**clean["doc"], "output": {"uri": str(got_root)}}))
        visible = [k for k in store.list("cnn/candidates")]
        assert not [k for k in visible if "_tmp-" in k]
        chunk_files = sorted(k for k in visible if k.endswith(".parquet"))
        assert len(chunk_files) == 12 and len(set(chunk_files)) == 12  # one file per chunk, none twice
        rows = pd.concat([_frame(got_root / clean["run_id"] / k) for k in chunk_files]).sort_values("id")
        assert rows["id"].tolist() == list(range(24))  # every candidate once: no duplicate, none missing
        expected = pd.concat([_frame(p) for p in sorted((want / "candidates").rglob("*.parquet"))]).sort_values("id")
        pd.testing.assert_frame_equal(rows.reset_index(drop=True), expected.reset_index(drop=True))
        for shard in range(2):
            assert (got / f"candidates/shard={shard}/_SHARD.json").exists()
    elif stage == "select":
        pd.testing.assert_frame_equal(_frame(got / "selection/selected.parquet"), _frame(want / "selection/selected.parquet"))
        assert json.loads((got / "selection/thresholds.json").read_text()) == \
            json.loads((want / "selection/thresholds.json").read_text())
    else:
        got, want = got.parent, want.parent
        for prefix in [layout.scores_prefix("cnn", i) for i in range(3)] + [layout.reference_prefix("cnn")]:
            assert (got / prefix / "_COMMITTED").exists(), prefix
            pd.testing.assert_frame_equal(_frame(got / prefix / layout.SCORES_FILE),
                                          _frame(want / prefix / layout.SCORES_FILE))
            files = {p.relative_to(want / prefix): p.read_bytes() for p in (want / prefix).rglob("*.png")}
            assert files or prefix == layout.reference_prefix("cnn")
            assert {p.relative_to(got / prefix): p.read_bytes() for p in (got / prefix).rglob("*.png")} == files


# ------------------------------------------------------------------------------------------ SIGKILL


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_sigkill_at_random_points_then_resume_equals_the_uninterrupted_run(stage, forks, clean, tmp_path):
    """KILLS[stage] SIGKILLs at seeded random times; after each chain of kills a plain re-run completes the stage,
    and its outputs are compared with the uninterrupted run's. A chain whose attempt ends before its kill time is
    verified as is and a fresh chain starts, so the number of kills is exactly KILLS[stage]."""
    rng = np.random.default_rng([SEED, STAGES.index(stage)])
    horizon = 0.9 * clean["seconds"][stage]
    kills, chains, finished_early = 0, 0, 0
    while kills < KILLS[stage]:
        chains += 1
        output = tmp_path / f"chain{chains}"
        shutil.copytree(clean["before"][stage], output)
        path = write_manifest(clean["doc"], output)
        while kills < KILLS[stage]:
            delay = float(rng.uniform(0.0, horizon))
            log_path = tmp_path / f"chain{chains}-attempt.log"
            process = start(forks, stage, path, log_path)
            process.join(delay)
            if process.exitcode is None:
                os.kill(process.pid, signal.SIGKILL)  # the process may still finish first, by a hair
                process.join(ATTEMPT_TIMEOUT_S)
            if process.exitcode == -signal.SIGKILL:
                kills += 1
                commits = len(list((output / clean["run_id"] / "cnn").glob(STAGE_COMMITS[stage])))
                print(f"{stage}: SIGKILL {kills} at {delay:.3f} s (chain {chains}, {commits} of the stage's commits so far)")
            else:
                assert process.exitcode == 0, log_path.read_text()[-3000:]
                finished_early += 1
                print(f"{stage}: attempt finished before its kill time {delay:.3f} s (chain {chains})")
                break
        if process.exitcode != 0:
            run_to_end(forks, stage, path, tmp_path / f"chain{chains}-final.log")
        assert_same_outputs(stage, output, clean)
    print(f"{stage}: {kills} SIGKILLs survived over {chains} chain(s), {finished_early} attempt(s) finished first")


# ------------------------------------------------------------------------------------------ SIGTERM


def test_sigterm_outside_a_safe_region_stops_at_once_inside_one_at_the_next_check_and_twice_at_once():
    from reid_batch import preemption

    with preemption.handle_termination():
        with pytest.raises(preemption.Preempted):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises as soon as the signal is handled
    with preemption.handle_termination(), preemption.deferred_region():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert preemption.requested()  # recorded, not raised: the unit in progress may finish
        with pytest.raises(preemption.Preempted, match="SIGTERM; stopped at unit 3"):
            preemption.check("unit 3")
        with pytest.raises(preemption.Preempted):
            os.kill(os.getpid(), signal.SIGTERM)  # a second request does not wait
            time.sleep(5)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL and not preemption.requested()



def _wait_for(condition, process, log_path: Path, what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.exitcode is None, f"ended before {what}: {log_path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_sigterm_commits_exits_75_and_a_rerun_completes_identically(stage, forks, clean, tmp_path):
    output = tmp_path / "out"
    # The signal races the stage's last units (score's shards take milliseconds on an idle machine): an attempt that
    # finished before the signal landed proves nothing, and is made again from the same starting outputs.
    for attempt in range(3):
        shutil.rmtree(output, ignore_errors=True)
        shutil.copytree(clean["before"][stage], output)
        path = write_manifest(clean["doc"], output)
        log_path = tmp_path / f"terminated-{attempt}.log"
        base = output / clean["run_id"] / "cnn"
        process = start(forks, stage, path, log_path)
        # Signal once the stage is busy with its units: after a first checkpoint / chunk, or once the model loaded.
        ready = {
            "finetune": lambda: any(base.glob("finetune-checkpoints/step-*/_COMMITTED")),
            "sample": lambda: any(base.glob("candidates/shard=0/chunk=*/_COMMITTED")),
            "select": lambda: log_path.exists() and "storage_open" in log_path.read_text(),
            "score": lambda: any(base.glob("scores/shard=0/_COMMITTED")),
        }[stage]
        _wait_for(ready, process, log_path, "work to stop")
        signalled = time.monotonic()
        os.kill(process.pid, signal.SIGTERM)
        process.join(ATTEMPT_TIMEOUT_S)
        stopped = time.monotonic() - signalled
        text = log_path.read_text()
        print(f"{stage}: SIGTERM -> exit {process.exitcode} after {stopped:.2f} s (attempt {attempt + 1})")
        if process.exitcode != 0:
            break
    else:
        pytest.fail(f"{stage} finished before SIGTERM could stop it, 3 times; make it longer")
    assert process.exitcode == EXIT_REQUEUE, text[-3000:]
    assert "pre-empted" in text and "Traceback" not in text
    assert stopped < 30  # Kubernetes' default grace period

    if stage == "finetune":
        # The step it stopped at was checkpointed first (not only the every-3-steps ones).
        stopped_at = int(events(log_path, "preempted")[0]["at"].rsplit(" ", 1)[1])
        committed = sorted(int(p.parent.name[5:]) for p in base.glob("finetune-checkpoints/step-*/_COMMITTED"))
        assert committed[-1] == stopped_at and not (base / "finetune/_COMMITTED").exists()
    elif stage == "sample":
        # The chunk in progress was finished and committed: every chunk before the one it stopped at, none after.
        at = events(log_path, "preempted")[0]["at"]  # "cnn shard S chunk C"
        shard, chunk = int(at.split()[2]), int(at.split()[4])
        done = {(int(p.parent.parent.name[6:]), int(p.parent.name[6:])) for p in base.glob("candidates/shard=*/chunk=*/_COMMITTED")}
        assert done == {(s, c) for s in range(shard + 1) for c in range(6) if (s, c) < (shard, chunk)}

    run_to_end(forks, stage, path, tmp_path / "resumed.log")
    assert_same_outputs(stage, output, clean)


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_after_the_same_chunk(forks, clean, tmp_path):
    """Two gloo ranks (the environment torchrun / accelerate launch gives): only rank 1 is signalled, yet both
    stop at the same chunk boundary, after the main process committed the chunk in progress; both exit 75."""
    import socket

    output = tmp_path / "out"
    shutil.copytree(clean["before"]["sample"], output)
    path = write_manifest(clean["doc"], output)
    base = output / clean["run_id"] / "cnn"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    logs = [tmp_path / f"rank{rank}.log" for rank in range(2)]
    ranks = [start(forks, "sample", path, logs[rank], "--shard", "0",
                   env={"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}) for rank in range(2)]
    try:
        _wait_for(lambda: any(base.glob("candidates/shard=0/chunk=*/_COMMITTED")), ranks[0], logs[0], "a first chunk")
        os.kill(ranks[1].pid, signal.SIGTERM)
        for process in ranks:
            process.join(ATTEMPT_TIMEOUT_S)
    finally:
        for process in ranks:
            if process.exitcode is None:
                process.kill()
    assert [p.exitcode for p in ranks] == [EXIT_REQUEUE, EXIT_REQUEUE], [log.read_text()[-2000:] for log in logs]
    stops = [events(log, "preempted")[0]["at"] for log in logs]
    assert stops[0] == stops[1], stops
    assert events(logs[0], "preempted")[0]["signal"] == "SIGTERM on another process"
    chunk = int(stops[0].split()[4])
    done = sorted(int(p.parent.name[6:]) for p in base.glob("candidates/shard=0/chunk=*/_COMMITTED"))
    assert done == list(range(chunk)) and 0 < chunk < 6
    print(f"2 ranks, SIGTERM to rank 1 only: both stopped before chunk {chunk} of 6, exit 75")


# ------------------------------------------------------------------------------------------ concurrency


@pytest.mark.parametrize("rounds", [6])
def test_racing_commits_of_one_prefix_leave_one_whole_commit(any_store, rounds, capsys):
    """Four writers commit the same prefix at once, round after round, while a reader checks that a commit
    marker, whenever present, vouches for files that are all there, whole; every writer returns normally."""
    from reid_batch.storage import COMMIT_MARKER

    payload = {"part-0.bin": b"a" * 5000, "nested/part-1.bin": b"b" * 70, "summary.json": b"{}\n"}
    problems: list[str] = []
    for round_ in range(rounds):
        prefix = f"race-{round_}"
        barrier = threading.Barrier(5)
        done = threading.Event()

        def writer(index: int) -> None:
            try:
                barrier.wait()
                with any_store.committed(prefix, {"writer": index}) as out:
                    for key, data in payload.items():
                        out.write_bytes(key, data)
            except Exception as error:  # noqa: BLE001 - collected and reported below
                problems.append(f"writer {index}: {type(error).__name__}: {error}")

        def reader() -> None:
            barrier.wait()
            while not done.is_set():
                try:
                    if any_store.is_committed(prefix):
                        listed = {f["key"]: f["size"] for f in any_store.read_commit(prefix)["files"]}
                        for key, size in listed.items():
                            if any_store.read_bytes(f"{prefix}/{key}") != payload[key] or size != len(payload[key]):
                                problems.append(f"{key} differs from what was written")
                except FileNotFoundError as error:
                    problems.append(f"committed but missing: {error}")

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)] + [threading.Thread(target=reader)]
        for thread in threads:
            thread.start()
        for thread in threads[:4]:
            thread.join()
        done.set()
        threads[4].join()
        assert not problems, problems[:5]
        assert sorted(any_store.list(prefix)) == sorted([f"{prefix}/{k}" for k in payload] + [f"{prefix}/{COMMIT_MARKER}"])
        for key, data in payload.items():
            assert any_store.read_bytes(f"{prefix}/{key}") == data
    err = capsys.readouterr().err
    published, skipped = err.count('"commit_published"'), err.count('"commit_skipped"')
    assert published + skipped == 4 * rounds and published >= rounds
    with capsys.disabled():
        print(f"{rounds} rounds x 4 racing writers: {published} published, {skipped} found a commit and discarded theirs")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["local", "s3"])
def test_two_tasks_sampling_one_shard_at_once_both_exit_0_with_one_valid_result(kind, forks, inputs, clean, tmp_path,
                                                                                 request):
    """A scheduler's retry racing the original: two `reid-batch sample --shard 0` processes on one output."""
    if kind == "local":
        uri, endpoint = str(tmp_path / "out"), None
    else:
        uri, settings = request.getfixturevalue("s3_bucket")
        endpoint = settings.endpoint
    doc = document(inputs, uri, endpoint)
    manifest = parse_manifest(doc)
    store = run_store(manifest)
    # The stage-1 output the shard is sampled from: the clean run's, copied in.
    finetune = clean["before"]["sample"] / clean["run_id"] / "cnn" / "finetune"
    with store.committed("cnn/finetune", {"stage": "finetune"}) as out:
        for file in finetune.iterdir():
            if not file.name.startswith("_"):
                out.write_bytes(file.name, file.read_bytes())
    path = tmp_path / "race.yaml"
    path.write_text(yaml.safe_dump(doc))
    logs = [tmp_path / f"racer{i}.log" for i in range(2)]
    racers = [start(forks, "sample", path, log, "--shard", "0") for log in logs]
    for racer, log in zip(racers, logs):
        racer.join(ATTEMPT_TIMEOUT_S)
        assert racer.exitcode == 0, log.read_text()[-3000:]
    texts = [log.read_text() for log in logs]
    skipped = sum(text.count('"commit_skipped"') for text in texts)
    published = sum(text.count('"commit_published"') for text in texts)
    print(f"{kind}: {published} chunk commits published, {skipped} found already committed and discarded")
    assert published + skipped == 2 * 6 and published >= 6  # 6 chunks, each committed by one racer at least

    visible = store.list("cnn/candidates/shard=0")
    chunk_files = [k for k in visible if k.endswith(".parquet")]
    assert len(chunk_files) == 6 and not [k for k in visible if "_tmp-" in k]
    rows = pd.concat([store.read_parquet(k).to_pandas() for k in sorted(chunk_files)]).sort_values("id")
    assert rows["id"].tolist() == list(range(12))
    expected = sampling_rows(clean, shard=0)
    pd.testing.assert_frame_equal(rows.reset_index(drop=True), expected.reset_index(drop=True))
    assert store.exists("cnn/candidates/shard=0/_SHARD.json")


def sampling_rows(clean: dict, shard: int) -> pd.DataFrame:
    base = clean["after"] / clean["run_id"] / "cnn" / "candidates" / f"shard={shard}"
    return pd.concat([_frame(p) for p in sorted(base.rglob("*.parquet"))]).sort_values("id")
