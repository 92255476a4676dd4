"""Shared fixtures: a real S3 API (moto server on loopback), stores on local disk and on S3, and a tiny synthetic
world. Shared plain builders are in helpers.py."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from reid_batch.storage import S3Settings, Store, open_store

S3_REGION = "us-east-1"
# Distinctive so tests can prove it never appears in a repr, log line or error message.
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKETESTKEY00001",
    "AWS_SECRET_ACCESS_KEY": "fake-secret-3f9c1a7e5b2d4c6e8a0b",
    "AWS_DEFAULT_REGION": S3_REGION,
    "AWS_EC2_METADATA_DISABLED": "true",
    # A developer's own ~/.aws must not leak into (or steer) the tests.
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
_UNSET_FOR_TESTS = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL")


@pytest.fixture(scope="session")
def moto_server():
    """Endpoint URL ("http://127.0.0.1:PORT") of an in-process moto S3 server, with fake AWS env vars."""
    from moto.server import ThreadedMotoServer

    saved = {name: os.environ.get(name) for name in (*FAKE_AWS_ENV, *_UNSET_FOR_TESTS)}
    os.environ.update(FAKE_AWS_ENV)
    for name in _UNSET_FOR_TESTS:
        os.environ.pop(name, None)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def s3_client(moto_server):
    """A boto3 client on the moto server, for checks that go around the Store (etags, raw keys)."""
    import boto3

    return boto3.client("s3", endpoint_url=moto_server, region_name=S3_REGION)


@pytest.fixture
def s3_bucket(moto_server, s3_client) -> tuple[str, S3Settings]:
    """A fresh, empty bucket: ("s3://<bucket>/data", settings to reach it)."""
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    s3_client.create_bucket(Bucket=bucket)
    return f"s3://{bucket}/data", S3Settings(endpoint=moto_server, region=S3_REGION)


@pytest.fixture(params=["local", "s3"])
def any_store(request, tmp_path) -> Store:
    """An empty Store, once on local disk and once on S3; moto only starts for the s3 case."""
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    uri, settings = request.getfixturevalue("s3_bucket")
    return open_store(uri, settings)


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory) -> Path:
    """A 32 px synthetic world (40 private, 60 public, 20 control patients), written once per test module; the
    manifest on it is helpers.tiny_manifest."""
    from reid_batch.data.phantoms import WorldConfig, write_world

    root = tmp_path_factory.mktemp("world") / "world"
    write_world(str(root), WorldConfig(seed=3, image_size=32, private_patients=40, public_patients=60,
                                       control_patients=20, max_studies_per_patient=2))
    return root
