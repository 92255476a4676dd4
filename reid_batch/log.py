"""Logging that suits both a terminal (progress bars) and a cluster log file (one JSON object per line)."""

from __future__ import annotations

import json
import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

_SECRET_KEYS = ("secret", "password", "token", "access_key", "credential")


def _interactive() -> bool:
    return sys.stderr.isatty()


def _redact(fields: dict) -> dict:
    # Credentials must never reach a log line, whatever a caller passes in.
    return {k: ("***" if any(s in k.lower() for s in _SECRET_KEYS) else v) for k, v in fields.items()}


def event(name: str, /, **fields) -> None:
    """Emit one log record: human-readable on a terminal, JSON on a pipe or file."""
    fields = _redact(fields)
    if _interactive():
        detail = " ".join(f"{k}={v}" for k, v in fields.items())
        print(f"[reid-batch] {name} {detail}".rstrip(), file=sys.stderr, flush=True)
    else:
        record = {"ts": round(time.time(), 3), "event": name, **fields}
        print(json.dumps(record, default=str), file=sys.stderr, flush=True)


def progress(items: Iterable[T], desc: str, total: int | None = None, every: int = 50) -> Iterator[T]:
    """A tqdm bar on a terminal; on a pipe, a JSON progress line every `every` items and at the end."""
    if _interactive():
        from tqdm import tqdm

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
