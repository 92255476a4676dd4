"""Hostile and broken inputs: every one exits 2 with a message naming the input, no traceback, no code executed,
no output published.

Each case runs the real command line (`reid_batch.cli.main`, in-process for speed; a representative subset and
every malicious pickle also as a separate `python -m reid_batch` process) with the cheapest stage that reads
that input: `validate` for manifests, `finetune` for target and generator checkpoints (it loads both before any
work), `train-target` for datasets (it reads the CSV and decodes every image before training). Demographic
checkpoints are only read after a whole attack, so they go through the loader `score` uses. Inputs that are
unusual but valid (16-bit PNG, RGBA, CMYK, grey+alpha) must load, with the documented scaling.

tests/test_manifest.py holds 62 more broken manifests (field types, ranges, unknown keys, traversal in run_id
and output.uri, `$HOME` in output.uri, YAML tags, duplicate keys); the cases here add the kinds it lacks.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from reid_batch.cli import main
from helpers import build_inputs, make_manifest

REPO = Path(__file__).resolve().parents[1]
MARKER_NAME = "code-was-executed"
TRIED: dict[str, int] = {}


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    print(f"\nhostile inputs tried: {TRIED} (total {sum(TRIED.values())})")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return build_inputs(tmp_path_factory.mktemp("inputs"))


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def expect_refused(args: list[str], needle: str, capsys, outputs: Path, category: str) -> str:
    """Run the CLI in-process: exit 2, `needle` (the input's name) in the message, no traceback, nothing written."""
    TRIED[category] = TRIED.get(category, 0) + 1
    before = _files(outputs)
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, f"exit {code}:\n{err[-3000:]}"
    message = err[err.index("reid-batch: invalid input:"):]
    assert needle in message, f"{needle!r} not named in:\n{message}"
    assert "Traceback" not in err
    assert _files(outputs) == before, "a refused input must not write anything"
    return message


def run_process(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "reid_batch", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


# ------------------------------------------------------------------------------------------------- manifests


def demo_document() -> dict:
    return yaml.safe_load((REPO / "manifests" / "demo.yaml").read_text())


def _billion_laughs() -> str:
    levels = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, 9):
        levels.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(levels) + "\ntargets: *a8\n"


# (id, YAML text or a mutation of the demo document, text the message must name)
MANIFESTS = [
    ("run-id-command-substitution", lambda d: d.update(run_id=f"$(touch {MARKER_NAME})"), "run_id"),
    ("run-id-braced-env", lambda d: d.update(run_id="${HOME}"), "run_id"),
    ("run-id-dotdot", lambda d: d.update(run_id=".."), "run_id"),
    ("run-id-too-long", lambda d: d.update(run_id="r" * 65), "run_id"),
    ("run-id-nul", lambda d: d.update(run_id="demo\x00x"), "run_id"),
    ("output-command-substitution", lambda d: d["output"].update(uri=f"runs/$(touch {MARKER_NAME})"), "output.uri"),
    ("output-braced-env", lambda d: d["output"].update(uri="${HOME}/runs"), "output.uri"),
    ("output-s3-traversal", lambda d: d["output"].update(uri="s3://bucket-name/a/../../b"), "output.uri"),
    ("output-file-uri-traversal", lambda d: d["output"].update(uri="file:///tmp/../etc"), "output.uri"),
    ("output-nul-byte", lambda d: d["output"].update(uri="runs\x00/x"), "output.uri"),
    ("output-newline", lambda d: d["output"].update(uri="runs\n/x"), "output.uri"),
    ("s3-endpoint-file-scheme", lambda d: d["output"].update(s3={"endpoint": "file:///etc/passwd"}), "output.s3.endpoint"),
    ("s3-endpoint-with-path", lambda d: d["output"].update(s3={"endpoint": "http://host:9000/path"}), "output.s3.endpoint"),
    ("s3-retry-budget-negative", lambda d: d["output"].update(s3={"retry_budget_s": -1}), "output.s3.retry_budget_s"),
    ("s3-retry-attempts-zero", lambda d: d["output"].update(s3={"retry_max_attempts": 0}), "output.s3.retry_max_attempts"),
    ("target-name-traversal", lambda d: d["targets"][0].update(name="../x"), "targets[0].name"),
    ("target-name-reserved", lambda d: d["targets"][0].update(name="resume"), "targets[0].name"),
    ("target-name-env", lambda d: d["targets"][0].update(name="$USER"), "targets[0].name"),
    ("data-root-env", lambda d: d["data"].update(private={"format": "chexpert", "root": "${HOME}/chexpert"}), "data.private.root"),
    ("data-root-command", lambda d: d["data"].update(private={"format": "chexpert", "root": f"$(touch {MARKER_NAME})"}), "data.private.root"),
    ("checkpoint-command-not-run", lambda d: (d["targets"][0].pop("train"), d["targets"][0].update(checkpoint=f"$(touch {MARKER_NAME}).pt")), "targets[0].checkpoint"),
    ("steps-infinite", lambda d: d["finetune"].update(steps=float("inf")), "finetune.steps"),
    ("steps-huge-float", lambda d: d["finetune"].update(steps=1e30), "finetune.steps"),
    ("seed-too-large", lambda d: d["sampling"].update(seed=2**64), "sampling.seed"),
    ("candidates-list", lambda d: d["sampling"].update(num_candidates=[1, 2]), "sampling.num_candidates"),
    ("section-as-string", lambda d: d.update(finetune="fast please"), "finetune"),
    ("image-size-huge", lambda d: d["targets"][0]["input"].update(size=10**6), "targets[0].input.size"),
    ("billion-laughs", "version: 1\n" + _billion_laughs(), "targets"),
    ("empty-file", "", "mapping"),
    ("binary-file", b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "cannot read manifest"),
    ("yaml-python-object", "version: !!python/object/new:os.system [touch " + MARKER_NAME + "]\n", "not valid YAML"),
]


@pytest.mark.parametrize("name,content,needle", MANIFESTS, ids=[m[0] for m in MANIFESTS])
def test_broken_manifest_is_refused(name, content, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "manifest.yaml"
    if callable(content):
        document = demo_document()
        content(document)
        path.write_text(yaml.safe_dump(document, allow_unicode=True))
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    expect_refused(["validate", str(path)], needle, capsys, tmp_path, "manifests")
    assert not (tmp_path / MARKER_NAME).exists()


def test_manifest_given_as_a_directory(tmp_path, capsys):
    (tmp_path / "m.yaml").mkdir()
    expect_refused(["validate", str(tmp_path / "m.yaml")], "m.yaml", capsys, tmp_path, "manifests")


# ------------------------------------------------------------------------------------------------ checkpoints


class _Exploit:
    """Unpickling this runs a shell command (here: creating a marker file)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _ExecExploit:
    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (exec, (f"open({str(self.path)!r}, 'w').write('x')",))


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _safetensors_header_bomb() -> bytes:
    return struct.pack("<Q", 10**12) + b"{}"


def _state(inputs) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(inputs["cnn"]))


def _write_checkpoint(kind: str, inputs, directory: Path, marker: Path) -> Path:
    from safetensors.torch import save_file

    state = _state(inputs)
    pt = directory / f"{kind}.pt"
    st = directory / f"{kind}.safetensors"
    if kind == "pickle-os-system":
        pt.write_bytes(pickle.dumps({"state_dict": _Exploit(f"touch {marker}")}))
    elif kind == "pickle-exec":
        pt.write_bytes(pickle.dumps(_ExecExploit(marker)))
    elif kind == "torch-save-with-exploit":
        torch.save({"conv1.weight": state["conv1.weight"], "hook": _Exploit(f"touch {marker}")}, pt)
    elif kind == "pickle-named-safetensors":
        st.write_bytes(pickle.dumps(_Exploit(f"touch {marker}")))
        return st
    elif kind == "truncated-pt":
        buffer = io.BytesIO()
        torch.save(state, buffer)
        pt.write_bytes(_truncated(buffer.getvalue()))
    elif kind == "truncated-safetensors":
        st.write_bytes(_truncated(inputs["cnn"].read_bytes()))
        return st
    elif kind == "zero-bytes":
        pt.write_bytes(b"")
    elif kind == "random-bytes":
        pt.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "safetensors-header-bomb":
        st.write_bytes(_safetensors_header_bomb())
        return st
    elif kind == "wrong-architecture":
        return inputs["vit"]
    elif kind == "nan-weights":
        save_file({**state, "layer1.0.conv1.weight": torch.full_like(state["layer1.0.conv1.weight"], float("nan"))}, str(st))
        return st
    elif kind == "inf-weights":
        torch.save({**state, "fc.1.bias": torch.tensor([float("inf")])}, pt)
    elif kind == "zero-classes":
        save_file({**state, "fc.1.weight": torch.zeros(0, 512), "fc.1.bias": torch.zeros(0)}, str(st))
        return st
    elif kind == "wrong-shape":
        save_file({**state, "conv1.weight": torch.zeros(64, 3, 3, 3)}, str(st))
        return st
    elif kind == "wrong-dtype":
        save_file({**state, "conv1.weight": state["conv1.weight"].round().to(torch.int64)}, str(st))
        return st
    elif kind == "not-a-mapping":
        torch.save([state["conv1.weight"]], pt)
    elif kind == "strings-not-tensors":
        torch.save({"conv1.weight": "zeros"}, pt)
    elif kind == "empty-state-dict":
        torch.save({}, pt)
    else:
        raise AssertionError(kind)
    return pt


CHECKPOINTS = [
    ("pickle-os-system", "refused"), ("pickle-exec", "refused"), ("torch-save-with-exploit", "refused"),
    ("pickle-named-safetensors", "safetensors"), ("truncated-pt", "truncated"), ("truncated-safetensors", "truncated"),
    ("zero-bytes", "truncated"), ("random-bytes", "checkpoint"), ("safetensors-header-bomb", "safetensors"),
    ("wrong-architecture", "architecture"), ("nan-weights", "NaN"), ("inf-weights", "NaN or infinite"),
    ("zero-classes", "no outputs"), ("wrong-shape", "shape mismatch"), ("wrong-dtype", "dtype"),
    ("not-a-mapping", "state dict"), ("strings-not-tensors", "not tensors"), ("empty-state-dict", "no tensors"),
]


def _attack_manifest(inputs, tmp_path: Path, target: Path | None = None, prior: Path | None = None) -> Path:
    document = make_manifest(inputs, str(tmp_path / "out")).model_dump(mode="json", exclude_none=True)
    document["finetune"] = {"steps": 2, "batch_size": 2, "checkpoint_every": 1}
    if target is not None:
        document["targets"][0]["checkpoint"] = str(target)
    if prior is not None:
        document["generator"]["checkpoint"] = str(prior)
    path = tmp_path / "attack.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.mark.parametrize("kind,needle", CHECKPOINTS, ids=[c[0] for c in CHECKPOINTS])
def test_broken_target_checkpoint_is_refused(kind, needle, inputs, tmp_path, capsys):
    marker = tmp_path / MARKER_NAME
    checkpoint = _write_checkpoint(kind, inputs, tmp_path, marker)
    manifest = _attack_manifest(inputs, tmp_path, target=checkpoint)
    message = expect_refused(["finetune", str(manifest)], str(checkpoint), capsys, tmp_path / "out", "checkpoints")
    assert needle in message
    assert not marker.exists(), "unpickling ran code from the checkpoint"


@pytest.mark.parametrize("kind", ["pickle-os-system", "truncated-safetensors", "nan-weights"])
def test_broken_generator_checkpoint_is_refused(kind, inputs, tmp_path, capsys):
    marker = tmp_path / MARKER_NAME
    checkpoint = _write_checkpoint(kind, inputs, tmp_path, marker)
    if kind == "nan-weights":  # a generator's own weights, poisoned
        from safetensors.torch import load_file, save_file

        state = load_file(str(inputs["prior"]))
        from safetensors import safe_open

        with safe_open(str(inputs["prior"]), "pt") as handle:
            metadata = handle.metadata()
        first = next(k for k, v in state.items() if v.is_floating_point())
        save_file({**state, first: torch.full_like(state[first], float("nan"))}, str(checkpoint), metadata=metadata)
    manifest = _attack_manifest(inputs, tmp_path, prior=checkpoint)
    expect_refused(["finetune", str(manifest)], str(checkpoint), capsys, tmp_path / "out", "checkpoints")
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["nan-weights", "wrong-classes", "wrong-architecture", "pickle-os-system"])
def test_broken_demographic_checkpoint_is_refused(kind, inputs, tmp_path):
    from safetensors.torch import load_file, save_file

    from reid_batch.artifacts import load_demographic_model
    from reid_batch.errors import InputError
    from reid_batch.manifest import parse_manifest

    TRIED["checkpoints"] = TRIED.get("checkpoints", 0) + 1
    marker = tmp_path / MARKER_NAME
    state = load_file(str(inputs["demographics"]))
    checkpoint = tmp_path / "demographics.safetensors"
    if kind == "nan-weights":
        save_file({**state, "age_head.weight": torch.full_like(state["age_head.weight"], float("nan"))}, str(checkpoint))
    elif kind == "wrong-classes":  # a sex head with two outputs instead of one logit
        width = state["sex_head.weight"].shape[1]
        save_file({**state, "sex_head.weight": torch.zeros(2, width), "sex_head.bias": torch.zeros(2)}, str(checkpoint))
    elif kind == "wrong-architecture":
        checkpoint = inputs["cnn"]
    else:
        checkpoint = tmp_path / "demographics.pt"
        checkpoint.write_bytes(pickle.dumps(_Exploit(f"touch {marker}")))
    document = make_manifest(inputs, str(tmp_path / "out")).model_dump(mode="json", exclude_none=True)
    document["demographics"]["checkpoint"] = str(checkpoint)
    with pytest.raises(InputError, match=str(checkpoint)):
        load_demographic_model(parse_manifest(document))
    assert not marker.exists()


@pytest.mark.slow
def test_malicious_pickles_in_a_real_process_never_run_code(inputs, tmp_path):
    """The same refusals from `python -m reid_batch finetune` (a bare pickle as the target, a torch.save zip as the
    generator): the exploit would create a marker file. Each process costs a torch import, so two suffice."""
    marker = tmp_path / MARKER_NAME
    for kind, role in (("pickle-os-system", "target"), ("torch-save-with-exploit", "prior")):
        checkpoint = _write_checkpoint(kind, inputs, tmp_path, marker)
        manifest = _attack_manifest(inputs, tmp_path, **{role: checkpoint})
        result = run_process(["finetune", str(manifest)], tmp_path)
        assert result.returncode == 2, result.stderr[-3000:]
        assert str(checkpoint) in result.stderr and "refused" in result.stderr and "Traceback" not in result.stderr
        assert not marker.exists(), f"{kind} as {role}: code ran"
        assert not _files(tmp_path / "out")


# ----------------------------------------------------------------------------------------- images and CSVs


CHEXPERT_HEADER = "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Cardiomegaly"


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def _good_png(seed: int) -> bytes:
    return _png(np.random.default_rng(seed).integers(0, 255, (16, 16), dtype=np.uint8))


def _png_with_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims another size: what a decompression bomb looks like before decoding."""
    data = bytearray(_png(np.zeros((1, 1), dtype=np.uint8)))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4: ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17: ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr: ihdr + 17])))
    return bytes(data)


def _jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG")
    return buffer.getvalue()


def _jpeg_with_size(width: int, height: int) -> bytes:
    data = bytearray(_jpeg(np.zeros((8, 8), dtype=np.uint8)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5: sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _dicom_without_pixels() -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.PatientID = "p1"
    dataset.Rows, dataset.Columns = 16, 16
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _float_tiff() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ones((8, 8), dtype=np.float32), mode="F").save(buffer, format="TIFF")
    return buffer.getvalue()


def _corrupt_png_crc() -> bytes:
    data = bytearray(_good_png(9))
    idat = data.index(b"IDAT")
    data[idat + 6] ^= 0xFF
    return bytes(data)


# (id, file name, bytes of the first image in the CSV)
IMAGES = [
    ("truncated-png", "view1.png", lambda: _truncated(_good_png(1))),
    ("truncated-jpeg", "view1.jpg", lambda: _truncated(_jpeg(np.full((64, 64), 100, dtype=np.uint8)))),
    ("zero-size", "view1.png", lambda: b""),
    ("png-decompression-bomb", "view1.png", lambda: _png_with_size(200_000, 200_000)),
    ("jpeg-decompression-bomb", "view1.jpg", lambda: _jpeg_with_size(60_000, 60_000)),
    ("text-named-png", "view1.png", lambda: b"this is not an image\n"),
    ("png-bad-crc", "view1.png", _corrupt_png_crc),
    ("float-tiff-named-png", "view1.png", _float_tiff),
    ("dicom-without-pixel-data", "view1.dcm", _dicom_without_pixels),
    ("dicom-truncated", "view1.dcm", lambda: _truncated(_dicom_without_pixels())),
    ("missing-file", "view1.png", None),
]


def _chexpert(root: Path, rows: list[str] | None = None, first_image: bytes | None = None, first_name="view1.png",
              remove_first: bool = False, csv_text: str | bytes | None = None) -> Path:
    """A tiny CheXpert layout: four patients, labels 0/1; the first image replaced by `first_image` (or removed)."""
    folder = root / "CheXpert-v1.0-small"
    rows = rows if rows is not None else [
        f"CheXpert-v1.0-small/train/patient0000{i}/study1/{first_name if i == 1 else 'view1.png'},"
        f"{'Male' if i % 2 else 'Female'},{40 + i},Frontal,PA,{i % 2},{1 - i % 2}" for i in range(1, 5)]
    for i in range(1, 5):
        study = folder / "train" / f"patient0000{i}" / "study1"
        study.mkdir(parents=True, exist_ok=True)
        (study / "view1.png").write_bytes(_good_png(i))
    if remove_first:
        (folder / "train" / "patient00001" / "study1" / first_name).unlink(missing_ok=True)
    elif first_image is not None:
        (folder / "train" / "patient00001" / "study1" / first_name).write_bytes(first_image)
    csv = folder / "train.csv"
    if csv_text is None:
        csv.write_text("\n".join([CHEXPERT_HEADER, *rows]) + "\n")
    elif isinstance(csv_text, bytes):
        csv.write_bytes(csv_text)
    else:
        csv.write_text(csv_text)
    return csv


def _train_manifest(inputs, tmp_path: Path, private: dict) -> Path:
    document = make_manifest(inputs, str(tmp_path / "out")).model_dump(mode="json", exclude_none=True)
    public = tmp_path / "public"
    public.mkdir(exist_ok=True)
    document["data"] = {"private": private, "public": {"format": "nih", "root": str(public)}, "val_fraction": 0.25}
    document["targets"] = [{"name": "cnn", "arch": "resnet18", "input": {"size": 16},
                            "train": {"epochs": 1, "batch_size": 4}}]
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.mark.parametrize("name,file_name,content", IMAGES, ids=[i[0] for i in IMAGES])
def test_broken_image_is_refused(name, file_name, content, inputs, tmp_path, capsys):
    root = tmp_path / "chexpert"
    _chexpert(root, first_image=content() if content else None, first_name=file_name, remove_first=content is None)
    bad = root / "CheXpert-v1.0-small" / "train" / "patient00001" / "study1" / file_name
    manifest = _train_manifest(inputs, tmp_path, {"format": "chexpert", "root": str(root)})
    expect_refused(["train-target", str(manifest)], str(bad), capsys, tmp_path / "out", "images")


def _csv_row(path="CheXpert-v1.0-small/train/patient00001/study1/view1.png", sex="Male", age="41",
             frontal="Frontal", view="PA", no_finding="0", cardiomegaly="1") -> str:
    return ",".join([path, sex, age, frontal, view, no_finding, cardiomegaly])


def _good_rows() -> list[str]:
    return [_csv_row(path=f"CheXpert-v1.0-small/train/patient0000{i}/study1/view1.png", sex=["Male", "Female"][i % 2],
                     no_finding=str(i % 2), cardiomegaly=str(1 - i % 2)) for i in range(1, 5)]


CSVS = [
    ("missing-age-column", dict(csv_text="Path,Sex,Frontal/Lateral,AP/PA,No Finding,Cardiomegaly\n"), "Age"),
    ("age-not-a-number", dict(rows=[_csv_row(age="forty"), *_good_rows()[1:]]), "forty"),
    ("age-impossible", dict(rows=[_csv_row(age="450"), *_good_rows()[1:]]), "450"),
    ("label-not-a-number", dict(rows=[_csv_row(cardiomegaly="yes"), *_good_rows()[1:]]), "Cardiomegaly"),
    ("duplicated-rows", dict(rows=[*_good_rows(), _good_rows()[2]]), "duplicate"),
    ("empty-file", dict(csv_text=""), "train.csv"),
    ("header-only", dict(csv_text=CHEXPERT_HEADER + "\n"), "after the cohort rules"),
    ("no-row-survives-the-cohort-rules", dict(rows=[_csv_row(frontal="Lateral")]), "after the cohort rules"),
    ("not-utf8", dict(csv_text=CHEXPERT_HEADER.encode() + b"\n\xff\xfe\xfa,\xff\n"), "train.csv"),
    ("ragged-rows", dict(rows=[_csv_row() + ",extra,fields", *_good_rows()[1:]]), "train.csv"),
    ("path-escapes-the-dataset", dict(rows=[_csv_row(path="../../../../etc/patient00001/passwd"), *_good_rows()[1:]]), "outside"),
    ("path-without-patient", dict(rows=[_csv_row(path="CheXpert-v1.0-small/train/someone/view1.png"), *_good_rows()[1:]]), "patientNNNNN"),
    ("binary-csv", dict(csv_text=_good_png(3)), "train.csv"),
]


@pytest.mark.parametrize("name,options,needle", CSVS, ids=[c[0] for c in CSVS])
def test_broken_csv_is_refused(name, options, needle, inputs, tmp_path, capsys):
    root = tmp_path / "chexpert"
    csv = _chexpert(root, **options)
    manifest = _train_manifest(inputs, tmp_path, {"format": "chexpert", "root": str(root)})
    # The CSV is named, or for an empty cohort the data source it came from.
    message = expect_refused(["train-target", str(manifest)], str(root), capsys, tmp_path / "out", "csvs")
    assert needle in message


NIH_HEADER = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position"


@pytest.mark.parametrize("name,rows,needle", [
    ("nih-age-over-120", ["a.png,No Finding,0,1,150,M,PA", "b.png,Cardiomegaly,0,2,50,F,PA"], "150"),
    ("nih-age-text", ["a.png,No Finding,0,1,old,M,PA", "b.png,Cardiomegaly,0,2,50,F,PA"], "old"),
    ("nih-duplicated-image", ["a.png,No Finding,0,1,40,M,PA", "a.png,Cardiomegaly,0,2,50,F,PA"], "duplicate"),
    ("nih-missing-patient-column", None, "Patient ID"),
], ids=lambda v: v if isinstance(v, str) and v.startswith("nih") else "")
def test_broken_nih_csv_is_refused(name, rows, needle, inputs, tmp_path, capsys):
    root = tmp_path / "nih"
    (root / "images").mkdir(parents=True)
    for image in ("a.png", "b.png"):
        (root / "images" / image).write_bytes(_good_png(5))
    csv = root / "Data_Entry_2017.csv"
    csv.write_text("Image Index,Finding Labels\na.png,No Finding\n" if rows is None else "\n".join([NIH_HEADER, *rows]) + "\n")
    manifest = _train_manifest(inputs, tmp_path, {"format": "nih", "root": str(root)})
    message = expect_refused(["train-target", str(manifest)], str(csv), capsys, tmp_path / "out", "csvs")
    assert needle in message


def test_a_representative_subset_in_real_processes(inputs, tmp_path):
    """A manifest and an image case again as `python -m reid_batch` processes: exit 2, named, no traceback."""
    cases = []
    bad_manifest = tmp_path / "bad.yaml"
    bad_manifest.write_text(yaml.safe_dump({**demo_document(), "run_id": f"$(touch {MARKER_NAME})"}))
    cases.append((["validate", str(bad_manifest)], "run_id"))
    images = tmp_path / "images"
    _chexpert(images / "chexpert", first_image=_png_with_size(200_000, 200_000))
    image_manifest = _train_manifest(inputs, images, {"format": "chexpert", "root": str(images / "chexpert")})
    cases.append((["train-target", str(image_manifest)], "decompression bomb"))
    for args, needle in cases:
        result = run_process(args, tmp_path)
        assert result.returncode == 2, result.stderr[-3000:]
        assert needle in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / MARKER_NAME).exists()
    assert not _files(images / "out")


# ------------------------------------------------------------------------------------ unusual but valid images


@pytest.mark.parametrize("name", ["png-16-bit", "rgba", "cmyk-jpeg", "grey-alpha"])
def test_unusual_but_valid_images_load_with_documented_scaling(name, tmp_path):
    from reid_batch.data.datasets import load_image

    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    if name == "png-16-bit":
        path = tmp_path / "x.png"
        Image.fromarray(grey.astype(np.uint16) * 257).save(path)  # 0..65535, the full 16-bit range
        expected = grey / 255.0
    elif name == "rgba":
        path = tmp_path / "x.png"
        Image.fromarray(np.dstack([grey, grey, grey, np.zeros_like(grey)]), mode="RGBA").save(path)
        expected = grey / 255.0  # alpha dropped, grey RGB -> the same luminance
    elif name == "cmyk-jpeg":
        path = tmp_path / "x.jpg"
        Image.fromarray(np.dstack([grey] * 3)).convert("CMYK").save(path, quality=100)
        expected = None  # lossy: only the range and shape are exact
    else:
        path = tmp_path / "x.png"
        Image.fromarray(np.dstack([grey, np.full_like(grey, 128)]), mode="LA").save(path)
        expected = grey / 255.0
    image = load_image(path, size=None)
    assert image.shape == (1, 16, 16) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    if expected is not None:
        np.testing.assert_allclose(image[0].numpy(), expected, atol=1.5 / 255)
