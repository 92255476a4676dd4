"""Data roles: which real images are the target's training members, which are held out, and what is known of them.

The attack never reads these; evaluation and scoring do, to validate what the attack found (see evaluate's
threat model).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from reid_batch import layout
from reid_batch.data.datasets import read_source
from reid_batch.data.phantoms import WorldConfig, canary_patient, sample_patients, sex_balanced_sets
from reid_batch.errors import InputError
from reid_batch.manifest import Manifest, TargetSpec
from reid_batch.storage import input_path, run_store


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


@dataclass(frozen=True)
class IdentitySets:
    """Who an identity-class control is about. `classes[k]` is the patient class k was trained on; `scored[k]` the
    patient class k is scored against (the positive's patients, for either role); `distractors` K further patients
    the samples may land on instead. All three lists have men first, then women, and the same sex at each k."""

    classes: list
    scored: list
    distractors: list
    role: str


def identity_sets(manifest: Manifest, spec: TargetSpec) -> IdentitySets:
    """The patients of an identity-class target (preset identity), drawn from the labelled patients of its pool:
    three disjoint sex-balanced sets (positive, negative, distractors) by `train.identity.seed`."""
    identity = spec.train.identity
    pool = train_pool(spec)
    found = pool_frame(manifest, pool)
    if found is None:
        raise InputError(f"the synthetic world's {pool} pool is not on this machine (run make-phantoms first)",
                         where=f"data.synthetic.root ({manifest.data.synthetic.root})")
    labelled = set(found[0]["patient_id"].astype(str))
    patients = [p for p in sample_patients(WorldConfig.of(manifest.data.synthetic), pool)
                if p.name in labelled]
    positive, negative, distractors = sex_balanced_sets(patients, identity.patients, 3, identity.seed)
    return IdentitySets(positive if identity.role == "positive" else negative, positive, distractors, identity.role)


@dataclass(frozen=True)
class CanarySets:
    """The canaries of a target (`train.canaries`): patient i has `doses[i]` training studies if `included[i]`."""

    patients: list
    doses: np.ndarray  # (n,) int
    included: np.ndarray  # (n,) bool
    flip_label: bool


def canary_sets(manifest: Manifest, spec: TargetSpec) -> CanarySets | None:
    """Per duplication level d, `per_dose` canaries of the target's pool, each included by its own fair coin
    (seeded by `canaries.seed`); None for a target without canaries. Every target with canaries in one world uses
    the same canary patients; only the coins differ by seed."""
    canaries = spec.train.canaries if spec.train is not None else None
    if canaries is None:
        return None
    config = WorldConfig.of(manifest.data.synthetic)
    count = canaries.per_dose * len(canaries.duplicates)
    patients = [canary_patient(config, train_pool(spec), number) for number in range(count)]
    doses = np.repeat(np.asarray(canaries.duplicates, np.int64), canaries.per_dose)
    included = np.random.default_rng(canaries.seed).random(count) < 0.5
    return CanarySets(patients, doses, included, canaries.flip_label)


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


# ------------------------------------------------------------------------------------------------ membership records

NO_TRAINING_LIST = "no training list"


def patient_labels(frame: pd.DataFrame) -> pd.Series:
    """One label per patient (index: patient id as text): the most frequent label of its labelled images."""
    labelled = frame[frame["label"].notna()] if "label" in frame else frame.iloc[:0]
    if not len(labelled):
        return pd.Series(dtype=object)
    counts = labelled.groupby([labelled["patient_id"].astype(str), "label"]).size().rename("n").reset_index()
    counts = counts.sort_values(["patient_id", "n", "label"], ascending=[True, False, True])
    return counts.drop_duplicates("patient_id").set_index("patient_id")["label"]


def _listed_members(manifest: Manifest, spec: TargetSpec, pool_rows: pd.DataFrame) -> set[str]:
    """The patients a checkpoint target's `training_list` names (by `patient_id`, or by image `path` in the pool)."""
    where = f"targets[{manifest.targets.index(spec)}].training_list"
    path = input_path(spec.training_list, manifest, where)
    try:
        listed = pd.read_csv(path, dtype=str)
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read the training list: {error}", where=str(spec.training_list)) from error
    if "patient_id" in listed:
        members = set(listed["patient_id"].dropna().astype(str))
        unknown = members - set(pool_rows["patient_id"].astype(str))
        what = "patient(s)"
    elif "path" in listed:
        paths = set(listed["path"].dropna().astype(str))
        known = pool_rows[pool_rows["path"].astype(str).isin(paths)]
        unknown = paths - set(known["path"].astype(str))
        members = set(known["patient_id"].astype(str))
        what = "image(s)"
    else:
        raise InputError("the training list needs a `patient_id` or a `path` column", where=str(spec.training_list))
    if unknown:
        raise InputError(f"the training list names {len(unknown)} {what} not in data.private (e.g. "
                         f"{sorted(unknown)[:3]}); it must list what the checkpoint was trained on, in the private "
                         "pool's ids or paths", where=str(spec.training_list))
    if not members:
        raise InputError("the training list names no patient", where=str(spec.training_list))
    return members


def member_patients(manifest: Manifest, spec: TargetSpec, pool_rows: pd.DataFrame | None = None
                    ) -> tuple[set[str] | None, str]:
    """(the patients the target trained on, how that is known), or (None, why not): a trained target's training
    list, a checkpoint target's `training_list`; never guessed."""
    if spec.train is not None:
        trained = reference_images(manifest, spec)
        if trained is None:
            return None, "the target's training list is not committed"
        members = set(trained[0]["patient_id"].astype(str))
        return members, f"the target's training list ({layout.TRAIN_IMAGES_FILE}, {len(members)} patients)"
    if spec.training_list is None:
        return None, NO_TRAINING_LIST
    if pool_rows is None:
        found = pool_frame(manifest, train_pool(spec))
        if found is None:
            return None, f"the {train_pool(spec)} pool's images are not available here"
        pool_rows = found[0]
    members = _listed_members(manifest, spec, pool_rows)
    return members, f"training_list {spec.training_list} ({len(members)} patients)"


def same_label_mix(reference: pd.Series, pool: pd.Series, cap: int, seed: int) -> np.ndarray:
    """Sorted positions into `pool` (labels) of as many rows as possible, at most `cap`, whose label proportions are
    those of `reference`; labels `pool` lacks are dropped (and should be dropped from the reference too)."""
    wanted = reference.value_counts(normalize=True)
    wanted = wanted[wanted.index.isin(set(pool.tolist()))]
    if wanted.empty:
        return np.zeros(0, dtype=np.int64)
    wanted = wanted / wanted.sum()
    values = pool.to_numpy()
    available = {label: np.flatnonzero(values == label) for label in wanted.index}
    total = min(cap, min(len(available[label]) / share for label, share in wanted.items()))
    parts = []
    for offset, (label, share) in enumerate(wanted.items()):
        at = available[label]
        parts.append(at[sample_positions(len(at), int(np.floor(total * share + 1e-9)), seed + offset)])
    return np.sort(np.concatenate(parts))


def membership_records(manifest: Manifest, spec: TargetSpec, max_patients: int, seed: int
                       ) -> tuple[pd.DataFrame | None, str, str]:
    """The target's records for the leak statistic: (images, how members are known, on_error) or (None, reason, "").

    Members are the patients the target trained on (member_patients), at most `max_patients` of them (a seeded
    sample). Non-members are the other labelled patients of the same pool, at most `max_patients`, sampled so that
    their label mix (a patient's label: its most frequent) is the members'. The two sides need not be equal in
    number: the AUC's chance level does not depend on group sizes (the old nearest-neighbour vote's did), and
    measuring every member is what lets a leak spread over all training patients be seen. The images are every
    labelled image of the chosen patients, with `member` (bool) and `patient` (0-based patient index) columns.
    """
    pool = train_pool(spec)
    found = pool_frame(manifest, pool)
    if found is None:
        return None, f"the {pool} pool's images are not available here", ""
    rows, on_error = found
    members, known_by = member_patients(manifest, spec, rows)
    if members is None:
        return None, known_by, ""
    labels = patient_labels(rows)
    member_labels = labels[labels.index.isin(members)]
    other_labels = labels[~labels.index.isin(members)]
    if len(member_labels) > max_patients:
        member_labels = member_labels.iloc[sample_positions(len(member_labels), max_patients, seed)]
    other_labels = other_labels.iloc[same_label_mix(member_labels, other_labels, max_patients, seed)]
    member_labels = member_labels[member_labels.isin(set(other_labels.tolist()))]
    if len(other_labels) == 0 or len(member_labels) == 0:
        return None, f"no patient of the {pool} pool outside the training list shares a label with a member", ""
    chosen = pd.concat([pd.Series(True, index=member_labels.index), pd.Series(False, index=other_labels.index)])
    images = rows[rows["patient_id"].astype(str).isin(chosen.index)].copy()
    images["patient_id"] = images["patient_id"].astype(str)
    order = {patient: i for i, patient in enumerate(chosen.index)}
    images["patient"] = images["patient_id"].map(order).astype(np.int64)
    images["member"] = images["patient_id"].map(chosen).astype(bool)
    return images.sort_values(["patient", "path"]).reset_index(drop=True), known_by, on_error
