"""Stage 2, demographic scoring: age and sex the demographic model reads from each selected candidate.

Array task over the selected ids: shard i of `demographics.num_shards` takes the i-th contiguous slice
(numpy.array_split) of the selected ids sorted ascending. Each id's image is regenerated from its id with the
fine-tuned generator (the latent is a pure function of (sampling.seed, id), so it is the image sampling scored),
mapped to what the demographic model was trained on (grey (BT.601 luma if RGB), resized to `demographics.image_size` with antialiased
bilinear interpolation, repeated to 3 channels, ImageNet normalisation: models.demographics.to_model_input), and
predicted with `model.predict` (the sigmoid applied once).

Outputs, each a committed prefix:
  <target>/scores/shard=<i>/scores.parquet ... id (int64), age (years), sex_prob (P(sex label 1) = P(male), the
                                               demographic data's encoding), sex (int8, 1 = M), sex_label ("M"/"F")
  <target>/scores/shard=<i>/images/<id:09d>.png  the regenerated image at the generator's resolution (8-bit)
  <target>/scores-reference/scores.parquet ... the same predictions for real images the target was trained on, with
      their recorded age and sex (shard 0 only): `targets/<name>/train_images.csv` when this run trained the
      target, otherwise the `data.private` pool (the manifest's "target's training data", or the synthetic world's
      private pool when it exists on this machine); skipped, and logged, when none is available.
A committed prefix is left as it is on a re-run.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from reid_batch import log
from reid_batch.analysis.roles import reference_images
from reid_batch.artifacts import load_demographic_model, load_finetuned_generator, selected_ids
from reid_batch.attack.candidates import concat_columns
from reid_batch.attack.generation import BatchSizer, regenerate_images
from reid_batch.data.datasets import ImageDataset
from reid_batch.formats import png_files_job
from reid_batch.layout import SCORES_FILE, reference_prefix, score_image_key, scores_prefix
from reid_batch.manifest import Manifest, TargetSpec
from reid_batch.models.demographics import predict_demographics
from reid_batch.runtime import check_shard, pick_device, run_single_writer, run_store
from reid_batch.storage import BackgroundWriter

SCORE_SCHEMA = pa.schema([
    pa.field("id", pa.int64()), pa.field("age", pa.float32()), pa.field("sex_prob", pa.float32()),
    pa.field("sex", pa.int8()), pa.field("sex_label", pa.string()),
])


# ------------------------------------------------------------------------------------------------ pure core


def _with_labels(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {**columns, "sex_label": np.where(columns["sex"] == 1, "M", "F")}


def shard_of_selected(selected: np.ndarray, num_shards: int, shard: int) -> np.ndarray:
    """The contiguous slice of the sorted selected ids that a scoring shard owns."""
    return np.array_split(np.sort(np.asarray(selected, dtype=np.int64)), num_shards)[shard]


# ------------------------------------------------------------------------------------------------ the shell


def score_shard(manifest: Manifest, spec: TargetSpec, shard: int, *, selected: np.ndarray, generator, model, device,
                sizer) -> dict:
    store = run_store(manifest)
    prefix = scores_prefix(spec.name, shard)
    ids = shard_of_selected(selected, manifest.demographics.num_shards, shard)
    size = manifest.demographics.image_size
    with store.committed(prefix, {"stage": "score", "target": spec.name, "shard": shard, "ids": len(ids)}) as out:
        # The GPU loop only renders and predicts: predictions stay on the device until the shard is done (one copy),
        # and the PNGs are encoded and written by a writer thread (formats.png_files_job), all before the commit.
        writer = BackgroundWriter("png-writer")

        def work(batch: np.ndarray) -> dict:
            images = regenerate_images(generator, batch, manifest.sampling.seed, device)
            predicted = predict_demographics(model, images, size, on_device=True)
            # The batch's last step: a batch retried after out-of-memory has written nothing.
            writer.submit(png_files_job(images, [score_image_key(c) for c in batch.tolist()], out.write_bytes))
            return {"id": batch, **predicted}

        try:
            parts = sizer.run(ids, work)
        except BaseException:
            with contextlib.suppress(Exception):  # the first error is the one to report
                writer.close()
            raise
        writer.close()  # every PNG written (or the writer's first failure raised) before the parquet and the commit
        columns = concat_columns(parts) if parts else \
            {"id": ids, "age": np.empty(0), "sex_prob": np.empty(0), "sex": np.empty(0, np.int8)}
        table = pa.Table.from_pydict(_with_labels(columns), schema=SCORE_SCHEMA)
        with out.parquet_writer(SCORES_FILE, SCORE_SCHEMA, manifest.sampling.row_group_size) as writer:
            writer.write_table(table)
    log.event("score_shard_done", target=spec.name, shard=shard, ids=len(ids),
              mean_age=round(float(columns["age"].mean()), 2) if len(ids) else None,
              male_fraction=round(float(columns["sex"].mean()), 3) if len(ids) else None)
    return {"shard": shard, "ids": len(ids)}


def score_reference(manifest: Manifest, spec: TargetSpec, model, device) -> dict | None:
    store = run_store(manifest)
    prefix = reference_prefix(spec.name)
    found = reference_images(manifest, spec)
    if found is None:
        log.event("score_reference_skipped", target=spec.name,
                  reason="no training images known here (no train_images.csv, data.private, or synthetic world)")
        return None
    frame, origin, on_error = found
    size = manifest.demographics.image_size
    dataset = ImageDataset(frame, size=size, channels=1, on_error=on_error)
    batch_size = manifest.sampling.batch_size if manifest.sampling.batch_size != "auto" else 64
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=manifest.compute.num_workers)
    parts, positions = [], []
    for batch in log.progress(loader, desc=f"{spec.name} reference images", total=len(loader)):
        parts.append(predict_demographics(model, batch["image"].to(device), size))
        positions.append(batch["index"].numpy())
    kept = dataset.df.iloc[np.concatenate(positions)] if positions else dataset.df.iloc[:0]
    predicted = _with_labels({k: np.concatenate([p[k] for p in parts]) for k in parts[0]}) if parts else \
        {"age": [], "sex_prob": [], "sex": [], "sex_label": []}
    table = pd.DataFrame({
        "path": kept["path"].astype(str).to_numpy(),
        "patient_id": kept["patient_id"].astype(str).to_numpy() if "patient_id" in kept else None,
        "age_true": pd.to_numeric(kept["age"], errors="coerce").to_numpy(dtype=np.float64) if "age" in kept else np.nan,
        "sex_true": kept["sex"].astype(object).where(kept["sex"].notna(), None).to_numpy() if "sex" in kept else None,
        **{k: np.asarray(v) for k, v in predicted.items()},
    })
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    with store.committed(prefix, {"stage": "score", "target": spec.name, "source": origin, "images": len(table),
                                  "skipped": len(dataset.skipped)}) as out:
        with out.parquet_writer(SCORES_FILE, arrow.schema, manifest.sampling.row_group_size) as writer:
            writer.write_table(arrow)
    log.event("score_reference_done", target=spec.name, source=origin, images=len(table), skipped=len(dataset.skipped))
    return {"source": origin, "images": len(table)}


def score_target(manifest: Manifest, spec: TargetSpec, shards: list[int]) -> None:
    store = run_store(manifest)
    selected = selected_ids(store, spec.name)
    todo = []
    for shard in shards:
        if store.is_committed(scores_prefix(spec.name, shard)):
            log.event("score_shard_skipped", target=spec.name, shard=shard, reason="already committed")
        else:
            todo.append(shard)
    reference = 0 in shards and not store.is_committed(reference_prefix(spec.name))
    if not todo and not reference:
        return
    device = pick_device(manifest)
    model = load_demographic_model(manifest).to(device)
    if todo:
        generator = load_finetuned_generator(manifest, spec.name).to(device).eval()
        sizer = BatchSizer(manifest.sampling.batch_size, device, manifest.sampling.chunk_size,
                           manifest.generator.resolution**2)
        for shard in todo:
            score_shard(manifest, spec, shard, selected=selected, generator=generator, model=model, device=device,
                        sizer=sizer)
    if reference:
        score_reference(manifest, spec, model, device)


def score(manifest: Manifest, target: str | None = None, shard: int | None = None) -> int:
    """`reid-batch score`: the given shard (None = every shard) of each target (None = all targets)."""
    shards = check_shard(shard, manifest.demographics.num_shards)
    return run_single_writer(manifest, target, lambda spec: score_target(manifest, spec, shards))
