"""`reid-batch` command line: one entrypoint, one manifest, one subcommand per stage.

Exit codes: 0 ok, 1 anything else, 2 invalid input (manifest, checkpoint, image, CSV: retrying cannot help),
75 pre-empted (SIGTERM: committed work kept, re-run to resume; see reid_batch/preemption.py).
Everything imported here is torch-free (the stage registry names each stage's module; a stage's module, with
torch, is imported only when that stage runs), so `--help`, `validate` and `plan` start in well under a second.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
import traceback
from importlib import resources
from pathlib import Path

from reid_batch import __version__, deploy, log
from reid_batch.errors import EXIT_FAILURE, EXIT_INVALID_INPUT, EXIT_OK, InputError, StorageError
from reid_batch.manifest import load_manifest, parse_manifest
from reid_batch.preemption import Preempted, check, describe, handle_termination
from reid_batch.layout import JSON_FILE, HTML_FILE, RUN_LOG, report_prefix, task_log_key
from reid_batch.registry import ARRAY_OVER_TARGET_SHARDS, ARRAY_OVER_TARGETS, BY_NAME, STAGES, array_task
from reid_batch.runner import Outcome, logged_task, resolve_jobs, run_parallel, save_task_log, stage_log_key

def demo_manifest_path() -> str:
    return str(resources.files("reid_batch").joinpath("manifests/demo.yaml"))


def resolve_shard(args: argparse.Namespace, num_shards: int) -> int | None:
    """The shard index for an array task; None means 'all shards, one after another' (a local run).

    Taken from --shard, else the scheduler: Slurm's SLURM_ARRAY_TASK_ID or Kubernetes'
    JOB_COMPLETION_INDEX. The shard count always comes from the manifest, because a re-submitted subset of
    an array (`--array=3,7`) changes SLURM_ARRAY_TASK_COUNT but must not change which ids a shard owns.
    """
    if args.num_shards is not None and args.num_shards != num_shards:
        raise InputError(f"--num-shards {args.num_shards} differs from the manifest's {num_shards}", "--num-shards")
    shard = args.shard
    source = "--shard"
    if shard is None and (found := task_index()) is not None:
        shard, source = found
    if shard is not None and not 0 <= shard < num_shards:
        raise InputError(f"shard {shard} is outside 0..{num_shards - 1}", source)
    return shard


TASK_INDEX_VARIABLES = ("SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX")


def task_index() -> tuple[int, str] | None:
    """The scheduler's array task index and the variable it came from (Slurm's first), None outside an array."""
    for variable in TASK_INDEX_VARIABLES:
        if os.environ.get(variable, "") != "":
            try:
                return int(os.environ[variable]), variable
            except ValueError:
                raise InputError(f"not an integer: {os.environ[variable]!r}", variable) from None
    return None


def resolve_array_task(args: argparse.Namespace, manifest, stage) -> tuple[str, int | None]:
    """`--array-over targets|target-shards`: the (target, shard) of this array task, from its index mapped through
    the manifest's target order (see registry.array_task). Only the scheduler's index says which: --target and
    --shard would contradict it."""
    for given, flag in ((args.target, "--target"), (getattr(args, "shard", None), "--shard")):
        if given is not None:
            raise InputError(f"--array-over {args.array_over} takes the target from the task index; do not give "
                             f"{flag} too", flag)
    found = task_index()
    if found is None:
        raise InputError(f"--array-over {args.array_over} needs the array task index in "
                         f"{' or '.join(TASK_INDEX_VARIABLES)}; neither is set (run it as an array task, or give "
                         "--target)", " / ".join(TASK_INDEX_VARIABLES))
    index, variable = found
    return array_task(manifest, stage, args.array_over, index, variable)


def _load(args: argparse.Namespace):
    manifest = load_manifest(args.manifest, schema_only=getattr(args, "schema_only", False))
    if getattr(args, "output", None):
        document = manifest.model_dump(mode="json")
        document["output"]["uri"] = args.output
        manifest = parse_manifest(document, f"{args.manifest} (with --output)")
    return manifest


def cmd_validate(args: argparse.Namespace) -> int:
    manifest = _load(args)
    kinds = ", ".join(f"{t.name}={t.arch}" for t in manifest.targets)
    what = "schema" if args.schema_only else "schema and inputs"
    print(f"{args.manifest}: valid ({what}); run {manifest.run_id}, targets: {kinds}")
    return EXIT_OK


def cmd_stage(args: argparse.Namespace) -> int:
    manifest = _load(args)
    stage = BY_NAME[args.command]
    target = getattr(args, "target", None)
    kwargs = {}
    if getattr(args, "array_over", None) in (ARRAY_OVER_TARGETS, ARRAY_OVER_TARGET_SHARDS):
        target, shard = resolve_array_task(args, manifest, stage)
        if stage.sharded:
            kwargs["shard"] = shard
    elif stage.sharded:
        kwargs["shard"] = resolve_shard(args, stage.shard_count(manifest))
    label = stage.name if target is None else f"{stage.name}[{target}]"
    with logged_task(manifest, stage_log_key(stage.name, target, kwargs.get("shard")), label):
        if getattr(args, "array_over", None) in (ARRAY_OVER_TARGETS, ARRAY_OVER_TARGET_SHARDS):
            log.event("array_task", stage=stage.name, over=args.array_over, target=target, shard=kwargs.get("shard"))
        code = stage.function()(manifest, target=target, **kwargs) or EXIT_OK
    if stage.name == "report" and code == EXIT_OK:
        _ENDING.update(manifest=manifest, report=report_prefix(target))
    return code


def cmd_run(args: argparse.Namespace) -> int:
    manifest = _load(args)
    _ENDING.update(manifest=manifest, report=report_prefix())
    jobs = resolve_jobs(getattr(args, "jobs", 1))
    if jobs > 1:
        outcome = run_parallel(manifest, args.manifest, jobs, getattr(args, "output", None))
        _ENDING["outcome"] = outcome
        return outcome.exit_code
    outcome = _ENDING["outcome"] = Outcome(tasks=len(STAGES))
    with log.capture() as records:
        try:
            for index, stage in enumerate(STAGES, start=1):
                check(f"before {stage.name}")  # a request during the previous stage's last unit stops here
                log.event("stage_start", stage=stage.name)
                outcome.failed_task, outcome.log_key = stage.name, task_log_key(stage.name)
                kwargs = {"shard": None} if stage.sharded else {}
                with logged_task(manifest, outcome.log_key, f"[{index}/{len(STAGES)}] {stage.name}"):
                    code = stage.function()(manifest, target=None, **kwargs) or EXIT_OK
                if code != EXIT_OK:
                    outcome.exit_code = code
                    return code
                log.event("stage_done", stage=stage.name)
            outcome.failed_task = outcome.log_key = None
            return EXIT_OK
        finally:
            save_task_log(manifest, task_log_key(RUN_LOG), records)


def cmd_demo(args: argparse.Namespace) -> int:
    args.manifest = demo_manifest_path()
    return cmd_run(args)


# What `run`, `demo` and `report` say when they end: where the report is, the headline per target, the time.
_ENDING: dict = {}


def ending_summary(manifest, report: str | None, outcome: Outcome | None, code: int, seconds: float,
                   error: str | None) -> dict:
    """The closing summary as data: the report's location and each target's headline, or the failing task."""
    summary: dict = {"event": "run_summary", "exit_code": code, "seconds": round(seconds, 1)}
    if outcome is not None:
        summary["tasks"] = outcome.tasks
    if code == EXIT_OK and report is not None:
        from reid_batch.storage import run_store

        store = run_store(manifest)
        if store.is_committed(report):
            location = store.uri(f"{report}/{HTML_FILE}")
            summary["report"] = os.path.abspath(location) if store.is_local else location
            document = store.read_json(f"{report}/{JSON_FILE}")
            summary["headlines"] = {name: entry.get("headline") or entry["risk"]["leak"].get("verdict")
                                    for name, entry in document.get("targets", {}).items()}
    if code != EXIT_OK:
        summary["failed_task"] = outcome.failed_task if outcome else None
        summary["error"] = (outcome.error if outcome and outcome.error else None) or error
        if outcome is not None and outcome.log_key is not None:
            from reid_batch.storage import run_store

            # None is written after invalid input or a storage failure; and a store that failed is not asked again.
            store = run_store(manifest)
            written = store.exists(outcome.log_key) if store.is_local else \
                code != EXIT_INVALID_INPUT and "storage failed" not in (summary["error"] or "")
            if written:
                summary["log"] = store.uri(outcome.log_key)
    return summary


def summary_text(summary: dict) -> str:
    if summary["exit_code"] == EXIT_OK:
        lines = [f"Report: {summary['report']}"] if summary.get("report") else []
        headlines = summary.get("headlines") or {}
        width = max((len(n) for n in headlines), default=0)
        lines += [f"  {name:<{width}}  {text}" for name, text in headlines.items()]
        lines.append(f"Done in {log.duration(summary['seconds'])}.")
        return "\n".join(lines) + "\n"
    where = f" in {summary['failed_task']}" if summary.get("failed_task") else ""
    lines = [f"Failed{where} (exit {summary['exit_code']}) after {log.duration(summary['seconds'])}."]
    if summary.get("error"):
        lines.append(f"  {summary['error']}")
    if summary.get("log"):
        lines.append(f"  every event of the task: {summary['log']}")
    if summary["exit_code"] != EXIT_INVALID_INPUT:
        lines.append("  Run the same command again to redo only what is missing.")
    return "\n".join(lines) + "\n"


def print_ending(code: int, seconds: float, error: str | None) -> None:
    """On stdout: text for a person, one JSON line through a pipe."""
    if "manifest" not in _ENDING and _ENDING.get("outcome") is None:
        return
    try:
        summary = ending_summary(_ENDING.get("manifest"), _ENDING.get("report"), _ENDING.get("outcome"), code,
                                 seconds, error)
    except Exception as e:  # noqa: BLE001 - a summary that cannot be read must not change the run's outcome
        summary = {"event": "run_summary", "exit_code": code, "seconds": round(seconds, 1),
                   "error": error or f"summary unavailable: {type(e).__name__}: {e}"}
    if log.human():
        log.screen.clear()
        sys.stdout.write(summary_text(summary))
    else:
        sys.stdout.write(json.dumps(summary, default=str) + "\n")
    sys.stdout.flush()


def cmd_plan(args: argparse.Namespace) -> int:
    manifest = _load(args)
    stages = args.stages.split(",") if args.stages else None
    jobs = deploy.plan(manifest, stages, args.start)
    if args.format == "shell":
        print(deploy.shell_summary(manifest), end="")
    else:
        print(deploy.plan_text(manifest, args.manifest, args.scheduler, jobs), end="")
    return EXIT_OK


def _key_value(text: str, where: str) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    if not key or not equals:
        raise InputError(f"expected KEY=VALUE, got {text!r}", where)
    return key, value


def cmd_k8s(args: argparse.Namespace) -> int:
    manifest = _load(args)
    text = Path(args.manifest).read_text(encoding="utf-8")  # embedded as written: comments and all
    options = deploy.KubernetesOptions(
        image=args.image, namespace=args.namespace, secret=args.secret, gpus=args.gpus,
        finetune_gpus=args.finetune_gpus, cpu=args.cpu,
        memory=args.memory, shm_size=args.shm, parallelism=args.parallelism, backoff_limit=args.backoff_limit,
        work_claim=args.work_claim, mounts=tuple(deploy.Mount.parse(m) for m in args.mount),
        node_selector=tuple(_key_value(item, "--node-selector") for item in args.node_selector),
        tolerations=tuple(deploy.Toleration.parse(t) for t in args.toleration),
        runtime_class=args.runtime_class, priority_class=args.priority_class,
    )
    stages = args.stages.split(",") if args.stages else None
    objects = deploy.render_kubernetes(manifest, text, options, deploy.plan(manifest, stages, args.start))
    warning = deploy.local_output_warning(manifest, options)
    if warning:
        log.write_line(f"reid-batch k8s: warning: {warning}")
    if args.out is None:
        print(deploy.to_yaml([obj for _, obj in objects]), end="")
        return EXIT_OK
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("[0-9][0-9]-*.yaml"):
        stale.unlink()
    for name, obj in objects:
        (out / name).write_text(deploy.to_yaml([obj]), encoding="utf-8")
    print(f"wrote {len(objects)} file(s) to {out}; run them in order with: k8s/apply.sh {out}")
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    from reid_batch import bench  # loads torch and every stage: only for this command

    args.schema_only = True  # a bench needs no input data: models it cannot find are randomly initialised
    manifest = _load(args)
    if args.compile is not None:
        document = manifest.model_dump(mode="json")
        document["sampling"]["compile"] = args.compile
        manifest = parse_manifest(document, f"{args.manifest} (with --compile)")
    bench.run(manifest, stage=args.stage, device=args.device, target=args.target, baseline=args.baseline,
              batches=args.batches, baseline_batches=args.baseline_batches, batch_size=args.batch_size,
              steps=args.steps, rows=args.rows, files=args.files, random_init=args.random_init,
              json_out=args.json, workdir=args.workdir, peak_size=args.peak_size)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reid-batch",
        description="Measure how much a trained medical-imaging classifier leaks about its training patients.",
    )
    parser.add_argument("--version", action="version", version=f"reid-batch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    output_options = argparse.ArgumentParser(add_help=False)
    output_options.add_argument("--log-format", choices=log.FORMATS, default=None,
                                help="human: progress for a person; json: one JSON object per line (clusters); "
                                "auto: human on a terminal, else json (default: auto)")
    output_options.add_argument("-v", "--verbose", action="store_true", help="show every event, not just tasks, "
                                "progress and warnings (human format)")

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[output_options], **kwargs)

    def with_manifest(p: argparse.ArgumentParser) -> None:
        p.add_argument("manifest", help="job manifest (YAML)")
        p.add_argument("--output", help="override output.uri (local path or s3://bucket/prefix)")

    p = command("validate", help="validate a manifest (schema and input files) without doing any work")
    with_manifest(p)
    p.add_argument("--schema-only", action="store_true", help="check the schema only, not that input files exist")
    p.set_defaults(handler=cmd_validate)

    for stage in STAGES:
        p = command(stage.name, help=stage.summary)
        with_manifest(p)
        p.add_argument("--target", help="only this target (default: every target in the manifest)")
        if stage.sharded:
            p.add_argument("--shard", type=int, help="shard index (default: SLURM_ARRAY_TASK_ID / JOB_COMPLETION_INDEX)")
            p.add_argument("--num-shards", type=int, help="must equal the manifest's shard count if given")
        if stage.per_target:
            choices = [ARRAY_OVER_TARGETS] + ([ARRAY_OVER_TARGET_SHARDS] if stage.sharded else [])
            p.add_argument("--array-over", choices=choices,
                           help="an array task of the cluster plan: the task index (SLURM_ARRAY_TASK_ID / "
                                "JOB_COMPLETION_INDEX) picks the target in the manifest's order"
                                + (f"; {ARRAY_OVER_TARGET_SHARDS}: target index // num_shards, shard index %% "
                                   "num_shards" if stage.sharded else ""))
        p.set_defaults(handler=cmd_stage)

    def jobs(value: str) -> str | int:
        if value == "auto" or (value.isdigit() and int(value) >= 1):
            return value if value == "auto" else int(value)
        raise argparse.ArgumentTypeError(f"expected a positive integer or auto, got {value!r}")

    p = command("run", help="run every stage locally, in sequence or --jobs N tasks at a time")
    with_manifest(p)
    p.add_argument("--jobs", type=jobs, default=1,
                   help="tasks (stage x target) at once, each its own process; auto = cores, at most 4 (default: 1)")
    p.set_defaults(handler=cmd_run)

    def with_selection(p: argparse.ArgumentParser) -> None:
        p.add_argument("manifest", help="job manifest (YAML); only its schema is checked (inputs may live on the cluster)")
        p.add_argument("--stages", help="comma-separated stages to include (default: all)")
        p.add_argument("--from", dest="start",
                       help="start at this job: prepare, train-target, finetune, sample, select, score, report")
        p.set_defaults(schema_only=True)

    p = command("plan", help="print the jobs, shard counts and the commands that would run them")
    with_selection(p)
    p.add_argument("--scheduler", choices=["slurm", "k8s", "local"], default="slurm")
    p.add_argument("--format", choices=["text", "shell"], default="text",
                   help="shell: key=value lines for scripts (slurm/submit.sh reads them)")
    p.set_defaults(handler=cmd_plan)

    p = command("k8s", help="render Kubernetes manifests (ConfigMap + Jobs, arrays as Indexed Jobs)")
    with_selection(p)
    p.add_argument("--image", default=f"reid-batch:{__version__}", help="container image (default: %(default)s)")
    p.add_argument("--namespace", help="namespace of every object (default: kubectl's current one)")
    p.add_argument("--secret", default="reid-batch-s3", help="Secret with AWS_* variables for S3 (default: %(default)s)")
    p.add_argument("--gpus", type=int, help="GPUs per pod of a GPU stage (default: 0 for compute.device cpu, else 1)")
    p.add_argument("--finetune-gpus", type=int, help="GPUs of the finetune pod, one process each (default: --gpus)")
    p.add_argument("--cpu", default="4", help="CPU request per pod (default: %(default)s)")
    p.add_argument("--memory", default="16Gi", help="memory per process (default: %(default)s); a pod's request and "
                   "limit are this times its processes (its GPUs, at least 1) plus --shm")
    p.add_argument("--shm", default="8Gi", help="size of the memory-backed /dev/shm, which counts against the pod's "
                   "memory limit (default: %(default)s)")
    p.add_argument("--node-selector", action="append", default=[], metavar="KEY=VALUE",
                   help="node label every pod requires (e.g. a GPU pool's); repeatable")
    p.add_argument("--toleration", action="append", default=[], metavar="KEY[=VALUE]:EFFECT",
                   help="taint every pod tolerates (e.g. nvidia.com/gpu:NoSchedule); repeatable")
    p.add_argument("--runtime-class", help="runtimeClassName of every pod (e.g. nvidia)")
    p.add_argument("--priority-class", help="priorityClassName of every pod")
    p.add_argument("--parallelism", type=int, default=16, help="shards running at once (default: %(default)s)")
    p.add_argument("--backoff-limit", type=int, default=3, help="retries per shard / per job (default: %(default)s)")
    p.add_argument("--work-claim", help="ReadWriteMany PVC for the working directory (default: an emptyDir)")
    p.add_argument("--mount", action="append", default=[], metavar="CLAIM:/PATH[:ro|rw]",
                   help="mount a PVC in every pod (data, checkpoints); repeatable")
    p.add_argument("--out", help="write one file per object into this directory (default: all to stdout)")
    p.set_defaults(handler=cmd_k8s)

    p = command("bench", help="measure throughput, memory and MFU of a stage, against the study's way")
    with_manifest(p)
    p.add_argument("--stage", choices=["sample", "finetune", "select", "ppa"], default="sample")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: the manifest's compute.device")
    p.add_argument("--target", help="target to measure (default: the manifest's first)")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the study notebooks' way and report the speed-up (sample; default: on)")
    p.add_argument("--batches", type=int, default=4, help="timed batches after one warm-up batch (sample)")
    p.add_argument("--baseline-batches", type=int, help="timed baseline batches of 8 (default: --batches); ppa: "
                   "latents the one-by-one loop optimises (default: all of the batch)")
    p.add_argument("--batch-size", type=lambda v: v if v == "auto" else int(v),
                   help="override sampling.batch_size (an integer or auto)")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step (finetune); "
                   "optimisation steps per latent (ppa, batch: --batch-size, default 32)")
    p.add_argument("--rows", type=int, default=10**6, help="synthetic candidate rows (select)")
    p.add_argument("--files", type=int, default=100, help="Parquet shards the rows are spread over (select)")
    p.add_argument("--workdir", help="where select's synthetic shards go (default: the system's temp directory)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="override sampling.compile")
    p.add_argument("--peak-size", type=int, help="side of the timed matmul that measures the peak (default: 2048 "
                   "on a CPU, 8192 on CUDA)")
    p.add_argument("--random-init", action="store_true", help="ignore the run's artifacts; random models")
    p.add_argument("--json", help="also write the result as JSON to this file")
    p.set_defaults(handler=cmd_bench)

    p = command("demo", help="run the built-in demo manifest (synthetic world, CPU)")
    p.add_argument("--output", help="override output.uri")
    p.add_argument("--jobs", type=jobs, default="auto", help="as for run (default: %(default)s)")
    p.set_defaults(handler=cmd_demo)
    return parser


# glibc's malloc hands every freed block over 32 MiB back to the kernel and trims its heap past 128 KiB, so a stage that
# allocates and frees large tensors in a loop (calibrate's repeats, training steps) faults the same pages in again
# every time, which on a machine with slow page faults is a large share of the stage's CPU time (measured in
# docs/results/2026-12-08-code-notes.md). Kept memory is reused, never more than the stage's own peak.
_MALLOC_KEEP_BYTES = 1 << 30
_MALLOC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_memory() -> bool:
    """Have glibc keep up to 1 GiB of freed memory for reuse (mmap and trim thresholds). True if it took effect;
    False on other C libraries, or where the user set glibc's own variables (theirs are kept)."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in _MALLOC_VARIABLES):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(mallopt(m_mmap_threshold, _MALLOC_KEEP_BYTES)) and bool(mallopt(m_trim_threshold, _MALLOC_KEEP_BYTES))


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()
    parser = build_parser()
    args = parser.parse_args(argv)
    log.configure(format=getattr(args, "log_format", None), verbose=getattr(args, "verbose", False) or None)
    _ENDING.clear()
    began = time.monotonic()
    code, error = _handle(args)
    if args.command in ("run", "demo", "report") and not os.environ.get(log.RUN_TASK_VARIABLE):
        print_ending(code, time.monotonic() - began, error)
    return code


def _handle(args: argparse.Namespace) -> tuple[int, str | None]:
    """The command's exit code, and its error line (also written to stderr) when it failed."""
    def failed(code: int, message: str) -> tuple[int, str]:
        log.write_line(message)
        return code, message

    try:
        with handle_termination():
            return args.handler(args), None
    except Preempted as e:
        return failed(e.exit_code, f"reid-batch: {describe(e)}")
    except InputError as e:
        return failed(EXIT_INVALID_INPUT, f"reid-batch: invalid input: {e}")
    except StorageError as e:
        # Expected in operations (an outage, a full disk): the message names the location, a traceback adds nothing.
        return failed(EXIT_FAILURE, f"reid-batch: storage failed: {e}")
    except KeyboardInterrupt:
        return 130, "interrupted"
    except Exception as e:  # noqa: BLE001 - the last line of defence: say what broke, exit 1
        traceback.print_exc(file=sys.stderr)
        return failed(EXIT_FAILURE, f"reid-batch: failed: {type(e).__name__}: {e}")


if __name__ == "__main__":
    sys.exit(main())
