"""`reid-batch calibrate`: how large a leak the instrument can see on this target's records, by spike-in.

The leak statistic is only worth its interval if it stays at 0 when nothing leaks and moves when something does.
Per repeat, prior candidates (`base`) have a share f replaced by new images of member patients (`spiked`) and are
compared with as many other prior candidates (`null`) on the target's own records, with the evaluation's interval:
the share of repeats detected at each f gives the false-positive rate (f = 0) and the smallest detectable leak,
which the report's verdict quotes. A target attacked with ppa is calibrated again at that attack's pool size.
Each repeat draws its own latents, spike positions and patients, so repeats are independent. The method, and what
a verdict may say: docs/method.md.

Output, committed: `<target>/calibration/` calibration.json (a results.Calibration) and dose_response.png; once per
run, `prior-quality/` quality.json and strip.png (how well the prior draws chest X-rays: analysis.prior_quality). A
committed calibration is kept; delete it to calibrate again.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import torch
import torchvision.transforms.functional as TF
from matplotlib.figure import Figure
from PIL import Image

from reid_batch import log
from reid_batch.analysis.leak import GeneratorScores, committed_records, generator_scores, leak_test
from reid_batch.analysis.roles import member_patients, patient_number, pool_frame, train_pool
from reid_batch.analysis.space import FeatureSpace
from reid_batch.artifacts import load_prior, load_reid_model, require_committed
from reid_batch.attack.generation import BatchSizer, generate_unit, generated_features, id_latents
from reid_batch.data.datasets import ImageDataset
from reid_batch.data.phantoms import WorldConfig, patient_with_id, render_study
from reid_batch.errors import InputError
from reid_batch.analysis.prior_quality import embedding_frechet, two_sample_classifier
from reid_batch.formats import clean_json, figure_png
from reid_batch.layout import (CALIBRATION_FIGURE, CALIBRATION_FILE, CALIBRATION_ID_OFFSET, CALIBRATION_ID_STRIDE,
                               METRICS_FILE, PRIOR_DISTANCE_ID_OFFSET, PRIOR_QUALITY_FILE, PRIOR_QUALITY_PREFIX,
                               PRIOR_QUALITY_STRIP, RECORDS_FILE, calibration_prefix, evaluation_prefix)
from reid_batch.manifest import Manifest, TargetSpec
from reid_batch.models.reid import augment
from reid_batch.results import Calibration, Evaluation, read, record_of, write
from reid_batch.runtime import pick_device, run_single_writer, run_store

GENERATION_BATCH = 256
CONFIDENCE = 0.95
# Fresh synthetic studies get study numbers far above any the world wrote (at most 20 per patient).
FRESH_STUDY_BASE = 1000
# Per set: the prior's samples, the real set they are compared with, and the second real set of the floor.
PRIOR_QUALITY_IMAGES = 500
STRIP_COLUMNS = 8


# ------------------------------------------------------------------------------------------------ the pure core


def spiked(base: GeneratorScores, spikes: np.ndarray, fraction: float, rng: np.random.Generator) -> GeneratorScores:
    """The base candidates with round(fraction * C) of them (random positions) replaced by the first spike columns.

    base.distances (P, C); spikes (P, S) distances of the patients to the spike images, S >= round(fraction * C).
    """
    count = int(round(fraction * base.distances.shape[1]))
    if count > spikes.shape[1]:
        raise ValueError(f"{count} spikes wanted, {spikes.shape[1]} made")
    distances = base.distances.copy()
    if count:
        distances[:, rng.choice(distances.shape[1], size=count, replace=False)] = spikes[:, :count]
    return GeneratorScores(distances)


def summarise(runs: list[dict], fractions: list[float], detect_share: float) -> dict:
    """Per fraction: repeats, detected share, mean L; the false-positive rate and the minimum detectable effect."""
    table = pd.DataFrame(runs)
    per_fraction = []
    for fraction in fractions:
        rows = table[table["fraction"] == fraction]
        per_fraction.append({
            "fraction": fraction, "repeats": len(rows), "detected": int(rows["detected"].sum()),
            "detected_share": float(rows["detected"].mean()),
            "covers_zero": int(((rows["ci_low"] <= 0) & (rows["ci_high"] >= 0)).sum()),
            "leak_mean": float(rows["leak"].mean()), "leak_sd": float(rows["leak"].std(ddof=1)) if len(rows) > 1
            else None, "ci_low_mean": float(rows["ci_low"].mean()), "ci_high_mean": float(rows["ci_high"].mean()),
        })
    null = next(row for row in per_fraction if row["fraction"] == 0.0)
    detectable = [row["fraction"] for row in per_fraction if row["fraction"] > 0
                  and row["detected_share"] >= detect_share]
    return {"fractions": per_fraction, "false_positive_rate": null["detected_share"],
            "null_repeats": null["repeats"], "minimum_detectable_effect": min(detectable) if detectable else None,
            "largest_fraction": max(fractions), "detect_share": detect_share}


def ppa_repeat(member: np.ndarray, base: GeneratorScores, null: GeneratorScores, spikes: np.ndarray, *, pool: int,
               settings, evaluation, repeat: int, rng: np.random.Generator) -> list[dict]:
    """One repeat of the calibration at a ppa attack's pool size: the first `pool` base and null candidates, a share
    of the base replaced by member spikes; detected as the report ranks attacks (interval above 0 and p <= 0.05)."""
    base, null = GeneratorScores(base.distances[:, :pool]), GeneratorScores(null.distances[:, :pool])
    runs = []
    for fraction in settings.ppa_fractions:
        if repeat >= (settings.null_seeds if fraction == 0 else settings.seeds):
            continue
        result = leak_test(member, spiked(base, spikes, fraction, rng), null, bootstrap=evaluation.leak_bootstrap,
                           permutations=evaluation.leak_permutations, seed=settings.seed + repeat,
                           confidence=CONFIDENCE)
        detected = bool(result["detected"] and result["p_value"] <= 0.05)
        runs.append({"fraction": fraction, "repeat": repeat, "leak": result["leak"], "ci_low": result["ci"][0],
                     "ci_high": result["ci"][1], "p_value": result["p_value"], "detected": detected,
                     "auc_spiked": result["auc_attacked"], "auc_null": result["auc_null"]})
    return runs


def dose_response_png(runs: list[dict], summary: dict, title: str) -> bytes:
    table = pd.DataFrame(runs)
    figure = Figure(figsize=(6.4, 3.8), dpi=100)
    axes = figure.add_subplot(1, 1, 1)
    jitter = np.random.default_rng(0)
    for _, row in table.iterrows():
        x = 100 * row["fraction"] + jitter.uniform(-0.12, 0.12)
        colour = "C3" if row["detected"] else "grey"
        axes.plot([x, x], [row["ci_low"], row["ci_high"]], color=colour, alpha=0.6, lw=1)
        axes.plot(x, row["leak"], "o", color=colour, ms=3)
    means = [(100 * r["fraction"], r["leak_mean"]) for r in summary["fractions"]]
    axes.plot(*zip(*means), color="black", lw=1.5, label="mean L")
    axes.axhline(0, color="black", lw=0.8, ls=":")
    mde = summary["minimum_detectable_effect"]
    if mde is not None:
        axes.axvline(100 * mde, color="C3", lw=0.8, ls="--", label=f"minimum detectable effect {100 * mde:g}%")
    axes.set(xlabel="candidates replaced by member patients (%)", ylabel="L = AUC(spiked) - AUC(null)", title=title)
    axes.legend(fontsize=8, loc="upper left")
    figure.tight_layout()
    return figure_png(figure)


# ------------------------------------------------------------------------------------------------ spike images


def fresh_renders(manifest: Manifest, pool: str, patient_ids: list[str], first_study: int, resolution: int
                  ) -> torch.Tensor:
    """New studies of synthetic-world patients at `resolution`, through the writer's JPEG and the loader's resize."""
    world = WorldConfig.of(manifest.data.synthetic)
    images = []
    for j, patient_id in enumerate(patient_ids):
        patient = patient_with_id(world, pool, patient_number(patient_id))
        pixels = render_study(patient, first_study + j, world.image_size, world.seed)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
        buffer.seek(0)
        image = torch.from_numpy(np.asarray(Image.open(buffer).convert("L"), dtype=np.float32) / 255.0)[None]
        if image.shape[-1] != resolution:
            image = TF.resize(image, [resolution, resolution], antialias=True)
        images.append(image.clamp(0, 1))
    return torch.stack(images) if images else torch.zeros(0, 1, resolution, resolution)


def augmented_copies(manifest: Manifest, pool: str, patient_ids: list[str], seed: int, resolution: int
                     ) -> torch.Tensor:
    """Acquisition-augmented copies of one image (the first by path) of each listed member patient (real data:
    there are no fresh studies)."""
    found = pool_frame(manifest, pool)
    if found is None:
        raise InputError(f"the {pool} pool's images are not available here", where=f"data.{pool}")
    rows, on_error = found
    rows = rows.assign(patient_id=rows["patient_id"].astype(str))
    first = rows[rows["patient_id"].isin(set(patient_ids))].drop_duplicates("patient_id").reset_index(drop=True)
    dataset = ImageDataset(first, size=resolution, channels=1, on_error="raise")
    loaded = {first["patient_id"].iloc[i]: dataset[i]["image"] for i in range(len(dataset))}
    originals = torch.stack([loaded[p] for p in patient_ids])
    return augment(originals, torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ the shell


class SharedCandidates:
    """What every target of one `calibrate` call shares: the embedding, the prior, its candidates' features per
    repeat (loaded on first use: a call whose targets are all committed loads nothing)."""

    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        self._loaded = False
        self._candidates: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def load(self) -> "SharedCandidates":
        if not self._loaded:
            self.device = pick_device(self.manifest)
            reid = self.manifest.reid
            self.features = FeatureSpace(load_reid_model(self.manifest), reid.image_size if reid else None, self.device)
            self.prior = load_prior(self.manifest).to(self.device).eval()
            self.resolution = self.prior.config.resolution
            self._loaded = True
        return self

    def candidates(self, repeat: int) -> tuple[np.ndarray, np.ndarray]:
        """(base, null) prior candidate features of one repeat."""
        if repeat not in self._candidates:
            count = self.manifest.evaluation.membership_candidates
            first = CALIBRATION_ID_OFFSET + repeat * CALIBRATION_ID_STRIDE
            ids = first + np.arange(2 * count, dtype=np.int64)
            both = generated_features(self.prior, ids, self.manifest.sampling.seed, self.device, features=self.features,
                                      sizer=BatchSizer(GENERATION_BATCH, self.device, len(ids)))
            self._candidates[repeat] = (both[:count], both[count:])
        return self._candidates[repeat]


def calibrate_target(manifest: Manifest, spec: TargetSpec, shared: SharedCandidates) -> Calibration:
    store = run_store(manifest)
    prefix = calibration_prefix(spec.name)
    if store.is_committed(prefix):
        log.event("calibrate_skipped", target=spec.name, reason="already committed")
        return read(Calibration, store, f"{prefix}/{CALIBRATION_FILE}")
    require_committed(store, evaluation_prefix(spec.name), f"evaluate --target {spec.name}")
    shared.load()
    settings, evaluation = manifest.calibration, manifest.evaluation
    records_key = f"{evaluation_prefix(spec.name)}/{RECORDS_FILE}"
    if not store.exists(records_key):
        evaluation = read(Evaluation, store, f"{evaluation_prefix(spec.name)}/{METRICS_FILE}")
        reason = evaluation.leak.reason or "no member and non-member records"
        document = record_of(Calibration, {"available": False, "reason": reason, "target": spec.name},
                             where=store.uri(f"{prefix}/{CALIBRATION_FILE}"))
        with store.committed(prefix, {"stage": "calibrate", "target": spec.name}) as out:
            write(out, CALIBRATION_FILE, document)
        log.event("calibrate_unavailable", target=spec.name, reason=reason)
        return document
    features, codes, member = committed_records(store.read_parquet(records_key))
    pool = train_pool(spec)
    members, _ = member_patients(manifest, spec)
    member_ids = np.array(sorted(members))
    synthetic = manifest.data.synthetic is not None and getattr(manifest.data, pool) is None
    # A ppa attack's L compares its kept samples with as many prior candidates: calibrated at that pool size.
    ppa = read(Evaluation, store, f"{evaluation_prefix(spec.name)}/{METRICS_FILE}").attacks.get("ppa")
    ppa_pool = int((ppa.kept if ppa is not None else 0) or 0) if "ppa" in spec.attacks else 0
    largest = max(int(round(max(settings.fractions) * evaluation.membership_candidates)),
                  int(round(max(settings.ppa_fractions) * ppa_pool)))

    runs, ppa_runs = [], []
    repeats = max(settings.seeds, settings.null_seeds)
    for repeat in log.progress(range(repeats), desc=f"{spec.name} calibration repeats", total=repeats):
        rng = np.random.default_rng([settings.seed, repeat])
        base, null = shared.candidates(repeat)
        base_scores = generator_scores(features, codes, len(member), base)
        null_scores = generator_scores(features, codes, len(member), null)
        fractions = [f for f in settings.fractions if (repeat < settings.null_seeds if f == 0 else
                                                        repeat < settings.seeds)]
        spike_scores = np.zeros((len(member), 0))
        if largest and any(f > 0 for f in fractions):
            chosen = rng.choice(member_ids, size=largest).tolist()
            images = (fresh_renders(manifest, pool, chosen, FRESH_STUDY_BASE + repeat * largest, shared.resolution)
                      if synthetic else augmented_copies(manifest, pool, chosen, settings.seed + repeat,
                                                         shared.resolution))
            spike_scores = generator_scores(features, codes, len(member), shared.features(images)).distances
        for fraction in fractions:
            result = leak_test(member, spiked(base_scores, spike_scores, fraction, rng), null_scores,
                               bootstrap=evaluation.leak_bootstrap, permutations=0, seed=settings.seed + repeat,
                               confidence=CONFIDENCE)
            runs.append({"fraction": fraction, "repeat": repeat, "leak": result["leak"],
                         "ci_low": result["ci"][0], "ci_high": result["ci"][1], "detected": result["detected"],
                         "auc_spiked": result["auc_attacked"], "auc_null": result["auc_null"]})
        if ppa_pool:
            ppa_runs += ppa_repeat(member, base_scores, null_scores, spike_scores, pool=ppa_pool, settings=settings,
                                   evaluation=evaluation, repeat=repeat, rng=rng)
        log.event("calibrate_repeat", target=spec.name, repeat=repeat,
                  **{f"leak_{100 * r['fraction']:g}pct": round(r["leak"], 4) for r in runs if r["repeat"] == repeat})
    summary = summarise(runs, settings.fractions, settings.detect_share)
    document = {
        "available": True, "target": spec.name, "settings": settings.model_dump(mode="json"),
        "candidates": evaluation.membership_candidates, "bootstrap": evaluation.leak_bootstrap,
        "member_patients": int(member.sum()), "nonmember_patients": int((~member).sum()),
        "spiked_from": f"all {len(member_ids)} member patients",
        "spikes": "fresh renders of member patients (new studies)" if synthetic else
        "acquisition-augmented copies of member images",
        "base_and_null": f"prior candidates, ids {CALIBRATION_ID_OFFSET} + repeat * {CALIBRATION_ID_STRIDE} + k",
        "feature_space": shared.features.description,
        **summary, "runs": runs,
    }
    if ppa_pool:
        document["ppa"] = {
            "candidates": ppa_pool, "detected_when": "L's interval excludes 0 and its permutation p <= 0.05 (as the "
            "report ranks attacks)", "base_and_null": f"the first {ppa_pool} of each repeat's base and null",
            **summarise(ppa_runs, settings.ppa_fractions, settings.detect_share), "runs": ppa_runs}
    document = record_of(Calibration, clean_json(document), where=store.uri(f"{prefix}/{CALIBRATION_FILE}"))
    png = dose_response_png(runs, summary, f"{spec.name}: spike-in calibration")
    with store.committed(prefix, {"stage": "calibrate", "target": spec.name}) as out:
        write(out, CALIBRATION_FILE, document)
        out.write_bytes(CALIBRATION_FIGURE, png)
    log.event("calibrate_done", target=spec.name, false_positive_rate=summary["false_positive_rate"],
              minimum_detectable_effect=summary["minimum_detectable_effect"],
              ppa_minimum_detectable_effect=document.ppa.minimum_detectable_effect if document.ppa else None)
    return document


def measure_prior(manifest: Manifest, shared: SharedCandidates) -> dict | None:
    """prior-quality/: how far the prior's samples are from real public images (module docstring); once per run."""
    store = run_store(manifest)
    if store.is_committed(PRIOR_QUALITY_PREFIX):
        return store.read_json(f"{PRIOR_QUALITY_PREFIX}/{PRIOR_QUALITY_FILE}")
    found = pool_frame(manifest, "public", labelled_only=False)
    if found is None:
        log.event("prior_quality_skipped", reason="the public pool's images are not available here")
        return None
    rows, on_error = found
    count = min(PRIOR_QUALITY_IMAGES, len(rows) // 2)
    if count < 4:
        log.event("prior_quality_skipped", reason=f"{len(rows)} public images: too few for two real sets")
        return None
    shared.load()
    order = np.random.default_rng(manifest.calibration.seed).permutation(len(rows))[:2 * count]
    dataset = ImageDataset(rows.iloc[order].reset_index(drop=True), size=shared.resolution, channels=1,
                           on_error=on_error)
    real = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    latents = id_latents(manifest.sampling.seed, PRIOR_DISTANCE_ID_OFFSET, count, shared.prior.config.latent_dim)
    samples = generate_unit(shared.prior, latents, GENERATION_BATCH)
    samples = samples.mean(dim=1, keepdim=True) if samples.shape[1] > 1 else samples
    real_a, real_b = real[:count], real[count:2 * count]
    result = {
        "images": count, "resolution": shared.resolution, "feature_space": shared.features.description,
        "frechet": embedding_frechet(shared.features(samples), shared.features(real_a), shared.features(real_b)),
        "classifier": two_sample_classifier(samples, real_a, seed=manifest.calibration.seed),
        "samples": f"prior ids {PRIOR_DISTANCE_ID_OFFSET} + k, k < {count} (seed {manifest.sampling.seed})",
        "real": f"{2 * count} public images drawn with calibration.seed {manifest.calibration.seed}",
    }
    strip = torch.cat([samples[:STRIP_COLUMNS], real_a[:STRIP_COLUMNS]])
    with store.committed(PRIOR_QUALITY_PREFIX, {"stage": "calibrate", "part": "prior-quality"}) as out:
        out.write_json(PRIOR_QUALITY_FILE, clean_json(result))
        out.write_bytes(PRIOR_QUALITY_STRIP, _strip_png(strip, STRIP_COLUMNS))
    log.event("prior_quality", frechet=round(result["frechet"]["distance"], 4),
              floor=round(result["frechet"]["floor"], 4), classifier_accuracy=result["classifier"]["accuracy"])
    return result


def _strip_png(images01: torch.Tensor, columns: int) -> bytes:
    """Grey [0, 1] images in rows of `columns` with 2-pixel white gutters (here: the prior's samples over real
    images)."""
    rows, pad = (len(images01) + columns - 1) // columns, 2
    h, w = images01.shape[-2:]
    canvas = np.full((pad + rows * (h + pad), pad + columns * (w + pad)), 255, dtype=np.uint8)
    pixels = (images01[:, 0].clamp(0, 1) * 255).round().byte().numpy()
    for i, image in enumerate(pixels):
        r, c = divmod(i, columns)
        canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = image
    buffer = io.BytesIO()
    Image.fromarray(canvas).save(buffer, format="PNG")
    return buffer.getvalue()


def calibrate(manifest: Manifest, target: str | None = None) -> int:
    """`reid-batch calibrate`: spike-in calibration for one target (None = every target), and once per run the
    prior's quality; see the module docstring."""
    shared = SharedCandidates(manifest)

    def work(spec: TargetSpec) -> dict | None:
        measure_prior(manifest, shared)  # committed after the first target: a lookup
        return calibrate_target(manifest, spec, shared)

    return run_single_writer(manifest, target, work)
