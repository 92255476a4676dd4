"""What every stage shares at run time: which device, which processes, resumable state, and the shell of a
single-writer stage (one process works, the others wait) written once."""

from __future__ import annotations

import contextlib
import glob
import io
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import save as save_tensors

from reid_batch import log
from reid_batch.errors import InputError
from reid_batch.manifest import Manifest, TargetSpec
from reid_batch.storage import run_store

__all__ = ["run_store"]  # re-exported: the stages' one way to open the run's store


# The oldest NVIDIA driver (Linux) each CUDA release needs (NVIDIA's CUDA toolkit release notes, table 3).
CUDA_DRIVER_FLOOR = {"11.8": "520", "12.1": "530", "12.4": "550", "12.6": "560", "12.8": "570", "12.9": "575",
                     "13.0": "580"}
# What Slurm and container runtimes put in CUDA_VISIBLE_DEVICES when a task has no GPU.
_NO_GPU_VALUES = {"", "-1", "none", "nodevfiles", "void"}


def gpu_evidence() -> str | None:
    """Why this node looks as if it has a GPU (CUDA_VISIBLE_DEVICES naming devices, /dev/nvidiaN), or None."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip().lower() not in _NO_GPU_VALUES:
        return f"CUDA_VISIBLE_DEVICES={visible}"
    devices = sorted(glob.glob("/dev/nvidia[0-9]*"))
    return f"{devices[0]} exists" if devices else None


def cuda_unavailable_message(evidence: str | None) -> str:
    """What to tell a user whose GPU torch cannot use: the build's CUDA version and the driver it needs."""
    built = torch.version.cuda
    if built is None:
        need = "this torch is a CPU-only build"
    else:
        floor = CUDA_DRIVER_FLOOR.get(".".join(built.split(".")[:2]))
        need = (f"this torch is built for CUDA {built}, which needs NVIDIA driver >= {floor}" if floor
                else f"this torch is built for CUDA {built}") + " and a GPU of compute capability >= 7.5"
    seen = f"the node shows a GPU ({evidence}) but " if evidence else ""
    return (f"{seen}torch cannot use CUDA: {need}. Check `nvidia-smi` on the node; on an older driver build the "
            "image on an older CUDA (docker/README.md: --build-arg BASE_IMAGE=...), or set compute.device: cpu "
            "to run on the CPU on purpose")


def pick_device(manifest: Manifest) -> torch.device:
    """cuda or cpu by compute.device. `auto` on a node that shows a GPU torch cannot use is an error, not a silent
    CPU run (an old driver makes CUDA unavailable, and a 1024 px study would then run for weeks on the CPU)."""
    wanted = manifest.compute.device
    if torch.cuda.is_available() and wanted in ("cuda", "auto"):
        configure_cuda_math(manifest.compute.tf32)
        return torch.device("cuda")
    evidence = gpu_evidence()
    if wanted == "cuda":
        raise InputError(cuda_unavailable_message(evidence) if evidence else
                         "CUDA was asked for but no GPU is visible", "compute.device")
    if wanted == "auto" and evidence is not None:
        raise InputError(cuda_unavailable_message(evidence), "compute.device")
    return torch.device("cpu")


def configure_cuda_math(tf32: bool) -> None:
    """TF32 for float32 matmuls and convolutions as the manifest says (PyTorch's defaults differ between the two).

    cudnn.benchmark stays off on purpose: it picks convolution algorithms by timing them in each process, so sample
    and score (or a shard and its resumed second half) could render the same candidate with different algorithms,
    which the one-rendering rule forbids; the generator's convolutions are a small part of a batch's time."""
    precision = "tf32" if tf32 else "ieee"
    if hasattr(torch.backends.cudnn, "conv"):  # torch >= 2.9: the precision API (allow_tf32 is deprecated)
        torch.backends.cuda.matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = precision
    else:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_state(store, key: str, state: dict[str, Any]) -> None:
    """Write a resume checkpoint atomically; only tensors and plain containers, so it loads weights_only."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    store.write_bytes(key, buffer.getvalue())


def load_state(store, key: str) -> dict[str, Any] | None:
    if not store.exists(key):
        return None
    # Our own file, but still loaded without unpickling code: a tampered output store must not run code.
    return torch.load(io.BytesIO(store.read_bytes(key)), map_location="cpu", weights_only=True)


def state_dict_bytes(state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return save_tensors({k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}, metadata=metadata)


@dataclass
class EpochTimer:
    """Wall time per epoch, for the training record."""

    started: float = 0.0

    def __enter__(self):
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.started
        return False


def log_epoch(kind: str, model: str, **metrics) -> None:
    log.event(f"{kind}_epoch", model=model, **{k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()})


def launched_state(manifest: Manifest):
    """Accelerate's process state when this stage runs under a multi-process launcher, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState  # a slow import, paid only by a launched multi-process task

    return PartialState(cpu=pick_device(manifest).type == "cpu")


def chosen_targets(manifest: Manifest, target: str | None) -> list[TargetSpec]:
    """`--target NAME`: that target; none given: every target of the manifest, in order."""
    return [manifest.target(target)] if target else list(manifest.targets)


def run_single_writer(manifest: Manifest, target: str | None, work: Callable[[TargetSpec], Any]) -> int:
    """The shell of a single-writer stage (select, score, evaluate): under a multi-process launcher only the main
    process does the work, target by target; every process returns once it is done, so a following stage on any
    rank sees its outputs."""
    state = launched_state(manifest)
    if state is None or state.is_main_process:
        for spec in chosen_targets(manifest, target):
            work(spec)
    if state is not None:
        state.wait_for_everyone()
    return 0


def already_committed(store, prefix: str, resume_key: str, stage: str, **fields) -> bool:
    """The training stages' skip: a committed output is kept as it is (logged), and a resume state a kill left
    behind after the commit is deleted."""
    if not store.is_committed(prefix):
        return False
    log.event(f"{stage}_skipped", **fields, reason="already committed")
    store.delete(resume_key)
    return True


def check_shard(shard: int | None, count: int) -> list[int]:
    """The shards a task runs: the one given (checked against the manifest's count), or all of them in turn."""
    if shard is None:
        return list(range(count))
    if not 0 <= shard < count:
        raise InputError(f"shard {shard} is outside 0..{count - 1}", where="--shard")
    return [shard]


class SingleProcess:
    """What the attack's helpers ask of an Accelerator (device, rank, share, barrier), for work done by one process
    alone: evaluate scores the prior on the main process only, so no collective may run there."""

    num_processes = 1
    process_index = 0
    is_main_process = True

    def __init__(self, device: torch.device):
        self.device = device

    def wait_for_everyone(self) -> None:
        pass

    @contextlib.contextmanager
    def split_between_processes(self, items):
        yield items
