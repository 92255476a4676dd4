"""Demographic scoring of the selected candidates (sharded) and of the target's training images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from reid_batch.errors import InputError
from reid_batch.runtime import run_store
from reid_batch.stages import sample as sampling
from reid_batch.stages import score as scoring
from reid_batch.stages import select as selection
from reid_batch.attack import generation
from reid_batch import layout
from helpers import HostWork, build_inputs, commit_finetuned, make_manifest


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return build_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def private_images(tmp_path_factory) -> Path:
    """A folder-format pool of 5 small grey images of 3 patients."""
    root = tmp_path_factory.mktemp("private")
    rng = np.random.default_rng(0)
    for i, patient in enumerate(["p1", "p1", "p2", "p3", "p3"]):
        (root / patient).mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(24, 24), dtype=np.uint8), mode="L").save(root / patient / f"{i}.png")
    return root


def _data(root: Path) -> dict:
    return {"private": {"format": "folder", "root": str(root)}, "public": {"format": "folder", "root": str(root)}}


def _scores(store, target: str, shards: int) -> list[pd.DataFrame]:
    return [store.read_parquet(f"{layout.scores_prefix(target, i)}/{layout.SCORES_FILE}").to_pandas()
            for i in range(shards)]


def test_every_selected_id_scored_once_with_its_image(inputs, private_images, tmp_path, s3_bucket):
    from reid_batch.artifacts import load_demographic_model
    from reid_batch.models.pggan import load_generator

    uri, settings = s3_bucket
    manifest = make_manifest(inputs, uri, settings.endpoint, data=_data(private_images),
                             sampling_options={"num_candidates": 20, "num_shards": 2},
                             selection={"rule": "quantile", "objective_quantile": 0.6, "mahalanobis_quantile": 0.6},
                             demographics={"num_shards": 3})
    commit_finetuned(manifest, inputs)
    sampling.sample(manifest)
    selection.select(manifest)
    store = run_store(manifest)
    selected = np.sort(store.read_parquet("cnn/selection/selected.parquet").column("id").to_numpy())
    assert len(selected) >= 3

    with pytest.raises(InputError, match="outside"):
        scoring.score(manifest, shard=3)
    assert scoring.score(manifest, shard=1) == 0
    assert not store.is_committed(layout.reference_prefix("cnn"))  # only shard 0 scores the reference set
    assert scoring.score(manifest) == 0

    shards = _scores(store, "cnn", 3)
    assert [s["id"].tolist() for s in shards] == [part.tolist() for part in np.array_split(selected, 3)]
    rows = pd.concat(shards).reset_index(drop=True)
    assert rows["id"].tolist() == selected.tolist()
    assert rows["sex_prob"].between(0, 1).all()
    assert (rows["sex"] == (rows["sex_prob"] >= 0.5)).all()
    assert (rows["sex_label"] == np.where(rows["sex"] == 1, "M", "F")).all()

    generator, _ = load_generator(inputs["finetuned"], format="reid")
    model = load_demographic_model(manifest)
    images = generation.regenerate_images(generator, selected, seed=7, device=torch.device("cpu"))
    expected = scoring.predict_demographics(model, images, 32)
    np.testing.assert_allclose(rows["age"], expected["age"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(rows["sex_prob"], expected["sex_prob"], rtol=1e-4, atol=1e-5)
    for shard, part in enumerate(np.array_split(selected, 3)):
        keys = [k for k in store.list(layout.scores_prefix("cnn", shard)) if k.endswith(".png")]
        assert keys == [f"{layout.scores_prefix('cnn', shard)}/images/{i:09d}.png" for i in part]
    k = int(selected[0])
    png = np.asarray(Image.open(io.BytesIO(store.read_bytes(f"cnn/scores/shard=0/images/{k:09d}.png"))))
    np.testing.assert_array_equal(png, (images[0, 0].numpy() * 255).round().astype(np.uint8))

    reference = store.read_parquet(f"{layout.reference_prefix('cnn')}/{layout.SCORES_FILE}").to_pandas()
    assert sorted(Path(p).name for p in reference["path"]) == [f"{i}.png" for i in range(5)]
    assert reference["patient_id"].tolist() == ["p1", "p1", "p2", "p3", "p3"]
    assert reference["sex_prob"].between(0, 1).all() and reference["age"].notna().all()
    assert store.read_commit(layout.reference_prefix("cnn"))["metadata"]["source"] == "data.private"

    markers = {k: store.read_commit(k.rsplit("/", 1)[0]) for k in store.list("cnn") if k.endswith("_COMMITTED")
               and "/scores" in k}
    scoring.score(manifest)
    assert {k: store.read_commit(k.rsplit("/", 1)[0]) for k in markers} == markers


def test_reference_set_is_the_targets_own_training_list(inputs, private_images, tmp_path):
    from reid_batch.checkpoints import load_state_dict
    from reid_batch.runtime import state_dict_bytes

    target_section = {"name": "cnn", "arch": "resnet18", "train": {"preset": "normal"}, "input": {"size": 16}}
    manifest = make_manifest(inputs, str(tmp_path / "out"), data=_data(private_images), target_section=target_section,
                             sampling_options={"num_candidates": 8, "num_shards": 1},
                             selection={"rule": "top_k", "top_k": 2})
    store = run_store(manifest)
    with pytest.raises(InputError, match="select"):
        scoring.score(manifest)
    files = sorted(private_images.rglob("*.png"))[:3]
    train_list = pd.DataFrame({"path": [str(f) for f in files], "patient_id": ["p1", "p1", "p2"],
                               "age": [61.0, 61.0, 35.0], "sex": ["M", "M", "F"], "label": [1, 1, 0]})
    with store.committed("targets/cnn", {"stage": "train-target"}) as out:  # stand-in for train-target
        out.write_bytes("model.safetensors", state_dict_bytes(load_state_dict(inputs["cnn"])))
        out.write_bytes("train_images.csv", train_list.to_csv(index=False).encode())
    commit_finetuned(manifest, inputs)
    sampling.sample(manifest)
    selection.select(manifest)
    scoring.score(manifest)
    reference = store.read_parquet(f"{layout.reference_prefix('cnn')}/{layout.SCORES_FILE}").to_pandas()
    assert reference["path"].tolist() == train_list["path"].tolist()
    assert reference["age_true"].tolist() == [61.0, 61.0, 35.0] and reference["sex_true"].tolist() == ["M", "M", "F"]
    assert store.read_commit(layout.reference_prefix("cnn"))["metadata"]["source"] == "targets/cnn/train_images.csv"
    assert len(_scores(store, "cnn", 1)[0]) == 2


def test_scoring_loop_copies_predictions_once_and_encodes_pngs_in_a_writer_thread(inputs, tmp_path):
    """score encoded every PNG in the GPU loop (a copy to the host per image) and copied each batch's predictions
    to the host: waits for the device per image and per batch. Now predictions stay on the device until the shard
    is done and a writer thread encodes the PNGs, all before the commit: three batches cost the loop's thread the
    copies one does, and the files and rows are those of the old loop (test above)."""
    from reid_batch.artifacts import load_demographic_model
    from reid_batch.models.pggan import load_generator

    main_thread = {}
    for count in (4, 12):
        manifest = make_manifest(inputs, str(tmp_path / f"n{count}"))
        generator, _ = load_generator(inputs["finetuned"], format="reid")
        model = load_demographic_model(manifest)
        sizer = generation.BatchSizer(4, torch.device("cpu"), count)
        selected = np.arange(100, 100 + count)
        with pytest.MonkeyPatch.context() as patch:
            work = HostWork(patch)
            scoring.score_shard(manifest, manifest.targets[0], 0, selected=selected, generator=generator, model=model,
                                device=torch.device("cpu"), sizer=sizer)
        main_thread[count] = work.on_main_thread()
        assert sum(n for name, n in work.pngs.items() if name.startswith("png-writer")) == count
        store = run_store(manifest)
        assert store.is_committed(layout.scores_prefix("cnn", 0))
        rows = _scores(store, "cnn", 1)[0]
        assert rows["id"].tolist() == selected.tolist() and rows["age"].notna().all()
        keys = [k for k in store.list(layout.scores_prefix("cnn", 0)) if k.endswith(".png")]
        assert len(keys) == count
    assert main_thread[12] == main_thread[4] and main_thread[4][1] == 0, main_thread
