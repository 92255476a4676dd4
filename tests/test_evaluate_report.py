"""`evaluate` and `report` on a tiny but complete pipeline: a 32 px synthetic world, a target and a control model
trained for one epoch by the recipe, stage 1 for 2 steps, 64 candidates, selection, scoring, evaluation, report.

The metric functions themselves are checked against their references in test_metrics.py; here the point is that
the stage wires them to the right data and that the report says what the Parquet outputs say.
The pipeline's manifest and inputs are built by helpers.evaluation_manifest and helpers.evaluation_inputs.
"""

from __future__ import annotations

import base64
from html import escape as html_escape
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from reid_batch.errors import InputError
from reid_batch.manifest import parse_manifest
from reid_batch.results import Evaluation, read
from reid_batch.analysis.leak import control_leak
from reid_batch.reporting.sentences import canary_sentence, control_sentence
from reid_batch.reporting.tables import canary_rows, control_rows, leak_rows, population_rows, prior_rows, risk_rows
from reid_batch.reporting.text import leak_cell
from reid_batch.reporting.verdicts import headline, leak_entry
from reid_batch.runtime import run_store
from helpers import (EVALUATION_SIZE as SIZE, EVALUATION_WORLD as WORLD, LATENT, evaluation_inputs,
                     evaluation_manifest)

REPO = Path(__file__).resolve().parents[1]
TARGETS = ("cnn", "cnn-control")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The whole pipeline run once, each stage called directly: (manifest, root)."""
    from reid_batch.data.phantoms import WorldConfig, write_world
    from reid_batch.stages import finetune, train_reid, train_target
    from reid_batch.stages import calibrate, evaluate, ppa, report, sample, score, select

    root = tmp_path_factory.mktemp("evaluate")
    manifest = evaluation_manifest(root, evaluation_inputs(root), str(root / "out"))
    write_world(manifest.data.synthetic.root, WorldConfig(**WORLD, device_rate=0.3, workers=1))
    train_target.run(manifest)
    train_reid.run(manifest)
    finetune.run(manifest)
    sample.sample(manifest)
    select.select(manifest)
    # A missing input is the user's to fix: the messages name the stage to run.
    with pytest.raises(InputError, match="score"):
        evaluate.evaluate(manifest, target="cnn")
    with pytest.raises(InputError, match="evaluate"):
        report.report(manifest)
    score.score(manifest)
    with pytest.raises(InputError, match="reid-batch ppa --target cnn"):
        evaluate.evaluate(manifest, target="cnn")
    assert ppa.run(manifest) == 0
    assert evaluate.evaluate(manifest) == 0
    with pytest.raises(InputError, match="calibrate"):
        report.report(manifest)
    assert calibrate.calibrate(manifest) == 0
    assert report.report(manifest) == 0
    return manifest, root


def _outputs(manifest, name: str):
    from reid_batch.layout import METRICS_FILE, TABLE_FILE, evaluation_prefix

    store = run_store(manifest)
    prefix = evaluation_prefix(name)
    assert store.is_committed(prefix)
    metrics = store.read_json(f"{prefix}/{METRICS_FILE}")
    # The typed record evaluate wrote reads back as exactly the JSON on disk (every field of a real run is known).
    assert read(Evaluation, store, f"{prefix}/{METRICS_FILE}").to_json() == metrics
    table = store.read_parquet(f"{prefix}/{TABLE_FILE}").to_pandas()
    return store, metrics, table


def _truth(root: Path, pool: str) -> pd.DataFrame:
    return pd.read_csv(root / "world" / pool / "ground_truth.csv").drop_duplicates("patient_id").set_index("patient_id")


def _number(patient: str) -> int:
    return int(re.sub(r"\D", "", patient))


@pytest.mark.slow
@pytest.mark.parametrize("name", TARGETS)
def test_likely_samples_matched_to_the_targets_own_training_images(pipeline, name):
    from reid_batch.data.datasets import load_image
    from reid_batch.analysis.metrics import ssim
    from reid_batch.models.pggan import load_generator
    from reid_batch.attack.generation import regenerate_images

    manifest, root = pipeline
    store, metrics, table = _outputs(manifest, name)
    selected = store.read_parquet(f"{name}/selection/selected.parquet").to_pandas()
    assert table["id"].tolist() == sorted(selected["id"].tolist()) and len(table) == 7
    assert metrics["stage2"]["likely"] == len(table)

    training = pd.read_csv(io.BytesIO(store.read_bytes(f"targets/{name}/train_images.csv")))
    assert table["nn_path"].tolist() == training["path"].iloc[table["nn_index"]].tolist()
    assert table["nn_patient"].tolist() == training["patient_id"].iloc[table["nn_index"]].tolist()

    # SSIM is between the candidate regenerated from its id and the real training image it was matched to.
    generator, _ = load_generator(store.path(f"{name}/finetune/generator.safetensors"), format="reid")
    images = regenerate_images(generator, table["id"].to_numpy(), manifest.sampling.seed, torch.device("cpu"))
    neighbours = torch.stack([load_image(p, SIZE, 1) for p in table["nn_path"]])
    np.testing.assert_allclose(table["ssim"], ssim(images, neighbours), atol=1e-6)
    # ...and no training image is nearer in the re-identification embedding than the one reported; the pixel
    # distance to that neighbour is the secondary column.
    from reid_batch.analysis.metrics import pixel_features
    from reid_batch.artifacts import load_reid_model
    from reid_batch.models.reid import embed

    assert "re-identification embedding" in metrics["stage2"]["feature_space"]
    everything = torch.stack([load_image(p, SIZE, 1) for p in training["path"]])
    model = load_reid_model(manifest)
    distances = torch.cdist(embed(model, images), embed(model, everything)).numpy()
    np.testing.assert_allclose(table["nn_distance"], distances.min(axis=1), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(table["nn_pixel_distance"],
                               np.linalg.norm(pixel_features(images) - pixel_features(neighbours), axis=1), rtol=1e-5)

    # Demographics: the reconstruction's prediction is the score stage's, the truth is the neighbour's patient's.
    scores = pd.concat([store.read_parquet(f"{name}/scores/shard={i}/scores.parquet").to_pandas()
                        for i in range(2)]).set_index("id")
    np.testing.assert_allclose(table["recon_pred_age"], scores.loc[table["id"], "age"], rtol=1e-6)
    pool = "control" if name == "cnn-control" else "private"
    truth = _truth(root, pool)
    expected_age = [truth.loc[_number(p), "age"] for p in table["nn_patient"]]
    assert table["true_age"].tolist() == expected_age
    assert table["true_sex"].tolist() == [truth.loc[_number(p), "sex"] for p in table["nn_patient"]]
    np.testing.assert_allclose(table["recon_age_abs_error"], np.abs(table["recon_pred_age"] - table["true_age"]))
    reference = store.read_parquet(f"{name}/scores-reference/scores.parquet").to_pandas().set_index("path")
    np.testing.assert_allclose(table["nn_pred_age"], reference.loc[table["nn_path"], "age"], rtol=1e-6)
    expected_correct = (table["recon_pred_sex_prob"] >= 0.5) == (table["true_sex"] == "M")
    assert table["recon_sex_correct"].tolist() == expected_correct.tolist()
    assert metrics["demographics"]["reconstruction"]["sex_accuracy"] == pytest.approx(expected_correct.mean())
    assert metrics["demographics"]["reconstruction"]["age_mae"] == pytest.approx(table["recon_age_abs_error"].mean())


@pytest.mark.slow
@pytest.mark.parametrize("name", TARGETS)
def test_reidentification_roles_follow_the_training_pool(pipeline, name):
    from reid_batch.analysis.metrics import membership_auc

    manifest, root = pipeline
    _, metrics, table = _outputs(manifest, name)
    reid = metrics["reidentification"]
    trained_on, held_out = ("control", "private") if name == "cnn-control" else ("private", "control")
    assert (metrics["train_pool"], metrics["heldout_pool"]) == (trained_on, held_out)
    train_patients = set(pd.read_csv(io.BytesIO(run_store(manifest).read_bytes(f"targets/{name}/train_images.csv")))
                         ["patient_id"])
    assert set(table["reid_train_patient"]) <= train_patients
    heldout_ids = set(_truth(root, held_out).index)
    assert {_number(p) for p in table["reid_heldout_patient"]} <= heldout_ids
    assert reid["num_train"] == reid["num_control"]  # equal sizes: chance is 0.5
    assert reid["rate"] == pytest.approx(table["reidentified"].mean())
    assert (table["reidentified"] == (table["reid_train_distance"] < table["reid_heldout_distance"])).all()
    assert reid["membership_auc"] == pytest.approx(membership_auc(table["reid_train_distance"],
                                                                  table["reid_heldout_distance"]))
    assert reid["matched_on"] == "label counts"
    assert "re-identification embedding" in reid["feature_space"]
    # Calibrated on ~20 images of 32 px (a pacemaker is a few blurred pixels): it must say it cannot tell, not guess.
    devices = reid["devices"]
    assert devices["detector"] is not None and not devices["detector"]["reliable"] and not devices["available"]
    assert "cannot be trusted" in devices["reason"]
    assert table["device_reproduced"].isna().all()
    truth = _truth(root, trained_on)
    assert table["truth_pacemaker"].tolist() == [bool(truth.loc[_number(p), "pacemaker"])
                                                  for p in table["reid_train_patient"]]


@pytest.mark.slow
@pytest.mark.parametrize("name", TARGETS)
def test_the_leak_statistic_uses_the_targets_own_members(pipeline, name):
    """Records are patients: members from the training list, non-members the same pool's other patients with the
    members' label mix; L is recomputed from the committed embeddings and candidate features."""
    from reid_batch.analysis.roles import patient_labels
    from reid_batch.analysis.leak import generator_scores, leak_test
    from reid_batch.formats import feature_matrix
    from reid_batch.layout import LEAK_ID_OFFSET, PPA_FILE, ppa_class_prefix

    manifest, root = pipeline
    store, metrics, _ = _outputs(manifest, name)
    leak = metrics["leak"]
    assert leak["available"] and leak["identity_sensitive"]
    records = store.read_parquet(f"{name}/evaluation/records.parquet")
    frame = records.drop(["features"]).to_pandas()
    trained = set(pd.read_csv(io.BytesIO(store.read_bytes(f"targets/{name}/train_images.csv")))["patient_id"].astype(str))
    members = set(frame.loc[frame["member"], "patient_id"])
    nonmembers = set(frame.loc[~frame["member"], "patient_id"])
    assert members <= trained and not nonmembers & trained and len(members) > 0 and len(nonmembers) > 0
    assert (len(members), len(nonmembers)) == (leak["member_patients"], leak["nonmember_patients"])
    labels = patient_labels(frame)
    shares = [labels[sorted(side)].value_counts(normalize=True) for side in (members, nonmembers)]
    assert (shares[0] - shares[1]).abs().max() <= 1 / len(nonmembers) + 1e-9
    pool = "control" if name == "cnn-control" else "private"
    assert {_number(p) for p in members | nonmembers} <= set(_truth(root, pool).index)
    candidates = store.read_parquet(f"{name}/evaluation/leak_candidates.parquet")
    ids = candidates.column("id").to_numpy()
    generators = np.asarray(candidates.column("generator").to_pylist())
    study_rows = np.isin(generators, ["attacked", "prior"])
    assert ids[study_rows].min() >= LEAK_ID_OFFSET  # fresh latents: none used in fine-tuning or sampling
    # A target attacked with ppa adds its kept samples, by their search ids (the ppa stage's own range).
    kept = store.read_parquet(f"{ppa_class_prefix(name, 0, 0)}/{PPA_FILE}") if "ppa" in generators else None
    assert set(generators) == ({"attacked", "prior", "ppa"} if kept is not None else {"attacked", "prior"})
    if kept is not None:
        assert set(kept.column("id").to_pylist()) <= set(ids[generators == "ppa"].tolist())
        assert (generators == "ppa").sum() == metrics["attacks"]["ppa"]["kept"]
    features = feature_matrix(records.column("features"))
    patients = frame["patient"].to_numpy()
    member = frame.groupby("patient")["member"].first().to_numpy()
    scores = [generator_scores(features, patients, len(member), feature_matrix(candidates.column("features"))[
        generators == g]) for g in ("attacked", "prior")]
    settings = manifest.evaluation
    again = leak_test(member, *scores, bootstrap=settings.leak_bootstrap, permutations=settings.leak_permutations,
                      seed=settings.seed)
    raw = leak["raw"]["vs_prior"]
    assert again["leak"] == pytest.approx(raw["leak"]) and again["ci"] == pytest.approx(raw["ci"])
    assert raw["leak"] == pytest.approx(raw["auc_attacked"] - raw["auc_null"])
    assert raw["candidates"] == {"attacked": settings.membership_candidates, "null": settings.membership_candidates}
    if kept is not None:  # ppa's L from the committed rows: its kept samples against as many prior candidates
        ppa = generator_scores(features, patients, len(member),
                               feature_matrix(candidates.column("features"))[generators == "ppa"])
        null = generator_scores(features, patients, len(member), feature_matrix(candidates.column("features"))[
            generators == "prior"][:(generators == "ppa").sum()])
        again = leak_test(member, ppa, null, bootstrap=settings.leak_bootstrap, permutations=settings.leak_permutations, seed=settings.seed)
        assert again["leak"] == pytest.approx(metrics["attacks"]["ppa"]["leak"]["vs_prior"]["leak"])
    # Stage 2's selection, against the prior's candidates through the same rule from a pool of the same size.
    selected = leak["selected"]["vs_prior"]
    assert selected["pool"] == min(manifest.sampling.num_candidates, settings.membership_candidates)
    assert selected["compared"] == min(selected["selected_attacked"], selected["selected_null"]) > 0
    assert selected["candidates"] == {"attacked": selected["compared"], "null": selected["compared"]}


@pytest.mark.slow
def test_calibration_spikes_member_patients_into_prior_candidates(pipeline):
    from reid_batch.stages import calibrate

    manifest, _ = pipeline
    store = run_store(manifest)
    settings = manifest.calibration
    for name in TARGETS:
        document = store.read_json(f"{name}/calibration/calibration.json")
        assert document["available"] and document["spikes"].startswith("fresh renders")
        runs = pd.DataFrame(document["runs"])
        assert (runs["fraction"] == 0).sum() == settings.null_seeds
        assert (runs["fraction"] == 0.1).sum() == settings.seeds
        assert (runs["detected"] == (runs["ci_low"] > 0)).all()
        assert document["false_positive_rate"] == runs.loc[runs["fraction"] == 0, "detected"].mean()
        assert store.read_bytes(f"{name}/calibration/dose_response.png")[:4] == b"\x89PNG"
        # Targets attacked with ppa are calibrated again at its pool size, with its detection rule.
        ppa = document.get("ppa")
        if "ppa" not in manifest.target(name).attacks:
            assert ppa is None
            continue
        assert ppa["candidates"] == store.read_json(f"{name}/evaluation/metrics.json")["attacks"]["ppa"]["kept"]
        runs = pd.DataFrame(ppa["runs"])
        assert sorted(runs["fraction"].unique()) == settings.ppa_fractions
        assert (runs["fraction"] == 0).sum() == settings.null_seeds and (runs["fraction"] == 0.5).sum() == settings.seeds
        assert (runs["detected"] == ((runs["ci_low"] > 0) & (runs["p_value"] <= 0.05))).all()
    from reid_batch.reporting.tables import calibration_rows

    header, rows = calibration_rows(json.loads(store.read_bytes("report/report.json")))
    labels = [row[0] for row in rows]
    assert labels == ["cnn", "cnn · ppa (4 samples)", "cnn-control", "identity", "identity · ppa (4 samples)"]
    assert "Detected at 50%" in header and "Detected at 10%" in header
    # Committed: a second call keeps it as it is.
    before = store.read_commit("cnn/calibration")["created"]
    assert calibrate.calibrate(manifest, target="cnn") == 0
    assert store.read_commit("cnn/calibration")["created"] == before


@pytest.mark.slow
def test_identity_control_matches_samples_to_held_out_studies(pipeline):
    """P1 wired end to end: the fine-tuned generator carries its class offsets, every likely sample asks for the
    class its z_0 encodes, and the gallery is the world's own studies of the scored patients and distractors (never
    trained on); the committed numbers are recomputed from those images."""
    from reid_batch.analysis.identity import identity_control
    from reid_batch.analysis.roles import identity_sets
    from reid_batch.artifacts import load_finetuned_generator, load_reid_model
    from reid_batch.attack.objectives import requested_classes
    from reid_batch.data.datasets import load_image, read_chexpert
    from reid_batch.models.pggan import latents_for_ids
    from reid_batch.models.reid import embed

    manifest, root = pipeline
    store, metrics, table = _outputs(manifest, "identity")
    control = metrics["identity_control"]
    assert control["role"] == "positive" and control["classes"] == 2
    generator = load_finetuned_generator(manifest, "identity")
    assert generator.config.class_offsets == 2 and generator.class_offsets.abs().sum() > 0  # trained, not zero
    sets = identity_sets(manifest, manifest.target("identity"))
    patients = sets.scored + sets.distractors
    assert control["scored_against"] == [f"patient{p.patient_id:05d}" for p in sets.scored]
    rows = read_chexpert(str(root / "world" / "private"))
    number = {f"patient{p.patient_id:05d}": i for i, p in enumerate(patients)}
    gallery = rows[rows["patient_id"].isin(number)].sort_values("path")
    trained = set(pd.read_csv(io.BytesIO(store.read_bytes("targets/identity/train_images.csv")))["path"])
    assert len(gallery) >= 4 and not trained & set(gallery["path"])
    model = load_reid_model(manifest)
    gallery_features = embed(model, torch.stack([load_image(p, SIZE, 1) for p in gallery["path"]])).numpy()
    ids = table["id"].to_numpy()
    from reid_batch.attack.generation import regenerate_images

    images = regenerate_images(generator, ids, manifest.sampling.seed, torch.device("cpu"))
    classes = requested_classes(latents_for_ids(manifest.sampling.seed, ids, LATENT), 2).numpy()
    settings = manifest.evaluation
    again = identity_control(embed(model, images).numpy(), classes, gallery_features,
                             gallery["patient_id"].map(number).to_numpy(), np.arange(2),
                             np.array([p.sex for p in sets.scored]), bootstrap=settings.leak_bootstrap,
                             seed=settings.seed)
    likely = control["likely"]
    assert likely["samples"] == len(table) == 7
    assert (likely["top1"], likely["distinct"], likely["p_value"]) == pytest.approx(
        (again["top1"], again["distinct"], again["p_value"]), abs=1e-6)
    assert control["raw"]["samples"] == control["prior_raw"]["samples"] == settings.membership_candidates


@pytest.mark.slow
def test_ppa_keeps_its_most_confident_optimised_samples_and_evaluate_measures_them(pipeline):
    """The ppa stage's committed rows regenerate the images evaluate measured: per class `keep` samples, best first,
    from the class's own searched ids; the identity control and L recomputed from the stored latents agree with
    metrics.json; a one-logit target is attacked as two classes."""
    from reid_batch.analysis.identity import identity_control
    from reid_batch.analysis.leak import committed_records, generator_scores, leak_test
    from reid_batch.analysis.roles import identity_sets, pool_frame, train_pool
    from reid_batch.artifacts import load_prior, load_reid_model
    from reid_batch.formats import feature_matrix
    from reid_batch.layout import PPA_CLASS_STRIDE, PPA_ID_OFFSET
    from reid_batch.models.pggan import generator_to_unit
    from reid_batch.models.reid import embed
    from reid_batch.analysis.space import FeatureSpace
    from reid_batch.artifacts import read_ppa_kept as read_kept
    from reid_batch.evaluation.images import load_images
    from reid_batch.evaluation.shared import CONFIDENCE

    manifest, _ = pipeline
    settings = manifest.ppa
    prior = load_prior(manifest).eval()
    model = load_reid_model(manifest)
    for name in ("identity", "cnn"):
        store, metrics, _ = _outputs(manifest, name)
        kept = read_kept(store, manifest, manifest.target(name)).to_pandas()
        assert sorted(kept["class"].unique()) == [0, 1] and (kept.groupby("class").size() == settings.keep).all()
        for cls, rows in kept.groupby("class"):
            assert rows["rank"].tolist() == list(range(settings.keep))
            assert rows["confidence"].is_monotonic_decreasing
            offset = rows["id"].to_numpy() - PPA_ID_OFFSET - cls * PPA_CLASS_STRIDE
            assert ((offset >= 0) & (offset < settings.search)).all()
        with torch.no_grad():
            latents = torch.from_numpy(feature_matrix(read_kept(store, manifest, manifest.target(name))["latent"]))
            features = embed(model, generator_to_unit(prior(latents), prior.config.output_range)).numpy()
        attack = metrics["attacks"]["ppa"]
        assert attack["kept"] == len(kept) == 2 * settings.keep and attack["generator"] == "prior"
        records, patients, member = committed_records(store.read_parquet(f"{name}/evaluation/records.parquet"))
        candidates = store.read_parquet(f"{name}/evaluation/leak_candidates.parquet").to_pandas()
        prior_features = np.stack(candidates[candidates["generator"] == "prior"]["features"].to_numpy())
        again = leak_test(member, generator_scores(records, patients, len(member), features),
                          generator_scores(records, patients, len(member), prior_features[:len(features)]),
                          bootstrap=manifest.evaluation.leak_bootstrap, permutations=manifest.evaluation.leak_permutations,
                          seed=manifest.evaluation.seed, confidence=CONFIDENCE)
        assert attack["leak"]["vs_prior"]["leak"] == pytest.approx(again["leak"], abs=1e-6)
        assert attack["leak"]["vs_prior"]["p_value"] == pytest.approx(again["p_value"], abs=1e-9)
        assert metrics["attacks"]["study"]["leak"]["vs_prior"] == metrics["leak"]["raw"]["vs_prior"]
    # The identity control of the ppa samples: each asks for the class it was optimised toward.
    store, metrics, _ = _outputs(manifest, "identity")
    spec = manifest.target("identity")
    sets = identity_sets(manifest, spec)
    number = {p.name: i for i, p in enumerate(sets.scored + sets.distractors)}
    rows, on_error = pool_frame(manifest, train_pool(spec))
    gallery = load_images(rows[rows["patient_id"].astype(str).isin(number)], SIZE, on_error, 0, desc="gallery",
                          space=FeatureSpace(model, SIZE))
    kept = read_kept(store, manifest, spec)
    with torch.no_grad():
        latents = torch.from_numpy(feature_matrix(kept["latent"]))
        features = embed(model, generator_to_unit(prior(latents), prior.config.output_range)).numpy()
    again = identity_control(features, kept["class"].to_numpy().astype(np.int64), gallery.features,
                             gallery.frame["patient_id"].astype(str).map(number).to_numpy(dtype=np.int64),
                             np.arange(2), np.array([p.sex for p in sets.scored]),
                             bootstrap=manifest.evaluation.leak_bootstrap, seed=manifest.evaluation.seed)
    ppa_control = metrics["identity_control"]["ppa"]
    assert ppa_control["samples"] == 2 * settings.keep
    assert (ppa_control["top1"], ppa_control["p_value"]) == pytest.approx((again["top1"], again["p_value"]), abs=1e-9)


@pytest.mark.slow
def test_the_ppa_bench_script_reproduces_the_stage_and_its_identity_measure(pipeline, tmp_path):
    """bench/ppa_identity.py (the multi-seed acceptance measure) runs the stage's attack: at ppa.seed it gives the
    identity control that evaluate committed for the ppa samples."""
    manifest, _ = pipeline
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump(manifest.model_dump(mode="json")))
    subprocess.run([sys.executable, str(REPO / "bench" / "ppa_identity.py"), str(path), "--targets", "identity",
                    "--seeds", str(manifest.ppa.seed), "--json", str(tmp_path / "out.json")], cwd=tmp_path,
                   check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    measured = json.loads((tmp_path / "out.json").read_text())["results"][0]
    _, metrics, _ = _outputs(manifest, "identity")
    committed = metrics["identity_control"]["ppa"]
    assert (measured["top1"], measured["distinct"], measured["p_value"]) == pytest.approx(
        (committed["top1"], committed["distinct"], committed["p_value"]), abs=1e-9)


@pytest.mark.slow
def test_the_report_ranks_the_attacks_and_the_headline_names_the_strongest(pipeline):

    manifest, _ = pipeline
    store = run_store(manifest)
    document = store.read_json("report/report.json")
    page = store.read_bytes("report/report.html").decode("utf-8")
    for name in TARGETS + ("identity",):
        leak = document["targets"][name]["risk"]["leak"]
        modes = [a["mode"] for a in leak["attacks"]]
        assert sorted(modes) == sorted(["study", "ppa"] if name != "cnn-control" else ["study"])
        keys = [(not a["detected"], -a["vs_prior"]["leak"]) for a in leak["attacks"]]
        assert keys == sorted(keys) and leak["strongest"] == modes[0]
        line = document["targets"][name]["headline"]
        if len(modes) > 1:
            assert f"({modes[0]}, the strongest of 2 attacks)" in line or f"detected by {modes[0]}" in line
            assert leak_cell(leak["attacks"][0]["vs_prior"]) in line
        else:
            assert "strongest" not in line
        assert html_escape(leak["verdict"]) in page
    header = list(risk_rows(document)[0])
    assert "Attacks ranked (L vs prior)" in header and "Attacks ranked (L vs prior)" in page
    # The ppa samples' figure (one row per class) for the targets attacked with ppa, and their L row.
    assert page.count("<h3>The ppa attack's samples</h3>") == 2
    assert store.exists("identity/evaluation/figures/ppa_samples.png")
    assert not store.exists("cnn-control/evaluation/figures/ppa_samples.png")
    header, rows = leak_rows(document["targets"]["identity"]["risk"]["leak"])
    assert rows[-1][0] == "ppa (kept samples)" and all(html_escape(cell) in page for cell in rows[-1])
    # A ppa leak that both the interval and the permutation test see becomes the verdict, named.
    from reid_batch.results import (Attack, AttackLeak, Calibration, LeakSummary, LeakTest, PPACalibration,
                                    VersusPrior)

    def attack(mode: str, leak: float, ci: list[float], p: float) -> Attack:
        return Attack(mode=mode, description=mode, leak=AttackLeak(available=True, vs_prior=LeakTest(
            leak=leak, ci=ci, p_value=p)))

    study = LeakSummary(available=True, raw=VersusPrior(vs_prior=LeakTest(leak=0.01, ci=[-0.1, 0.1], p_value=0.4)))
    attacks = {"study": attack("study", 0.01, [-0.1, 0.1], 0.4), "ppa": attack("ppa", 0.3, [0.1, 0.5], 0.001)}
    entry = leak_entry(study, attacks, None, None)
    assert entry["strongest"] == "ppa" and entry["detected"] and "by the ppa attack" in entry["verdict"]
    assert headline(entry).startswith("leak detected by ppa: L +0.300")
    attacks["ppa"].leak.vs_prior.p_value = 0.2  # the interval alone is not enough
    entry = leak_entry(study, attacks, None, None)
    assert entry["strongest"] == "ppa" and not entry["detected"] and "no leak detected" in entry["verdict"]
    assert "not calibrated at the ppa attack's pool size" in entry["verdict"]
    # Undetected, the strongest ppa attack is worded by its own calibration (its pool size), not the study's.
    ppa = PPACalibration(candidates=40, detected_when="", base_and_null="", fractions=[], false_positive_rate=0.0,
                         null_repeats=0, minimum_detectable_effect=0.25, largest_fraction=0.5, detect_share=0.8,
                         runs=[])
    calibration = Calibration(schema_version=1, available=True, target="identity", minimum_detectable_effect=0.02,
                              largest_fraction=0.1, ppa=ppa)
    entry = leak_entry(study, attacks, None, calibration)
    assert entry["verdict"] == "no leak larger than 25% of the ppa samples being training patients detected"
    ppa.minimum_detectable_effect = None
    assert "did not reliably see even 50% of them" in leak_entry(study, attacks, None, calibration)["verdict"]
    attacks["ppa"].leak.vs_prior.leak = 0.0  # study strongest: the study's calibration words it
    assert leak_entry(study, attacks, None, calibration)["verdict"] == \
        "no leak larger than 2% of candidates being training patients detected"


@pytest.mark.slow
def test_ppa_resumes_only_what_is_missing_and_refuses_another_plan(pipeline):
    """A class whose commit is gone (a task killed before it) is attacked again, to the same rows; committed
    classes are not redone; a re-run with other ppa settings is refused (exit 2) rather than mixed."""
    from reid_batch.layout import ppa_class_prefix, ppa_shard_prefix
    from reid_batch.stages import ppa

    manifest, _ = pipeline
    store = run_store(manifest)
    before = {c: store.read_parquet(f"{ppa_class_prefix('identity', 0, c)}/kept.parquet") for c in (0, 1)}
    kept_marker = store.read_commit(ppa_class_prefix("identity", 0, 0))
    store.delete(f"{ppa_shard_prefix('identity', 0)}/_SHARD.json")
    store.delete(ppa_class_prefix("identity", 0, 1))
    assert not store.is_committed(ppa_class_prefix("identity", 0, 1))
    assert ppa.run(manifest, target="identity") == 0
    assert store.read_commit(ppa_class_prefix("identity", 0, 0)) == kept_marker  # not redone
    for c in (0, 1):
        assert store.read_parquet(f"{ppa_class_prefix('identity', 0, c)}/kept.parquet").equals(before[c])
    document = manifest.model_dump(mode="json")
    # The batch size is not part of the plan (a latent's path is its own): a re-run with another one continues,
    # and so does a shard committed when plans still held it.
    summary_key = f"{ppa_shard_prefix('identity', 0)}/_SHARD.json"
    summary = store.read_json(summary_key)
    summary["plan"]["ppa"]["batch_size"] = 4
    store.write_json(summary_key, summary)
    assert ppa.run(parse_manifest({**document, "ppa": {**document["ppa"], "batch_size": 1}}), target="identity") == 0
    assert store.read_commit(ppa_class_prefix("identity", 0, 0)) == kept_marker
    document["ppa"]["lr"] = 0.5
    other = parse_manifest(document)
    with pytest.raises(InputError, match="different plan .*ppa"):
        ppa.run(other, target="identity")


@pytest.mark.slow
def test_canaries_train_by_their_coins_and_are_scored_by_a_held_out_study(pipeline):
    """P2: every included canary trains on exactly `d` studies and no excluded one on any; each AUC is recomputed
    from the held-out studies and the committed raw leak candidates."""
    from reid_batch.analysis.canaries import canary_tests
    from reid_batch.analysis.roles import canary_sets
    from reid_batch.artifacts import load_reid_model
    from reid_batch.data.datasets import load_image
    from reid_batch.data.phantoms import CANARY_HELDOUT_STUDY
    from reid_batch.formats import feature_matrix
    from reid_batch.layout import LEAK_CANDIDATES_FILE, evaluation_prefix
    from reid_batch.models.reid import embed

    manifest, root = pipeline
    store, metrics, _ = _outputs(manifest, "cnn")
    sets = canary_sets(manifest, manifest.target("cnn"))
    assert sets.included.any() and not sets.included.all()
    trained = pd.read_csv(io.BytesIO(store.read_bytes("targets/cnn/train_images.csv")))
    per_patient = trained[trained["canary_dose"].notna()].groupby("patient_id").size()
    expected = {f"patient{p.patient_id:05d}": int(d)
                for p, d, inside in zip(sets.patients, sets.doses, sets.included) if inside}
    assert per_patient.to_dict() == expected
    assert not trained["path"].str.contains(f"/study{CANARY_HELDOUT_STUDY + 1}/").any()

    canaries = metrics["canaries"]
    assert canaries["included"] == sets.included.tolist() and set(canaries["raw"]) == {"1", "2"}
    held_out = [root / "world" / "private" / "extra-studies" / name / f"study{CANARY_HELDOUT_STUDY + 1}" /
                "view1_frontal.jpg" for name in canaries["patients"]]
    features = embed(load_reid_model(manifest), torch.stack([load_image(str(p), SIZE, 1) for p in held_out])).numpy()
    candidates = store.read_parquet(f"{evaluation_prefix('cnn')}/{LEAK_CANDIDATES_FILE}")
    attacked = feature_matrix(candidates.column("features"))[
        np.asarray(candidates.column("generator").to_pylist()) == "attacked"]
    scores = np.sqrt(((features[:, None, :] - attacked[None]) ** 2).sum(-1)).min(1)
    settings = manifest.evaluation
    again = canary_tests(scores, sets.included, sets.doses, bootstrap=settings.leak_bootstrap, seed=settings.seed)
    for dose, result in again.items():
        assert canaries["raw"][dose]["auc"] == pytest.approx(result["auc"], abs=1e-9)
        assert canaries["raw"][dose]["p_value"] == pytest.approx(result["p_value"], abs=1e-9)


@pytest.mark.slow
def test_prior_quality_is_measured_once_and_reported(pipeline):
    """calibrate's prior-quality: the prior's samples against public images in the embedding, with the real-vs-real
    floor and the classifier two-sample test; the report's instrument section shows the numbers and the strip."""

    manifest, _ = pipeline
    store = run_store(manifest)
    quality = store.read_json("prior-quality/quality.json")
    frechet, classifier = quality["frechet"], quality["classifier"]
    assert frechet["images"] == [quality["images"]] * 3 and frechet["floor"] > 0
    assert frechet["ratio"] == pytest.approx(frechet["distance"] / frechet["floor"])
    assert classifier["test_images"] + classifier["train_images"] == 2 * quality["images"]
    assert store.read_bytes("prior-quality/strip.png")[:4] == b"\x89PNG"
    document = store.read_json("report/report.json")
    page = store.read_bytes("report/report.html").decode("utf-8")
    markdown = store.read_bytes("report/report.md").decode("utf-8")
    header, rows = prior_rows(document)
    assert rows and all(html_escape(cell) in page for cell in rows[0]) and all(cell in markdown for cell in rows[0])
    assert page.count("prior samples (top) over public images") == 1


@pytest.mark.slow
def test_stage1_sets_and_shared_prior(pipeline):
    manifest, _ = pipeline
    stage1 = {name: _outputs(manifest, name)[1]["stage1"] for name in TARGETS}
    for name, block in stage1.items():
        assert set(block["sets"]) == {"prior", "finetuned", "reference"}
        assert block["sets"]["prior"]["images"] == block["sets"]["finetuned"]["images"] == 12
        assert block["pca"]["fitted_on"] == "reference"
        kurtosis = block["sets"]["finetuned"]["kurtosis"]
        assert kurtosis["mean"] == pytest.approx(np.mean(kurtosis["per_component"]))
        assert len(kurtosis["per_component"]) == block["pca"]["components"] == 5
        assert block["fid"] == [] and any("FID not computed" in n for n in block["notes"])
    # The prior's images are the same for every target (fixed latent ids); the bases differ per reference.
    assert stage1["cnn"]["sets"]["prior"]["entropy"] == stage1["cnn-control"]["sets"]["prior"]["entropy"]


@pytest.mark.slow
def test_report_agrees_with_the_parquet_outputs(pipeline):
    from reid_batch.stages import report

    manifest, _ = pipeline
    store = run_store(manifest)
    assert store.is_committed("report")
    document = store.read_json("report/report.json")
    page = store.read_bytes("report/report.html").decode("utf-8")
    markdown = store.read_bytes("report/report.md").decode("utf-8")
    for name in TARGETS:
        _, metrics, table = _outputs(manifest, name)
        entry = document["targets"][name]
        selected = store.read_parquet(f"{name}/selection/selected.parquet")
        assert entry["risk"]["likely_samples"] == selected.num_rows == len(entry["samples"])
        assert entry["risk"]["reidentification_rate"] == pytest.approx(table["reidentified"].mean())
        assert [s["ssim"] for s in entry["samples"]] == table.sort_values("id")["ssim"].tolist()
        assert [s["id"] for s in entry["samples"]] == table.sort_values("id")["id"].tolist()
        for value in table["ssim"]:
            assert f"<td>{value:.3f}</td>" in page
        leak = entry["risk"]["leak"]
        assert leak["vs_prior"] == metrics["leak"]["raw"]["vs_prior"]
        assert leak_cell(leak["vs_prior"]) in page and leak_cell(leak["vs_prior"]) in markdown
        assert html_escape(leak["verdict"]) in page and leak["verdict"] in markdown
        calibration = store.read_json(f"{name}/calibration/calibration.json")
        assert leak["calibration"]["false_positive_rate"] == calibration["false_positive_rate"]
        summary = f"{entry['risk']['likely_samples']} likely sample(s) of 64 candidates"
        assert summary in page and summary in markdown
    # The second null: the target's candidates against the control model's, scored on the TARGET's records.
    leak = document["targets"]["cnn"]["risk"]["leak"]
    settings = manifest.evaluation
    expected = control_leak(store.read_parquet("cnn/evaluation/records.parquet"),
                            store.read_parquet("cnn/evaluation/leak_candidates.parquet"),
                            store.read_parquet("cnn-control/evaluation/leak_candidates.parquet"),
                            settings.leak_bootstrap, settings.leak_permutations, settings.seed)
    assert leak["control"] == "cnn-control" and leak["vs_control"]["leak"] == pytest.approx(expected["leak"])
    assert leak["vs_control"]["ci"] == pytest.approx(expected["ci"])
    assert document["targets"]["cnn-control"]["risk"]["leak"]["vs_control"] is None
    # The summary is short: one headline risk per target; "leak vs control" of two AUCs is gone.
    header = next(iter(risk_rows(document)))
    assert len(header) <= 6 + ("Attacks ranked (L vs prior)" in header) and "Record-level membership AUC (prior)" not in page and "record_leak" not in page
    # Risk summary first, then the comparison, the per-target sections, the meanings, and the manifest.
    headings = ["Threat model", "1. Risk summary", "2. Side-by-side comparison", "3.1 Target cnn",
                "3.2 Target cnn-control", "4. What these numbers show", "5. Reproducibility", "Manifest (resolved)"]
    positions = [page.index(h) for h in headings]
    assert positions == sorted(positions)
    assert document["manifest"] == manifest.model_dump(mode="json")
    assert set(document["software"]["report"]) >= {"python", "torch", "torchvision", "reid-batch", "pyarrow", "numpy"}
    # Self-contained: every image is an embedded PNG; nothing is fetched from elsewhere.
    images = re.findall(r"<img [^>]*src='([^']*)'", page)
    assert len(images) >= 2 * (4 + 7) - 2 and all(src.startswith("data:image/png;base64,") for src in images)
    assert all(base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n" for src in images)
    assert "http://" not in page and "https://" not in page
    marker = store.read_commit("report")
    assert report.report(manifest) == 0  # unchanged evaluations: nothing is rewritten
    assert store.read_commit("report") == marker
    assert report.report(manifest, target="cnn") == 0  # one target: its own prefix, beside the run's report
    assert list(store.read_json("report-cnn/report.json")["targets"]) == ["cnn"]
    assert store.read_commit("report") == marker


@pytest.mark.slow
def test_population_shift_is_the_attacked_minus_the_prior_predictions(pipeline):
    """P4's measure: the demographic model's mean age and male share on the raw leak candidates, attacked minus
    prior, recomputed here; and the truth it is read against (the members' and the pool's)."""
    from reid_batch.artifacts import load_demographic_model, load_finetuned_generator, load_prior
    from reid_batch.attack.generation import regenerate_images
    from reid_batch.layout import LEAK_ID_OFFSET
    from reid_batch.models.demographics import predict_demographics

    manifest, root = pipeline
    _, metrics, _ = _outputs(manifest, "cnn")
    shift = metrics["population_shift"]
    assert shift["cohort"] == "the whole pool" and shift["candidates"] == manifest.evaluation.membership_candidates
    ids = LEAK_ID_OFFSET + np.arange(shift["candidates"])
    model = load_demographic_model(manifest).eval()
    predicted = {}
    for name, generator in (("attacked", load_finetuned_generator(manifest, "cnn")), ("prior", load_prior(manifest))):
        with torch.inference_mode():
            images = regenerate_images(generator.eval(), ids, manifest.sampling.seed, torch.device("cpu"))
            predicted[name] = predict_demographics(model, images, manifest.demographics.image_size)
    assert shift["age"]["shift"] == pytest.approx(predicted["attacked"]["age"].mean() - predicted["prior"]["age"].mean(),
                                                  abs=1e-4)
    assert shift["male_share"]["shift"] == pytest.approx(
        predicted["attacked"]["sex"].mean() - predicted["prior"]["sex"].mean(), abs=1e-9)
    assert shift["age"]["ci"][0] <= shift["age"]["shift"] <= shift["age"]["ci"][1]
    members = pd.read_csv(io.BytesIO(run_store(manifest).read_bytes("targets/cnn/train_images.csv")))
    members = members[members["canary_dose"].isna()]  # the pool's truth: canaries are not pool patients
    truth = _truth(root, "private")
    ages = [truth.loc[_number(p), "age"] for p in members["patient_id"].unique()]
    assert shift["truth_members"]["patients"] == len(ages)
    assert shift["truth_members"]["age"] == pytest.approx(np.mean(ages))


@pytest.mark.slow
def test_report_has_a_controls_section(pipeline):

    manifest, _ = pipeline
    store = run_store(manifest)
    document = store.read_json("report/report.json")
    page = store.read_bytes("report/report.html").decode("utf-8")
    markdown = store.read_bytes("report/report.md").decode("utf-8")
    assert list(document["controls"]) == ["identity"]
    header, rows = control_rows(document)
    assert [row[1] for row in rows] == ["likely samples", "raw candidates", "prior (no attack)",
                                        "ppa (latents optimised per sample)"]
    assert "Permutation p" in header
    for row in rows:
        assert all(html_escape(cell) in page for cell in row) and all(cell in markdown for cell in row)
    assert html_escape(control_sentence("identity", document["controls"]["identity"])) in page
    header, rows = population_rows(document)
    assert [row[0] for row in rows] == [t.name for t in manifest.targets]
    for row in rows:
        assert all(html_escape(cell) in page for cell in row) and all(cell in markdown for cell in row)
    header, rows = canary_rows(document)
    assert list(document["canaries"]) == ["cnn"] and [row[2] for row in rows[:2]] == ["1", "2"]
    assert len(rows) == 8 and "<h3>Canaries in the study's task</h3>" in page  # 4 sample sets (ppa too) x 2 doses
    for row in rows:
        assert all(html_escape(cell) in page for cell in row) and all(cell in markdown for cell in row)
    assert html_escape(canary_sentence("cnn", document["canaries"]["cnn"])) in page


def test_dose_response_rows_need_one_architecture_at_two_sizes():
    """P3: overfit targets by images per class, the normal one of the same architecture as "all"; a lone overfit
    target of another architecture is not a dose-response."""
    from reid_batch.reporting.tables import dose_rows

    def entry(arch, preset, per_class, leak):
        return {"metrics": {"arch": arch, "preset": preset, "train_pool": "private",
                            "target_training": {"recipe": {"images_per_class": per_class}, "train_images": 7}},
                "risk": {"leak": {"vs_prior": {"leak": leak, "ci": [leak - 0.1, leak + 0.1], "p_value": 0.5},
                                  "verdict": "v"}}}

    document = {"targets": {"all": entry("resnet18", "normal", None, 0.0), "o20": entry("resnet18", "overfit", 20, 0.1),
                            "o2": entry("resnet18", "overfit", 2, 0.3), "vit": entry("vit_custom", "overfit", 20, 0.2)}}
    # A cohort slice and a canary target train on other sets, not on other sizes of the same one.
    document["targets"]["women"] = entry("resnet18", "normal", None, 0.1)
    document["targets"]["women"]["metrics"]["target_training"]["cohort"] = "women aged 60+"
    document["targets"]["canaries"] = entry("resnet18", "normal", None, 0.1)
    document["targets"]["canaries"]["metrics"]["target_training"]["canaries"] = True
    header, rows = dose_rows(document)
    assert [(row[0], row[1]) for row in rows] == [("o2", "2"), ("o20", "20"), ("all", "all")]
    del document["targets"]["o2"]
    assert dose_rows(document)[1] == []


@pytest.mark.slow
def test_report_reads_and_writes_s3_and_needs_no_torch(pipeline, s3_bucket):
    """The rendered report on S3 from the same evaluation outputs, in a process that never imports torch."""
    from reid_batch.storage import open_store

    from conftest import FAKE_AWS_ENV

    manifest, root = pipeline
    local = run_store(manifest)
    uri, settings = s3_bucket
    remote = open_store(f"{uri}/{manifest.run_id}", settings)
    for name in (t.name for t in manifest.targets):
        for part in ("evaluation", "calibration"):
            for key in local.list(f"{name}/{part}"):
                remote.write_bytes(key, local.read_bytes(key))
    document = manifest.model_dump(mode="json")
    document["output"] = {"uri": uri, "s3": {"endpoint": settings.endpoint, "region": "us-east-1"}}
    (root / "s3.json").write_text(json.dumps(document))
    script = (
        "import json, sys\n"
        "from reid_batch.manifest import parse_manifest\n"
        "from reid_batch.stages.report import report\n"
        f"report(parse_manifest(json.load(open({str(root / 's3.json')!r}))))\n"
        "assert 'torch' not in sys.modules, 'the report imported torch'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert remote.is_committed("report")
    files = {key: remote.read_bytes(f"report/{key}") for key in ("report.html", "report.md", "report.json")}
    assert files["report.html"].startswith(b"<!DOCTYPE html>")
    for secret in (FAKE_AWS_ENV["AWS_SECRET_ACCESS_KEY"], FAKE_AWS_ENV["AWS_ACCESS_KEY_ID"]):
        assert all(secret.encode() not in data for data in files.values())


# ------------------------------------------------------------------------------------------------ pure pieces


def test_distribution_metrics_fid_pairs_and_basis():
    from reid_batch.analysis.metrics import fid, fit_pca, pca_kurtosis
    from reid_batch.evaluation.stage1 import distribution_metrics

    generator = torch.Generator().manual_seed(0)
    sets = {"prior": torch.rand(10, 1, 16, 16, generator=generator),
            "finetuned": torch.rand(10, 1, 16, 16, generator=generator) ** 2,
            "reference": torch.rand(9, 1, 16, 16, generator=generator) ** 0.5}
    rng = np.random.default_rng(0)
    features = {name: rng.normal(size=(len(images), 6)) + i for i, (name, images) in enumerate(sets.items())}
    result, png = distribution_metrics(sets, "reference", 4, 30, 1, features)
    assert png[:4] == b"\x89PNG"
    assert [(r["a"], r["b"]) for r in result["fid"]] == [("prior", "finetuned"), ("prior", "reference"),
                                                         ("finetuned", "reference")]
    assert result["fid"][2]["value"] == pytest.approx(fid(features["finetuned"], features["reference"]).value)
    basis = fit_pca(sets["reference"], 4, seed=1)
    assert result["sets"]["prior"]["kurtosis"]["mean"] == pytest.approx(
        pca_kurtosis(sets["prior"], basis, bootstrap=30, seed=1).mean)
    pooled, _ = distribution_metrics({k: v for k, v in sets.items() if k != "reference"}, "reference", 4, 0, 1)
    assert pooled["pca"]["fitted_on"].startswith("pooled") and pooled["pca"]["fit_images"] == 20
    assert pooled["fid"] == [] and pooled["notes"]


def test_device_detector_calibration():
    from reid_batch.analysis.devices import calibrate_device_detector

    rng = np.random.default_rng(0)
    regions = rng.integers(40, 150, size=(40, 12, 14)).astype(np.uint8)
    has_device = np.arange(40) % 4 == 0
    regions[has_device, 3:6, 5:9] = 250  # a small bright box
    detector = calibrate_device_detector(regions, has_device)
    assert detector.reliable and detector.auc == 1.0
    assert detector.detect(regions).tolist() == has_device.tolist()
    assert (detector.with_device, detector.without_device) == (10, 30)
    noise = calibrate_device_detector(rng.integers(0, 256, size=(40, 12, 14)).astype(np.uint8), has_device)
    assert not noise.reliable
    assert calibrate_device_detector(regions, np.zeros(40, bool)) is None


def test_manifest_redaction(monkeypatch):
    from reid_batch.reporting.document import safe_manifest

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value-123")
    cleaned = safe_manifest({"output": {"uri": "s3://user:pw@bucket/x", "note": "key AKIAABCDEFGHIJKLMNOP"},
                             "secret_key": "abc", "other": ["x very-secret-value-123 y", 3]})
    assert cleaned == {"output": {"uri": "s3://***@bucket/x", "note": "key ***"}, "secret_key": "***",
                       "other": ["***", 3]}


def test_held_out_set_matches_the_training_label_mix():
    from reid_batch.analysis.roles import matched_positions

    train = pd.Series([0] * 20 + [1] * 20)            # class-balanced, like the overfit preset
    heldout = pd.Series([0] * 70 + [1] * 30 + [1] * 5)  # natural prevalence
    t, h = matched_positions(train, heldout, seed=3)
    assert len(t) == len(h) == 40
    assert train[t].value_counts().to_dict() == heldout[h].value_counts().to_dict() == {0: 20, 1: 20}
    assert list(h) == sorted(set(h.tolist())) and list(t) == sorted(set(t.tolist()))
    # Too few held-out images of a label: the training side is subsampled to keep both sets alike.
    t, h = matched_positions(train, pd.Series([0] * 50 + [1] * 8), seed=3)
    assert train[t].value_counts().to_dict() == {0: 20, 1: 8} and len(h) == 28
    t, h = matched_positions(train, None, seed=0)
    assert len(t) == len(h) == 0


def test_report_shows_the_demographic_models_own_validation():
    """train-demographics writes its validation under "val"; the report once read other keys and printed n/a."""
    from reid_batch.reporting.html import _html_risk_summary

    document = {"targets": {}, "demographic_model": {"val": {"age_mae": 7.3705, "sex_accuracy": 0.9875}}}
    text = "\n".join(_html_risk_summary(document))
    assert "age MAE 7.37 years" in text and "sex accuracy 0.988" in text and "n/a" not in text


def test_report_states_its_instrument():
    """The report opens with its ruler: the embedding's verification, or that there is none (pixel distances)."""
    from reid_batch.reporting.html import _html_instrument
    from reid_batch.reporting.document import instrument_summary

    none = {"instrument": instrument_summary(None)}
    assert "blind to identity" in "\n".join(_html_instrument(none))
    record = {"arch": "reid_small", "image_size": 64, "train_patients": 640,
              "verification": {"public_heldout": {"auc": 0.9985, "rank1": 0.872, "patients": 160, "images": 360},
                               "private": {"auc": 0.9985, "rank1": 0.8125, "patients": 214, "images": 512}}}
    text = "\n".join(_html_instrument({"instrument": instrument_summary(record)}))
    assert "0.9985" in text and "0.812" in text and "214" in text and "held-out public patients" in text
    # Four digits: an AUC of 0.9997 is not shown as a perfect 1.000.
    record["verification"]["private"]["auc"] = 0.99972
    assert "0.9997" in "\n".join(_html_instrument({"instrument": instrument_summary(record)}))


@pytest.mark.slow
def test_the_instrument_section_names_the_space_the_risk_numbers_use(pipeline):
    manifest, _ = pipeline
    store = run_store(manifest)
    text = store.read_bytes("report/report.html").decode()
    assert "0. Instrument" in text and "measured in: re-identification embedding" in text
    assert "measured in: re-identification embedding" in store.read_bytes("report/report.md").decode()
    assert "Calibration: the smallest leak this instrument sees" in text and "dose-response" in text
