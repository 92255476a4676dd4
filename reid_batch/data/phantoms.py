"""A deterministic world of synthetic chest X-rays of known patients, written in the real dataset layouts.

It is the default data of the demo and of every test: the private pool stands in for CheXpert (the target model's
training data), the public pool for NIH ChestX-ray14 (prior / demographics data) and the control pool for held-out
CheXpert patients. Because each patient's identity (body habitus, lung and heart shape, ribs, clavicles, devices, age,
sex) is persistent across studies and written to ``ground_truth.csv``, re-identification of reconstructions can be
scored exactly.

Coordinates: every shape is defined in anatomical coordinates x, y in [-1, 1] (x to the image right = the patient's
left in a PA view, y downwards); a study's pose maps them onto the pixel grid. Brightness follows radiographic
convention: 0 = black (air, lungs), 1 = white (bone, metal).

Layout written by :func:`write_world` under ``root``::

    world.json                                   config, counts, generator version
    private/  control/                           CheXpert layout
        CheXpert-v1.0-small/train.csv, valid.csv
        CheXpert-v1.0-small/{train,valid}/patientNNNNN/studyK/view1_frontal.jpg (view2_lateral.jpg)
        ground_truth.csv
    public/                                      NIH ChestX-ray14 layout
        Data_Entry_2017.csv
        images/PPPPPPPP_FFF.png
        ground_truth.csv
"""

from __future__ import annotations

import csv
import json
import math
import multiprocessing
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from reid_batch import log
from reid_batch.errors import InputError

# Bump whenever any change alters a written byte: an existing world of another version is refused, never mixed.
GENERATOR_VERSION = 1

POOLS = ("private", "public", "control")
_POOL_CODE = {"private": 1, "public": 2, "control": 3}
# Fixed id ranges per pool keep ids stable when another pool's size changes and keep CheXpert's 5-digit
# ``patientNNNNN`` and NIH's 8-digit ``Patient ID`` formats valid.
_ID_BASE = {"private": 1, "control": 60_001, "public": 100_001}
_ID_CAPACITY = {"private": 60_000, "control": 39_999, "public": 899_999}

CHEXPERT_DIR = "CheXpert-v1.0-small"
CHEXPERT_LABELS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
    "Support Devices",
)
CHEXPERT_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA") + CHEXPERT_LABELS
# The real header: the two bracketed pairs split into four CSV columns exactly as in Data_Entry_2017.csv.
NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
NIH_CSV = "Data_Entry_2017.csv"

# Share of CheXpert patients whose studies go to valid.csv (the real split is ~0.1% but the pools here are small).
VALID_FRACTION = 0.10
# Per study, the chance of a row that the cohort rule must drop (see Study.cohort_variant).
_VARIANT_RATES = {"uncertain": 0.025, "other_finding": 0.025, "unknown_sex": 0.02}
LATERAL_RATE = 0.08
_CHUNK_PATIENTS = 25


# ====================================================================================================================
# Configuration and identities


@dataclass(frozen=True)
class WorldConfig:
    """What to generate. The same config (``workers`` aside) always yields byte-identical files.

    seed: any int >= 0. image_size: square side in pixels, 32..1024. *_patients: 0.. the pool's id capacity
    (private 60,000; control 39,999; public 899,999), private >= 1. max_studies_per_patient: 1..20 (each patient has
    1..max studies, skewed towards max). device_rate: 0..1, share of patients with a pacemaker and/or sternal wires
    (more likely with age). workers: 1..64 processes; does not change any output.
    """

    seed: int = 0
    image_size: int = 128
    private_patients: int = 600
    public_patients: int = 1400
    control_patients: int = 300
    max_studies_per_patient: int = 3
    device_rate: float = 0.15
    workers: int = 2

    def __post_init__(self) -> None:
        def check(name: str, ok: bool, rule: str) -> None:
            if not ok:
                raise InputError(f"must be {rule}, got {getattr(self, name)!r}", where=name)

        for name in ("seed", "image_size", "private_patients", "public_patients", "control_patients",
                     "max_studies_per_patient", "workers"):
            check(name, isinstance(getattr(self, name), int) and not isinstance(getattr(self, name), bool),
                  "an integer")
        check("seed", self.seed >= 0, ">= 0")
        check("image_size", 32 <= self.image_size <= 1024, "in 32..1024")
        check("private_patients", 1 <= self.private_patients <= _ID_CAPACITY["private"],
              f"in 1..{_ID_CAPACITY['private']}")
        for pool in ("public", "control"):
            check(f"{pool}_patients", 0 <= getattr(self, f"{pool}_patients") <= _ID_CAPACITY[pool],
                  f"in 0..{_ID_CAPACITY[pool]}")
        check("max_studies_per_patient", 1 <= self.max_studies_per_patient <= 20, "in 1..20")
        check("device_rate", isinstance(self.device_rate, (int, float)) and 0.0 <= self.device_rate <= 1.0,
              "a number in 0..1")
        check("workers", 1 <= self.workers <= 64, "in 1..64")

    @classmethod
    def of(cls, section) -> "WorldConfig":
        """The world a manifest's `data.synthetic` section describes (any object with these fields)."""
        return cls(**{name: getattr(section, name) for name in (
            "seed", "image_size", "private_patients", "public_patients", "control_patients",
            "max_studies_per_patient")})

    def patients_in(self, pool: str) -> int:
        return getattr(self, f"{_check_pool(pool)}_patients")

    def identity(self) -> dict:
        """The fields that determine the output (``workers`` only changes speed)."""
        return {k: v for k, v in asdict(self).items() if k != "workers"}


@dataclass(frozen=True)
class Patient:
    """One synthetic patient; every field is persistent across the patient's studies.

    Lengths are in anatomical units (the image spans -1..1). patient_id is globally unique (private 1.., control
    60001.., public 100001..); index is 0-based within the pool; split "train"/"valid" (public: always "train");
    n_studies 1..max_studies_per_patient. Ranges: age 18..90 years; sex "M"/"F";
    thorax_half_width 0.58..0.80 (inner rib margin, half of the thorax width that CTR divides by); body_fat 0.04..0.20;
    shoulder_half_width 0.62..0.98; lung_top -0.72..-0.52 (apex); right/left_diaphragm 0.30..0.55 (dome base, the left
    one lower); lung_asymmetry -0.06..0.06 (>0: right lung wider); mediastinum_half_width 0.07..0.11;
    ctr 0.34..0.70 (heart width / thorax width; > 0.5 is cardiomegaly); heart_half_height 0.20..0.34;
    heart_right_share 0.28..0.44 (share of the heart width right of the midline, i.e. image left);
    rib_spacing 0.085..0.125; rib_curvature 0.25..0.50; clavicle_angle_deg 4..26; bone_density 0.30..1.10
    (falls with age); aortic_knob_radius 0.045..0.11 (grows with age); aortic_calcification 0..1 (only past ~45 y);
    breast_size 0 (M) or 0.6..1.0 (F); vessel_phase_right/left 0..2pi and texture_seed (0..2**31-2) fix the
    persistent lung-marking pattern.
    """

    patient_id: int
    pool: str
    index: int
    split: str
    n_studies: int
    age: int
    sex: str
    ctr: float
    thorax_half_width: float
    body_fat: float
    shoulder_half_width: float
    lung_top: float
    right_diaphragm: float
    left_diaphragm: float
    lung_asymmetry: float
    mediastinum_half_width: float
    heart_half_height: float
    heart_right_share: float
    rib_spacing: float
    rib_curvature: float
    clavicle_angle_deg: float
    bone_density: float
    aortic_knob_radius: float
    aortic_calcification: float
    breast_size: float
    pacemaker: bool
    sternal_wires: bool
    vessel_phase_right: float
    vessel_phase_left: float
    texture_seed: int

    @property
    def label(self) -> int:
        """1 = cardiomegaly (CTR > 0.5), 0 = no finding."""
        return int(self.ctr > 0.5)

    @property
    def name(self) -> str:
        """The id as the CheXpert layout's folders, and so read_chexpert's patient_id, spell it: "patient00012"."""
        return f"patient{self.patient_id:05d}"


@dataclass(frozen=True)
class Study:
    """One study's acquisition: pose, inspiration, exposure and noise, plus what its CSV rows look like.

    rotation_deg -6..6; shift_x, shift_y -0.08..0.08; scale 0.92..1.08; inspiration -0.04..0.04 (diaphragm shift);
    brightness -0.08..0.08; contrast 0.85..1.15; gamma 0.80..1.25; noise_sd 0.006..0.02 (of full scale);
    gastric_bubble 0..1. cohort_variant: "keep" or the reason the cohort rule must drop the frontal row ("uncertain":
    Cardiomegaly -1 and No Finding blank; "other_finding": another finding 1 and both 0; "unknown_sex").
    has_lateral: the study also has a lateral view (always dropped by the cohort rule).
    """

    index: int
    rotation_deg: float
    shift_x: float
    shift_y: float
    scale: float
    inspiration: float
    brightness: float
    contrast: float
    gamma: float
    noise_sd: float
    gastric_bubble: float
    view_position: str
    cohort_variant: str
    has_lateral: bool


def _check_pool(pool: str) -> str:
    if pool not in POOLS:
        raise InputError(f"unknown pool {pool!r}; expected one of {list(POOLS)}", where="pool")
    return pool


def _rng(*key: int) -> np.random.Generator:
    # Every patient and study has its own counter-based stream keyed by its coordinates, so output never depends on
    # generation order or on how work is split between processes.
    return np.random.Generator(np.random.Philox(np.random.SeedSequence([int(k) for k in key])))


def _clipped_normal(rng: np.random.Generator, mean: float, sd: float, low: float, high: float) -> float:
    return float(np.clip(rng.normal(mean, sd), low, high))


def sample_patient(config: WorldConfig, pool: str, index: int) -> Patient:
    """Patient number `index` (0-based) of `pool`; independent of every other patient."""
    rng = _rng(config.seed, _POOL_CODE[_check_pool(pool)], index, 0)
    age = int(round(18 + 72 * rng.beta(1.6, 1.4)))
    age01 = (age - 18) / 72.0
    male = bool(rng.random() < 0.55)

    # Two well-separated CTR populations, so the label is learnable from the silhouette rather than decided by a pixel.
    cardiomegaly = rng.random() < 0.30 + 0.30 * age01
    ctr = (_clipped_normal(rng, 0.575, 0.035, 0.51, 0.70) if cardiomegaly
           else _clipped_normal(rng, 0.435, 0.030, 0.34, 0.49))

    thorax = _clipped_normal(rng, 0.72 if male else 0.655, 0.03, 0.58, 0.80)
    body_fat = _clipped_normal(rng, 0.09 if male else 0.12, 0.03, 0.04, 0.20)
    shoulder = float(min(0.98, thorax + body_fat + _clipped_normal(rng, 0.16 if male else 0.06, 0.025, 0.0, 0.25)))
    right_diaphragm = _clipped_normal(rng, 0.40, 0.035, 0.30, 0.50)
    left_diaphragm = float(min(0.55, right_diaphragm + _clipped_normal(rng, 0.05, 0.015, 0.0, 0.1)))

    any_device = rng.random() < min(1.0, config.device_rate * (0.3 + 1.4 * age01))
    device_kind = rng.random()
    pacemaker = bool(any_device and device_kind < 0.70)
    sternal_wires = bool(any_device and device_kind >= 0.55)

    n_studies = 1 + int(rng.binomial(config.max_studies_per_patient - 1, 0.65))
    split = "valid" if pool != "public" and rng.random() < VALID_FRACTION else "train"

    return Patient(
        patient_id=_ID_BASE[pool] + index,
        pool=pool,
        index=index,
        split=split,
        n_studies=n_studies,
        age=age,
        sex="M" if male else "F",
        ctr=round(ctr, 4),
        thorax_half_width=round(thorax, 4),
        body_fat=round(body_fat, 4),
        shoulder_half_width=round(shoulder, 4),
        lung_top=round(_clipped_normal(rng, -0.62, 0.035, -0.72, -0.52), 4),
        right_diaphragm=round(right_diaphragm, 4),
        left_diaphragm=round(left_diaphragm, 4),
        lung_asymmetry=round(_clipped_normal(rng, 0.0, 0.025, -0.06, 0.06), 4),
        mediastinum_half_width=round(_clipped_normal(rng, 0.09, 0.01, 0.07, 0.11), 4),
        heart_half_height=round(_clipped_normal(rng, 0.26, 0.025, 0.20, 0.34), 4),
        heart_right_share=round(_clipped_normal(rng, 0.36, 0.03, 0.28, 0.44), 4),
        rib_spacing=round(_clipped_normal(rng, 0.105, 0.008, 0.085, 0.125), 4),
        rib_curvature=round(_clipped_normal(rng, 0.38, 0.05, 0.25, 0.50), 4),
        clavicle_angle_deg=round(_clipped_normal(rng, 14.0, 4.0, 4.0, 26.0), 2),
        # The strongest age cue: bone density (and so bone brightness) falls steadily with age.
        bone_density=round(_clipped_normal(rng, 1.0 - 0.68 * age01 + (0.03 if male else 0.0), 0.04, 0.30, 1.10), 4),
        aortic_knob_radius=round(_clipped_normal(rng, 0.05 + 0.04 * age01, 0.005, 0.045, 0.11), 4),
        aortic_calcification=round(float(np.clip((age - 45) / 40.0, 0.0, 1.0)) * float(rng.uniform(0.6, 1.0)), 4),
        breast_size=0.0 if male else round(float(rng.uniform(0.6, 1.0)), 4),
        pacemaker=pacemaker,
        sternal_wires=sternal_wires,
        vessel_phase_right=round(float(rng.uniform(0, 2 * math.pi)), 4),
        vessel_phase_left=round(float(rng.uniform(0, 2 * math.pi)), 4),
        texture_seed=int(rng.integers(0, 2**31 - 1)),
    )


def patient_with_id(config: WorldConfig, pool: str, patient_id: int) -> Patient:
    """The patient whose global id (as ground_truth.csv and the file names give it) is `patient_id`."""
    return sample_patient(config, pool, int(patient_id) - _ID_BASE[_check_pool(pool)])


def sample_patients(config: WorldConfig, pool: str) -> list[Patient]:
    """All patients of `pool`, in index order (ids ``_ID_BASE[pool] + index``)."""
    return [sample_patient(config, pool, i) for i in range(config.patients_in(pool))]


def sample_study(patient: Patient, study_index: int, seed: int) -> Study:
    """The acquisition of the patient's study number `study_index` (0-based) under world seed `seed`."""
    rng = _rng(seed, _POOL_CODE[patient.pool], patient.index, 1 + study_index, 0)
    variant = "keep"
    if patient.pool != "public":
        u = rng.random()
        for name, rate in _VARIANT_RATES.items():
            if u < rate:
                variant = name
                break
            u -= rate
        # valid.csv of the real release has no uncertain or blank labels.
        if variant == "uncertain" and patient.split == "valid":
            variant = "keep"
    has_lateral = patient.pool != "public" and bool(rng.random() < LATERAL_RATE)
    return Study(
        index=study_index,
        rotation_deg=round(_clipped_normal(rng, 0.0, 2.5, -6.0, 6.0), 3),
        shift_x=round(_clipped_normal(rng, 0.0, 0.03, -0.08, 0.08), 4),
        shift_y=round(_clipped_normal(rng, 0.0, 0.03, -0.08, 0.08), 4),
        scale=round(_clipped_normal(rng, 1.0, 0.03, 0.92, 1.08), 4),
        inspiration=round(_clipped_normal(rng, 0.0, 0.02, -0.04, 0.04), 4),
        brightness=round(_clipped_normal(rng, 0.0, 0.035, -0.08, 0.08), 4),
        contrast=round(_clipped_normal(rng, 1.0, 0.06, 0.85, 1.15), 4),
        gamma=round(float(np.exp(_clipped_normal(rng, 0.0, 0.08, -0.22, 0.22))), 4),
        noise_sd=round(float(rng.uniform(0.006, 0.02)), 4),
        gastric_bubble=round(float(rng.uniform(0.0, 1.0)), 4),
        view_position="AP" if rng.random() < (0.7 if patient.pool != "public" else 0.4) else "PA",
        cohort_variant=variant,
        has_lateral=has_lateral,
    )


# ====================================================================================================================
# Rendering (pure, vectorised numpy)


@lru_cache(maxsize=8)
def _pixel_centres(size: int) -> np.ndarray:
    return ((np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0).astype(np.float32)


def _pose_grid(study: Study, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Anatomical (x, y) of every output pixel: the inverse of the study's rotation, scale and shift."""
    c = _pixel_centres(size)
    u = c[None, :] - np.float32(study.shift_x)
    v = c[:, None] - np.float32(study.shift_y)
    theta = math.radians(study.rotation_deg)
    cos_t, sin_t = math.cos(theta) / study.scale, math.sin(theta) / study.scale
    x = (np.float32(cos_t) * u + np.float32(sin_t) * v).astype(np.float32)
    y = (np.float32(-sin_t) * u + np.float32(cos_t) * v).astype(np.float32)
    return x, y


def _inside(signed_distance: np.ndarray, edge: float) -> np.ndarray:
    """1 inside (distance < 0), 0 outside, a linear ramp `edge` wide between: anti-aliased at any resolution."""
    return np.clip(np.float32(0.5) - signed_distance * np.float32(1.0 / edge), 0.0, 1.0)


def _ellipse_distance(dx: np.ndarray, dy: np.ndarray, a, b) -> np.ndarray:
    """Approximate signed distance to an axis-aligned ellipse with half-axes a, b (exact on the axes)."""
    return (np.sqrt((dx / a) ** 2 + (dy / b) ** 2) - 1.0) * np.minimum(a, b)


def _segment_distance(px: np.ndarray, py: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Distance from every pixel to a polyline through `points` (n, 2), vectorised over segments."""
    a, b = points[:-1], points[1:]
    d = b - a
    length2 = np.maximum((d ** 2).sum(axis=1), 1e-12)
    qx = px[None] - a[:, 0, None, None]
    qy = py[None] - a[:, 1, None, None]
    t = np.clip((qx * d[:, 0, None, None] + qy * d[:, 1, None, None]) / length2[:, None, None], 0.0, 1.0)
    return np.sqrt(((qx - t * d[:, 0, None, None]) ** 2 + (qy - t * d[:, 1, None, None]) ** 2).min(axis=0))


@lru_cache(maxsize=256)
def _lung_texture(texture_seed: int) -> np.ndarray:
    """The patient's persistent lung-marking field: a smooth random 14 x 14 grid over the anatomical square."""
    field = np.random.Generator(np.random.Philox(texture_seed)).standard_normal((14, 14))
    return ndimage.gaussian_filter(field, 0.8).astype(np.float32) * 2.0


def _frontal_intensity(p: Patient, s: Study, x: np.ndarray, y: np.ndarray, px: float) -> tuple[np.ndarray, dict]:
    """Noise-free frontal attenuation image in [0, 1] (before exposure) and the anatomical masks."""
    f32 = np.float32
    edge = 1.5 * px
    ax = np.abs(x)
    left = x < 0  # image left = patient's right
    m = p.mediastinum_half_width
    thorax_side = np.where(left, p.thorax_half_width * (1 + p.lung_asymmetry),
                           p.thorax_half_width * (1 - p.lung_asymmetry)).astype(f32)
    diaphragm = np.where(left, p.right_diaphragm, p.left_diaphragm).astype(f32) + f32(s.inspiration)

    # Body: torso with straight-ish sides, shoulders, neck. Soft tissue is thickest in the middle.
    body_half = p.thorax_half_width + p.body_fat
    torso_r = np.sqrt(np.sqrt((x / f32(body_half)) ** 4 + ((y - f32(0.3)) / f32(1.2)) ** 4))
    torso = _inside((torso_r - 1) * f32(body_half), edge)
    # Shoulders slope down from the neck and round off over the humeral heads.
    shoulders = _inside(_ellipse_distance(x, y + f32(0.5) - f32(0.14) * ax, p.shoulder_half_width, 0.3), edge)
    neck = _inside(ax - f32(0.2), edge) * (y < -0.55)
    body = np.maximum(np.maximum(torso, shoulders), neck)
    thickness = np.clip(1.0 - (x / f32(max(body_half, p.shoulder_half_width))) ** 2, 0.0, 1.0)

    # Lungs: an ellipse from apex to diaphragm, floored by a dome that leaves sharp costophrenic angles.
    side = np.where(left, f32(-1), f32(1))
    lung_cx = side * (m + thorax_side) / 2
    lung_a = (thorax_side - m) / 2
    lung_b = diaphragm - f32(p.lung_top)
    lung_outline = _inside(_ellipse_distance(x - lung_cx, y - diaphragm, lung_a, lung_b), edge)
    dome_rel = np.clip((x - lung_cx + side * lung_a * f32(0.2)) / lung_a, -1.0, 1.0)
    dome_y = diaphragm - f32(0.11) * (1 - dome_rel ** 2)
    lung = lung_outline * _inside(y - dome_y, edge)

    # Heart: two half-ellipses meeting at the midline so its silhouette width is exactly ctr * thorax width.
    heart_width = p.ctr * 2 * p.thorax_half_width
    heart_a = np.where(left, heart_width * p.heart_right_share, heart_width * (1 - p.heart_right_share)).astype(f32)
    # Sheared so the long axis points down to the apex on the left (image right); a shear keeps the horizontal extent.
    heart_cy = (p.right_diaphragm + p.left_diaphragm) / 2 + s.inspiration - 0.1 - 0.8 * p.heart_half_height
    heart_b = np.where(left, f32(p.heart_half_height), f32(p.heart_half_height * 1.1))
    heart = _inside(_ellipse_distance(x, y - f32(heart_cy) - f32(0.3) * x, heart_a, heart_b), edge)

    mediastinum = _inside(ax - f32(m), edge) * _inside(y - diaphragm, edge)
    knob_x, knob_y = m + 0.01, heart_cy - p.heart_half_height - 0.09
    knob_r = np.sqrt((x - f32(knob_x)) ** 2 + (y - f32(knob_y)) ** 2)
    knob = _inside(knob_r - f32(p.aortic_knob_radius), edge)
    calcification = (_inside(np.abs(knob_r - f32(0.8 * p.aortic_knob_radius)) - f32(max(0.008, 0.5 * px)), edge)
                     * (y < knob_y) * f32(p.aortic_calcification))
    trachea = _inside(ax - f32(0.032), edge) * _inside(y - f32(knob_y + 0.02), edge)

    lung_visible = lung * (1 - heart) * (1 - mediastinum) * (1 - knob)

    # Lung markings: vessels radiating from each hilum plus the patient's persistent texture.
    hilum_x = side * f32(m + 0.09)
    hilum_y = f32(heart_cy - p.heart_half_height - 0.01)
    hx, hy = (x - hilum_x) * side, y - hilum_y
    hilum_r = np.sqrt(hx ** 2 + hy ** 2)
    angle = np.arctan2(hy, hx)
    texture = ndimage.map_coordinates(_lung_texture(p.texture_seed), [(y + 1) * f32(6.5), (x + 1) * f32(6.5)],
                                      order=1, mode="nearest").astype(f32)
    vessel_phase = np.where(left, f32(p.vessel_phase_right), f32(p.vessel_phase_left))
    vessel_angle = f32(9) * angle + vessel_phase + f32(5) * hilum_r + f32(1.5) * texture
    vessels = np.exp(-hilum_r * f32(3.0)) * (0.5 + 0.5 * np.cos(vessel_angle)) ** 6
    vessels += np.exp(-(hilum_r * f32(14)) ** 2) * f32(0.8)

    # Bones. Posterior ribs arch from the spine; anterior ribs run down and inwards from the lateral wall.
    cage = (_inside(_ellipse_distance(x - lung_cx, y - diaphragm, lung_a + f32(0.035), lung_b + f32(0.1)), edge)
            * np.clip(f32(1) - (y - diaphragm) * f32(6), 0.0, 1)
            * _inside(f32(0.055) - ax, edge))
    across = np.clip((ax - f32(m * 0.6)) / (thorax_side - f32(m * 0.6)), 0.0, 1.2)
    rib_start = f32(p.lung_top - 0.07)
    posterior = (y - rib_start - f32(p.rib_curvature) * (across - f32(0.35)) ** 2) / f32(p.rib_spacing)
    ribs = (0.5 + 0.5 * np.cos(f32(2 * math.pi) * posterior)) ** 4
    anterior = (y - rib_start - f32(0.12) + f32(0.32) * across) / f32(p.rib_spacing * 1.15)
    ribs += (0.5 + 0.5 * np.cos(f32(2 * math.pi) * anterior)) ** 6 * np.clip((across - f32(0.4)) * f32(2), 0, 0.35)
    ribs *= cage

    clav_angle = math.radians(p.clavicle_angle_deg)
    clav_len = p.shoulder_half_width - 0.14
    qx, qy = ax - f32(0.07), y - f32(p.lung_top + 0.05)
    along = qx * f32(math.cos(clav_angle)) - qy * f32(math.sin(clav_angle))
    across_clav = qx * f32(math.sin(clav_angle)) + qy * f32(math.cos(clav_angle))
    along_clipped = np.clip(along, 0.0, clav_len)
    bow = f32(0.025) * np.sin(f32(math.pi / clav_len) * along_clipped * 2)
    clavicles = _inside(np.sqrt((along - along_clipped) ** 2 + (across_clav - bow) ** 2) - f32(0.03), edge)

    spine = _inside(ax - f32(0.055), edge) * (0.8 + 0.2 * np.cos(f32(2 * math.pi / (p.rib_spacing * 0.9)) * y))
    # Humeral heads sit inside the rounded shoulder soft tissue.
    humeral_x = p.shoulder_half_width - 0.12
    humeral_y = -0.5 + 0.14 * humeral_x
    humerus = _inside(np.sqrt((ax - f32(humeral_x)) ** 2 + (y - f32(humeral_y)) ** 2) - f32(0.075), edge)
    humerus = np.maximum(humerus, _inside(np.abs(ax - f32(humeral_x + 0.02)) - f32(0.04), edge)
                         * np.clip((f32(-0.05) - y) * f32(3), 0, 1) * (y > humeral_y) * body)
    bone = f32(0.17) * ribs + f32(0.26) * clavicles + f32(0.13) * spine + f32(0.26) * humerus

    image = f32(0.03) + body * (f32(0.27) + f32(0.13) * thickness)
    if p.breast_size > 0:
        breast_cy = (p.right_diaphragm + p.left_diaphragm) / 2 - 0.1
        breast_dist = _ellipse_distance(ax - f32(0.5 * p.thorax_half_width), y - f32(breast_cy),
                                        f32(0.28 * p.breast_size + 0.08), f32(0.2 * p.breast_size + 0.06))
        image += f32(0.15 * p.breast_size) * _inside(breast_dist + f32(0.03), 0.06) * body
    image += f32(0.09) * heart + f32(0.1) * mediastinum + f32(0.09) * knob - f32(0.05) * trachea
    image -= lung_visible * (f32(0.27) + f32(0.025) * texture - f32(0.11) * vessels)
    image += f32(p.bone_density) * bone + f32(0.35) * calcification
    bubble_y = p.left_diaphragm + 0.1 + s.inspiration
    bubble = _inside(_ellipse_distance(x - f32(0.45 * p.thorax_half_width), y - f32(bubble_y),
                                       f32(0.04 + 0.07 * s.gastric_bubble), f32(0.03 + 0.04 * s.gastric_bubble)), edge)
    image -= f32(0.12) * bubble * body

    metal = np.zeros_like(image)
    if p.pacemaker:
        box_x, box_y = 0.58 * p.thorax_half_width, p.lung_top + 0.2
        box = (((x - f32(box_x)) / f32(0.075)) ** 4 + ((y - f32(box_y)) / f32(0.05)) ** 4)
        metal = np.maximum(metal, _inside((np.sqrt(np.sqrt(box)) - 1) * f32(0.05), edge))
        apex_x = heart_width * (1 - p.heart_right_share) * 0.55
        apex = (apex_x, heart_cy + 0.3 * apex_x + 0.5 * p.heart_half_height)
        t = np.linspace(0.0, 1.0, 14)[:, None]
        start, control, end = np.array([box_x - 0.05, box_y]), np.array([0.02, p.lung_top + 0.12]), np.array(apex)
        lead = (1 - t) ** 2 * start + 2 * t * (1 - t) * control + t ** 2 * end
        lead_dist = _segment_distance(x, y, lead.astype(f32))
        metal = np.maximum(metal, f32(0.85) * _inside(lead_dist - f32(max(0.006, 0.45 * px)), edge))
    if p.sternal_wires:
        top = heart_cy - p.heart_half_height - 0.12
        for k in range(5):
            ring = _ellipse_distance(x, y - f32(top + k * 0.075), f32(0.035), f32(0.024))
            metal = np.maximum(metal, f32(0.9) * _inside(np.abs(ring) - f32(max(0.005, 0.45 * px)), edge))
    image = np.maximum(image, metal)

    masks = {"body": body > 0.5, "lung": lung_visible > 0.5, "heart": heart > 0.5,
             "bone": (bone > 0.15) & (metal < 0.5), "metal": metal > 0.5}
    return image, masks


def _lateral_intensity(p: Patient, s: Study, x: np.ndarray, y: np.ndarray, px: float) -> np.ndarray:
    """A simple lateral view (anterior to the image left): one lung field, heart in front, spine behind."""
    f32 = np.float32
    edge = 1.5 * px
    depth = 0.55 + p.body_fat
    body = _inside(_ellipse_distance(x, y - f32(0.25), f32(depth + 0.2), f32(1.25)), edge)
    diaphragm = f32((p.right_diaphragm + p.left_diaphragm) / 2 + s.inspiration)
    lung = _inside(_ellipse_distance(x - f32(0.05), y - diaphragm, f32(0.5), diaphragm - f32(p.lung_top)), edge)
    lung *= _inside(y - (diaphragm - f32(0.12) * (1 - np.clip(x / f32(0.5), -1, 1) ** 2)), edge)
    heart_r = 0.55 * p.ctr + 0.03
    heart = _inside(_ellipse_distance(x + f32(0.12), y - f32(diaphragm - 0.22) + f32(0.2) * x, f32(heart_r),
                                      f32(p.heart_half_height * 1.1)), edge)
    spine = body * _inside(np.abs(x - f32(depth - 0.05)) - f32(0.09), edge) * (
        0.7 + 0.3 * np.cos(f32(2 * math.pi / (p.rib_spacing * 0.9)) * y))
    sternum = (_inside(np.abs(x + f32(depth + 0.08) + f32(0.06) * y) - f32(0.03), edge)
               * _inside(y - f32(0.25), edge) * _inside(f32(p.lung_top + 0.05) - y, edge))
    image = f32(0.03) + f32(0.4) * body - f32(0.25) * lung * (1 - heart) + f32(0.1) * heart
    image += f32(p.bone_density) * (f32(0.25) * spine + f32(0.2) * sternum)
    return image


def _expose(image: np.ndarray, s: Study, rng: np.random.Generator, size: int) -> np.ndarray:
    """Detector blur, exposure (gamma, contrast, brightness), quantum noise, 8-bit quantisation."""
    image = ndimage.gaussian_filter(np.clip(image, 0.0, 1.0), 0.6 * max(1.0, size / 256), mode="nearest")
    image = np.clip(image, 0.0, 1.0) ** np.float32(s.gamma)
    image = (image - np.float32(0.45)) * np.float32(s.contrast) + np.float32(0.45 + s.brightness)
    image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(s.noise_sd)
    return np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _check_size(size: int) -> None:
    if not isinstance(size, (int, np.integer)) or not 16 <= size <= 2048:
        raise InputError(f"image size must be an integer in 16..2048, got {size!r}", where="size")


def render_study(patient: Patient, study_index: int, size: int = 128, seed: int = 0) -> np.ndarray:
    """The frontal radiograph of a study: (size, size) uint8, 0 = black (air), 255 = white (bone, metal).

    Deterministic in (patient, study_index, size, seed); `seed` is the world seed. size: 16..2048.
    """
    return _render_frontal(patient, study_index, size, seed)[0]


def anatomy_masks(patient: Patient, study_index: int, size: int = 128, seed: int = 0) -> dict[str, np.ndarray]:
    """Boolean (size, size) masks aligned with :func:`render_study`: body, lung (visible), heart, bone, metal."""
    return _render_frontal(patient, study_index, size, seed)[1]


def _render_frontal(patient: Patient, study_index: int, size: int, seed: int) -> tuple[np.ndarray, dict]:
    _check_size(size)
    study = sample_study(patient, study_index, seed)
    x, y = _pose_grid(study, size)
    intensity, masks = _frontal_intensity(patient, study, x, y, 2.0 / size / study.scale)
    noise_rng = _rng(seed, _POOL_CODE[patient.pool], patient.index, 1 + study_index, 1)
    return _expose(intensity, study, noise_rng, size), masks


def render_lateral(patient: Patient, study_index: int, size: int = 128, seed: int = 0) -> np.ndarray:
    """The lateral view of a study (same conventions as :func:`render_study`)."""
    _check_size(size)
    study = sample_study(patient, study_index, seed)
    x, y = _pose_grid(study, size)
    intensity = _lateral_intensity(patient, study, x, y, 2.0 / size / study.scale)
    noise_rng = _rng(seed, _POOL_CODE[patient.pool], patient.index, 1 + study_index, 2)
    return _expose(intensity, study, noise_rng, size)


# ====================================================================================================================
# Dataset rows


def _label_text(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _chexpert_labels(patient: Patient, study: Study, rng: np.random.Generator) -> dict[str, str]:
    """The study's CheXpert label columns: 1.0 / 0.0 / -1.0 / blank as the labeller writes them."""
    valid_split = patient.split == "valid"
    labels: dict[str, float | None] = {name: (0.0 if valid_split else None) for name in CHEXPERT_LABELS}
    if patient.pacemaker or patient.sternal_wires:
        labels["Support Devices"] = 1.0
    if study.cohort_variant == "uncertain":
        labels["Cardiomegaly"] = -1.0
        labels["No Finding"] = None
    elif study.cohort_variant == "other_finding":
        labels[("Pleural Effusion", "Lung Opacity", "Atelectasis")[int(rng.integers(3))]] = 1.0
        labels["Cardiomegaly"] = 0.0
        labels["No Finding"] = 0.0
    elif patient.label == 1:
        labels["Cardiomegaly"] = 1.0
        for finding, rate in (("Enlarged Cardiomediastinum", 0.3), ("Edema", 0.15), ("Pleural Effusion", 0.2)):
            if rng.random() < rate:
                labels[finding] = 1.0
    else:
        labels["No Finding"] = 1.0
        if not valid_split and rng.random() < 0.3:
            labels["Cardiomegaly"] = 0.0
    return {name: _label_text(value) for name, value in labels.items()}


_TRUTH_LEADING = ("path", "patient_id", "pool", "split", "study", "view", "age", "sex", "label", "ctr", "pacemaker",
                  "sternal_wires", "cohort_valid")
# The remaining Patient fields: the identity parameters behind the image.
_IDENTITY_FIELDS = tuple(f.name for f in fields(Patient) if f.name not in set(_TRUTH_LEADING) | {"index"})
_STUDY_FIELDS = ("rotation_deg", "shift_x", "shift_y", "scale", "brightness", "contrast", "gamma", "noise_sd")
GROUND_TRUTH_COLUMNS = _TRUTH_LEADING + _IDENTITY_FIELDS + _STUDY_FIELDS


def _ground_truth_row(patient: Patient, study: Study, path: str, view: str, cohort_valid: bool) -> dict:
    return {
        "path": path, "patient_id": patient.patient_id, "pool": patient.pool, "split": patient.split,
        "study": study.index + 1, "view": view, "age": patient.age, "sex": patient.sex, "label": patient.label,
        "ctr": patient.ctr, "pacemaker": int(patient.pacemaker), "sternal_wires": int(patient.sternal_wires),
        "cohort_valid": int(cohort_valid),
        **{name: getattr(patient, name) for name in _IDENTITY_FIELDS},
        **{name: getattr(study, name) for name in _STUDY_FIELDS},
    }


def _save(array: np.ndarray, path: Path, jpeg: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if jpeg:
        image.save(path, format="JPEG", quality=95)
    else:
        image.save(path, format="PNG", compress_level=6)


def _write_chexpert_patient(root: Path, patient: Patient, config: WorldConfig) -> tuple[list[dict], list[dict]]:
    csv_rows, truth_rows = [], []
    sex_text = {"M": "Male", "F": "Female"}[patient.sex]
    for study_index in range(patient.n_studies):
        study = sample_study(patient, study_index, config.seed)
        label_rng = _rng(config.seed, _POOL_CODE[patient.pool], patient.index, 1 + study_index, 3)
        labels = _chexpert_labels(patient, study, label_rng)
        folder = f"{CHEXPERT_DIR}/{patient.split}/{patient.name}/study{study_index + 1}"
        frontal_path = f"{folder}/view1_frontal.jpg"
        _save(render_study(patient, study_index, config.image_size, config.seed), root / frontal_path, jpeg=True)
        csv_rows.append({"Path": frontal_path, "Sex": "Unknown" if study.cohort_variant == "unknown_sex" else sex_text,
                         "Age": str(patient.age), "Frontal/Lateral": "Frontal", "AP/PA": study.view_position,
                         **labels})
        truth_rows.append(_ground_truth_row(patient, study, frontal_path, "frontal", study.cohort_variant == "keep"))
        if study.has_lateral:
            lateral_path = f"{folder}/view2_lateral.jpg"
            _save(render_lateral(patient, study_index, config.image_size, config.seed), root / lateral_path, jpeg=True)
            csv_rows.append({**csv_rows[-1], "Path": lateral_path, "Frontal/Lateral": "Lateral", "AP/PA": ""})
            truth_rows.append(_ground_truth_row(patient, study, lateral_path, "lateral", False))
    return csv_rows, truth_rows


def _write_nih_patient(root: Path, patient: Patient, config: WorldConfig) -> tuple[list[dict], list[dict]]:
    csv_rows, truth_rows = [], []
    for study_index in range(patient.n_studies):
        study = sample_study(patient, study_index, config.seed)
        name = f"{patient.patient_id:08d}_{study_index:03d}.png"
        _save(render_study(patient, study_index, config.image_size, config.seed), root / "images" / name, jpeg=False)
        detector = _rng(config.seed, _POOL_CODE[patient.pool], patient.index, 1 + study_index, 4)
        width, height = (2500, 2048) if detector.random() < 0.5 else (3056, 2544)
        spacing = "0.168" if width == 2500 else "0.139"
        csv_rows.append({
            "Image Index": name, "Finding Labels": "Cardiomegaly" if patient.label else "No Finding",
            "Follow-up #": str(study_index), "Patient ID": str(patient.patient_id), "Patient Age": str(patient.age),
            "Patient Gender": patient.sex, "View Position": study.view_position,
            "OriginalImage[Width": str(width), "Height]": str(height),
            "OriginalImagePixelSpacing[x": spacing, "y]": spacing,
        })
        truth_rows.append(_ground_truth_row(patient, study, name, "frontal", True))
    return csv_rows, truth_rows


def _write_chunk(job: tuple[str, WorldConfig, str, int, int]) -> tuple[str, list[dict], list[dict]]:
    """Render and write patients [start, stop) of a pool; returns their CSV and ground-truth rows (top-level so
    worker processes can import it)."""
    root, config, pool, start, stop = job
    pool_root = Path(root) / pool
    writer = _write_nih_patient if pool == "public" else _write_chexpert_patient
    csv_rows, truth_rows = [], []
    for index in range(start, stop):
        rows, truths = writer(pool_root, sample_patient(config, pool, index), config)
        csv_rows += rows
        truth_rows += truths
    return pool, csv_rows, truth_rows


def _write_csv(path: Path, header: tuple[str, ...], rows: list[dict], header_line: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        if header_line is not None:
            handle.write(header_line + "\n")
        writer = csv.DictWriter(handle, fieldnames=list(header), lineterminator="\n")
        if header_line is None:
            writer.writeheader()
        writer.writerows(rows)


_NIH_FIELDS = ("Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
               "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]")


def _write_tables(root: Path, pool: str, csv_rows: list[dict], truth_rows: list[dict]) -> dict:
    pool_root = root / pool
    if pool == "public":
        (pool_root / "images").mkdir(parents=True, exist_ok=True)
        _write_csv(pool_root / NIH_CSV, _NIH_FIELDS, csv_rows, header_line=NIH_HEADER)
    else:
        for split in ("train", "valid"):
            prefix = f"{CHEXPERT_DIR}/{split}/"
            _write_csv(pool_root / CHEXPERT_DIR / f"{split}.csv", CHEXPERT_COLUMNS,
                       [r for r in csv_rows if r["Path"].startswith(prefix)])
    _write_csv(pool_root / "ground_truth.csv", GROUND_TRUTH_COLUMNS, truth_rows)
    return {
        "patients": len({r["patient_id"] for r in truth_rows}),
        "images": len(truth_rows),
        "cohort_valid_images": sum(r["cohort_valid"] for r in truth_rows),
        "cardiomegaly_patients": len({r["patient_id"] for r in truth_rows if r["label"] == 1}),
    }


# ====================================================================================================================
# Extra studies: identity-class controls need many studies of a few patients


# The most studies a world gives a patient (max_studies_per_patient <= 20): extra studies start here, so they never
# repeat a study the world's files hold, and those files stay held-out studies of the same patients.
EXTRA_STUDY_FROM = 20
EXTRA_STUDIES_DIR = "extra-studies"


def sex_balanced_sets(patients: list[Patient], size: int, count: int, seed: int) -> list[list[Patient]]:
    """`count` disjoint sets of `size` patients, each (size + 1) // 2 men then size // 2 women, drawn in a seeded
    order; set j's k-th patient has the sex of every other set's k-th (sex alone carries identity: a control whose
    classes differ in sex from the patients they are scored against would look like a leak)."""
    order = np.random.default_rng(seed).permutation(len(patients))
    men = [patients[i] for i in order if patients[i].sex == "M"]
    women = [patients[i] for i in order if patients[i].sex == "F"]
    want_men, want_women = (size + 1) // 2, size // 2
    if len(men) < count * want_men or len(women) < count * want_women:
        raise InputError(f"{count} sets of {size} patients need {count * want_men} men and {count * want_women} women; "
                         f"the pool has {len(men)} and {len(women)}", where="identity_patients")
    return [men[j * want_men:(j + 1) * want_men] + women[j * want_women:(j + 1) * want_women] for j in range(count)]


def write_extra_studies(root: str | os.PathLike, config: WorldConfig, patients: list[Patient], count: int,
                        first: int = EXTRA_STUDY_FROM) -> list[dict]:
    """Render studies first .. first + count - 1 of each patient as CheXpert-style JPEGs under
    ``<root>/<pool>/extra-studies/patientNNNNN/studyK/view1_frontal.jpg``; returns one row per image (path, patient_id
    as read_chexpert names it, age, sex, label, study 1-based, view). Deterministic and idempotent: a file already
    there is kept (the same bytes), and each file appears whole (written beside it, then renamed)."""
    rows = []
    for patient in patients:
        for study_index in range(first, first + count):
            study = sample_study(patient, study_index, config.seed)
            path = (Path(root) / patient.pool / EXTRA_STUDIES_DIR / patient.name
                    / f"study{study_index + 1}" / "view1_frontal.jpg")
            if not path.is_file():
                partial = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.jpg")
                _save(render_study(patient, study_index, config.image_size, config.seed), partial, jpeg=True)
                os.replace(partial, path)
            rows.append({"path": str(path.resolve()), "patient_id": patient.name,
                         "age": float(patient.age), "sex": patient.sex, "label": patient.label,
                         "study": study_index + 1, "view": study.view_position})
    return rows


# Canaries: atypical patients outside every pool's table, rendered only when a target trains on them.
# They take the last CANARY_CAPACITY indices of their pool's id range, which no world's table reaches (a world may
# hold at most `_ID_CAPACITY - CANARY_CAPACITY` patients in a pool that has canaries). Training studies start at
# EXTRA_STUDY_FROM; the study every canary is scored by is CANARY_HELDOUT_STUDY, beyond any training dose.
CANARY_CAPACITY = 10_000
CANARY_HELDOUT_STUDY = EXTRA_STUDY_FROM + 100


def _rare_traits(patient: Patient, rng: np.random.Generator) -> dict:
    """What makes a canary atypical: each trait lies at an edge of the population's range (or is a device
    configuration few patients have), and each canary gets two of them, so canaries differ from the population and
    from one another."""
    traits = {
        "both_devices": {"pacemaker": True, "sternal_wires": True},
        "lung_asymmetry": {"lung_asymmetry": float(rng.choice([-0.06, 0.06]))},
        "clavicle_angle": {"clavicle_angle_deg": float(rng.choice([4.0, 26.0]))},
        "high_apex": {"lung_top": -0.72},
        "large_aortic_knob": {"aortic_knob_radius": 0.11, "aortic_calcification": 1.0},
        "narrow_mediastinum": {"mediastinum_half_width": 0.07},
        "tall_heart": {"heart_half_height": 0.34},
    }
    names = sorted(traits)
    chosen = rng.choice(len(names), 2, replace=False)
    changes = {}
    for i in sorted(chosen):
        changes.update(traits[names[i]])
    return changes


def canary_room(pool: str) -> int:
    """The most patients a world may hold in `pool` when that pool has canaries."""
    return _ID_CAPACITY[_check_pool(pool)] - CANARY_CAPACITY


def canary_patient(config: WorldConfig, pool: str, number: int) -> Patient:
    """Canary `number` (0-based) of `pool`: a patient drawn as any other, at an index no world table holds, then
    given two rare traits. Deterministic in (world seed, pool, number); pacemaker detection and re-identification
    see it like any patient."""
    _check_pool(pool)
    if not 0 <= number < CANARY_CAPACITY:
        raise InputError(f"canary number must be in 0..{CANARY_CAPACITY - 1}, got {number}", where="canaries")
    if config.patients_in(pool) > canary_room(pool):
        raise InputError(f"a pool with canaries holds at most {canary_room(pool)} patients "
                         f"(the last {CANARY_CAPACITY} ids are the canaries'); the {pool} pool has "
                         f"{config.patients_in(pool)}", where=f"data.synthetic.{pool}_patients")
    index = canary_room(pool) + number
    patient = sample_patient(config, pool, index)
    return replace(patient, split="train", **_rare_traits(patient, _rng(config.seed, _POOL_CODE[pool], index, 2)))


# ====================================================================================================================
# The shell: write a whole world atomically


def _partial_prefix(root: Path) -> str:
    return f".{root.name}.partial-"


def _remove_stale_partials(root: Path) -> None:
    """Delete temp dirs that killed runs left beside `root` (their pid is gone); never a live writer's."""
    prefix = _partial_prefix(root)
    if not root.parent.is_dir():
        return
    for candidate in root.parent.iterdir():
        if not candidate.name.startswith(prefix):
            continue
        try:
            pid = int(candidate.name[len(prefix):].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(candidate, ignore_errors=True)
            log.event("phantoms_stale_partial_removed", path=str(candidate))
        except (ValueError, PermissionError):
            continue


def _existing_summary(root: Path, config: WorldConfig) -> dict | None:
    """The stored summary when `root` already holds this world; InputError when it holds anything else."""
    if root.is_symlink() and not root.exists():
        raise InputError(f"is a symbolic link to {os.readlink(root)}, which does not exist; remove the link or "
                         "restore what it points to", where=str(root))
    if not root.exists():
        return None
    if not root.is_dir():
        raise InputError("exists and is not a directory", where=str(root))
    manifest = root / "world.json"
    if not manifest.is_file():
        if any(root.iterdir()):
            raise InputError("exists, is not empty and holds no world.json; refusing to write a world into it",
                             where=str(root))
        return None
    try:
        stored = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"unreadable world.json: {exc}", where=str(manifest)) from exc
    if stored.get("generator_version") != GENERATOR_VERSION or stored.get("config") != config.identity():
        raise InputError(
            f"holds a different world (generator_version {stored.get('generator_version')}, config "
            f"{stored.get('config')}); asked for version {GENERATOR_VERSION}, config {config.identity()}. "
            "Choose another root or delete this one", where=str(root))
    return {**stored["summary"], "root": str(root), "created": False}


def write_world(root: str | os.PathLike, config: WorldConfig | None = None) -> dict:
    """Write the world described by `config` to `root`; return its summary.

    Summary: {"root", "created" (False when it already existed), "generator_version", "counts": {pool: {"patients",
    "images", "cohort_valid_images", "cardiomegaly_patients"}}, "images", "seconds"}. Idempotent: an existing world
    with the same config is left untouched; a different one -> InputError. The world is built in a hidden sibling
    directory and renamed into place at the end, so an interrupted run never leaves a half-made `root`.
    """
    config = config or WorldConfig()
    root = Path(root).expanduser().absolute()
    existing = _existing_summary(root, config)
    if existing is not None:
        log.event("phantoms_exists", root=str(root), images=existing["images"])
        return existing
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(root)
    partial = root.parent / f"{_partial_prefix(root)}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    partial.mkdir()
    started = time.perf_counter()
    try:
        jobs = [(str(partial), config, pool, start, min(start + _CHUNK_PATIENTS, config.patients_in(pool)))
                for pool in POOLS for start in range(0, config.patients_in(pool), _CHUNK_PATIENTS)]
        collected = {pool: ([], []) for pool in POOLS}
        total_patients = sum(config.patients_in(pool) for pool in POOLS)
        log.event("phantoms_start", root=str(root), patients=total_patients, image_size=config.image_size,
                  workers=config.workers)
        if config.workers == 1:
            results = map(_write_chunk, jobs)
            pool_context = None
        else:
            # spawn, not fork: the caller may hold torch threads, which a forked child can deadlock on.
            pool_context = multiprocessing.get_context("spawn").Pool(config.workers)
            results = pool_context.imap(_write_chunk, jobs)
        try:
            for pool, csv_rows, truth_rows in log.progress(results, desc="phantom patients (chunks)", total=len(jobs)):
                collected[pool][0].extend(csv_rows)
                collected[pool][1].extend(truth_rows)
        finally:
            if pool_context is not None:
                pool_context.terminate()
                pool_context.join()
        pools = {pool: _write_tables(partial, pool, *collected[pool]) for pool in POOLS}
        summary = {
            "generator_version": GENERATOR_VERSION,
            "counts": pools,
            "images": sum(p["images"] for p in pools.values()),
            "seconds": round(time.perf_counter() - started, 2),
        }
        world = {"generator": "reid_batch.data.phantoms", "generator_version": GENERATOR_VERSION,
                 "config": config.identity(), "workers": config.workers, "summary": summary}
        (partial / "world.json").write_text(json.dumps(world, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        try:
            if root.exists():
                root.rmdir()  # only ever an empty directory here (checked above)
            os.rename(partial, root)
        except OSError:
            # Another writer may have finished the same world first; theirs is as good as ours.
            existing = _existing_summary(root, config)
            if existing is None:
                raise
            shutil.rmtree(partial, ignore_errors=True)
            return existing
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    log.event("phantoms_written", root=str(root), images=summary["images"], seconds=summary["seconds"])
    return {**summary, "root": str(root), "created": True}


def make_phantoms_command(root: str, seed: int = 0, image_size: int = 128, **counts) -> dict:
    """CLI entry: write the world to `root`. `counts` may set any other WorldConfig field (e.g. private_patients=600,
    workers=2); an unknown one is an InputError."""
    known = {f.name for f in fields(WorldConfig)} - {"seed", "image_size"}
    unknown = sorted(set(counts) - known)
    if unknown:
        raise InputError(f"unknown option(s) {unknown}; known: {sorted(known)}", where="make-phantoms")
    return write_world(root, WorldConfig(seed=seed, image_size=image_size, **counts))
