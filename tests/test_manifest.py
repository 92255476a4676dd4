"""The manifest is validated up front: every broken manifest exits 2, names the field, and writes nothing."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from reid_batch.cli import main
from reid_batch.manifest import load_manifest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "manifests" / "demo.yaml"
TEMPLATES = sorted((REPO / "manifests").glob("*.yaml"))


def demo_document() -> dict:
    return yaml.safe_load(DEMO.read_text())


def _set(doc: dict, path: str, value) -> dict:
    node = doc
    keys = path.split(".")
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node[key]
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return doc


def _del(doc: dict, path: str) -> dict:
    node = doc
    keys = path.split(".")
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node[key]
    del node[keys[-1]]
    return doc


# (id, mutation of the demo document, text the error must contain: the field path)
BROKEN = [
    ("unknown-top-level-key", lambda d: _set(d, "targetz", []), "targetz"),
    ("unknown-nested-key", lambda d: _set(d, "finetune.learning_rate", 0.1), "finetune.learning_rate"),
    ("missing-version", lambda d: _del(d, "version"), "version"),
    ("future-version", lambda d: _set(d, "version", 2), "version"),
    ("version-wrong-type", lambda d: _set(d, "version", "one"), "version"),
    ("missing-run-id", lambda d: _del(d, "run_id"), "run_id"),
    ("run-id-traversal", lambda d: _set(d, "run_id", "../../etc"), "run_id"),
    ("run-id-slash", lambda d: _set(d, "run_id", "a/b"), "run_id"),
    ("output-traversal", lambda d: _set(d, "output.uri", "runs/../../tmp"), "output.uri"),
    ("output-bad-scheme", lambda d: _set(d, "output.uri", "gs://bucket/x"), "output.uri"),
    ("output-empty", lambda d: _set(d, "output.uri", ""), "output.uri"),
    ("output-env-expansion", lambda d: _set(d, "output.uri", "$HOME/runs"), "output.uri"),
    ("s3-bad-bucket", lambda d: _set(d, "output.uri", "s3://Bad_Bucket/x"), "output.uri"),
    ("s3-endpoint-with-credentials", lambda d: _set(d, "output.s3", {"endpoint": "http://key:secret@host:9000"}), "output.s3.endpoint"),
    ("s3-bad-sse", lambda d: _set(d, "output.s3", {"sse": "rot13"}), "output.s3.sse"),
    ("negative-steps", lambda d: _set(d, "finetune.steps", -5), "finetune.steps"),
    ("zero-batch", lambda d: _set(d, "finetune.batch_size", 0), "finetune.batch_size"),
    ("lr-string", lambda d: _set(d, "finetune.lr", "fast"), "finetune.lr"),
    ("lr-nan", lambda d: _set(d, "finetune.lr", float("nan")), "finetune.lr"),
    ("bad-mixed-precision", lambda d: _set(d, "finetune.mixed_precision", "fp8"), "finetune.mixed_precision"),
    ("shards-exceed-candidates", lambda d: _set(d, "sampling.num_shards", 5000), "sampling"),
    ("batch-size-word", lambda d: _set(d, "sampling.batch_size", "huge"), "sampling.batch_size"),
    ("quantile-above-one", lambda d: _set(d, "selection.objective_quantile", 1.5), "selection.objective_quantile"),
    ("top-k-without-k", lambda d: _set(d, "selection.rule", "top_k"), "selection"),
    ("absolute-without-bounds", lambda d: _set(d, "selection.rule", "absolute"), "selection"),
    ("no-targets", lambda d: _set(d, "targets", []), "targets"),
    ("unknown-arch", lambda d: _set(d, "targets.0.arch", "resnet19"), "targets[0].arch"),
    ("duplicate-target-names", lambda d: _set(d, "targets.1.name", "cnn"), "unique"),
    ("target-name-spaces", lambda d: _set(d, "targets.0.name", "my target"), "targets[0].name"),
    ("target-no-checkpoint-no-train", lambda d: _del(d, "targets.0.train"), "targets[0]"),
    ("target-both-checkpoint-and-train", lambda d: _set(d, "targets.0.checkpoint", "x.pt"), "targets[0]"),
    ("vit-term-on-cnn", lambda d: _set(d, "targets.0.objective", {"terms": {"attn_entropy": 1.0}}), "targets[0]"),
    ("negative-term-weight", lambda d: _set(d, "targets.0.objective", {"terms": {"bn_stats": -1.0}}), "targets[0].objective.terms.bn_stats"),
    ("all-weights-zero", lambda d: _set(d, "targets.0.objective", {"terms": {"bn_stats": 0.0, "tv": 0.0}}), "targets[0]"),
    ("mean-wrong-length", lambda d: _set(d, "targets.0.input", {"size": 64, "channels": 3, "mean": [0.5]}), "targets[0].input"),
    ("std-zero", lambda d: _set(d, "targets.0.input", {"size": 64, "channels": 1, "mean": [0.5], "std": [0.0]}), "targets[0].input"),
    ("channels-two", lambda d: _set(d, "targets.0.input.channels", 2), "targets[0].input.channels"),
    ("bad-preset", lambda d: _set(d, "targets.0.train.preset", "extreme"), "targets[0].train.preset"),
    ("identity-section-on-normal", lambda d: _set(d, "targets.0.train.identity", {"patients": 4}), "targets[0].train"),
    ("identity-one-patient", lambda d: _set(d, "targets.4.train.identity.patients", 1), "targets[4].train.identity.patients"),
    ("identity-without-world", lambda d: _set(d, "data", {k: {"format": "folder", "root": "."} for k in ("private", "public", "control")}), "needs data.synthetic"),
    ("canaries-repeated-dose", lambda d: _set(d, "targets.0.train.canaries", {"duplicates": [4, 4]}), "targets[0].train.canaries"),
    ("canaries-dose-too-large", lambda d: _set(d, "targets.0.train.canaries", {"duplicates": [65]}), "targets[0].train.canaries.duplicates"),
    ("canaries-on-identity", lambda d: _set(d, "targets.4.train.canaries", {"per_dose": 4}), "targets[4].train"),
    ("canaries-crowded-world", lambda d: _set(_set(d, "targets.0.train.canaries", {}), "data.synthetic.private_patients", 55_000), "private_patients may be at most 50000"),
    ("baseline-unknown", lambda d: _set(d, "targets.1.baseline", "cnn-undefended"), "baseline 'cnn-undefended' must name another target"),
    ("baseline-itself", lambda d: _set(d, "targets.0.baseline", "cnn"), "baseline 'cnn' must name another target"),
    ("cohort-empty", lambda d: _set(d, "targets.0.train.cohort", {}), "targets[0].train.cohort"),
    ("cohort-ages-reversed", lambda d: _set(d, "targets.0.train.cohort", {"min_age": 70, "max_age": 60}), "targets[0].train.cohort"),
    ("class-offsets-without-logits", lambda d: _set(d, "targets.0.objective", {"terms": {"bn_stats": 1.0}, "class_offsets": True}), "targets[0]"),
    ("vit-custom-without-shape", lambda d: _set(d, "targets.0.arch", "vit_custom"), "targets[0]"),
    ("vit-patch-not-dividing", lambda d: _set(d, "targets.0", {"name": "v", "arch": "vit_custom", "train": {}, "input": {"size": 64}, "vit": {"patch_size": 7, "num_layers": 2, "num_heads": 2, "hidden_dim": 32, "mlp_dim": 64}}), "targets[0]"),
    ("vit-heads-not-dividing", lambda d: _set(d, "targets.0", {"name": "v", "arch": "vit_custom", "train": {}, "input": {"size": 64}, "vit": {"patch_size": 8, "num_layers": 2, "num_heads": 3, "hidden_dim": 32, "mlp_dim": 64}}), "targets[0].vit"),
    ("generator-bad-range", lambda d: _set(d, "generator.output_range", [0.0, 255.0]), "generator"),
    ("generator-bad-format", lambda d: _set(d, "generator.format", "pickle"), "generator.format"),
    ("generator-bad-arch", lambda d: _set(d, "generator.arch", "stylegan"), "generator.arch"),
    ("generator-no-source", lambda d: _del(d, "generator.train"), "generator"),
    ("generator-depth-zero", lambda d: _set(d, "generator.depths", [128, 0, 64]), "generator.depths[1]"),
    ("demographics-missing", lambda d: _del(d, "demographics"), "demographics"),
    ("synthetic-tiny-image", lambda d: _set(d, "data.synthetic.image_size", 8), "data.synthetic.image_size"),
    ("synthetic-on-s3", lambda d: _set(d, "data.synthetic.root", "s3://bucket/world"), "data.synthetic.root"),
    ("no-data-at-all", lambda d: _set(d, "data", {}), "data"),
    ("bad-source-format", lambda d: _set(d, "data.private", {"format": "xlsx", "root": "."}), "data.private.format"),
    ("val-fraction-one", lambda d: _set(d, "data.val_fraction", 1.0), "data.val_fraction"),
    ("negative-seed", lambda d: _set(d, "sampling.seed", -1), "sampling.seed"),
    ("missing-checkpoint-file", lambda d: _set(d, "targets.0", {"name": "cnn", "arch": "resnet18", "checkpoint": "/nonexistent/model.pt"}), "targets[0].checkpoint"),
    ("missing-data-root", lambda d: _set(d, "data.public", {"format": "nih", "root": "/nonexistent/nih"}), "data.public.root"),
    ("missing-inception-weights", lambda d: _set(d, "evaluation.inception_weights", "/nonexistent/inception.pth"), "evaluation.inception_weights"),
]


def _files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_broken_suite_is_large_and_distinct():
    ids = [b[0] for b in BROKEN]
    assert len(ids) >= 30 and len(set(ids)) == len(ids)


@pytest.mark.parametrize("name,mutate,field", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_manifest_exits_2_naming_field_and_writes_nothing(name, mutate, field, tmp_path, capsys, monkeypatch):
    document = mutate(copy.deepcopy(demo_document()))
    manifest_path = tmp_path / "broken.yaml"
    manifest_path.write_text(yaml.safe_dump(document))
    monkeypatch.chdir(tmp_path)
    before = _files_under(tmp_path)
    for command in (["validate", str(manifest_path)], ["run", str(manifest_path)]):
        code = main(command)
        err = capsys.readouterr().err
        assert code == 2, f"{name}: {command[0]} exited {code}: {err}"
        assert field in err, f"{name}: error does not name {field!r}:\n{err}"
        assert "Traceback" not in err
    assert _files_under(tmp_path) == before, "a rejected manifest must not write anything"


@pytest.mark.parametrize(
    "text,needle",
    [
        ("version: 1\nversion: 1\n", "duplicate key"),
        ("version: [1\n", "not valid YAML"),
        ("- just\n- a list\n", "mapping"),
        ("!!python/object/apply:os.system ['true']\n", "not valid YAML"),
    ],
    ids=["duplicate-key", "yaml-syntax", "top-level-list", "python-tag"],
)
def test_unparsable_manifests_exit_2(text, needle, tmp_path, capsys):
    path = tmp_path / "m.yaml"
    path.write_text(text)
    assert main(["validate", str(path)]) == 2
    assert needle in capsys.readouterr().err


def test_missing_manifest_file_names_it(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_demo_manifest_is_valid():
    manifest = load_manifest(DEMO)
    assert manifest.version == 1
    assert {t.family for t in manifest.targets} == {"cnn", "vit"}  # the study compares both families
    assert manifest.source("public").format == "nih"
    assert manifest.source("private").root.endswith("private")


@pytest.mark.parametrize("path", TEMPLATES, ids=[p.name for p in TEMPLATES])
def test_every_shipped_manifest_passes_schema_only(path):
    load_manifest(path, schema_only=True)


def test_study_template_is_paper_faithful():
    manifest = load_manifest(REPO / "manifests" / "chexpert-study.yaml", schema_only=True)
    assert [t.arch for t in manifest.targets] == ["resnet18", "resnet18", "vit_b_16", "vit_b_16"]
    assert (manifest.finetune.lr, manifest.finetune.steps, manifest.finetune.batch_size) == (1e-5, 2500, 8)
    cnn = manifest.targets[0].terms
    assert cnn == {"bn_stats": 1.0, "feature_stats": 1.0, "logits": 1.0, "tv": 1e-5}
    assert manifest.generator.resolution == 1024


def test_default_terms_follow_architecture():
    document = demo_document()
    document["targets"].append(
        {"name": "vit", "arch": "vit_custom", "train": {}, "input": {"size": 64},
         "vit": {"patch_size": 8, "num_layers": 2, "num_heads": 2, "hidden_dim": 32, "mlp_dim": 64}}
    )
    from reid_batch.manifest import parse_manifest

    manifest = parse_manifest(document)
    assert set(manifest.target("vit").terms) == {"ln_stats", "cls_magnitude", "attn_entropy", "attn_diversity", "logits", "tv"}
    assert set(manifest.target("cnn").terms) == {"bn_stats", "feature_stats", "logits", "tv"}


def test_cli_subprocess_exit_codes_and_no_torch_import(tmp_path):
    """validate runs as a real process, exits 0/2, and never imports torch (fast start on clusters)."""
    probe = (
        "import sys; from reid_batch.cli import main; code = main(sys.argv[1:]); "
        "assert 'torch' not in sys.modules, 'validate imported torch'; sys.exit(code)"
    )
    ok = subprocess.run([sys.executable, "-c", probe, "validate", str(DEMO)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(DEMO.read_text().replace("steps: 120", "steps: -1"))
    result = subprocess.run([sys.executable, "-m", "reid_batch", "validate", str(bad)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "finetune.steps" in result.stderr


def test_shard_defaults_from_scheduler_environment(monkeypatch):
    import argparse

    from reid_batch.cli import resolve_shard
    from reid_batch.errors import InputError

    args = argparse.Namespace(shard=None, num_shards=None)
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    assert resolve_shard(args, 4) is None
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
    assert resolve_shard(args, 4) == 2
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert resolve_shard(args, 4) == 3
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "4")
    with pytest.raises(InputError, match="SLURM_ARRAY_TASK_ID"):
        resolve_shard(args, 4)
    with pytest.raises(InputError, match="--num-shards"):
        resolve_shard(argparse.Namespace(shard=0, num_shards=3), 4)
    assert resolve_shard(argparse.Namespace(shard=1, num_shards=4), 4) == 1
    os.environ.pop("SLURM_ARRAY_TASK_ID", None)


def test_docs_manifest_field_reference_is_generated_from_the_schema():
    from reid_batch.manifest import reference_markdown

    document = (REPO / "docs" / "manifest.md").read_text()
    block = document.split("<!-- manifest-reference:start -->\n", 1)[1].split("<!-- manifest-reference:end -->", 1)[0]
    assert block.strip() == reference_markdown().strip(), "regenerate the field reference in docs/manifest.md"


def test_reference_statistics_default_to_public_images():
    """The prior's own samples as reference put stage 1 at the terms' minimum from the start: public is the default,
    and the report says where the reference came from."""
    from reid_batch.manifest import ReferenceSpec
    from reid_batch.reporting.text import attack_terms_text

    assert ReferenceSpec().source == "public"
    terms = {"ln_stats": 1.0, "logits": 1.0}
    text = attack_terms_text({"terms": terms, "reference": {"source": "public", "images": 256}})
    assert text.endswith("reference statistics from 256 public-pool images")
    assert "the terms start at their minimum" in attack_terms_text(
        {"terms": terms, "reference": {"source": "prior", "num_images": 13}})
    assert "BatchNorm running statistics" in attack_terms_text({"terms": {"bn_stats": 1.0}, "reference": None})
