"""Peak RSS of a real `reid-batch sample` task against its number of candidates: memory must stay flat.

Builds randomly initialised checkpoints of the chosen configuration (a ResNet18 target and a PGGAN committed as
the run's fine-tuned generator), then runs `python -m reid_batch sample` once per count, each in its own process,
and reads that process's own peak RSS (os.wait4). One shard, chunks of 4096, as a cluster task would run.

    PYTHONPATH=$PWD python bench/sample_rss.py --config demo --counts 10000 1000000   # the long one
    PYTHONPATH=$PWD python bench/sample_rss.py --config tiny --counts 10000 100000 --json rss.json

demo: the built-in demo's sizes (PGGAN depths [64, 64, 32, 16], latent 128, 32 px; ResNet18 at 32 px), as in
manifests/demo.yaml.
tiny: the test suite's sizes (PGGAN depths [32, 16, 8], latent 16, 16 px; ResNet18 at 32 px), for quick checks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "demo": {"latent_dim": 128, "depths": [64, 64, 32, 16], "target_size": 32, "batch_size": 128},
    "tiny": {"latent_dim": 16, "depths": [32, 16, 8], "target_size": 32, "batch_size": 128},
}


def prepare(config: dict, directory: Path, count: int) -> Path:
    import torch

    from reid_batch.checkpoints import save_state_dict
    from reid_batch.manifest import parse_manifest
    from reid_batch.models.pggan import PGGANConfig, PGGANGenerator, save_generator
    from reid_batch.models.targets import build_target
    from reid_batch.runtime import run_store

    torch.manual_seed(0)
    generator_path, target_path = directory / "generator.safetensors", directory / "target.safetensors"
    if not generator_path.exists():
        save_generator(PGGANGenerator(PGGANConfig(latent_dim=config["latent_dim"], depths=tuple(config["depths"]),
                                                  out_channels=1)), generator_path)
        save_state_dict(build_target("resnet18", 1).state_dict(), target_path)
    document = yaml.safe_load((REPO / "manifests" / "demo.yaml").read_text())
    document["output"] = {"uri": str(directory / f"out-{count}")}
    document["targets"] = [{"name": "cnn", "arch": "resnet18", "checkpoint": str(target_path),
                            "input": {"size": config["target_size"]}}]
    document["generator"] = {"checkpoint": str(generator_path), "format": "reid", "latent_dim": config["latent_dim"],
                             "depths": config["depths"], "out_channels": 1}
    document["sampling"] = {"num_candidates": count, "num_shards": 1, "chunk_size": 4096, "row_group_size": 4096,
                            "batch_size": config["batch_size"], "seed": 0}
    manifest = parse_manifest(document)
    with run_store(manifest).committed("cnn/finetune", {"stage": "finetune"}) as out:  # stage 1's stand-in
        out.write_bytes("generator.safetensors", generator_path.read_bytes())
    path = directory / f"sample-{count}.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def measure(manifest: Path) -> tuple[float, float]:
    """(seconds, peak RSS MiB) of one `reid-batch sample` process."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "reid_batch", "sample", str(manifest)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"sample failed ({process.returncode}): {stderr.decode()[-2000:]}")
    return time.perf_counter() - started, usage.ru_maxrss / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="demo")
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--workdir", help="default: a temporary directory, deleted afterwards")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for count in args.counts:
            seconds, rss = measure(prepare(CONFIGS[args.config], Path(tmp), count))
            row = {"config": args.config, "candidates": count, "seconds": round(seconds, 1),
                   "candidates_per_second": round(count / seconds, 1), "peak_rss_mib": round(rss, 1),
                   "load_average": [round(x, 2) for x in os.getloadavg()]}
            print(json.dumps(row), flush=True)
            results.append(row)
    low, high = results[0]["peak_rss_mib"], results[-1]["peak_rss_mib"]
    print(f"peak RSS {results[0]['candidates']} -> {results[-1]['candidates']} candidates: {low} -> {high} MiB "
          f"({100 * (high - low) / low:+.1f}%)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
