"""Canaries: did the attack come closer to the canaries the target trained on than to the ones it did not? Pure
numpy. See docs/method.md for where this control sits among the others.

Each canary was put in the training set by its own fair coin, so before training the included and the excluded
canaries are exchangeable: the excluded ones are the in-model control, and permuting the coins is an exact null
(no pool difference, no label mix, no second model to match). A canary's score is the distance from a study of it
that no model trained on (its held-out study) to the closest candidate, in the re-identification embedding. The
statistic is the AUC P(an included canary scores lower than an excluded one), ties half; chance is 0.5.
"""

from __future__ import annotations

import numpy as np

from reid_batch.analysis.leak import auc_rows

PERMUTATIONS = 9999


def canary_test(scores: np.ndarray, included: np.ndarray, bootstrap: int = 1000, permutations: int = PERMUTATIONS,
                seed: int = 0, confidence: float = 0.95) -> dict:
    """AUC of "included canaries score lower" with its bootstrap interval (included and excluded canaries resampled
    apart) and a one-sided permutation p-value over the coins, p = (1 + #{AUC* >= AUC}) / (1 + permutations).
    scores (n,) lower = closer; included (n,) booleans. Without both kinds of canary nothing is measured."""
    scores, included = np.asarray(scores, np.float64), np.asarray(included, bool)
    result = {"included": int(included.sum()), "excluded": int((~included).sum()), "chance": 0.5,
              "permutations": permutations, "bootstrap": bootstrap}
    if included.all() or not included.any():
        return {**result, "auc": None, "ci": None, "p_value": None,
                "reason": "the coins put every canary of this group on one side"}
    auc = float(auc_rows(scores, included)[0])
    rng = np.random.default_rng(seed)
    inside, outside = np.flatnonzero(included), np.flatnonzero(~included)
    interval = None
    if bootstrap:
        positions = np.concatenate([rng.choice(inside, (bootstrap, len(inside))),
                                    rng.choice(outside, (bootstrap, len(outside)))], axis=1)
        side = np.zeros(positions.shape[1], bool)
        side[:len(inside)] = True
        resampled = auc_rows(scores[positions], side)
        tail = (1 - confidence) / 2
        interval = (float(np.quantile(resampled, tail)), float(np.quantile(resampled, 1 - tail)))
    coins = np.stack([rng.permutation(included) for _ in range(permutations)]) if permutations else None
    p_value = None
    if coins is not None:
        permuted = auc_rows(np.broadcast_to(scores, coins.shape), coins)
        p_value = float((1 + (permuted >= auc - 1e-12).sum()) / (1 + permutations))
    return {**result, "auc": auc, "ci": interval, "p_value": p_value, "confidence": confidence,
            "included_median": float(np.median(scores[included])),
            "excluded_median": float(np.median(scores[~included]))}


def canary_tests(scores: np.ndarray, included: np.ndarray, doses: np.ndarray, **options) -> dict[str, dict]:
    """canary_test per duplication level, keyed by the number of training studies ("1", "4", ...)."""
    doses = np.asarray(doses)
    return {str(int(d)): canary_test(scores[doses == d], np.asarray(included)[doses == d], **options)
            for d in sorted(set(doses.tolist()))}
