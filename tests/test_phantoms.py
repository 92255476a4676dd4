"""The synthetic chest-X-ray world: determinism, real dataset layouts, visible identity, atomic idempotent writes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from reid_batch.data import phantoms
from reid_batch.errors import InputError
from reid_batch.data.phantoms import (
    WorldConfig,
    anatomy_masks,
    make_phantoms_command,
    render_lateral,
    render_study,
    sample_patients,
    sample_study,
    write_world,
)

# Written out here, not imported, so a drift in the module's constants cannot pass unnoticed.
CHEXPERT_COLUMNS = [
    "Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly",
    "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax",
    "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices",
]
NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")

TINY = WorldConfig(seed=7, image_size=64, private_patients=60, public_patients=30, control_patients=20, workers=1)


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("tiny") / "world"
    return root, write_world(root, TINY)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _chexpert(root: Path, pool: str, split: str) -> pd.DataFrame:
    return pd.read_csv(root / pool / "CheXpert-v1.0-small" / f"{split}.csv", dtype=str, keep_default_na=False)


def _cohort_keep(df: pd.DataFrame) -> pd.Series:
    """The study's cohort rule, restated independently of the dataset readers."""
    cardiomegaly = pd.to_numeric(df["Cardiomegaly"], errors="coerce") == 1.0
    no_finding = pd.to_numeric(df["No Finding"], errors="coerce") == 1.0
    return ((df["Frontal/Lateral"] == "Frontal") & df["AP/PA"].isin(["AP", "PA"])
            & df["Sex"].isin(["Male", "Female"]) & (cardiomegaly ^ no_finding))


# ----------------------------------------------------------------------------------------------- determinism


def test_render_is_deterministic_and_seed_dependent():
    patient = sample_patients(WorldConfig(seed=1, private_patients=3), "private")[2]
    first = render_study(patient, 1, 96, seed=1)
    assert first.dtype == np.uint8 and first.shape == (96, 96)
    assert render_study(patient, 1, 96, seed=1).tobytes() == first.tobytes()
    assert render_study(patient, 1, 96, seed=2).tobytes() != first.tobytes()
    assert render_study(patient, 0, 96, seed=1).tobytes() != first.tobytes()
    other_seed_patient = sample_patients(WorldConfig(seed=2, private_patients=3), "private")[2]
    assert other_seed_patient != patient


def test_patients_do_not_depend_on_pool_sizes():
    small = sample_patients(WorldConfig(seed=4, private_patients=5), "private")
    large = sample_patients(WorldConfig(seed=4, private_patients=50, public_patients=9), "private")
    assert small == large[:5]


def test_same_config_writes_identical_bytes_whatever_the_worker_count(tmp_path, tiny_world):
    root, _ = tiny_world
    config = WorldConfig(**{**TINY.identity(), "private_patients": 30, "public_patients": 12, "control_patients": 6,
                            "workers": 2})
    again = tmp_path / "again"
    write_world(again, config)
    images = [f"{pool}/{path}" if pool != "public" else f"public/images/{path}"
              for pool in phantoms.POOLS for path in pd.read_csv(again / pool / "ground_truth.csv")["path"].iloc[::5]]
    # The tiny world has more patients; each patient's files must still match byte for byte.
    for name in images:
        assert _digest(again / name) == _digest(root / name), name
    train_small = _chexpert(again, "private", "train")
    train_large = _chexpert(root, "private", "train")
    assert train_small.equals(train_large[train_large["Path"].isin(train_small["Path"])].reset_index(drop=True))

    other_seed = tmp_path / "other_seed"
    write_world(other_seed, WorldConfig(**{**config.identity(), "seed": 8}))
    changed = ("private/CheXpert-v1.0-small/train.csv", "public/Data_Entry_2017.csv", "public/images/00100001_000.png")
    for name in changed:
        assert _digest(other_seed / name) != _digest(again / name), name


# ------------------------------------------------------------------------------------------------ layouts


def test_chexpert_layout_has_real_columns_and_files(tiny_world):
    root, _ = tiny_world
    for pool in ("private", "control"):
        train, valid = _chexpert(root, pool, "train"), _chexpert(root, pool, "valid")
        for table, split in ((train, "train"), (valid, "valid")):
            assert list(table.columns) == CHEXPERT_COLUMNS
            assert table["Path"].str.match(rf"^CheXpert-v1\.0-small/{split}/patient\d{{5}}/study\d+/"
                                           r"view(1_frontal|2_lateral)\.jpg$").all()
            assert set(table["Sex"]) <= {"Male", "Female", "Unknown"}
            for name in CHEXPERT_COLUMNS[5:]:
                assert set(table[name]) <= {"1.0", "0.0", "-1.0", ""}, name
        assert "-1.0" not in set(valid[CHEXPERT_COLUMNS[5:]].to_numpy().ravel())
        patients = lambda t: set(t["Path"].str.extract(r"(patient\d+)")[0])  # noqa: E731
        assert patients(train).isdisjoint(patients(valid))
        assert 0.03 <= len(patients(valid)) / (len(patients(train)) + len(patients(valid))) <= 0.25
        for path in pd.concat([train, valid])["Path"].iloc[::7]:
            with Image.open(root / pool / path) as image:
                assert image.format == "JPEG" and image.mode == "L" and image.size == (64, 64)


def test_nih_layout_has_real_header_and_files(tiny_world):
    root, _ = tiny_world
    csv_path = root / "public" / "Data_Entry_2017.csv"
    assert csv_path.read_text().splitlines()[0] == NIH_HEADER
    table = pd.read_csv(csv_path)
    assert list(table.columns)[:7] == ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
                                       "Patient Gender", "View Position"]
    assert len(table.columns) == 11
    assert set(table["Finding Labels"]) == {"Cardiomegaly", "No Finding"}
    assert set(table["Patient Gender"]) <= {"M", "F"} and set(table["View Position"]) <= {"PA", "AP"}
    assert (table["Image Index"] == [f"{p:08d}_{f:03d}.png" for p, f in
                                     zip(table["Patient ID"], table["Follow-up #"])]).all()
    assert table["Patient Age"].between(18, 90).all()
    for name in table["Image Index"]:
        with Image.open(root / "public" / "images" / name) as image:
            assert image.format == "PNG" and image.size == (64, 64)


def test_cohort_rule_drops_exist_and_valid_rows_have_one_label(tiny_world):
    root, _ = tiny_world
    rows = pd.concat([_chexpert(root, pool, split) for pool in ("private", "control") for split in ("train", "valid")])
    lateral = rows["Frontal/Lateral"] == "Lateral"
    assert rows.loc[lateral, "Path"].str.endswith("view2_lateral.jpg").all() and lateral.sum() > 0
    assert ((rows["Cardiomegaly"] == "-1.0") & (rows["No Finding"] == "")).sum() > 0
    other = rows[["Lung Opacity", "Atelectasis", "Pleural Effusion"]].eq("1.0").any(axis=1)
    assert (other & (rows["Cardiomegaly"] == "0.0") & (rows["No Finding"] == "0.0")).sum() > 0
    assert (rows["Sex"] == "Unknown").sum() > 0
    kept = rows[_cohort_keep(rows)]
    assert 0.7 < len(kept) / len(rows) < 0.97
    one = (kept["Cardiomegaly"] == "1.0").astype(int) + (kept["No Finding"] == "1.0").astype(int)
    assert (one == 1).all()


def test_ground_truth_matches_datasets(tiny_world):
    root, summary = tiny_world
    for pool in ("private", "control"):
        truth = pd.read_csv(root / pool / "ground_truth.csv")
        rows = pd.concat([_chexpert(root, pool, s) for s in ("train", "valid")]).set_index("Path")
        assert set(truth["path"]) == set(rows.index)
        keep = _cohort_keep(rows.reset_index()).to_numpy()
        assert dict(zip(rows.index, keep)) == {p: bool(v) for p, v in zip(truth["path"], truth["cohort_valid"])}
        kept = truth[truth["cohort_valid"] == 1].set_index("path")
        assert ((rows.loc[kept.index, "Cardiomegaly"] == "1.0") == (kept["label"] == 1)).all()
        assert (rows.loc[kept.index, "Age"].astype(int) == kept["age"]).all()
        assert ((kept["ctr"] > 0.5).astype(int) == kept["label"]).all()
        assert summary["counts"][pool]["images"] == len(truth)
    nih = pd.read_csv(root / "public" / "Data_Entry_2017.csv").set_index("Image Index")
    truth = pd.read_csv(root / "public" / "ground_truth.csv").set_index("path")
    assert (nih.loc[truth.index, "Patient ID"] == truth["patient_id"]).all()
    assert (nih.loc[truth.index, "Patient Gender"] == truth["sex"]).all()
    assert ((nih.loc[truth.index, "Finding Labels"] == "Cardiomegaly").astype(int) == truth["label"]).all()
    # Identity is per patient: every identity column is constant across a patient's images.
    assert (truth.groupby("patient_id")[["age", "ctr", "thorax_half_width", "bone_density"]].nunique() == 1).all().all()

    world = json.loads((root / "world.json").read_text())
    assert world["generator_version"] == phantoms.GENERATOR_VERSION
    assert world["config"] == TINY.identity()
    assert world["summary"]["images"] == summary["images"] == sum(c["images"] for c in summary["counts"].values())


def test_pools_are_patient_disjoint(tiny_world):
    root, _ = tiny_world
    ids = {pool: set(pd.read_csv(root / pool / "ground_truth.csv")["patient_id"]) for pool in phantoms.POOLS}
    assert ids["private"].isdisjoint(ids["public"]) and ids["private"].isdisjoint(ids["control"])
    assert ids["public"].isdisjoint(ids["control"])
    assert [len(ids[p]) for p in ("private", "public", "control")] == [60, 30, 20]
    config = WorldConfig(private_patients=200, public_patients=200, control_patients=200)
    sampled = [p.patient_id for pool in phantoms.POOLS for p in sample_patients(config, pool)]
    assert len(set(sampled)) == 600


# ------------------------------------------------------------------------------------- what the images show


def test_labels_ages_and_sexes_are_balanced_and_in_range():
    patients = sample_patients(WorldConfig(seed=11, private_patients=1500), "private")
    labels = np.array([p.label for p in patients])
    ages = np.array([p.age for p in patients])
    assert 0.38 <= labels.mean() <= 0.55
    assert ages.min() >= 18 and ages.max() <= 90 and ages.std() > 12
    assert 0.4 <= np.mean([p.sex == "M" for p in patients]) <= 0.7
    devices = np.mean([p.pacemaker or p.sternal_wires for p in patients])
    assert 0.08 <= devices <= 0.25
    studies = np.array([p.n_studies for p in patients])
    assert studies.min() == 1 and studies.max() == 3 and 2.0 <= studies.mean() <= 2.6


def test_age_sex_and_heart_size_are_visible():
    patients = sample_patients(WorldConfig(seed=3, private_patients=200), "private")
    ages, bone_contrast, width = [], [], {"M": [], "F": []}
    heart_ratio, ctr = [], []
    for patient in patients:
        image = render_study(patient, 0, 64, seed=3).astype(float)
        masks = anatomy_masks(patient, 0, 64, seed=3)
        ages.append(patient.age)
        bone_contrast.append(image[masks["bone"]].mean() - image[masks["lung"]].mean())
        width[patient.sex].append(masks["body"].sum(axis=1).max())
        heart_ratio.append(masks["heart"].sum(axis=1).max() / (masks["lung"] | masks["heart"]).sum(axis=1).max())
        ctr.append(patient.ctr)
    assert np.corrcoef(ages, bone_contrast)[0, 1] < -0.5
    assert np.mean(width["M"]) - np.mean(width["F"]) > 4  # pixels at 64 px
    assert np.corrcoef(heart_ratio, ctr)[0, 1] > 0.8


def test_breasts_and_devices_are_visible():
    patients = sample_patients(WorldConfig(seed=5, private_patients=120, device_rate=0.5), "private")
    # Breast shadows brighten the lower lung fields against the upper ones.
    lower_minus_upper = {"M": [], "F": []}
    for patient in patients[:60]:
        image = render_study(patient, 0, 64, seed=5).astype(float)
        lung = anatomy_masks(patient, 0, 64, seed=5)["lung"]
        rows = np.flatnonzero(lung.any(axis=1))
        middle = (rows.min() + rows.max()) // 2
        upper, lower = lung.copy(), lung.copy()
        upper[middle:], lower[:middle] = False, False
        lower_minus_upper[patient.sex].append(image[lower].mean() - image[upper].mean())
    assert np.mean(lower_minus_upper["F"]) > np.mean(lower_minus_upper["M"]) + 8
    with_device = [p for p in patients if p.pacemaker or p.sternal_wires][:8]
    without = [p for p in patients if not (p.pacemaker or p.sternal_wires)][:8]
    assert with_device and all(anatomy_masks(p, 0, 128, 5)["metal"].sum() > 8 for p in with_device)
    assert all(anatomy_masks(p, 0, 128, 5)["metal"].sum() == 0 for p in without)
    pacemakers = [p for p in patients if p.pacemaker][:5]
    assert all(render_study(p, 0, 128, 5).max() >= 215 for p in pacemakers)


def test_studies_vary_but_keep_the_anatomy():
    patient = sample_patients(WorldConfig(seed=9, private_patients=1), "private")[0]
    studies = [sample_study(patient, k, 9) for k in range(4)]
    assert len({(s.rotation_deg, s.shift_x, s.brightness) for s in studies}) == 4
    hearts = [anatomy_masks(patient, k, 128, 9)["heart"].sum() for k in range(4)]
    assert max(hearts) / min(hearts) < 1.3
    images = [render_study(patient, k, 128, 9) for k in range(2)]
    assert not np.array_equal(images[0], images[1])
    lateral = render_lateral(patient, 0, 64, 9)
    assert lateral.shape == (64, 64) and lateral.dtype == np.uint8 and lateral.std() > 10


def test_image_looks_like_a_chest_xray():
    patient = sample_patients(WorldConfig(seed=0, private_patients=1), "private")[0]
    image = render_study(patient, 0, 128, 0).astype(float)
    masks = anatomy_masks(patient, 0, 128, 0)
    lungs, heart, outside = image[masks["lung"]].mean(), image[masks["heart"]].mean(), image[~masks["body"]].mean()
    assert outside < lungs < heart  # air darkest, lungs dark, mediastinum bright
    assert image[masks["bone"]].mean() > lungs + 15
    assert 0.15 < masks["lung"].mean() < 0.45


# ----------------------------------------------------------------------------------------- the writing shell


def test_tiny_world_is_fast(tiny_world):
    _, summary = tiny_world
    assert summary["created"] is True
    assert summary["images"] > 200
    assert summary["seconds"] < 15  # about 1.5 s alone on one core; generous for a shared machine


def test_rerun_is_idempotent_and_other_config_is_refused(tiny_world):
    root, summary = tiny_world
    stamp = (root / "world.json").stat().st_mtime_ns
    again = write_world(root, WorldConfig(**{**TINY.identity(), "workers": 2}))
    assert again["created"] is False and again["images"] == summary["images"]
    assert (root / "world.json").stat().st_mtime_ns == stamp
    with pytest.raises(InputError, match="different world"):
        write_world(root, WorldConfig(**{**TINY.identity(), "seed": 99}))


def test_refuses_foreign_non_empty_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InputError) as error:
        write_world(tmp_path, WorldConfig(private_patients=1, public_patients=0, control_patients=0, image_size=32))
    assert error.value.where == str(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_refuses_a_broken_symbolic_link_and_leaves_it(tmp_path):
    """A world root linked to a deleted world (a copied run folder): a clear error naming it, not a rename crash."""
    root = tmp_path / "world"
    root.symlink_to(tmp_path / "gone" / "world")
    with pytest.raises(InputError, match="does not exist") as error:
        write_world(root, WorldConfig(private_patients=1, public_patients=0, control_patients=0, image_size=32))
    assert error.value.where == str(root) and root.is_symlink()
    assert [p.name for p in tmp_path.iterdir()] == ["world"]


def test_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(phantoms, "_write_tables", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        write_world(tmp_path / "world", WorldConfig(private_patients=2, public_patients=1, control_patients=1,
                                                    image_size=32, workers=1))
    assert list(tmp_path.iterdir()) == []


def test_killed_run_leaves_no_world_and_next_run_cleans_up(tmp_path):
    root = tmp_path / "world"
    script = ("from reid_batch.data.phantoms import WorldConfig, write_world; "
              f"write_world({str(root)!r}, WorldConfig(image_size=128, private_patients=3000, workers=1))")
    process = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while time.time() < deadline and not any(tmp_path.glob(".world.partial-*/private")):
            time.sleep(0.05)
        assert any(tmp_path.glob(".world.partial-*/private")), "the writer never started"
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert not root.exists()
    assert len(list(tmp_path.glob(".world.partial-*"))) == 1

    summary = write_world(root, WorldConfig(private_patients=2, public_patients=1, control_patients=1, image_size=32,
                                            workers=1))
    assert summary["created"] and (root / "world.json").is_file()
    assert list(tmp_path.glob(".world.partial-*")) == []


def test_make_phantoms_command_and_bad_input(tmp_path):
    summary = make_phantoms_command(str(tmp_path / "w"), seed=2, image_size=32, private_patients=2,
                                    public_patients=1, control_patients=1, workers=1)
    assert summary["counts"]["private"]["patients"] == 2
    with pytest.raises(InputError, match="unknown option"):
        make_phantoms_command(str(tmp_path / "x"), private_patiens=3)
    for bad in ({"image_size": 8}, {"private_patients": 0}, {"control_patients": -1}, {"device_rate": 1.5},
                {"max_studies_per_patient": 0}, {"seed": -1}, {"workers": 0}, {"image_size": 64.0}):
        with pytest.raises(InputError) as error:
            WorldConfig(**bad)
        assert error.value.where == next(iter(bad))
    with pytest.raises(InputError):
        sample_patients(WorldConfig(), "secret")
