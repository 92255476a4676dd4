"""The leak statistic's measurements for one target (analysis.leak holds the statistic itself): the member and
non-member patients' images and the raw candidates of the attacked generator and the prior, embedded; L on them;
the same for stage 2's selection. The records' and candidates' features are committed so that the report can
measure L against other generators and calibrate can spike into them. See docs/method.md."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from reid_batch.analysis.leak import generator_scores, leak_test
from reid_batch.analysis.roles import membership_records, train_pool
from reid_batch.artifacts import load_prior
from reid_batch.attack.candidates import build_scorer, concat_columns
from reid_batch.attack.generation import BatchSizer, generated_features
from reid_batch.attack.selection import committed_summaries, read_scores, select_candidates
from reid_batch.evaluation.images import load_images
from reid_batch.evaluation.shared import CONFIDENCE, TargetRun, demographics_sink, joined
from reid_batch.formats import feature_column, parquet_bytes
from reid_batch.layout import LEAK_ID_OFFSET, RECORDS_FILE
from reid_batch.manifest import Manifest, TargetSpec
from reid_batch.runtime import SingleProcess, run_store


@dataclass(frozen=True)
class RawCandidates:
    """The attacked generator's raw leak candidates as measure_leak measured them: embedding features and, when
    evaluation.population_shift is on, predicted demographics (age, sex)."""

    features: np.ndarray
    demographics: dict[str, np.ndarray] | None
    record_features: np.ndarray  # the member and non-member images, embedded
    record_patients: np.ndarray  # each record's patient (0..P-1)
    member: np.ndarray  # (P,) whether patient p is a member


def measure_leak(run: TargetRun, finetuned) -> tuple[dict, dict[str, bytes], RawCandidates | None]:
    """The leak statistic against the prior, on the target's member and non-member patients (analysis.leak), and
    the tables it was computed from: the records' and the raw candidates' features (the report pairs them with a
    control model's candidates; calibrate spikes into them)."""
    manifest, spec, shared, device, space = run.manifest, run.spec, run.shared, run.device, run.space
    settings = manifest.evaluation
    records, known_by, on_error = membership_records(manifest, spec, settings.membership_patients, settings.seed)
    if records is None:
        run.notes.append(f"membership: not available ({known_by})")
        return {"available": False, "reason": known_by}, {}, None
    loaded = load_images(records, run.resolution, on_error, manifest.compute.num_workers,
                         desc=f"{spec.name} member and non-member images", space=space)
    frame = loaded.frame
    codes, patient_ids = pd.factorize(frame["patient_id"].astype(str))
    member = frame.groupby(codes)["member"].first().to_numpy(dtype=bool)
    if member.all() or not member.any():
        run.notes.append("membership: not available (the member or non-member images failed to load)")
        return {"available": False, "reason": "the member or non-member images failed to load"}, {}, None
    ids = LEAK_ID_OFFSET + np.arange(settings.membership_candidates, dtype=np.int64)
    # P4 reads the same candidates' predicted demographics: taken in the same pass, not by generating them again.
    wanted = settings.population_shift
    if shared.prior_candidate_features is None:
        prior = load_prior(manifest).to(device).eval()
        predicted = []
        shared.prior_candidate_features = generated_features(
            prior, ids, manifest.sampling.seed, device, features=space, sizer=shared.sizer,
            each_batch=demographics_sink(manifest, shared, device, predicted) if wanted else None)
        if wanted:
            shared.prior_candidate_demographics = joined(predicted)
        del prior
    predicted = []
    attacked = generated_features(finetuned, ids, manifest.sampling.seed, device, features=space, sizer=shared.sizer,
                                  each_batch=demographics_sink(manifest, shared, device, predicted) if wanted else None)
    attacked_demographics = joined(predicted) if wanted else None
    scores = {name: generator_scores(loaded.features, codes, len(patient_ids), features)
              for name, features in (("attacked", attacked), ("prior", shared.prior_candidate_features))}
    raw = leak_test(member, scores["attacked"], scores["prior"], bootstrap=settings.leak_bootstrap,
                    permutations=settings.leak_permutations, seed=settings.seed, confidence=CONFIDENCE)
    selected = selected_leak(run, finetuned, loaded.features, codes, member)
    summary = {
        "available": True, "feature_space": space.description, "identity_sensitive": space.identity_sensitive,
        "members_known_by": known_by, "pool": train_pool(spec),
        "nonmembers": f"other labelled patients of the {train_pool(spec)} pool, matched in number and label mix",
        "member_patients": int(member.sum()), "nonmember_patients": int((~member).sum()),
        "images": len(frame), "candidates": f"ids {LEAK_ID_OFFSET} + k, k < {len(ids)} (seed {manifest.sampling.seed}); "
        "no latent of fine-tuning or sampling",
        "raw": {"vs_prior": raw},
        "selected": {"vs_prior": selected},
        "statistic": "L = AUC(attacked) - AUC(null) on the same patients; a patient's score is the distance from its "
                     "closest image to the closest candidate; two-way bootstrap (patients, candidates), paired "
                     "permutation p-value",
    }
    records_table = pa.table({
        "path": pa.array(frame["path"].astype(str).tolist()),
        "patient_id": pa.array(frame["patient_id"].astype(str).tolist()),
        "patient": pa.array(codes.astype(np.int64)),
        "member": pa.array(frame["member"].to_numpy(dtype=bool)),
        "label": pa.array(pd.to_numeric(frame["label"], errors="coerce").to_numpy(dtype=np.float64)),
        "features": feature_column(loaded.features),
    })
    # leak_candidates.parquet is written by the evaluate stage, once the ppa samples (if any) are embedded too.
    tables = {RECORDS_FILE: parquet_bytes(records_table)}
    return summary, tables, RawCandidates(attacked, attacked_demographics, loaded.features, codes, member)


def selected_leak(run: TargetRun, finetuned, features: np.ndarray, codes: np.ndarray, member: np.ndarray) -> dict:
    """L for stage 2's selection: the same rule applied to pools of equal size from both generators.

    Pool: the attacked generator's candidates 0..P-1 (their committed scores) and the prior's raw leak candidates
    0..P-1, scored here against the same target with the same objective terms and Mahalanobis model, P =
    min(sampling.num_candidates, evaluation.membership_candidates). `selection`'s rule picks from each pool; the
    same number from both (the best by combined rank) are compared. The prior is the null: a pool of the same
    size, passed through the same filter, shows what selection finds without the attack."""
    manifest, spec, shared, device = run.manifest, run.spec, run.shared, run.device
    store = run_store(manifest)
    sampling, settings = manifest.sampling, manifest.evaluation
    pool = min(sampling.num_candidates, settings.membership_candidates)
    summaries = committed_summaries(store, spec.name, sampling.num_candidates, sampling.num_shards)
    objective, distance = read_scores(store, summaries, sampling.num_candidates)
    attacked = select_candidates(objective[:pool], distance[:pool], manifest.selection)
    null = select_candidates(*_prior_scores(manifest, spec, pool, device), manifest.selection)
    compared = min(len(attacked["selected"]), len(null["selected"]))
    counts = {"pool": pool, "rule": manifest.selection.rule, "selected_attacked": len(attacked["selected"]),
              "selected_null": len(null["selected"]), "compared": compared}
    if compared == 0:
        return {"available": False, "reason": "the rule selects nothing from one of the pools", **counts}
    attacked_ids = _best_by_combined_rank(attacked, compared)
    null_positions = _best_by_combined_rank(null, compared)
    attacked_features = generated_features(finetuned, attacked_ids, sampling.seed, device, features=run.space,
                                           sizer=shared.sizer)
    null_features = shared.prior_candidate_features[null_positions]
    patients = len(member)
    result = leak_test(member, generator_scores(features, codes, patients, attacked_features),
                       generator_scores(features, codes, patients, null_features), bootstrap=settings.leak_bootstrap,
                       permutations=settings.leak_permutations, seed=settings.seed, confidence=CONFIDENCE)
    return {"available": True, **result, **counts}


def _best_by_combined_rank(selection: dict, count: int) -> np.ndarray:
    """The `count` selected ids best by (combined rank, id)."""
    selected, combined = selection["selected"], selection["ranks"][2]
    return np.sort(selected[np.lexsort((selected, combined))[:count]])


def _prior_scores(manifest: Manifest, spec: TargetSpec, pool: int, device) -> tuple[np.ndarray, np.ndarray]:
    """(objective_total, mahalanobis) of the prior's raw leak candidates 0..pool-1 against this target."""
    prior = load_prior(manifest).to(device).eval()
    sizer = BatchSizer(manifest.sampling.batch_size, device, pool, prior.config.resolution ** 2)
    scorer = build_scorer(manifest, spec, prior, SingleProcess(device), sizer)
    try:
        ids = LEAK_ID_OFFSET + np.arange(pool, dtype=np.int64)
        columns = concat_columns(sizer.run(ids, lambda batch: scorer.score(batch, shard=0)[0]))
    finally:
        scorer.objective.close()
    return columns["objective_total"].astype(np.float64), columns["mahalanobis"].astype(np.float64)


def leak_candidates_bytes(ids: np.ndarray, attacked: np.ndarray, prior: np.ndarray,
                          ppa_ids: np.ndarray | None = None, ppa_features: np.ndarray | None = None) -> bytes:
    """leak_candidates.parquet: each candidate's generator ("attacked": the study's fine-tuned generator, "prior",
    "ppa": the ppa attack's kept samples), id and embedding; the report measures L between targets from it."""
    generators = ["attacked"] * len(ids) + ["prior"] * len(ids)
    all_ids, features = [ids, ids], [attacked, prior]
    if ppa_ids is not None:
        generators += ["ppa"] * len(ppa_ids)
        all_ids.append(np.asarray(ppa_ids, np.int64))
        features.append(ppa_features)
    return parquet_bytes(pa.table({"generator": pa.array(generators), "id": pa.array(np.concatenate(all_ids)),
                                   "features": feature_column(np.concatenate(features))}))
