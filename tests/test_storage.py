"""The storage layer, run identically against local disk and a real S3 API (moto server)."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from reid_batch.errors import InputError
from reid_batch.storage import COMMIT_MARKER, S3Settings, Store, open_store

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEMA = pa.schema([("candidate", pa.int64()), ("score", pa.float32())])


def batch(start: int, rows: int) -> pa.RecordBatch:
    ids = list(range(start, start + rows))
    return pa.record_batch([pa.array(ids, pa.int64()), pa.array([i / 7 for i in ids], pa.float32())], schema=SCHEMA)


def raw_files(store: Store) -> list[str]:
    """Every file under the root as the filesystem sees it, staging leftovers included."""
    selector = pafs.FileSelector(store.root, recursive=True, allow_not_found=True)
    start = len(store.root) + 1
    return sorted(i.path[start:] for i in store.filesystem.get_file_info(selector) if i.type == pafs.FileType.File)


def object_versions(store: Store, request) -> dict:
    """Identity of each object that changes on any rewrite: (inode, mtime) locally, (etag, time) on S3."""
    if store.is_local:
        return {key: (os.stat(store.path(key)).st_ino, os.stat(store.path(key)).st_mtime_ns) for key in raw_files(store)}
    client = request.getfixturevalue("s3_client")
    bucket, _, root_prefix = store.root.partition("/")
    heads = {key: client.head_object(Bucket=bucket, Key=f"{root_prefix}/{key}") for key in raw_files(store)}
    return {key: (head["ETag"], head["LastModified"]) for key, head in heads.items()}


# --- single objects ---------------------------------------------------------------------------


def test_bytes_and_json_round_trip_and_overwrite(any_store):
    any_store.write_bytes("ckpt/model.pt", b"\x00v1" * 1000)
    any_store.write_bytes("ckpt/model.pt", b"\x00v2")
    any_store.write_json("report.json", {"b": 1, "a": [1, 2], "é": None})

    assert any_store.read_bytes("ckpt/model.pt") == b"\x00v2"
    assert any_store.read_json("report.json") == {"a": [1, 2], "b": 1, "é": None}
    assert any_store.read_bytes("report.json") == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1,\n  "é": null\n}\n'.encode()
    assert raw_files(any_store) == ["ckpt/model.pt", "report.json"]  # no temporary objects left behind


def test_list_exists_delete(any_store):
    for key in ["b/2.bin", "a/x/1.bin", "a/0.bin", "top.bin"]:
        any_store.write_bytes(key, b"x")

    assert any_store.list() == ["a/0.bin", "a/x/1.bin", "b/2.bin", "top.bin"]
    assert any_store.list("a") == any_store.list("a/") == ["a/0.bin", "a/x/1.bin"]
    assert any_store.list("top.bin") == ["top.bin"]
    assert any_store.list("missing") == []
    assert any_store.exists("a/0.bin") and not any_store.exists("a/9.bin") and not any_store.exists("a")

    any_store.delete("a/0.bin")
    assert any_store.list() == ["a/x/1.bin", "b/2.bin", "top.bin"]
    any_store.delete("a")
    any_store.delete("never-existed")
    assert any_store.list() == ["b/2.bin", "top.bin"]


def test_missing_objects_raise_file_not_found_naming_the_full_uri(any_store):
    for read in (any_store.read_bytes, any_store.read_json, any_store.read_parquet, any_store.read_commit):
        with pytest.raises(FileNotFoundError) as caught:
            read("nowhere/x")
        assert any_store.uri("nowhere/") in str(caught.value)


@pytest.mark.parametrize("key", ["../escape", "a/../../escape", "/etc/passwd", "a/./b", "a//b", "a\\..\\b"])
def test_keys_that_leave_the_root_are_rejected(any_store, key):
    attempts = [
        lambda: any_store.write_bytes(key, b"x"),
        lambda: any_store.read_bytes(key),
        lambda: any_store.exists(key),
        lambda: any_store.list(key),
        lambda: any_store.delete(key),
        lambda: any_store.read_parquet(key),
        lambda: any_store.is_committed(key),
    ]
    for attempt in attempts:
        with pytest.raises(InputError):
            attempt()
    with pytest.raises(InputError):
        with any_store.committed(key, {}):
            pass
    assert raw_files(any_store) == []


@pytest.mark.parametrize(
    "uri",
    ["", "   ", "gs://bucket/x", "http://example.org/x", "s3://", "s3:///no-bucket", "s3://Bad_Bucket/x",
     "s3://bucket/a/../../b", "s3://bucket/x?region=eu-west-1", "file://otherhost/x"],
)
def test_bad_uris_are_input_errors(uri):
    with pytest.raises(InputError):
        open_store(uri)


def test_credentials_in_uris_or_endpoints_are_rejected_without_being_echoed():
    with pytest.raises(InputError) as in_uri:
        open_store("s3://AKIAX:hunter2secret@bucket/x")
    with pytest.raises(InputError) as in_endpoint:
        S3Settings(endpoint="http://user:hunter2secret@127.0.0.1:9000")
    for caught in (in_uri, in_endpoint):
        assert "hunter2secret" not in str(caught.value)


def test_local_paths_and_file_uris_open_the_same_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    open_store("relative/dir").write_bytes("k.bin", b"1")
    assert open_store(f"file://{tmp_path}/relative/dir").read_bytes("k.bin") == b"1"
    assert open_store(str(tmp_path / "relative" / "dir")).uri("k.bin") == str(tmp_path / "relative/dir/k.bin")


# --- parquet ----------------------------------------------------------------------------------


def test_parquet_writer_regroups_batches_into_fixed_row_groups(any_store):
    with any_store.parquet_writer("scores/part-0.parquet", SCHEMA, row_group_size=1000) as writer:
        for i in range(20):
            writer.write_batch(batch(i * 100, 100))
        writer.write_table(pa.Table.from_batches([batch(2000, 300), batch(2300, 200)]))

    with any_store.filesystem.open_input_file(any_store.path("scores/part-0.parquet")) as handle:
        metadata = pq.ParquetFile(handle).metadata
    assert [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)] == [1000, 1000, 500]
    table = any_store.read_parquet("scores/part-0.parquet")
    assert table.column("candidate").to_pylist() == list(range(2500))
    assert any_store.read_parquet("scores/part-0.parquet", columns=["score"]).column_names == ["score"]
    assert raw_files(any_store) == ["scores/part-0.parquet"]


def test_parquet_writer_that_raises_leaves_nothing_visible(any_store):
    with pytest.raises(RuntimeError, match="scoring crashed"):
        with any_store.parquet_writer("scores/part-0.parquet", SCHEMA, row_group_size=100) as writer:
            for i in range(5):
                writer.write_batch(batch(i * 100, 100))  # full row groups already reached the sink
            raise RuntimeError("scoring crashed")
    assert not any_store.exists("scores/part-0.parquet")
    assert raw_files(any_store) == []


def test_read_parquet_directory_with_hive_shards_skips_markers_and_staging(any_store):
    for shard in (0, 1):
        with any_store.parquet_writer(f"scores/shard={shard}/part.parquet", SCHEMA, row_group_size=50) as writer:
            writer.write_batch(batch(shard * 10, 10))
    any_store.write_json(f"scores/{COMMIT_MARKER}", {"files": []})
    any_store.write_bytes("scores/_tmp-dead/part.parquet", b"not parquet: half-written by a killed task")
    any_store.write_bytes("scores/notes.txt", b"not parquet either")

    table = any_store.read_parquet("scores").sort_by("candidate")
    assert table.column("candidate").to_pylist() == list(range(20))
    assert table.column("shard").to_pylist() == [0] * 10 + [1] * 10
    assert any_store.read_parquet("scores", columns=["shard"]).column_names == ["shard"]


# --- multi-file commits -----------------------------------------------------------------------


def write_task_output(out: Store, task: int) -> None:
    out.write_json("summary.json", {"task": task})
    with out.parquet_writer("shard=0/part.parquet", SCHEMA, row_group_size=10) as writer:
        writer.write_batch(batch(task * 100, 25))


def test_committed_publishes_files_then_marker(any_store):
    assert not any_store.is_committed("task-3")
    with any_store.committed("task-3", {"task": 3, "model": "densenet"}) as out:
        write_task_output(out, 3)
        assert any_store.list("task-3") == []  # staged files are invisible until the block succeeds

    assert any_store.is_committed("task-3")
    assert any_store.commit_marker("task-3") == f"task-3/{COMMIT_MARKER}"
    commit = any_store.read_commit("task-3")
    assert commit["metadata"] == {"task": 3, "model": "densenet"}
    assert [f["key"] for f in commit["files"]] == ["shard=0/part.parquet", "summary.json"]
    for entry in commit["files"]:
        assert entry["size"] == len(any_store.read_bytes(f"task-3/{entry['key']}"))
    assert commit["created"].endswith("+00:00")
    assert raw_files(any_store) == ["task-3/_COMMITTED", "task-3/shard=0/part.parquet", "task-3/summary.json"]
    assert any_store.read_parquet("task-3").num_rows == 25


def test_committed_block_that_raises_publishes_nothing(any_store):
    with pytest.raises(ValueError, match="bad candidate"):
        with any_store.committed("task-4", {}) as out:
            write_task_output(out, 4)
            raise ValueError("bad candidate")
    assert not any_store.is_committed("task-4")
    assert raw_files(any_store) == []


def test_rerun_of_a_committed_prefix_changes_nothing(any_store, request):
    with any_store.committed("task-5", {"attempt": 1}) as out:
        write_task_output(out, 5)
    before = object_versions(any_store, request)
    contents = {key: any_store.read_bytes(key) for key in any_store.list()}

    with any_store.committed("task-5", {"attempt": 2}) as out:
        write_task_output(out, 99)  # different bytes: any overwrite would change etags and contents

    assert object_versions(any_store, request) == before
    assert {key: any_store.read_bytes(key) for key in any_store.list()} == contents
    assert any_store.read_commit("task-5")["metadata"] == {"attempt": 1}


_KILLED_TASK = """
import sys, time
from reid_batch.storage import S3Settings, open_store
uri, endpoint = sys.argv[1], sys.argv[2]
store = open_store(uri, S3Settings(endpoint=endpoint, region="us-east-1") if endpoint else None)
with store.committed("task-7", {"task": 7}) as out:
    out.write_json("summary.json", {"task": 7})
    with out.parquet_writer("part.parquet", SCHEMA, row_group_size=10) as writer:
        writer.write_batch(batch(0, 30))
    print("ready", flush=True)
    time.sleep(120)
"""


def test_task_killed_inside_commit_leaves_nothing_visible_and_next_commit_cleans_up(any_store, request):
    endpoint = "" if any_store.is_local else request.getfixturevalue("moto_server")
    helpers = "import pyarrow as pa\nSCHEMA = pa.schema([('candidate', pa.int64()), ('score', pa.float32())])\n"
    helpers += "def batch(s, n):\n    return pa.table({'candidate': pa.array(range(s, s + n), pa.int64()),"
    helpers += " 'score': pa.array([0.5] * n, pa.float32())}).to_batches()[0]\n"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    task = subprocess.Popen([sys.executable, "-c", helpers + _KILLED_TASK, any_store.uri(), endpoint],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    try:
        assert task.stdout.readline().strip() == "ready"
        os.kill(task.pid, signal.SIGKILL)
        assert task.wait(timeout=30) == -signal.SIGKILL
    finally:
        if task.poll() is None:
            task.kill()
        task.stdout.close()

    leftovers = raw_files(any_store)
    assert leftovers and all("/_tmp-" in key for key in leftovers)  # the kill landed mid-commit
    assert not any_store.is_committed("task-7")
    assert any_store.list("task-7") == []
    with pytest.raises(FileNotFoundError):
        any_store.read_parquet("task-7")

    # A visible file left by a run killed while publishing is stale too: the next commit removes it.
    any_store.write_bytes("task-7/stale-part.parquet", b"from a half-published attempt")
    with any_store.committed("task-7", {"task": 7}) as out:
        write_task_output(out, 7)
    assert raw_files(any_store) == ["task-7/_COMMITTED", "task-7/shard=0/part.parquet", "task-7/summary.json"]


# --- S3 specifics -----------------------------------------------------------------------------


def test_secrets_never_appear_in_reprs_logs_or_connection_errors(moto_server, s3_bucket, capsys):
    secret, access_key = os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ACCESS_KEY_ID"]
    uri, settings = s3_bucket
    store = open_store(uri, settings)
    store.write_json("k.json", {"ok": True})
    unreachable = open_store(uri, S3Settings(endpoint="http://127.0.0.1:1", retry_max_attempts=1, retry_budget_s=0))
    with pytest.raises(OSError) as caught:
        unreachable.read_bytes("k.json")

    error_text = "".join(traceback.format_exception(caught.value))
    assert unreachable.uri("k.json") in str(caught.value)
    pickled = pickle.dumps(store)  # a Store handed to worker processes must not carry credentials
    assert pickle.loads(pickled).read_json("k.json") == {"ok": True}
    texts = [repr(store), str(store), repr(settings), error_text, capsys.readouterr().err, pickled.decode("latin-1")]
    for text in texts:
        assert secret not in text and access_key not in text


def test_missing_bucket_needs_allow_bucket_creation(moto_server, s3_client):
    settings = S3Settings(endpoint=moto_server, region="us-east-1")
    with pytest.raises(OSError) as caught:
        open_store("s3://no-such-bucket-here/x", settings).write_bytes("a.bin", b"1")
    assert "s3://no-such-bucket-here/x/a.bin" in str(caught.value)

    creating = S3Settings(endpoint=moto_server, region="us-east-1", allow_bucket_creation=True)
    open_store("s3://created-by-store/x", creating).write_bytes("a.bin", b"1")
    assert s3_client.get_object(Bucket="created-by-store", Key="x/a.bin")["Body"].read() == b"1"


@pytest.mark.parametrize("sse", ["AES256", "aws:kms"])
def test_sse_from_the_settings_is_set_on_every_published_object(sse, s3_bucket, s3_client):
    uri, settings = s3_bucket
    store = open_store(uri, S3Settings(endpoint=settings.endpoint, region=settings.region, sse=sse))
    store.write_json("a.json", {"x": 1})
    table = pa.table({"id": [1, 2, 3]})
    with store.committed("task") as out:
        out.write_bytes("blob.bin", b"123")
        with out.parquet_writer("part.parquet", table.schema, row_group_size=2) as writer:
            writer.write_table(table)
    assert store.list() == ["a.json", "task/_COMMITTED", "task/blob.bin", "task/part.parquet"]
    bucket, prefix = uri.removeprefix("s3://").split("/", 1)
    for key in store.list():
        head = s3_client.head_object(Bucket=bucket, Key=f"{prefix}/{key}")
        assert head.get("ServerSideEncryption") == sse, key
    assert store.read_parquet("task/part.parquet").equals(table)
    assert pickle.loads(pickle.dumps(store)).read_json("a.json") == {"x": 1}
    plain = open_store(uri, settings)
    plain.write_bytes("plain.bin", b"1")
    assert "ServerSideEncryption" not in s3_client.head_object(Bucket=bucket, Key=f"{prefix}/plain.bin")


def test_a_model_read_from_s3_leaves_no_temporary_copy_behind(s3_bucket, tmp_path, monkeypatch):
    """Loaders read models through artifacts.local_file; from S3 that is a temporary copy, which must go when the
    loader is done (it once stayed: every array task loading a model left a model-sized file in the node's /tmp)."""
    from reid_batch.artifacts import local_file

    uri, settings = s3_bucket
    store = open_store(uri, settings)
    store.write_bytes("model/weights.safetensors", b"0123456789")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with local_file(store, "model/weights.safetensors", ".safetensors") as path:
        assert path.read_bytes() == b"0123456789" and path.parent == tmp_path
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError), local_file(store, "model/weights.safetensors") as path:
        raise RuntimeError("a loader that fails")
    assert list(tmp_path.iterdir()) == []
