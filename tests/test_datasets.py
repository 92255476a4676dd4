"""Dataset readers, image decoding and the patient split, on tiny fixtures built in tmp_path."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from reid_batch.data.datasets import (
    COLUMNS,
    ImageDataset,
    load_image,
    patient_split,
    read_chexpert,
    read_dicom,
    read_dicom_folder,
    read_folder,
    read_nih,
    read_source,
)
from reid_batch.errors import InputError

CHEXPERT_HEADER = ("Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,"
                   "Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,"
                   "Pleural Effusion,Pleural Other,Fracture,Support Devices")


def _events(capsys, name: str) -> list[dict]:
    records = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    return [r for r in records if r["event"] == name]


def _chexpert_row(patient: str, view_file: str, sex: str, age: str, frontal: str, ap_pa: str,
                  no_finding: str, cardiomegaly: str) -> str:
    path = f"CheXpert-v1.0-small/train/{patient}/study1/{view_file}"
    # 19 columns: Path, Sex, Age, Frontal/Lateral, AP/PA, No Finding, Enlarged Cardiomediastinum, Cardiomegaly, 11 more.
    return ",".join([path, sex, age, frontal, ap_pa, no_finding, "", cardiomegaly] + [""] * 11)


# (line in CSV, row). Line 1 is the header.
CHEXPERT_ROWS = [
    _chexpert_row("patient00001", "view1_frontal.jpg", "Male", "60", "Frontal", "PA", "", "1.0"),      # keep, 1
    _chexpert_row("patient00001", "view2_lateral.jpg", "Male", "60", "Lateral", "", "", "1.0"),        # frontal
    _chexpert_row("patient00002", "view1_frontal.jpg", "Female", "45", "Frontal", "AP", "1.0", ""),    # keep, 0
    _chexpert_row("patient00003", "view1_frontal.jpg", "Female", "50", "Frontal", "AP", "", "-1.0"),   # label
    _chexpert_row("patient00004", "view1_frontal.jpg", "Male", "70", "Frontal", "PA", "1.0", "1.0"),   # label
    _chexpert_row("patient00005", "view1_frontal.jpg", "Unknown", "30", "Frontal", "PA", "", "1.0"),   # sex
    _chexpert_row("patient00006", "view1_frontal.jpg", "Male", "0", "Frontal", "PA", "", "1.0"),       # age
    _chexpert_row("patient00007", "view1_frontal.jpg", "Female", "80", "Frontal", "PA", "1.0", "0.0"), # keep, 0
    _chexpert_row("patient00008", "view1_frontal.jpg", "Male", "33", "Frontal", "PA", "1.0", "-1.0"),  # keep, 0
    _chexpert_row("patient00009", "view1_frontal.jpg", "Male", "41", "Frontal", "LL", "", "1.0"),      # ap_pa
    _chexpert_row("patient00010", "view1_frontal.jpg", "Female", "", "Frontal", "AP", "", "1.0"),      # age
    _chexpert_row("patient00011", "view1_frontal.jpg", "Male", "55", "Frontal", "PA", "", ""),         # label
]


def _write_chexpert(root: Path, rows=CHEXPERT_ROWS, header=CHEXPERT_HEADER) -> Path:
    folder = root / "CheXpert-v1.0-small"
    folder.mkdir(parents=True)
    (folder / "train.csv").write_text("\n".join([header, *rows]) + "\n")
    return folder


def test_chexpert_cohort_rule_keeps_exactly_the_eligible_rows(tmp_path, capsys):
    _write_chexpert(tmp_path)
    table = read_chexpert(tmp_path)

    assert list(table.columns[: len(COLUMNS)]) == list(COLUMNS)
    assert table["csv_line"].tolist() == [2, 4, 9, 10]
    assert table["patient_id"].tolist() == ["patient00001", "patient00002", "patient00007", "patient00008"]
    assert table["label"].tolist() == [1, 0, 0, 0]
    assert str(table["label"].dtype) == "Int64"
    assert table["sex"].tolist() == ["M", "F", "F", "M"]
    assert table["age"].tolist() == [60.0, 45.0, 80.0, 33.0]
    assert table["view"].tolist() == ["PA", "AP", "PA", "PA"]
    assert set(table["source"]) == {"chexpert"}
    expected = tmp_path.resolve() / "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"
    assert table["path"].iloc[0] == str(expected)

    dropped = {e["rule"]: e["dropped"] for e in _events(capsys, "cohort_rule")}
    assert dropped == {"frontal": 1, "ap_pa": 1, "age": 2, "sex": 1, "label": 3}


def test_chexpert_root_may_be_the_chexpert_folder_itself(tmp_path):
    folder = _write_chexpert(tmp_path)
    from_parent, from_folder = read_chexpert(tmp_path), read_chexpert(folder)
    assert from_folder["path"].tolist() == from_parent["path"].tolist()


def test_chexpert_missing_columns_name_the_csv_and_columns(tmp_path):
    header = CHEXPERT_HEADER.replace("Cardiomegaly,", "").replace("Sex,", "")
    _write_chexpert(tmp_path, rows=[], header=header)
    with pytest.raises(InputError) as info:
        read_chexpert(tmp_path)
    assert "train.csv" in str(info.value) and "Cardiomegaly" in str(info.value) and "Sex" in str(info.value)


def test_chexpert_unparsable_age_names_the_line(tmp_path):
    rows = list(CHEXPERT_ROWS)
    rows[2] = rows[2].replace(",45,", ",forty,")
    _write_chexpert(tmp_path, rows=rows)
    with pytest.raises(InputError) as info:
        read_chexpert(tmp_path)
    assert "line 4" in str(info.value) and "train.csv" in info.value.where


def test_chexpert_without_csv_is_an_input_error(tmp_path):
    with pytest.raises(InputError):
        read_chexpert(tmp_path)


def _write_nih(root: Path, ages=("58", "61", "150", "44")) -> None:
    (root / "images").mkdir(parents=True)
    (root / "images_002" / "images").mkdir(parents=True)
    for name in ("00000001_000.png", "00000002_000.png"):
        Image.new("L", (8, 8), 10).save(root / "images" / name)
    Image.new("L", (8, 8), 10).save(root / "images_002" / "images" / "00000003_000.png")
    lines = [
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
        "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],",
        f"00000001_000.png,Cardiomegaly|Effusion,0,1,{ages[0]},M,PA,2682,2749,0.143,0.143,",
        f"00000002_000.png,No Finding,0,2,{ages[1]},F,AP,2500,2048,0.168,0.168,",
        f"00000003_000.png,Effusion,1,2,{ages[2]},F,PA,2500,2048,0.168,0.168,",
        f"00000004_000.png,No Finding,0,4,{ages[3]},M,PA,2500,2048,0.168,0.168,",
    ]
    (root / "Data_Entry_2017.csv").write_text("\n".join(lines) + "\n")


def test_nih_labels_paths_and_bad_age(tmp_path, capsys):
    _write_nih(tmp_path)
    with pytest.raises(InputError) as info:
        read_nih(tmp_path)
    assert "line 4" in str(info.value) and "150" in str(info.value)

    table = read_nih(tmp_path, drop_bad_ages=True)
    assert table["patient_id"].tolist() == ["1", "2", "4"]
    assert table["label"].tolist() == [1, 0, 0]
    assert table["sex"].tolist() == ["M", "F", "M"]
    assert table["view"].tolist() == ["PA", "AP", "PA"]
    assert table["age"].tolist() == [58.0, 61.0, 44.0]
    assert table["path"].iloc[0] == str(tmp_path.resolve() / "images" / "00000001_000.png")
    events = _events(capsys, "cohort_rule")
    assert events[-1]["rule"] == "age" and events[-1]["dropped"] == 1


def test_nih_finds_release_layout_and_keeps_unknown_labels(tmp_path, capsys):
    _write_nih(tmp_path, ages=("58", "61", "62", "44"))
    table = read_nih(tmp_path)
    assert table["path"].iloc[2] == str(tmp_path.resolve() / "images_002" / "images" / "00000003_000.png")
    assert table["label"].isna().tolist() == [False, False, True, False]
    assert _events(capsys, "nih_images_missing")[0]["missing"] == 1  # 00000004_000.png exists nowhere


def test_read_folder_is_recursive_sorted_and_skips_others(tmp_path):
    for relative in ("b/2.PNG", "a/x/1.jpg", "top.jpeg", "a/notes.txt", "a/.hidden.png", "c/scan.dcm"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"x")
    table = read_folder(tmp_path)
    root = tmp_path.resolve()
    assert table["path"].tolist() == [str(root / p) for p in ("a/x/1.jpg", "b/2.PNG", "c/scan.dcm", "top.jpeg")]
    assert table["patient_id"].tolist() == ["a", "b", "c", "top"]
    assert table["label"].isna().all() and table["age"].isna().all()
    assert read_source("folder", str(tmp_path), extensions=(".png",))["path"].tolist() == [str(root / "b/2.PNG")]


def test_read_source_rejects_unknown_format_and_options(tmp_path):
    with pytest.raises(InputError) as info:
        read_source("imagenet", str(tmp_path))
    assert info.value.where == "format"
    with pytest.raises(InputError) as info:
        read_source("folder", str(tmp_path), csv_name="x.csv")
    assert info.value.where == "options"


# --- DICOM


def _write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", slope=None, intercept=None,
                 center=None, width=None, bits_stored: int = 16, with_pixels: bool = True, patient: dict | None = None):
    from pydicom.dataset import FileMetaDataset, Dataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    for key, value in (patient or {}).items():
        setattr(ds, key, value)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if center is not None:
        ds.WindowCenter, ds.WindowWidth = center, width
    if with_pixels:
        ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _two_region_pixels(left: int, right: int) -> np.ndarray:
    pixels = np.full((16, 16), right, dtype=np.uint16)
    pixels[:, :8] = left
    return pixels


def test_dicom_monochrome2_keeps_dark_regions_dark(tmp_path):
    out = read_dicom(_write_dicom(tmp_path / "m2.dcm", _two_region_pixels(left=100, right=3000)))
    assert out.dtype == np.uint8 and out.shape == (16, 16)
    assert out[:, :8].max() == 0 and out[:, 8:].min() == 255


def test_dicom_monochrome1_is_inverted_so_lungs_are_dark(tmp_path):
    # In MONOCHROME1 a high stored value displays dark: the lung (left) is stored high.
    out = read_dicom(_write_dicom(tmp_path / "m1.dcm", _two_region_pixels(left=3000, right=100),
                                  photometric="MONOCHROME1"))
    assert out[:, :8].max() == 0 and out[:, 8:].min() == 255


def test_dicom_applies_rescale_before_the_window(tmp_path):
    pixels = np.array([[412, 512, 612, 1000]] * 4, dtype=np.uint16)  # rescaled: -200, 0, 200, 976
    path = _write_dicom(tmp_path / "ct.dcm", pixels, slope=2, intercept=-1024, center=0, width=400)
    assert read_dicom(path)[0].tolist() == [0, 128, 255, 255]


def test_dicom_window_is_used_when_present(tmp_path):
    pixels = np.array([[0, 1000, 1500, 2000, 4000]] * 4, dtype=np.uint16)
    path = _write_dicom(tmp_path / "w.dcm", pixels, center=1500, width=1000)
    assert read_dicom(path)[0].tolist() == [0, 0, 128, 255, 255]


def test_dicom_without_window_ignores_an_outlier_pixel(tmp_path):
    # A burned-in marker at full 16-bit scale must not squash the anatomy (1000..2000) into a few grey levels.
    pixels = np.tile(np.linspace(1000, 2000, 64).astype(np.uint16), (64, 1))
    pixels[0, 0] = 65535
    out = read_dicom(_write_dicom(tmp_path / "16bit.dcm", pixels))
    assert out[1:, :].min() <= 2 and out[1:, :].max() >= 250
    assert out[0, 0] == 255


def test_dicom_signed_12_bit(tmp_path):
    pixels = np.array([[-1000, 0, 1000, 2047]] * 8, dtype=np.int16)
    out = read_dicom(_write_dicom(tmp_path / "signed.dcm", pixels, bits_stored=12, center=0, width=2000))
    assert out[0].tolist() == [0, 128, 255, 255]


def test_dicom_without_pixel_data_names_the_file(tmp_path):
    path = _write_dicom(tmp_path / "empty.dcm", np.zeros((4, 4), np.uint16), with_pixels=False)
    with pytest.raises(InputError) as info:
        read_dicom(path)
    assert info.value.where == str(path) and "pixel data" in str(info.value)


def test_non_dicom_with_dcm_suffix_is_an_input_error(tmp_path):
    path = tmp_path / "fake.dcm"
    path.write_bytes(b"not a dicom file at all" * 10)
    with pytest.raises(InputError) as info:
        load_image(path, size=None)
    assert info.value.where == str(path)


def test_load_image_reads_dicom_through_read_dicom(tmp_path):
    path = _write_dicom(tmp_path / "m2.dcm", _two_region_pixels(left=100, right=3000))
    image = load_image(path, size=8, channels=3)
    assert image.shape == (3, 8, 8) and image.dtype == torch.float32
    assert image[:, :, :3].max() < 0.05 and image[:, :, -3:].min() > 0.95


def test_read_dicom_folder_takes_metadata_from_headers(tmp_path):
    (tmp_path / "p1").mkdir()
    _write_dicom(tmp_path / "p1" / "a.dcm", np.zeros((4, 4), np.uint16),
                 patient={"PatientID": "PX-7", "PatientAge": "054Y", "PatientSex": "F", "ViewPosition": "AP"})
    Image.new("L", (4, 4)).save(tmp_path / "p1" / "ignored.png")
    table = read_source("dicom", str(tmp_path))
    assert table["patient_id"].tolist() == ["PX-7"]
    assert table["age"].tolist() == [54.0] and table["sex"].tolist() == ["F"] and table["view"].tolist() == ["AP"]
    assert table["source"].tolist() == ["dicom"]
    assert read_dicom_folder(tmp_path)["path"].tolist() == table["path"].tolist()


def test_real_radiograph_from_pydicom_test_data():
    from pydicom.data import get_testdata_file

    path = get_testdata_file("RG1_UNCR.dcm", download=False)
    if path is None:
        pytest.skip("RG1_UNCR.dcm is not installed locally (pydicom fetches it from the network, which is off)")
    out = read_dicom(path)
    assert out.ndim == 2 and out.dtype == np.uint8 and out.std() > 10


# --- PIL


def _noise(shape, seed=0, dtype=np.uint8, high=256):
    return np.random.default_rng(seed).integers(0, high, size=shape).astype(dtype)


def test_8_bit_png_is_divided_by_255(tmp_path):
    Image.fromarray(np.array([[0, 51, 255]], dtype=np.uint8)).save(tmp_path / "g.png")
    assert load_image(tmp_path / "g.png", size=None)[0, 0].tolist() == pytest.approx([0.0, 0.2, 1.0])


def test_16_bit_png_is_scaled_by_its_bit_depth(tmp_path):
    Image.fromarray(np.array([[0, 32768, 65535, 4095]], dtype=np.uint16)).save(tmp_path / "g16.png")
    values = load_image(tmp_path / "g16.png", size=None)[0, 0].tolist()
    assert values == pytest.approx([0.0, 32768 / 65535, 1.0, 4095 / 65535], abs=1e-6)


def test_rgb_is_converted_to_luminance(tmp_path):
    Image.fromarray(np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]]], dtype=np.uint8)).save(
        tmp_path / "rgb.png")
    image = load_image(tmp_path / "rgb.png", size=None)
    assert image.shape == (1, 1, 4)
    assert image[0, 0].tolist() == pytest.approx([0.299, 0.587, 0.114, 1.0], abs=1e-6)


def test_resize_is_antialiased_and_channels_repeat(tmp_path):
    # White stripes on columns 3 and 4 of every 8: a plain bilinear 8x reduction samples exactly between those two
    # columns and sees pure white; an antialiased one averages to about 2/8.
    stripes = np.zeros((64, 64), dtype=np.uint8)
    stripes[:, np.isin(np.arange(64) % 8, [3, 4])] = 255
    Image.fromarray(stripes).save(tmp_path / "stripes.png")
    image = load_image(tmp_path / "stripes.png", size=8, channels=3)
    assert image.shape == (3, 8, 8)
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
    assert float(image.min()) > 0.15 and float(image.max()) < 0.35


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_file_is_an_input_error_naming_it(tmp_path, suffix):
    whole = tmp_path / f"whole{suffix}"
    Image.fromarray(_noise((128, 128))).save(whole)
    truncated = tmp_path / f"truncated{suffix}"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert load_image(whole, size=None).shape == (1, 128, 128)
    with pytest.raises(InputError) as info:
        load_image(truncated, size=None)
    assert info.value.where == str(truncated)


def test_truncation_is_detected_even_if_someone_enabled_load_truncated_images(tmp_path, monkeypatch):
    from PIL import ImageFile

    whole = tmp_path / "whole.png"
    Image.fromarray(_noise((128, 128))).save(whole)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(whole.read_bytes()[:-500])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(InputError):
        load_image(truncated, size=None)


def test_zero_byte_and_missing_files_are_input_errors(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        load_image(tmp_path / "empty.png", size=None)
    with pytest.raises(InputError) as info:
        load_image(tmp_path / "absent.png", size=None)
    assert info.value.where == str(tmp_path / "absent.png")


def _png_header_only(path: Path, width: int, height: int) -> Path:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_header_is_rejected_before_decoding(tmp_path):
    bomb = _png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    with pytest.raises(InputError) as info:
        load_image(bomb, size=64)
    assert info.value.where == str(bomb)
    # Between PIL's own warning threshold (~89 MP) and ours (100 MP) our limit decides, so lower it to see it act.
    small = tmp_path / "small.png"
    Image.new("L", (100, 100)).save(small)
    with pytest.raises(InputError, match="decompression bomb"):
        load_image(small, size=None, max_pixels=5_000)
    assert load_image(small, size=None, max_pixels=10_000).shape == (1, 100, 100)


def test_bad_channels_is_an_input_error(tmp_path):
    Image.new("L", (4, 4)).save(tmp_path / "a.png")
    with pytest.raises(InputError):
        load_image(tmp_path / "a.png", size=None, channels=2)


# --- Dataset


def _image_table(tmp_path: Path) -> pd.DataFrame:
    good = []
    for i in range(3):
        path = tmp_path / f"good{i}.png"
        Image.fromarray(np.full((20, 30), 60 * (i + 1), dtype=np.uint8)).save(path)
        good.append(path)
    whole = tmp_path / "whole.jpg"
    Image.fromarray(_noise((64, 64))).save(whole)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(whole.read_bytes()[:300])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    paths = [good[0], truncated, good[1], empty, good[2]]
    return pd.DataFrame({
        "path": [str(p) for p in paths],
        "patient_id": ["p0", "p1", "p2", "p3", "p4"],
        "age": [50.0, np.nan, 30.0, 40.0, np.nan],
        "sex": ["M", "F", "F", None, None],
        "label": pd.array([1, 0, pd.NA, 1, 0], dtype="Int64"),
        "view": ["PA"] * 5,
        "source": ["folder"] * 5,
    })


def test_image_dataset_skip_mode_drops_and_counts_unreadable_images(tmp_path):
    table = _image_table(tmp_path)
    dataset = ImageDataset(table, size=16, channels=1, on_error="skip")
    assert len(dataset) == 3
    assert sorted(Path(p).name for p, _ in dataset.skipped) == ["empty.png", "truncated.jpg"]
    assert all(reason for _, reason in dataset.skipped)

    items = [dataset[i] for i in range(len(dataset))]
    assert [int(item["index"]) for item in items] == [0, 2, 4]
    assert [int(item["label"]) for item in items] == [1, -1, 0]
    assert [float(item["sex"]) for item in items[:2]] == [1.0, 0.0] and torch.isnan(items[2]["sex"])
    assert float(items[0]["age"]) == 50.0 and torch.isnan(items[2]["age"])
    assert all(item["image"].shape == (1, 16, 16) for item in items)
    assert [round(float(item["image"].mean()) * 255) for item in items] == [60, 120, 180]

    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=3)))
    assert batch["image"].shape == (3, 1, 16, 16) and batch["index"].tolist() == [0, 2, 4]


def test_image_dataset_raise_mode_raises_on_the_bad_row(tmp_path):
    dataset = ImageDataset(_image_table(tmp_path), size=16, channels=3)
    assert len(dataset) == 5 and dataset.skipped == []
    assert dataset[0]["image"].shape == (3, 16, 16)
    with pytest.raises(InputError) as info:
        dataset[1]
    assert info.value.where.endswith("truncated.jpg")


# --- Split


def _split_table() -> pd.DataFrame:
    rows = [(f"pat{p:02d}", f"/img/{p}_{k}.png") for p in range(20) for k in range(1 + p % 3)]
    return pd.DataFrame(rows, columns=["patient_id", "path"])


def test_patient_split_is_disjoint_complete_and_sized_by_patients():
    table = _split_table()
    train, val = patient_split(table, val_fraction=0.25, seed=7)
    assert set(train["patient_id"]).isdisjoint(val["patient_id"])
    assert sorted(train["path"].tolist() + val["path"].tolist()) == sorted(table["path"])
    assert val["patient_id"].nunique() == 5


def test_patient_split_is_deterministic_and_independent_of_row_order():
    table = _split_table()
    _, val = patient_split(table, 0.3, seed=1)
    _, val_again = patient_split(table, 0.3, seed=1)
    shuffled = table.sample(frac=1.0, random_state=123).reset_index(drop=True)
    _, val_shuffled = patient_split(shuffled, 0.3, seed=1)
    _, val_other_seed = patient_split(table, 0.3, seed=2)
    assert val["path"].tolist() == val_again["path"].tolist()
    assert set(val_shuffled["path"]) == set(val["path"])
    assert set(val_other_seed["patient_id"]) != set(val["patient_id"])


def test_patient_split_edges():
    table = _split_table()
    train, val = patient_split(table, 0.0, seed=0)
    assert len(val) == 0 and len(train) == len(table)
    two = pd.DataFrame({"patient_id": ["a", "b"], "path": ["/a.png", "/b.png"]})
    train, val = patient_split(two, 0.01, seed=0)
    assert len(train) == 1 and len(val) == 1
    for bad_fraction in (1.0, -0.1):
        with pytest.raises(InputError):
            patient_split(table, bad_fraction, seed=0)
    with pytest.raises(InputError):
        patient_split(pd.DataFrame({"patient_id": ["a", None], "path": ["/a", "/b"]}), 0.5, seed=0)

