"""`reid-batch evaluate`: what the attack recovered, per target, measured against the data it was run on.

Everything here but the stage 1 generator metrics is VALIDATION ONLY: it uses the target's training images (and, on
the synthetic world, who the patients are), which an attacker holding only the parameters would not have. These
numbers measure the leak; they are not something the attack itself produces.

Stage 1, distribution level (the study's Figure 4). Three image sets of `evaluation.num_images` images each:
  prior      the original generator at latent ids layout.STAGE1_ID_OFFSET (2**40) + k (k < num_images; far above every candidate id, so no
             candidate is among them), seeded with `evaluation.seed`;
  finetuned  the fine-tuned generator at the SAME latents (a paired comparison);
  reference  a deterministic sample (`evaluation.seed`) of the target's training images, loaded at the generator's
             resolution.
All sets are grey (colour generators are averaged over channels). Per set: mean per-image Shannon pixel entropy
(with its standard error); PCA kurtosis, the per-component excess kurtosis averaged over components with a
bootstrap standard error, in ONE basis fitted on `evaluation.pca_fit_on` (the reference set, or the three sets
pooled; the pooled generated sets when no training images are known); FID between every two sets from the 2048-d
pool features of ONE Inception-v3 (`evaluation.inception_weights`, else seeded untrained weights: then FID is only a
relative measure and metrics.json says so), with a warning when a set has fewer images than feature dimensions.

Where images are compared (analysis.space): the re-identification embedding (train-reid's model or reid.checkpoint),
in which two studies of one patient lie close whatever the acquisition; without a reid section, grey pixels
area-averaged to 32 x 32, blind to identity, and every result says so.

Stage 2, sample level (Figures 6-7). Each likely (selected) sample is regenerated from its id and matched to its
nearest training image in that space (`nn_distance`; the grey-pixel distance to the same image beside it,
`nn_pixel_distance`); SSIM is computed between the sample and that neighbour at the generator's resolution.

Demographics (Figures 8-9). Per likely sample: the demographic model's predicted age/sex of the reconstruction
(`<target>/scores`) and of its nearest neighbour (`<target>/scores-reference`, matched by path), the neighbour's
ground truth (the synthetic world's ground_truth.csv, else the training list's age/sex columns), absolute age
errors and sex correctness; summarised with intervals by `metrics.demographic_errors`.

The leak statistic (the headline risk; analysis.leak, roles.membership_records). Records are patients: members are
the patients the target trained on (its training list; a checkpoint target's `training_list`, else membership is
not available), non-members the other labelled patients of the same pool, with the members' label mix. A
patient's score under a generator is the distance from its closest image to the closest of
`evaluation.membership_candidates` raw candidates (fresh latent ids LEAK_ID_OFFSET + k, used by no other step).
L = AUC(fine-tuned generator) - AUC(prior) on the same patients, with a two-way bootstrap interval (patients and
candidates), a paired permutation p-value and TPR at 1% / 5% FPR. The same for stage 2's selection: the manifest's
rule applied to equal pools of both generators (the attacked candidates 0..P-1 and the prior's raw candidates, scored
here against the target), the same number kept from each (`_selected_leak`). The records' and candidates' features are
committed (records.parquet, leak_candidates.parquet): the report measures L against a control model's generator from
them, and calibrate spikes into them.

Identity-class control (targets of preset identity; analysis.identity). Every likely sample, every raw leak
candidate of the attacked generator and, as the baseline, of the prior asks for the class its latent's z_0 encodes
(attack.objectives.requested_classes). Each is matched in the embedding against the world's own studies (never
trained on) of the K patients the classes are scored against and K distractors: top-1, top-5, distinct patients
hit, a within-sex label-permutation p-value and a class-bootstrap interval; plus how often the target itself
predicts the requested class for the likely samples (a stage 1 that cannot separate the classes leaves it at
chance). metrics.json: `identity_control`.

Re-identification, sample vote (when the held-out pool's images are available; patient truth and devices on the
synthetic world). Roles follow each target's `train.pool` (a checkpoint target is taken as trained on the private
pool): the training set is the target's training list, the held-out set a deterministic sample of the other pool's
labelled cohort with the SAME label counts (`matched_positions`), because the vote is at chance 0.5 only for equal,
alike sets. A sample re-identifies when its nearest training image is closer than its nearest held-out image; the
rate has a Wilson interval and a one-sided binomial p-value against 0.5. Membership AUC: `metrics.membership_auc` of
the likely samples' distances to the training set against their distances to the held-out set. Per-sample votes are
dominated by "hub" images that many samples land next to: the report shows them per target, not as the headline.

Devices (synthetic world). A deliberately simple pacemaker detector: the fraction of pixels in the upper chest on the
image's right (the patient's left, where the world places the generator box) brighter than the 99.9th percentile
of that region in device-free images; the score threshold maximises Youden's J on the training and held-out images with
their ground truth. It is used only when it separates those images well (AUC >= 0.75, >= 10 images with and without
a pacemaker). On world images with known devices (120 patients) its AUC was 0.98 at 64 px and 0.99 at 128 px, but
0.57 at 32 px, where a pacemaker is a few blurred pixels: there it reports itself unreliable instead of guessing. A
device is reproduced when the matched training patient has a pacemaker AND the detector fires on the reconstruction.

Output, committed: <target>/evaluation/ metrics.json, evaluation.parquet (one row per likely sample, columns in
TABLE_SCHEMA), records.parquet, leak_candidates.parquet, figures/{kurtosis,losses,stage1_examples,likely_samples}.png
and pairs/<id:09d>.png (reconstruction | nearest training image). A committed evaluation is left as it is; delete it to evaluate again.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from matplotlib.figure import Figure

from reid_batch import log
from reid_batch.analysis.devices import (DETECTOR_MIN_AUC, DETECTOR_MIN_IMAGES, DEVICE_LEVEL_PERCENTILE, DEVICE_REGION,
                                         calibrate_device_detector, device_region)
from reid_batch.analysis.canaries import canary_tests
from reid_batch.analysis.identity import identity_control
from reid_batch.analysis.leak import generator_scores, leak_test, pairwise_min_distance
from reid_batch.analysis.metrics import (InceptionFeatures, demographic_errors, fid, fit_pca, kurtosis_curve_png,
                                         mean_shift, membership_auc, nearest_neighbours, pca_kurtosis,
                                         pixel_entropy, pixel_features, reidentification, ssim, to_grey)
from reid_batch.analysis.roles import (OTHER_POOL, canary_sets, identity_sets, matched_positions, member_patients,
                                       membership_records, pool_frame, reference_images, sample_positions, sex_code,
                                       train_pool, truth_for, world_truth)
from reid_batch.analysis.space import PIXEL_SIZE, FeatureSpace
from reid_batch.artifacts import (load_attack_target, load_demographic_model, load_finetuned_generator, load_prior,
                                  load_reid_model, read_ppa_kept, require_committed, require_ppa_shards)
from reid_batch.attack.candidates import build_scorer, concat_columns
from reid_batch.attack.generation import BatchSizer, generated_features, regenerate_images, target_input_spec
from reid_batch.attack.objectives import requested_classes
from reid_batch.attack.selection import committed_summaries, read_scores, select_candidates
from reid_batch.data.datasets import ImageDataset
from reid_batch.data.phantoms import CANARY_HELDOUT_STUDY, WorldConfig, write_extra_studies
from reid_batch.errors import InputError
from reid_batch.formats import (clean_json, feature_column, feature_matrix, figure_png, grey_uint8, pair_png, parquet_bytes,
                                software_versions)
from reid_batch.layout import (FIGURES, LEAK_CANDIDATES_FILE, LEAK_ID_OFFSET, METRICS_FILE, RECORDS_FILE,
                               SCORES_FILE, SELECTION_FILE, STAGE1_ID_OFFSET, TABLE_FILE, THRESHOLDS_FILE,
                               evaluation_prefix, finetune_prefix, pair_key, reference_prefix, scores_prefix,
                               selection_prefix, target_prefix)
from reid_batch.manifest import Manifest, TargetSpec
from reid_batch.models.demographics import predict_demographics
from reid_batch.models.pggan import generator_to_unit, latents_for_ids
from reid_batch.models.targets import to_target_input
from reid_batch.runtime import SingleProcess, pick_device, run_single_writer, run_store
from reid_batch.storage import input_path

CONFIDENCE = 0.95
LOADER_BATCH = 64
GRID_MAX_PAIRS = 24
THREAT_MODEL = (
    "The attacker holds only the trained target's parameters (a frozen checkpoint) and knows the imaging modality and "
    "body region (frontal chest X-rays). They have public images of the same kind (for the generator prior and the "
    "age/sex model) but no image, label or record of the target's training patients."
)
VALIDATION_NOTE = (
    "Validation only: the leak statistic, nearest neighbours, SSIM, demographic ground truth and re-identification "
    "use the target's training images (and, on the synthetic world, who each patient is), which an attacker would "
    "not have."
)

TABLE_SCHEMA = pa.schema([
    pa.field("id", pa.int64()),
    pa.field("rank_combined", pa.int64()),
    pa.field("objective_total", pa.float64()),
    pa.field("mahalanobis", pa.float64()),
    pa.field("nn_index", pa.int64()),
    pa.field("nn_path", pa.string()),
    pa.field("nn_patient", pa.string()),
    pa.field("nn_distance", pa.float64()),
    pa.field("nn_pixel_distance", pa.float64()),
    pa.field("ssim", pa.float64()),
    pa.field("recon_pred_age", pa.float64()),
    pa.field("recon_pred_sex_prob", pa.float64()),
    pa.field("recon_pred_sex", pa.string()),
    pa.field("nn_pred_age", pa.float64()),
    pa.field("nn_pred_sex_prob", pa.float64()),
    pa.field("nn_pred_sex", pa.string()),
    pa.field("true_age", pa.float64()),
    pa.field("true_sex", pa.string()),
    pa.field("recon_age_abs_error", pa.float64()),
    pa.field("nn_age_abs_error", pa.float64()),
    pa.field("recon_sex_correct", pa.bool_()),
    pa.field("nn_sex_correct", pa.bool_()),
    pa.field("reid_train_patient", pa.string()),
    pa.field("reid_train_distance", pa.float64()),
    pa.field("reid_heldout_patient", pa.string()),
    pa.field("reid_heldout_distance", pa.float64()),
    pa.field("member_closer", pa.bool_()),
    pa.field("reidentified", pa.bool_()),
    pa.field("truth_pacemaker", pa.bool_()),
    pa.field("recon_device_score", pa.float64()),
    pa.field("recon_pacemaker_detected", pa.bool_()),
    pa.field("device_reproduced", pa.bool_()),
])


# ------------------------------------------------------------------------------------------------ pure core


def entropy_summary(images01: torch.Tensor) -> dict:
    values = pixel_entropy(images01)
    n = int(values.size)
    return {"mean": float(values.mean()) if n else None,
            "se": float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else None, "n": n}


def distribution_metrics(sets: dict[str, torch.Tensor], fit_on: str, components: int, bootstrap: int, seed: int,
                         features: dict[str, np.ndarray] | None = None) -> tuple[dict, bytes]:
    """Stage 1's table for image sets (name -> (N, 1, H, W) in [0, 1], all the same size) and the kurtosis plot.

    The PCA basis is fitted on sets["reference"] when fit_on == "reference" and that set exists, else on all sets
    pooled. `features` (name -> (N, 2048) Inception features) adds FID between every two sets.
    """
    notes = []
    if fit_on == "reference" and "reference" in sets:
        basis_images, fitted_on = sets["reference"], "reference"
    else:
        basis_images, fitted_on = torch.cat(list(sets.values())), "pooled (" + " + ".join(sets) + ")"
        if fit_on == "reference":
            notes.append("no training images known: the PCA basis is fitted on the generated sets pooled")
    basis = fit_pca(basis_images, components, fitted_on=fitted_on, seed=seed)
    result = {"sets": {}, "pca": {"fitted_on": fitted_on, "fit_images": basis.num_fit_images,
                                  "components": basis.num_components,
                                  "explained_variance": float(basis.explained_variance_ratio.sum())},
              "fid": [], "notes": notes}
    curves, errors = {}, {}
    for name, images in sets.items():
        row = {"images": int(images.shape[0]), "entropy": entropy_summary(images), "kurtosis": None}
        if images.shape[0] >= 4:
            kurtosis = pca_kurtosis(images, basis, bootstrap=bootstrap, seed=seed)
            row["kurtosis"] = {"mean": kurtosis.mean, "se": kurtosis.bootstrap_se,
                               "per_component": kurtosis.per_component.tolist(),
                               "per_component_se": kurtosis.per_component_se.tolist()}
            curves[name], errors[name] = kurtosis.per_component, kurtosis.per_component_se
        else:
            notes.append(f"{name}: kurtosis needs at least 4 images, has {images.shape[0]}")
        result["sets"][name] = row
    if features is not None:
        names = [n for n in sets if n in features]
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                if min(len(features[a]), len(features[b])) < 2:
                    notes.append(f"FID {a} vs {b}: needs at least 2 images per set")
                    continue
                value = fid(features[a], features[b])
                result["fid"].append({"a": a, "b": b, "value": value.value, "num_a": value.num_a,
                                      "num_b": value.num_b, "dims": value.dims,
                                      "underdetermined": value.underdetermined})
        if any(r["underdetermined"] for r in result["fid"]):
            notes.append("FID: fewer images than the 2048 feature dimensions; the covariances are singular and FID "
                         "is biased upwards, comparable only between sets of equal size")
    png = kurtosis_curve_png(curves, standard_errors=errors,
                             title=f"Excess kurtosis per principal component (basis: {fitted_on})")
    return result, png


def nearest_training_images(sample_features: np.ndarray, train_features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distance, index) of each sample's nearest training image, both given as features of one space."""
    if len(sample_features) == 0 or len(train_features) == 0:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    distances, indices = nearest_neighbours(sample_features, train_features, k=1)
    return distances[:, 0], indices[:, 0]


# ------------------------------------------------------------------------------------------------ figures


def likely_grid_png(reconstructions: torch.Tensor, neighbours: torch.Tensor | None, captions: list[str],
                    title: str) -> bytes:
    """Up to GRID_MAX_PAIRS reconstructions, each beside its nearest training image when known."""
    count = min(len(captions), GRID_MAX_PAIRS)
    columns = 4
    rows = max(1, math.ceil(count / columns))
    figure = Figure(figsize=(2.6 * columns, 1.55 * rows + 0.6), dpi=100)
    figure.suptitle(title, fontsize=10)
    for i in range(rows * columns):
        axes = figure.add_subplot(rows, columns, i + 1)
        axes.axis("off")
        if i < count:
            pair = grey_uint8(reconstructions[i])
            if neighbours is not None:
                pair = np.concatenate([pair, np.full((pair.shape[0], 2), 255, np.uint8), grey_uint8(neighbours[i])],
                                      axis=1)
            axes.imshow(pair, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            axes.set_title(captions[i], fontsize=7)
    if count == 0:
        figure.text(0.5, 0.5, "no likely samples", ha="center", va="center")
    figure.tight_layout()
    return figure_png(figure)


def stage1_examples_png(sets: dict[str, torch.Tensor], per_row: int = 8) -> bytes:
    figure = Figure(figsize=(1.1 * per_row + 1.2, 1.2 * len(sets) + 0.3), dpi=100)
    for r, (name, images) in enumerate(sets.items()):
        for c in range(per_row):
            axes = figure.add_subplot(len(sets), per_row, r * per_row + c + 1)
            axes.set_xticks([])
            axes.set_yticks([])
            if c < len(images):
                axes.imshow(grey_uint8(images[c]), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            if c == 0:
                axes.set_ylabel(name, fontsize=8)
    figure.tight_layout()
    return figure_png(figure)


def losses_png(losses: pd.DataFrame, title: str) -> bytes:
    figure = Figure(figsize=(9, 3.6), dpi=100)
    total_axes, term_axes = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    terms = [c for c in losses.columns if c not in ("step", "total", "grad_norm", "seconds", "elapsed")]
    if len(losses):
        total_axes.plot(losses["step"], losses["total"], color="black")
        for term in terms:
            term_axes.plot(losses["step"], losses[term], label=term)
        if terms and (losses[terms].to_numpy() > 0).all():
            term_axes.set_yscale("log")
        if terms:
            term_axes.legend(fontsize=7)
    total_axes.set(xlabel="step", ylabel="weighted total", title="objective (weighted total)")
    term_axes.set(xlabel="step", ylabel="unweighted value", title="terms (unweighted)")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure_png(figure)


# ------------------------------------------------------------------------------------------------ image sets


@dataclass
class LoadedImages:
    """One pass over a table of real images: what evaluation needs from each, never all images at once."""

    frame: pd.DataFrame  # the rows that loaded, in order (positions index everything below)
    features: np.ndarray  # (N, D) features in the evaluation's FeatureSpace
    regions: np.ndarray  # (N, h, w) uint8 detector regions
    kept: dict[int, torch.Tensor] = field(default_factory=dict)  # position -> (1, R, R) image, for `keep` positions


def load_images(frame: pd.DataFrame, size: int, on_error: str, num_workers: int, keep: set[int], desc: str,
                space: FeatureSpace) -> LoadedImages:

    dataset = ImageDataset(frame.reset_index(drop=True), size=size, channels=1, on_error=on_error)
    loader = torch.utils.data.DataLoader(dataset, batch_size=LOADER_BATCH, num_workers=num_workers)
    features, regions, positions, kept = [], [], [], {}
    for batch in log.progress(loader, desc=desc, total=len(loader)):
        images = batch["image"]
        features.append(space(images))
        regions.append(device_region(images))
        for row, position in enumerate(batch["index"].tolist()):
            if position in keep:
                kept[position] = images[row].clone()
        positions.append(batch["index"].numpy())
    order = np.concatenate(positions) if positions else np.zeros(0, dtype=np.int64)
    # Positions in the loaded table (skipped rows drop out); `kept` is re-keyed to match.
    remap = {int(p): i for i, p in enumerate(order)}
    empty_regions = np.zeros((0, 1, 1), dtype=np.uint8)
    return LoadedImages(
        frame=dataset.df.iloc[order].reset_index(drop=True),
        features=np.concatenate(features) if features else np.zeros((0, space.dims), np.float32),
        regions=np.concatenate(regions) if regions else empty_regions,
        kept={remap[p]: image for p, image in kept.items()},
    )


def load_rows(frame: pd.DataFrame, positions: np.ndarray, size: int, on_error: str) -> torch.Tensor:
    """(len(positions), 1, size, size) images of the given rows, in that order (repeats allowed)."""
    unique = np.unique(positions)
    if len(unique) == 0:
        return torch.zeros(0, 1, size, size)
    dataset = ImageDataset(frame.iloc[unique].reset_index(drop=True), size=size, channels=1, on_error=on_error)
    loaded = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    where = {int(p): i for i, p in enumerate(unique)}
    return loaded[[where[int(p)] for p in positions]]


def generate(generator, ids: np.ndarray, seed: int, device: torch.device, sizer: BatchSizer) -> torch.Tensor:
    """[0, 1] grey CPU images of latent ids, batch by batch through `sizer` (an `auto` one halves on CUDA
    out-of-memory, as in sampling)."""
    parts = sizer.run(np.asarray(ids, dtype=np.int64),
                      lambda batch: to_grey(regenerate_images(generator, batch, seed, device)).cpu())
    size = generator.config.resolution
    return torch.cat(parts) if parts else torch.zeros(0, 1, size, size)


# ------------------------------------------------------------------------------------------------ data roles


# ------------------------------------------------------------------------------------------------ the shell


@dataclass
class Shared:
    """What every target of one `evaluate` call shares: the Inception network, the feature space, the prior's image
    set and its raw candidates' features."""
    inception: object | None = None
    space: FeatureSpace | None = None
    prior_images: torch.Tensor | None = None
    prior_features: np.ndarray | None = None
    prior_candidate_features: np.ndarray | None = None
    prior_candidate_demographics: dict[str, np.ndarray] | None = None
    demographic_model: object | None = None
    prior_identity: dict = field(default_factory=dict)  # the prior's identity-control result, per gallery
    sizer: BatchSizer | None = None  # every generation and target pass of this call; see generation_sizer

    def generation_sizer(self, manifest: Manifest, device: torch.device, resolution: int) -> BatchSizer:
        """The one batch sizer of this `evaluate` call (`sampling.batch_size`, as sampling and score use): `auto`
        halves on CUDA out-of-memory, and a size that had to be halved stays halved for the next set and target
        rather than running out of memory again."""
        if self.sizer is None:
            settings = manifest.evaluation
            largest = max(settings.num_images, settings.membership_candidates, 1)
            self.sizer = BatchSizer(manifest.sampling.batch_size, device, largest, resolution ** 2)
        return self.sizer

    def feature_space(self, manifest: Manifest, device: torch.device) -> FeatureSpace:
        if self.space is None:
            self.space = FeatureSpace(load_reid_model(manifest), manifest.reid.image_size if manifest.reid else None,
                                      device)
        return self.space


def _require_inputs(store, manifest: Manifest, spec: TargetSpec) -> None:
    require_committed(store, finetune_prefix(spec.name), f"finetune --target {spec.name}")
    require_committed(store, selection_prefix(spec.name), f"select --target {spec.name}")
    missing = [i for i in range(manifest.demographics.num_shards)
               if not store.is_committed(scores_prefix(spec.name, i))]
    if missing:
        raise InputError(f"score shard(s) {missing} are not committed; run `reid-batch score --target {spec.name}`",
                         where=store.uri(f"{spec.name}/scores"))
    require_ppa_shards(store, manifest, spec)


def _read_predictions(store, manifest: Manifest, spec: TargetSpec) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    shards = [store.read_parquet(f"{scores_prefix(spec.name, i)}/{SCORES_FILE}").to_pandas()
              for i in range(manifest.demographics.num_shards)]
    scores = pd.concat(shards).set_index("id") if shards else pd.DataFrame()
    reference = None
    if store.is_committed(reference_prefix(spec.name)):
        reference = store.read_parquet(f"{reference_prefix(spec.name)}/{SCORES_FILE}").to_pandas()
        reference = reference.drop_duplicates("path").set_index("path")
    return scores, reference


def _inception(manifest: Manifest, shared: Shared, device: torch.device):
    if shared.inception is None:
        weights = manifest.evaluation.inception_weights
        if weights is not None:
            weights = input_path(weights, manifest, "evaluation.inception_weights")
        shared.inception = InceptionFeatures(weights,
                                             image_size=manifest.evaluation.inception_image_size, device=device,
                                             seed=manifest.evaluation.seed)
    return shared.inception


def evaluate_target(manifest: Manifest, spec: TargetSpec, shared: Shared) -> dict | None:
    """Evaluate one target, phase by phase: stage 1's image sets and their metrics, the likely samples, their
    nearest training images and demographics, re-identification, then one commit of everything."""
    store = run_store(manifest)
    prefix = evaluation_prefix(spec.name)
    if store.is_committed(prefix):
        log.event("evaluate_skipped", target=spec.name, reason="already committed")
        return store.read_json(f"{prefix}/{METRICS_FILE}")
    _require_inputs(store, manifest, spec)
    device = pick_device(manifest)
    notes: list[str] = []
    finetuned = load_finetuned_generator(manifest, spec.name).to(device).eval()
    space = shared.feature_space(manifest, device)
    resolution = finetuned.config.resolution
    sizer = shared.generation_sizer(manifest, device, resolution)

    sets, training, origin, on_error = _stage1_sets(manifest, spec, shared, finetuned, device, notes, space)
    stage1, kurtosis_png = _stage1_metrics(manifest, shared, sets, device)
    likely = _likely_samples(store, manifest, spec, finetuned, device, space, sizer)
    neighbours, stage2, demographics = _neighbours_and_demographics(manifest, spec, likely, training, origin,
                                                                     on_error, resolution, notes, space)
    reid = _reidentify(manifest, spec, training, OTHER_POOL[train_pool(spec)], likely, notes, resolution, space)
    leak, leak_tables, raw = _leak(manifest, spec, finetuned, shared, space, resolution, device, notes)
    raw_features = raw.features if raw is not None else None
    attacked = _ppa_attack(store, manifest, spec, shared, space, device, raw)
    if raw is not None:
        leak_tables[LEAK_CANDIDATES_FILE] = leak_candidates_bytes(
            LEAK_ID_OFFSET + np.arange(len(raw.features), dtype=np.int64), raw.features,
            shared.prior_candidate_features, attacked)
    identity = _identity(manifest, spec, likely, raw_features, shared, space, finetuned.config.latent_dim, device,
                         attacked)
    canaries = _canaries(manifest, spec, likely, raw_features, shared, space, attacked)
    metrics = _metrics_document(store, manifest, spec, likely, stage1, stage2, demographics, reid, leak, notes,
                                resolution)
    metrics["attacks"] = clean_json(_attacks(leak, attacked))
    if attacked is not None:
        leak_tables[FIGURES["ppa_samples"]] = attacked.figure
    if identity is not None:
        metrics["identity_control"] = clean_json(identity)
    if canaries is not None:
        metrics["canaries"] = clean_json(canaries)
    if manifest.evaluation.population_shift:
        metrics["population_shift"] = clean_json(_population_shift(manifest, spec, finetuned, shared, device,
                                                                   raw.demographics if raw is not None else None))
    _write_outputs(store, manifest, spec, metrics, likely, neighbours, sets, kurtosis_png, leak_tables)
    raw = leak.get("raw", {}).get("vs_prior", {})
    log.event("evaluate_done", target=spec.name, likely=len(likely.ids), ssim_mean=stage2.get("ssim_mean"),
              reid_rate=reid.get("rate"), leak_vs_prior=raw.get("leak"), leak_ci=raw.get("ci"))
    return metrics


def _stage1_sets(manifest: Manifest, spec: TargetSpec, shared: Shared, finetuned, device, notes: list[str],
                 space: FeatureSpace):
    """Stage 1's image sets (prior and fine-tuned at the same latents, a sample of the training images), and the
    training images loaded once: (sets, training or None, where they came from, their on_error)."""
    settings = manifest.evaluation
    resolution = finetuned.config.resolution
    stage1_ids = STAGE1_ID_OFFSET + np.arange(settings.num_images, dtype=np.int64)
    if shared.prior_images is None:
        prior = load_prior(manifest).to(device).eval()
        shared.prior_images = generate(prior, stage1_ids, settings.seed, device, shared.sizer)
        del prior
    sets = {"prior": shared.prior_images,
            "finetuned": generate(finetuned, stage1_ids, settings.seed, device, shared.sizer)}

    # The target's training images: the nearest-neighbour pool, and a sample of them is stage 1's reference set.
    found = reference_images(manifest, spec)
    training = None
    if found is not None:
        frame, origin, on_error = found
        frame = frame.reset_index(drop=True)
        keep = set(sample_positions(len(frame), settings.num_images, settings.seed).tolist())
        training = load_images(frame, resolution, on_error, manifest.compute.num_workers, keep,
                               f"{spec.name} training images", space)
        if training.kept:
            sets["reference"] = torch.stack([training.kept[p] for p in sorted(training.kept)])
    else:
        origin, on_error = None, "raise"
        notes.append("the target's training images are not available here: no reference set, nearest neighbours, "
                     "demographic ground truth or re-identification")
    for name, images in sets.items():
        if 0 < len(images) < 2048:
            log.event("evaluate_small_set", target=spec.name, set=name, images=len(images), feature_dims=2048)
    return sets, training, origin, on_error


def _stage1_metrics(manifest: Manifest, shared: Shared, sets: dict[str, torch.Tensor], device) -> tuple[dict, bytes]:
    """Entropy, PCA kurtosis and FID of stage 1's sets, and the kurtosis figure."""
    settings = manifest.evaluation
    features = None
    if settings.fid:
        inception = _inception(manifest, shared, device)
        if shared.prior_features is None:
            shared.prior_features = inception(sets["prior"])
        features = {"prior": shared.prior_features, **{n: inception(sets[n]) for n in sets if n != "prior"}}
    stage1, kurtosis_png = distribution_metrics(sets, settings.pca_fit_on, settings.pca_components,
                                                settings.bootstrap, settings.seed, features)
    stage1["num_images"] = settings.num_images
    stage1["latent_ids"] = f"{STAGE1_ID_OFFSET} + k, k < {settings.num_images} (seed {settings.seed})"
    if settings.fid:
        stage1["inception"] = {"trained": inception.trained, "weights": settings.inception_weights,
                               "image_size": settings.inception_image_size}
        if not inception.trained:
            stage1["notes"].append("FID from UNTRAINED (seeded random) Inception-v3 weights: a relative measure "
                                   "between these sets only, not comparable with published FIDs")
    else:
        stage1["inception"] = None
        stage1["notes"].append("FID not computed (evaluation.fid: false)")
    return stage1, kurtosis_png


@dataclass
class LikelySamples:
    """The selected candidates: ids, their regenerated images, and the table that grows one column group per phase."""

    ids: np.ndarray
    thresholds: dict
    reconstructions: torch.Tensor
    features: np.ndarray  # the reconstructions in the evaluation's FeatureSpace
    table: pd.DataFrame
    reference_scores: pd.DataFrame | None


def _likely_samples(store, manifest: Manifest, spec: TargetSpec, finetuned, device,
                    space: FeatureSpace, sizer: BatchSizer) -> LikelySamples:
    selection = store.read_parquet(f"{selection_prefix(spec.name)}/{SELECTION_FILE}").to_pandas().sort_values("id")
    thresholds = store.read_json(f"{selection_prefix(spec.name)}/{THRESHOLDS_FILE}")
    ids = selection["id"].to_numpy(dtype=np.int64)
    reconstructions = generate(finetuned, ids, manifest.sampling.seed, device, sizer)
    scores, reference_scores = _read_predictions(store, manifest, spec)
    missing_scores = sorted(set(ids.tolist()) - set(scores.index.tolist()))
    if missing_scores:
        raise InputError(f"{len(missing_scores)} selected id(s) have no score (e.g. {missing_scores[:5]}); the scores "
                         "were made from another selection: delete them and run score again",
                         where=store.uri(f"{spec.name}/scores"))
    predicted = scores.reindex(ids)
    table = pd.DataFrame({
        "id": ids, "rank_combined": selection["rank_combined"].to_numpy(dtype=np.int64),
        "objective_total": selection["objective_total"].to_numpy(dtype=np.float64),
        "mahalanobis": selection["mahalanobis"].to_numpy(dtype=np.float64),
        "recon_pred_age": predicted["age"].to_numpy(dtype=np.float64),
        "recon_pred_sex_prob": predicted["sex_prob"].to_numpy(dtype=np.float64),
        "recon_pred_sex": predicted["sex_label"].astype(object).to_numpy(),
    })
    return LikelySamples(ids, thresholds, reconstructions, space(reconstructions), table, reference_scores)


def _neighbours_and_demographics(manifest: Manifest, spec: TargetSpec, likely: LikelySamples,
                                 training: LoadedImages | None, origin: str | None, on_error: str, resolution: int,
                                 notes: list[str], space: FeatureSpace) -> tuple[torch.Tensor, dict, dict]:
    """Each likely sample's nearest training image, SSIM, and demographic errors against the neighbour's truth;
    adds their columns to the table. (neighbour images, stage-2 summary, demographics summary)."""
    table, reconstructions, reference_scores = likely.table, likely.reconstructions, likely.reference_scores
    count = len(likely.ids)
    train_truth = world_truth(manifest, train_pool(spec))
    neighbours = torch.zeros(0, 1, resolution, resolution)
    demographics: dict = {"available": False}
    stage2: dict = {"likely": count, "candidates": likely.thresholds.get("counts", {}).get("candidates"),
                    "feature_space": space.description, "training_images": 0 if training is None else len(training.frame), "reference_source": origin}
    if training is None or not len(training.frame):
        return neighbours, stage2, demographics
    distance, index = nearest_training_images(likely.features, training.features)
    neighbours = load_rows(training.frame, index, resolution, on_error)
    rows = training.frame.iloc[index]
    table["nn_index"] = index
    table["nn_path"] = rows["path"].astype(str).to_numpy()
    table["nn_patient"] = rows["patient_id"].astype(str).to_numpy()
    table["nn_distance"] = distance
    table["nn_pixel_distance"] = np.linalg.norm(
        pixel_features(reconstructions, PIXEL_SIZE) - pixel_features(neighbours, PIXEL_SIZE), axis=1) \
        if count else np.zeros(0)
    table["ssim"] = ssim(reconstructions, neighbours) if count else np.zeros(0)
    if reference_scores is not None:
        matched = reference_scores.reindex(table["nn_path"])
        table["nn_pred_age"] = matched["age"].to_numpy(dtype=np.float64)
        table["nn_pred_sex_prob"] = matched["sex_prob"].to_numpy(dtype=np.float64)
        labels = matched["sex_label"].astype(object)
        table["nn_pred_sex"] = labels.where(labels.notna(), None).to_numpy()
    else:
        notes.append("no scores-reference: the neighbours' predicted demographics are missing")
    truth = truth_for(table["nn_patient"], rows, train_truth)
    table["true_age"] = truth["age"].to_numpy()
    table["true_sex"] = truth["sex"].to_numpy()
    true_sex = sex_code(table["true_sex"])
    table["recon_age_abs_error"] = np.abs(table["recon_pred_age"] - table["true_age"])
    table["recon_sex_correct"] = _flags((table["recon_pred_sex_prob"].to_numpy() >= 0.5) == (true_sex >= 0.5),
                                        np.isnan(true_sex))
    if "nn_pred_age" in table:
        table["nn_age_abs_error"] = np.abs(table["nn_pred_age"] - table["true_age"])
        nn_prob = table["nn_pred_sex_prob"].to_numpy(dtype=np.float64)
        table["nn_sex_correct"] = _flags((nn_prob >= 0.5) == (true_sex >= 0.5),
                                         np.isnan(true_sex) | np.isnan(nn_prob))
    stage2.update({
        "ssim_mean": _mean(table["ssim"]), "ssim_median": _median(table["ssim"]),
        "nn_distance_mean": _mean(table["nn_distance"]),
        "distinct_neighbours": int(table["nn_path"].nunique()),
        "distinct_neighbour_patients": int(table["nn_patient"].nunique()),
    })
    demographics = {
        "available": True,
        "ground_truth": "synthetic world ground_truth.csv" if train_truth is not None else
        "age/sex columns of the training list",
        "reconstruction": demographic_errors(table["recon_pred_age"], table["recon_pred_sex_prob"],
                                             table["true_age"], true_sex, CONFIDENCE),
    }
    if "nn_pred_age" in table:
        # The demographic model's own error on real training images: the floor the reconstructions compare with.
        scored = table["nn_pred_sex_prob"].notna().to_numpy()
        demographics["neighbour"] = demographic_errors(
            table["nn_pred_age"][scored], table["nn_pred_sex_prob"][scored], table["true_age"][scored],
            true_sex[scored], CONFIDENCE)
    return neighbours, stage2, demographics


def _metrics_document(store, manifest: Manifest, spec: TargetSpec, likely: LikelySamples, stage1: dict,
                      stage2: dict, demographics: dict, reid: dict, leak: dict, notes: list[str],
                      resolution: int) -> dict:
    """metrics.json: every summary of this target's evaluation, with the records it was made from."""
    settings = manifest.evaluation
    thresholds = likely.thresholds
    pool = train_pool(spec)
    losses = store.read_parquet(f"{finetune_prefix(spec.name)}/losses.parquet").to_pandas()
    training_record = None
    if spec.train is not None and store.is_committed(target_prefix(spec.name)):
        record = store.read_json(f"{target_prefix(spec.name)}/training.json")
        training_record = {k: record.get(k) for k in ("preset", "pool", "train", "val", "generalisation_gap",
                                                        "train_images", "val_images", "kept_epoch", "norm",
                                                        "privacy", "recipe")}
        # What the training set was beyond the recipe: the report's dose-response compares plain pools only.
        training_record["cohort"] = spec.train.cohort.describe() if spec.train.cohort is not None else None
        training_record["canaries"] = spec.train.canaries is not None
        training_record["identity_defence"] = spec.train.identity.defence if spec.train.identity is not None else None
    finetune_record = store.read_json(f"{finetune_prefix(spec.name)}/finetune.json")
    attack_terms = {"terms": finetune_record.get("terms"), "configured": finetune_record.get("terms_configured"),
                    "fallback": finetune_record.get("objective_fallback"),
                    "reference": finetune_record.get("reference"),
                    "feature_target": finetune_record.get("feature_target")}
    metrics = {
        "target": spec.name, "arch": spec.arch, "family": spec.family,
        "preset": spec.train.preset if spec.train is not None else None,
        "train_pool": pool, "heldout_pool": OTHER_POOL[pool],
        "role": "control model" if pool == "control" else "target",
        "checkpoint": spec.checkpoint, "target_training": training_record, "attack_terms": attack_terms,
        "threat_model": THREAT_MODEL, "validation_note": VALIDATION_NOTE,
        "selection": {"rule": thresholds.get("rule"), "thresholds": thresholds.get("thresholds"),
                      "counts": thresholds.get("counts")},
        "finetune": {"steps": int(len(losses)),
                     "first_total": float(losses["total"].iloc[0]) if len(losses) else None,
                     "last_total": float(losses["total"].iloc[-1]) if len(losses) else None},
        "stage1": stage1, "stage2": stage2, "demographics": demographics, "reidentification": reid, "leak": leak,
        "notes": notes, "figures": {k: v for k, v in FIGURES.items() if k != "ppa_samples" or "ppa" in spec.attacks}, "table": TABLE_FILE, "pairs": "pairs/<id:09d>.png",
        "evaluation": settings.model_dump(mode="json"), "software": software_versions(),
        "resolution": resolution,
    }
    return clean_json(metrics)


def _write_outputs(store, manifest: Manifest, spec: TargetSpec, metrics: dict, likely: LikelySamples,
                   neighbours: torch.Tensor, sets: dict[str, torch.Tensor], kurtosis_png: bytes,
                   leak_tables: dict[str, bytes]) -> None:
    """One commit: the table, metrics.json, the figures and a reconstruction | neighbour pair per likely sample."""
    table, reconstructions = likely.table, likely.reconstructions
    losses = store.read_parquet(f"{finetune_prefix(spec.name)}/losses.parquet").to_pandas()
    ssims = table["ssim"] if "ssim" in table else pd.Series(np.nan, index=table.index)
    captions = [f"id {i} | SSIM {s:.3f}" for i, s in zip(table["id"], ssims)]
    order = np.argsort(table["rank_combined"].to_numpy(), kind="stable")
    shown = order[:GRID_MAX_PAIRS]
    grid = likely_grid_png(reconstructions[shown], neighbours[shown] if len(neighbours) else None,
                           [captions[i] for i in shown],
                           f"{spec.name}: likely samples (left) beside their nearest training image (right)"
                           if len(neighbours) else f"{spec.name}: likely samples")
    arrow = _to_arrow(table)
    with store.committed(evaluation_prefix(spec.name), {"stage": "evaluate", "target": spec.name,
                                                        "likely": len(likely.ids)}) as out:
        with out.parquet_writer(TABLE_FILE, TABLE_SCHEMA, max(1, manifest.sampling.row_group_size)) as writer:
            writer.write_table(arrow)
        out.write_json(METRICS_FILE, metrics)
        out.write_bytes(FIGURES["kurtosis"], kurtosis_png)
        out.write_bytes(FIGURES["losses"], losses_png(losses, f"{spec.name}: stage 1 fine-tuning"))
        out.write_bytes(FIGURES["stage1_examples"], stage1_examples_png(sets))
        out.write_bytes(FIGURES["likely_samples"], grid)
        for name, data in leak_tables.items():
            out.write_bytes(name, data)
        if len(neighbours):
            for row, candidate in enumerate(likely.ids.tolist()):
                out.write_bytes(pair_key(candidate), pair_png(reconstructions[row], neighbours[row]))


@dataclass(frozen=True)
class RawCandidates:
    """The attacked generator's raw leak candidates as _leak measured them: embedding features and, when
    evaluation.population_shift is on, predicted demographics (age, sex)."""

    features: np.ndarray
    demographics: dict[str, np.ndarray] | None
    record_features: np.ndarray  # the member and non-member images, embedded
    record_patients: np.ndarray  # each record's patient (0..P-1)
    member: np.ndarray  # (P,) whether patient p is a member


def _leak(manifest: Manifest, spec: TargetSpec, finetuned, shared: Shared, space: FeatureSpace, resolution: int,
          device, notes: list[str]) -> tuple[dict, dict[str, bytes], RawCandidates | None]:
    """The leak statistic against the prior, on the target's member and non-member patients (analysis.leak), and
    the tables it was computed from: the records' and the raw candidates' features (the report pairs them with a
    control model's candidates; calibrate spikes into them)."""
    settings = manifest.evaluation
    records, known_by, on_error = membership_records(manifest, spec, settings.membership_patients, settings.seed)
    if records is None:
        notes.append(f"membership: not available ({known_by})")
        return {"available": False, "reason": known_by}, {}, None
    loaded = load_images(records, resolution, on_error, manifest.compute.num_workers, set(),
                         f"{spec.name} member and non-member images", space)
    frame = loaded.frame
    codes, patient_ids = pd.factorize(frame["patient_id"].astype(str))
    member = frame.groupby(codes)["member"].first().to_numpy(dtype=bool)
    if member.all() or not member.any():
        notes.append("membership: not available (the member or non-member images failed to load)")
        return {"available": False, "reason": "the member or non-member images failed to load"}, {}, None
    ids = LEAK_ID_OFFSET + np.arange(settings.membership_candidates, dtype=np.int64)
    # P4 reads the same candidates' predicted demographics: taken in the same pass, not by generating them again.
    wanted = settings.population_shift
    if shared.prior_candidate_features is None:
        prior = load_prior(manifest).to(device).eval()
        predicted = []
        shared.prior_candidate_features = generated_features(
            prior, ids, manifest.sampling.seed, device, space, shared.sizer,
            _demographics_sink(manifest, shared, device, predicted) if wanted else None)
        if wanted:
            shared.prior_candidate_demographics = _joined(predicted)
        del prior
    predicted = []
    attacked = generated_features(finetuned, ids, manifest.sampling.seed, device, space, shared.sizer,
                                  _demographics_sink(manifest, shared, device, predicted) if wanted else None)
    attacked_demographics = _joined(predicted) if wanted else None
    scores = {name: generator_scores(loaded.features, codes, len(patient_ids), features)
              for name, features in (("attacked", attacked), ("prior", shared.prior_candidate_features))}
    raw = leak_test(member, scores["attacked"], scores["prior"], settings.leak_bootstrap,
                    settings.leak_permutations, settings.seed, CONFIDENCE)
    selected = _selected_leak(manifest, spec, finetuned, shared, space, device, loaded.features, codes, member)
    summary = {
        "available": True, "feature_space": space.description, "identity_sensitive": space.identity_sensitive,
        "members_known_by": known_by, "pool": train_pool(spec),
        "nonmembers": f"other labelled patients of the {train_pool(spec)} pool, matched in number and label mix",
        "member_patients": int(member.sum()), "nonmember_patients": int((~member).sum()),
        "images": len(frame), "candidates": f"ids {LEAK_ID_OFFSET} + k, k < {len(ids)} (seed {manifest.sampling.seed}); "
        "no latent of fine-tuning or sampling",
        "raw": {"vs_prior": raw},
        "selected": {"vs_prior": selected},
        "statistic": "L = AUC(attacked) - AUC(null) on the same patients; a patient's score is the distance from its "
                     "closest image to the closest candidate; two-way bootstrap (patients, candidates), paired "
                     "permutation p-value",
    }
    records_table = pa.table({
        "path": pa.array(frame["path"].astype(str).tolist()),
        "patient_id": pa.array(frame["patient_id"].astype(str).tolist()),
        "patient": pa.array(codes.astype(np.int64)),
        "member": pa.array(frame["member"].to_numpy(dtype=bool)),
        "label": pa.array(pd.to_numeric(frame["label"], errors="coerce").to_numpy(dtype=np.float64)),
        "features": feature_column(loaded.features),
    })
    # leak_candidates.parquet is written by evaluate_target, once the ppa samples (if any) are embedded too.
    tables = {RECORDS_FILE: parquet_bytes(records_table)}
    return summary, tables, RawCandidates(attacked, attacked_demographics, loaded.features, codes, member)


def leak_candidates_bytes(ids: np.ndarray, attacked: np.ndarray, prior: np.ndarray,
                          ppa: "PPASamples | None" = None) -> bytes:
    """leak_candidates.parquet: each candidate's generator ("attacked": the study's fine-tuned generator, "prior",
    "ppa": the ppa attack's kept samples), id and embedding; the report measures L between targets from it."""
    generators = ["attacked"] * len(ids) + ["prior"] * len(ids)
    all_ids, features = [ids, ids], [attacked, prior]
    if ppa is not None:
        generators += ["ppa"] * len(ppa.ids)
        all_ids.append(np.asarray(ppa.ids, np.int64))
        features.append(ppa.features)
    return parquet_bytes(pa.table({"generator": pa.array(generators), "id": pa.array(np.concatenate(all_ids)),
                                   "features": feature_column(np.concatenate(features))}))


def _demographics_sink(manifest: Manifest, shared: Shared, device, parts: list) -> Callable[[torch.Tensor], None]:
    """A callable that appends the predicted age and sex (1 = M) of each batch of [0, 1] images to `parts`."""
    if shared.demographic_model is None:
        shared.demographic_model = load_demographic_model(manifest).to(device).eval()
    model = shared.demographic_model

    @torch.inference_mode()
    def predict(images: torch.Tensor) -> None:
        parts.append(predict_demographics(model, images, manifest.demographics.image_size))

    return predict


def _joined(parts: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) if parts else np.zeros(0) for k in ("age", "sex")}


def _candidate_demographics(manifest: Manifest, shared: Shared, generator, ids: np.ndarray, device
                            ) -> dict[str, np.ndarray]:
    """Predicted age and sex (1 = M) of the candidates `ids`, batch by batch."""
    parts = []
    sink = _demographics_sink(manifest, shared, device, parts)
    with torch.inference_mode():
        # The sink appends only once its prediction succeeded: a batch retried smaller leaves no partial result.
        shared.sizer.run(np.asarray(ids, dtype=np.int64),
                         lambda batch: sink(regenerate_images(generator, batch, manifest.sampling.seed, device)))
    return _joined(parts)


def _population_shift(manifest: Manifest, spec: TargetSpec, finetuned, shared: Shared, device,
                      attacked: dict[str, np.ndarray] | None) -> dict:
    """P4, population attribute leakage: how far the attack moved the predicted age and male share of the raw leak
    candidates from the prior's, beside the truth of what the target trained on (its members) and of its pool."""
    settings = manifest.evaluation
    ids = LEAK_ID_OFFSET + np.arange(settings.membership_candidates, dtype=np.int64)
    # Normally taken by _leak in its pass over the same candidates; generated here only where _leak did not run.
    if shared.prior_candidate_demographics is None:
        shared.prior_candidate_demographics = _candidate_demographics(
            manifest, shared, load_prior(manifest).to(device).eval(), ids, device)
    if attacked is None:
        attacked = _candidate_demographics(manifest, shared, finetuned, ids, device)
    prior = shared.prior_candidate_demographics
    result = {"candidates": len(ids), "cohort": spec.train.cohort.describe() if spec.train and spec.train.cohort
              else "the whole pool",
              "age": mean_shift(attacked["age"], prior["age"], settings.leak_bootstrap, settings.seed, CONFIDENCE),
              "male_share": mean_shift(attacked["sex"], prior["sex"], settings.leak_bootstrap, settings.seed + 1,
                                       CONFIDENCE)}
    found = pool_frame(manifest, train_pool(spec))
    members, _ = member_patients(manifest, spec, found[0] if found else None)
    if found is not None and members:
        patients = found[0].drop_duplicates("patient_id").set_index("patient_id")
        inside = patients.index.astype(str).isin(members)
        for name, values in (("members", patients[inside]), ("pool", patients)):
            result[f"truth_{name}"] = {"age": float(values["age"].mean()),
                                       "male_share": float((values["sex"] == "M").mean()), "patients": len(values)}
    log.event("population_shift", target=spec.name, cohort=result["cohort"], age_shift=result["age"]["shift"],
              age_ci=result["age"]["ci"], male_shift=result["male_share"]["shift"],
              male_ci=result["male_share"]["ci"])
    return result


@torch.inference_mode()
def _target_probabilities(manifest: Manifest, spec: TargetSpec, images01: torch.Tensor, classes: int,
                          device, sizer: BatchSizer) -> torch.Tensor:
    """(N, classes) softmax of the frozen target on [0, 1] images, batch by batch through `sizer`."""
    model = load_attack_target(manifest, spec)[0].to(device).eval()
    input_spec = target_input_spec(spec)
    logits = sizer.run(np.arange(len(images01)),
                       lambda rows: model(to_target_input(images01[rows].to(device), input_spec)).float().cpu())
    return torch.softmax(torch.cat(logits), dim=1) if logits else torch.zeros(0, classes)


def _identity(manifest: Manifest, spec: TargetSpec, likely: LikelySamples, raw_features: np.ndarray | None,
              shared: Shared, space: FeatureSpace, latent_dim: int, device,
              attacked: "PPASamples | None" = None) -> dict | None:
    """The identity-class control's measures (analysis.identity) for a target of preset identity: the likely
    samples, the leak statistic's raw candidates of the attacked generator and, as the baseline, the prior's; each
    sample asks for the class its latent's z_0 encodes. Also how often the target itself sees the requested class
    in the likely samples (a collapsed stage 1 leaves it at chance)."""
    if spec.train is None or spec.train.preset != "identity":
        return None
    settings, seed = manifest.evaluation, manifest.sampling.seed
    sets = identity_sets(manifest, spec)
    k = len(sets.scored)
    gallery_patients = sets.scored + sets.distractors
    number = {p.name: i for i, p in enumerate(gallery_patients)}
    rows, on_error = pool_frame(manifest, train_pool(spec))
    resolution = likely.reconstructions.shape[-1]
    gallery = load_images(rows[rows["patient_id"].astype(str).isin(number)], resolution, on_error,
                          manifest.compute.num_workers, set(), f"{spec.name} identity gallery", space)
    gallery_patient = gallery.frame["patient_id"].astype(str).map(number).to_numpy(dtype=np.int64)
    sexes = np.array([p.sex for p in sets.scored])

    def measure(features: np.ndarray, ids: np.ndarray | None, classes: np.ndarray | None = None) -> dict:
        if classes is None:
            classes = requested_classes(latents_for_ids(seed, ids, latent_dim), k).numpy()
        return identity_control(features, classes, gallery.features, gallery_patient, np.arange(k), sexes,
                                bootstrap=settings.leak_bootstrap, seed=settings.seed, confidence=CONFIDENCE)

    probabilities = _target_probabilities(manifest, spec, likely.reconstructions, k, device, shared.sizer)
    asked = requested_classes(latents_for_ids(seed, likely.ids, latent_dim), k)
    result = {
        "role": sets.role, "classes": k,
        "attack": "stage 1 with a learned latent offset per class" if spec.objective.class_offsets
        else "the study's stage 1 (classes through z_0 only)",
        "patients": [p.name for p in sets.classes],
        "scored_against": [p.name for p in sets.scored],
        "distractors": [p.name for p in sets.distractors],
        "gallery": "the world's own studies of these patients (never trained on), in the re-identification embedding",
        "permutation": "class -> patient assignment permuted within sex",
        "likely": measure(likely.features, likely.ids),
        "target_agrees": float((probabilities.argmax(1) == asked).float().mean()) if len(asked) else None,
        "target_confidence": float(probabilities[torch.arange(len(asked)), asked].mean()) if len(asked) else None,
    }
    if raw_features is not None:
        ids = LEAK_ID_OFFSET + np.arange(len(raw_features), dtype=np.int64)
        result["raw"] = measure(raw_features, ids)
        # The prior is one generator: its result depends only on the patients scored (a positive and its negative
        # share them), so it is measured once per set.
        key = (tuple(result["scored_against"]), tuple(result["distractors"]))
        if key not in shared.prior_identity:
            shared.prior_identity[key] = measure(shared.prior_candidate_features, ids)
        result["prior_raw"] = shared.prior_identity[key]
    if attacked is not None:
        # ppa asks for its classes directly (each kept sample was optimised toward one), not through z_0.
        result["ppa"] = measure(attacked.features, None, attacked.classes)
    log.event("identity_control", target=spec.name, role=sets.role, top1=result["likely"]["top1"],
              distinct=result["likely"]["distinct"], p_value=result["likely"]["p_value"],
              raw_top1=result.get("raw", {}).get("top1"), target_agrees=result["target_agrees"],
              ppa_top1=result.get("ppa", {}).get("top1"), ppa_p_value=result.get("ppa", {}).get("p_value"))
    return result


def _canaries(manifest: Manifest, spec: TargetSpec, likely: LikelySamples, raw_features: np.ndarray | None,
              shared: Shared, space: FeatureSpace, attacked: "PPASamples | None" = None) -> dict | None:
    """P2 (analysis.canaries): per duplication level, included vs excluded canaries by the distance from each
    canary's held-out study to the closest candidate, for the likely samples, the attacked generator's raw leak
    candidates and, as a null that must stay at chance, the prior's."""
    sets = canary_sets(manifest, spec)
    if sets is None:
        return None
    settings = manifest.evaluation
    rows = pd.DataFrame(write_extra_studies(manifest.data.synthetic.root, WorldConfig.of(manifest.data.synthetic),
                                            sets.patients, 1, first=CANARY_HELDOUT_STUDY))
    heldout = load_images(rows, likely.reconstructions.shape[-1], "raise", manifest.compute.num_workers, set(),
                          f"{spec.name} canaries' held-out studies", space)
    canaries = np.arange(len(sets.patients))
    result = {
        "patients": [p.name for p in sets.patients],
        "doses": sets.doses.tolist(), "included": sets.included.tolist(), "flip_label": sets.flip_label,
        "scored_by": f"study {CANARY_HELDOUT_STUDY + 1} of each canary (never trained on), distance to the closest "
                     "candidate in the re-identification embedding",
        "null": "the coins permuted among the canaries of one duplication level (one-sided)",
    }
    for name, features in (("likely", likely.features), ("raw", raw_features),
                           ("prior_raw", shared.prior_candidate_features if raw_features is not None else None),
                           ("ppa", attacked.features if attacked is not None else None)):
        if features is None or not len(features):
            continue
        scores = pairwise_min_distance(heldout.features, features, canaries, len(canaries)).min(axis=1)
        result[name] = canary_tests(scores, sets.included, sets.doses, bootstrap=settings.leak_bootstrap,
                                    seed=settings.seed, confidence=CONFIDENCE)
    log.event("canaries", target=spec.name, included=int(sets.included.sum()), of=len(canaries),
              **{f"raw_auc_d{d}": r["auc"] for d, r in (result.get("raw") or {}).items()})
    return result


@dataclass(frozen=True)
class PPASamples:
    """The ppa attack's kept samples (stages.ppa), rendered and embedded, and what evaluate measured on them."""

    ids: np.ndarray  # each kept sample's search id (its latent is in the ppa stage's kept.parquet)
    classes: np.ndarray
    features: np.ndarray
    summary: dict
    figure: bytes  # the kept samples, one row per class (at most 10 rows of 8)


def _ppa_attack(store, manifest: Manifest, spec: TargetSpec, shared: Shared, space: FeatureSpace, device,
                raw: RawCandidates | None) -> PPASamples | None:
    """The ppa attack's kept samples (None if the target does not list ppa): each rendered from its stored latent by
    the generator the attack optimised through, embedded, and L measured as for the study's raw candidates, with the
    null the same number of the prior's raw leak candidates (a pool as large, without the attack)."""
    kept = read_ppa_kept(store, manifest, spec)
    if kept is None:
        return None
    settings = manifest.ppa
    generator = (load_finetuned_generator(manifest, spec.name) if settings.generator == "finetuned"
                 else load_prior(manifest)).to(device).eval()
    latents = torch.from_numpy(feature_matrix(kept["latent"]))
    parts, shown = [], {}
    classes = kept["class"].to_numpy().astype(np.int64)
    with torch.inference_mode():
        for start in range(0, len(latents), LOADER_BATCH):
            images = to_grey(generator_to_unit(generator(latents[start:start + LOADER_BATCH].to(device)),
                                               generator.config.output_range)).float().cpu()
            parts.append(space(images))
            for row, cls in enumerate(classes[start:start + LOADER_BATCH].tolist()):
                if (cls in shown or len(shown) < 10) and len(shown.setdefault(cls, [])) < 8:
                    shown[cls].append(images[row])
    features = np.concatenate(parts) if parts else np.zeros((0, space.dims), np.float32)
    confidence = kept["confidence"].to_numpy()
    summary = {"mode": "ppa", "generator": settings.generator, "kept": len(kept),
               "classes": int(len(np.unique(classes))), "kept_per_class": settings.keep,
               "settings": settings.model_dump(mode="json"),
               "mean_confidence": float(confidence.mean()) if len(confidence) else None,
               "mean_searched_confidence": float(kept["searched_confidence"].to_numpy().mean()) if len(kept) else None}
    if raw is None or shared.prior_candidate_features is None:
        summary["leak"] = {"available": False, "reason": "membership is not available for this target"}
    else:
        null = shared.prior_candidate_features[:len(features)]
        patients = len(raw.member)
        result = leak_test(raw.member, generator_scores(raw.record_features, raw.record_patients, patients, features),
                           generator_scores(raw.record_features, raw.record_patients, patients, null),
                           manifest.evaluation.leak_bootstrap, manifest.evaluation.leak_permutations,
                           manifest.evaluation.seed, CONFIDENCE)
        summary["leak"] = {"available": True, "vs_prior": result, "null": f"the prior's first {len(null)} raw leak "
                           f"candidates (ids {LEAK_ID_OFFSET} + k)", "compared": len(null)}
    log.event("ppa_evaluated", target=spec.name, kept=len(kept),
              leak=(summary["leak"].get("vs_prior") or {}).get("leak"))
    figure = stage1_examples_png({f"class {c}": torch.stack(images) for c, images in shown.items()},
                                 per_row=max((len(v) for v in shown.values()), default=1))
    return PPASamples(kept["id"].to_numpy().astype(np.int64), classes, features, summary, figure)


def _attacks(leak: dict, attacked: PPASamples | None) -> dict:
    """Every attack mode run on the target, each with L against the prior (the study's: its raw candidates)."""
    study = {"mode": "study", "description": "the study's two stages: a fine-tuned generator's raw candidates"}
    if leak.get("available"):
        study["leak"] = {"available": True, "vs_prior": leak["raw"]["vs_prior"],
                         "compared": leak["raw"]["vs_prior"].get("candidates")}
    else:
        study["leak"] = {"available": False, "reason": leak.get("reason")}
    modes = {"study": study}
    if attacked is not None:
        modes["ppa"] = {**attacked.summary, "description": "per-sample latent optimisation toward each class "
                        "(Plug & Play-style): the kept samples"}
    return modes


def _selected_leak(manifest: Manifest, spec: TargetSpec, finetuned, shared: Shared, space: FeatureSpace, device,
                   features: np.ndarray, codes: np.ndarray, member: np.ndarray) -> dict:
    """L for stage 2's selection: the same rule applied to pools of equal size from both generators.

    Pool: the attacked generator's candidates 0..P-1 (their committed scores) and the prior's raw leak candidates
    0..P-1, scored here against the same target with the same objective terms and Mahalanobis model, P =
    min(sampling.num_candidates, evaluation.membership_candidates). `selection`'s rule picks from each pool; the
    same number from both (the best by combined rank) are compared. The prior is the null: a pool of the same
    size, passed through the same filter, shows what selection finds without the attack."""
    store = run_store(manifest)
    sampling, settings = manifest.sampling, manifest.evaluation
    pool = min(sampling.num_candidates, settings.membership_candidates)
    summaries = committed_summaries(store, spec.name, sampling.num_candidates, sampling.num_shards)
    objective, distance = read_scores(store, summaries, sampling.num_candidates)
    attacked = select_candidates(objective[:pool], distance[:pool], manifest.selection)
    null = select_candidates(*_prior_scores(manifest, spec, pool, device), manifest.selection)
    compared = min(len(attacked["selected"]), len(null["selected"]))
    counts = {"pool": pool, "rule": manifest.selection.rule, "selected_attacked": len(attacked["selected"]),
              "selected_null": len(null["selected"]), "compared": compared}
    if compared == 0:
        return {"available": False, "reason": "the rule selects nothing from one of the pools", **counts}
    attacked_ids = _best_by_combined_rank(attacked, compared)
    null_positions = _best_by_combined_rank(null, compared)
    attacked_features = generated_features(finetuned, attacked_ids, sampling.seed, device, space, shared.sizer)
    null_features = shared.prior_candidate_features[null_positions]
    patients = len(member)
    result = leak_test(member, generator_scores(features, codes, patients, attacked_features),
                       generator_scores(features, codes, patients, null_features), settings.leak_bootstrap,
                       settings.leak_permutations, settings.seed, CONFIDENCE)
    return {"available": True, **result, **counts}


def _best_by_combined_rank(selection: dict, count: int) -> np.ndarray:
    """The `count` selected ids best by (combined rank, id)."""
    selected, combined = selection["selected"], selection["ranks"][2]
    return np.sort(selected[np.lexsort((selected, combined))[:count]])


def _prior_scores(manifest: Manifest, spec: TargetSpec, pool: int, device) -> tuple[np.ndarray, np.ndarray]:
    """(objective_total, mahalanobis) of the prior's raw leak candidates 0..pool-1 against this target."""
    prior = load_prior(manifest).to(device).eval()
    sizer = BatchSizer(manifest.sampling.batch_size, device, pool, prior.config.resolution ** 2)
    scorer = build_scorer(manifest, spec, prior, SingleProcess(device), sizer)
    try:
        ids = LEAK_ID_OFFSET + np.arange(pool, dtype=np.int64)
        columns = concat_columns(sizer.run(ids, lambda batch: scorer.score(batch, shard=0)[0]))
    finally:
        scorer.objective.close()
    return columns["objective_total"].astype(np.float64), columns["mahalanobis"].astype(np.float64)


def _reidentify(manifest: Manifest, spec: TargetSpec, training: LoadedImages | None, heldout_pool: str,
                likely: LikelySamples, notes: list[str], resolution: int, space: FeatureSpace) -> dict:
    """Fill the table's re-identification and device columns; return the summary."""
    settings = manifest.evaluation
    reconstructions, table = likely.reconstructions, likely.table
    pool = train_pool(spec)
    if training is None or not len(training.frame):
        return {"available": False, "reason": "the target's training images are not available here"}
    heldout_found = pool_frame(manifest, heldout_pool)
    if heldout_found is None:
        return {"available": False, "reason": f"the held-out ({heldout_pool}) pool's images are not available here"}
    heldout_frame, heldout_on_error = heldout_found
    # Patients the target trained on must not sit in its held-out set (possible with real data sources).
    heldout_frame = heldout_frame[~heldout_frame["patient_id"].astype(str).isin(
        set(training.frame["patient_id"].astype(str)))].reset_index(drop=True)
    labelled = "label" in training.frame and "label" in heldout_frame
    train_positions, heldout_positions = matched_positions(
        training.frame["label"] if labelled else None, heldout_frame["label"] if labelled else None, settings.seed)
    size = len(train_positions)
    if size == 0:
        return {"available": False, "reason": f"the held-out ({heldout_pool}) pool has no labelled images"}
    if size < len(training.frame):
        notes.append(f"re-identification uses {size} of the {len(training.frame)} training images: the held-out "
                     "pool has too few images of some label to match the training set's label mix (equal, alike "
                     "sets keep chance at 0.5)")
    heldout = load_images(heldout_frame.iloc[heldout_positions].reset_index(drop=True), resolution, heldout_on_error,
                          manifest.compute.num_workers, set(), f"{spec.name} held-out images ({heldout_pool})", space)
    train_features = training.features[train_positions]
    train_patients = training.frame["patient_id"].astype(str).to_numpy()[train_positions]
    result = reidentification(
        likely.features, train_features, train_patients, heldout.features,
        heldout.frame["patient_id"].astype(str).to_numpy(), confidence=CONFIDENCE,
    )
    reid_table = result.table
    table["reid_train_patient"] = reid_table["train_patient"].astype(str).to_numpy()
    table["reid_train_distance"] = reid_table["train_distance"].to_numpy()
    table["reid_heldout_patient"] = reid_table["control_patient"].astype(str).to_numpy()
    table["reid_heldout_distance"] = reid_table["control_distance"].to_numpy()
    table["member_closer"] = reid_table["member_closer"].to_numpy(dtype=bool)
    table["reidentified"] = reid_table["reidentified"].to_numpy(dtype=bool)
    summary = {"available": True, **result.summary, "train_pool": pool, "heldout_pool": heldout_pool,
               "heldout_images": len(heldout.frame), "chance_rate": 0.5,
               "matched_on": "label counts" if labelled else "size only",
               "feature_space": space.description,
               "membership_auc": membership_auc(table["reid_train_distance"], table["reid_heldout_distance"])
               if len(table) else None}
    summary["devices"] = _devices(manifest, training, heldout, pool, heldout_pool, reconstructions, table)
    return summary


def _devices(manifest, training: LoadedImages, heldout: LoadedImages, pool: str, heldout_pool: str,
             reconstructions: torch.Tensor, table: pd.DataFrame) -> dict:
    train_truth, heldout_truth = world_truth(manifest, pool), world_truth(manifest, heldout_pool)
    if train_truth is None or heldout_truth is None:
        return {"available": False, "reason": "device ground truth exists only on the synthetic world"}
    has_device = np.concatenate([
        truth_for(training.frame["patient_id"], training.frame, train_truth)["pacemaker"].to_numpy(),
        truth_for(heldout.frame["patient_id"], heldout.frame, heldout_truth)["pacemaker"].to_numpy(),
    ])
    regions = np.concatenate([training.regions, heldout.regions])
    known = ~np.isnan(has_device)
    detector = calibrate_device_detector(regions[known], has_device[known] > 0.5)
    truth = truth_for(table["reid_train_patient"], table, train_truth)["pacemaker"].to_numpy()
    table["truth_pacemaker"] = _flags(truth > 0.5, np.isnan(truth))
    summary = {"available": detector is not None and detector.reliable,
               "detector": None if detector is None else asdict(detector),
               "method": "fraction of pixels in the upper chest on the image's right (rows "
                         f"{DEVICE_REGION[0]:.2f}-{DEVICE_REGION[1]:.2f}, columns {DEVICE_REGION[2]:.2f}-"
                         f"{DEVICE_REGION[3]:.2f} of the image) brighter than the {DEVICE_LEVEL_PERCENTILE:g}th "
                         "percentile of device-free images there; threshold by Youden's J on the training and "
                         "held-out images",
               "matched_with_pacemaker": int(np.nansum(truth > 0.5))}
    if detector is None:
        summary["reason"] = "the calibration images lack either images with or without a pacemaker"
        return summary
    if not detector.reliable:
        summary["reason"] = (f"the detector cannot be trusted here: AUC {detector.auc:.2f} on {detector.with_device} "
                             f"images with and {detector.without_device} without a pacemaker (needs AUC >= "
                             f"{DETECTOR_MIN_AUC} and >= {DETECTOR_MIN_IMAGES} images of each kind; below about 64 px "
                             "a pacemaker is a few blurred pixels)")
        return summary
    recon_regions = device_region(reconstructions) if len(reconstructions) else np.zeros((0, 1, 1), np.uint8)
    scores = detector.scores(recon_regions)
    detected = scores >= detector.threshold
    table["recon_device_score"] = scores
    table["recon_pacemaker_detected"] = detected
    reproduced = (truth > 0.5) & detected
    table["device_reproduced"] = _flags(reproduced, np.isnan(truth))
    # Detections on reconstructions whose matched patient has no pacemaker: the detector's false alarms on generated
    # images, which can be far more frequent than on real ones (1 - specificity) when the images are artefact-ridden.
    without = truth <= 0.5
    summary.update({"reconstructions_detected": int(detected.sum()), "reproduced": int(reproduced.sum()),
                    "reproduced_rate": float(reproduced.mean()) if len(reproduced) else None,
                    "matched_without_pacemaker": int(without.sum()),
                    "detected_without_pacemaker": int((detected & without).sum())})
    false_alarms = (detected & without).sum() / without.sum() if without.sum() else None
    summary["interpretable"] = bool(false_alarms is None
                                    or false_alarms <= max(0.25, 3 * (1 - detector.specificity)))
    return summary


def _flags(values: np.ndarray, unknown: np.ndarray) -> pd.Series:
    """Nullable booleans: None where unknown."""
    return pd.Series([None if u else bool(v) for v, u in zip(values, unknown)], dtype=object)


def _mean(values: pd.Series) -> float | None:
    values = pd.to_numeric(values, errors="coerce")
    return float(values.mean()) if values.notna().any() else None


def _median(values: pd.Series) -> float | None:
    values = pd.to_numeric(values, errors="coerce")
    return float(values.median()) if values.notna().any() else None


def _to_arrow(table: pd.DataFrame) -> pa.Table:
    columns = {}
    for column in TABLE_SCHEMA:
        if column.name in table:
            values = table[column.name].tolist()
            values = [None if (isinstance(v, float) and math.isnan(v)) or v is pd.NA else v for v in values]
        else:
            values = [None] * len(table)
        columns[column.name] = pa.array(values, type=column.type)
    return pa.Table.from_pydict(columns, schema=TABLE_SCHEMA)


def evaluate(manifest: Manifest, target: str | None = None) -> int:
    """`reid-batch evaluate`: metrics for one target (None = every target); see the module docstring."""
    shared = Shared()
    return run_single_writer(manifest, target, lambda spec: evaluate_target(manifest, spec, shared))
