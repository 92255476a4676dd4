"""What every training recipe shares: where its outputs go, which device, resumable state, metrics."""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from reid_batch import log
from reid_batch.manifest import Manifest


def run_store(manifest: Manifest):
    """The Store rooted at <output.uri>/<run_id>/ (local directory or S3 prefix)."""
    from reid_batch.storage import S3Settings, open_store

    s3 = manifest.output.s3
    settings = S3Settings(
        endpoint=s3.endpoint, region=s3.region, sse=s3.sse, allow_bucket_creation=s3.allow_bucket_creation,
        retry_max_attempts=s3.retry_max_attempts, retry_budget_s=s3.retry_budget_s,
    )
    return open_store(f"{manifest.output.uri.rstrip('/')}/{manifest.run_id}", settings)


def pick_device(manifest: Manifest) -> torch.device:
    wanted = manifest.compute.device
    if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            from reid_batch.errors import InputError

            raise InputError("CUDA was asked for but no GPU is visible", "compute.device")
        return torch.device("cuda")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_state(store, key: str, state: dict[str, Any]) -> None:
    """Write a resume checkpoint atomically; only tensors and plain containers, so it loads weights_only."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    store.write_bytes(key, buffer.getvalue())


def load_state(store, key: str) -> dict[str, Any] | None:
    if not store.exists(key):
        return None
    # Our own file, but still loaded without unpickling code: a tampered output store must not run code.
    return torch.load(io.BytesIO(store.read_bytes(key)), map_location="cpu", weights_only=True)


def state_dict_bytes(state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}, metadata=metadata)


def binary_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy (threshold 0.5 on the probability) and ROC AUC of one-logit binary predictions."""
    from sklearn.metrics import roc_auc_score

    probabilities = torch.sigmoid(logits.float()).numpy()
    y = labels.numpy().astype(int)
    accuracy = float(((probabilities >= 0.5).astype(int) == y).mean()) if len(y) else float("nan")
    auc = float(roc_auc_score(y, probabilities)) if len(np.unique(y)) == 2 else float("nan")
    return {"accuracy": accuracy, "auc": auc}


@dataclass
class EpochTimer:
    """Wall time per epoch, for the training record."""

    started: float = 0.0

    def __enter__(self):
        import time

        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        import time

        self.seconds = time.perf_counter() - self.started
        return False


def log_epoch(kind: str, model: str, **metrics) -> None:
    log.event(f"{kind}_epoch", model=model, **{k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()})
