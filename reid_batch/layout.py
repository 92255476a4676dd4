"""The run layout: every key under <output.uri>/<run_id>/, every file name, every reserved latent-id range.

One module, so that stages (and array tasks on different machines) agree on keys without importing each other.
Torch-free: `report`, `plan` and the tests read it cheaply.

    targets/<name>/ ................... trained target: model.safetensors, training.json, train_images.csv
    prior/ ............................ trained PGGAN prior: generator.safetensors, samples.png, metrics.json
    demographics/ ..................... age/sex model: model.safetensors, metrics.json, plots
    reid/ ............................. re-identification embedding: model.safetensors, metrics.json
    <target>/finetune/ ................ stage 1 result: generator.safetensors, losses.parquet, samples PNGs
    <target>/finetune-checkpoints/ .... resumable stage 1 state, one committed prefix per checkpoint
    <target>/finetune-reference.safetensors  cached reference statistics (ViT, GroupNorm CNN)
    <target>/mahalanobis-reference/ ... the Ledoit-Wolf Gaussian of selection.mahalanobis, fitted once, read by every
                                        shard (gaussian.safetensors, gaussian.json)
    <target>/candidates/shard=<I>/ .... per-candidate rows (Parquet), committed per chunk, _SHARD.json last
    <target>/candidates-images/ ....... candidate PNGs, only with sampling.save_images
    <target>/ppa/shard=<I>/class=<C>/ . the ppa attack's kept samples of one class (kept.parquet: search id, class,
                                        confidences, optimised latent), committed per class; _SHARD.json last
    <target>/selection/ ............... stage 2: selected ids, thresholds
    <target>/scores/shard=<I>/ ........ demographic predictions of the selected candidates (+ PNGs)
    <target>/scores-reference/ ........ the same model on the target's training images
    <target>/evaluation/ .............. metrics.json, evaluation.parquet, records.parquet, leak_candidates.parquet,
                                        figures/, pairs/
    <target>/calibration/ ............. spike-in calibration: calibration.json, dose_response.png
    report/ (report-<target>/) ........ the risk report: report.html, report.md, report.json
    logs/ ............................. every event of every task as JSON lines: <task>.jsonl, run.jsonl
    resume/ ........................... in-progress training state (deleted once a stage commits)

Every multi-file output is a committed prefix (storage.COMMIT_MARKER): readers treat an uncommitted one as absent.

Latent ids: every image the attack generates is `latents_for_ids(seed, id)`; disjoint id ranges keep the sets apart
(a candidate never shares its latent with a reference or a figure):

    0 .. num_candidates-1 ............ sampling candidates (sampling.seed); fine-tuning steps (finetune.seed)
    PRIOR_DISTANCE_ID_OFFSET + k ..... train-prior's distance-to-data images (1e6 + k)
    STAGE1_ID_OFFSET + k ............. evaluate's stage-1 sets, prior and fine-tuned (2**40 + k)
    PPA_ID_OFFSET + c * PPA_CLASS_STRIDE + k  ppa's searched latents of class c (2**44 + c * 2**24 + k), before
                                       optimisation (the optimised latent is stored: it is not a function of the id)
    LEAK_ID_OFFSET + k ............... evaluate's raw candidates for the leak statistic, every generator (2**50 + k)
    CALIBRATION_ID_OFFSET + k ........ calibrate's prior candidates, CALIBRATION_ID_STRIDE per repeat (2**56 + k)
    GRID_ID_OFFSET + k ............... fine-tuning's before/after grids (2**60 + k)
    FINETUNE_REFERENCE_ID_OFFSET + k . reference statistics measured on prior samples (2**61 + k)
    MAHALANOBIS_REFERENCE_ID_OFFSET + k  Ledoit-Wolf reference features, prior samples (2**62 + k)
"""

from __future__ import annotations

# ------------------------------------------------------------------------------------------------ latent ids

PRIOR_DISTANCE_ID_OFFSET = 1_000_000
STAGE1_ID_OFFSET = 2**40
PPA_ID_OFFSET = 2**44
PPA_CLASS_STRIDE = 2**24
LEAK_ID_OFFSET = 2**50
CALIBRATION_ID_OFFSET = 2**56
CALIBRATION_ID_STRIDE = 2**32
GRID_ID_OFFSET = 2**60
FINETUNE_REFERENCE_ID_OFFSET = 2**61
MAHALANOBIS_REFERENCE_ID_OFFSET = 2**62

# ------------------------------------------------------------------------------------------------ run-level outputs

TARGETS_PART = "targets"
PRIOR_PREFIX = "prior"
PRIOR_RESUME_KEY = f"{PRIOR_PREFIX}/resume.pt"
DEMOGRAPHICS_PREFIX = "demographics"
DEMOGRAPHICS_RESUME_KEY = "resume/train-demographics.pt"  # outside the prefix: a commit replaces the prefix
REID_PREFIX = "reid"
PRIOR_QUALITY_PREFIX = "prior-quality"  # calibrate: how well the prior draws chest X-rays (quality.json, strip.png)
PRIOR_QUALITY_FILE = "quality.json"
PRIOR_QUALITY_STRIP = "strip.png"
REID_RESUME_KEY = "resume/train-reid.pt"
MODEL_FILE = "model.safetensors"
GENERATOR_FILE = "generator.safetensors"
DISCRIMINATOR_FILE = "discriminator.safetensors"  # the prior's critic (train-prior)
TRAIN_IMAGES_FILE = "train_images.csv"
MODEL_METRICS_FILE = "metrics.json"

# Target names become top-level folders: these would collide with run-level outputs.
RESERVED_NAMES = frozenset({"targets", "prior", "prior-quality", "demographics", "reid", "evaluation", "report",
                            "resume", "world", "logs"})


def target_prefix(name: str) -> str:
    """targets/<name>: the trained target model."""
    return f"{TARGETS_PART}/{name}"


def target_resume_key(name: str) -> str:
    return f"resume/train-target-{name}.pt"  # outside the prefix: a commit replaces the prefix


def attack_prefix(target: str, part: str) -> str:
    """<target>/<part>: finetune, finetune-checkpoints, candidates, selection, scores, evaluation."""
    return f"{target}/{part}"


# ------------------------------------------------------------------------------------------------ stage 1

FINETUNE_PART = "finetune"
FINETUNE_CHECKPOINT_PART = "finetune-checkpoints"
FINETUNE_REFERENCE_FILE = "finetune-reference.safetensors"
FINETUNE_STATE_FILE = "state.pt"


def finetune_prefix(target: str) -> str:
    return attack_prefix(target, FINETUNE_PART)


def finetune_reference_key(target: str) -> str:
    return f"{target}/{FINETUNE_REFERENCE_FILE}"


MAHALANOBIS_REFERENCE_PART = "mahalanobis-reference"
GAUSSIAN_FILE = "gaussian.safetensors"
GAUSSIAN_SUMMARY_FILE = "gaussian.json"


def mahalanobis_reference_prefix(target: str) -> str:
    """<target>/mahalanobis-reference: the committed Ledoit-Wolf Gaussian every sampling shard scores against."""
    return attack_prefix(target, MAHALANOBIS_REFERENCE_PART)


def checkpoint_prefix(target: str, step: int) -> str:
    return f"{attack_prefix(target, FINETUNE_CHECKPOINT_PART)}/step-{step:07d}"


# ------------------------------------------------------------------------------------------------ stage 2: candidates

SUMMARY_FILE = "_SHARD.json"
CHUNK_FILE = "candidates.parquet"


def shard_bounds(num_candidates: int, num_shards: int, shard: int) -> tuple[int, int]:
    """[start, stop) of the ids shard `shard` owns: numpy.array_split's partition of range(num_candidates)."""
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} is outside 0..{num_shards - 1}")
    base, extra = divmod(num_candidates, num_shards)
    start = shard * base + min(shard, extra)
    return start, start + base + (1 if shard < extra else 0)


def chunk_bounds(start: int, stop: int, chunk_size: int) -> list[tuple[int, int, int]]:
    """(chunk index, first id, stop id) of each chunk of [start, stop); the index counts from 0 within the shard."""
    return [(j, a, min(a + chunk_size, stop)) for j, a in enumerate(range(start, stop, chunk_size))]


def candidates_prefix(target: str) -> str:
    return attack_prefix(target, "candidates")


def shard_prefix(target: str, shard: int) -> str:
    return f"{candidates_prefix(target)}/shard={shard}"


def chunk_prefix(target: str, shard: int, chunk: int) -> str:
    return f"{shard_prefix(target, shard)}/chunk={chunk}"


def image_key(target: str, shard: int, candidate_id: int) -> str:
    return f"{target}/candidates-images/shard={shard}/{candidate_id}.png"


# ------------------------------------------------------------------------------------------------ the ppa attack

PPA_FILE = "kept.parquet"


def ppa_prefix(target: str) -> str:
    return attack_prefix(target, "ppa")


def ppa_shard_prefix(target: str, shard: int) -> str:
    return f"{ppa_prefix(target)}/shard={shard}"


def ppa_class_prefix(target: str, shard: int, cls: int) -> str:
    return f"{ppa_shard_prefix(target, shard)}/class={cls}"


def ppa_shard_classes(num_classes: int, num_shards: int, shard: int) -> list[int]:
    """The classes shard `shard` attacks: every num_shards-th, so each shard gets a near-equal share whatever the
    class count (a shard beyond the class count gets none)."""
    return list(range(shard, num_classes, num_shards))


def ppa_search_ids(cls: int, search: int) -> list[int]:
    return [PPA_ID_OFFSET + cls * PPA_CLASS_STRIDE + k for k in range(search)]


# ------------------------------------------------------------------------------------------------ stage 2: selection

SELECTION_FILE = "selected.parquet"
THRESHOLDS_FILE = "thresholds.json"


def selection_prefix(target: str) -> str:
    return attack_prefix(target, "selection")


# ------------------------------------------------------------------------------------------------ demographic scores

SCORES_FILE = "scores.parquet"


def scores_prefix(target: str, shard: int) -> str:
    return f"{attack_prefix(target, 'scores')}/shard={shard}"


def reference_prefix(target: str) -> str:
    """The demographic model's predictions on the target's own training images."""
    return attack_prefix(target, "scores-reference")


def score_image_key(candidate_id: int) -> str:
    return f"images/{candidate_id:09d}.png"


# ------------------------------------------------------------------------------------------------ evaluation, report

EVALUATION_PART = "evaluation"
METRICS_FILE = "metrics.json"
TABLE_FILE = "evaluation.parquet"
RECORDS_FILE = "records.parquet"  # the target's member and non-member images, embedded
LEAK_CANDIDATES_FILE = "leak_candidates.parquet"  # raw candidates of the attacked generator and the prior, and
# the ppa attack's kept samples, embedded
CALIBRATION_PART = "calibration"
CALIBRATION_FILE = "calibration.json"
CALIBRATION_FIGURE = "dose_response.png"
FIGURES = {
    "kurtosis": "figures/kurtosis.png",
    "losses": "figures/losses.png",
    "stage1_examples": "figures/stage1_examples.png",
    "likely_samples": "figures/likely_samples.png",
    "ppa_samples": "figures/ppa_samples.png",  # only for a target attacked with ppa
}


def evaluation_prefix(target: str) -> str:
    return attack_prefix(target, EVALUATION_PART)


def calibration_prefix(target: str) -> str:
    return attack_prefix(target, CALIBRATION_PART)


def pair_key(candidate_id: int) -> str:
    return f"pairs/{candidate_id:09d}.png"


HTML_FILE = "report.html"
MARKDOWN_FILE = "report.md"
JSON_FILE = "report.json"
MITIGATION_FIGURE = "mitigation.png"


def report_prefix(target: str | None = None) -> str:
    return "report" if target is None else f"report-{target}"


# ------------------------------------------------------------------------------------------------ logs

LOGS_PREFIX = "logs"
RUN_LOG = "run"  # the runner's own events: task starts and ends, the run's outcome


def task_log_key(stage: str, target: str | None = None, shard: int | None = None, rank: int | None = None) -> str:
    """logs/<stage>[-<target>][-shard-<k>][-rank-<r>].jsonl: one file per task (a process of a multi-process
    fine-tuning is a task of its own); a re-run appends to its file."""
    parts = [stage] + ([target] if target else []) + ([f"shard-{shard}"] if shard is not None else []) \
        + ([f"rank-{rank}"] if rank is not None else [])
    return f"{LOGS_PREFIX}/{'-'.join(parts)}.jsonl"
