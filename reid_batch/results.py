"""The typed records that cross from `evaluate` and `calibrate` to `report`: one target's evaluation (metrics.json)
and its calibration (calibration.json), serialised to and read from JSON here and nowhere else.

Each record is a dataclass. Reading one checks every field against its type up front, so that a file written by
another version of reid-batch, or edited by hand, is refused with an error naming the file and the field instead of
a report that quietly shows "n/a". A field with a default of None is optional: absent from the JSON when it is None.
Sections whose shape belongs to one analysis (a control's payload, the settings echoed back, package versions) are
kept as plain JSON objects (`dict`); everything the verdict reads is typed. `SCHEMA_VERSION` changes whenever a
field changes meaning; a file of another version is refused rather than misread.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from reid_batch.errors import InputError

SCHEMA_VERSION = 1
RERUN = {"Evaluation": "evaluate", "Calibration": "calibrate"}

R = TypeVar("R", bound="Record")


class RecordError(InputError):
    """A results file that does not hold the record it should: a missing, unexpected or mistyped field."""


@dataclass(kw_only=True)
class Record:
    """Base of every results record: strict reading from JSON (`from_json`) and writing back (`to_json`)."""

    @classmethod
    def from_json(cls: type[R], data: Any, where: str, path: str = "") -> R:
        if not isinstance(data, dict):
            raise RecordError(f"field '{path or '.'}' must be an object, not {type(data).__name__}", where=where)
        hints = typing.get_type_hints(cls)
        names = {f.name for f in fields(cls)}
        unexpected = sorted(set(data) - names)
        if unexpected:
            raise RecordError(f"unexpected field '{path}{unexpected[0]}' (this reid-batch reads schema version "
                              f"{SCHEMA_VERSION}; was the file written by another version?)", where=where)
        values = {}
        for f in fields(cls):
            if f.name not in data:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise RecordError(f"field '{path}{f.name}' is missing", where=where)
                continue
            values[f.name] = _load(hints[f.name], data[f.name], where, f"{path}{f.name}")
        record = cls(**values)
        record._read = frozenset(data)  # an optional field read as null is written back as null
        return record

    def to_json(self) -> dict:
        """The record as a JSON object: optional fields that are None are left out, unless they were read as null."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.default is None and f.name not in getattr(self, "_read", ()):
                continue
            out[f.name] = as_json(value)
        return out


def _load(kind: Any, value: Any, where: str, path: str) -> Any:
    """`value` checked against the annotation `kind` (records, unions, list[...], dict[str, ...], scalars, Any)."""
    origin, arguments = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in arguments:
                return None
            raise RecordError(f"field '{path}' must not be null", where=where)
        errors = []
        for alternative in (a for a in arguments if a is not type(None)):
            try:
                return _load(alternative, value, where, path)
            except RecordError as exc:
                errors.append(exc.message)
        raise RecordError(errors[0], where=where)
    if value is None:
        raise RecordError(f"field '{path}' must not be null", where=where)
    if isinstance(kind, type) and issubclass(kind, Record):
        return kind.from_json(value, where, f"{path}.")
    if origin is list or kind is list:
        if not isinstance(value, list):
            raise RecordError(f"field '{path}' must be a list, not {type(value).__name__}", where=where)
        item = arguments[0] if arguments else Any
        return [_load(item, v, where, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or kind is dict:
        if not isinstance(value, dict):
            raise RecordError(f"field '{path}' must be an object, not {type(value).__name__}", where=where)
        item = arguments[1] if arguments else Any
        return {k: _load(item, v, where, f"{path}.{k}") for k, v in value.items()}
    expected = {float: (int, float), int: (int,), str: (str,), bool: (bool,)}[kind]
    if not isinstance(value, expected) or (kind is not bool and isinstance(value, bool)):
        raise RecordError(f"field '{path}' must be {kind.__name__}, not {type(value).__name__}", where=where)
    return value


def as_json(value: Any) -> Any:
    """A record, or a list or dict of them, as JSON values."""
    if isinstance(value, Record):
        return value.to_json()
    if isinstance(value, list):
        return [as_json(v) for v in value]
    if isinstance(value, dict):
        return {k: as_json(v) for k, v in value.items()}
    return value


# ------------------------------------------------------------------------------------------------ the leak statistic


@dataclass(kw_only=True)
class LeakTest(Record):
    """analysis.leak.leak_test: L = AUC(attacked) - AUC(null) on the same patients, its interval and p-value."""

    leak: float
    ci: list[float] | None  # None without a bootstrap
    p_value: float | None  # None without permutations
    confidence: float | None = None
    auc_attacked: float | None = None
    auc_null: float | None = None
    tpr_at_fpr: dict[str, dict[str, float | None]] | None = None  # generator -> FPR -> TPR
    members: int | None = None
    nonmembers: int | None = None
    candidates: dict[str, int] | None = None  # generator -> candidates compared
    bootstrap: int | None = None
    permutations: int | None = None
    detected: bool | None = None


@dataclass(kw_only=True)
class SelectedLeakTest(LeakTest):
    """L of stage 2's selection: the rule applied to equal pools of both generators (`available` false when it
    selects nothing from one of them)."""

    leak: float | None = None
    ci: list[float] | None = None
    p_value: float | None = None
    available: bool
    reason: str | None = None
    pool: int
    rule: str
    selected_attacked: int
    selected_null: int
    compared: int


@dataclass(kw_only=True)
class VersusPrior(Record):
    vs_prior: LeakTest


@dataclass(kw_only=True)
class SelectedVersusPrior(Record):
    vs_prior: SelectedLeakTest


@dataclass(kw_only=True)
class LeakSummary(Record):
    """metrics.json `leak`: the study attack's L against the prior, on the target's member and non-member patients."""

    available: bool
    reason: str | None = None  # why not, when not available
    feature_space: str | None = None
    identity_sensitive: bool | None = None
    members_known_by: str | None = None
    pool: str | None = None
    nonmembers: str | None = None
    member_patients: int | None = None
    nonmember_patients: int | None = None
    images: int | None = None
    candidates: str | None = None
    raw: VersusPrior | None = None
    selected: SelectedVersusPrior | None = None
    statistic: str | None = None


@dataclass(kw_only=True)
class AttackLeak(Record):
    """One attack mode's L against the prior, and how many candidates of each generator it compared."""

    available: bool
    reason: str | None = None
    vs_prior: LeakTest | None = None
    compared: int | dict[str, int] | None = None  # ppa: its kept samples; study: per generator
    null: str | None = None


@dataclass(kw_only=True)
class Attack(Record):
    """metrics.json `attacks[mode]`: one attack mode run on the target (the study's two stages, or ppa)."""

    mode: str
    description: str
    leak: AttackLeak
    generator: str | None = None  # ppa: the generator its latents were optimised through
    kept: int | None = None
    classes: int | None = None
    kept_per_class: int | None = None
    settings: dict | None = None
    mean_confidence: float | None = None
    mean_searched_confidence: float | None = None


# ------------------------------------------------------------------------------------------------ stages 1 and 2


@dataclass(kw_only=True)
class Stage1(Record):
    """metrics.json `stage1`: entropy, PCA kurtosis and FID of the prior's, fine-tuned and reference sets."""

    sets: dict[str, dict]  # set -> images, entropy, kurtosis
    pca: dict
    fid: list[dict]
    notes: list[str]
    num_images: int
    latent_ids: str
    inception: dict | None


@dataclass(kw_only=True)
class Stage2(Record):
    """metrics.json `stage2`: the likely samples and their nearest training images."""

    likely: int
    candidates: int | None
    feature_space: str
    training_images: int
    reference_source: str | None
    ssim_mean: float | None = None
    ssim_median: float | None = None
    nn_distance_mean: float | None = None
    distinct_neighbours: int | None = None
    distinct_neighbour_patients: int | None = None


@dataclass(kw_only=True)
class Demographics(Record):
    """metrics.json `demographics`: the age/sex model on the reconstructions and their neighbours, against truth."""

    available: bool
    ground_truth: str | None = None
    reconstruction: dict | None = None  # analysis.metrics.demographic_errors
    neighbour: dict | None = None


@dataclass(kw_only=True)
class Reidentification(Record):
    """metrics.json `reidentification`: the sample vote (nearer a training image than a held-out one)."""

    available: bool
    reason: str | None = None
    rate: float | None = None
    rate_ci: list[float] | None = None
    p_value: float | None = None
    reidentified: int | None = None
    num_samples: int | None = None
    num_train: int | None = None
    num_control: int | None = None
    distinct_train_patients: int | None = None
    threshold: float | None = None
    train_pool: str | None = None
    heldout_pool: str | None = None
    heldout_images: int | None = None
    chance_rate: float | None = None
    matched_on: str | None = None
    feature_space: str | None = None
    membership_auc: float | None = None
    devices: dict | None = None


@dataclass(kw_only=True)
class Selection(Record):
    rule: str | None
    thresholds: dict | None
    counts: dict | None


@dataclass(kw_only=True)
class FinetuneSummary(Record):
    steps: int
    first_total: float | None
    last_total: float | None


@dataclass(kw_only=True)
class AttackTerms(Record):
    """The objective terms the study's attack used (finetune.json), with the fallback and the reference statistics."""

    terms: dict[str, float] | None
    configured: dict[str, float] | None
    fallback: dict | None
    reference: dict | None
    feature_target: str | None


# ------------------------------------------------------------------------------------------------ one target


@dataclass(kw_only=True)
class Evaluation(Record):
    """metrics.json: everything `evaluate` measured on one target."""

    schema_version: int
    target: str
    arch: str
    family: str
    preset: str | None
    train_pool: str
    heldout_pool: str
    role: str
    checkpoint: str | None
    target_training: dict | None  # training.json's record of how the target was trained (reid-batch targets)
    attack_terms: AttackTerms
    threat_model: str
    validation_note: str
    selection: Selection
    finetune: FinetuneSummary
    stage1: Stage1
    stage2: Stage2
    demographics: Demographics
    reidentification: Reidentification
    leak: LeakSummary
    attacks: dict[str, Attack]
    notes: list[str]
    figures: dict[str, str]
    table: str
    pairs: str
    evaluation: dict  # the manifest's evaluation settings
    software: dict[str, str | None]
    resolution: int
    identity_control: dict | None = None  # analysis.identity, on identity targets
    canaries: dict | None = None  # analysis.canaries, on canary targets
    population_shift: dict | None = None  # when evaluation.population_shift is on


# ------------------------------------------------------------------------------------------------ calibration


@dataclass(kw_only=True)
class CalibrationRow(Record):
    """One spike fraction of the calibration: how often L was detected over the repeats, and its mean."""

    fraction: float
    repeats: int
    detected: int
    detected_share: float
    covers_zero: int
    leak_mean: float
    leak_sd: float | None
    ci_low_mean: float | None
    ci_high_mean: float | None


@dataclass(kw_only=True)
class CalibrationSummary(Record):
    """The dose-response of a calibration: per fraction, the false-positive rate, the smallest detectable leak."""

    fractions: list[CalibrationRow]
    false_positive_rate: float
    null_repeats: int
    minimum_detectable_effect: float | None
    largest_fraction: float
    detect_share: float
    runs: list[dict]


@dataclass(kw_only=True)
class PPACalibration(CalibrationSummary):
    """The calibration repeated at a ppa attack's pool size."""

    candidates: int
    detected_when: str
    base_and_null: str


@dataclass(kw_only=True)
class Calibration(Record):
    """calibration.json: the spike-in calibration of one target's leak statistic."""

    schema_version: int
    available: bool
    target: str
    reason: str | None = None  # why not, when not available
    settings: dict | None = None
    candidates: int | None = None
    bootstrap: int | None = None
    member_patients: int | None = None
    nonmember_patients: int | None = None
    spiked_from: str | None = None
    spikes: str | None = None
    base_and_null: str | None = None
    feature_space: str | None = None
    fractions: list[CalibrationRow] | None = None
    false_positive_rate: float | None = None
    null_repeats: int | None = None
    minimum_detectable_effect: float | None = None
    largest_fraction: float | None = None
    detect_share: float | None = None
    runs: list[dict] | None = None
    ppa: PPACalibration | None = None


# ------------------------------------------------------------------------------------------------ reading and writing


def parse(kind: type[R], document: Any, where: str) -> R:
    """A record from a JSON document: the schema version first (a clear remedy), then every field."""
    version = document.get("schema_version") if isinstance(document, dict) else None
    if version != SCHEMA_VERSION:
        raise RecordError(f"schema version {version!r}, this reid-batch reads {SCHEMA_VERSION}: delete the folder it "
                          f"is in and run `reid-batch {RERUN[kind.__name__]}` again", where=where)
    return kind.from_json(document, where)


def record_of(kind: type[R], document: dict, where: str) -> R:
    """A record from a document just built by a stage (stamped with this schema version), checked before it is
    written: a stage never commits what the report could not read."""
    return parse(kind, {**document, "schema_version": SCHEMA_VERSION}, where)


def write(out, key: str, record: Record) -> None:
    """Write a record at `key` of a store or a commit in progress (`store.committed(...)`)."""
    out.write_json(key, record.to_json())


def read(kind: type[R], store, key: str) -> R:
    """The record at `key` of a store (metrics.json, calibration.json)."""
    where = store.uri(key)
    try:
        document = store.read_json(key)
    except ValueError as exc:
        raise RecordError(str(exc), where=where) from exc
    return parse(kind, document, where)
