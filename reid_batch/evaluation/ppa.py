"""The ppa attack's kept samples (the ppa stage's latents, optimised per class), rendered, embedded and measured by L
as the study's raw candidates are; and every attack mode run on a target, each with L against the prior."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from reid_batch import log
from reid_batch.analysis.leak import generator_scores, leak_test
from reid_batch.analysis.metrics import to_grey
from reid_batch.artifacts import load_finetuned_generator, load_prior, read_ppa_kept
from reid_batch.evaluation.figures import stage1_examples_png
from reid_batch.evaluation.images import LOADER_BATCH
from reid_batch.evaluation.membership import RawCandidates
from reid_batch.evaluation.shared import CONFIDENCE, TargetRun
from reid_batch.formats import feature_matrix
from reid_batch.layout import LEAK_ID_OFFSET
from reid_batch.models.pggan import generator_to_unit


@dataclass(frozen=True)
class PPASamples:
    """The ppa attack's kept samples (stages.ppa), rendered and embedded, and what evaluate measured on them."""

    ids: np.ndarray  # each kept sample's search id (its latent is in the ppa stage's kept.parquet)
    classes: np.ndarray
    features: np.ndarray
    summary: dict
    figure: bytes  # the kept samples, one row per class (at most 10 rows of 8)


def ppa_attack(store, run: TargetRun, raw: RawCandidates | None) -> PPASamples | None:
    """The ppa attack's kept samples (None if the target does not list ppa): each rendered from its stored latent by
    the generator the attack optimised through, embedded, and L measured as for the study's raw candidates, with the
    null the same number of the prior's raw leak candidates (a pool as large, without the attack)."""
    manifest, spec, shared, device, space = run.manifest, run.spec, run.shared, run.device, run.space
    kept = read_ppa_kept(store, manifest, spec)
    if kept is None:
        return None
    settings = manifest.ppa
    generator = (load_finetuned_generator(manifest, spec.name) if settings.generator == "finetuned"
                 else load_prior(manifest)).to(device).eval()
    latents = torch.from_numpy(feature_matrix(kept["latent"]))
    parts, shown = [], {}
    classes = kept["class"].to_numpy().astype(np.int64)
    with torch.inference_mode():
        for start in range(0, len(latents), LOADER_BATCH):
            images = to_grey(generator_to_unit(generator(latents[start:start + LOADER_BATCH].to(device)),
                                               generator.config.output_range)).float().cpu()
            parts.append(space(images))
            for row, cls in enumerate(classes[start:start + LOADER_BATCH].tolist()):
                if (cls in shown or len(shown) < 10) and len(shown.setdefault(cls, [])) < 8:
                    shown[cls].append(images[row])
    features = np.concatenate(parts) if parts else np.zeros((0, space.dims), np.float32)
    confidence = kept["confidence"].to_numpy()
    summary = {"mode": "ppa", "generator": settings.generator, "kept": len(kept),
               "classes": int(len(np.unique(classes))), "kept_per_class": settings.keep,
               "settings": settings.model_dump(mode="json"),
               "mean_confidence": float(confidence.mean()) if len(confidence) else None,
               "mean_searched_confidence": float(kept["searched_confidence"].to_numpy().mean()) if len(kept) else None}
    if raw is None or shared.prior_candidate_features is None:
        summary["leak"] = {"available": False, "reason": "membership is not available for this target"}
    else:
        null = shared.prior_candidate_features[:len(features)]
        patients = len(raw.member)
        result = leak_test(raw.member, generator_scores(raw.record_features, raw.record_patients, patients, features),
                           generator_scores(raw.record_features, raw.record_patients, patients, null),
                           bootstrap=manifest.evaluation.leak_bootstrap,
                           permutations=manifest.evaluation.leak_permutations, seed=manifest.evaluation.seed,
                           confidence=CONFIDENCE)
        summary["leak"] = {"available": True, "vs_prior": result, "null": f"the prior's first {len(null)} raw leak "
                           f"candidates (ids {LEAK_ID_OFFSET} + k)", "compared": len(null)}
    log.event("ppa_evaluated", target=spec.name, kept=len(kept),
              leak=(summary["leak"].get("vs_prior") or {}).get("leak"))
    figure = stage1_examples_png({f"class {c}": torch.stack(images) for c, images in shown.items()},
                                 per_row=max((len(v) for v in shown.values()), default=1))
    return PPASamples(kept["id"].to_numpy().astype(np.int64), classes, features, summary, figure)


def attacks_summary(leak: dict, attacked: PPASamples | None) -> dict:
    """Every attack mode run on the target, each with L against the prior (the study's: its raw candidates)."""
    study = {"mode": "study", "description": "the study's two stages: a fine-tuned generator's raw candidates"}
    if leak.get("available"):
        study["leak"] = {"available": True, "vs_prior": leak["raw"]["vs_prior"],
                         "compared": leak["raw"]["vs_prior"].get("candidates")}
    else:
        study["leak"] = {"available": False, "reason": leak.get("reason")}
    modes = {"study": study}
    if attacked is not None:
        modes["ppa"] = {**attacked.summary, "description": "per-sample latent optimisation toward each class "
                        "(Plug & Play-style): the kept samples"}
    return modes
