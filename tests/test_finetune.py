"""finetune (stage 1): 1 x 16 == 2 x 8 processes, SIGKILL + resume == uninterrupted, every term logged and the
statistics terms going down (CNN and ViT), finished run is a no-op, indivisible batch -> exit 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from reid_batch.checkpoints import save_state_dict
from reid_batch.errors import InputError
from reid_batch.manifest import parse_manifest
from reid_batch.models.pggan import (PGGANConfig, PGGANDiscriminator, PGGANGenerator, discriminator_bytes,
                                     load_discriminator, save_generator)
from reid_batch.models.targets import build_target
from reid_batch.stages import finetune as ft
from reid_batch.runtime import run_store
from reid_batch import artifacts
from reid_batch import layout
from reid_batch.attack import reference

REPO = Path(__file__).resolve().parents[1]
DEPTHS = [32, 16, 8]  # 4 -> 16 px
LATENT = 16
TINY_VIT = {"patch_size": 8, "num_layers": 2, "num_heads": 2, "hidden_dim": 16, "mlp_dim": 32}
# The real CLI, as a launcher's script.
CLI_SHIM = textwrap.dedent("""
    import sys
    from reid_batch.cli import main
""")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Two cores shared by several jobs: more threads than cores makes every step many times slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A random tiny prior, a random ResNet18 and tiny ViT target, and a folder of public images."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    save_generator(PGGANGenerator(PGGANConfig(latent_dim=LATENT, depths=tuple(DEPTHS), out_channels=1)),
                   root / "prior.safetensors")
    save_state_dict(build_target("resnet18", 1).state_dict(), root / "cnn.safetensors")
    save_state_dict(build_target("vit_custom", 1, image_size=32, **TINY_VIT).state_dict(), root / "vit.safetensors")
    public = root / "public"
    public.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        # Smooth bright blobs: statistics clearly unlike the random prior's, so ln_stats has somewhere to go.
        y, x = np.mgrid[0:32, 0:32] / 32.0
        cy, cx, w = rng.uniform(0.3, 0.7, 3)
        image = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (0.05 + 0.1 * w)) * 0.8 + rng.uniform(0, 0.1, (32, 32))
        Image.fromarray((image.clip(0, 1) * 255).astype(np.uint8)).save(public / f"img{i:02d}.png")
    return {"prior": root / "prior.safetensors", "cnn": root / "cnn.safetensors", "vit": root / "vit.safetensors",
            "public": public}


def document(models: dict[str, Path], output: Path, target: str = "cnn", **finetune) -> dict:
    doc = yaml.safe_load((REPO / "manifests" / "demo.yaml").read_text())
    doc["output"]["uri"] = str(output)
    doc["data"] = {"private": {"format": "folder", "root": str(models["public"])},
                   "public": {"format": "folder", "root": str(models["public"])}}
    if target == "cnn":
        doc["targets"] = [{"name": "cnn", "arch": "resnet18", "checkpoint": str(models["cnn"]),
                           "input": {"size": 16, "channels": 3}}]
    else:
        doc["targets"] = [{"name": "vit", "arch": "vit_custom", "checkpoint": str(models["vit"]), "vit": TINY_VIT,
                           "input": {"size": 32, "channels": 3},
                           "objective": {"reference": {"source": "public", "num_images": 20}}}]
    doc["generator"] = {"arch": "pggan", "checkpoint": str(models["prior"]), "format": "reid",
                        "latent_dim": LATENT, "depths": DEPTHS, "out_channels": 1}
    doc["finetune"] = {"lr": 1e-3, "steps": 3, "batch_size": 16, "checkpoint_every": 100, "log_every": 10,
                       **finetune}
    return doc


def write(doc: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def outputs(doc: dict, target: str = "cnn") -> Path:
    return Path(doc["output"]["uri"]) / doc["run_id"] / target


def generator_tensors(target_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(target_dir / "finetune" / "generator.safetensors"))


# --------------------------------------------------------------------------------------------- multi-process


WORKER = CLI_SHIM + textwrap.dedent("""
    import json, os
    report, *manifests = sys.argv[1:]
    codes = [main(["finetune", path]) for path in manifests]
    with open(f"{report}.{os.environ['RANK']}", "w") as handle:
        json.dump(codes, handle)
""")


def vit_prior_reference(models: dict[str, Path], output: Path) -> dict:
    doc = document(models, output, target="vit", steps=2)
    doc["targets"][0]["objective"]["reference"] = {"source": "prior", "num_images": 13}
    return doc


@pytest.mark.slow
def test_two_processes_of_8_match_one_of_16_and_an_indivisible_batch_exits_2(models, tmp_path):
    single, single_vit = document(models, tmp_path / "one"), vit_prior_reference(models, tmp_path / "one")
    ft.run(parse_manifest(single))
    ft.run(parse_manifest(single_vit))

    double, double_vit = document(models, tmp_path / "two"), vit_prior_reference(models, tmp_path / "two")
    bad = document(models, tmp_path / "bad", batch_size=15)
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    # --standalone picks a free rendezvous port, so parallel test runs never collide.
    done = subprocess.run(
        [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2", str(worker),
         str(tmp_path / "codes"), str(write(bad, tmp_path / "bad.yaml")), str(write(double, tmp_path / "two.yaml")),
         str(write(double_vit, tmp_path / "two-vit.yaml"))],
        env=child_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"codes.{rank}").read_text()) == [2, 0, 0]
    assert "finetune.batch_size" in done.stderr
    assert not (tmp_path / "bad").exists() or not list((tmp_path / "bad").rglob("_COMMITTED"))

    # ViT reference statistics measured by two processes on their halves of 13 prior samples.
    one_vit, two_vit = outputs(single_vit, "vit"), outputs(double_vit, "vit")
    reference_one = load_file(str(one_vit / layout.FINETUNE_REFERENCE_FILE))
    reference_two = load_file(str(two_vit / layout.FINETUNE_REFERENCE_FILE))
    assert float(reference_two["count"]) == 13 and reference_one.keys() == reference_two.keys()
    for key in reference_one:
        torch.testing.assert_close(reference_two[key], reference_one[key], rtol=1e-5, atol=1e-6)
    vit_columns = ["ln_stats", "cls_magnitude", "attn_entropy", "attn_diversity", "logits", "tv", "total", "grad_norm"]
    np.testing.assert_allclose(pd.read_parquet(two_vit / "finetune" / "losses.parquet")[vit_columns].to_numpy(),
                               pd.read_parquet(one_vit / "finetune" / "losses.parquet")[vit_columns].to_numpy(),
                               rtol=1e-5, atol=1e-7)

    one, two = outputs(single), outputs(double)
    record = json.loads((two / "finetune" / "finetune.json").read_text())
    assert record["world_size"] == 2 and json.loads((one / "finetune" / "finetune.json").read_text())["world_size"] == 1
    losses_one = pd.read_parquet(one / "finetune" / "losses.parquet")
    losses_two = pd.read_parquet(two / "finetune" / "losses.parquet")
    # grad_norm too: Adam would hide a gradient off by a constant factor (e.g. DDP's averaging left uncorrected).
    columns = ["bn_stats", "feature_stats", "logits", "tv", "total", "grad_norm"]
    assert list(losses_two["step"]) == [1, 2, 3]
    np.testing.assert_allclose(losses_two[columns].to_numpy(), losses_one[columns].to_numpy(), rtol=1e-5, atol=1e-7)
    # The steps after the first depend on the update: equal losses there already imply equal updates.
    prior = load_file(str(models["prior"]))
    after_one, after_two = generator_tensors(one), generator_tensors(two)
    moved = max(float((after_one[k] - prior[k]).abs().max()) for k in prior)
    assert moved > 1e-3  # the generator really trained, far beyond the tolerance below
    for key in prior:
        torch.testing.assert_close(after_two[key], after_one[key], rtol=1e-5, atol=1e-6)


def test_batch_not_dividing_among_processes_is_an_input_error():
    assert ft.check_batch_size(16, 2) == 8
    with pytest.raises(InputError) as error:
        ft.check_batch_size(15, 2)
    assert error.value.where == "finetune.batch_size"


def test_latents_of_a_step_split_contiguously_over_processes():
    whole = ft.step_ids(step=5, batch_size=16, rank=0, per_process=16)
    halves = torch.cat([ft.step_ids(5, 16, rank, 8) for rank in (0, 1)])
    assert torch.equal(whole, halves) and int(whole[0]) == 80


# --------------------------------------------------------------------------------------------- kill and resume


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_uninterrupted_result_and_ignores_half_written_checkpoints(models, tmp_path):
    settings = {"steps": 12, "checkpoint_every": 3, "batch_size": 8}
    killed = document(models, tmp_path / "killed", **settings)
    path = write(killed, tmp_path / "killed.yaml")
    checkpoints = outputs(killed) / "finetune-checkpoints"
    log_file = tmp_path / "killed.log"
    with open(log_file, "wb") as log_handle:
        process = subprocess.Popen([sys.executable, "-c", CLI_SHIM + "sys.exit(main(sys.argv[1:]))", "finetune",
                                    str(path)], env=child_env(), stdout=subprocess.DEVNULL, stderr=log_handle)
    try:
        deadline = time.monotonic() + 300
        while not list(checkpoints.glob("step-*/_COMMITTED")):
            assert process.poll() is None, log_file.read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert not (outputs(killed) / "finetune" / "_COMMITTED").exists(), "the run finished before it could be killed"
    committed = sorted(int(p.parent.name[5:]) for p in checkpoints.glob("step-*/_COMMITTED"))
    assert committed and len(committed) <= ft.KEEP_CHECKPOINTS

    # A checkpoint killed before its marker, and one still in staging: loading either would fail or diverge.
    unmarked = checkpoints / "step-0000011"
    unmarked.mkdir()
    (unmarked / layout.FINETUNE_STATE_FILE).write_bytes(b"half a checkpoint")
    staged = checkpoints / "step-0000010" / "_tmp-0123456789abcdef"
    staged.mkdir(parents=True)
    (staged / layout.FINETUNE_STATE_FILE).write_bytes(b"still staging")
    (staged / "_COMMITTED").write_text("{}")
    assert ft.list_checkpoints(run_store(parse_manifest(killed)), "cnn")[0] == committed

    assert ft.run(parse_manifest(killed)) == 0
    record = json.loads((outputs(killed) / "finetune" / "finetune.json").read_text())
    assert record["resumed_from_step"] == committed[-1]
    assert not checkpoints.exists()  # the finished output makes every checkpoint, half-written ones too, obsolete

    straight = document(models, tmp_path / "straight", **settings)
    manifest = parse_manifest(straight)
    seen: list[list[int]] = []
    store = run_store(manifest)
    ft.finetune_target(manifest, 0, ft.make_accelerator(manifest),
                       on_checkpoint=lambda step: seen.append(ft.list_checkpoints(store, "cnn")[0]))
    assert seen == [[3], [3, 6], [6, 9]]  # the last two are kept

    expected, got = generator_tensors(outputs(straight)), generator_tensors(outputs(killed))
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    columns = ["step", "bn_stats", "feature_stats", "logits", "tv", "total", "grad_norm"]
    pd.testing.assert_frame_equal(pd.read_parquet(outputs(killed) / "finetune" / "losses.parquet")[columns],
                                  pd.read_parquet(outputs(straight) / "finetune" / "losses.parquet")[columns])


# --------------------------------------------------------------------------------------------- terms and outputs


@pytest.fixture(scope="module")
def cnn_run(models, tmp_path_factory):
    doc = document(models, tmp_path_factory.mktemp("cnn"), steps=30, batch_size=8, log_every=5, lr=3e-3)
    ft.run(parse_manifest(doc))
    return doc


def _went_down(series: pd.Series, factor: float) -> bool:
    return series.iloc[-5:].mean() < factor * series.iloc[:5].mean()


def test_cnn_run_logs_every_term_and_matches_batchnorm_statistics_better(cnn_run):
    out = outputs(cnn_run) / "finetune"
    assert sorted(p.name for p in out.iterdir()) == [
        "_COMMITTED", "finetune.json", "generator.safetensors", "losses.parquet", "samples_after.png",
        "samples_before.png"]
    losses = pd.read_parquet(out / "losses.parquet")
    assert {"bn_stats", "feature_stats", "logits", "tv", "total", "grad_norm", "seconds", "elapsed"} <= set(losses.columns)
    assert list(losses["step"]) == list(range(1, 31))
    weights = {"bn_stats": 1.0, "feature_stats": 1.0, "logits": 1.0, "tv": 1e-5}
    np.testing.assert_allclose(losses["total"], sum(w * losses[t] for t, w in weights.items()), rtol=1e-5)
    assert _went_down(losses["bn_stats"], 0.95), losses["bn_stats"].tolist()
    record = json.loads((out / "finetune.json").read_text())
    assert record["terms"] == weights and record["reference"] is None and record["steps"] == 30
    assert record["seconds_per_step"] > 0 and record["world_size"] == 1
    before, after = Image.open(out / "samples_before.png"), Image.open(out / "samples_after.png")
    assert before.size == after.size == (4 * 16 + 5 * 2,) * 2 and before.mode == "L"
    assert np.abs(np.asarray(before, dtype=float) - np.asarray(after, dtype=float)).mean() > 0.5


def test_finished_run_is_a_no_op(cnn_run):
    target_dir = outputs(cnn_run)
    snapshot = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in target_dir.rglob("*") if p.is_file()}
    assert not (target_dir / "finetune-checkpoints").exists()
    ft.run(parse_manifest(cnn_run))
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in target_dir.rglob("*") if p.is_file()} == snapshot


def test_vit_run_uses_cached_public_reference_and_matches_layernorm_statistics_better(models, tmp_path):
    doc = document(models, tmp_path, target="vit", steps=30, batch_size=8, log_every=5, lr=3e-3)
    ft.run(parse_manifest(doc))
    out = outputs(doc, "vit")
    losses = pd.read_parquet(out / "finetune" / "losses.parquet")
    terms = ["ln_stats", "cls_magnitude", "attn_entropy", "attn_diversity", "logits", "tv"]
    assert set(terms) <= set(losses.columns) and losses[terms].notna().all().all()
    assert _went_down(losses["ln_stats"], 0.9), losses["ln_stats"].tolist()
    record = json.loads((out / "finetune" / "finetune.json").read_text())
    assert record["reference"] == {"source": "public", "num_images": 20, "images": 20, "cached": False,
                                   "file": f"vit/{layout.FINETUNE_REFERENCE_FILE}"}
    cache = out / layout.FINETUNE_REFERENCE_FILE
    assert cache.exists() and float(load_file(str(cache))["count"]) == 20

    # A second target run (output removed) reuses the cache; a changed reference setting does not.
    manifest = parse_manifest(doc)
    store = run_store(manifest)
    model, _ = artifacts.load_attack_target(manifest, manifest.targets[0])
    prior = PGGANGenerator(PGGANConfig(latent_dim=LATENT, depths=tuple(DEPTHS), out_channels=1))
    accelerator = ft.make_accelerator(manifest)
    _, info = reference.reference_stats(manifest, manifest.targets[0], model, prior, accelerator, store)
    assert info["cached"] is True
    doc["targets"][0]["objective"]["reference"] = {"source": "prior", "num_images": 12}
    changed = parse_manifest(doc)
    stats, info = reference.reference_stats(changed, changed.targets[0], model, prior, accelerator, store)
    assert info == {"source": "prior", "num_images": 12, "images": 12, "cached": False,
                    "file": f"vit/{layout.FINETUNE_REFERENCE_FILE}"}
    assert float(stats["count"]) == 12


def test_checkpoints_and_outputs_on_s3(models, s3_bucket):
    uri, settings = s3_bucket
    doc = document(models, Path("unused"), steps=5, checkpoint_every=2, batch_size=4)
    doc["output"] = {"uri": uri, "s3": {"endpoint": settings.endpoint, "region": settings.region}}
    manifest = parse_manifest(doc)
    store = run_store(manifest)
    seen: list[list[int]] = []
    ft.finetune_target(manifest, 0, ft.make_accelerator(manifest),
                       on_checkpoint=lambda step: seen.append(ft.list_checkpoints(store, "cnn")[0]))
    assert seen == [[2], [2, 4]]
    assert store.is_committed("cnn/finetune") and store.list("cnn/finetune-checkpoints") == []
    assert store.read_parquet("cnn/finetune/losses.parquet").num_rows == 5
    assert json.loads(store.read_bytes("cnn/finetune/finetune.json"))["steps"] == 5


# --------------------------------------------------------------------------------------------- discriminator term


def test_the_discriminator_term_raises_the_critics_score_and_is_logged(models, cnn_run, tmp_path):
    """finetune.discriminator (the study's future work): the critic's term joins the loss with its own column, and
    the fine-tuned generator's images score higher with the critic than those of the same run without the term."""
    torch.manual_seed(1)
    critic_path = tmp_path / "critic.safetensors"
    critic_path.write_bytes(discriminator_bytes(PGGANDiscriminator(tuple(DEPTHS), 1)))
    doc = document(models, tmp_path / "runs", steps=30, batch_size=8, log_every=5, lr=3e-3,
                   discriminator={"weight": 100.0, "checkpoint": str(critic_path)})
    ft.run(parse_manifest(doc))
    out = outputs(doc) / "finetune"
    losses = pd.read_parquet(out / "losses.parquet")
    weights = {"bn_stats": 1.0, "feature_stats": 1.0, "logits": 1.0, "tv": 1e-5, "discriminator": 100.0}
    np.testing.assert_allclose(losses["total"], sum(w * losses[t] for t, w in weights.items()), rtol=1e-5)
    record = json.loads((out / "finetune.json").read_text())
    assert record["discriminator"] == {"weight": 100.0, "critic": str(critic_path)}

    critic = load_discriminator(critic_path)
    latents = torch.randn(64, LATENT, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        scores = {name: critic(artifacts.load_finetuned_generator(parse_manifest(d), "cnn")(latents)).mean().item()
                  for name, d in (("with", doc), ("without", cnn_run))}
    # A random critic's scores span little (about 0.3 here); the term moves them by most of that.
    assert scores["with"] > scores["without"] + 0.1, scores
    assert losses["discriminator"].iloc[-5:].mean() < losses["discriminator"].iloc[:5].mean()


def test_demographic_feedback_makes_the_models_sex_reading_more_certain_and_is_logged(models, cnn_run, tmp_path):
    """finetune.demographic_feedback (the study's other future work): the demographic model's entropy of the predicted
    sex joins the loss as column `demographics`; the fine-tuned generator's images are read with more certainty
    than those of the same run without the term."""
    from reid_batch.checkpoints import save_state_dict
    from reid_batch.models.demographics import demographic_input
    from reid_batch.stages.train_demographics import build_model

    torch.manual_seed(2)
    model_path = tmp_path / "demographics.safetensors"
    demographic = build_model("densenet_tiny")
    with torch.no_grad():
        demographic.sex_head.weight.mul_(50.0)  # a random head reads every image near 0.5; a steep one has a slope
    save_state_dict(demographic.state_dict(), model_path)
    doc = document(models, tmp_path / "runs", steps=30, batch_size=8, log_every=5, lr=3e-3,
                   demographic_feedback={"weight": 100.0})
    doc["demographics"] = {"arch": "densenet_tiny", "checkpoint": str(model_path), "image_size": 32}
    ft.run(parse_manifest(doc))
    out = outputs(doc) / "finetune"
    losses = pd.read_parquet(out / "losses.parquet")
    weights = {"bn_stats": 1.0, "feature_stats": 1.0, "logits": 1.0, "tv": 1e-5, "demographics": 100.0}
    np.testing.assert_allclose(losses["total"], sum(w * losses[t] for t, w in weights.items()), rtol=1e-5)
    assert ((losses["demographics"] >= 0) & (losses["demographics"] <= np.log(2) + 1e-6)).all()
    assert json.loads((out / "finetune.json").read_text())["demographic_feedback"]["weight"] == 100.0

    model = artifacts.load_demographic_model(parse_manifest(doc)).eval()
    latents = torch.randn(64, LATENT, generator=torch.Generator().manual_seed(5))

    def entropy(d: dict) -> float:
        with torch.no_grad():
            images = artifacts.load_finetuned_generator(parse_manifest(d), "cnn")(latents).clamp(0, 1)
            p = model.predict(demographic_input(images, 32))["sex_prob"].clamp(1e-6, 1 - 1e-6)
        return float(-(p * p.log() + (1 - p) * (1 - p).log()).mean())

    with_term, without = entropy(doc), entropy(cnn_run)
    assert with_term < 0.5 * without, (with_term, without)  # measured 0.0008 against 0.17


def test_a_discriminator_term_without_a_critic_is_refused(models, tmp_path):
    # The prior is a checkpoint: no train-prior wrote a critic, so the manifest must name one.
    with pytest.raises(InputError, match="finetune.discriminator"):
        parse_manifest(document(models, tmp_path / "a", discriminator={"weight": 1.0}))
    # A file that is not a critic (here: the prior's generator) is invalid input naming the file.
    doc = document(models, tmp_path / "b", discriminator={"weight": 1.0, "checkpoint": str(models["prior"])})
    with pytest.raises(InputError, match="not a critic") as caught:
        ft.run(parse_manifest(doc))
    assert str(models["prior"]) in str(caught.value)
    assert not (outputs(doc) / "finetune").exists()


def test_fine_tuning_follows_the_one_precision_rule(models, tmp_path, capsys):
    """bf16 asked for where it is not native (here: a CPU; on CUDA: a pre-Ampere GPU) runs in float32, as sampling
    does, and says so; Accelerate alone would have run CPU or emulated bf16."""
    doc = document(models, tmp_path / "runs", steps=2, mixed_precision="bf16")
    ft.run(parse_manifest(doc))
    record = json.loads((outputs(doc) / "finetune" / "finetune.json").read_text())
    assert record["mixed_precision"] == "bf16" and record["mixed_precision_used"] == "no"
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    assert any(e["event"] == "mixed_precision_not_used" and e.get("stage") == "finetune" for e in events)


# --------------------------------------------------------------------------------------------- fp16 loss scaling


class _StopAfterCheckpoint(Exception):
    pass


@pytest.fixture
def fp16_accelerator():
    """Accelerators as on a CUDA fp16 run, on the CPU: fp16 autocast and a GradScaler that Accelerate drives
    (scaled backward, unscale before clipping, overflowing steps skipped). Accelerate builds no scaler on a CPU, so
    one is put in, at the default initial scale (65536, at which this tiny model's first fp16 steps overflow and are
    skipped, as on a GPU), growing after 2 clean steps so that the scale keeps moving. The singleton state is reset
    around the test, as fp16 cannot join the float32 state of the other tests."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    def build():
        AcceleratorState._reset_state(True)
        accelerator = Accelerator(cpu=True, mixed_precision="fp16")
        accelerator.native_amp = True
        accelerator.scaler = torch.amp.GradScaler("cpu", growth_interval=2)
        return accelerator

    yield build
    AcceleratorState._reset_state(True)


def test_fp16_loss_scale_survives_a_resume(models, tmp_path, fp16_accelerator):
    """A run stopped after its step-3 checkpoint and resumed ends with the loss scale, growth tracker and generator
    of an uninterrupted run; without the scaler in the checkpoint the resumed run restarts at 65536, overflows and
    skips steps 4-6, and both differ. The checkpoint still loads weights_only."""
    settings = {"steps": 6, "checkpoint_every": 3, "batch_size": 8}
    straight = parse_manifest(document(models, tmp_path / "straight", **settings))
    accelerator = fp16_accelerator()
    record = ft.finetune_target(straight, 0, accelerator)
    expected_scaler = accelerator.scaler.state_dict()
    assert expected_scaler["scale"] < 2.0 ** 16, "no step overflowed: the test would not see a lost scale"
    assert record["loss_scale"] == expected_scaler["scale"]

    stopped = parse_manifest(document(models, tmp_path / "stopped", **settings))

    def stop(step):
        raise _StopAfterCheckpoint(step)

    with pytest.raises(_StopAfterCheckpoint):
        ft.finetune_target(stopped, 0, fp16_accelerator(), on_checkpoint=stop)
    state = torch.load(outputs(document(models, tmp_path / "stopped"))
                       / "finetune-checkpoints" / "step-0000003" / layout.FINETUNE_STATE_FILE, weights_only=True)
    assert state["scaler"]["scale"] < 2.0 ** 16

    resumed = fp16_accelerator()
    record = ft.finetune_target(stopped, 0, resumed)
    assert record["resumed_from_step"] == 3
    assert resumed.scaler.state_dict() == expected_scaler
    expected, got = (generator_tensors(outputs(document(models, tmp_path / d))) for d in ("straight", "stopped"))
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
