"""One storage layer for local paths and ``s3://bucket/prefix`` URIs, built on ``pyarrow.fs``.

Every stage writes through a :class:`Store` so that the same code runs on a laptop and on a cluster
writing to S3. Keys are always relative to the store root and '/'-separated; a key that tries to
leave the root (``..``, a leading ``/``) is an :class:`InputError`.

Single objects are written atomically: a reader sees the old object or the new one, never half.
Locally that is a temporary file in the same directory, fsync, then ``os.replace``. On S3 the data
goes to a temporary key first and is then copied server-side to its final key, because pyarrow
cannot abort an upload: closing a stream (even from a destructor after an exception) completes it,
so writing the final key directly could publish a truncated object. A copied object appears whole.

Multi-file outputs ("a task's output is either complete and visible or absent") use a commit
marker. S3 has no rename, so files cannot be moved into place all at once; instead a task stages
its files under ``<prefix>/_tmp-<uuid>/``, moves them to ``<prefix>/`` and writes
``<prefix>/_COMMITTED`` LAST. The marker is the commit point: readers treat a prefix without it as
absent, whatever files they find there. A task killed at any moment before the marker is written
leaves no commit; its ``_tmp-`` leftovers are hidden from :meth:`Store.list` and from parquet
directory reads, and are removed by the next successful commit of the same prefix, which also
removes visible files left by a run killed while moving. A run that finds the marker already
present changes nothing (objects keep their etag/mtime).

Two writers of one prefix (a scheduler's retry racing the original task): the marker is checked again after
the block, just before publishing, so the later one finds the winner's commit, discards its copy and returns
normally. A writer never deletes a visible file it is about to replace (each is replaced whole, atomically), nor
the marker, so a commit is never left with files missing; a writer whose staging area the winner removed (an
OSError while writing or publishing) sees the marker and returns normally too. Only two writers passing that check within the same few milliseconds both
publish: each file is then one writer's whole file, which for reid-batch's deterministic stages is the same
file. pyarrow may leave zero-byte
``dir/`` marker objects on S3 when a directory empties; :meth:`Store.list` reports files only.

Server-side encryption: pyarrow 26's S3FileSystem forwards only ACL, Cache-Control, Content-Type,
Content-Language and Expires to S3 and silently drops ``x-amz-server-side-encryption``. Every object
reaches its final key through a server-side copy anyway, so with ``S3Settings.sse`` set that copy is
made with boto3's CopyObject, which sets ``ServerSideEncryption`` (AES256 or aws:kms with the account's
default KMS key) on every published object. The short-lived ``_tmp-`` upload before the copy is
covered only by the bucket's default encryption (on for every AWS bucket since 2023).

Transient S3 failures are retried at two levels. The AWS SDK retries each request
(``retry_max_attempts``, short backoff, for 5xx, SlowDown/throttling and dropped connections); on top of
that every Store operation is retried with exponential backoff and jitter for up to ``retry_budget_s``
seconds in all, so an outage of a minute or two costs time, not the task. Each step of a commit is retried
on its own and is idempotent (a move that landed before its reply was lost is not repeated), so a retried
commit never publishes twice or half. When the budget runs out, or the local disk is full, the operation
raises :class:`~reid_batch.errors.StorageError` naming the location (exit code 1): a task's outputs stay
unpublished, exactly as after a kill. S3 writes are spooled to a local temporary file first, so an upload
can be repeated whole without asking the caller to produce its data again.

Credentials come only from pyarrow's default AWS chain (environment variables, profile, instance
metadata). They are never passed, stored, logged or put in messages by this module. Server-side
copies use S3 CopyObject, which limits a single object to 5 GB.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import os
import random
import re
import shutil
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, TypeVar
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from reid_batch import log
from reid_batch.errors import InputError, StorageError

T = TypeVar("T")

COMMIT_MARKER = "_COMMITTED"
STAGING_PREFIX = "_tmp-"
MARKER_FORMAT_VERSION = 1

_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")

# What pyarrow's messages say when a failure is worth retrying: 5xx and 429 replies, throttling, and the
# network failing under the request. Access denied, a missing bucket and other 4xx are permanent.
_TRANSIENT = re.compile(
    r"HTTP status (5\d\d|429)|NETWORK_CONNECTION|SLOW_DOWN|THROTTLING|SERVICE_UNAVAILABLE|INTERNAL_FAILURE"
    r"|REQUEST_TIMEOUT|curlCode|[Tt]imed? ?out|Connection (reset|refused)"
)
RETRY_FIRST_DELAY_S = 0.5
RETRY_MAX_DELAY_S = 15.0
_DISK_FULL = {errno.ENOSPC: "no space left on the device", errno.EFBIG: "file too large for the file system or limit",
              errno.EDQUOT: "disk quota exceeded"}
_SPOOL_BLOCK = 8 * 1024 * 1024


@dataclass(frozen=True)
class S3Settings:
    """How to reach S3. Deliberately holds no credentials: those come from the AWS default chain."""

    endpoint: str | None = None
    region: str | None = None
    sse: str | None = None
    allow_bucket_creation: bool = False
    retry_max_attempts: int = 5
    retry_budget_s: float = 120.0

    def __post_init__(self) -> None:
        if self.endpoint is not None:
            _split_endpoint(self.endpoint)
        if self.retry_max_attempts < 1:
            raise InputError(f"must be at least 1, got {self.retry_max_attempts}", where="s3.retry_max_attempts")
        if not 0 <= self.retry_budget_s < float("inf"):
            raise InputError(f"must be a finite number >= 0, got {self.retry_budget_s}", where="s3.retry_budget_s")


def _split_endpoint(endpoint: str) -> tuple[str, str]:
    """Return (scheme, host:port) for pyarrow; https when the endpoint names no scheme."""
    text = endpoint if "://" in endpoint else f"https://{endpoint}"
    parts = urlsplit(text)
    if parts.username is not None or parts.password is not None:
        # Echoing the endpoint would leak the password it embeds.
        raise InputError("must not contain credentials; use the AWS environment variables or profile", where="s3.endpoint")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"expected http(s)://host[:port], got {endpoint!r}", where="s3.endpoint")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise InputError(f"expected http(s)://host[:port] without a path, got {endpoint!r}", where="s3.endpoint")
    return parts.scheme, parts.netloc


def _redact_userinfo(uri: str) -> str:
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@", r"\1***@", uri)


def open_store(uri: str, s3: S3Settings | None = None) -> "Store":
    """Open a local directory (path or file:// URI) or an s3://bucket/prefix location."""
    if not isinstance(uri, str) or not uri.strip():
        raise InputError("storage location is empty", where=repr(uri))
    if "://" not in uri:
        return _open_local(os.path.abspath(uri))
    scheme = uri.split("://", 1)[0].lower()
    if scheme == "file":
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost") or not parts.path:
            raise InputError("file URIs must be file:///absolute/path", where=uri)
        return _open_local(os.path.abspath(parts.path))
    if scheme == "s3":
        return _open_s3(uri, s3 or S3Settings())
    raise InputError(f"unsupported storage scheme {scheme!r}; use a local path or s3://bucket/prefix", where=_redact_userinfo(uri))


def _open_local(root: str) -> "Store":
    store = Store(pafs.LocalFileSystem(), root.rstrip("/") or "/", "file")
    log.event("storage_open", uri=store.uri(), backend="local")
    return store


def _open_s3(uri: str, settings: S3Settings) -> "Store":
    shown = _redact_userinfo(uri)
    parts = urlsplit(uri)
    if "@" in parts.netloc:
        raise InputError("S3 URIs must not contain credentials; use the AWS environment variables or profile", where=shown)
    if parts.query or parts.fragment:
        raise InputError("S3 URIs take no query or fragment; put options in the s3 settings", where=shown)
    bucket = parts.netloc
    if not _BUCKET_NAME.match(bucket):
        raise InputError(f"invalid S3 bucket name {bucket!r}", where=shown)
    prefix = parts.path.strip("/")
    if prefix:
        _check_key(prefix, where=shown)

    filesystem = _s3_filesystem(settings)
    store = Store(filesystem, f"{bucket}/{prefix}" if prefix else bucket, "s3", settings)
    log.event("storage_open", uri=store.uri(), backend="s3", endpoint=settings.endpoint, region=settings.region,
              sse=settings.sse)
    if settings.allow_bucket_creation:
        with store._named_errors(""):
            if store._call("", filesystem.get_file_info, bucket).type == pafs.FileType.NotFound:
                store._call("", filesystem.create_dir, bucket)
                log.event("storage_bucket_created", bucket=bucket)
    return store


def _s3_filesystem(settings: S3Settings) -> pafs.S3FileSystem:
    options: dict[str, Any] = {
        "region": settings.region,
        "allow_bucket_creation": settings.allow_bucket_creation,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=settings.retry_max_attempts),
    }
    if settings.endpoint:
        options["scheme"], options["endpoint_override"] = _split_endpoint(settings.endpoint)
    return pafs.S3FileSystem(**options)


def _check_key(key: str, where: str, allow_empty: bool = False) -> str:
    """Validate a store-relative key and drop a trailing '/'; keys must never leave the store root."""
    if not isinstance(key, str):
        raise InputError(f"storage key must be a string, got {type(key).__name__}", where=where)
    if key.endswith("/") and key != "/":
        key = key[:-1]
    if not key:
        if allow_empty:
            return key
        raise InputError("storage key is empty", where=where)
    if key.startswith("/") or "\\" in key or "\x00" in key:
        raise InputError(f"storage key {key!r} must be a relative '/'-separated path", where=where)
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise InputError(f"storage key {key!r} must not contain '.', '..' or empty parts", where=where)
    return key


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _is_hidden(relative_key: str, prefixes: tuple[str, ...]) -> bool:
    return any(part.startswith(prefixes) for part in relative_key.split("/"))


def _is_transient(error: OSError) -> bool:
    return not isinstance(error, FileNotFoundError) and bool(_TRANSIENT.search(str(error)))


def _short(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store:
    """A directory-like location; every key is relative to ``root``. Create with :func:`open_store`."""

    def __init__(self, filesystem: pafs.FileSystem, root: str, scheme: str, s3: S3Settings | None = None):
        self._fs = filesystem
        self._root = root
        self._scheme = scheme
        self._s3 = s3
        self._retry_budget_s = s3.retry_budget_s if s3 is not None else 0.0
        self._boto = None

    def __getstate__(self) -> dict:
        # A boto3 client holds resolved credentials: it never travels with a pickled Store.
        return {**self.__dict__, "_boto": None}

    # --- identity -------------------------------------------------------------------------------

    @property
    def filesystem(self) -> pafs.FileSystem:
        """The pyarrow filesystem, for stages that use pyarrow.dataset directly with :attr:`root`."""
        return self._fs

    @property
    def root(self) -> str:
        """The root as a path on :attr:`filesystem` ("bucket/prefix" on S3, an absolute path locally)."""
        return self._root

    @property
    def is_local(self) -> bool:
        return self._scheme == "file"

    def path(self, key: str = "") -> str:
        """The :attr:`filesystem` path of a key."""
        key = _check_key(key, where=self.uri(), allow_empty=True)
        return f"{self._root.rstrip('/')}/{key}" if key else self._root

    def uri(self, key: str = "") -> str:
        """The full location of a key, for messages and for handing to another process."""
        location = f"{self._root.rstrip('/')}/{key}" if key else self._root
        return f"s3://{location}" if self._scheme == "s3" else location

    def __repr__(self) -> str:
        return f"Store({self.uri()!r})"

    __str__ = __repr__

    @contextlib.contextmanager
    def _named_errors(self, key: str) -> Iterator[None]:
        # pyarrow's messages name a bucket-relative key at best; every error here names the full URI.
        try:
            yield
        except FileNotFoundError as exc:
            raise FileNotFoundError(errno.ENOENT, "No such file or object", self.uri(key)) from exc
        except OSError as exc:
            if exc.errno in _DISK_FULL:
                raise StorageError(f"cannot write: {_DISK_FULL[exc.errno]} ({exc.strerror or exc}); nothing from this "
                                   "write was published", where=self.uri(key)) from None
            raise type(exc)(f"{self.uri(key)}: {exc}") from exc

    def _child(self, key: str) -> "Store":
        return Store(self._fs, self.path(key), self._scheme, self._s3)

    def _call(self, key: str, operation: Callable[..., T], *args: Any) -> T:
        """Run one filesystem operation, retrying transient S3 failures with exponential backoff and jitter
        until the retry budget is spent; then StorageError naming the location."""
        if self.is_local or self._retry_budget_s <= 0:
            return operation(*args)
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                return operation(*args)
            except OSError as exc:
                if not _is_transient(exc):
                    raise
                elapsed = time.monotonic() - started
                left = self._retry_budget_s - elapsed
                if left <= 0:
                    log.event("storage_gave_up", uri=self.uri(key), attempts=attempt, seconds=round(elapsed, 2),
                              error=_short(exc))
                    raise StorageError(
                        f"storage unavailable: gave up after {attempt} attempt(s) over {elapsed:.1f} s "
                        f"(retry budget output.s3.retry_budget_s = {self._retry_budget_s:g} s); last error: {_short(exc)}",
                        where=self.uri(key)) from None
                delay = min(left, RETRY_MAX_DELAY_S, RETRY_FIRST_DELAY_S * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
                log.event("storage_retry", uri=self.uri(key), attempt=attempt, delay_s=round(delay, 3), error=_short(exc))
                time.sleep(delay)

    def _encrypted_move(self, source: str, target: str) -> None:
        """CopyObject with ServerSideEncryption, then delete the source; errors as pyarrow words them, so the
        retry classification is the same."""
        import botocore.exceptions as aws  # boto3 only for encrypted copies (output.s3.sse); pyarrow does the rest

        if self._boto is None:
            import boto3
            from botocore.config import Config

            endpoint = None
            if self._s3.endpoint:
                scheme, netloc = _split_endpoint(self._s3.endpoint)
                endpoint = f"{scheme}://{netloc}"
            self._boto = boto3.client("s3", endpoint_url=endpoint, region_name=self._s3.region, config=Config(
                retries={"max_attempts": self._s3.retry_max_attempts, "mode": "standard"}))
        (source_bucket, source_key), (bucket, key) = source.split("/", 1), target.split("/", 1)
        try:
            self._boto.copy_object(Bucket=bucket, Key=key, CopySource={"Bucket": source_bucket, "Key": source_key},
                                   ServerSideEncryption=self._s3.sse)
            self._boto.delete_object(Bucket=source_bucket, Key=source_key)
        except aws.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchKey", "404"):
                raise FileNotFoundError(errno.ENOENT, "No such object", source) from None
            raise OSError(f"AWS Error {code} (HTTP status {status}) during an encrypted CopyObject") from None
        except (aws.EndpointConnectionError, aws.ConnectionClosedError, aws.ReadTimeoutError,
                aws.ConnectTimeoutError) as exc:
            raise OSError(f"NETWORK_CONNECTION during an encrypted CopyObject: {exc}") from None

    def _move(self, key: str, source: str, target: str) -> None:
        """Server-side move, safe to repeat: a move whose reply was lost after it landed is not redone."""
        def attempt() -> None:
            try:
                if self._s3 is not None and self._s3.sse:
                    self._encrypted_move(source, target)
                else:
                    self._fs.move(source, target)
            except OSError:
                if (self._fs.get_file_info(source).type == pafs.FileType.NotFound
                        and self._fs.get_file_info(target).type == pafs.FileType.File):
                    return
                raise
        self._call(key, attempt)

    # --- single objects -------------------------------------------------------------------------

    def exists(self, key: str) -> bool:
        """Whether a file (object) exists at key; use :meth:`list` for prefixes."""
        path = self.path(key)
        with self._named_errors(key):
            return self._call(key, self._fs.get_file_info, path).type == pafs.FileType.File

    def read_bytes(self, key: str) -> bytes:
        path = self.path(_check_key(key, where=self.uri()))
        def read() -> bytes:
            with self._fs.open_input_stream(path) as stream:
                return stream.read()
        with self._named_errors(key):
            return self._call(key, read)

    def write_bytes(self, key: str, data: bytes) -> None:
        key = _check_key(key, where=self.uri())
        with self._named_errors(key), self._atomic_sink(key) as sink:
            sink.write(data)

    def read_json(self, key: str) -> Any:
        raw = self.read_bytes(key)
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"{self.uri(key)}: not valid JSON: {exc}") from exc

    def write_json(self, key: str, obj: Any) -> None:
        """Stable output: sorted keys, indent 2, trailing newline, so reruns produce identical bytes."""
        self.write_bytes(key, _json_bytes(obj))

    @contextlib.contextmanager
    def _atomic_sink(self, key: str) -> Iterator[Any]:
        """A writable file; its content appears at key only if the block succeeds."""
        final = self.path(key)
        parent, name = final.rsplit("/", 1)
        temporary = f"{parent}/{STAGING_PREFIX}{uuid.uuid4().hex}-{name}"
        if self.is_local:
            os.makedirs(parent, exist_ok=True)
            with open(temporary, "wb") as handle:
                try:
                    yield handle
                    handle.flush()
                    os.fsync(handle.fileno())
                except BaseException:
                    # close() flushes, which fails again on a full disk; the file must go all the same.
                    with contextlib.suppress(OSError):
                        handle.close()
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(temporary)
                    raise
            os.replace(temporary, final)
            _fsync_dir(parent)
            return
        # Spooled locally so that a failed upload can be repeated whole; the caller's block runs once.
        with tempfile.TemporaryFile(prefix="reid-batch-upload-") as spool:
            yield spool

            def upload() -> None:
                spool.seek(0)
                # Closing completes the upload (pyarrow has no abort): a failed one leaves the temporary key,
                # which the next attempt overwrites and the cleanup below deletes.
                with self._fs.open_output_stream(temporary) as stream:
                    while block := spool.read(_SPOOL_BLOCK):
                        stream.write(block)

            try:
                self._call(key, upload)
                self._move(key, temporary, final)
            except BaseException:
                with contextlib.suppress(Exception):
                    self._fs.delete_file(temporary)
                raise

    # --- prefixes -------------------------------------------------------------------------------

    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys of all files under prefix (recursive), hiding ``_tmp-`` staging leftovers."""
        prefix = _check_key(prefix, where=self.uri(), allow_empty=True)
        return [key for key in self._list_raw(prefix) if not _is_hidden(key, (STAGING_PREFIX,))]

    def _list_raw(self, prefix: str) -> list[str]:
        path = self.path(prefix)
        with self._named_errors(prefix):
            info = self._call(prefix, self._fs.get_file_info, path)
            if info.type == pafs.FileType.File:
                return [prefix]
            if info.type != pafs.FileType.Directory:
                return []
            selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
            found = self._call(prefix, self._fs.get_file_info, selector)
        start = len(self._root.rstrip("/")) + 1
        return sorted(item.path[start:] for item in found if item.type == pafs.FileType.File)

    def delete(self, prefix: str) -> None:
        """Delete one file or everything under a prefix; a missing key is not an error."""
        prefix = _check_key(prefix, where=self.uri())
        path = self.path(prefix)
        with self._named_errors(prefix):
            kind = self._call(prefix, self._fs.get_file_info, path).type
            if kind == pafs.FileType.File:
                self._call(prefix, self._delete_file_if_present, path)
            elif kind == pafs.FileType.Directory:
                self._call(prefix, self._delete_dir_if_present, path)

    def _delete_file_if_present(self, path: str) -> None:
        try:
            self._fs.delete_file(path)
        except FileNotFoundError:
            pass  # a retried delete whose first attempt landed

    def _delete_dir_if_present(self, path: str) -> None:
        try:
            self._fs.delete_dir(path)
        except FileNotFoundError:
            pass  # a retried delete whose first attempt landed

    # --- parquet --------------------------------------------------------------------------------

    def read_parquet(self, key_or_prefix: str = "", columns: list[str] | None = None) -> pa.Table:
        """Read one parquet file, or every ``*.parquet`` under a prefix (hive dirs like ``shard=3/``
        become columns). Paths with a part starting with '_' or '.' (markers, staging) are skipped."""
        key = _check_key(key_or_prefix, where=self.uri(), allow_empty=True)
        with self._named_errors(key):
            return self._call(key, self._read_parquet, key, columns)

    def read_parquet_row_groups(self, key: str, choose: Callable[[pq.ParquetFile], list[int]]) -> pa.Table:
        """The row groups of one parquet file that `choose` picks from its footer (one open, retried whole)."""
        key = _check_key(key, where=self.uri())

        def read() -> pa.Table:
            with self._fs.open_input_file(self.path(key)) as source:
                parquet = pq.ParquetFile(source)
                return parquet.read_row_groups(choose(parquet))

        with self._named_errors(key):
            return self._call(key, read)

    def read_parquet_schema(self, key: str) -> pa.Schema:
        """The schema of one parquet file (reads the footer only)."""
        key = _check_key(key, where=self.uri())
        with self._named_errors(key):
            return self._call(key, lambda: pq.read_schema(self.path(key), filesystem=self._fs))

    def _read_parquet(self, key: str, columns: list[str] | None) -> pa.Table:
        path = self.path(key)
        kind = self._fs.get_file_info(path).type
        if kind == pafs.FileType.File:
            return pq.read_table(path, filesystem=self._fs, columns=columns)
        if kind == pafs.FileType.NotFound:
            raise FileNotFoundError(path)
        start = len(path.rstrip("/")) + 1
        files = [
            item.path
            for item in self._fs.get_file_info(pafs.FileSelector(path, recursive=True))
            if item.type == pafs.FileType.File
            and item.path.endswith(".parquet")
            and not _is_hidden(item.path[start:], ("_", "."))
        ]
        if not files:
            raise FileNotFoundError(path)
        dataset = pads.dataset(sorted(files), filesystem=self._fs, format="parquet",
                               partitioning="hive", partition_base_dir=path)
        return dataset.to_table(columns=columns)

    @contextlib.contextmanager
    def parquet_writer(self, key: str, schema: pa.Schema, row_group_size: int,
                       **writer_options: Any) -> Iterator["ParquetBatchWriter"]:
        """Stream batches into one parquet file, published at key only when the block succeeds.

        Batches are regrouped so every row group but the last holds exactly ``row_group_size`` rows,
        whatever size the caller's batches are. ``writer_options`` go to ``pyarrow.parquet.ParquetWriter``.
        """
        if row_group_size < 1:
            raise ValueError(f"row_group_size must be positive, got {row_group_size}")
        key = _check_key(key, where=self.uri())
        with self._named_errors(key), self._atomic_sink(key) as sink:
            parquet = pq.ParquetWriter(sink, schema, **writer_options)
            writer = ParquetBatchWriter(parquet, schema, row_group_size)
            try:
                yield writer
            except BaseException:
                # Closed now so its destructor does not write a footer into a discarded sink later.
                with contextlib.suppress(Exception):
                    parquet.close()
                raise
            writer.close()
        log.event("parquet_written", uri=self.uri(key), rows=writer.rows, row_groups=writer.row_groups)

    # --- multi-file commits ---------------------------------------------------------------------

    def commit_marker(self, prefix: str) -> str:
        """The key whose presence means the output under prefix is complete."""
        prefix = _check_key(prefix, where=self.uri())
        return f"{prefix}/{COMMIT_MARKER}"

    def is_committed(self, prefix: str) -> bool:
        return self.exists(self.commit_marker(prefix))

    def read_commit(self, prefix: str) -> dict:
        """The marker: {"files": [{"key", "size"}], "created", "metadata", "format"}."""
        return self.read_json(self.commit_marker(prefix))

    @contextlib.contextmanager
    def committed(self, prefix: str, metadata: dict | None = None) -> Iterator["Store"]:
        """Yield a Store to write a task's files into; publish them under prefix only on success.

        If prefix is already committed, the block still runs but what it writes is discarded and
        nothing under prefix changes; check :meth:`is_committed` first to skip the work itself.
        """
        marker_key = self.commit_marker(prefix)
        prefix = marker_key.rsplit("/", 1)[0]
        metadata = dict(metadata or {})
        json.dumps(metadata)  # unserializable metadata fails before the work, not after
        staging_key = f"{prefix}/{STAGING_PREFIX}{uuid.uuid4().hex}"
        staging = self._child(staging_key)
        try:
            yield staging
        except BaseException as error:
            self._delete_quietly(staging_key)
            # A racing writer that committed first removes other staging areas, ours too, perhaps mid-write.
            if not (isinstance(error, OSError) and self._committed_quietly(prefix)):
                raise
            log.event("commit_skipped", uri=self.uri(prefix), reason="committed by another writer meanwhile")
            return
        try:
            with self._named_errors(prefix):
                published = self._publish(prefix, staging, metadata)
        except Exception:
            # A concurrent writer that committed first may have removed our staging area: its commit stands.
            if not self._committed_quietly(prefix):
                raise
            published = False
        if not published:
            self._delete_quietly(staging_key)
            log.event("commit_skipped", uri=self.uri(prefix), reason="already committed")

    def _committed_quietly(self, prefix: str) -> bool:
        with contextlib.suppress(Exception):
            return self.is_committed(prefix)
        return False

    def _publish(self, prefix: str, staging: "Store", metadata: dict) -> bool:
        """Move staged files into place and write the marker; False if another writer committed first."""
        staged = staging.list()
        if COMMIT_MARKER in staged:
            raise ValueError(f"{staging.uri(COMMIT_MARKER)}: {COMMIT_MARKER} is reserved for the commit marker")
        # Checked AFTER listing: a winner removes other staging areas only after its marker exists, so with no
        # marker now, the list above was complete. A winner found here means our copy is redundant.
        if self.is_committed(prefix):
            return False
        sizes = {key: self._call(key, self._fs.get_file_info, staging.path(key)).size for key in staged}
        # Visible files here belong to an earlier run killed before its marker; they are not ours. Files we
        # are about to replace stay until replaced (atomically), so a racing writer's commit never loses one.
        for stale in self._list_raw(prefix):
            relative = stale[len(prefix) + 1:]
            if not relative.startswith(STAGING_PREFIX) and relative != COMMIT_MARKER and relative not in sizes:
                self._call(stale, self._delete_file_if_present, self.path(stale))
        touched_dirs = set()
        for key in staged:
            source, target = staging.path(key), self.path(f"{prefix}/{key}")
            if self.is_local:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.replace(source, target)
                touched_dirs.add(os.path.dirname(target))
            else:
                self._move(f"{prefix}/{key}", source, target)
        for directory in touched_dirs:
            _fsync_dir(directory)  # files must be durable before the marker that vouches for them
        marker = {
            "format": MARKER_FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "files": [{"key": key, "size": sizes[key]} for key in staged],
            "metadata": metadata,
        }
        with self._atomic_sink(f"{prefix}/{COMMIT_MARKER}") as sink:
            sink.write(_json_bytes(marker))
        try:
            self._remove_staging_leftovers(prefix)
        except OSError as error:  # committed all the same: a racing writer's staging area changed underneath
            log.event("commit_cleanup_incomplete", uri=self.uri(prefix), error=str(error))
        log.event("commit_published", uri=self.uri(prefix), files=len(staged), bytes=sum(sizes.values()))
        return True

    def _remove_staging_leftovers(self, prefix: str) -> None:
        """Delete this commit's emptied staging area and anything earlier killed runs left there."""
        for key in self._list_raw(prefix):
            if _is_hidden(key[len(prefix) + 1:], (STAGING_PREFIX,)):
                self._call(key, self._delete_file_if_present, self.path(key))
        # What remains are directories (local) or S3 directory-marker objects.
        selector = pafs.FileSelector(self.path(prefix), allow_not_found=True)
        for item in self._call(prefix, self._fs.get_file_info, selector):
            if item.type == pafs.FileType.Directory and item.base_name.startswith(STAGING_PREFIX):
                self._call(prefix, self._delete_dir_if_present, item.path)

    def _delete_quietly(self, key: str) -> None:
        # Cleanup on a failure path must not mask the original exception, nor wait out a second retry
        # budget while the store is down: leftovers are hidden and the next commit removes them.
        with contextlib.suppress(Exception):
            no_retries = replace(self._s3, retry_budget_s=0.0) if self._s3 is not None else None
            Store(self._fs, self._root, self._scheme, no_retries).delete(key)


class ParquetBatchWriter:
    """Regroups incoming batches into row groups of a fixed size. Obtain via :meth:`Store.parquet_writer`."""

    def __init__(self, writer: pq.ParquetWriter, schema: pa.Schema, row_group_size: int):
        self._writer = writer
        self._schema = schema
        self._row_group_size = row_group_size
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self.rows = 0
        self.row_groups = 0

    def write_batch(self, batch: pa.RecordBatch) -> None:
        if not batch.schema.equals(self._schema):
            raise ValueError(f"batch schema {batch.schema} does not match the file schema {self._schema}")
        if batch.num_rows == 0:
            return
        self._pending.append(batch)
        self._pending_rows += batch.num_rows
        if self._pending_rows >= self._row_group_size:
            self._flush(final=False)

    def write_table(self, table: pa.Table) -> None:
        for batch in table.to_batches():
            self.write_batch(batch)

    def _flush(self, final: bool) -> None:
        table = pa.Table.from_batches(self._pending, schema=self._schema)
        offset = 0
        while table.num_rows - offset >= self._row_group_size or (final and offset < table.num_rows):
            chunk = table.slice(offset, self._row_group_size)
            self._writer.write_table(chunk, row_group_size=self._row_group_size)
            offset += chunk.num_rows
            self.rows += chunk.num_rows
            self.row_groups += 1
        remainder = table.slice(offset)
        self._pending = remainder.to_batches()
        self._pending_rows = remainder.num_rows

    def close(self) -> None:
        if self._pending_rows:
            self._flush(final=True)
        self._writer.close()


# ------------------------------------------------------------------------------------------------ from the manifest
# Every stage opens storage through these two functions, so S3 settings are mapped from the manifest in one place.


def s3_settings(manifest) -> S3Settings:
    """The manifest's `output.s3`, every field of it: endpoint, region, encryption, bucket creation, retries."""
    s3 = manifest.output.s3
    return S3Settings(endpoint=s3.endpoint, region=s3.region, sse=s3.sse, allow_bucket_creation=s3.allow_bucket_creation,
                      retry_max_attempts=s3.retry_max_attempts, retry_budget_s=s3.retry_budget_s)


def run_store(manifest) -> "Store":
    """The Store rooted at <output.uri>/<run_id>/ (local directory or S3 prefix)."""
    return open_store(f"{manifest.output.uri.rstrip('/')}/{manifest.run_id}", s3_settings(manifest))


_FETCHED: dict[str, str] = {}


def input_path(uri: str, manifest, where: str) -> str:
    """A local path holding the input file `uri` names (a path, file:// or s3://), for readers that need a file.

    An s3:// object is downloaded once per process, with the run's S3 settings (endpoint, region, retries), into a
    private temporary folder under its own file name (loaders tell formats by suffix); it is never executed: loaders
    read it as they read a local file (weights_only, safetensors). A missing object is invalid input (exit 2)
    naming `where`, the manifest field.
    """
    if not uri.startswith("s3://"):
        return uri.removeprefix("file://")
    if uri in _FETCHED and os.path.isfile(_FETCHED[uri]):
        return _FETCHED[uri]
    parent, name = uri.rsplit("/", 1)
    if not name or parent == "s3:/":
        raise InputError(f"not an S3 object URI: {uri!r} (expected s3://bucket/key)", where=where)
    store = open_store(parent, s3_settings(manifest))
    try:
        data = store.read_bytes(name)
    except FileNotFoundError:
        raise InputError(f"no such S3 object: {store.uri(name)}", where=where) from None
    directory = tempfile.mkdtemp(prefix="reid-batch-input-")
    atexit.register(shutil.rmtree, directory, True)
    path = os.path.join(directory, name)
    with open(path, "wb") as handle:
        handle.write(data)
    _FETCHED[uri] = path
    log.event("input_fetched", uri=store.uri(name), field=where, bytes=len(data))
    return path


class BackgroundWriter:
    """Runs write jobs (chunk commits, image files) on one background thread, in submission order, while the caller
    computes the next batch. At most `depth` jobs wait behind the one being written, so at most that many jobs' data
    are held; the first failure is raised by the next submit(), drain() or close(). close() waits for every job."""

    def __init__(self, name: str = "background-writer", depth: int = 2) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending: list = []
        self._depth = depth

    def submit(self, job: Callable[[], None]) -> None:
        while len(self._pending) >= self._depth:
            self._pending.pop(0).result()
        self._pending.append(self._pool.submit(job))

    def drain(self) -> None:
        """Wait for every job submitted so far (the thread stays, for more)."""
        while self._pending:
            self._pending.pop(0).result()

    def close(self) -> None:
        try:
            self.drain()
        finally:
            for future in self._pending:
                future.cancel()
            self._pool.shutdown(wait=True)
