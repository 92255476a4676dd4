"""Logging for a person at a terminal and for a cluster's log collector, from one `event` call.

Three sinks:
- **human** (a terminal): one line per task, one live status line (the running task, its progress bar), warnings and
  errors in full, nothing else; verbose (`-v`) adds every event as `[reid-batch] name key=value`.
- **json** (a pipe, a file, a cluster): every event as one JSON object per line on stderr. Slurm and Kubernetes logs,
  and `run --jobs N`'s parent reading its children, depend on exactly this.
- **the task's log file**: whatever stderr shows, every event of a task is also kept as JSON lines and written into
  the run's output when the task ends (`<output>/<run_id>/logs/<task>.jsonl`, see `task_log`), so a terminal run
  loses nothing and a cluster run's logs travel with its outputs.

The format is `auto` (human when stderr is a terminal), or chosen with `--log-format` / REID_BATCH_LOG_FORMAT.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, TypeVar

T = TypeVar("T")

FORMATS = ("auto", "human", "json")
# The children of `run --jobs N` inherit these: the parent draws the terminal, the children write JSON to it.
FORMAT_VARIABLE = "REID_BATCH_LOG_FORMAT"
VERBOSE_VARIABLE = "REID_BATCH_VERBOSE"
# Seconds between live progress records on a pipe (only for a parent that draws them; 0 or unset: none).
PROGRESS_SECONDS_VARIABLE = "REID_BATCH_PROGRESS_SECONDS"
# Set for a task that `run --jobs N` started: the run, not the task, ends with a summary.
RUN_TASK_VARIABLE = "REID_BATCH_RUN_TASK"

# Events a person must see even without -v: something fell back, was skipped for a reason, or may be wrong.
# New code can say so at the call instead: `log.warning(name, ...)` (level "warning") or level="error".
WARNINGS = frozenset({
    "batch_size_halved", "calibrate_unavailable", "checkpoint_pickled_objects_not_loaded", "commit_cleanup_incomplete",
    "compile_failed", "evaluate_small_set", "fid_underdetermined", "finetune_reference_stale", "images_skipped",
    "mahalanobis_reference_changed", "mahalanobis_reference_inconsistent", "mixed_precision_not_used",
    "nih_images_missing", "objective_fallback", "phantoms_stale_partial_removed",
    "prior_quality_skipped", "reidentification_unequal_sets", "scoring_objective_fallback",
    "storage_gave_up", "storage_retry", "target_head_remapped",
})

# One redaction rule for every log line and every document the run writes (the report's manifest copy).
SECRET_KEY = re.compile(r"secret|password|passwd|token|access_key|credential|session", re.IGNORECASE)
_AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
_URI_USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]+@")
_SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN")


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


# ------------------------------------------------------------------------------------------------ format


_chosen = {"format": None, "verbose": None}


def configure(format: str | None = None, verbose: bool | None = None) -> None:
    """Fix the format (auto, human, json) and verbosity of this process; None: REID_BATCH_LOG_FORMAT /
    REID_BATCH_VERBOSE, else auto and quiet. Children are told their format by whoever starts them."""
    _chosen["format"], _chosen["verbose"] = format, verbose


def human() -> bool:
    """True when stderr is for a person: --log-format human, or auto and stderr is a terminal."""
    chosen = _chosen["format"] or os.environ.get(FORMAT_VARIABLE) or "auto"
    if chosen == "human":
        return True
    if chosen == "json":
        return False
    return sys.stderr.isatty()


def verbose() -> bool:
    return bool(_chosen["verbose"] if _chosen["verbose"] is not None else os.environ.get(VERBOSE_VARIABLE))


def is_warning(name: str, fields: dict) -> bool:
    return name in WARNINGS or fields.get("level") in ("warning", "error")


def write_line(line: str) -> None:
    # One write per record, newline included: under PYTHONUNBUFFERED (our image sets it) print() issues the text and
    # its newline as two writes, and processes sharing a pipe then interleave records on one line.
    if human():
        screen.line(line)
        return
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def human_text(name: str, fields: dict) -> str:
    detail = " ".join(f"{k}={v}" for k, v in fields.items() if k != "level")
    return f"{name} {detail}".rstrip()


# ------------------------------------------------------------------------------------------------ the terminal


class Screen:
    """Permanent lines above one live status line, redrawn in place with a carriage return.

    One live line, not one per task: a newline is only ever written by `line`, so what a person scrolls back through
    is exactly the permanent lines, and concurrent tasks (drawn by `run --jobs N`'s parent) cannot garble it."""

    REDRAW_SECONDS = 0.1

    def __init__(self) -> None:
        self.status = ""
        self._drawn = 0.0

    def _write(self, text: str) -> None:
        sys.stderr.write(text)
        sys.stderr.flush()

    def line(self, text: str) -> None:
        self._write("\r\x1b[K" + text + "\n" + self.status)

    def show(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._drawn < self.REDRAW_SECONDS:
            return
        self._drawn = now
        width = shutil.get_terminal_size((100, 24)).columns
        self.status = text if len(text) < width else text[: max(0, width - 2)] + "…"
        self._write("\r\x1b[K" + self.status)

    def clear(self) -> None:
        self.status = ""
        self._write("\r\x1b[K")


screen = Screen()


def bar(done: int, total: int | None, width: int = 20) -> str:
    if not total:
        return f"{done}"
    filled = min(width, int(width * done / total))
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


# ------------------------------------------------------------------------------------------------ events


_captures: list[list[str]] = []  # the innermost task's records; a record goes to one file only
_tasks: list[str] = []  # the running task's status prefix, for progress lines


def _record(name: str, fields: dict) -> str:
    return json.dumps({"ts": round(time.time(), 3), "event": name, **fields}, default=str)


def event(name: str, /, **fields) -> None:
    """Emit one log record: to the task's log file always; on stderr as JSON, or for a person when it matters."""
    fields = redact(fields)  # credentials must never reach a log line, whatever a caller passes in
    line = _record(name, fields)
    if _captures:
        _captures[-1].append(line)
    if not human():
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    elif verbose():
        screen.line(f"[reid-batch] {human_text(name, fields)}")
    elif is_warning(name, fields):
        screen.line(f"warning: {human_text(name, fields)}")


def _keep(name: str, /, **fields) -> None:
    """A record for the task's log file only."""
    if _captures:
        _captures[-1].append(_record(name, redact(fields)))


def warning(name: str, /, **fields) -> None:
    """An event a person at a terminal sees without -v."""
    event(name, level="warning", **fields)


@contextmanager
def capture() -> Iterator[list[str]]:
    """Collect every record emitted inside (JSON lines) for a task's log file; nested captures take them all."""
    records: list[str] = []
    _captures.append(records)
    try:
        yield records
    finally:
        _captures.remove(records)


@contextmanager
def task(label: str) -> Iterator[None]:
    """On a terminal: the task's live line while it runs, then one permanent line with its time (or its failure)."""
    if not human():
        yield
        return
    began = time.monotonic()
    _tasks.append(label)
    screen.show(f"{label} ...", force=True)
    try:
        yield
    except BaseException:
        screen.status = ""
        screen.line(f"{label} ... failed after {duration(time.monotonic() - began)}")
        raise
    finally:
        _tasks.remove(label)
    screen.status = ""
    screen.line(f"{label} ... {duration(time.monotonic() - began)}")


def progress(items: Iterable[T], desc: str, total: int | None = None, every: int = 50) -> Iterator[T]:
    """A progress bar on the live line of a terminal; on a pipe, a JSON progress record every `every` items and at
    the end (and every PROGRESS_SECONDS_VARIABLE seconds for a parent that draws them, kept out of the log file)."""
    start = time.monotonic()
    done = 0
    if human():
        prefix = f"{_tasks[-1]} " if _tasks else ""
        for item in items:
            yield item
            done += 1
            seconds = time.monotonic() - start
            screen.show(f"{prefix}{desc} {bar(done, total)} {duration(seconds)}")
            if done % every == 0:  # the log file holds what a pipe would have shown
                _keep("progress", desc=desc, done=done, total=total, seconds=round(seconds, 2))
        seconds = time.monotonic() - start
        screen.show(f"{prefix}{desc} {bar(done, total)} {duration(seconds)}", force=True)
        _keep("progress", desc=desc, done=done, total=total, seconds=round(seconds, 2))
        if prefix:
            screen.show(f"{prefix}...", force=True)
        else:
            screen.clear()
        return
    live = float(os.environ.get(PROGRESS_SECONDS_VARIABLE) or 0)
    shown = start
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if done % every == 0:
            event("progress", desc=desc, done=done, total=total, seconds=round(now - start, 2))
            shown = now
        elif live and now - shown >= live:
            # for the drawing parent only: not an event, so not in the task's log file
            sys.stderr.write(_record("progress", {"desc": desc, "done": done, "total": total, "live": True}) + "\n")
            sys.stderr.flush()
            shown = now
    event("progress", desc=desc, done=done, total=total, seconds=round(time.monotonic() - start, 2))
