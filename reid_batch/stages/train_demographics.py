"""Recipe: the multi-task demographic model (DenseNet121 -> age regression + sex logit), as in the study.

Trained on the public pool (NIH in the study, its synthetic stand-in by default): patient-grouped 80/20 split,
rare age bins (0-20, 20-30, ..., 90-100) oversampled with WeightedRandomSampler (inverse frequency), images
resized to `demographics.image_size`, Adam lr 1e-4, weight decay 1e-4, batch 32, keep the best validation R^2.
Sex is a logit trained with BCEWithLogits; the sigmoid is applied once, at prediction.

Outputs under <run>/demographics/: model.safetensors, metrics.json (age MAE, RMSE, R^2; sex accuracy, AUC),
age_distribution.png and sex_confusion.png (the study's Figures 2 and 3), val_predictions.csv.
"""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
import torch
from sklearn.metrics import ConfusionMatrixDisplay, mean_absolute_error, mean_squared_error, r2_score, roc_auc_score
from torch import nn

from reid_batch import log
from reid_batch.artifacts import demographic_arch
from reid_batch.data.datasets import ImageDataset, patient_split, read_source
from reid_batch.formats import figure_png
from reid_batch.layout import DEMOGRAPHICS_PREFIX, DEMOGRAPHICS_RESUME_KEY, MODEL_FILE
from reid_batch.manifest import Manifest
from reid_batch.models.demographics import DemographicNet, to_model_input
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

AGE_BIN_EDGES = np.array([0, 20, 30, 40, 50, 60, 70, 80, 90, 100, np.inf])
# Years are divided by this inside the loss only: same minimiser as MSE in years, better conditioned.
AGE_SCALE = 20.0
def age_bin_weights(ages: np.ndarray) -> np.ndarray:
    """Per-sample sampling weight = 1 / (count of its age bin): each bin drawn about equally often."""
    bins = np.digitize(ages, AGE_BIN_EDGES[1:-1])
    counts = np.bincount(bins, minlength=len(AGE_BIN_EDGES) - 1)
    return 1.0 / counts[bins]


def demographic_metrics(age_pred: np.ndarray, age_true: np.ndarray, sex_prob: np.ndarray, sex_true: np.ndarray) -> dict:
    return {
        "age_mae": float(mean_absolute_error(age_true, age_pred)),
        "age_rmse": float(np.sqrt(mean_squared_error(age_true, age_pred))),
        "age_r2": float(r2_score(age_true, age_pred)),
        "sex_accuracy": float(((sex_prob >= 0.5) == (sex_true >= 0.5)).mean()),
        "sex_auc": float(roc_auc_score(sex_true, sex_prob)) if len(np.unique(sex_true)) == 2 else float("nan"),
    }


def build_model(arch: str) -> nn.Module:

    return DemographicNet(**demographic_arch(arch))


@torch.inference_mode()
def predict(model: nn.Module, images01: torch.Tensor, device: torch.device, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Age in years and sex probability (P(male)) for (N, 1, H, W) images in [0, 1]."""
    model.eval()
    ages, probs = [], []
    for start in range(0, len(images01), batch_size):
        out = model.predict(to_model_input(images01[start : start + batch_size].to(device)))
        ages.append(out["age"].float().cpu())
        probs.append(out["sex_prob"].float().cpu())
    return torch.cat(ages).numpy(), torch.cat(probs).numpy()


def _load_split(frame: pd.DataFrame, size: int, on_error: str, workers: int):
    loader = torch.utils.data.DataLoader(ImageDataset(frame, size=size, channels=1, on_error=on_error), batch_size=64, num_workers=workers)
    images, ages, sexes = [], [], []
    for batch in loader:
        images.append(batch["image"])
        ages.append(torch.as_tensor(batch["age"]).float())
        sexes.append(torch.as_tensor(batch["sex"]).float())
    return torch.cat(images), torch.cat(ages), torch.cat(sexes)


def _plots(age_pred, age_true, sex_prob, sex_true) -> tuple[bytes, bytes]:
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pyplot only after the Agg backend is chosen

    figure, axis = plt.subplots(figsize=(6, 4))
    bins = np.arange(0, 101, 10)
    axis.hist([age_true, age_pred], bins=bins, label=["ground truth", "predicted"], color=["#555", "#c44"])
    axis.set(xlabel="age (years)", ylabel="validation images", title="Age: predicted vs true distribution")
    axis.legend()
    age_png = figure_png(figure, dpi=100, bbox_inches="tight")
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(4, 4))
    ConfusionMatrixDisplay.from_predictions(
        np.where(sex_true >= 0.5, "M", "F"), np.where(sex_prob >= 0.5, "M", "F"), labels=["F", "M"], ax=axis, colorbar=False
    )
    axis.set_title("Sex: confusion matrix (validation)")
    sex_png = figure_png(figure, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return age_png, sex_png


def run(manifest: Manifest, target: str | None = None) -> int:
    spec = manifest.demographics
    if spec.train is None:
        log.event("train_demographics_skipped", reason="demographics.checkpoint is given")
        return 0
    store = run_store(manifest)
    prefix = DEMOGRAPHICS_PREFIX
    resume_key = DEMOGRAPHICS_RESUME_KEY
    if already_committed(store, prefix, resume_key, "train_demographics"):
        return 0
    train_cfg = spec.train
    device = pick_device(manifest)
    source = manifest.source("public")
    frame = read_source(source.format, source.root, **({"csv_name": source.csv} if source.csv else {}))
    frame = frame[frame["age"].notna() & frame["sex"].isin(["M", "F"])].reset_index(drop=True)
    train_frame, val_frame = patient_split(frame, 0.2, manifest.data.split_seed)
    if train_cfg.max_images is not None and len(train_frame) > train_cfg.max_images:
        train_frame = train_frame.sample(n=train_cfg.max_images, random_state=train_cfg.seed).sort_values("path")
    log.event("train_demographics_data", train_images=len(train_frame), val_images=len(val_frame))
    workers = manifest.compute.num_workers
    train_x, train_age, train_sex = _load_split(train_frame, spec.image_size, source.on_error, workers)
    val_x, val_age, val_sex = _load_split(val_frame, spec.image_size, source.on_error, workers)

    seed_everything(train_cfg.seed)
    model = build_model(spec.arch).to(device)
    with torch.no_grad():
        model.age_head.bias.fill_(float(train_age.mean()))  # start at the mean age, not 0 years
    optimizer = torch.optim.Adam(model.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    weights = torch.as_tensor(age_bin_weights(train_age.numpy()), dtype=torch.double)

    state = load_state(store, resume_key)
    history: list[dict] = []
    best = {"r2": -np.inf, "epoch": -1, "weights": None}
    first_epoch = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history, first_epoch = list(state["history"]), int(state["epoch"]) + 1
        best = {"r2": float(state["best_r2"]), "epoch": int(state["best_epoch"]), "weights": state["best_weights"]}
        log.event("train_demographics_resumed", from_epoch=first_epoch)

    mse, bce = nn.MSELoss(), nn.BCEWithLogitsLoss()
    for epoch in log.progress(range(first_epoch, train_cfg.epochs), desc="demographic model epochs",
                              total=train_cfg.epochs - first_epoch):
        torch.manual_seed(train_cfg.seed * 1000 + epoch)
        sampler = torch.utils.data.WeightedRandomSampler(
            weights, num_samples=len(weights), replacement=True,
            generator=torch.Generator().manual_seed(train_cfg.seed * 1000 + epoch),
        )
        order = torch.as_tensor(list(sampler))
        model.train()
        total = 0.0
        with EpochTimer() as timer:
            for start in range(0, len(order), train_cfg.batch_size):
                index = order[start : start + train_cfg.batch_size]
                age_out, sex_logit = model(to_model_input(train_x[index].to(device)))
                loss = mse(age_out / AGE_SCALE, train_age[index].to(device) / AGE_SCALE) + bce(sex_logit, train_sex[index].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(index)
        age_pred, sex_prob = predict(model, val_x, device)
        metrics = demographic_metrics(age_pred, val_age.numpy(), sex_prob, val_sex.numpy())
        row = {"epoch": epoch, "loss": total / len(order), "seconds": timer.seconds, **metrics}
        history.append(row)
        log_epoch("train_demographics", spec.arch, **row)
        if metrics["age_r2"] > best["r2"]:
            best = {"r2": metrics["age_r2"], "epoch": epoch,
                    "weights": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
        save_state(store, resume_key, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch, "history": history,
            "best_r2": best["r2"], "best_epoch": best["epoch"], "best_weights": best["weights"],
        })

    model.load_state_dict(best["weights"])
    age_pred, sex_prob = predict(model, val_x, device)
    metrics = demographic_metrics(age_pred, val_age.numpy(), sex_prob, val_sex.numpy())
    age_png, sex_png = _plots(age_pred, val_age.numpy(), sex_prob, val_sex.numpy())
    predictions = val_frame[["path", "patient_id", "age", "sex"]].assign(age_pred=age_pred, sex_prob=sex_prob)
    record = {"arch": spec.arch, "image_size": spec.image_size, "kept_epoch": best["epoch"], "val": metrics,
              "train_images": len(train_frame), "val_images": len(val_frame), "history": history}
    with store.committed(prefix, {"stage": "train-demographics"}) as out:
        out.write_bytes(MODEL_FILE, state_dict_bytes(model.state_dict()))
        out.write_json("metrics.json", record)
        out.write_bytes("age_distribution.png", age_png)
        out.write_bytes("sex_confusion.png", sex_png)
        out.write_bytes("val_predictions.csv", predictions.to_csv(index=False).encode())
    store.delete(resume_key)
    log.event("train_demographics_done", **metrics)
    return 0
