"""What evaluate commits per target: metrics.json (the summaries, with the records they came from), evaluation.parquet
(one row per likely sample), the figures and a reconstruction | neighbour pair per likely sample."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from reid_batch.analysis.roles import OTHER_POOL, train_pool
from reid_batch.evaluation.figures import GRID_MAX_PAIRS, likely_grid_png, losses_png, stage1_examples_png
from reid_batch.evaluation.likely import LikelySamples
from reid_batch.evaluation.shared import TargetRun
from reid_batch.formats import clean_json, pair_png, software_versions
from reid_batch.layout import (FIGURES, METRICS_FILE, TABLE_FILE, evaluation_prefix, finetune_prefix, pair_key,
                               target_prefix)
from reid_batch.results import Evaluation, write


THREAT_MODEL = (
    "The attacker holds only the trained target's parameters (a frozen checkpoint) and knows the imaging modality and "
    "body region (frontal chest X-rays). They have public images of the same kind (for the generator prior and the "
    "age/sex model) but no image, label or record of the target's training patients."
)


VALIDATION_NOTE = (
    "Validation only: the leak statistic, nearest neighbours, SSIM, demographic ground truth and re-identification "
    "use the target's training images (and, on the synthetic world, who each patient is), which an attacker would "
    "not have."
)


TABLE_SCHEMA = pa.schema([
    pa.field("id", pa.int64()),
    pa.field("rank_combined", pa.int64()),
    pa.field("objective_total", pa.float64()),
    pa.field("mahalanobis", pa.float64()),
    pa.field("nn_index", pa.int64()),
    pa.field("nn_path", pa.string()),
    pa.field("nn_patient", pa.string()),
    pa.field("nn_distance", pa.float64()),
    pa.field("nn_pixel_distance", pa.float64()),
    pa.field("ssim", pa.float64()),
    pa.field("recon_pred_age", pa.float64()),
    pa.field("recon_pred_sex_prob", pa.float64()),
    pa.field("recon_pred_sex", pa.string()),
    pa.field("nn_pred_age", pa.float64()),
    pa.field("nn_pred_sex_prob", pa.float64()),
    pa.field("nn_pred_sex", pa.string()),
    pa.field("true_age", pa.float64()),
    pa.field("true_sex", pa.string()),
    pa.field("recon_age_abs_error", pa.float64()),
    pa.field("nn_age_abs_error", pa.float64()),
    pa.field("recon_sex_correct", pa.bool_()),
    pa.field("nn_sex_correct", pa.bool_()),
    pa.field("reid_train_patient", pa.string()),
    pa.field("reid_train_distance", pa.float64()),
    pa.field("reid_heldout_patient", pa.string()),
    pa.field("reid_heldout_distance", pa.float64()),
    pa.field("member_closer", pa.bool_()),
    pa.field("reidentified", pa.bool_()),
    pa.field("truth_pacemaker", pa.bool_()),
    pa.field("recon_device_score", pa.float64()),
    pa.field("recon_pacemaker_detected", pa.bool_()),
    pa.field("device_reproduced", pa.bool_()),
])


def metrics_document(store, run: TargetRun, likely: LikelySamples, *, stage1: dict, stage2: dict, demographics: dict,
                     reid: dict, leak: dict) -> dict:
    """metrics.json: every summary of this target's evaluation, with the records it was made from."""
    manifest, spec = run.manifest, run.spec
    settings = manifest.evaluation
    thresholds = likely.thresholds
    pool = train_pool(spec)
    losses = store.read_parquet(f"{finetune_prefix(spec.name)}/losses.parquet").to_pandas()
    training_record = None
    if spec.train is not None and store.is_committed(target_prefix(spec.name)):
        record = store.read_json(f"{target_prefix(spec.name)}/training.json")
        training_record = {k: record.get(k) for k in ("preset", "pool", "train", "val", "generalisation_gap",
                                                        "train_images", "val_images", "kept_epoch", "norm",
                                                        "privacy", "recipe")}
        # What the training set was beyond the recipe: the report's dose-response compares plain pools only.
        training_record["cohort"] = spec.train.cohort.describe() if spec.train.cohort is not None else None
        training_record["canaries"] = spec.train.canaries is not None
        training_record["identity_defence"] = spec.train.identity.defence if spec.train.identity is not None else None
    finetune_record = store.read_json(f"{finetune_prefix(spec.name)}/finetune.json")
    attack_terms = {"terms": finetune_record.get("terms"), "configured": finetune_record.get("terms_configured"),
                    "fallback": finetune_record.get("objective_fallback"),
                    "reference": finetune_record.get("reference"),
                    "feature_target": finetune_record.get("feature_target")}
    metrics = {
        "target": spec.name, "arch": spec.arch, "family": spec.family,
        "preset": spec.train.preset if spec.train is not None else None,
        "train_pool": pool, "heldout_pool": OTHER_POOL[pool],
        "role": "control model" if pool == "control" else "target",
        "checkpoint": spec.checkpoint, "target_training": training_record, "attack_terms": attack_terms,
        "threat_model": THREAT_MODEL, "validation_note": VALIDATION_NOTE,
        "selection": {"rule": thresholds.get("rule"), "thresholds": thresholds.get("thresholds"),
                      "counts": thresholds.get("counts")},
        "finetune": {"steps": int(len(losses)),
                     "first_total": float(losses["total"].iloc[0]) if len(losses) else None,
                     "last_total": float(losses["total"].iloc[-1]) if len(losses) else None},
        "stage1": stage1, "stage2": stage2, "demographics": demographics, "reidentification": reid, "leak": leak,
        "notes": run.notes,
        "figures": {k: v for k, v in FIGURES.items() if k != "ppa_samples" or "ppa" in spec.attacks},
        "table": TABLE_FILE, "pairs": "pairs/<id:09d>.png",
        "evaluation": settings.model_dump(mode="json"), "software": software_versions(),
        "resolution": run.resolution,
    }
    return clean_json(metrics)


def write_outputs(store, run: TargetRun, evaluation: Evaluation, likely: LikelySamples, *, neighbours: torch.Tensor,
                  sets: dict[str, torch.Tensor], kurtosis_png: bytes, leak_tables: dict[str, bytes]) -> None:
    """One commit: the table, metrics.json, the figures and a reconstruction | neighbour pair per likely sample."""
    manifest, spec = run.manifest, run.spec
    table, reconstructions = likely.table, likely.reconstructions
    losses = store.read_parquet(f"{finetune_prefix(spec.name)}/losses.parquet").to_pandas()
    ssims = table["ssim"] if "ssim" in table else pd.Series(np.nan, index=table.index)
    captions = [f"id {i} | SSIM {s:.3f}" for i, s in zip(table["id"], ssims)]
    order = np.argsort(table["rank_combined"].to_numpy(), kind="stable")
    shown = order[:GRID_MAX_PAIRS]
    grid = likely_grid_png(reconstructions[shown], neighbours[shown] if len(neighbours) else None,
                           [captions[i] for i in shown],
                           f"{spec.name}: likely samples (left) beside their nearest training image (right)"
                           if len(neighbours) else f"{spec.name}: likely samples")
    arrow = to_arrow(table)
    with store.committed(evaluation_prefix(spec.name), {"stage": "evaluate", "target": spec.name,
                                                        "likely": len(likely.ids)}) as out:
        with out.parquet_writer(TABLE_FILE, TABLE_SCHEMA, max(1, manifest.sampling.row_group_size)) as writer:
            writer.write_table(arrow)
        write(out, METRICS_FILE, evaluation)
        out.write_bytes(FIGURES["kurtosis"], kurtosis_png)
        out.write_bytes(FIGURES["losses"], losses_png(losses, f"{spec.name}: stage 1 fine-tuning"))
        out.write_bytes(FIGURES["stage1_examples"], stage1_examples_png(sets))
        out.write_bytes(FIGURES["likely_samples"], grid)
        for name, data in leak_tables.items():
            out.write_bytes(name, data)
        if len(neighbours):
            for row, candidate in enumerate(likely.ids.tolist()):
                out.write_bytes(pair_key(candidate), pair_png(reconstructions[row], neighbours[row]))


def to_arrow(table: pd.DataFrame) -> pa.Table:
    columns = {}
    for column in TABLE_SCHEMA:
        if column.name in table:
            values = table[column.name].tolist()
            values = [None if (isinstance(v, float) and math.isnan(v)) or v is pd.NA else v for v in values]
        else:
            values = [None] * len(table)
        columns[column.name] = pa.array(values, type=column.type)
    return pa.Table.from_pydict(columns, schema=TABLE_SCHEMA)
