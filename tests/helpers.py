"""Builders shared by several test modules: tiny checkpoints, manifests and the kill-and-resume check.

Plain functions and constants (fixtures live in conftest.py); test modules import from here, never from each other.
Three sets:
- sampling scale (test_sample, test_select, test_score, ...): random 16 px checkpoints, no training, no world;
- evaluation scale (test_evaluate_report, test_terminal, test_mitigations): a 32 px prior and demographic model for a
  tiny but complete pipeline on a synthetic world;
- recipes (test_recipes, test_reid, test_leak): a demo manifest on the `tiny_world` fixture, and SIGKILL-resume.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
import yaml

from reid_batch import artifacts
from reid_batch.manifest import parse_manifest
from reid_batch.runtime import run_store

REPO = Path(__file__).resolve().parents[1]
LATENT = 16


# ------------------------------------------------------------------------------------------------ sampling scale

DEPTHS = [32, 16, 8]  # 4 -> 16 px
TARGET_SIZE = 16


def tiny_generator(seed: int):
    from reid_batch.models.pggan import PGGANConfig, PGGANGenerator

    torch.manual_seed(seed)
    return PGGANGenerator(PGGANConfig(latent_dim=LATENT, depths=tuple(DEPTHS), out_channels=1))


def _generator_bytes(generator, directory: Path, name: str) -> bytes:
    from reid_batch.models.pggan import save_generator

    path = directory / name
    save_generator(generator, path)
    return path.read_bytes()


def build_inputs(directory: Path) -> dict[str, Path]:
    """Random tiny checkpoints: prior and fine-tuned PGGANs, a ResNet18 with non-trivial BatchNorm statistics,
    a tiny ViT, and a tiny demographic DenseNet."""
    from reid_batch.checkpoints import save_state_dict
    from reid_batch.models.targets import build_target
    from reid_batch.stages.train_demographics import build_model

    directory.mkdir(parents=True, exist_ok=True)
    _generator_bytes(tiny_generator(0), directory, "prior.safetensors")
    _generator_bytes(tiny_generator(1), directory, "finetuned.safetensors")
    torch.manual_seed(0)
    cnn = build_target("resnet18", 1)
    cnn.train()
    with torch.no_grad():  # BatchNorm running statistics of some "training data"
        for _ in range(3):
            cnn(torch.rand(8, 3, TARGET_SIZE, TARGET_SIZE) * 2 - 1)
    save_state_dict(cnn.state_dict(), directory / "cnn.safetensors")
    vit = build_target("vit_custom", 1, image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32)
    save_state_dict(vit.state_dict(), directory / "vit.safetensors")
    torch.manual_seed(0)
    save_state_dict(build_model("densenet_tiny").state_dict(), directory / "demographics.safetensors")
    return {name: directory / f"{name}.safetensors" for name in ("prior", "finetuned", "cnn", "vit", "demographics")}


def make_manifest(inputs: dict[str, Path], output: str, s3_endpoint: str | None = None, target: str = "cnn",
                  sampling_options: dict | None = None, selection: dict | None = None, demographics: dict | None = None,
                  data: dict | None = None, target_section: dict | None = None):
    """The demo manifest on build_inputs' checkpoints: 24 candidates in 2 shards, sampling from stage 1's result."""
    document = yaml.safe_load((REPO / "manifests" / "demo.yaml").read_text())
    document["output"] = {"uri": output}
    if data is not None:
        document["data"] = data
    if s3_endpoint:
        document["output"]["s3"] = {"endpoint": s3_endpoint, "region": "us-east-1"}
    if target == "cnn":
        document["targets"] = [{"name": "cnn", "arch": "resnet18", "checkpoint": str(inputs["cnn"]),
                                "input": {"size": TARGET_SIZE}}]
    else:
        document["targets"] = [{"name": "vit", "arch": "vit_custom", "checkpoint": str(inputs["vit"]),
                                "input": {"size": 16},
                                "vit": {"patch_size": 8, "num_layers": 2, "num_heads": 2, "hidden_dim": 16, "mlp_dim": 32},
                                "objective": {"reference": {"source": "prior", "num_images": 16}}}]
    if target_section is not None:
        document["targets"] = [target_section]
    document["generator"] = {"checkpoint": str(inputs["prior"]), "format": "reid", "latent_dim": LATENT,
                             "depths": DEPTHS, "out_channels": 1}
    document["sampling"] = {"num_candidates": 24, "num_shards": 2, "chunk_size": 5, "batch_size": 4,
                            "row_group_size": 3, "seed": 7, **(sampling_options or {})}
    document["selection"] = selection or {"rule": "quantile", "objective_quantile": 0.5, "mahalanobis_quantile": 0.5}
    document["demographics"] = {"arch": "densenet_tiny", "checkpoint": str(inputs["demographics"]), "image_size": 32,
                                **(demographics or {})}
    document["compute"] = {"device": "cpu"}
    return parse_manifest(document)


def commit_finetuned(manifest, inputs: dict[str, Path]) -> None:
    """Stand-in for stage 1's committed result: the fine-tuned generator of every target."""
    store = run_store(manifest)
    for spec in manifest.targets:
        with store.committed(f"{spec.name}/finetune", {"stage": "finetune"}) as out:
            out.write_bytes("generator.safetensors", inputs["finetuned"].read_bytes())


def all_rows(manifest, target: str = "cnn"):
    """Every committed candidate row of a target, sorted by id (pandas)."""
    store = run_store(manifest)
    summaries, missing = artifacts.read_shard_summaries(store, target, manifest.sampling.num_shards)
    assert not missing
    tables = [pq.read_table(store.path(c["key"]), filesystem=store.filesystem).to_pandas()
              for s in summaries.values() for c in s["chunks"]]
    import pandas as pd

    return pd.concat(tables).sort_values("id").reset_index(drop=True)


class HostWork:
    """Counts, per thread, the device-to-host copies (Tensor.cpu of computed tensors) and PNG encodings
    (formats.png_bytes) made while it is installed: on a GPU each copy on the loop's thread is a wait for the
    device. On this CPU they cost nothing, so they are counted rather than timed."""

    def __init__(self, monkeypatch):
        import threading

        from reid_batch import formats

        self.copies: dict[str, int] = {}
        self.pngs: dict[str, int] = {}
        original_cpu, original_png = torch.Tensor.cpu, formats.png_bytes

        def cpu(tensor, *args, **kwargs):
            # int64 tensors here are ids made on the host from numpy (latents_for_ids): no copy on a GPU either.
            if tensor.dtype != torch.int64:
                name = threading.current_thread().name
                self.copies[name] = self.copies.get(name, 0) + 1
            return original_cpu(tensor, *args, **kwargs)

        def png(image):
            name = threading.current_thread().name
            self.pngs[name] = self.pngs.get(name, 0) + 1
            return original_png(image)

        monkeypatch.setattr(torch.Tensor, "cpu", cpu)
        monkeypatch.setattr(formats, "png_bytes", png)

    def on_main_thread(self) -> tuple[int, int]:
        return self.copies.get("MainThread", 0), self.pngs.get("MainThread", 0)


# ------------------------------------------------------------------------------------------------ evaluation scale

EVALUATION_DEPTHS = [32, 16, 8, 8]  # 4 -> 32 px
EVALUATION_SIZE = 32
EVALUATION_WORLD = {"seed": 0, "image_size": EVALUATION_SIZE, "private_patients": 16, "public_patients": 8,
                    "control_patients": 10, "max_studies_per_patient": 2}


def evaluation_inputs(directory: Path) -> dict[str, Path]:
    """A random 32 px prior PGGAN and a tiny demographic DenseNet, written to `directory`."""
    from reid_batch.checkpoints import save_state_dict
    from reid_batch.models.pggan import PGGANConfig, PGGANGenerator, save_generator
    from reid_batch.stages.train_demographics import build_model

    torch.manual_seed(0)
    save_generator(PGGANGenerator(PGGANConfig(latent_dim=LATENT, depths=tuple(EVALUATION_DEPTHS), out_channels=1)),
                   directory / "prior.safetensors")
    torch.manual_seed(0)
    save_state_dict(build_model("densenet_tiny").state_dict(), directory / "demographics.safetensors")
    return {"prior": directory / "prior.safetensors", "demographics": directory / "demographics.safetensors"}


def evaluation_manifest(root: Path, inputs: dict[str, Path], output: str, s3_endpoint: str | None = None):
    """Every stage at its smallest on EVALUATION_WORLD (written under root / "world"): a target, a control and an
    identity target, stage 1 for 2 steps, 64 candidates, ppa, evaluation and calibration."""
    size = EVALUATION_SIZE
    document = yaml.safe_load((REPO / "manifests" / "demo.yaml").read_text())
    document["output"] = {"uri": output}
    if s3_endpoint:
        document["output"]["s3"] = {"endpoint": s3_endpoint, "region": "us-east-1"}
    document["data"] = {"synthetic": {"root": str(root / "world"), **EVALUATION_WORLD}, "val_fraction": 0.2,
                        "split_seed": 0}
    train = {"preset": "normal", "epochs": 1, "batch_size": 8}
    document["targets"] = [
        # P2 at its smallest: 3 canaries at 1 and 3 at 2 training studies; coin seed 0 puts canaries on both sides.
        {"name": "cnn", "arch": "resnet18", "input": {"size": size}, "attacks": ["study", "ppa"],
         "train": {**train, "canaries": {"per_dose": 3, "duplicates": [1, 2], "seed": 0}}},
        {"name": "cnn-control", "arch": "resnet18", "train": {**train, "pool": "control"}, "input": {"size": size}},
        # P1 at its smallest: 2 patients as 2 classes, attacked with the per-class latent offsets.
        {"name": "identity", "arch": "resnet18", "input": {"size": size}, "objective": {"class_offsets": True},
         "attacks": ["study", "ppa"], "train": {"preset": "identity", "epochs": 1, "batch_size": 4,
                   "identity": {"patients": 2, "studies": 4, "validation_studies": 1}}},
    ]
    document["generator"] = {"checkpoint": str(inputs["prior"]), "format": "reid", "latent_dim": LATENT,
                             "depths": EVALUATION_DEPTHS, "out_channels": 1}
    document["finetune"] = {"steps": 2, "batch_size": 4, "lr": 1e-4, "checkpoint_every": 100, "log_every": 1}
    document["sampling"] = {"num_candidates": 64, "batch_size": 32, "num_shards": 1, "chunk_size": 64,
                            "row_group_size": 64, "seed": 3}
    document["selection"] = {"rule": "top_k", "top_k": 7}
    # The ppa attack at its smallest (the cnn target has one logit: attacked as two classes).
    document["ppa"] = {"search": 6, "optimise": 3, "keep": 2, "steps": 3, "search_views": 2, "final_views": 3,
                       "batch_size": 4}
    document["demographics"] = {"arch": "densenet_tiny", "checkpoint": str(inputs["demographics"]),
                                "image_size": size, "num_shards": 2}
    # FID is off here: each FID needs a 2048 x 2048 matrix square root, about a minute on a loaded 2-core machine.
    # distribution_metrics' FID wiring is tested in test_evaluate_report on small features; the metric itself in
    # test_metrics.py.
    document["evaluation"] = {"num_images": 12, "pca_components": 5, "bootstrap": 20, "fid": False,
                              "membership_candidates": 40, "leak_bootstrap": 200, "leak_permutations": 200,
                              "population_shift": True}
    # A tiny embedding (one epoch on 8 public patients): the wiring, not its quality, is tested here.
    document["reid"] = {"arch": "reid_small", "image_size": size, "embedding_dim": 16, "width": 8,
                        "train": {"epochs": 1, "patients_per_batch": 4, "validate_every": 1}}
    document["calibration"] = {"fractions": [0.0, 0.1], "seeds": 2, "null_seeds": 2}
    document["compute"] = {"device": "cpu"}
    return parse_manifest(document)


# ------------------------------------------------------------------------------------------------ recipes


def tiny_manifest(world: Path, output: Path, **target_train) -> dict:
    """The demo manifest (a document, not parsed) on the `tiny_world` fixture's world, one cnn target trained with
    `target_train` over the "normal" preset for 2 epochs."""
    document = yaml.safe_load((REPO / "manifests" / "demo.yaml").read_text())
    document["output"] = {"uri": str(output)}
    document["data"]["synthetic"].update(root=str(world), image_size=32, private_patients=40, public_patients=60,
                                         control_patients=20, max_studies_per_patient=2, seed=3)
    train = {"preset": "normal", "epochs": 2, "batch_size": 16, **target_train}
    document["targets"] = [{"name": "cnn", "arch": "resnet18", "train": train, "input": {"size": 32, "channels": 3}}]
    document["demographics"] = {"arch": "densenet_tiny", "image_size": 32, "train": {"epochs": 2, "batch_size": 16}}
    return document


def commit_marker(output: Path, prefix: str) -> Path:
    return output / "demo" / prefix / "_COMMITTED"


def kill_and_resume_equals_clean_run(tmp_path: Path, stage: str, make_manifest, resume_key: str, prefix: str) -> None:
    """Run `stage` cleanly; run it again, SIGKILL it once its resume state exists, re-run: same weights."""
    from safetensors.torch import load_file

    def manifest_file(output: Path) -> Path:
        path = output.parent / f"{output.name}.yaml"
        path.write_text(yaml.safe_dump(make_manifest(output)))
        return path

    clean_out, killed_out = tmp_path / "clean", tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "reid_batch", stage]
    subprocess.run(command + [str(manifest_file(clean_out))], check=True, env=env, capture_output=True)

    process = subprocess.Popen(command + [str(manifest_file(killed_out))], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resume = killed_out / "demo" / resume_key
    deadline = time.time() + 120
    while not resume.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, "training finished before it could be killed; make it longer"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not commit_marker(killed_out, prefix).exists()
    subprocess.run(command + [str(manifest_file(killed_out))], check=True, env=env, capture_output=True)

    clean = load_file(str(clean_out / "demo" / prefix / "model.safetensors"))
    resumed = load_file(str(killed_out / "demo" / prefix / "model.safetensors"))
    assert clean.keys() == resumed.keys()
    for key in clean:
        torch.testing.assert_close(resumed[key], clean[key], rtol=0, atol=1e-6, msg=key)
