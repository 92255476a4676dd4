"""The positive controls measured on a target built to leak: identity classes (analysis.identity), canaries
(analysis.canaries), and the population shift of the attacked generator's candidates toward its training cohort.
See docs/method.md."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from reid_batch import log
from reid_batch.analysis.canaries import canary_tests
from reid_batch.analysis.identity import identity_control
from reid_batch.analysis.leak import pairwise_min_distance
from reid_batch.analysis.metrics import mean_shift
from reid_batch.analysis.roles import canary_sets, identity_sets, member_patients, pool_frame, train_pool
from reid_batch.artifacts import load_attack_target, load_prior
from reid_batch.attack.generation import BatchSizer, regenerate_images, target_input_spec
from reid_batch.attack.objectives import requested_classes
from reid_batch.data.phantoms import CANARY_HELDOUT_STUDY, WorldConfig, write_extra_studies
from reid_batch.evaluation.images import load_images
from reid_batch.evaluation.likely import LikelySamples
from reid_batch.evaluation.ppa import PPASamples
from reid_batch.evaluation.shared import CONFIDENCE, Shared, TargetRun, demographics_sink, joined
from reid_batch.layout import LEAK_ID_OFFSET
from reid_batch.manifest import Manifest, TargetSpec
from reid_batch.models.pggan import latents_for_ids
from reid_batch.models.targets import to_target_input


@torch.inference_mode()
def _target_probabilities(manifest: Manifest, spec: TargetSpec, images01: torch.Tensor, classes: int,
                          device, sizer: BatchSizer) -> torch.Tensor:
    """(N, classes) softmax of the frozen target on [0, 1] images, batch by batch through `sizer`."""
    model = load_attack_target(manifest, spec)[0].to(device).eval()
    input_spec = target_input_spec(spec)
    logits = sizer.run(np.arange(len(images01)),
                       lambda rows: model(to_target_input(images01[rows].to(device), input_spec)).float().cpu())
    return torch.softmax(torch.cat(logits), dim=1) if logits else torch.zeros(0, classes)


def identity(run: TargetRun, likely: LikelySamples, raw_features: np.ndarray | None, latent_dim: int,
             attacked: PPASamples | None = None) -> dict | None:
    """The identity-class control's measures (analysis.identity) for a target of preset identity: the likely
    samples, the leak statistic's raw candidates of the attacked generator and, as the baseline, the prior's; each
    sample asks for the class its latent's z_0 encodes. Also how often the target itself sees the requested class
    in the likely samples (a collapsed stage 1 leaves it at chance)."""
    manifest, spec, shared = run.manifest, run.spec, run.shared
    if spec.train is None or spec.train.preset != "identity":
        return None
    settings, seed = manifest.evaluation, manifest.sampling.seed
    sets = identity_sets(manifest, spec)
    k = len(sets.scored)
    gallery_patients = sets.scored + sets.distractors
    number = {p.name: i for i, p in enumerate(gallery_patients)}
    rows, on_error = pool_frame(manifest, train_pool(spec))
    resolution = likely.reconstructions.shape[-1]
    gallery = load_images(rows[rows["patient_id"].astype(str).isin(number)], resolution, on_error,
                          manifest.compute.num_workers, desc=f"{spec.name} identity gallery", space=run.space)
    gallery_patient = gallery.frame["patient_id"].astype(str).map(number).to_numpy(dtype=np.int64)
    sexes = np.array([p.sex for p in sets.scored])

    def measure(features: np.ndarray, ids: np.ndarray | None, classes: np.ndarray | None = None) -> dict:
        if classes is None:
            classes = requested_classes(latents_for_ids(seed, ids, latent_dim), k).numpy()
        return identity_control(features, classes, gallery.features, gallery_patient, np.arange(k), sexes,
                                bootstrap=settings.leak_bootstrap, seed=settings.seed, confidence=CONFIDENCE)

    probabilities = _target_probabilities(manifest, spec, likely.reconstructions, k, run.device, shared.sizer)
    asked = requested_classes(latents_for_ids(seed, likely.ids, latent_dim), k)
    result = {
        "role": sets.role, "classes": k,
        "attack": "stage 1 with a learned latent offset per class" if spec.objective.class_offsets
        else "the study's stage 1 (classes through z_0 only)",
        "patients": [p.name for p in sets.classes],
        "scored_against": [p.name for p in sets.scored],
        "distractors": [p.name for p in sets.distractors],
        "gallery": "the world's own studies of these patients (never trained on), in the re-identification embedding",
        "permutation": "class -> patient assignment permuted within sex",
        "likely": measure(likely.features, likely.ids),
        "target_agrees": float((probabilities.argmax(1) == asked).float().mean()) if len(asked) else None,
        "target_confidence": float(probabilities[torch.arange(len(asked)), asked].mean()) if len(asked) else None,
    }
    if raw_features is not None:
        ids = LEAK_ID_OFFSET + np.arange(len(raw_features), dtype=np.int64)
        result["raw"] = measure(raw_features, ids)
        # The prior is one generator: its result depends only on the patients scored (a positive and its negative
        # share them), so it is measured once per set.
        key = (tuple(result["scored_against"]), tuple(result["distractors"]))
        if key not in shared.prior_identity:
            shared.prior_identity[key] = measure(shared.prior_candidate_features, ids)
        result["prior_raw"] = shared.prior_identity[key]
    if attacked is not None:
        # ppa asks for its classes directly (each kept sample was optimised toward one), not through z_0.
        result["ppa"] = measure(attacked.features, None, attacked.classes)
    log.event("identity_control", target=spec.name, role=sets.role, top1=result["likely"]["top1"],
              distinct=result["likely"]["distinct"], p_value=result["likely"]["p_value"],
              raw_top1=result.get("raw", {}).get("top1"), target_agrees=result["target_agrees"],
              ppa_top1=result.get("ppa", {}).get("top1"), ppa_p_value=result.get("ppa", {}).get("p_value"))
    return result


def canaries(run: TargetRun, likely: LikelySamples, raw_features: np.ndarray | None,
             attacked: PPASamples | None = None) -> dict | None:
    """P2 (analysis.canaries): per duplication level, included vs excluded canaries by the distance from each
    canary's held-out study to the closest candidate, for the likely samples, the attacked generator's raw leak
    candidates and, as a null that must stay at chance, the prior's."""
    manifest, spec, shared = run.manifest, run.spec, run.shared
    sets = canary_sets(manifest, spec)
    if sets is None:
        return None
    settings = manifest.evaluation
    rows = pd.DataFrame(write_extra_studies(manifest.data.synthetic.root, WorldConfig.of(manifest.data.synthetic),
                                            sets.patients, 1, first=CANARY_HELDOUT_STUDY))
    heldout = load_images(rows, likely.reconstructions.shape[-1], "raise", manifest.compute.num_workers,
                          desc=f"{spec.name} canaries' held-out studies", space=run.space)
    canaries = np.arange(len(sets.patients))
    result = {
        "patients": [p.name for p in sets.patients],
        "doses": sets.doses.tolist(), "included": sets.included.tolist(), "flip_label": sets.flip_label,
        "scored_by": f"study {CANARY_HELDOUT_STUDY + 1} of each canary (never trained on), distance to the closest "
                     "candidate in the re-identification embedding",
        "null": "the coins permuted among the canaries of one duplication level (one-sided)",
    }
    for name, features in (("likely", likely.features), ("raw", raw_features),
                           ("prior_raw", shared.prior_candidate_features if raw_features is not None else None),
                           ("ppa", attacked.features if attacked is not None else None)):
        if features is None or not len(features):
            continue
        scores = pairwise_min_distance(heldout.features, features, canaries, len(canaries)).min(axis=1)
        result[name] = canary_tests(scores, sets.included, sets.doses, bootstrap=settings.leak_bootstrap,
                                    seed=settings.seed, confidence=CONFIDENCE)
    log.event("canaries", target=spec.name, included=int(sets.included.sum()), of=len(canaries),
              **{f"raw_auc_d{d}": r["auc"] for d, r in (result.get("raw") or {}).items()})
    return result


def _candidate_demographics(manifest: Manifest, shared: Shared, generator, ids: np.ndarray, device
                            ) -> dict[str, np.ndarray]:
    """Predicted age and sex (1 = M) of the candidates `ids`, batch by batch."""
    parts = []
    sink = demographics_sink(manifest, shared, device, parts)
    with torch.inference_mode():
        # The sink appends only once its prediction succeeded: a batch retried smaller leaves no partial result.
        shared.sizer.run(np.asarray(ids, dtype=np.int64),
                         lambda batch: sink(regenerate_images(generator, batch, manifest.sampling.seed, device)))
    return joined(parts)


def population_shift(run: TargetRun, finetuned, attacked: dict[str, np.ndarray] | None) -> dict:
    """P4, population attribute leakage: how far the attack moved the predicted age and male share of the raw leak
    candidates from the prior's, beside the truth of what the target trained on (its members) and of its pool."""
    manifest, spec, shared, device = run.manifest, run.spec, run.shared, run.device
    settings = manifest.evaluation
    ids = LEAK_ID_OFFSET + np.arange(settings.membership_candidates, dtype=np.int64)
    # Normally taken by measure_leak in its pass over the same candidates; generated here only where it did not run.
    if shared.prior_candidate_demographics is None:
        shared.prior_candidate_demographics = _candidate_demographics(
            manifest, shared, load_prior(manifest).to(device).eval(), ids, device)
    if attacked is None:
        attacked = _candidate_demographics(manifest, shared, finetuned, ids, device)
    prior = shared.prior_candidate_demographics
    result = {"candidates": len(ids), "cohort": spec.train.cohort.describe() if spec.train and spec.train.cohort
              else "the whole pool",
              "age": mean_shift(attacked["age"], prior["age"], settings.leak_bootstrap, settings.seed, CONFIDENCE),
              "male_share": mean_shift(attacked["sex"], prior["sex"], settings.leak_bootstrap, settings.seed + 1,
                                       CONFIDENCE)}
    found = pool_frame(manifest, train_pool(spec))
    members, _ = member_patients(manifest, spec, found[0] if found else None)
    if found is not None and members:
        patients = found[0].drop_duplicates("patient_id").set_index("patient_id")
        inside = patients.index.astype(str).isin(members)
        for name, values in (("members", patients[inside]), ("pool", patients)):
            result[f"truth_{name}"] = {"age": float(values["age"].mean()),
                                       "male_share": float((values["sex"] == "M").mean()), "patients": len(values)}
    log.event("population_shift", target=spec.name, cohort=result["cohort"], age_shift=result["age"]["shift"],
              age_ci=result["age"]["ci"], male_shift=result["male_share"]["shift"],
              male_ci=result["male_share"]["ci"])
    return result
