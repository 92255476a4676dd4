"""`reid-batch make-phantoms`: write the synthetic chest-X-ray world the manifest describes (nothing for real data)."""

from __future__ import annotations

from reid_batch import log
from reid_batch.data.phantoms import WorldConfig, write_world
from reid_batch.manifest import Manifest


def make_phantoms(manifest: Manifest, target: str | None = None) -> int:
    world = manifest.data.synthetic
    if world is None:
        log.event("make_phantoms_skipped", reason="the manifest names real data sources")
        return 0
    summary = write_world(world.root, WorldConfig.of(world))
    log.event("make_phantoms_done", **{k: v for k, v in summary.items() if k != "counts"}, counts=summary.get("counts"))
    return 0
