"""The ppa attack on the identity control of a finished run, over several seeds: top-1, distinct patients and the
label-permutation p-value per seed, for the identity target and its negative: whether ppa finds the patients a
model is known to encode, beyond one seed's luck.

It runs exactly what the `ppa` stage runs (stages.ppa: the manifest's `ppa` section, the searched ids
layout.ppa_search_ids, the prior or fine-tuned generator) with `ppa.seed` set to each seed in turn, and scores the
kept samples as `evaluate` does (analysis.identity on a gallery of 2K patients: the scored K and K distractors), so
seed ppa.seed reproduces the run's own report when run with the thread count the stage ran with (ppa's float32 path
depends on it: set OMP_NUM_THREADS as the stage's task had it). It reads a run that has trained the prior,
the re-identification embedding and the identity targets (e.g. `reid-batch demo`'s run) and writes nothing to it.

    PYTHONPATH=$PWD python bench/ppa_identity.py runs-demo.yaml --seeds 0,1,2
    PYTHONPATH=$PWD python bench/ppa_identity.py M.yaml --settings '{"lr": 0.005, "steps": 300, "bn_stats": 0.01}'

--settings overrides fields of the manifest's `ppa` section (validated as the manifest is). Run it from the
directory the manifest's relative paths start from.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from reid_batch.analysis.identity import identity_control
from reid_batch.analysis.roles import identity_sets, pool_frame, train_pool
from reid_batch.analysis.space import FeatureSpace
from reid_batch.artifacts import load_reid_model
from reid_batch.attack import ppa
from reid_batch.layout import ppa_search_ids
from reid_batch.manifest import load_manifest, parse_manifest
from reid_batch.models.pggan import generator_to_unit
from reid_batch.runtime import pick_device
from reid_batch.evaluation.images import load_images
from reid_batch.stages.ppa import AttackedModels, settings_of


def with_settings(manifest, overrides: dict, seed: int):
    document = manifest.model_dump(mode="json")
    document["ppa"] = {**document["ppa"], **overrides, "seed": seed}
    return parse_manifest(document, "the manifest with --settings")


def attack_target(manifest, name: str, overrides: dict, seeds: list[int], space) -> list[dict]:
    spec = manifest.target(name)
    device = pick_device(manifest)
    sets = identity_sets(manifest, spec)
    patients = sets.scored + sets.distractors
    number = {p.name: i for i, p in enumerate(patients)}
    rows, on_error = pool_frame(manifest, train_pool(spec))
    models = AttackedModels(with_settings(manifest, overrides, seeds[0]), spec, device)
    # At the generator's resolution, as evaluate loads the gallery.
    gallery = load_images(rows[rows["patient_id"].astype(str).isin(number)], models.generator.config.resolution,
                          on_error=on_error, num_workers=0, keep=set(), desc=f"{name} gallery", space=space)
    gallery_patient = gallery.frame["patient_id"].astype(str).map(number).to_numpy(dtype=np.int64)
    sexes = np.array([p.sex for p in sets.scored])
    results = []
    try:
        for seed in seeds:
            seeded = with_settings(manifest, overrides, seed)
            settings = settings_of(seeded)
            started = time.perf_counter()
            kept, classes, confidence = [], [], []
            for cls in range(models.classes):
                result = ppa.attack_class(models.generate, models.target, cls,
                                          np.asarray(ppa_search_ids(cls, settings.search), np.int64),
                                          models.latent_dim, settings, seed=seed, device=device,
                                          batch_size=models.sizers)
                kept.append(result.latents)
                classes += [cls] * len(result.ids)
                confidence.append(result.confidence)
            with torch.no_grad():
                images = generator_to_unit(models.generator(torch.cat(kept).to(device)),
                                           models.generator.config.output_range)
                features = space(images.mean(dim=1, keepdim=True).float().cpu())
            measured = identity_control(features, np.array(classes), gallery.features, gallery_patient,
                                        np.arange(models.classes), sexes, bootstrap=seeded.evaluation.leak_bootstrap,
                                        seed=seeded.evaluation.seed)
            results.append({"target": name, "role": sets.role, "seed": seed, "top1": measured["top1"],
                            "top5": measured["top5"], "distinct": measured["distinct"],
                            "p_value": measured["p_value"], "null_top1": measured["null_top1"], "ci": measured["ci"],
                            "confidence": float(torch.cat(confidence).mean()),
                            "seconds": round(time.perf_counter() - started, 1)})
            print(json.dumps(results[-1]), flush=True)
    finally:
        models.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("manifest")
    parser.add_argument("--targets", default="identity,identity-negative")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--settings", default="{}", help="fields of the manifest's ppa section, as JSON")
    parser.add_argument("--json", help="also write every result to this file")
    args = parser.parse_args()
    manifest = load_manifest(args.manifest)
    overrides = json.loads(args.settings)
    space = FeatureSpace(load_reid_model(manifest), manifest.reid.image_size, "cpu")
    seeds = [int(s) for s in args.seeds.split(",")]
    results = []
    for name in args.targets.split(","):
        results += attack_target(manifest, name, overrides, seeds, space)
    for name in args.targets.split(","):
        mine = [r for r in results if r["target"] == name]
        print(f"{name}: mean top-1 {np.mean([r['top1'] for r in mine]):.3f} over seeds {seeds}, "
              f"p {[r['p_value'] for r in mine]}, distinct {[r['distinct'] for r in mine]}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"settings": {**manifest.ppa.model_dump(mode="json"), **overrides}, "results": results},
                      handle, indent=2)


if __name__ == "__main__":
    main()
