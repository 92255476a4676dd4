"""`reid-batch train-reid`: the re-identification embedding the evaluation measures leaks with.

Trained on the PUBLIC pool only (the attacker's side of the world; no private or control patient is ever seen),
patient-grouped: a patient's images are all in training or all in validation. Each step takes `patients_per_batch`
patients and two views of each: two different studies of the patient where it has them, else two copies of its
one study, each through acquisition augmentation (small rotation, shift and scale; gamma, contrast, brightness,
noise; never a horizontal flip: laterality is anatomy). The loss is NT-Xent (SimCLR / supervised contrastive with
one positive): each view must pick its partner out of the batch by cosine similarity / temperature.

Reported (metrics.json) with analysis.metrics.patient_verification: verification AUC and rank-1 on the held-out
public patients, and on the private pool's patients with two or more studies when those images are on this
machine (validation only: the attacker has no private images). Anchor: Packhaeuser et al. 2022 (Sci Rep 12:14851),
siamese re-identification on ChestX-ray14, verification AUC 0.994.

Outputs, committed under reid/: model.safetensors, metrics.json (settings, history, verification). Resumable:
after every epoch the state goes to resume/train-reid.pt; a resumed run draws exactly the batches and
augmentations an uninterrupted one would (everything is seeded from (seed, epoch)).
"""

from __future__ import annotations


import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from reid_batch import log
from reid_batch.analysis.metrics import patient_verification
from reid_batch.analysis.roles import pool_frame
from reid_batch.data.datasets import ImageDataset, patient_split, read_source
from reid_batch.layout import MODEL_FILE, REID_PREFIX, REID_RESUME_KEY
from reid_batch.manifest import Manifest, ReidTrainSpec
from reid_batch.models.reid import ReidNet, augment, embed
from reid_batch.runtime import (EpochTimer, already_committed, load_state, log_epoch, pick_device, run_store,
                                save_state, seed_everything, state_dict_bytes)

LOADER_BATCH = 128
VAL_FRACTION = 0.2
# Verification compares every pair of images: at most this many patients (a seeded sample) keep it to seconds.
VERIFY_MAX_PATIENTS = 2000


# ------------------------------------------------------------------------------------------------ the pure core


def nt_xent(first: torch.Tensor, second: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over 2B unit embeddings: view i of the first half is the positive of view i of the second."""
    z = torch.cat([first, second])
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    b = first.shape[0]
    partner = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(logits, partner)


def pair_views(patient_images: list[np.ndarray], order: np.ndarray, generator: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray]:
    """For each patient in `order`: two image positions, different studies where the patient has two or more."""
    first, second = [], []
    for patient in order:
        images = patient_images[patient]
        if len(images) >= 2:
            a, b = generator.choice(len(images), size=2, replace=False)
        else:
            a = b = 0
        first.append(images[a])
        second.append(images[b])
    return np.asarray(first), np.asarray(second)


def as_unit(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] float32 from 8-bit levels (how training images are held: a quarter of the memory) or floats."""
    return images.float().div_(255) if images.dtype == torch.uint8 else images.float()


def to_levels(images01: torch.Tensor) -> torch.Tensor:
    """[0, 1] images as 8-bit levels (exact for images read from 8-bit files)."""
    return (images01.clamp(0, 1) * 255).round_().to(torch.uint8)


def train_epoch(model: ReidNet, optimizer, images: torch.Tensor, *, patient_images: list[np.ndarray],
                settings: ReidTrainSpec, epoch: int, device: torch.device) -> float:
    """One pass over every training patient, `patients_per_batch` at a time; the mean loss. `images` are [0, 1]
    floats or 8-bit levels (N, 1, H, W), indexed by `patient_images`."""
    seed = settings.seed * 1000 + epoch
    numpy_rng = np.random.default_rng(seed)
    torch_rng = torch.Generator().manual_seed(seed)
    order = numpy_rng.permutation(len(patient_images))
    model.train()
    total, batches = 0.0, 0
    for start in range(0, len(order) - 1, settings.patients_per_batch):
        patients = order[start:start + settings.patients_per_batch]
        if len(patients) < 2:  # a contrastive batch needs a negative
            continue
        first, second = pair_views(patient_images, patients, numpy_rng)
        views = augment(as_unit(torch.cat([images[first], images[second]]).to(device)), torch_rng, settings.augment)
        embeddings = model(views)
        loss = nt_xent(embeddings[:len(patients)], embeddings[len(patients):], settings.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach())
        batches += 1
    return total / max(batches, 1)


def group_by_patient(patient_ids: pd.Series) -> list[np.ndarray]:
    """Positions of each patient's images, one array per patient (patients in order of first appearance)."""
    codes, _ = pd.factorize(patient_ids.astype(str))
    return [np.flatnonzero(codes == code) for code in range(codes.max() + 1)] if len(codes) else []


def load_grey(frame: pd.DataFrame, size: int, on_error: str, workers: int, desc: str,
              levels: bool = False) -> tuple[torch.Tensor, pd.DataFrame]:
    """(N, 1, size, size) [0, 1] images of a table's rows (8-bit levels if `levels`, converted batch by batch so
    the float copy is never held), and the rows that loaded (in that order)."""
    dataset = ImageDataset(frame.reset_index(drop=True), size=size, channels=1, on_error=on_error)
    loader = torch.utils.data.DataLoader(dataset, batch_size=LOADER_BATCH, num_workers=workers)
    images, positions = [], []
    for batch in log.progress(loader, desc=desc, total=len(loader)):
        images.append(to_levels(batch["image"]) if levels else batch["image"])
        positions.append(batch["index"].numpy())
    order = np.concatenate(positions) if positions else np.zeros(0, dtype=np.int64)
    loaded = torch.cat(images) if images else torch.zeros(0, 1, size, size, dtype=torch.uint8 if levels else None)
    return loaded, dataset.df.iloc[order].reset_index(drop=True)


def sample_patients(frame: pd.DataFrame, count: int | None, seed: int) -> pd.DataFrame:
    """The rows of a seeded sample of `count` patients (all rows when there are no more than that)."""
    patients = frame["patient_id"].astype(str)
    unique = pd.Series(patients.unique())
    if count is None or len(unique) <= count:
        return frame
    chosen = set(unique.sample(n=count, random_state=seed))
    return frame[patients.isin(chosen)]


def verification(model: ReidNet, images01: torch.Tensor, patients: pd.Series, device, seed: int) -> dict:
    result = patient_verification(embed(model, images01, device), patients.astype(str).tolist(), seed=seed)
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in result.__dict__.items()}


# ------------------------------------------------------------------------------------------------ the shell


def run(manifest: Manifest, target: str | None = None) -> int:
    spec = manifest.reid
    if spec is None or spec.train is None:
        log.event("train_reid_skipped", reason="no reid section" if spec is None else "reid.checkpoint is given")
        return 0
    store = run_store(manifest)
    if already_committed(store, REID_PREFIX, REID_RESUME_KEY, "train_reid"):
        return 0
    settings = spec.train
    device = pick_device(manifest)
    workers = manifest.compute.num_workers

    source = manifest.source("public")
    frame = read_source(source.format, source.root, **({"csv_name": source.csv} if source.csv else {}))
    train_frame, val_frame = patient_split(frame, VAL_FRACTION, manifest.data.split_seed)
    train_frame = sample_patients(train_frame, settings.max_patients, settings.seed)
    val_frame = sample_patients(val_frame, VERIFY_MAX_PATIENTS, settings.seed)
    train_x, train_frame = load_grey(train_frame, spec.image_size, source.on_error, workers, "reid training images",
                                     levels=True)
    val_x, val_frame = load_grey(val_frame, spec.image_size, source.on_error, workers, "reid validation images")
    patient_images = group_by_patient(train_frame["patient_id"])
    log.event("train_reid_data", train_images=len(train_frame), train_patients=len(patient_images),
              val_images=len(val_frame), val_patients=int(val_frame["patient_id"].nunique()))

    seed_everything(settings.seed)
    model = ReidNet(spec.arch, spec.embedding_dim, spec.width).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs)
    history: list[dict] = []
    first_epoch = 0
    state = load_state(store, REID_RESUME_KEY)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        history, first_epoch = list(state["history"]), int(state["epoch"]) + 1
        log.event("train_reid_resumed", from_epoch=first_epoch)

    for epoch in log.progress(range(first_epoch, settings.epochs), desc="re-identification epochs",
                              total=settings.epochs - first_epoch):
        with EpochTimer() as timer:
            loss = train_epoch(model, optimizer, train_x, patient_images=patient_images, settings=settings, epoch=epoch,
                               device=device)
        schedule.step()
        row = {"epoch": epoch, "loss": loss, "seconds": timer.seconds}
        if epoch == settings.epochs - 1 or (epoch + 1) % settings.validate_every == 0:
            held_out = verification(model, val_x, val_frame["patient_id"], device, settings.seed)
            row.update({"val_auc": held_out["auc"], "val_rank1": held_out["rank1"]})
        history.append(row)
        log_epoch("train_reid", spec.arch, **row)
        save_state(store, REID_RESUME_KEY, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                            "schedule": schedule.state_dict(), "epoch": epoch, "history": history})

    record = {
        "arch": spec.arch, "image_size": spec.image_size, "embedding_dim": spec.embedding_dim,
        "train": settings.model_dump(mode="json"), "train_images": len(train_frame),
        "train_patients": len(patient_images), "history": history,
        "verification": {"public_heldout": verification(model, val_x, val_frame["patient_id"], device, settings.seed)},
    }
    private = pool_frame(manifest, "private", labelled_only=False)
    if private is not None:
        # Validation only: how well the attacker's embedding tells apart patients it never saw, of the private pool.
        frame, on_error = private
        counts = frame["patient_id"].astype(str).value_counts()
        repeated = sample_patients(frame[frame["patient_id"].astype(str).map(counts) >= 2], VERIFY_MAX_PATIENTS,
                                   settings.seed)
        images, repeated = load_grey(repeated, spec.image_size, on_error, workers, "reid private images")
        record["verification"]["private"] = verification(model, images, repeated["patient_id"], device, settings.seed)
    with store.committed(REID_PREFIX, {"stage": "train-reid"}) as out:
        out.write_bytes(MODEL_FILE, state_dict_bytes(model.state_dict()))
        out.write_json("metrics.json", record)
    store.delete(REID_RESUME_KEY)
    log.event("train_reid_done", **{f"{pool}_{k}": v["auc" if k == "auc" else "rank1"]
                                    for pool, v in record["verification"].items() for k in ("auc", "rank1")})
    return 0
