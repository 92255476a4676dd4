"""The leak statistic L = AUC(attacked generator) - AUC(null generator) on the same member and non-member patients,
with its interval, p-value and TPR at low FPR. Pure numpy (no torch): the report computes it too.

A patient's score per generator is the distance from the closest of its images to the closest of that generator's
candidates; both AUCs are taken on the SAME patients, so whatever makes members and non-members differ cancels and
only what the attacked generator does differently stays. The interval resamples patients and candidates and is
re-centred on L, because resampling candidates alone pulls L* towards 0 (docs/results/2026-12-08-code-notes.md has
the repeats that chose this); the p-value swaps each patient's two scores at random. The statistics in full:
docs/method.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc
from scipy import stats

from reid_batch.formats import feature_matrix

DEFAULT_FPRS = (0.01, 0.05)
DISTANCE_CHUNK = 4096


def pairwise_min_distance(records: np.ndarray, candidates: np.ndarray, groups: np.ndarray, num_groups: int
                          ) -> np.ndarray:
    """(num_groups, C) Euclidean distance of each group's closest record to each candidate.

    records (R, D), candidates (C, D), groups (R,) in 0..num_groups-1 (a patient's images share a group). Chunked
    over records: memory is bounded by DISTANCE_CHUNK x C whatever R.
    """
    # float32: a (patients x candidates) matrix at cluster size (4,000 x 10,000) is 160 MB.
    records, candidates = np.asarray(records, np.float32), np.asarray(candidates, np.float32)
    out = np.full((num_groups, len(candidates)), np.inf, np.float32)
    candidate_norms = (candidates ** 2).sum(1)
    for start in range(0, len(records), DISTANCE_CHUNK):
        block = records[start:start + DISTANCE_CHUNK]
        squared = (block ** 2).sum(1)[:, None] + candidate_norms[None, :] - 2 * block @ candidates.T
        np.minimum.at(out, groups[start:start + DISTANCE_CHUNK], np.sqrt(np.maximum(squared, 0.0)))
    return out


def auc_rows(scores: np.ndarray, member: np.ndarray) -> np.ndarray:
    """Membership AUC ("lower score = member") of each row of scores (B, P); member (P,) or (B, P) booleans."""
    scores = np.atleast_2d(scores)
    member = np.broadcast_to(member, scores.shape)
    ranks = stats.rankdata(scores, axis=1)  # ascending, ties averaged
    m = member.sum(1)
    n = (~member).sum(1)
    nonmember_rank_sum = np.where(member, 0.0, ranks).sum(1)
    return (nonmember_rank_sum - n * (n + 1) / 2) / (m * n)


def tpr_at_fpr(member_scores: np.ndarray, nonmember_scores: np.ndarray, fpr: float) -> float:
    """Share of members strictly below the k-th lowest non-member score, k = floor(fpr * n)."""
    ordered = np.sort(nonmember_scores)
    threshold = ordered[min(int(np.floor(fpr * len(ordered))), len(ordered) - 1)]
    return float((member_scores < threshold).mean())


@dataclass(frozen=True)
class GeneratorScores:
    """One generator's candidates against the records: (patients, candidates) closest-image distances."""

    distances: np.ndarray  # (P, C)

    @property
    def patient_scores(self) -> np.ndarray:
        return self.distances.min(axis=1)


def generator_scores(record_embeddings: np.ndarray, record_patients: np.ndarray, num_patients: int,
                     candidate_embeddings: np.ndarray) -> GeneratorScores:
    """record_patients: (R,) patient index 0..num_patients-1 of each record image."""
    return GeneratorScores(pairwise_min_distance(record_embeddings, candidate_embeddings,
                                                 np.asarray(record_patients, np.int64), num_patients))


# A patient's closest resampled candidate is among its NEAREST_KEPT closest candidates unless all of those were left
# out of the resample: probability about 0.37**32 = 1e-14 per patient and resample. Then the 32nd distance stands in.
NEAREST_KEPT = 32


def _resampled_scores(nearest: np.ndarray, nearest_distances: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Per patient, the distance to its closest candidate among the `present` ones (B, C) -> (B, P).

    nearest (P, K): each patient's K closest candidates, closest first; nearest_distances (P, K) their distances.
    """
    hit = present[:, nearest]  # (B, P, K): is the k-th closest candidate of patient p in resample b
    first = np.where(hit.any(axis=2), hit.argmax(axis=2), nearest.shape[1] - 1)
    return nearest_distances[np.arange(nearest.shape[0])[None, :], first]


def leak_test(member: np.ndarray, attacked: GeneratorScores, null: GeneratorScores, *, bootstrap: int = 1000,
              permutations: int = 1000, seed: int = 0, confidence: float = 0.95,
              fprs: tuple[float, ...] = DEFAULT_FPRS) -> dict:
    """L = AUC(attacked) - AUC(null) on the same patients, with its two-way bootstrap interval, permutation p-value
    and TPR at low FPR (see the module docstring). member: (P,) booleans, True = the target trained on the patient."""
    member = np.asarray(member, bool)
    if member.sum() == 0 or (~member).sum() == 0:
        raise ValueError("the leak statistic needs at least one member and one non-member patient")
    a_scores, n_scores = attacked.patient_scores, null.patient_scores
    auc_a, auc_n = (float(auc_rows(s, member)[0]) for s in (a_scores, n_scores))
    leak = auc_a - auc_n
    rng = np.random.default_rng(seed)

    # Two-way bootstrap: patients (members and non-members apart) and each generator's candidates.
    members_at, nonmembers_at = np.flatnonzero(member), np.flatnonzero(~member)
    nearest = []
    for generator in (attacked, null):
        kept = min(NEAREST_KEPT, generator.distances.shape[1])
        order = np.argsort(generator.distances, axis=1, kind="stable")[:, :kept]
        nearest.append((order, np.take_along_axis(generator.distances, order, axis=1)))
    chunk = 100
    resampled = []
    for start in range(0, bootstrap, chunk):
        size = min(chunk, bootstrap - start)
        patients = np.concatenate([rng.choice(members_at, (size, len(members_at))),
                                   rng.choice(nonmembers_at, (size, len(nonmembers_at)))], axis=1)
        is_member = np.zeros(patients.shape[1], bool)
        is_member[:len(members_at)] = True
        aucs = []
        for generator, (order, ordered) in zip((attacked, null), nearest):
            count = generator.distances.shape[1]
            present = np.zeros((size, count), bool)
            present[np.arange(size)[:, None], rng.integers(0, count, (size, count))] = True
            scores = _resampled_scores(order, ordered, present)
            aucs.append(auc_rows(np.take_along_axis(scores, patients, axis=1), is_member))
        resampled.append(aucs[0] - aucs[1])
    resampled = np.concatenate(resampled) if resampled else np.zeros(0)
    tail = (1 - confidence) / 2
    interval = None
    if bootstrap:
        # Resampling candidates with replacement keeps about 63% of them distinct: each patient's closest candidate is
        # farther in every resample, and a leak's few close candidates are often left out, which shifts L* towards 0.
        # That shift is an artefact of the resampling, not uncertainty about L: the interval takes the spread of L*
        # around its mean and centres it on L.
        centred = resampled - resampled.mean() + leak
        interval = (float(np.quantile(centred, tail)), float(np.quantile(centred, 1 - tail)))

    # Paired permutation: swap each patient's attacked and null percentiles at random.
    p_value = None
    if permutations:
        percentiles = np.stack([stats.rankdata(s) / len(s) for s in (a_scores, n_scores)])
        swap = rng.random((permutations, len(member))) < 0.5
        first = np.where(swap, percentiles[1], percentiles[0])
        second = np.where(swap, percentiles[0], percentiles[1])
        permuted = auc_rows(first, member) - auc_rows(second, member)
        p_value = float((1 + (permuted >= leak - 1e-12).sum()) / (1 + permutations))

    def rates(scores: np.ndarray) -> dict:
        return {f"{fpr:g}": tpr_at_fpr(scores[member], scores[~member], fpr) for fpr in fprs}

    return {
        "leak": leak, "ci": interval, "p_value": p_value, "confidence": confidence,
        "auc_attacked": auc_a, "auc_null": auc_n,
        "tpr_at_fpr": {"attacked": rates(a_scores), "null": rates(n_scores)},
        "members": int(member.sum()), "nonmembers": int((~member).sum()),
        "candidates": {"attacked": int(attacked.distances.shape[1]), "null": int(null.distances.shape[1])},
        "bootstrap": bootstrap, "permutations": permutations,
        "detected": bool(interval is not None and interval[0] > 0),
    }


def committed_records(table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features (R, D), patient (R,) 0..P-1, member (P,) per patient) of evaluate's records.parquet (an Arrow table)."""
    patients = table.column("patient").to_numpy().astype(np.int64)
    flags = table.column("member").to_numpy(zero_copy_only=False).astype(bool)
    member = np.zeros(int(patients.max()) + 1 if len(patients) else 0, bool)
    member[patients] = flags
    return feature_matrix(table.column("features")), patients, member


# ------------------------------------------------------------------------------------------------ between targets
# The report compares committed candidates of two targets (a control model's, a baseline's) on one target's records.


# Which rows of leak_candidates.parquet hold an attack mode's candidates.
MODE_CANDIDATES = {"study": "attacked", "ppa": "ppa"}


def control_leak(records, target_candidates, control_candidates, bootstrap: int, permutations: int, seed: int
                 ) -> dict | None:
    """L of the target's attacked candidates against a control model's, on the TARGET's records (Arrow tables of
    records.parquet and leak_candidates.parquet); None when the two were embedded in different spaces."""
    features, patients, member = committed_records(records)
    attacked, null = (feature_matrix(t.filter(pc.equal(t.column("generator"), "attacked")).column("features"))
                      for t in (target_candidates, control_candidates))
    if attacked.shape[1] != features.shape[1] or null.shape[1] != features.shape[1]:
        return None
    count = len(member)
    result = leak_test(member, generator_scores(features, patients, count, attacked),
                       generator_scores(features, patients, count, null), bootstrap=bootstrap,
                       permutations=permutations, seed=seed)
    return result


def defence_change(mode: str, records, baseline_records, candidates, baseline_candidates, *, bootstrap: int,
                   permutations: int, seed: int) -> dict:
    """The change of an attack mode's L from a baseline target to a defended one, paired on their shared patients:
    change = AUC(defended's candidates) - AUC(baseline's) on the same members and non-members (the prior null is the
    same for both, so this is L(defended) - L(baseline)), with analysis.leak's two-way bootstrap interval and paired
    permutation p ("the defence lowers L", one-sided). Tables as in records.parquet and leak_candidates.parquet."""
    columns = ("patient_id", "path", "member")
    if any(records.column(c).to_pylist() != baseline_records.column(c).to_pylist() for c in columns):
        return {"available": False, "mode": mode,
                "reason": "the two targets were measured on different member and non-member images"}
    wanted = MODE_CANDIDATES[mode]
    defended, baseline = (feature_matrix(t.filter(pc.equal(t.column("generator"), wanted)).column("features"))
                          for t in (candidates, baseline_candidates))
    if not len(defended) or not len(baseline):
        missing = "the defended target" if not len(defended) else "the baseline"
        return {"available": False, "mode": mode, "reason": f"no {mode} candidates committed for {missing}"}
    features, patients, member = committed_records(records)
    if defended.shape[1] != features.shape[1] or baseline.shape[1] != features.shape[1]:
        return {"available": False, "mode": mode, "reason": "the candidates were embedded in different spaces"}
    count = len(member)
    # leak_test measures AUC(first) - AUC(second): the baseline first, so its L is the drop; negated for the change.
    drop = leak_test(member, generator_scores(features, patients, count, baseline),
                     generator_scores(features, patients, count, defended), bootstrap=bootstrap,
                     permutations=permutations, seed=seed)
    low, high = drop["ci"] if drop["ci"] is not None else (None, None)
    return {"available": True, "mode": mode, "change": -drop["leak"],
            "ci": None if low is None else [-high, -low], "p_value": drop["p_value"],
            # As for a detected leak (attack_ranking): the interval and the permutation test both.
            "lowered": bool(low is not None and low > 0 and (drop["p_value"] or 1.0) <= 0.05),
            "members": drop["members"], "nonmembers": drop["nonmembers"],
            "candidates": {"defended": len(defended), "baseline": len(baseline)},
            "auc_defended": drop["auc_null"], "auc_baseline": drop["auc_attacked"], "bootstrap": bootstrap,
            "permutations": permutations}
