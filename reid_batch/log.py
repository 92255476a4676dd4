"""Logging that suits both a terminal (progress bars) and a cluster log file (one JSON object per line)."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Any, Iterable, Iterator, TypeVar

T = TypeVar("T")

# One redaction rule for every log line and every document the run writes (the report's manifest copy).
SECRET_KEY = re.compile(r"secret|password|passwd|token|access_key|credential|session", re.IGNORECASE)
_AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
_URI_USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]+@")
_SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN")


def _interactive() -> bool:
    return sys.stderr.isatty()


def redact(value: Any, key: str = "") -> Any:
    """A copy with anything credential-like replaced by "***": values under secret-like keys, values holding the
    AWS credentials of this environment, AWS access key ids, and user:password@ in URIs."""
    secrets = [os.environ[name] for name in _SECRET_VARIABLES if os.environ.get(name)]

    def clean(value: Any, key: str) -> Any:
        if SECRET_KEY.search(key):
            return "***"
        if isinstance(value, dict):
            return {k: clean(v, str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v, key) for v in value]
        if isinstance(value, str):
            if any(s in value for s in secrets):
                return "***"
            return _URI_USERINFO.sub(r"\1***@", _AWS_KEY_ID.sub("***", value))
        return value

    return clean(value, key)


def _redact(fields: dict) -> dict:
    # Credentials must never reach a log line, whatever a caller passes in.
    return redact(fields)


def write_line(line: str) -> None:
    # One write per record, newline included: under PYTHONUNBUFFERED (our image sets it) print() issues the text and
    # its newline as two writes, and processes sharing a pipe (`run --jobs`) then interleave records on one line.
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def event(name: str, /, **fields) -> None:
    """Emit one log record: human-readable on a terminal, JSON on a pipe or file."""
    fields = _redact(fields)
    if _interactive():
        detail = " ".join(f"{k}={v}" for k, v in fields.items())
        write_line(f"[reid-batch] {name} {detail}".rstrip())
    else:
        record = {"ts": round(time.time(), 3), "event": name, **fields}
        write_line(json.dumps(record, default=str))


def progress(items: Iterable[T], desc: str, total: int | None = None, every: int = 50) -> Iterator[T]:
    """A tqdm bar on a terminal; on a pipe, a JSON progress line every `every` items and at the end."""
    if _interactive():
        from tqdm import tqdm  # only on a terminal: a cluster log gets JSON progress lines

        yield from tqdm(items, desc=desc, total=total, file=sys.stderr)
        return
    start = time.time()
    done = 0
    for item in items:
        yield item
        done += 1
        if done % every == 0:
            event("progress", desc=desc, done=done, total=total, seconds=round(time.time() - start, 2))
    event("progress", desc=desc, done=done, total=total, seconds=round(time.time() - start, 2))
