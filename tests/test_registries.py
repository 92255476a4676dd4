"""One table each: architectures (the manifest accepts exactly what the builder builds) and storage (every stage
opens the run's store and every input URI through storage.run_store / storage.input_path, with all S3 settings)."""

from __future__ import annotations

import pytest
import torch

from reid_batch import storage
from reid_batch.archs import ARCHS
from reid_batch.artifacts import load_attack_target, load_demographic_model
from reid_batch.checkpoints import save_state_dict
from reid_batch.cli import main
from reid_batch.errors import InputError
from reid_batch.manifest import arch_family, parse_manifest
from reid_batch.models.targets import build_target, infer_num_classes
from reid_batch.stages.train_demographics import build_model
from helpers import TARGET_SIZE, build_inputs, make_manifest

# Names the manifest used to accept although the builder never built them, and one it rejected that it built.
ONCE_DISAGREED = ("resnext50_32x4d", "resnext101_32x8d", "wide_resnet50_2", "wide_resnet101_2", "vit_h_14", "vit_tiny")


@pytest.mark.parametrize("name", sorted(set(ARCHS) | set(ONCE_DISAGREED)))
def test_every_architecture_the_manifest_accepts_builds(name):
    if arch_family(name) is None:
        assert name not in ARCHS
        return
    # On the meta device: the real constructor, no memory or time for the weights (vit_l_16 has 300M).
    with torch.device("meta"):
        model = build_target(name, num_classes=3, image_size=32 if ARCHS[name].family == "vit" else 224)
    state = model.state_dict()
    assert any(key in state for key in ARCHS[name].head_keys)
    assert infer_num_classes(state, name) == 3


def test_manifest_rejects_an_architecture_the_builder_cannot_build(tmp_path):
    inputs = build_inputs(tmp_path / "inputs")
    manifest = make_manifest(inputs, str(tmp_path / "out"))
    document = manifest.model_dump(mode="json")
    document["targets"][0]["arch"] = "vit_h_14"
    with pytest.raises(InputError, match=r"targets\.0\.arch|targets\[0\]\.arch"):
        parse_manifest(document)


def test_run_store_keeps_every_s3_setting(tmp_path):
    inputs = build_inputs(tmp_path / "inputs")
    manifest = make_manifest(inputs, "s3://some-bucket/runs", s3_endpoint="http://127.0.0.1:9")
    document = manifest.model_dump(mode="json")
    document["output"]["s3"].update({"retry_max_attempts": 7, "retry_budget_s": 12.5, "sse": "AES256"})
    settings = storage.s3_settings(parse_manifest(document))
    assert (settings.retry_max_attempts, settings.retry_budget_s, settings.sse) == (7, 12.5, "AES256")
    assert settings.endpoint == "http://127.0.0.1:9"


def test_checkpoints_on_s3_load_like_local_ones(tmp_path, moto_server, s3_client):
    inputs = build_inputs(tmp_path / "inputs")
    bucket = "checkpoints"
    s3_client.create_bucket(Bucket=bucket)
    s3_client.upload_file(str(inputs["cnn"]), bucket, "targets/cnn.safetensors")
    s3_client.upload_file(str(inputs["demographics"]), bucket, "demographics.safetensors")
    local = make_manifest(inputs, str(tmp_path / "out"))
    document = local.model_dump(mode="json")
    document["output"]["s3"] = {"endpoint": moto_server, "region": "us-east-1", "retry_max_attempts": 2,
                                "retry_budget_s": 5}
    document["targets"][0]["checkpoint"] = f"s3://{bucket}/targets/cnn.safetensors"
    document["demographics"]["checkpoint"] = f"s3://{bucket}/demographics.safetensors"
    remote = parse_manifest(document)

    x = torch.rand(2, 3, TARGET_SIZE, TARGET_SIZE)
    with torch.no_grad():
        expected = load_attack_target(local, local.targets[0])[0](x)
        got = load_attack_target(remote, remote.targets[0])[0](x)
        assert torch.equal(expected, got)
        chests = torch.rand(2, 3, 32, 32)
        assert torch.equal(load_demographic_model(remote).eval()(chests)[0], load_demographic_model(local).eval()(chests)[0])

    document["targets"][0]["checkpoint"] = f"s3://{bucket}/targets/missing.safetensors"
    missing = parse_manifest(document)
    with pytest.raises(InputError, match=r"targets\[0\]\.checkpoint"):
        load_attack_target(missing, missing.targets[0])


def test_validate_accepts_s3_checkpoints_without_reaching_s3(tmp_path):
    """`validate` checks local inputs only (it runs on login nodes without credentials); S3 inputs are fetched,
    and named when missing, by the stage that loads them."""
    import yaml

    inputs = build_inputs(tmp_path / "inputs")
    document = make_manifest(inputs, str(tmp_path / "out")).model_dump(mode="json")
    document["targets"][0]["checkpoint"] = "s3://checkpoints/targets/cnn.safetensors"
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(document))
    assert main(["validate", str(path)]) == 0


def test_demographic_builder_and_loader_agree_on_the_tiny_densenet(tmp_path):
    path = tmp_path / "demographics.safetensors"
    save_state_dict(build_model("densenet_tiny").state_dict(), path)
    inputs = build_inputs(tmp_path / "inputs")
    document = make_manifest(inputs, str(tmp_path / "out")).model_dump(mode="json")
    document["demographics"]["checkpoint"] = str(path)
    load_demographic_model(parse_manifest(document))
