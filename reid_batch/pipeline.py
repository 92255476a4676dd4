"""The thin shell of each stage: read the manifest, resolve inputs and outputs, call the stage's pure core.

A function here exists only once its stage is built; `reid-batch run` reports the others as not built yet.
"""

from __future__ import annotations

from reid_batch import log
from reid_batch.manifest import Manifest


def make_phantoms(manifest: Manifest, target: str | None = None) -> int:
    """Write the synthetic world the manifest describes (nothing to do for real data)."""
    world = manifest.data.synthetic
    if world is None:
        log.event("make_phantoms_skipped", reason="the manifest names real data sources")
        return 0
    from reid_batch.phantoms import WorldConfig, write_world

    config = WorldConfig(
        seed=world.seed,
        image_size=world.image_size,
        private_patients=world.private_patients,
        public_patients=world.public_patients,
        control_patients=world.control_patients,
        max_studies_per_patient=world.max_studies_per_patient,
    )
    summary = write_world(world.root, config)
    log.event("make_phantoms_done", **{k: v for k, v in summary.items() if k != "counts"}, counts=summary.get("counts"))
    return 0


def train_prior(manifest: Manifest, target: str | None = None) -> int:
    from reid_batch.recipes import train_prior as recipe

    return recipe.run(manifest, target)


def train_target(manifest: Manifest, target: str | None = None) -> int:
    from reid_batch.recipes import train_target as recipe

    return recipe.run(manifest, target)


def train_demographics(manifest: Manifest, target: str | None = None) -> int:
    from reid_batch.recipes import train_demographics as recipe

    return recipe.run(manifest, target)


def finetune(manifest: Manifest, target: str | None = None) -> int:
    from reid_batch.recipes import finetune as recipe

    return recipe.run(manifest, target)


def sample(manifest: Manifest, target: str | None = None, shard: int | None = None) -> int:
    from reid_batch.stages.sample import sample as stage

    return stage(manifest, target=target, shard=shard) or 0


def select(manifest: Manifest, target: str | None = None) -> int:
    from reid_batch.stages.select import select as stage

    return stage(manifest, target=target) or 0


def score(manifest: Manifest, target: str | None = None, shard: int | None = None) -> int:
    from reid_batch.stages.score import score as stage

    return stage(manifest, target=target, shard=shard) or 0


def evaluate(manifest: Manifest, target: str | None = None) -> int:
    from reid_batch.stages.evaluate import evaluate as stage

    return stage(manifest, target=target) or 0


def report(manifest: Manifest, target: str | None = None) -> int:
    from reid_batch.stages.report import report as stage

    return stage(manifest, target=target) or 0
