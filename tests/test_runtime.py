"""runtime.pick_device: a node that shows a GPU torch cannot use (an old driver) is an error naming the torch build's
CUDA version and the driver it needs, never a silent CPU run of a GPU-sized study."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from reid_batch import runtime
from reid_batch.cli import keep_freed_memory
from reid_batch.errors import InputError
from reid_batch.manifest import parse_manifest

REPO = Path(__file__).resolve().parents[1]


def manifest(device: str):
    document = yaml.safe_load((REPO / "manifests" / "demo.yaml").read_text())
    document["compute"] = {**document.get("compute", {}), "device": device}
    return parse_manifest(document)


@pytest.fixture
def no_cuda(monkeypatch):
    """This machine's view (no usable CUDA), whatever it really has; no /dev/nvidia* unless a test adds one."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime.glob, "glob", lambda pattern: [])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return monkeypatch


@pytest.mark.parametrize("visible", [None, "", "-1", "NoDevFiles"])
def test_auto_runs_on_the_cpu_where_no_gpu_is_shown(no_cuda, visible):
    if visible is not None:
        no_cuda.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert runtime.pick_device(manifest("auto")).type == "cpu"
    assert runtime.pick_device(manifest("cpu")).type == "cpu"
    with pytest.raises(InputError, match="no GPU is visible") as caught:
        runtime.pick_device(manifest("cuda"))
    assert caught.value.where == "compute.device"


def test_auto_on_a_node_showing_a_gpu_torch_cannot_use_is_an_error_naming_the_driver(no_cuda):
    no_cuda.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    no_cuda.setattr(torch.version, "cuda", "12.4")
    for device in ("auto", "cuda"):
        with pytest.raises(InputError) as caught:
            runtime.pick_device(manifest(device))
        message = str(caught.value)
        assert caught.value.where == "compute.device" and "CUDA_VISIBLE_DEVICES=0,1" in message
        assert "built for CUDA 12.4" in message and "driver >= 550" in message and "BASE_IMAGE" in message
    # A device node alone (Kubernetes' device plugin sets no CUDA_VISIBLE_DEVICES) is evidence too.
    no_cuda.delenv("CUDA_VISIBLE_DEVICES")
    no_cuda.setattr(runtime.glob, "glob", lambda pattern: ["/dev/nvidia0"])
    no_cuda.setattr(torch.version, "cuda", None)
    with pytest.raises(InputError, match="/dev/nvidia0 exists.*CPU-only build"):
        runtime.pick_device(manifest("auto"))
    assert runtime.pick_device(manifest("cpu")).type == "cpu"  # asked for on purpose


def test_the_driver_table_covers_the_images_cuda():
    base = (REPO / "docker" / "Dockerfile").read_text().split("ARG BASE_IMAGE=", 1)[1].split()[0]
    cuda = base.split("-cuda", 1)[1].split("-", 1)[0]
    assert cuda in runtime.CUDA_DRIVER_FLOOR, (base, cuda)


@pytest.mark.parametrize("tf32", [True, False])
def test_a_cuda_device_gets_the_manifests_tf32_choice_and_no_cudnn_benchmark(monkeypatch, tf32):
    """PyTorch's own defaults differ (TF32 on for convolutions, off for matmuls); the manifest decides both, and
    cudnn.benchmark stays off so that every stage renders a candidate with the same algorithms."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision, torch.backends.cudnn.benchmark
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    try:
        matmul.fp32_precision = conv.fp32_precision = "ieee" if tf32 else "tf32"
        torch.backends.cudnn.benchmark = True
        document = yaml.safe_load((REPO / "manifests" / "demo.yaml").read_text())
        document["compute"] = {"device": "cuda", "tf32": tf32}
        assert runtime.pick_device(parse_manifest(document)).type == "cuda"
        expected = "tf32" if tf32 else "ieee"
        assert matmul.fp32_precision == expected and conv.fp32_precision == expected
        assert torch.backends.cudnn.benchmark is False
    finally:
        matmul.fp32_precision, conv.fp32_precision, torch.backends.cudnn.benchmark = saved


# A large tensor allocated, filled and freed again and again, as calibrate's repeats do; prints the minor page faults
# of five of them once glibc's heap has settled (in the first few the heap still grows and pages fault in either way).
_REFAULT_PROGRAM = """
import resource, sys
import torch
from reid_batch.cli import keep_freed_memory
print(keep_freed_memory() if sys.argv[1] == "keep" else False)
def churn():
    x = torch.empty(64 * 2**20 // 4); x.fill_(1.0); del x
for _ in range(5):
    churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    churn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_the_cli_keeps_freed_memory_so_a_freed_tensor_is_not_faulted_in_again():
    def faults(mode: str) -> tuple[str, int]:
        environment = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
        result = subprocess.run([sys.executable, "-c", _REFAULT_PROGRAM, mode], capture_output=True, text=True,
                                env=environment, check=True, cwd=REPO)
        took, count = result.stdout.split()
        return took, int(count)

    # glibc's default: 64 MiB is mmap'ed and unmapped each time, 16,384 pages faulted in again per allocation.
    took, default = faults("default")
    assert default > 5 * 10_000
    took, kept = faults("keep")
    assert took == "True" and kept < default / 4, (default, kept)  # at most one of the five faulted in again


def test_keep_freed_memory_leaves_glibc_variables_the_user_set(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert keep_freed_memory() is False
