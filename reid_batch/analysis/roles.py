"""Data roles: which real images are the target's training members, which are held out, and what is known of them.

The attack never reads these; evaluation and scoring do, to validate what the attack found (see evaluate's
threat model).
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pandas as pd

from reid_batch import layout
from reid_batch.data.datasets import read_source
from reid_batch.manifest import Manifest, TargetSpec
from reid_batch.storage import run_store


def reference_images(manifest: Manifest, spec: TargetSpec) -> tuple[pd.DataFrame, str, str] | None:
    """(table of the target's training images, what it is, on_error) or None if no such images are known."""
    if spec.train is not None:
        store = run_store(manifest)
        key = f"{layout.target_prefix(spec.name)}/{layout.TRAIN_IMAGES_FILE}"
        if store.is_committed(layout.target_prefix(spec.name)) and store.exists(key):
            frame = pd.read_csv(io.BytesIO(store.read_bytes(key)))
            return frame, key, manifest.source(spec.train.pool).on_error
        return None
    if manifest.data.private is None:
        world = manifest.data.synthetic
        if world is None or not (Path(world.root) / "private").is_dir():
            return None  # the synthetic world lives on the machine that ran make-phantoms, maybe not this one
    source = manifest.source("private")
    frame = read_source(source.format, source.root, **({"csv_name": source.csv} if source.csv else {}))
    return frame, "data.private", source.on_error


OTHER_POOL = {"private": "control", "control": "private"}


def patient_number(patient_id) -> int | None:
    """The number in a patient id ("patient00012" -> 12, "100001" -> 100001), to join with ground_truth.csv."""
    digits = re.sub(r"\D", "", str(patient_id))
    return int(digits) if digits else None


def sex_code(values) -> np.ndarray:
    """1.0 = M, 0.0 = F, NaN unknown, from "M"/"F" (or Male/Female) strings."""
    mapping = {"M": 1.0, "MALE": 1.0, "F": 0.0, "FEMALE": 0.0}
    return np.array([mapping.get(str(v).strip().upper(), np.nan) if v is not None else np.nan for v in values],
                    dtype=np.float64)


def sample_positions(count: int, wanted: int, seed: int) -> np.ndarray:
    """A deterministic sorted subset of min(count, wanted) positions out of range(count)."""
    if wanted >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=wanted, replace=False))


def train_pool(spec: TargetSpec) -> str:
    return spec.train.pool if spec.train is not None else "private"


def pool_frame(manifest: Manifest, pool: str, labelled_only: bool = True) -> tuple[pd.DataFrame, str] | None:
    """(rows of a pool, labelled ones only unless told, on_error), or None when its images are not on this machine."""
    if getattr(manifest.data, pool) is None:
        world = manifest.data.synthetic
        if world is None or not (Path(world.root) / pool).is_dir():
            return None
    source = manifest.source(pool)
    frame = read_source(source.format, source.root, **({"csv_name": source.csv} if source.csv else {}))
    if labelled_only:
        frame = frame[frame["label"].notna()]
    frame = frame.sort_values("path").reset_index(drop=True)
    return frame, source.on_error


def world_truth(manifest: Manifest, pool: str) -> pd.DataFrame | None:
    """Per-patient ground truth of a synthetic-world pool (index: patient number), or None for real data."""
    world = manifest.data.synthetic
    if world is None or getattr(manifest.data, pool) is not None:
        return None
    path = Path(world.root) / pool / "ground_truth.csv"
    if not path.is_file():
        return None
    truth = pd.read_csv(path, usecols=["patient_id", "age", "sex", "pacemaker", "sternal_wires"])
    return truth.drop_duplicates("patient_id").set_index("patient_id")


def truth_for(patients: pd.Series, frame_rows: pd.DataFrame, truth: pd.DataFrame | None) -> pd.DataFrame:
    """age, sex, pacemaker per row: from the world's ground truth when given, else the table's age/sex columns."""
    if truth is not None:
        numbers = [patient_number(p) for p in patients]
        found = truth.reindex(numbers)
        return pd.DataFrame({"age": found["age"].to_numpy(dtype=np.float64),
                             "sex": found["sex"].astype(object).where(found["sex"].notna(), None).to_numpy(),
                             "pacemaker": found["pacemaker"].to_numpy(dtype=np.float64)})
    age = pd.to_numeric(frame_rows["age"], errors="coerce").to_numpy(dtype=np.float64) \
        if "age" in frame_rows else np.full(len(frame_rows), np.nan)
    sex = frame_rows["sex"].astype(object).where(frame_rows["sex"].notna(), None).to_numpy() \
        if "sex" in frame_rows else np.full(len(frame_rows), None, dtype=object)
    return pd.DataFrame({"age": age, "sex": sex, "pacemaker": np.full(len(frame_rows), np.nan)})


def matched_positions(train_labels: pd.Series | None, heldout_labels: pd.Series | None, seed: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Equal-size training and held-out subsets with the same label mix: sorted positions into each.

    Chance is 0.5 for both membership tests only when the two sets are alike in everything but membership; a
    class-balanced training list (the overfit preset) against a held-out set at the natural prevalence would
    favour whichever set the generator's class mix resembles. Without labels: equal sizes only.
    """
    if train_labels is None or heldout_labels is None:
        size = min(len(train_labels) if train_labels is not None else 0,
                   len(heldout_labels) if heldout_labels is not None else 0)
        return (sample_positions(len(train_labels), size, seed) if train_labels is not None else np.zeros(0, int),
                sample_positions(len(heldout_labels), size, seed + 1) if heldout_labels is not None
                else np.zeros(0, int))
    train_values, heldout_values = train_labels.to_numpy(), heldout_labels.to_numpy()
    train_parts, heldout_parts = [], []
    for label in sorted(set(train_values.tolist()) & set(heldout_values.tolist())):
        train_at, heldout_at = np.flatnonzero(train_values == label), np.flatnonzero(heldout_values == label)
        size = min(len(train_at), len(heldout_at))
        train_parts.append(train_at[sample_positions(len(train_at), size, seed)])
        heldout_parts.append(heldout_at[sample_positions(len(heldout_at), size, seed + 1)])
    if not train_parts:
        return np.zeros(0, int), np.zeros(0, int)
    return np.sort(np.concatenate(train_parts)), np.sort(np.concatenate(heldout_parts))
