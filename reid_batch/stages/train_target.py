"""Recipe: train a target classifier the way the study did (cardiomegaly vs no finding).

Presets (the study's recipes, overridable field by field in `targets[].train`):
  normal  CNN: Adam lr 1e-3, weight decay 1e-3, batch 32, 10 epochs, keep the best validation AUC.
          ViT: full fine-tune, Adam lr 1e-4, batch 64, 10 epochs, keep the best validation AUC.
  overfit 20 (CNN) or 50 (ViT) images per class, batch 1, Adam lr 1e-4, up to 30 epochs, stop as soon as
          training accuracy is 1.0; the final weights are kept (memorisation is the point). The whole model is
          trained; `freeze_backbone: true` reproduces the study's head-only overfit ViT.

Mitigations (the same data and split, one defence each):
  regularised  normal + dropout 0.5 before the classifier, AdamW with decoupled weight decay 0.05, and early
               stopping: training ends after `patience` (3) epochs without a better validation AUC.
  augmented    normal + per-image RandomResizedCrop (scale 0.7-1), rotations up to 10 degrees and brightness/
               contrast jitter 0.2 (torchvision.transforms.v2 on tensors), drawn afresh every epoch.
  dp           Opacus DP-SGD: BatchNorm -> GroupNorm (no running statistics), Poisson-sampled batches, per-sample
               gradients clipped to `max_grad_norm` (1.0), Gaussian noise calibrated so that the planned epochs
               reach `target_epsilon` at delta = 1 / training images. The accountant's epsilon for the steps
               actually taken is recorded in training.json (`privacy`). ResNets only.
Positive control (a model known to encode its patients, so a null elsewhere means something):
  identity     K patients as K classes (`train.identity`): `studies` rendered studies per patient to train on and
               `validation_studies` more to validate on (synthetic world, `phantoms.write_extra_studies`), so the
               world's own studies of these patients stay held out. Cross-entropy over K outputs; Adam lr 1e-3,
               batch 32, 15 epochs, keep the best validation accuracy. Attacking class k asks for patient k.
               `identity.defence` trains it with a mitigation's changes (regularised, augmented, groupnorm, dp as
               above): the defences measured on a model known to encode its patients.
Canaries (`train.canaries`, any preset but identity): atypical synthetic patients, each added to the
training set by its own coin flip with `d` rendered studies (`phantoms.canary_patient`, `roles.canary_sets`), after
the preset chose its images; `train_images.csv` marks them with `canary_dose`.
`patience` applies to any preset that keeps the best validation AUC. `norm: group` trains a CNN preset with GroupNorm
in place of BatchNorm and no DP: the mitigation study's control for what GroupNorm alone does to the attack.

Outputs under <run>/targets/<name>/: model.safetensors, training.json (accuracy/AUC on train and validation,
generalisation gap, history), train_images.csv (the exact training list, needed to measure what the attack
recovered), val_images.csv. Resumes after a kill from the last finished epoch.
"""

from __future__ import annotations

import io
import time
from importlib.metadata import version
from dataclasses import asdict, dataclass, replace

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from reid_batch import log
from reid_batch.analysis.metrics import classifier_intervals, classifier_metrics
from reid_batch.analysis.roles import canary_sets, identity_sets
from reid_batch.attack.generation import target_input_spec
from reid_batch.data.datasets import ImageDataset, patient_split, read_source
from reid_batch.data.phantoms import EXTRA_STUDY_FROM, WorldConfig, write_extra_studies
from reid_batch.errors import InputError
from reid_batch.layout import MODEL_FILE, TRAIN_IMAGES_FILE, target_prefix, target_resume_key
from reid_batch.manifest import Manifest, TargetSpec
from reid_batch.models.targets import build_target, to_target_input
from reid_batch.runtime import (
    already_committed,
    EpochTimer,
    load_state,
    log_epoch,
    pick_device,
    run_store,
    save_state,
    seed_everything,
    state_dict_bytes,
)


RESUME_EVERY_SECONDS = 60.0


@dataclass(frozen=True, kw_only=True)
class Recipe:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    images_per_class: int | None
    stop_at_perfect_train: bool
    keep: str  # "best_val_auc", "best_val_accuracy" or "last"
    optimizer: str = "adam"  # or "adamw" (decoupled weight decay)
    dropout: float | None = None  # dropout before the classifier; None leaves the architecture's own
    patience: int | None = None
    augment: bool = False
    norm: str = "batch"
    target_epsilon: float | None = None
    max_grad_norm: float | None = None
    accountant: str = "rdp"
    num_classes: int = 1  # one logit (binary) or K outputs (identity)


def _defended(base: Recipe, defence: str) -> Recipe:
    """The identity control's recipe with one mitigation's changes, as the mitigation presets make them."""
    if defence == "regularised":
        return replace(base, weight_decay=0.05, optimizer="adamw", dropout=0.5, patience=3)
    if defence == "augmented":
        return replace(base, augment=True)
    if defence == "groupnorm":
        return replace(base, norm="group")
    if defence == "dp":
        return replace(base, weight_decay=0.0, norm="group", max_grad_norm=1.0)
    return base


def resolve_recipe(spec: TargetSpec) -> Recipe:
    train = spec.train
    assert train is not None
    vit = spec.family == "vit"
    normal = Recipe(epochs=10, batch_size=64 if vit else 32, lr=1e-4 if vit else 1e-3,
                    weight_decay=0.0 if vit else 1e-3, images_per_class=None, stop_at_perfect_train=False,
                    keep="best_val_auc")
    if train.preset == "normal":
        base = normal
    elif train.preset == "overfit":
        base = Recipe(epochs=30, batch_size=1, lr=1e-4, weight_decay=0.0, images_per_class=50 if vit else 20,
                      stop_at_perfect_train=True, keep="last")
    elif train.preset == "regularised":
        base = replace(normal, weight_decay=0.05, optimizer="adamw", dropout=0.5, patience=3)
    elif train.preset == "augmented":
        base = replace(normal, augment=True)
    elif train.preset == "identity":
        base = replace(normal, epochs=15, batch_size=32, lr=1e-3 if not vit else 3e-4,
                       num_classes=train.identity.patients, keep="best_val_accuracy")
        base = _defended(base, train.identity.defence)
    else:
        base = replace(normal, batch_size=64, weight_decay=0.0, norm="group", max_grad_norm=1.0)
    return replace(
        base,
        epochs=train.epochs or base.epochs,
        batch_size=train.batch_size or base.batch_size,
        lr=train.lr or base.lr,
        weight_decay=base.weight_decay if train.weight_decay is None else train.weight_decay,
        images_per_class=train.images_per_class or base.images_per_class,
        dropout=base.dropout if train.dropout is None else train.dropout,
        patience=train.patience or base.patience,
        target_epsilon=train.target_epsilon,
        max_grad_norm=train.max_grad_norm or base.max_grad_norm,
        accountant=train.accountant,
        norm=train.norm or base.norm,
    )


def choose_training_images(frame: pd.DataFrame, recipe: Recipe, max_images: int | None, seed: int) -> pd.DataFrame:
    """The overfit preset trains on a few images per class; caps keep CPU demos short. Deterministic."""
    frame = frame.sort_values("path").reset_index(drop=True)
    if recipe.images_per_class is not None:
        parts = [
            group.sample(n=min(recipe.images_per_class, len(group)), random_state=seed)
            for _, group in frame.groupby("label", sort=True)
        ]
        frame = pd.concat(parts).sort_values("path").reset_index(drop=True)
    if max_images is not None and len(frame) > max_images:
        frame = frame.sample(n=max_images, random_state=seed).sort_values("path").reset_index(drop=True)
    return frame


def load_tensors(frame: pd.DataFrame, size: int, on_error: str, num_workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of a split as one (N, 1, size, size) tensor in [0, 1], plus float labels (N,): the `class` column
    where there is one (identity targets), else `label`."""
    dataset = ImageDataset(frame, size=size, channels=1, on_error=on_error)
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=num_workers)
    images, positions = [], []
    for batch in loader:
        images.append(batch["image"])
        positions.append(batch["index"].numpy())
    column = "class" if "class" in dataset.df.columns else "label"
    labels = dataset.df[column].to_numpy(dtype=np.float32)[np.concatenate(positions)] if positions else np.zeros(0)
    return torch.cat(images), torch.as_tensor(labels, dtype=torch.float32)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on one logit, cross-entropy over K outputs."""
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(logits.reshape(-1), labels)
    return F.cross_entropy(logits, labels.long())


@torch.inference_mode()
def predict_logits(model: nn.Module, images01: torch.Tensor, spec, device: torch.device, batch_size: int = 128) -> torch.Tensor:
    model.eval()
    out = []
    for start in range(0, len(images01), batch_size):
        x = to_target_input(images01[start : start + batch_size].to(device), spec)
        logits = model(x).float().cpu()
        out.append(logits.reshape(len(x), -1))
    return torch.cat(out) if out else torch.empty(0, 1)


def augmentation(size: int):
    """The augmented preset's per-image transform of [0, 1] tensors (1, H, W)."""
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.7, 1.0), ratio=(0.9, 1.1), antialias=True),
        v2.RandomRotation(10),
        v2.ColorJitter(brightness=0.2, contrast=0.2),
    ])


def _augmented(images01: torch.Tensor, transform) -> torch.Tensor:
    # One draw per image (a v2 transform on a batch would draw one crop/angle for the whole batch).
    return torch.stack([transform(image) for image in images01]).clamp(0, 1)


def set_head_dropout(model: nn.Module, p: float) -> None:
    """Dropout with probability p on the classifier's input, without changing the checkpoint's keys."""
    for name in ("fc", "classifier", "heads"):
        head = getattr(model, name, None)
        if head is None:
            continue
        if isinstance(head, nn.Sequential) and isinstance(head[0], nn.Dropout):
            head[0].p = p
        else:
            head.register_forward_pre_hook(lambda module, args: (F.dropout(args[0], p, module.training),))
        return
    raise ValueError("cannot find the classification head to put dropout before")


def train_one_epoch(model, optimizer, images01, labels, *, input_spec, batch_size, generator, device,
                    transform=None) -> float:
    model.train()
    order = torch.randperm(len(images01), generator=generator)
    total, seen = 0.0, 0
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        if len(index) == 1 < batch_size:
            # A one-image remainder: BatchNorm cannot normalise it where the deepest maps are 1x1 (small inputs).
            continue
        batch = images01[index] if transform is None else _augmented(images01[index], transform)
        x = to_target_input(batch.to(device), input_spec)
        y = labels[index].to(device)
        optimizer.zero_grad(set_to_none=True)
        try:
            logits = model(x)
        except ValueError as error:
            if "Expected more than 1 value per channel" not in str(error):
                raise
            raise InputError(f"batch size 1 cannot train this model's BatchNorm at input size {input_spec.size} "
                             "(its last feature maps are 1x1): use train.batch_size >= 2 or a larger input.size",
                             where="targets[].train.batch_size") from None
        loss = classification_loss(logits.reshape(len(index), -1), y)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(index)
        seen += len(index)
    return total / max(seen, 1)


def train_one_epoch_private(model, optimizer, loader, input_spec, device) -> float:
    """One epoch of DP-SGD over Opacus' Poisson-sampled loader (batches vary in size and may be empty)."""
    model.train()
    total, seen = 0.0, 0
    for images, labels in loader:
        if len(images) == 0:
            # Expanded-weights per-sample gradients need a non-empty batch; a skipped step is not counted by the
            # accountant either, so the recorded epsilon stays the accountant's for the steps taken.
            continue
        optimizer.zero_grad(set_to_none=True)
        x = to_target_input(images.to(device), input_spec)
        # The batch mean, as Opacus' loss_reduction "mean" expects: one logit (binary) or K (a defended identity
        # control).
        loss = classification_loss(model(x).reshape(len(images), -1), labels.to(device))
        loss.backward()
        optimizer.step()
        total += loss.item() * len(images)
        seen += len(images)
    return total / max(seen, 1)


@dataclass
class PrivateTraining:
    """Opacus' wrapped model, optimizer and loader, and its accountant."""

    engine: object
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: torch.utils.data.DataLoader
    delta: float

    def record(self, recipe: "Recipe") -> dict:
        accountant = self.engine.accountant
        history = [[float(noise), float(rate), int(steps)] for noise, rate, steps in accountant.history]
        return {
            "mechanism": "DP-SGD (Opacus)", "accountant": recipe.accountant, "target_epsilon": recipe.target_epsilon,
            "epsilon": float(accountant.get_epsilon(self.delta)) if history else 0.0, "delta": self.delta,
            "noise_multiplier": float(self.optimizer.noise_multiplier), "max_grad_norm": recipe.max_grad_norm,
            "sample_rate": history[0][1] if history else None, "steps": sum(h[2] for h in history),
            "history": history, "opacus": _opacus_version(),
        }


def _opacus_version() -> str:
    return version("opacus")


def make_private(model, optimizer, images01, labels, *, recipe: "Recipe", seed: int, where: str) -> PrivateTraining:
    from opacus import PrivacyEngine  # a slow import, paid only by DP-SGD targets
    from opacus.validators import ModuleValidator

    problems = ModuleValidator.validate(model, strict=False)
    if problems:
        raise InputError(f"the model cannot be trained with DP-SGD: {problems[0]}", where=where)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images01, labels),
                                         batch_size=min(recipe.batch_size, len(images01)),
                                         generator=torch.Generator().manual_seed(seed))
    delta = 1.0 / len(images01)
    engine = PrivacyEngine(accountant=recipe.accountant)
    private_model, private_optimizer, private_loader = engine.make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=loader, target_epsilon=recipe.target_epsilon,
        target_delta=delta, epochs=recipe.epochs, max_grad_norm=recipe.max_grad_norm,
        # "ew" (torch's expanded weights): the default backward hooks reject ResNet's in-place residual add.
        grad_sample_mode="ew")
    log.event("dp_sgd_ready", noise_multiplier=round(float(private_optimizer.noise_multiplier), 5),
              sample_rate=round(1.0 / len(private_loader), 6), delta=delta, target_epsilon=recipe.target_epsilon,
              accountant=recipe.accountant)
    return PrivateTraining(engine, private_model, private_optimizer, private_loader, delta)


def identity_split(manifest: Manifest, spec: TargetSpec) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training, validation) images of an identity target: rendered studies of its K patients, `class` = k."""
    identity = spec.train.identity
    patients = identity_sets(manifest, spec).classes
    config = WorldConfig.of(manifest.data.synthetic)
    root = manifest.data.synthetic.root
    frames = []
    for first, count in ((EXTRA_STUDY_FROM, identity.studies),
                         (EXTRA_STUDY_FROM + identity.studies, identity.validation_studies)):
        rows = write_extra_studies(root, config, patients, count, first=first)
        frame = pd.DataFrame(rows)
        frame["class"] = np.repeat(np.arange(len(patients)), count)
        frame["source"] = "synthetic-extra-studies"
        frames.append(frame)
    log.event("train_target_data", target=spec.name, preset="identity", role=identity.role,
              patients=[p.name for p in patients], train_images=len(frames[0]),
              val_images=len(frames[1]))
    return frames[0], frames[1]


def canary_training_rows(manifest: Manifest, spec: TargetSpec) -> pd.DataFrame:
    """The included canaries' training studies (`d` rendered studies each, `canary_dose` = d), labelled with their
    own class or, with `flip_label`, the other one. Added after the preset chose its images: caps such as
    images_per_class never drop a canary."""
    sets = canary_sets(manifest, spec)
    config = WorldConfig.of(manifest.data.synthetic)
    frames = []
    for patient, dose in zip(np.asarray(sets.patients, object)[sets.included], sets.doses[sets.included]):
        frame = pd.DataFrame(write_extra_studies(manifest.data.synthetic.root, config, [patient], int(dose)))
        frame["canary_dose"] = int(dose)
        frames.append(frame)
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["path", "label"])
    if sets.flip_label:
        frame["label"] = 1 - frame["label"]
    frame["source"] = "synthetic-canaries"
    log.event("train_target_canaries", target=spec.name, included=int(sets.included.sum()), of=len(sets.patients),
              images=len(frame), flip_label=sets.flip_label)
    return frame


def training_split(manifest: Manifest, spec: TargetSpec, recipe: Recipe) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training images, validation images) of the target's pool: labelled rows, split by patient, the training
    side chosen as the preset says."""
    if spec.train.preset == "identity":
        return identity_split(manifest, spec)
    source = manifest.source(spec.train.pool)
    frame = read_source(source.format, source.root, **({"csv_name": source.csv} if source.csv else {}))
    frame = frame[frame["label"].notna()].reset_index(drop=True)
    cohort = spec.train.cohort
    if cohort is not None:
        keep = pd.Series(True, index=frame.index)
        if cohort.sex is not None:
            keep &= frame["sex"] == cohort.sex
        if cohort.min_age is not None:
            keep &= frame["age"] >= cohort.min_age
        if cohort.max_age is not None:
            keep &= frame["age"] <= cohort.max_age
        log.event("train_target_cohort", target=spec.name, cohort=cohort.describe(), kept=int(keep.sum()),
                  of=len(frame))
        frame = frame[keep].reset_index(drop=True)
    if frame["patient_id"].nunique() < 2:
        raise InputError(f"{len(frame)} labelled image(s) of {frame['patient_id'].nunique()} patient(s) after the "
                         "cohort rules; training and validation need at least two patients",
                         where=f"data.{spec.train.pool} ({source.root})")
    train_frame, val_frame = patient_split(frame, manifest.data.val_fraction, manifest.data.split_seed)
    train_frame = choose_training_images(train_frame, recipe, spec.train.max_images, spec.train.seed)
    if spec.train.canaries is not None:
        train_frame = pd.concat([train_frame, canary_training_rows(manifest, spec)], ignore_index=True)
    log.event("train_target_data", target=spec.name, train_images=len(train_frame), val_images=len(val_frame),
              train_patients=train_frame["patient_id"].nunique(), recipe=asdict(recipe))
    return train_frame, val_frame


def build_model_and_optimizer(spec: TargetSpec, recipe: Recipe, device: torch.device):
    """The untrained target (seeded), its head dropout and frozen backbone as the recipe says, and its optimiser."""
    seed_everything(spec.train.seed)
    vit = spec.vit.model_dump() if spec.vit is not None else {}
    model = build_target(spec.arch, num_classes=recipe.num_classes, image_size=spec.input.size, norm=recipe.norm,
                         **vit).to(device)
    if recipe.dropout is not None:
        set_head_dropout(model, recipe.dropout)
    if spec.train.freeze_backbone:
        head = _head_parameters(model)
        for p in model.parameters():
            p.requires_grad_(any(p is h for h in head))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer_class = torch.optim.AdamW if recipe.optimizer == "adamw" else torch.optim.Adam
    return model, optimizer_class(trainable, lr=recipe.lr, weight_decay=recipe.weight_decay)


def train_target_spec(manifest: Manifest, spec: TargetSpec) -> dict:
    store = run_store(manifest)
    prefix = target_prefix(spec.name)
    resume_key = target_resume_key(spec.name)
    if already_committed(store, prefix, resume_key, "train_target", target=spec.name):
        return store.read_json(f"{prefix}/training.json")

    assert spec.train is not None
    recipe = resolve_recipe(spec)
    device = pick_device(manifest)
    source = manifest.source(spec.train.pool)
    train_frame, val_frame = training_split(manifest, spec, recipe)

    workers = manifest.compute.num_workers
    train_x, train_y = load_tensors(train_frame, spec.input.size, source.on_error, workers)
    val_x, val_y = load_tensors(val_frame, spec.input.size, source.on_error, workers)
    input_spec = target_input_spec(spec)

    model, optimizer = build_model_and_optimizer(spec, recipe, device)

    state = load_state(store, resume_key)
    history: list[dict] = []
    best = {"value": -1.0, "epoch": -1, "weights": None}
    first_epoch = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history = list(state["history"])
        best = {"value": float(state["best_auc"]), "epoch": int(state["best_epoch"]), "weights": state["best_weights"]}
        first_epoch = int(state["epoch"]) + 1
        log.event("train_target_resumed", target=spec.name, from_epoch=first_epoch)

    private = None
    if recipe.target_epsilon is not None:
        # After loading any resume state: Opacus wraps this model and optimizer, and the accountant's history
        # continues from the saved one, so a resumed run spends exactly the budget an uninterrupted one would.
        where = f"targets[{manifest.targets.index(spec)}].train"
        private = make_private(model, optimizer, train_x, train_y, recipe=recipe, seed=spec.train.seed, where=where)
        if state is not None:
            private.engine.accountant.history = [tuple(h) for h in state.get("accountant", [])]
    transform = augmentation(spec.input.size) if recipe.augment else None
    plain_model = model  # the unwrapped network: what is evaluated, kept and saved

    last_saved = time.monotonic()
    for epoch in log.progress(range(first_epoch, recipe.epochs), desc=f"{spec.name} epochs",
                              total=recipe.epochs - first_epoch):
        # Seeding from (seed, epoch) makes a resumed run draw exactly the batches an uninterrupted one would.
        torch.manual_seed(spec.train.seed * 1000 + epoch)
        order_generator = torch.Generator().manual_seed(spec.train.seed * 1000 + epoch)
        with EpochTimer() as timer:
            if private is not None:
                private.loader.batch_sampler.generator = order_generator
                loss = train_one_epoch_private(private.model, private.optimizer, private.loader, input_spec, device)
            else:
                try:
                    loss = train_one_epoch(model, optimizer, train_x, train_y, input_spec=input_spec,
                                           batch_size=recipe.batch_size, generator=order_generator, device=device,
                                           transform=transform)
                except InputError as error:
                    position = [t.name for t in manifest.targets].index(spec.name)
                    raise InputError(error.message, where=f"targets[{position}].train.batch_size") from None
        train_metrics = classifier_metrics(predict_logits(plain_model, train_x, input_spec, device), train_y)
        val_metrics = classifier_metrics(predict_logits(plain_model, val_x, input_spec, device), val_y)
        row = {"epoch": epoch, "loss": loss, "seconds": timer.seconds,
               **{f"train_{k}": v for k, v in train_metrics.items()}, **{f"val_{k}": v for k, v in val_metrics.items()}}
        if private is not None:
            row["epsilon"] = float(private.engine.accountant.get_epsilon(private.delta))
        history.append(row)
        log_epoch("train_target", spec.name, **row)
        kept_metric = val_metrics["accuracy" if recipe.keep == "best_val_accuracy" else "auc"]
        if recipe.keep.startswith("best_") and kept_metric > best["value"]:
            best = {"value": kept_metric, "epoch": epoch,
                    "weights": {k: v.detach().cpu().clone() for k, v in plain_model.state_dict().items()}}
        done = recipe.stop_at_perfect_train and train_metrics["accuracy"] >= 1.0
        if recipe.patience is not None and recipe.keep.startswith("best_") and epoch - best["epoch"] >= recipe.patience:
            log.event("train_target_early_stop", target=spec.name, epoch=epoch, best_epoch=best["epoch"],
                      patience=recipe.patience)
            done = True
        # Resume state is large (weights + Adam moments): write it after the first epoch of this process and
        # then at most every RESUME_EVERY_SECONDS, so many short epochs (overfit preset) are not I/O bound.
        if not done and (epoch == first_epoch or time.monotonic() - last_saved >= RESUME_EVERY_SECONDS):
            resume = {
                "model": plain_model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                "history": history, "best_auc": best["value"], "best_epoch": best["epoch"],
                "best_weights": best["weights"],
            }
            if private is not None:
                resume["accountant"] = [list(h) for h in private.engine.accountant.history]
            save_state(store, resume_key, resume)
            last_saved = time.monotonic()
        if done:
            if recipe.stop_at_perfect_train:
                log.event("train_target_memorised", target=spec.name, epoch=epoch)
            break

    model = plain_model
    if recipe.keep.startswith("best_") and best["weights"] is not None:
        model.load_state_dict(best["weights"])
        kept_epoch = best["epoch"]
    else:
        kept_epoch = history[-1]["epoch"]
    train_metrics = classifier_metrics(predict_logits(model, train_x, input_spec, device), train_y)
    val_logits = predict_logits(model, val_x, input_spec, device)
    val_metrics = classifier_metrics(val_logits, val_y)
    # The utility's interval: validation patients unseen in training are the unit resampled (a patient's images move
    # together); where they were seen (the identity preset validates on other studies of its patients), images are.
    unseen = not set(val_frame["patient_id"].astype(str)) & set(train_frame["patient_id"].astype(str))
    val_metrics.update(classifier_intervals(val_logits, val_y, val_frame["patient_id"].astype(str).tolist()
                                            if unseen else None, manifest.evaluation.bootstrap, spec.train.seed))
    record = {
        "target": spec.name, "arch": spec.arch, "preset": spec.train.preset, "pool": spec.train.pool,
        "recipe": asdict(recipe), "kept_epoch": kept_epoch, "num_classes": recipe.num_classes,
        "train": train_metrics, "val": val_metrics,
        "generalisation_gap": {"accuracy": train_metrics["accuracy"] - val_metrics["accuracy"],
                               "auc": train_metrics["auc"] - val_metrics["auc"]},
        "train_images": len(train_frame), "val_images": len(val_frame), "history": history,
        "norm": recipe.norm, "privacy": private.record(recipe) if private is not None else None,
    }
    with store.committed(prefix, {"stage": "train-target", "target": spec.name}) as out:
        out.write_bytes(MODEL_FILE, state_dict_bytes(model.state_dict(), {"norm": recipe.norm}))
        out.write_json("training.json", record)
        out.write_bytes(TRAIN_IMAGES_FILE, _csv_bytes(train_frame))
        out.write_bytes("val_images.csv", _csv_bytes(val_frame))
    store.delete(resume_key)
    log.event("train_target_done", target=spec.name, train_accuracy=train_metrics["accuracy"],
              val_accuracy=val_metrics["accuracy"], val_auc=val_metrics["auc"], kept_epoch=kept_epoch,
              epsilon=record["privacy"]["epsilon"] if record["privacy"] else None)
    return record


def _head_parameters(model: nn.Module) -> list[nn.Parameter]:
    for name in ("fc", "heads", "classifier"):
        if hasattr(model, name):
            return list(getattr(model, name).parameters())
    raise ValueError("cannot find the classification head to leave trainable")


def _csv_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False)
    return buffer.getvalue().encode()


def run(manifest: Manifest, target: str | None = None) -> int:
    specs = [manifest.target(target)] if target else manifest.targets
    trainable = [s for s in specs if s.train is not None]
    if not trainable:
        log.event("train_target_skipped", reason="every target has a checkpoint")
    for spec in trainable:
        train_target_spec(manifest, spec)
    return 0
