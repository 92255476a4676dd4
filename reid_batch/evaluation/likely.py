"""Stage 2, sample level: the selected candidates regenerated from their ids, each beside its nearest training image
(distance, SSIM), and the demographic model's age and sex of both against the neighbour's truth."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from reid_batch.analysis.metrics import demographic_errors, nearest_neighbours, pixel_features, ssim
from reid_batch.analysis.roles import sex_code, train_pool, truth_for, world_truth
from reid_batch.analysis.space import PIXEL_SIZE
from reid_batch.attack.generation import BatchSizer
from reid_batch.errors import InputError
from reid_batch.evaluation.images import LoadedImages, generate, load_rows
from reid_batch.evaluation.shared import CONFIDENCE, TargetRun
from reid_batch.layout import (SCORES_FILE, SELECTION_FILE, THRESHOLDS_FILE, reference_prefix, scores_prefix,
                               selection_prefix)
from reid_batch.manifest import Manifest, TargetSpec


@dataclass
class LikelySamples:
    """The selected candidates: ids, their regenerated images, and the table that grows one column group per phase."""

    ids: np.ndarray
    thresholds: dict
    reconstructions: torch.Tensor
    features: np.ndarray  # the reconstructions in the evaluation's FeatureSpace
    table: pd.DataFrame
    reference_scores: pd.DataFrame | None


def read_predictions(store, manifest: Manifest, spec: TargetSpec) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    shards = [store.read_parquet(f"{scores_prefix(spec.name, i)}/{SCORES_FILE}").to_pandas()
              for i in range(manifest.demographics.num_shards)]
    scores = pd.concat(shards).set_index("id") if shards else pd.DataFrame()
    reference = None
    if store.is_committed(reference_prefix(spec.name)):
        reference = store.read_parquet(f"{reference_prefix(spec.name)}/{SCORES_FILE}").to_pandas()
        reference = reference.drop_duplicates("path").set_index("path")
    return scores, reference


def likely_samples(store, run: TargetRun, finetuned, sizer: BatchSizer) -> LikelySamples:
    """The selected candidates, regenerated, embedded, with their scores: the table every later phase adds to."""
    manifest, spec = run.manifest, run.spec
    selection = store.read_parquet(f"{selection_prefix(spec.name)}/{SELECTION_FILE}").to_pandas().sort_values("id")
    thresholds = store.read_json(f"{selection_prefix(spec.name)}/{THRESHOLDS_FILE}")
    ids = selection["id"].to_numpy(dtype=np.int64)
    reconstructions = generate(finetuned, ids, manifest.sampling.seed, run.device, sizer)
    scores, reference_scores = read_predictions(store, manifest, spec)
    missing_scores = sorted(set(ids.tolist()) - set(scores.index.tolist()))
    if missing_scores:
        raise InputError(f"{len(missing_scores)} selected id(s) have no score (e.g. {missing_scores[:5]}); the scores "
                         "were made from another selection: delete them and run score again",
                         where=store.uri(f"{spec.name}/scores"))
    predicted = scores.reindex(ids)
    table = pd.DataFrame({
        "id": ids, "rank_combined": selection["rank_combined"].to_numpy(dtype=np.int64),
        "objective_total": selection["objective_total"].to_numpy(dtype=np.float64),
        "mahalanobis": selection["mahalanobis"].to_numpy(dtype=np.float64),
        "recon_pred_age": predicted["age"].to_numpy(dtype=np.float64),
        "recon_pred_sex_prob": predicted["sex_prob"].to_numpy(dtype=np.float64),
        "recon_pred_sex": predicted["sex_label"].astype(object).to_numpy(),
    })
    return LikelySamples(ids, thresholds, reconstructions, run.space(reconstructions), table, reference_scores)


def nearest_training_images(sample_features: np.ndarray, train_features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distance, index) of each sample's nearest training image, both given as features of one space."""
    if len(sample_features) == 0 or len(train_features) == 0:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    distances, indices = nearest_neighbours(sample_features, train_features, k=1)
    return distances[:, 0], indices[:, 0]


def neighbours_and_demographics(run: TargetRun, likely: LikelySamples, training: LoadedImages | None,
                                origin: str | None, on_error: str) -> tuple[torch.Tensor, dict, dict]:
    """Each likely sample's nearest training image, SSIM, and demographic errors against the neighbour's truth;
    adds their columns to the table. (neighbour images, stage-2 summary, demographics summary)."""
    manifest, spec, resolution = run.manifest, run.spec, run.resolution
    table, reconstructions, reference_scores = likely.table, likely.reconstructions, likely.reference_scores
    count = len(likely.ids)
    train_truth = world_truth(manifest, train_pool(spec))
    neighbours = torch.zeros(0, 1, resolution, resolution)
    demographics: dict = {"available": False}
    stage2: dict = {"likely": count, "candidates": likely.thresholds.get("counts", {}).get("candidates"),
                    "feature_space": run.space.description,
                    "training_images": 0 if training is None else len(training.frame), "reference_source": origin}
    if training is None or not len(training.frame):
        return neighbours, stage2, demographics
    distance, index = nearest_training_images(likely.features, training.features)
    neighbours = load_rows(training.frame, index, resolution, on_error)
    rows = training.frame.iloc[index]
    table["nn_index"] = index
    table["nn_path"] = rows["path"].astype(str).to_numpy()
    table["nn_patient"] = rows["patient_id"].astype(str).to_numpy()
    table["nn_distance"] = distance
    table["nn_pixel_distance"] = np.linalg.norm(
        pixel_features(reconstructions, PIXEL_SIZE) - pixel_features(neighbours, PIXEL_SIZE), axis=1) \
        if count else np.zeros(0)
    table["ssim"] = ssim(reconstructions, neighbours) if count else np.zeros(0)
    if reference_scores is not None:
        matched = reference_scores.reindex(table["nn_path"])
        table["nn_pred_age"] = matched["age"].to_numpy(dtype=np.float64)
        table["nn_pred_sex_prob"] = matched["sex_prob"].to_numpy(dtype=np.float64)
        labels = matched["sex_label"].astype(object)
        table["nn_pred_sex"] = labels.where(labels.notna(), None).to_numpy()
    else:
        run.notes.append("no scores-reference: the neighbours' predicted demographics are missing")
    truth = truth_for(table["nn_patient"], rows, train_truth)
    table["true_age"] = truth["age"].to_numpy()
    table["true_sex"] = truth["sex"].to_numpy()
    true_sex = sex_code(table["true_sex"])
    table["recon_age_abs_error"] = np.abs(table["recon_pred_age"] - table["true_age"])
    table["recon_sex_correct"] = flags((table["recon_pred_sex_prob"].to_numpy() >= 0.5) == (true_sex >= 0.5),
                                       np.isnan(true_sex))
    if "nn_pred_age" in table:
        table["nn_age_abs_error"] = np.abs(table["nn_pred_age"] - table["true_age"])
        nn_prob = table["nn_pred_sex_prob"].to_numpy(dtype=np.float64)
        table["nn_sex_correct"] = flags((nn_prob >= 0.5) == (true_sex >= 0.5),
                                        np.isnan(true_sex) | np.isnan(nn_prob))
    stage2.update({
        "ssim_mean": _mean(table["ssim"]), "ssim_median": _median(table["ssim"]),
        "nn_distance_mean": _mean(table["nn_distance"]),
        "distinct_neighbours": int(table["nn_path"].nunique()),
        "distinct_neighbour_patients": int(table["nn_patient"].nunique()),
    })
    demographics = {
        "available": True,
        "ground_truth": "synthetic world ground_truth.csv" if train_truth is not None else
        "age/sex columns of the training list",
        "reconstruction": demographic_errors(table["recon_pred_age"], table["recon_pred_sex_prob"],
                                             table["true_age"], true_sex, CONFIDENCE),
    }
    if "nn_pred_age" in table:
        # The demographic model's own error on real training images: the floor the reconstructions compare with.
        scored = table["nn_pred_sex_prob"].notna().to_numpy()
        demographics["neighbour"] = demographic_errors(
            table["nn_pred_age"][scored], table["nn_pred_sex_prob"][scored], table["true_age"][scored],
            true_sex[scored], CONFIDENCE)
    return neighbours, stage2, demographics


def flags(values: np.ndarray, unknown: np.ndarray) -> pd.Series:
    """Nullable booleans: None where unknown."""
    return pd.Series([None if u else bool(v) for v, u in zip(values, unknown)], dtype=object)


def _mean(values: pd.Series) -> float | None:
    values = pd.to_numeric(values, errors="coerce")
    return float(values.mean()) if values.notna().any() else None


def _median(values: pd.Series) -> float | None:
    values = pd.to_numeric(values, errors="coerce")
    return float(values.median()) if values.notna().any() else None
