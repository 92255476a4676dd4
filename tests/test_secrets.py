"""S3 credentials never leave the environment: not in objects, local files, logs, the resolved manifest or errors.

A small pipeline part (sample and select, with server-side encryption so boto3 is used as well of a tiny attack, through the real command line) runs against the moto
S3 server with the distinctive fake credentials of tests/conftest.py, followed by forced failures (an
unreachable endpoint, with and without retries; a refused input). Everything the runs wrote is then searched
for the key id and the secret: every object in the bucket, every local file, stdout/stderr, the resolved
manifest the report embeds, and the exception messages.
"""

from __future__ import annotations

import os
from pathlib import Path

import boto3
import yaml

from conftest import S3_REGION
from reid_batch.cli import main
from helpers import build_inputs, commit_finetuned, make_manifest


def _manifest_file(manifest, path: Path, **s3) -> Path:
    document = manifest.model_dump(mode="json", exclude_none=True)
    document["output"].setdefault("s3", {}).update(s3)
    path.write_text(yaml.safe_dump(document))
    return path


def test_credentials_appear_nowhere_a_run_writes(moto_server, s3_bucket, tmp_path, capfd, monkeypatch):
    key_id, secret = os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
    assert key_id.startswith("AKIAFAKE") and secret.startswith("fake-secret")
    needles = [key_id.encode(), secret.encode()]
    monkeypatch.chdir(tmp_path)
    uri, settings = s3_bucket
    inputs = build_inputs(tmp_path / "inputs")
    options = {"sampling_options": {"num_candidates": 8, "num_shards": 2, "chunk_size": 4, "batch_size": 4,
                                    "save_images": True}}
    manifest = make_manifest(inputs, uri, settings.endpoint, **options)
    commit_finetuned(manifest, inputs)
    path = _manifest_file(manifest, tmp_path / "run.yaml", sse="AES256")  # boto3 publishes the objects too

    codes = [main(["sample", str(path)]), main(["select", str(path)])]
    assert codes == [0, 0]
    # Forced failures: the messages and tracebacks they print are searched too.
    unreachable = _manifest_file(make_manifest(inputs, uri, "http://127.0.0.1:1", **options), tmp_path / "down.yaml",
                                 retry_max_attempts=1, retry_budget_s=0)
    assert main(["select", str(unreachable)]) == 1  # a plain OSError: full traceback printed
    retried = _manifest_file(make_manifest(inputs, uri, "http://127.0.0.1:1", **options), tmp_path / "retried.yaml",
                             retry_max_attempts=1, retry_budget_s=0.5)
    assert main(["select", str(retried)]) == 1  # StorageError after the budget
    broken = yaml.safe_load(path.read_text())
    broken["output"]["s3"]["endpoint"] = f"http://{key_id}:{secret}@127.0.0.1:1"
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken))
    assert main(["validate", str(tmp_path / "broken.yaml")]) == 2
    output = capfd.readouterr()
    logs = (output.out + output.err).encode()
    assert b"storage_open" in logs and b"storage failed" in logs and b"Traceback" in logs  # all paths were taken

    client = boto3.client("s3", endpoint_url=moto_server, region_name=S3_REGION)
    bucket = uri.removeprefix("s3://").split("/", 1)[0]
    objects = {item["Key"]: client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
               for item in client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert any(key.endswith(".png") for key in objects) and any(key.endswith("_COMMITTED") for key in objects)
    local = {str(p): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != "broken.yaml"}
    resolved = yaml.safe_dump(manifest.model_dump(mode="json")).encode()  # what the report embeds

    for where, blob in [*objects.items(), *local.items(), ("stdout+stderr", logs), ("resolved manifest", resolved)]:
        for needle in needles:
            assert needle not in blob, f"a credential leaked into {where}"
    print(f"searched {len(objects)} objects, {len(local)} local files, {len(logs)} bytes of logs: no credential")
