"""How the pipeline runs on a cluster: one job plan, its Slurm commands, its Kubernetes manifests.

The plan groups the stages into scheduler jobs (registry.JOBS), each run after the one before it succeeded; jobs over
independent targets or shards are arrays, so a study of N targets takes the time of one when N GPUs are free. The
jobs and what each array task selects: docs/pipeline.md.

Slurm runs it through `slurm/submit.sh` (which asks `reid-batch plan --format shell` for the shard counts);
Kubernetes through the manifests `render_kubernetes` writes (`reid-batch k8s`). Only the manifest module is
imported here: planning and rendering happen on a login node or a laptop, without torch.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from dataclasses import dataclass, replace
from typing import Any

import yaml

from reid_batch import __version__
from reid_batch.errors import InputError
from reid_batch.manifest import Manifest
from reid_batch.preemption import EXIT_REQUEUE
from reid_batch.registry import (ARRAY_OVER_SHARDS, ARRAY_OVER_TARGET_SHARDS, ARRAY_OVER_TARGETS, BY_NAME, JOBS,
                                 STAGES, Job, job_stages, job_tasks, stage_shards)


GROUP_NAMES = tuple(job.name for job in JOBS)


def all_stages() -> tuple[str, ...]:
    return tuple(stage.name for stage in STAGES)


def plan(manifest: Manifest, stages: list[str] | None = None, start: str | None = None) -> list[Job]:
    """The jobs that run `stages` (default: all) from group `start` on, with the manifest's shard counts."""
    known = all_stages()
    wanted = set(known if stages is None else stages)
    unknown = sorted(wanted - set(known))
    if unknown:
        raise InputError(f"unknown stage(s) {unknown}; stages: {', '.join(known)}", "--stages")
    if start is not None and start not in GROUP_NAMES:
        raise InputError(f"unknown job {start!r}; jobs: {', '.join(GROUP_NAMES)}", "--from")
    first = GROUP_NAMES.index(start) if start else 0
    jobs = []
    for group in JOBS[first:]:
        chosen = tuple(s for s in job_stages(manifest, group) if s in wanted)
        if chosen:
            jobs.append(replace(group, stages=chosen, tasks=job_tasks(manifest, group)))
    return jobs


def default_gpus(manifest: Manifest) -> int:
    """GPUs a GPU stage asks for when not told: none for a CPU manifest, one otherwise."""
    return 0 if manifest.compute.device == "cpu" else 1


def shell_summary(manifest: Manifest) -> str:
    """`key=value` lines (shell-quoted) for slurm/submit.sh: everything it needs from the manifest. Job names contain
    '-' (train-target), which shell variable names cannot: submit.sh keeps these keys in an associative array."""
    values = {
        "run_id": manifest.run_id,
        "device": manifest.compute.device,
        "gpus": default_gpus(manifest),
        "sample_shards": BY_NAME["sample"].shard_count(manifest),
        "score_shards": BY_NAME["score"].shard_count(manifest),
        "finetune_mixed_precision": manifest.finetune.mixed_precision,
        "output_uri": manifest.output.uri,
        "targets": " ".join(target.name for target in manifest.targets),
        "jobs": " ".join(job.name for job in JOBS),
        "stages": " ".join(stage.name for stage in STAGES),
        **{f"{job.name}_stages": " ".join(job_stages(manifest, job)) for job in JOBS},
        # An array job's task count ("" for a plain job) and what each of its stages adds to take its part.
        **{f"{job.name}_tasks": job_tasks(manifest, job) if job.array else "" for job in JOBS},
        **{f"{job.name}_stage_args": " ".join(job.stage_arguments()) for job in JOBS},
    }
    return "".join(f"{key}={shlex.quote(str(value))}\n" for key, value in values.items())


# ------------------------------------------------------------------------------------------------ plan text


def array_spec(shards: int, parallel: int | None) -> str:
    spec = "0" if shards == 1 else f"0-{shards - 1}"
    return f"{spec}%{parallel}" if parallel else spec


def stage_command(stage: str, manifest_path: str, shard: str | None = None, target: str | None = None,
                  arguments: tuple[str, ...] = ()) -> str:
    command = f"reid-batch {stage} {shlex.quote(manifest_path)}"
    if target is not None:
        command += f" --target {shlex.quote(target)}"
    if shard is not None:
        command += f" --shard {shard}"
    return " ".join([command, *arguments])


def array_description(manifest: Manifest, job: Job) -> str:
    """What an array job's tasks are: '2 (targets: a, b)', '8 (2 targets x 4 shards)', '4 (shards)'."""
    if job.array_over == ARRAY_OVER_TARGETS:
        return f"{job.tasks} (targets: {', '.join(t.name for t in manifest.targets)})"
    if job.array_over == ARRAY_OVER_TARGET_SHARDS:
        return f"{job.tasks} ({len(manifest.targets)} targets x {stage_shards(manifest, job)} shards)"
    return f"{job.tasks} (shards)"


def task_meaning(manifest: Manifest, job: Job, variable: str) -> str:
    """How a task of an array job finds its part from its index `variable`."""
    if job.array_over == ARRAY_OVER_TARGETS:
        return f"target = targets[{variable}]"
    if job.array_over == ARRAY_OVER_TARGET_SHARDS:
        shards = stage_shards(manifest, job)
        return f"target = targets[{variable} / {shards}], shard = {variable} % {shards}"
    return f"shard = {variable}"


def local_commands(manifest: Manifest, manifest_path: str, job: Job, stage: str) -> list[str]:
    """The commands that do what job's tasks do, one after another on one machine."""
    if job.array_over == ARRAY_OVER_TARGETS:
        return [stage_command(stage, manifest_path, target=t.name) for t in manifest.targets]
    if job.array_over == ARRAY_OVER_TARGET_SHARDS:
        shards = stage_shards(manifest, job)
        return [stage_command(stage, manifest_path, str(k), t.name) for t in manifest.targets for k in range(shards)]
    if job.array_over == ARRAY_OVER_SHARDS:
        return [stage_command(stage, manifest_path, str(k)) for k in range(job.tasks)]
    return [stage_command(stage, manifest_path)]


def plan_text(manifest: Manifest, manifest_path: str, scheduler: str, jobs: list[Job],
              parallel: int = 16, k8s_out: str = "k8s-rendered") -> str:
    """What would run, and how: one block per job, for `local`, `slurm` or `k8s`."""
    lines = [f"run {manifest.run_id}: {len(jobs)} job(s), outputs under {manifest.output.uri.rstrip('/')}/{manifest.run_id}/"]
    gpus = default_gpus(manifest)
    if scheduler == "slurm":
        lines.append(f"submit: slurm/submit.sh {shlex.quote(manifest_path)}   (options: slurm/submit.sh --help)")
    elif scheduler == "k8s":
        lines.append(f"render: reid-batch k8s {shlex.quote(manifest_path)} --image IMAGE --out {k8s_out}")
        if manifest.output.uri.startswith("s3://"):
            lines.append("secret: kubectl create secret generic reid-batch-s3 "
                         "--from-literal=AWS_ACCESS_KEY_ID=... --from-literal=AWS_SECRET_ACCESS_KEY=...")
        lines.append(f"run:    k8s/apply.sh {k8s_out}   (applies each Job in order, waiting for the one before)")
    previous = None
    for job in jobs:
        what = f"array of {array_description(manifest, job)}" if job.array else "1 task"
        lines.append("")
        lines.append(f"[{job.name}] {', '.join(job.stages)}: {what}"
                     + (f", after {previous}" if previous else ""))
        if scheduler == "local":
            for stage in job.stages:
                lines.extend(f"  {command}" for command in local_commands(manifest, manifest_path, job, stage))
        elif scheduler == "slurm":
            flags = [f"--job-name=reid-{manifest.run_id}-{job.name}"]
            if job.array:
                flags.append(f"--array={array_spec(job.tasks, parallel)}")
            if job.uses_gpu and gpus:
                flags.append(f"--gpus-per-node={gpus}" if job.distributed else f"--gpus-per-task={gpus}")
            if previous:
                flags.append(f"--dependency=afterok:<{previous}> --kill-on-invalid-dep=yes")
            lines.append(f"  sbatch {' '.join(flags)}")
            for stage in job.stages:
                if job.distributed:
                    suffix = f"   # {task_meaning(manifest, job, 'SLURM_ARRAY_TASK_ID')}" if job.array else ""
                    words = " ".join([stage, shlex.quote(manifest_path), *job.stage_arguments()])
                    lines.append("    srun --cpus-per-task=$SLURM_CPUS_PER_TASK accelerate launch "
                                 f"--num_machines $SLURM_NNODES --machine_rank $SLURM_NODEID ... -m reid_batch {words}"
                                 f"{suffix}")
                else:
                    suffix = f"   # {task_meaning(manifest, job, 'SLURM_ARRAY_TASK_ID')}" if job.array else ""
                    lines.append(f"    {stage_command(stage, manifest_path, arguments=job.stage_arguments())}{suffix}")
        else:
            kind = (f"Indexed Job, completions {job.tasks}, {task_meaning(manifest, job, 'JOB_COMPLETION_INDEX')}"
                    if job.array else "Job")
            lines.append(f"  job/{kubernetes_name(manifest.run_id, job.name)}: {kind}")
            path = f"{CONFIGMAP_MOUNT}/{CONFIGMAP_KEY}"
            for stage in job.stages:
                lines.append(f"    {stage_command(stage, path, arguments=job.stage_arguments())}")
        previous = job.name
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ Kubernetes

CONFIGMAP_MOUNT = "/etc/reid-batch"
CONFIGMAP_KEY = "job.yaml"
WORKDIR = "/work"
CONTAINER_UID = 10001
GPU_RESOURCE = "nvidia.com/gpu"
EXIT_INVALID_INPUT = 2
# The ConfigMap limit is 1 MiB for the whole object.
MAX_MANIFEST_BYTES = 900 * 1024
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


@dataclass(frozen=True)
class Mount:
    """A PersistentVolumeClaim mounted into every pod (data, checkpoints)."""

    claim: str
    path: str
    read_only: bool = True

    @classmethod
    def parse(cls, text: str) -> "Mount":
        parts = text.split(":")
        if len(parts) not in (2, 3) or not parts[1].startswith("/") or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
            raise InputError(f"expected CLAIM:/path[:ro|rw], got {text!r}", "--mount")
        if not _DNS_LABEL.match(parts[0]):
            raise InputError(f"not a valid claim name: {parts[0]!r}", "--mount")
        return cls(parts[0], parts[1], len(parts) == 2 or parts[2] == "ro")


_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti)?$")
_BINARY = {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def memory_bytes(quantity: str, where: str) -> int:
    """Bytes of a Kubernetes memory quantity in binary units (16Gi, 512Mi, or plain bytes)."""
    match = _QUANTITY.match(quantity.strip())
    if not match:
        raise InputError(f"expected a memory size like 16Gi or 512Mi, got {quantity!r}", where)
    return int(float(match.group(1)) * _BINARY[match.group(2)])


def _quantity(count: int) -> str:
    """Bytes as a Kubernetes quantity: whole Gi where exact, else Mi rounded up."""
    return f"{count // 2**30}Gi" if count % 2**30 == 0 else f"{-(-count // 2**20)}Mi"


@dataclass(frozen=True)
class Toleration:
    """A pod toleration from KEY[=VALUE]:EFFECT (e.g. nvidia.com/gpu:NoSchedule, pool=a100:NoSchedule)."""

    key: str
    value: str | None
    effect: str

    @classmethod
    def parse(cls, text: str) -> "Toleration":
        head, _, effect = text.rpartition(":")
        key, _, value = head.partition("=")
        if not key or effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
            raise InputError(f"expected KEY[=VALUE]:NoSchedule|PreferNoSchedule|NoExecute, got {text!r}",
                             "--toleration")
        return cls(key, value or None, effect)

    def to_dict(self) -> dict[str, str]:
        if self.value is None:
            return {"key": self.key, "operator": "Exists", "effect": self.effect}
        return {"key": self.key, "operator": "Equal", "value": self.value, "effect": self.effect}


@dataclass(frozen=True)
class KubernetesOptions:
    image: str = f"reid-batch:{__version__}"
    namespace: str | None = None
    secret: str = "reid-batch-s3"
    gpus: int | None = None
    finetune_gpus: int | None = None
    cpu: str = "4"
    memory: str = "16Gi"  # per process: a pod of N GPUs runs N processes; /dev/shm (shm_size) is added on top
    shm_size: str = "8Gi"
    node_selector: tuple[tuple[str, str], ...] = ()
    tolerations: tuple[Toleration, ...] = ()
    runtime_class: str | None = None
    priority_class: str | None = None
    parallelism: int = 16
    backoff_limit: int = 3
    work_claim: str | None = None
    scratch_size: str = "50Gi"
    mounts: tuple[Mount, ...] = ()
    pull_policy: str = "IfNotPresent"
    service_account: str | None = None
    ttl_seconds: int = 7 * 24 * 3600


def kubernetes_name(run_id: str, suffix: str) -> str:
    """A DNS-1123 label `reid-<run>-<suffix>` of at most 52 characters (Indexed Job pod names add the index)."""
    slug = re.sub(r"[^a-z0-9-]+", "-", run_id.lower()).strip("-") or "run"
    name = f"reid-{slug}-{suffix}"
    if len(name) > 52:
        digest = hashlib.sha256(run_id.encode()).hexdigest()[:6]
        name = f"reid-{slug[: 52 - len(suffix) - 13].rstrip('-')}-{digest}-{suffix}"
    return name


def _labels(manifest: Manifest, component: str) -> dict[str, str]:
    instance = re.sub(r"[^A-Za-z0-9_.-]", "-", manifest.run_id)[:63]
    return {
        "app.kubernetes.io/name": "reid-batch",
        "app.kubernetes.io/instance": instance,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/version": __version__,
    }


def pod_memory(options: KubernetesOptions, gpus: int) -> str:
    """A pod's memory request and limit: `memory` per process (one per GPU, at least one), plus the memory-backed
    /dev/shm, which the kernel charges to the pod's limit: left out, a pod of many finetune ranks is OOM-killed."""
    processes = max(1, gpus)
    return _quantity(processes * memory_bytes(options.memory, "--memory") + memory_bytes(options.shm_size, "--shm"))


def _container(manifest: Manifest, options: KubernetesOptions, name: str, command: list[str], gpus: int) -> dict:
    uses_s3 = manifest.output.uri.startswith("s3://")
    memory = pod_memory(options, gpus)
    resources: dict[str, Any] = {
        "requests": {"cpu": options.cpu, "memory": memory},
        "limits": {"memory": memory},
    }
    if gpus:
        resources["limits"][GPU_RESOURCE] = gpus
    mounts = [
        {"name": "manifest", "mountPath": CONFIGMAP_MOUNT, "readOnly": True},
        {"name": "work", "mountPath": WORKDIR},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    mounts += [{"name": f"data-{i}", "mountPath": m.path, "readOnly": m.read_only} for i, m in enumerate(options.mounts)]
    container: dict[str, Any] = {
        "name": name,
        "image": options.image,
        "imagePullPolicy": options.pull_policy,
        "command": command,
        "workingDir": WORKDIR,
        # The root filesystem is read-only: every cache a library might write goes to the scratch volumes.
        "env": [
            {"name": "HOME", "value": "/tmp/home"},
            {"name": "XDG_CACHE_HOME", "value": "/tmp/cache"},
            {"name": "MPLCONFIGDIR", "value": "/tmp/matplotlib"},
            {"name": "TORCH_HOME", "value": "/tmp/torch"},
            # sampling.compile: inductor's and Triton's compiled kernels on the work volume (the scratch volume, or
            # the work_claim), not in the 10Gi /tmp: the stages of a job share them, and with a claim later jobs do.
            {"name": "TORCHINDUCTOR_CACHE_DIR", "value": f"{WORKDIR}/.cache/torchinductor"},
            {"name": "TRITON_CACHE_DIR", "value": f"{WORKDIR}/.cache/triton"},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
        ],
        "resources": resources,
        "volumeMounts": mounts,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if uses_s3:
        container["envFrom"] = [{"secretRef": {"name": options.secret}}]
    return container


def _stage_command(manifest: Manifest, job: Job, stage: str, processes: int) -> list[str]:
    # An Indexed Job's pods (init containers too) get JOB_COMPLETION_INDEX; the arguments say what it selects.
    path = f"{CONFIGMAP_MOUNT}/{CONFIGMAP_KEY}"
    arguments = list(job.stage_arguments())
    if stage == "finetune" and processes > 1:
        return ["accelerate", "launch", "--multi_gpu", "--num_machines", "1", "--num_processes", str(processes),
                "--mixed_precision", manifest.finetune.mixed_precision, "--dynamo_backend", "no",
                "-m", "reid_batch", stage, path, *arguments]
    return ["reid-batch", stage, path, *arguments]


def job_gpus(manifest: Manifest, options: KubernetesOptions, job: Job) -> int:
    """GPUs of one pod: finetune may take several (one process each); every other GPU stage takes one."""
    if not job.uses_gpu:
        return 0
    per_pod = options.gpus if options.gpus is not None else default_gpus(manifest)
    if job.distributed and options.finetune_gpus is not None:
        return options.finetune_gpus
    return per_pod


def _pod_failure_policy(indexed: bool) -> dict:
    """Exit code 2 is invalid input (retrying cannot help); a pre-empted or evicted pod is not a failure, nor is
    exit code 75 (the task stopped on SIGTERM after committing: a new pod resumes it, without using a retry)."""
    return {
        "rules": [
            {"action": "FailIndex" if indexed else "FailJob",
             "onExitCodes": {"operator": "In", "values": [EXIT_INVALID_INPUT]}},
            {"action": "Ignore", "onExitCodes": {"operator": "In", "values": [EXIT_REQUEUE]}},
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]
    }


def _job(manifest: Manifest, options: KubernetesOptions, job: Job, configmap: str) -> dict:
    gpus = job_gpus(manifest, options, job)
    commands = [(stage, _stage_command(manifest, job, stage, gpus)) for stage in job.stages]
    # Stages of one job run in sequence as init containers (no shell needed), the last as the main container.
    containers = [_container(manifest, options, stage, command, gpus) for stage, command in commands]
    labels = _labels(manifest, job.name)
    volumes: list[dict[str, Any]] = [
        {"name": "manifest", "configMap": {"name": configmap}},
        {"name": "work", "persistentVolumeClaim": {"claimName": options.work_claim}} if options.work_claim
        else {"name": "work", "emptyDir": {"sizeLimit": options.scratch_size}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "10Gi"}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": options.shm_size}},
    ]
    volumes += [{"name": f"data-{i}", "persistentVolumeClaim": {"claimName": m.claim, "readOnly": m.read_only}}
                for i, m in enumerate(options.mounts)]
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": CONTAINER_UID,
            "runAsGroup": CONTAINER_UID,
            "fsGroup": CONTAINER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": containers[-1:],
        "volumes": volumes,
    }
    if len(containers) > 1:
        pod["initContainers"] = containers[:-1]
    if options.service_account:
        pod["serviceAccountName"] = options.service_account
    # Scheduling on GPU pools: tainted nodes need tolerations, and node labels pick the pool.
    if options.node_selector:
        pod["nodeSelector"] = dict(options.node_selector)
    if options.tolerations:
        pod["tolerations"] = [t.to_dict() for t in options.tolerations]
    if options.runtime_class:
        pod["runtimeClassName"] = options.runtime_class
    if options.priority_class:
        pod["priorityClassName"] = options.priority_class
    if job.array:
        spec: dict[str, Any] = {
            "completionMode": "Indexed",
            "completions": job.tasks,
            "parallelism": min(job.tasks, options.parallelism),
            # Retries are counted per index (shard or target): one bad task does not use up the others' retries.
            "backoffLimitPerIndex": options.backoff_limit,
        }
    else:
        spec = {"backoffLimit": options.backoff_limit}
    spec.update({
        "ttlSecondsAfterFinished": options.ttl_seconds,
        "podFailurePolicy": _pod_failure_policy(job.array),
        "template": {"metadata": {"labels": labels}, "spec": pod},
    })
    metadata: dict[str, Any] = {"name": kubernetes_name(manifest.run_id, job.name), "labels": labels}
    if options.namespace:
        metadata["namespace"] = options.namespace
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": spec}


def render_kubernetes(manifest: Manifest, manifest_text: str, options: KubernetesOptions,
                      jobs: list[Job] | None = None) -> list[tuple[str, dict]]:
    """(file name, object) pairs: the job manifest as a ConfigMap, then one Job per planned job, in run order."""
    if len(manifest_text.encode()) > MAX_MANIFEST_BYTES:
        raise InputError("the job manifest is too large for a ConfigMap (over 900 KiB)")
    if options.namespace is not None and not _DNS_LABEL.match(options.namespace):
        raise InputError(f"not a valid namespace: {options.namespace!r}", "--namespace")
    if options.work_claim is not None and not _DNS_LABEL.match(options.work_claim):
        raise InputError(f"not a valid claim name: {options.work_claim!r}", "--work-claim")
    if options.parallelism < 1 or options.backoff_limit < 0 or min(options.gpus or 0, options.finetune_gpus or 0) < 0:
        raise InputError("parallelism must be >= 1, backoff limit and GPUs >= 0")
    memory_bytes(options.memory, "--memory")  # a malformed size is exit 2 before anything is written
    memory_bytes(options.shm_size, "--shm")
    for name, where in ((options.runtime_class, "--runtime-class"), (options.priority_class, "--priority-class")):
        if name is not None and not _DNS_SUBDOMAIN.match(name):
            raise InputError(f"not a valid name: {name!r}", where)
    jobs = plan(manifest) if jobs is None else jobs
    configmap_name = kubernetes_name(manifest.run_id, "manifest")
    metadata: dict[str, Any] = {"name": configmap_name, "labels": _labels(manifest, "manifest")}
    if options.namespace:
        metadata["namespace"] = options.namespace
    configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": {CONFIGMAP_KEY: manifest_text}}
    objects = [("00-manifest.yaml", configmap)]
    for job in jobs:
        number = (GROUP_NAMES.index(job.name) + 1) * 10
        objects.append((f"{number:02d}-{job.name}.yaml", _job(manifest, options, job, configmap_name)))
    return objects


def local_output_warning(manifest: Manifest, options: KubernetesOptions) -> str | None:
    if manifest.output.uri.startswith("s3://") or options.work_claim:
        return None
    return (f"output.uri {manifest.output.uri!r} is a local path: without --work-claim it is written to each pod's "
            "scratch volume and lost when the pod ends; use s3:// or a ReadWriteMany claim")


def to_yaml(objects: list[dict]) -> str:
    class _Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:  # shared dicts (labels) are written out, not as &anchors
            return True

    def _str(dumper: yaml.SafeDumper, value: str):
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    _Dumper.add_representer(str, _str)
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)
