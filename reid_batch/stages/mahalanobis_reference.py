"""Fit the Ledoit-Wolf Gaussian of `selection.mahalanobis` once per target, before any sampling shard starts.

With `covariance: ledoit_wolf`, stage 2's Mahalanobis distance compares every candidate with ONE Gaussian fitted on
prior samples (reid_batch.attack.reference.shared_ledoit_wolf). This stage fits it and commits it at
<target>/mahalanobis-reference/ (gaussian.safetensors: mean and Cholesky factor; gaussian.json: its summary); every
sampling shard, and evaluate, then read that commit and never fit. It runs in the cluster plan's train-target job,
one task per target, so the commit exists before the sample array starts and the shards never race to fit it.
A committed reference is left as it is. With `covariance: diagonal` there is nothing to fit: it returns at once.
"""

from __future__ import annotations

from reid_batch import log
from reid_batch.manifest import Manifest


def run(manifest: Manifest, target: str | None = None) -> int:
    """`reid-batch mahalanobis-reference`: the committed Ledoit-Wolf Gaussian of each target (None = all targets)."""
    settings = manifest.selection.mahalanobis
    specs = [manifest.target(target)] if target else list(manifest.targets)  # as runtime.chosen_targets (torch-free)
    if settings.covariance != "ledoit_wolf":
        log.event("mahalanobis_reference_skipped", covariance=settings.covariance,
                  reason="a diagonal Gaussian comes from the target's own statistics: nothing to fit")
        return 0
    # Imported here: with a diagonal Gaussian (the default) this stage costs a process start, not a torch import.
    from accelerate import Accelerator

    from reid_batch.artifacts import load_attack_target
    from reid_batch.attack.candidates import build_objective
    from reid_batch.attack.generation import BatchSizer
    from reid_batch.attack.reference import shared_ledoit_wolf
    from reid_batch.runtime import pick_device

    device = pick_device(manifest)
    accelerator = Accelerator(cpu=device.type == "cpu")
    for spec in specs:
        model, _ = load_attack_target(manifest, spec)
        sizer = BatchSizer(manifest.sampling.batch_size, device, settings.reference_images,
                           manifest.generator.resolution**2)
        with build_objective(manifest, spec, model.to(device), accelerator) as objective:
            gaussian = shared_ledoit_wolf(manifest, spec, objective, accelerator, sizer)
        log.event("mahalanobis_reference_ready", target=spec.name, **gaussian.summary())
    accelerator.wait_for_everyone()
    return 0
