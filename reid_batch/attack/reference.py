"""Reference statistics: what the attack compares generated images with when the target stores no statistics.

* Objective reference (ViT LayerNorm/CLS/attention statistics, GroupNorm CNNs): measured once through the frozen
  target on public-pool images (`objective.reference.source: public`, the default) or on the prior's samples
  (`prior`, latent ids layout.FINETUNE_REFERENCE_ID_OFFSET + k: the generator's own statistics, which put stage 1
  at the terms' minimum from the start), shared out over the processes, and cached at
  <target>/finetune-reference.safetensors with a fingerprint of the target's and the source's weights and
  settings, so a changed target or prior is never compared with stale statistics. Stage 1 and sampling read the
  same cache, so both stages compare with the same numbers.
* The feature Gaussian of the Mahalanobis distance (`selection.mahalanobis`): the target's own running statistics
  (diagonal: a pure function of the stored weights, so every shard derives the same one), or Ledoit-Wolf on prior
  samples at ids layout.MAHALANOBIS_REFERENCE_ID_OFFSET + k (never a candidate's). Ledoit-Wolf is FITTED ONCE per
  target and committed at <target>/mahalanobis-reference/; every shard reads that commit. Fitting it per shard gave
  each GPU its own Gaussian (TF32, cuBLAS algorithm choice, another GPU model after a resume), so distances of
  different shards were not comparable. See `shared_ledoit_wolf` for why this survives concurrent array tasks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from accelerate.utils import broadcast_object_list, gather_object
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor, nn

from reid_batch import log
from reid_batch.artifacts import load_prior
from reid_batch.attack import mahalanobis
from reid_batch.attack.generation import BatchSizer, regenerate_images, target_input_spec
from reid_batch.attack.objectives import compute_reference_stats
from reid_batch.data.datasets import ImageDataset, read_source
from reid_batch.errors import InputError, require_same_plan
from reid_batch.layout import (FINETUNE_REFERENCE_ID_OFFSET, GAUSSIAN_FILE, GAUSSIAN_SUMMARY_FILE,
                               MAHALANOBIS_REFERENCE_ID_OFFSET, finetune_reference_key, mahalanobis_reference_prefix)
from reid_batch.manifest import Manifest, TargetSpec
from reid_batch.models.pggan import PGGANGenerator, generator_to_unit, latents_for_ids
from reid_batch.models.targets import TargetInput, to_target_input
from reid_batch.runtime import run_store

REFERENCE_BATCH = 32
ReduceSum = Callable[[Tensor], Tensor]


def _plain_sum(num_processes: int) -> ReduceSum | None:
    if num_processes == 1:
        return None

    def reduce(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    return reduce


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of a module's state (names, dtypes, shapes, bytes): identifies the exact weights."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _shard(count: int, num_processes: int, rank: int) -> range:
    bounds = np.linspace(0, count, num_processes + 1).round().astype(int)
    return range(int(bounds[rank]), int(bounds[rank + 1]))


def _prior_reference_batches(prior: PGGANGenerator, seed: int, ids: range, input_spec: TargetInput,
                             device) -> Iterator[torch.Tensor]:
    for start in range(ids.start, ids.stop, REFERENCE_BATCH):
        batch_ids = FINETUNE_REFERENCE_ID_OFFSET + torch.arange(start, min(start + REFERENCE_BATCH, ids.stop))
        latents = latents_for_ids(seed, batch_ids, prior.config.latent_dim).to(device)
        with torch.inference_mode():
            image = generator_to_unit(prior(latents).float(), prior.config.output_range)
            yield to_target_input(image, input_spec, check_range=False)


def _public_reference_frame(manifest: Manifest, num_images: int, seed: int) -> pd.DataFrame:
    source = manifest.source("public")
    frame = read_source(source.format, source.root, **({"csv_name": source.csv} if source.csv else {}))
    frame = frame.sort_values("path").reset_index(drop=True)
    if len(frame) > num_images:
        frame = frame.sample(n=num_images, random_state=seed % 2**32).sort_values("path").reset_index(drop=True)
    return frame


def _public_reference_batches(manifest: Manifest, frame: pd.DataFrame, rows: range, input_spec: TargetInput,
                              device) -> Iterator[torch.Tensor]:
    dataset = ImageDataset(frame.iloc[rows.start:rows.stop], size=input_spec.size, channels=1,
                           on_error=manifest.source("public").on_error)
    loader = torch.utils.data.DataLoader(dataset, batch_size=REFERENCE_BATCH,
                                         num_workers=manifest.compute.num_workers)
    for batch in loader:
        yield to_target_input(batch["image"].to(device), input_spec, check_range=False)


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    if len(data) < 8:
        return {}
    length = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8:8 + length])
    except ValueError:
        return {}
    return header.get("__metadata__") or {}


def reference_stats(manifest: Manifest, spec: TargetSpec, model: nn.Module, prior: PGGANGenerator,
                    accelerator, store) -> tuple[dict[str, torch.Tensor], dict]:
    """The ViT's reference statistics, from the cache when it matches this target and source, else measured
    (each process takes a share of the images; sums are combined) and cached by the main process."""
    reference = spec.objective.reference
    input_spec = target_input_spec(spec)
    key = finetune_reference_key(spec.name)
    # "statistics" names what the cache holds: caches from before attention levels were measured are stale.
    identity = {"statistics": "norms, cls, attention levels", "source": reference.source,
                "num_images": reference.num_images, "seed": manifest.finetune.seed,
                "target": weights_digest(model), "input": spec.input.model_dump(mode="json")}
    if reference.source == "prior":
        identity["prior"] = weights_digest(prior)
    else:
        source = manifest.source("public")
        identity["public"] = f"{source.format}:{source.root}:{source.csv}"
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    info = {"source": reference.source, "num_images": reference.num_images, "file": key}

    accelerator.wait_for_everyone()
    if store.exists(key):
        data = store.read_bytes(key)
        if _safetensors_metadata(data).get("fingerprint") == fingerprint:
            stats = load_tensors(data)
            info["images"] = int(stats["count"])
            log.event("finetune_reference_cached", target=spec.name, uri=store.uri(key), source=reference.source)
            return stats, {**info, "cached": True}
        log.event("finetune_reference_stale", target=spec.name, uri=store.uri(key),
                  reason="target, prior or reference settings changed")

    world, rank = accelerator.num_processes, accelerator.process_index
    if reference.source == "prior":
        count = reference.num_images
        batches = _prior_reference_batches(prior.to(accelerator.device).eval(), manifest.finetune.seed,
                                           _shard(count, world, rank), input_spec, accelerator.device)
    else:
        frame = _public_reference_frame(manifest, reference.num_images, manifest.finetune.seed)
        count = len(frame)
        batches = _public_reference_batches(manifest, frame, _shard(count, world, rank), input_spec,
                                            accelerator.device)
    if count < world:
        where = f"targets[{manifest.targets.index(spec)}].objective.reference.num_images"
        raise InputError(f"{count} reference image(s) cannot be shared by {world} processes", where=where)
    stats = compute_reference_stats(model, batches, reduce_sum=_plain_sum(world))
    stats = {k: v.detach().cpu().contiguous() for k, v in stats.items()}
    if accelerator.is_main_process:
        store.write_bytes(key, save_tensors(stats, metadata={"fingerprint": fingerprint,
                                                             "identity": json.dumps(identity, sort_keys=True)}))
    accelerator.wait_for_everyone()
    info["images"] = int(stats["count"])
    return stats, {**info, "cached": False}


def gather_object_list(accelerator, obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every process."""
    if accelerator.num_processes == 1:
        return [obj]

    return gather_object([obj])


def my_share(accelerator, ids: np.ndarray) -> np.ndarray:
    with accelerator.split_between_processes(ids.tolist()) as mine:
        return np.asarray(mine, dtype=np.int64)


def reference_ids(count: int) -> np.ndarray:
    return MAHALANOBIS_REFERENCE_ID_OFFSET + np.arange(count, dtype=np.int64)


def vit_reference_stats(manifest: Manifest, spec: TargetSpec, model, accelerator) -> dict[str, Tensor]:
    """The reference statistics of a ViT or GroupNorm CNN, exactly stage 1's: its cache when it matches, else measured the same way."""
    stats, info = reference_stats(manifest, spec, model, load_prior(manifest), accelerator, run_store(manifest))
    log.event("reference_stats_ready", target=spec.name, **info)
    return {k: v.cpu() for k, v in stats.items()}


def feature_gaussian(manifest: Manifest, spec: TargetSpec, objective, accelerator, sizer: BatchSizer):
    """The Mahalanobis model of `selection.mahalanobis` for this target (see reid_batch.attack.mahalanobis)."""
    settings = manifest.selection.mahalanobis
    if settings.covariance == "diagonal":
        prior = objective.feature_prior()
        if prior is None:
            raise InputError("the target offers no feature statistics for a diagonal Gaussian (no BatchNorm2d, "
                             "or ViT reference statistics without CLS statistics); use covariance: ledoit_wolf",
                             where="selection.mahalanobis.covariance")
        source = ("reference CLS mean/var" if spec.family == "vit" else
                  "last GroupNorm input, reference mean/var" if objective.fallback is not None else
                  "last BatchNorm2d running_mean/running_var")
        return mahalanobis.from_gaussian(prior[0], prior[1], settings.epsilon, source)
    return shared_ledoit_wolf(manifest, spec, objective, accelerator, sizer)


def fit_ledoit_wolf_reference(manifest: Manifest, spec: TargetSpec, objective, accelerator, sizer: BatchSizer,
                              prior: PGGANGenerator | None = None) -> mahalanobis.MahalanobisModel:
    """Ledoit-Wolf on the target features of `reference_images` prior samples (each process renders a share)."""
    settings = manifest.selection.mahalanobis
    input_spec = target_input_spec(spec)
    prior = (prior if prior is not None else load_prior(manifest)).to(accelerator.device).eval()
    mine = my_share(accelerator, reference_ids(settings.reference_images))

    def features_of(ids: np.ndarray) -> np.ndarray:
        images = regenerate_images(prior, ids, manifest.sampling.seed, accelerator.device)
        result = objective(to_target_input(images, input_spec, check_range=False), image01=images)
        return result.features.float().cpu().numpy()

    # Through the sizer, like every generation loop: `auto` starts large and halves on CUDA out-of-memory.
    with torch.inference_mode():
        features = sizer.run(mine, features_of)
    dim = 0 if not features else features[0].shape[1]
    mine = np.concatenate(features) if features else np.zeros((0, dim), dtype=np.float32)
    gathered = [part for part in gather_object_list(accelerator, mine) if len(part)]
    return mahalanobis.fit_ledoit_wolf(np.concatenate(gathered), settings.epsilon,
                                       source=f"Ledoit-Wolf on {settings.reference_images} prior samples")


def ledoit_wolf_identity(manifest: Manifest, spec: TargetSpec, model: nn.Module, prior: PGGANGenerator) -> dict:
    """What the fitted Gaussian depends on: the target's and the prior's exact weights, the target's settings, the
    reference ids' seed and count, epsilon. NOT the device or precision: one fit serves every shard on any GPU."""
    identity = {"format": 1, "target": weights_digest(model), "prior": weights_digest(prior),
                "spec": spec.plan_dump(), "seed": manifest.sampling.seed,
                "mahalanobis": manifest.selection.mahalanobis.model_dump(mode="json")}
    return json.loads(json.dumps(identity))  # the form it takes once stored, so comparisons are exact


def _gaussian_bytes(model: mahalanobis.MahalanobisModel) -> bytes:
    # The Cholesky factor itself is stored, not the covariance: re-deriving it on each reader (eigvalsh, cholesky on
    # another CPU's BLAS) could differ in the last bits, and the point is one Gaussian, bit for bit.
    # One metadata entry: safetensors writes its metadata map in hash order, and two entries made the bytes of the
    # same Gaussian differ from one process to the next.
    summary = {"source": model.source, "regularisation": model.regularisation, "details": model.details,
               "fingerprint": model.fingerprint()}
    return save_tensors({"mean": model.mean.contiguous(), "factor": model.factor.contiguous()},
                        metadata={"gaussian": json.dumps(summary, sort_keys=True)})


def read_committed_ledoit_wolf(store, spec: TargetSpec, identity: dict) -> mahalanobis.MahalanobisModel | None:
    """The committed Gaussian of this target, None if none is committed; an InputError if the commit was fitted for
    other weights or settings (a commit is never replaced: delete it to fit again)."""
    prefix = mahalanobis_reference_prefix(spec.name)
    if not store.is_committed(prefix):
        return None
    found = store.read_commit(prefix).get("metadata", {}).get("identity")
    require_same_plan(found, identity, store.uri(prefix), "a Ledoit-Wolf reference",
                      "delete it (and the target's candidates/, selection/, scores/) to sample again")
    data = store.read_bytes(f"{prefix}/{GAUSSIAN_FILE}")
    tensors = load_tensors(data)
    summary = json.loads(_safetensors_metadata(data)["gaussian"])
    model = mahalanobis.MahalanobisModel(tensors["mean"], tensors["factor"], False, summary["source"],
                                         summary["regularisation"], summary["details"])
    if model.fingerprint() != summary["fingerprint"]:
        raise RuntimeError(f"{store.uri(f'{prefix}/{GAUSSIAN_FILE}')}: the stored Gaussian does not match its "
                           "recorded fingerprint")
    return model


def shared_ledoit_wolf(manifest: Manifest, spec: TargetSpec, objective, accelerator,
                       sizer: BatchSizer) -> mahalanobis.MahalanobisModel:
    """The target's ONE Ledoit-Wolf Gaussian: the committed one if present (no fit), else fitted and committed here.

    Why this is robust under concurrent array tasks and resume:
    * The cluster plan fits it in the `mahalanobis-reference` stage, one task per target, in a job that ends before
      the sample array starts: the shards only ever read, so they cannot race to fit. Resumed or re-run shards, on
      whatever hardware, read the same commit, and nothing here depends on the device.
    * Run without that stage (`reid-batch sample` alone, `--shard` by hand), the first caller fits and commits it
      through the store's commit marker; a caller that finds the marker does not fit. Two callers that both fit
      (started together) both try to commit; the store keeps the first commit and discards the later one
      (storage.Store.committed), and EVERY caller then scores against what was committed, read back, never
      against its own fit. Only two commits published within the same few milliseconds could leave two callers
      with different Gaussians; `select` then refuses (the fingerprints differ) instead of mixing them.
    """
    store = run_store(manifest)
    prior = load_prior(manifest)
    identity = ledoit_wolf_identity(manifest, spec, objective.model, prior)
    prefix = mahalanobis_reference_prefix(spec.name)
    # The main process decides for all (read or fit): were each process to look for itself, a commit landing between
    # their looks would send some into the fit's collective gather and leave them waiting for the others forever.
    decision: list = [None]
    if accelerator.is_main_process:
        try:
            decision = [read_committed_ledoit_wolf(store, spec, identity) is not None]
        except InputError as error:
            decision = [error]  # every process must learn of it, or the others would wait for the broadcast
    if accelerator.num_processes > 1:
        broadcast_object_list(decision)
    if isinstance(decision[0], Exception):
        raise decision[0]
    if decision[0]:
        committed = read_committed_ledoit_wolf(store, spec, identity)
        log.event("mahalanobis_reference_read", target=spec.name, uri=store.uri(prefix),
                  fingerprint=committed.fingerprint())
        return committed
    fitted = fit_ledoit_wolf_reference(manifest, spec, objective, accelerator, sizer, prior)
    if accelerator.is_main_process:
        metadata = {"identity": identity, "fingerprint": fitted.fingerprint()}
        with store.committed(prefix, metadata) as staging:
            staging.write_bytes(GAUSSIAN_FILE, _gaussian_bytes(fitted))
            staging.write_json(GAUSSIAN_SUMMARY_FILE, fitted.summary())
    accelerator.wait_for_everyone()
    committed = read_committed_ledoit_wolf(store, spec, identity)
    log.event("mahalanobis_reference_fitted", target=spec.name, uri=store.uri(prefix),
              fingerprint=committed.fingerprint(), used_own_fit=committed.fingerprint() == fitted.fingerprint())
    return committed
