"""The ppa attack (attack/ppa.py) on the identity control of a finished run: top-1, distinct patients and the
label-permutation p-value, per seed, for the identity target and its negative (issue 18's acceptance measure).

Until ppa is a pipeline stage, this is how its settings are chosen and its figure is measured. It reads a run that
has trained the prior, the re-identification embedding and identity targets (e.g. `reid-batch demo`'s run), and
writes nothing to it. Per class it searches `search` latents (ids seed * 10^6 + class * 10^4 + k, so seeds never
share a latent), optimises the best, keeps `keep`, and scores the kept samples exactly as evaluate scores the
study's attack (analysis.identity on a gallery of 2K patients: the scored K and K distractors).

    PYTHONPATH=$PWD python bench/ppa_identity.py runs-demo.yaml --seeds 0,1,2
    PYTHONPATH=$PWD python bench/ppa_identity.py M.yaml --settings '{"lr": 0.02, "steps": 300}' --bn 0.01

--bn adds the per-sample BatchNorm term (attack.objectives, weight as given) to every optimisation step.
Run it from the directory the manifest's relative paths start from.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields

import numpy as np
import torch

from reid_batch.analysis.identity import identity_control
from reid_batch.analysis.roles import identity_sets, pool_frame, train_pool
from reid_batch.analysis.space import FeatureSpace
from reid_batch.artifacts import load_attack_target, load_prior, load_reid_model
from reid_batch.attack import ppa
from reid_batch.attack.generation import target_input_spec
from reid_batch.attack.objectives import TargetObjective
from reid_batch.manifest import load_manifest
from reid_batch.models.pggan import generator_to_unit
from reid_batch.models.targets import to_target_input
from reid_batch.stages.evaluate import load_images


def settings_from(text: str) -> ppa.PPASettings:
    given = json.loads(text)
    known = {f.name for f in fields(ppa.PPASettings)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise SystemExit(f"unknown PPASettings fields {unknown}; known: {sorted(known)}")
    return ppa.PPASettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})


def attack_target(manifest, name: str, settings: ppa.PPASettings, seeds: list[int], bn: float, space,
                  generate, latent_dim: int, resolution: int) -> list[dict]:
    spec = manifest.target(name)
    model, k = load_attack_target(manifest, spec)
    input_spec = target_input_spec(spec)
    if bn > 0:
        objective = TargetObjective(model, {"bn_stats": 1.0})

        def target(images01):
            result = objective(to_target_input(images01, input_spec, check_range=False))
            return result.logits, bn * result.per_sample["bn_stats"]
    else:
        def target(images01):
            return model(to_target_input(images01, input_spec, check_range=False))

    sets = identity_sets(manifest, spec)
    patients = sets.scored + sets.distractors
    number = {p.name: i for i, p in enumerate(patients)}
    rows, on_error = pool_frame(manifest, train_pool(spec))
    # At the generator's resolution, as evaluate loads the gallery for the study's attack.
    gallery = load_images(rows[rows["patient_id"].astype(str).isin(number)], resolution, on_error, 0, set(),
                          f"{name} gallery", space)
    gallery_patient = gallery.frame["patient_id"].astype(str).map(number).to_numpy(dtype=np.int64)
    sexes = np.array([p.sex for p in sets.scored])
    results = []
    for seed in seeds:
        started = time.perf_counter()
        kept, classes, confidence = [], [], []
        for cls in range(k):
            ids = seed * 10**6 + cls * 10**4 + np.arange(settings.search)
            result = ppa.attack_class(generate, target, cls, ids, latent_dim, settings, seed)
            kept.append(result.latents)
            classes += [cls] * len(result.ids)
            confidence.append(result.confidence)
        with torch.no_grad():
            features = space(generate(torch.cat(kept)))
        measured = identity_control(features, np.array(classes), gallery.features, gallery_patient, np.arange(k),
                                    sexes, seed=seed)
        results.append({"target": name, "role": sets.role, "seed": seed, "top1": measured["top1"],
                        "top5": measured["top5"], "distinct": measured["distinct"], "p_value": measured["p_value"],
                        "null_top1": measured["null_top1"], "ci": measured["ci"],
                        "confidence": float(torch.cat(confidence).mean()),
                        "seconds": round(time.perf_counter() - started, 1)})
        print(json.dumps(results[-1]), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("manifest")
    parser.add_argument("--targets", default="identity,identity-negative")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--settings", default="{}", help="PPASettings fields as JSON")
    parser.add_argument("--bn", type=float, default=0.0, help="weight of the per-sample BatchNorm term")
    parser.add_argument("--json", help="also write every result to this file")
    args = parser.parse_args()
    manifest = load_manifest(args.manifest)
    settings = settings_from(args.settings)
    space = FeatureSpace(load_reid_model(manifest), manifest.reid.image_size, "cpu")
    prior = load_prior(manifest).eval().requires_grad_(False)

    def generate(z):
        return generator_to_unit(prior(z), prior.config.output_range)

    seeds = [int(s) for s in args.seeds.split(",")]
    results = []
    for name in args.targets.split(","):
        results += attack_target(manifest, name, settings, seeds, args.bn, space, generate, prior.config.latent_dim,
                                 prior.config.resolution)
    for name in args.targets.split(","):
        mine = [r for r in results if r["target"] == name]
        print(f"{name}: mean top-1 {np.mean([r['top1'] for r in mine]):.3f} over seeds {seeds}, "
              f"p {[r['p_value'] for r in mine]}, distinct {[r['distinct'] for r in mine]}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"settings": json.loads(args.settings), "bn": args.bn, "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
