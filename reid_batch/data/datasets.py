"""Readers that turn chest-X-ray collections (CheXpert, NIH ChestX-ray14, plain folders, DICOM) into one table form,
and the image loading shared by every model.

The common table is a pandas DataFrame with at least these columns:

- ``path``       absolute file path (str)
- ``patient_id`` (str), never missing
- ``age``        years (float64), NaN when unknown
- ``sex``        "M" / "F" / None
- ``label``      Int64: 1 = Cardiomegaly, 0 = No Finding, <NA> = neither / unknown
- ``view``       "PA" / "AP" / other DICOM ViewPosition / None
- ``source``     "chexpert" / "nih" / "folder" / "dicom"

Images come out of :func:`load_image` as float tensors (C, H, W) with values in [0, 1], where 0 is black
(dark lungs) and 1 is white (bone), whatever the storage format.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import os
import re
import warnings
from pathlib import Path
from typing import Callable, Iterable, Literal

import numpy as np
import pandas as pd
import pydicom
import torch
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut
from PIL import Image, ImageFile
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from reid_batch import log
from reid_batch.errors import InputError

COLUMNS = ("path", "patient_id", "age", "sex", "label", "view", "source")

# Older than any recorded human: a typo or a unit error (months, days), never a patient.
MAX_AGE = 120.0

# 100 megapixels: ten times a large chest radiograph (about 3000 x 3000), far below what would exhaust memory.
DEFAULT_MAX_PIXELS = 100_000_000

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm")

# Percentiles used to window a DICOM that carries no WindowCenter/WindowWidth. Plain min/max lets a single burned-in
# marker or a dead detector pixel compress the whole anatomy into a few grey levels; 0.5/99.5 ignores such outliers.
DICOM_FALLBACK_PERCENTILES = (0.5, 99.5)

# ITU-R BT.601 luma weights, the same that PIL uses for RGB -> L.
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float64)

# A truncated file must be reported, never silently decoded with a grey band where the data ran out.
ImageFile.LOAD_TRUNCATED_IMAGES = False


# --------------------------------------------------------------------------------------------------------------------
# Common table helpers


def _empty_table(source: str) -> pd.DataFrame:
    return _finalize(pd.DataFrame({c: [] for c in COLUMNS}), source=source)


def _finalize(df: pd.DataFrame, source: str) -> pd.DataFrame:
    """Cast the common columns to their documented dtypes and put them first; extra columns follow."""
    out = df.copy()
    out["path"] = out["path"].astype(str)
    out["patient_id"] = out["patient_id"].astype(str)
    out["age"] = pd.to_numeric(out["age"], errors="coerce").astype("float64")
    out["sex"] = pd.Series([_none_if_missing(v) for v in out["sex"]], index=out.index, dtype=object)
    out["view"] = pd.Series([_none_if_missing(v) for v in out["view"]], index=out.index, dtype=object)
    out["label"] = pd.array([pd.NA if _missing(v) else int(v) for v in out["label"]], dtype="Int64")
    if source:
        out["source"] = source
    out["source"] = out["source"].astype(str)
    extras = [c for c in out.columns if c not in COLUMNS]
    return out[list(COLUMNS) + extras].reset_index(drop=True)


def _missing(value) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)) or value == ""


def _none_if_missing(value):
    return None if _missing(value) else value


def _require_columns(df: pd.DataFrame, required: Iterable[str], where: str) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(f"missing required column(s) {missing}; found {list(df.columns)}", where=where)


def _read_csv(csv_path: Path) -> pd.DataFrame:
    # Everything as text: blanks, -1 and unparsable values each mean something different and are decided here, not by
    # pandas' type inference.
    try:
        return pd.read_csv(csv_path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot parse CSV: {exc}", where=str(csv_path)) from exc


def _refuse_duplicates(values: pd.Series, column: str, csv_path: Path) -> None:
    """The same image listed twice would be trained on twice and counted twice in every metric."""
    repeated = values.duplicated(keep=False).to_numpy()
    if repeated.any():
        lines = [_csv_line(int(i)) for i in np.flatnonzero(repeated)]
        raise InputError(f"duplicate {column} values at lines {lines[:10]}: {values.iloc[int(np.flatnonzero(repeated)[0])]!r}",
                         where=str(csv_path))


def _csv_line(position: int) -> int:
    """1-based line number in the CSV file of the data row at 0-based position (line 1 is the header)."""
    return position + 2


def _existing_dir(root: str | os.PathLike) -> Path:
    path = Path(root).expanduser().resolve()
    if not path.is_dir():
        raise InputError("not a directory", where=str(root))
    return path


# --------------------------------------------------------------------------------------------------------------------
# CheXpert

CHEXPERT_REQUIRED = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Cardiomegaly")
_PATIENT_COMPONENT = re.compile(r"^patient\d+$")


def _find_chexpert_csv(root: Path, csv_name: str) -> Path:
    direct = root / csv_name
    if direct.is_file():
        return direct
    candidates = sorted(p for p in root.glob(f"*/{csv_name}") if p.is_file())
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise InputError(f"no {csv_name} in this folder or in any folder directly below it", where=str(root))
    raise InputError(f"several {csv_name} found, pass the folder that holds the one you mean: "
                     f"{[str(c) for c in candidates]}", where=str(root))


def _chexpert_positive(column: pd.Series, csv_path: Path, name: str) -> pd.Series:
    """True where the finding is 1. Uncertain (-1), negative (0) and blank (not mentioned) all read as not positive."""
    stripped = column.str.strip()
    values = pd.to_numeric(stripped, errors="coerce")
    bad = (values.isna() & (stripped != "")) | (values.notna() & ~values.isin([1.0, 0.0, -1.0]))
    if bad.any():
        position = int(np.flatnonzero(bad.to_numpy())[0])
        raise InputError(f"column {name!r} must be 1, 0, -1 or blank; line {_csv_line(position)} has "
                         f"{column.iloc[position]!r}", where=str(csv_path))
    return values == 1.0


def read_chexpert(root: str | os.PathLike, csv_name: str = "train.csv") -> pd.DataFrame:
    """Read CheXpert and apply the study's cohort rule.

    `root` is the folder that contains ``CheXpert-v1.0-small/`` (the CSV is found at ``root/*/csv_name``), or the
    CheXpert folder itself (``root/csv_name``). The CSV's ``Path`` column is relative to the parent of the CSV's folder
    (it starts with the CSV folder's name); a Path that does not start with that name is read relative to the CSV's
    folder instead. Image existence is not checked here (200k stat calls); :class:`ImageDataset` handles unreadable
    files.

    Cohort rule, applied in this order, each step's drop count logged as event ``cohort_rule``:
      1. ``frontal``: Frontal/Lateral == "Frontal"
      2. ``ap_pa``:   AP/PA in {"AP", "PA"}
      3. ``age``:     Age known and > 0 (blank = unknown; a non-numeric age is an InputError)
      4. ``sex``:     Sex in {"Male", "Female"}
      5. ``label``:   exactly one of Cardiomegaly, No Finding is 1 (-1 and blank read as 0)
    label: 1 = Cardiomegaly, 0 = No Finding. patient_id is the ``patientNNNNN`` component of Path.
    """
    root_path = _existing_dir(root)
    csv_path = _find_chexpert_csv(root_path, csv_name)
    raw = _read_csv(csv_path)
    _require_columns(raw, CHEXPERT_REQUIRED, where=str(csv_path))
    raw = raw.reset_index(drop=True)
    raw["_line"] = [_csv_line(i) for i in range(len(raw))]

    ages = pd.to_numeric(raw["Age"].str.strip(), errors="coerce")
    unparsable = ages.isna() & (raw["Age"].str.strip() != "")
    if unparsable.any():
        position = int(np.flatnonzero(unparsable.to_numpy())[0])
        raise InputError(f"unparsable Age {raw['Age'].iloc[position]!r} at line {_csv_line(position)}",
                         where=str(csv_path))
    impossible = ages > MAX_AGE
    if impossible.any():
        position = int(np.flatnonzero(impossible.to_numpy())[0])
        raise InputError(f"Age {raw['Age'].iloc[position]!r} at line {_csv_line(position)} is over {MAX_AGE:g} years",
                         where=str(csv_path))
    _refuse_duplicates(raw["Path"].str.strip(), "Path", csv_path)
    raw["_age"] = ages
    raw["_cardiomegaly"] = _chexpert_positive(raw["Cardiomegaly"], csv_path, "Cardiomegaly")
    raw["_no_finding"] = _chexpert_positive(raw["No Finding"], csv_path, "No Finding")

    rules: list[tuple[str, Callable[[pd.DataFrame], pd.Series]]] = [
        ("frontal", lambda d: d["Frontal/Lateral"].str.strip() == "Frontal"),
        ("ap_pa", lambda d: d["AP/PA"].str.strip().isin(["AP", "PA"])),
        ("age", lambda d: d["_age"] > 0),
        ("sex", lambda d: d["Sex"].str.strip().isin(["Male", "Female"])),
        ("label", lambda d: d["_cardiomegaly"] ^ d["_no_finding"]),
    ]
    kept = raw
    for rule, keep in rules:
        mask = keep(kept).fillna(False).astype(bool)
        log.event("cohort_rule", source="chexpert", csv=str(csv_path), rule=rule,
                  dropped=int((~mask).sum()), remaining=int(mask.sum()))
        kept = kept[mask]

    folder_name = csv_path.parent.name
    paths, patients = [], []
    for rel, line in zip(kept["Path"].str.strip(), kept["_line"]):
        parts = Path(rel).parts
        base = csv_path.parent.parent if parts and parts[0] == folder_name else csv_path.parent
        resolved = (base / rel).resolve()
        if not resolved.is_relative_to(base.resolve()):
            raise InputError(f"Path {rel!r} at line {line} points outside the dataset folder {base}", where=str(csv_path))
        paths.append(str(resolved))
        patient = next((p for p in parts if _PATIENT_COMPONENT.match(p)), None)
        if patient is None:
            raise InputError(f"Path {rel!r} at line {line} has no patientNNNNN component", where=str(csv_path))
        patients.append(patient)

    table = pd.DataFrame({
        "path": paths,
        "patient_id": patients,
        "age": kept["_age"].to_numpy(),
        "sex": kept["Sex"].str.strip().map({"Male": "M", "Female": "F"}).to_numpy(),
        "label": np.where(kept["_cardiomegaly"].to_numpy(), 1, 0),
        "view": kept["AP/PA"].str.strip().to_numpy(),
        "csv_line": kept["_line"].to_numpy(),
    })
    log.event("dataset_read", source="chexpert", csv=str(csv_path), rows=len(raw), kept=len(table),
              patients=table["patient_id"].nunique())
    return _finalize(table, source="chexpert")


# --------------------------------------------------------------------------------------------------------------------
# NIH ChestX-ray14

NIH_REQUIRED = ("Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender", "View Position")
_NIH_AGE = re.compile(r"^(\d+)\s*[Yy]?$")  # the 2017 release has plain integers; an earlier one wrote "058Y"


def _nih_image_index(root: Path) -> dict[str, Path]:
    """File name -> path for the release layout ``images_001/images/00000001_000.png`` (first in sorted order wins)."""
    index: dict[str, Path] = {}
    for folder in sorted(root.glob("images_*/images")):
        for file in sorted(folder.iterdir()):
            index.setdefault(file.name, file)
    return index


def read_nih(root: str | os.PathLike, csv_name: str = "Data_Entry_2017.csv", images_dir: str = "images",
             drop_bad_ages: bool = False) -> pd.DataFrame:
    """Read NIH ChestX-ray14 (``root/csv_name``) without filtering rows.

    path is ``root/images_dir/<Image Index>``; where that file is missing, the release layout
    ``root/images_*/images/<Image Index>`` is searched (index built once, only when needed). Rows found in neither are
    kept with the plain path and counted in event ``nih_images_missing``.
    label: 1 if "Cardiomegaly" is among the ``|``-separated Finding Labels, 0 if they are exactly "No Finding",
    otherwise <NA>. Age must be an integer in 0..120 (the real CSV has a few larger ones): otherwise InputError naming
    the line, or with ``drop_bad_ages=True`` those rows are dropped and counted (event ``cohort_rule``, rule ``age``).
    A non-numeric age is always an InputError. sex: "M"/"F" else None; view: View Position or None.
    """
    root_path = _existing_dir(root)
    csv_path = root_path / csv_name
    if not csv_path.is_file():
        raise InputError(f"no {csv_name} in this folder", where=str(root_path))
    raw = _read_csv(csv_path)
    _require_columns(raw, NIH_REQUIRED, where=str(csv_path))
    _refuse_duplicates(raw["Image Index"].str.strip(), "Image Index", csv_path)

    ages = np.empty(len(raw), dtype=np.float64)
    in_range = np.ones(len(raw), dtype=bool)
    for position, text in enumerate(raw["Patient Age"].str.strip()):
        match = _NIH_AGE.match(text)
        if not match:
            raise InputError(f"unparsable Patient Age {text!r} at line {_csv_line(position)}", where=str(csv_path))
        ages[position] = float(match.group(1))
        if not 0 <= ages[position] <= 120:
            if not drop_bad_ages:
                raise InputError(f"Patient Age {text!r} at line {_csv_line(position)} is outside 0..120 "
                                 f"(pass drop_bad_ages=True to drop such rows)", where=str(csv_path))
            in_range[position] = False
    if drop_bad_ages:
        log.event("cohort_rule", source="nih", csv=str(csv_path), rule="age",
                  dropped=int((~in_range).sum()), remaining=int(in_range.sum()))
    raw = raw[in_range].reset_index(drop=True)
    ages = ages[in_range]

    plain_dir = root_path / images_dir
    release_index: dict[str, Path] | None = None
    paths, missing = [], 0
    for name in raw["Image Index"].str.strip():
        plain = plain_dir / name
        if not plain.is_file():
            if release_index is None:
                release_index = _nih_image_index(root_path)
            found = release_index.get(name)
            if found is None:
                missing += 1
            else:
                plain = found
        paths.append(str(plain.resolve()))
    if missing:
        log.event("nih_images_missing", csv=str(csv_path), missing=missing, rows=len(raw))

    findings = raw["Finding Labels"].str.strip().str.split("|")
    labels = [1 if "Cardiomegaly" in [f.strip() for f in items] else 0 if items == ["No Finding"] else pd.NA
              for items in findings]
    sex = raw["Patient Gender"].str.strip().str.upper()
    view = raw["View Position"].str.strip()
    table = pd.DataFrame({
        "path": paths,
        "patient_id": raw["Patient ID"].str.strip().to_numpy(),
        "age": ages,
        "sex": sex.where(sex.isin(["M", "F"]), None).to_numpy(),
        "label": labels,
        "view": view.where(view != "", None).to_numpy(),
        "csv_line": [_csv_line(i) for i in np.flatnonzero(in_range)],
    })
    if "Follow-up #" in raw.columns:
        table["follow_up"] = pd.to_numeric(raw["Follow-up #"], errors="coerce").astype("Int64").to_numpy()
    if (table["patient_id"] == "").any():
        position = int(np.flatnonzero((table["patient_id"] == "").to_numpy())[0])
        raise InputError(f"blank Patient ID at line {table['csv_line'].iloc[position]}", where=str(csv_path))
    log.event("dataset_read", source="nih", csv=str(csv_path), rows=len(table),
              patients=table["patient_id"].nunique())
    return _finalize(table, source="nih")


# --------------------------------------------------------------------------------------------------------------------
# Folders


def _folder_patient(file: Path, root: Path) -> str:
    relative = file.relative_to(root)
    return relative.parts[0] if len(relative.parts) > 1 else file.stem


def read_folder(root: str | os.PathLike, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> pd.DataFrame:
    """All image files below `root` (recursive, sorted by path, extension case-insensitive, hidden files skipped).

    No labels, ages or sexes. patient_id is the first folder below `root` (layout ``root/<patient>/.../img``), or the
    file's stem for files directly in `root`: grouping by the top folder errs towards keeping related images together
    in :func:`patient_split`.
    """
    root_path = _existing_dir(root)
    wanted = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    files = []
    for directory, subdirs, names in os.walk(root_path):
        # macOS resource forks (._x.png) and hidden folders are never images.
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        files += [Path(directory, n) for n in names if not n.startswith(".") and n.lower().endswith(wanted)]
    files.sort()
    if not files:
        log.event("dataset_read", source="folder", root=str(root_path), rows=0)
        return _empty_table("folder")
    table = pd.DataFrame({
        "path": [str(f) for f in files],
        "patient_id": [_folder_patient(f, root_path) for f in files],
        "age": np.nan,
        "sex": None,
        "label": pd.NA,
        "view": None,
    })
    log.event("dataset_read", source="folder", root=str(root_path), rows=len(table),
              patients=table["patient_id"].nunique())
    return _finalize(table, source="folder")


def _dicom_age(text) -> float:
    """DICOM PatientAge ``nnnD/W/M/Y`` in years; NaN when absent or malformed."""
    match = re.match(r"^(\d{1,3})([DWMY])$", str(text or "").strip().upper())
    if not match:
        return math.nan
    return float(match.group(1)) / {"D": 365.25, "W": 52.1775, "M": 12.0, "Y": 1.0}[match.group(2)]


def read_dicom_folder(root: str | os.PathLike) -> pd.DataFrame:
    """The ``.dcm`` files of :func:`read_folder`, with patient_id, age, sex and view read from the DICOM headers.

    Header fields used: PatientID (falls back to the folder rule when blank), PatientAge, PatientSex (M/F else None),
    ViewPosition. A file that is not DICOM at all -> InputError naming it.
    """
    table = read_folder(root, extensions=(".dcm",))
    table["source"] = "dicom"
    for position, path in enumerate(table["path"]):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError) as exc:
            raise InputError(f"not a readable DICOM file: {exc}", where=path) from exc
        patient = str(header.get("PatientID", "") or "").strip()
        if patient:
            table.loc[position, "patient_id"] = patient
        table.loc[position, "age"] = _dicom_age(header.get("PatientAge"))
        sex = str(header.get("PatientSex", "") or "").strip().upper()
        table.loc[position, "sex"] = sex if sex in ("M", "F") else None
        view = str(header.get("ViewPosition", "") or "").strip().upper()
        table.loc[position, "view"] = view or None
    return _finalize(table, source="dicom")


# --------------------------------------------------------------------------------------------------------------------
# Pixels


def _check_pixel_count(width: int, height: int, max_pixels: int, where: str) -> None:
    if width * height > max_pixels:
        raise InputError(f"image is {width} x {height} = {width * height} pixels, over the limit of {max_pixels} "
                         f"(possible decompression bomb; raise max_pixels if the image is genuine)", where=where)


def _first_value(value) -> float:
    """WindowCenter/WindowWidth may be multi-valued; the first pair is the one the modality recommends."""
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0]
    return float(value)


def read_dicom(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read a DICOM radiograph as display-ready uint8 (H, W), 0 = black, with lungs dark.

    Steps: modality LUT (RescaleSlope/RescaleIntercept, or a Modality LUT Sequence); linear window to 0..255 using the
    first WindowCenter/WindowWidth when both are present (width > 0), otherwise the 0.5 and 99.5 percentiles of the
    rescaled pixels (robust to burned-in markers, see DICOM_FALLBACK_PERCENTILES); MONOCHROME1 (high value = dark) is
    inverted after windowing. RGB DICOMs are converted to luminance. Multi-frame files, missing pixel data and
    undecodable files -> InputError naming the file.
    """
    where = str(path)
    try:
        ds = pydicom.dcmread(path)
    except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError, KeyError) as exc:
        raise InputError(f"not a readable DICOM file: {exc}", where=where) from exc
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise InputError("DICOM file has no pixel data", where=where)
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    _check_pixel_count(columns, rows, max_pixels, where)
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise InputError(f"multi-frame DICOM ({ds.NumberOfFrames} frames) is not a radiograph", where=where)
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises a wide variety (ValueError, RuntimeError, NotImplementedError, ...)
        raise InputError(f"cannot decode DICOM pixel data: {type(exc).__name__}: {exc}", where=where) from exc

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if pixels.ndim == 3 and pixels.shape[-1] == 3:
        values = pixels.astype(np.float64) @ _LUMA_WEIGHTS
    elif pixels.ndim == 2:
        values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)
    else:
        raise InputError(f"unsupported DICOM pixel array shape {pixels.shape}", where=where)
    if values.size == 0:
        raise InputError("DICOM file has empty pixel data", where=where)

    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None and pixels.ndim == 2 and _first_value(width) > 0:
        center_value, width_value = _first_value(center), _first_value(width)
        low, high = center_value - width_value / 2, center_value + width_value / 2
    else:
        low, high = (float(v) for v in np.percentile(values, DICOM_FALLBACK_PERCENTILES))
    if high > low:
        scaled = (np.clip(values, low, high) - low) / (high - low) * 255.0
    else:
        scaled = np.zeros_like(values)  # a constant image carries no anatomy; black rather than a division by zero
    out = np.rint(scaled).astype(np.uint8)
    if photometric == "MONOCHROME1":
        out = 255 - out
    return out


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _pil_to_unit_array(img: Image.Image, where: str) -> np.ndarray:
    """Float64 (H, W) in [0, 1] from a decoded PIL image, scaling by the stored bit depth (not by the image's max)."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.asarray(img, dtype=np.float64) / 65535.0
    if mode == "I":
        # Older Pillow opens 16-bit grayscale PNG as 32-bit "I"; the file's bit depth is still 16.
        return np.clip(np.asarray(img, dtype=np.float64), 0, 65535) / 65535.0
    if mode == "1":
        return np.asarray(img, dtype=np.float64)
    if mode == "L":
        return np.asarray(img, dtype=np.float64) / 255.0
    if mode == "LA":
        return np.asarray(img.getchannel("L"), dtype=np.float64) / 255.0
    if mode == "F":
        raise InputError("32-bit float images have no defined bit depth to scale by", where=where)
    rgb = img.convert("RGB")  # RGB, RGBA (alpha dropped), P, CMYK, YCbCr, ...
    return (np.asarray(rgb, dtype=np.float64) @ _LUMA_WEIGHTS) / 255.0


def _read_pil(path: Path, max_pixels: int) -> np.ndarray:
    where = str(path)
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # another library may have switched it on after import
    try:
        with warnings.catch_warnings():
            # Our own limit is the one that counts; PIL's default (~89 MP) would only warn below it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                _check_pixel_count(img.width, img.height, max_pixels, where)
                img.load()  # decodes everything now, so truncation surfaces inside this try
                return _pil_to_unit_array(img, where)
    except Image.DecompressionBombError as exc:
        raise InputError(f"possible decompression bomb: {exc}", where=where) from exc
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        raise InputError(f"cannot decode image: {type(exc).__name__}: {exc}", where=where) from exc


def load_image(path: str | os.PathLike, size: int | None, channels: int = 1,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Load one image as a float32 tensor (channels, H, W) with values in [0, 1], 0 = black.

    PNG/JPEG via PIL: 8-bit divided by 255, 16-bit grayscale by 65535 (its bit depth), RGB converted to BT.601
    luminance, alpha dropped. DICOM (``.dcm``/``.dicom`` or the ``DICM`` magic) via :func:`read_dicom`.
    `size` (> 0): resized to size x size with antialiased bilinear interpolation (aspect ratio not kept); None keeps
    the original size. `channels` 1 or 3 (3 repeats the grayscale channel). `max_pixels` (> 0) bounds width x height
    before decoding. Missing, empty, truncated, corrupt or oversized files -> InputError naming the file.
    """
    if channels not in (1, 3):
        raise InputError(f"channels must be 1 or 3, got {channels!r}", where="channels")
    if size is not None and (not isinstance(size, int) or size <= 0):
        raise InputError(f"size must be a positive integer or None, got {size!r}", where="size")
    file = Path(path)
    where = str(path)
    try:
        byte_count = file.stat().st_size
    except OSError as exc:
        raise InputError(f"cannot read image file: {exc.strerror or exc}", where=where) from exc
    if byte_count == 0:
        raise InputError("image file is empty (0 bytes)", where=where)

    if _is_dicom(file):
        array = read_dicom(file, max_pixels=max_pixels).astype(np.float64) / 255.0
    else:
        array = _read_pil(file, max_pixels)

    image = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).unsqueeze(0)
    if size is not None and tuple(image.shape[-2:]) != (size, size):
        image = F.resize(image, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)
        image = image.clamp_(0.0, 1.0)
    if channels == 3:
        image = image.expand(3, -1, -1).contiguous()
    return image


# --------------------------------------------------------------------------------------------------------------------
# Dataset


def _sex_code(value) -> float:
    return {"M": 1.0, "F": 0.0}.get(value, math.nan) if not _missing(value) else math.nan


class ImageDataset(torch.utils.data.Dataset):
    """Images of a common table, one dict per row:

    ``image`` float32 (channels, size, size) in [0, 1]; ``label`` int64 (1, 0, or -1 when <NA>); ``age`` float32
    (NaN unknown); ``sex`` float32 (1.0 = M, 0.0 = F, NaN unknown); ``index`` int64, the row's position in `df` as
    passed in (stable when rows are skipped).

    on_error="raise": an unreadable image raises InputError when it is fetched. on_error="skip": :meth:`validate` runs
    up front (fully decodes every file), unreadable rows are dropped and listed in ``skipped`` as (path, reason);
    they are never returned as placeholder images. A file that breaks after validation still raises.
    """

    def __init__(self, df: pd.DataFrame, size: int | None, channels: int = 1,
                 on_error: Literal["raise", "skip"] = "raise", max_pixels: int = DEFAULT_MAX_PIXELS):
        if on_error not in ("raise", "skip"):
            raise InputError(f"on_error must be 'raise' or 'skip', got {on_error!r}", where="on_error")
        _require_columns(df, ("path",), where="dataset table")
        self.df = df.reset_index(drop=True)
        self.size = size
        self.channels = channels
        self.on_error = on_error
        self.max_pixels = max_pixels
        self.skipped: list[tuple[str, str]] = []
        self._positions = list(range(len(self.df)))
        if on_error == "skip":
            self.skipped = self.validate()
            bad = {path for path, _ in self.skipped}
            self._positions = [i for i in self._positions if self.df["path"].iloc[i] not in bad]
            log.event("images_skipped", skipped=len(self.skipped), kept=len(self._positions),
                      examples=self.skipped[:5])

    def validate(self) -> list[tuple[str, str]]:
        """(path, reason) for every distinct file in the table that does not decode; decodes each file once."""
        problems = []
        for path in log.progress(dict.fromkeys(self.df["path"]), desc="validate images",
                                 total=self.df["path"].nunique()):
            try:
                load_image(path, size=None, channels=1, max_pixels=self.max_pixels)
            except InputError as exc:
                problems.append((str(path), str(exc)))
        return problems

    def __len__(self) -> int:
        return len(self._positions)

    def __getitem__(self, item: int) -> dict:
        position = self._positions[item]
        row = self.df.iloc[position]
        label = row["label"] if "label" in row.index else pd.NA
        age = row["age"] if "age" in row.index else math.nan
        return {
            "image": load_image(row["path"], self.size, self.channels, max_pixels=self.max_pixels),
            "label": torch.tensor(-1 if _missing(label) else int(label), dtype=torch.int64),
            "age": torch.tensor(math.nan if _missing(age) else float(age), dtype=torch.float32),
            "sex": torch.tensor(_sex_code(row["sex"] if "sex" in row.index else None), dtype=torch.float32),
            "index": torch.tensor(position, dtype=torch.int64),
        }


# --------------------------------------------------------------------------------------------------------------------
# Split


def _patient_rank(patient_id: str, seed: int) -> bytes:
    return hashlib.sha256(f"{seed}\x00{patient_id}".encode()).digest()


def patient_split(df: pd.DataFrame, val_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split rows by patient: no patient on both sides.

    `val_fraction` in [0, 1) is the fraction of *patients* (not rows) sent to validation: round(n * val_fraction),
    at least 1 when val_fraction > 0 and there are at least 2 patients. Patients are ranked by sha256(seed, id), so the
    split depends only on the set of patient ids and the seed, not on row order. Each side keeps the input's row
    order and index.
    """
    if not 0 <= val_fraction < 1:
        raise InputError(f"val_fraction must be in [0, 1), got {val_fraction!r}", where="val_fraction")
    _require_columns(df, ("patient_id",), where="dataset table")
    ids = df["patient_id"]
    if ids.isna().any() or (ids.astype(str).str.strip() == "").any():
        raise InputError("patient_id is missing in some rows; a patient split needs it everywhere",
                         where="patient_id")
    patients = sorted(set(ids.astype(str)), key=lambda p: _patient_rank(p, seed))
    n_val = round(len(patients) * val_fraction)
    if val_fraction > 0 and len(patients) >= 2:
        n_val = min(max(n_val, 1), len(patients) - 1)
    val_patients = set(patients[:n_val])
    in_val = ids.astype(str).isin(val_patients)
    train_df, val_df = df[~in_val], df[in_val]
    log.event("patient_split", seed=seed, val_fraction=val_fraction, patients=len(patients),
              val_patients=len(val_patients), train_rows=len(train_df), val_rows=len(val_df))
    return train_df, val_df


# --------------------------------------------------------------------------------------------------------------------
# Dispatch

READERS: dict[str, Callable[..., pd.DataFrame]] = {
    "chexpert": read_chexpert,
    "nih": read_nih,
    "folder": read_folder,
    "dicom": read_dicom_folder,
}


def read_source(format: str, root: str, **options) -> pd.DataFrame:
    """Read a dataset in one of the formats of READERS ("chexpert", "nih", "folder", "dicom").

    Unknown format or an option the reader does not take -> InputError.
    """
    reader = READERS.get(format)
    if reader is None:
        raise InputError(f"unknown dataset format {format!r}; expected one of {sorted(READERS)}", where="format")
    accepted = set(inspect.signature(reader).parameters) - {"root"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise InputError(f"option(s) {unknown} not accepted by format {format!r}; accepted: {sorted(accepted)}",
                         where="options")
    return reader(root, **options)
