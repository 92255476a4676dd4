"""Pre-emption: SIGTERM (what Slurm and Kubernetes send first) stops a task cleanly, with exit code 75.

`reid-batch` installs :func:`handle_termination` around every command. What a SIGTERM then does depends on
where the task is:

* inside a :func:`deferred` region (fine-tuning steps, sampling chunks) it only records the request; the stage
  calls :func:`check` at its next safe point, after committing what it finished (fine-tuning commits a
  checkpoint of the step it is at first), and :class:`Preempted` ends the task;
* anywhere else :class:`Preempted` is raised at once: storage's commits discard their staging area on the way
  out, so what was committed stays committed and nothing half-written becomes visible (exactly what a SIGKILL
  would leave, only sooner and with a clear exit status). A second SIGTERM always stops at once.

`Preempted` derives from BaseException, like KeyboardInterrupt, so no `except Exception` on the way can swallow
it. The CLI maps it to EXIT_REQUEUE = 75 (EX_TEMPFAIL in sysexits.h: "temporary failure, try again"): the task
made no error and a re-run resumes from its commits. Kubernetes Jobs ignore that exit code in their retry count
(podFailurePolicy) and slurm/submit.sh's job scripts requeue themselves on it.

Several processes (Accelerate, torchrun): :func:`check` with ``accelerator`` reduces the flag over all ranks
(MAX all-reduce), so every rank stops at the same step or chunk even if only one of them received the signal.
It is a collective: call it where every rank calls it, or not at all.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import threading
from typing import Callable, Iterator, TypeVar

from reid_batch import log

EXIT_REQUEUE = 75

F = TypeVar("F", bound=Callable)

_received: int | None = None  # the signal number of the first termination request, while a handler is installed
_deferring = 0  # depth of nested deferred() regions


class Preempted(BaseException):
    """The task was asked to terminate; what it committed is kept, a re-run resumes. Exit code 75."""

    exit_code = EXIT_REQUEUE


def _signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def _on_termination(signum: int, frame) -> None:
    # No logging here: a handler that writes to stderr while the main thread does raises a re-entrancy error.
    global _received
    first = _received is None
    _received = signum
    if not _deferring or not first:
        raise Preempted(f"{_signal_name(signum)} received")


@contextlib.contextmanager
def handle_termination(signals: tuple[int, ...] = (signal.SIGTERM,)) -> Iterator[None]:
    """Turn SIGTERM into :class:`Preempted` for the block (main thread only; elsewhere a no-op)."""
    global _received
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, _on_termination) for number in signals}
    _received = None
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        _received = None


@contextlib.contextmanager
def deferred_region() -> Iterator[None]:
    """Within the block, a first termination request waits for the next :func:`check`."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1


def deferred(function: F) -> F:
    """Decorator form of :func:`deferred_region`: the function's loop calls :func:`check` at its safe points."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with deferred_region():
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def requested(accelerator=None) -> bool:
    """Whether termination was asked for; with a multi-process ``accelerator``, on ANY rank (a collective)."""
    asked = _received is not None
    if accelerator is not None and getattr(accelerator, "num_processes", 1) > 1:
        import torch  # torch-free module otherwise: the CLI installs the handler before any stage loads torch
        import torch.distributed as dist

        flag = torch.tensor([1 if asked else 0], dtype=torch.int32, device=accelerator.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        asked = bool(flag.item())
    return asked


def check(where: str, accelerator=None) -> None:
    """A safe point: raise :class:`Preempted` if termination was asked for (on any rank, given ``accelerator``)."""
    if requested(accelerator):
        stop(where)


def stop(where: str) -> None:
    """Raise :class:`Preempted` now (after :func:`requested` said so, on this rank or another)."""
    name = _signal_name(_received) if _received is not None else "SIGTERM on another process"
    log.event("preempted", at=where, signal=name)
    raise Preempted(f"{name}; stopped at {where}")


def describe(error: Preempted) -> str:
    return f"pre-empted ({error}); committed work is kept, re-run the same command to resume"
