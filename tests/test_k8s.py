"""Kubernetes manifests from `reid-batch k8s`: schema-valid (kubernetes-validate --strict, 1.30 and newer),
shards mapped from JOB_COMPLETION_INDEX, failure policy, security context, and k8s/apply.sh's ordering."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from reid_batch import cli, deploy
from reid_batch.errors import InputError
from reid_batch.manifest import parse_manifest, read_yaml
from reid_batch.preemption import EXIT_REQUEUE
from reid_batch.registry import BY_NAME

REPO = Path(__file__).resolve().parents[1]
REID_BATCH = str(Path(sys.executable).parent / "reid-batch")
EXAMPLES = REPO / "k8s" / "examples" / "chexpert-study"
EXAMPLE_IMAGE = "registry.example.org/reid-batch:0.1.0"
MIN_VERSION = (1, 30)


def kubernetes_validate():
    try:
        import kubernetes_validate as kv
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("kubernetes-validate is missing: it is in the test extra (pip install -e '.[test]')")
        pytest.skip("kubernetes-validate is not installed (pip install -e '.[test]')")
    return kv


def schema_versions() -> list[str]:
    """Every Kubernetes version from 1.30 on whose schemas kubernetes-validate bundles."""
    kv = kubernetes_validate()
    versions = sorted({tuple(int(p) for p in re.match(r"v?(\d+)\.(\d+)", v).groups())
                       for v in kv.utils.all_versions()})
    chosen = [f"{major}.{minor}.0" for major, minor in versions if (major, minor) >= MIN_VERSION]
    assert chosen, "no Kubernetes schemas >= 1.30 bundled"
    return chosen


def render(manifest_path: Path | str, *options: str) -> list[dict]:
    done = subprocess.run([REID_BATCH, "k8s", str(manifest_path), *options], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc is not None]


def large_manifest(tmp_path: Path) -> Path:
    document = read_yaml(REPO / "manifests" / "chexpert-study.yaml")
    document["run_id"] = "Study_2026.full-scale-audit-of-every-target-in-the-hospital"  # long, mixed case
    document["sampling"].update({"num_candidates": 10_000_000, "num_shards": 1000})
    document["demographics"]["num_shards"] = 250
    path = tmp_path / "large.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def by_kind(objects: list[dict]) -> tuple[dict, dict[str, dict]]:
    configmaps = [o for o in objects if o["kind"] == "ConfigMap"]
    jobs = {o["metadata"]["labels"]["app.kubernetes.io/component"]: o for o in objects if o["kind"] == "Job"}
    assert len(configmaps) == 1 and len(jobs) + 1 == len(objects)
    return configmaps[0], jobs


def pod_containers(job: dict) -> list[dict]:
    spec = job["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    large = large_manifest(tmp_path_factory.mktemp("large"))
    return {
        "demo": render(REPO / "manifests" / "demo.yaml"),
        "study": render(REPO / "manifests" / "chexpert-study.yaml", "--image", EXAMPLE_IMAGE, "--namespace", "audit"),
        "large": render(large, "--finetune-gpus", "8", "--parallelism", "64", "--work-claim", "reid-work",
                        "--mount", "hospital-data:/data", "--mount", "models:/models:ro", "--memory", "12Gi",
                        "--shm", "16Gi", "--node-selector", "cloud.example.com/pool=a100",
                        "--toleration", "nvidia.com/gpu:NoSchedule", "--toleration", "dedicated=reid:NoExecute",
                        "--runtime-class", "nvidia", "--priority-class", "batch-low"),
    }


@pytest.mark.parametrize("case", ["demo", "study", "large"])
def test_every_object_passes_strict_validation_for_kubernetes_1_30_and_newer(rendered, case):
    kv = kubernetes_validate()
    objects = rendered[case]
    assert len(objects) == 8  # the ConfigMap and seven Jobs
    for version in schema_versions():
        for obj in objects:
            kv.validate(obj, version, strict=True)  # raises ValidationError naming the field


def test_strict_validation_catches_a_misspelt_field(rendered):
    kv = kubernetes_validate()
    _, jobs = by_kind(rendered["demo"])
    broken = yaml.safe_load(yaml.safe_dump(jobs["sample"]))
    broken["spec"]["backoffLimitPerIndx"] = 1
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, "1.30.0", strict=True)


@pytest.mark.parametrize("case, source", [("demo", "manifests/demo.yaml"), ("study", "manifests/chexpert-study.yaml")])
def test_the_configmap_embeds_the_job_manifest_unchanged_and_valid(rendered, case, source):
    configmap, jobs = by_kind(rendered[case])
    text = configmap["data"][deploy.CONFIGMAP_KEY]
    assert text == (REPO / source).read_text()
    embedded = parse_manifest(yaml.safe_load(text), "configmap")  # the project's own schema
    assert embedded == parse_manifest(read_yaml(REPO / source))
    for job in jobs.values():
        volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
        assert volumes["manifest"]["configMap"]["name"] == configmap["metadata"]["name"]
        for container in pod_containers(job):
            assert f"{deploy.CONFIGMAP_MOUNT}/{deploy.CONFIGMAP_KEY}" in container["command"]


def test_array_stages_are_indexed_jobs_whose_completion_index_is_the_shard(rendered, monkeypatch, tmp_path):
    """score: index = shard. train-target, finetune: index = target, in the manifest's order. sample: index = target x
    shard. Every index the Job runs maps to exactly one part; the one past the end is exit 2 naming the variable."""
    _, jobs = by_kind(rendered["large"])
    manifest = parse_manifest(read_yaml(REPO / "manifests" / "chexpert-study.yaml"))
    large = parse_manifest(read_yaml(large_manifest(tmp_path)))
    targets = [t.name for t in manifest.targets]
    expected = {"train-target": [(t, None) for t in targets], "finetune": [(t, None) for t in targets],
                "sample": [(t, k) for t in targets for k in range(1000)], "score": [(None, k) for k in range(250)]}
    assert {name for name, job in jobs.items() if job["spec"].get("completionMode") == "Indexed"} == set(expected)
    parser = cli.build_parser()
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    for stage, parts in expected.items():
        spec = jobs[stage]["spec"]
        assert spec["completions"] == len(parts) and spec["parallelism"] == min(64, len(parts))
        assert spec["backoffLimitPerIndex"] >= 1 and "backoffLimit" not in spec  # per-index retries only
        for container in pod_containers(jobs[stage]):  # init containers get JOB_COMPLETION_INDEX too
            command = container["command"]
            words = command[command.index("reid_batch") + 1:] if command[0] == "accelerate" else command[1:]
            assert "--shard" not in words and "--target" not in words
            args = parser.parse_args(words)
            owned = []
            for index in range(len(parts)):
                monkeypatch.setenv("JOB_COMPLETION_INDEX", str(index))
                if args.array_over is None:
                    owned.append((None, cli.resolve_shard(args, len(parts))))
                else:
                    owned.append(cli.resolve_array_task(args, large, BY_NAME[args.command]))
            assert owned == parts, stage
            monkeypatch.setenv("JOB_COMPLETION_INDEX", str(len(parts)))
            with pytest.raises(InputError, match="outside") as error:
                if args.array_over is None:
                    cli.resolve_shard(args, len(parts))
                else:
                    cli.resolve_array_task(args, large, BY_NAME[args.command])
            assert error.value.where == "JOB_COMPLETION_INDEX"
    assert manifest.sampling.num_shards == 100  # the large manifest's counts came from its own file


def test_bad_input_fails_an_index_or_job_at_once_and_preemption_is_not_a_failure(rendered):
    _, jobs = by_kind(rendered["study"])
    for name, job in jobs.items():
        spec = job["spec"]
        assert spec["template"]["spec"]["restartPolicy"] == "Never"  # required by podFailurePolicy
        rules = spec["podFailurePolicy"]["rules"]
        indexed = spec.get("completionMode") == "Indexed"
        exit_rule = next(r for r in rules if "onExitCodes" in r)
        assert exit_rule["action"] == ("FailIndex" if indexed else "FailJob")
        assert exit_rule["onExitCodes"] == {"operator": "In", "values": [2]}
        requeue = [r for r in rules if r.get("onExitCodes", {}).get("values") == [EXIT_REQUEUE]]
        assert [r["action"] for r in requeue] == ["Ignore"]  # pre-empted on SIGTERM: retried, not counted
        disruption = next(r for r in rules if "onPodConditions" in r)
        assert disruption["action"] == "Ignore"
        assert disruption["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]


def test_pods_run_as_the_images_non_root_user_on_a_read_only_root_with_writable_scratch(rendered):
    image_uid = int(re.search(r"^ARG UID=(\d+)$", (REPO / "docker" / "Dockerfile").read_text(), re.M).group(1))
    for objects in rendered.values():
        _, jobs = by_kind(objects)
        for job in jobs.values():
            pod = job["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["runAsUser"] == image_uid != 0
            volumes = {v["name"]: v for v in pod["volumes"]}
            for container in pod_containers(job):
                security = container["securityContext"]
                assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
                assert security["capabilities"] == {"drop": ["ALL"]}
                mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
                assert not mounts["/tmp"].get("readOnly") and "emptyDir" in volumes[mounts["/tmp"]["name"]]
                assert container["workingDir"] == deploy.WORKDIR and not mounts[deploy.WORKDIR].get("readOnly")
                env = {e["name"]: e["value"] for e in container["env"]}
                assert env["HOME"].startswith("/tmp/")
                # Compiled kernels (sampling.compile) go to the work volume, which a work_claim keeps across jobs.
                for cache in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
                    assert env[cache].startswith(deploy.WORKDIR + "/")


def test_credentials_come_only_from_the_secret_and_only_for_s3_outputs(rendered):
    for case, objects in rendered.items():
        _, jobs = by_kind(objects)
        text = yaml.safe_dump(objects)
        assert "AWS_SECRET_ACCESS_KEY" not in text and "AWS_ACCESS_KEY_ID" not in text
        for job in jobs.values():
            for container in pod_containers(job):
                if case == "demo":  # local output: no secret needed
                    assert "envFrom" not in container
                else:
                    assert container["envFrom"] == [{"secretRef": {"name": "reid-batch-s3"}}]


def test_resources_gpus_stage_order_and_names(rendered):
    _, demo = by_kind(rendered["demo"])
    assert all(deploy.GPU_RESOURCE not in c["resources"]["limits"] for j in demo.values() for c in pod_containers(j))
    _, study = by_kind(rendered["study"])
    assert list(study) == ["prepare", "train-target", "finetune", "sample", "select", "score", "report"]
    assert [c["name"] for c in pod_containers(study["prepare"])] == \
        ["make-phantoms", "train-prior", "train-reid", "train-demographics"]
    assert [c["name"] for c in pod_containers(study["train-target"])] == ["train-target", "mahalanobis-reference"]
    assert [c["name"] for c in pod_containers(study["report"])] == ["evaluate", "calibrate", "report"]
    assert pod_containers(study["sample"])[0]["resources"]["limits"][deploy.GPU_RESOURCE] == 1
    assert deploy.GPU_RESOURCE not in pod_containers(study["select"])[0]["resources"]["limits"]
    assert all(job["metadata"]["namespace"] == "audit" for job in study.values())
    assert all(c["image"] == EXAMPLE_IMAGE for j in study.values() for c in pod_containers(j))

    _, large = by_kind(rendered["large"])
    (finetune,) = pod_containers(large["finetune"])
    assert finetune["resources"]["limits"][deploy.GPU_RESOURCE] == 8
    command = finetune["command"]
    assert command[:3] == ["accelerate", "launch", "--multi_gpu"]
    assert command[command.index("--num_processes") + 1] == "8"
    assert command[command.index("-m"):] == ["-m", "reid_batch", "finetune", "/etc/reid-batch/job.yaml", "--array-over",
                                             "targets"]  # each pod of the Indexed Job fine-tunes its own target
    for job in large.values():
        name = job["metadata"]["name"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 52
        volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
        assert volumes["work"] == {"name": "work", "persistentVolumeClaim": {"claimName": "reid-work"}}
        assert {v["persistentVolumeClaim"]["claimName"]: v["persistentVolumeClaim"]["readOnly"]
                for k, v in volumes.items() if k.startswith("data-")} == {"hospital-data": True, "models": True}
    assert len({job["metadata"]["name"] for job in large.values()}) == 7


def test_pod_memory_scales_with_processes_and_counts_shared_memory(rendered):
    """16Gi for every pod left 8 finetune ranks (plus an 8Gi memory-backed /dev/shm, which the kernel charges to
    the pod) to be OOM-killed: --memory is per process, and /dev/shm is added on top."""
    _, study = by_kind(rendered["study"])
    for job in study.values():  # defaults: 16Gi per process, 8Gi /dev/shm, one process per pod
        assert all(c["resources"]["limits"]["memory"] == c["resources"]["requests"]["memory"] == "24Gi"
                   for c in pod_containers(job))
    _, large = by_kind(rendered["large"])
    memory = {name: pod_containers(job)[-1]["resources"]["limits"]["memory"] for name, job in large.items()}
    assert memory == {"prepare": "28Gi", "train-target": "28Gi", "finetune": "112Gi", "sample": "28Gi",
                      "select": "28Gi", "score": "28Gi", "report": "28Gi"}  # 8 x 12Gi + 16Gi for the 8-GPU finetune pod, 12Gi + 16Gi elsewhere
    for job in large.values():
        pod = job["spec"]["template"]["spec"]
        assert {v["name"]: v for v in pod["volumes"]}["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
        assert pod["nodeSelector"] == {"cloud.example.com/pool": "a100"}
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                                      {"key": "dedicated", "operator": "Equal", "value": "reid", "effect": "NoExecute"}]
        assert pod["runtimeClassName"] == "nvidia" and pod["priorityClassName"] == "batch-low"
    assert all("nodeSelector" not in job["spec"]["template"]["spec"] for job in study.values())


def test_out_writes_one_file_per_object_in_run_order_and_warns_about_local_outputs(tmp_path):
    out = tmp_path / "rendered"
    out.mkdir()
    (out / "99-stale.yaml").write_text("old")
    done = subprocess.run([REID_BATCH, "k8s", str(REPO / "manifests" / "demo.yaml"), "--out", str(out),
                           "--stages", "sample,select"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "local path" in done.stderr and "--work-claim" in done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["00-manifest.yaml", "40-sample.yaml", "50-select.yaml"]


@pytest.mark.parametrize("options, message", [
    (["--stages", "sampel"], "unknown stage"),
    (["--namespace", "Not_Valid"], "namespace"),
    (["--mount", "data"], "CLAIM:/path"),
    (["--parallelism", "0"], "parallelism"),
    (["--memory", "lots"], "--memory"),
    (["--shm", "8GB"], "--shm"),
    (["--toleration", "nvidia.com/gpu"], "--toleration"),
    (["--node-selector", "pool"], "--node-selector"),
    (["--runtime-class", "Nvidia_RT"], "--runtime-class"),
])
def test_bad_options_exit_2(options, message):
    done = subprocess.run([REID_BATCH, "k8s", str(REPO / "manifests" / "demo.yaml"), *options],
                          capture_output=True, text=True)
    assert done.returncode == 2 and message in done.stderr and done.stdout == ""


def test_the_committed_example_is_what_the_renderer_writes(tmp_path):
    out = tmp_path / "example"
    subprocess.run([REID_BATCH, "k8s", "manifests/chexpert-study.yaml", "--image", EXAMPLE_IMAGE, "--out", str(out)],
                   cwd=REPO, check=True, capture_output=True)
    fresh = {p.name: p.read_text() for p in out.iterdir()}
    committed = {p.name: p.read_text() for p in EXAMPLES.glob("*.yaml")}
    assert committed == fresh, (f"k8s/examples is stale; regenerate: reid-batch k8s manifests/chexpert-study.yaml "
                                f"--image {EXAMPLE_IMAGE} --out k8s/examples/chexpert-study")


def test_plan_names_the_kubernetes_objects_and_commands():
    done = subprocess.run([REID_BATCH, "plan", "manifests/chexpert-study.yaml", "--scheduler", "k8s"], cwd=REPO,
                          capture_output=True, text=True, check=True)
    for job in ("train-target", "finetune"):
        assert f"job/reid-chexpert-study-{job}: Indexed Job, completions 4, target = targets[JOB_COMPLETION_INDEX]" \
            in done.stdout
    assert ("job/reid-chexpert-study-sample: Indexed Job, completions 400, target = targets[JOB_COMPLETION_INDEX / 100]"
            ", shard = JOB_COMPLETION_INDEX % 100") in done.stdout
    assert "job/reid-chexpert-study-score: Indexed Job, completions 10, shard = JOB_COMPLETION_INDEX" in done.stdout
    assert "reid-batch finetune /etc/reid-batch/job.yaml --array-over targets" in done.stdout
    assert "kubectl create secret generic reid-batch-s3" in done.stdout and "k8s/apply.sh" in done.stdout


def _fake_kubectl(tmp_path: Path, failing_job: str | None) -> dict[str, str]:
    log = tmp_path / "kubectl.log"
    fake = tmp_path / "kubectl"
    fake.write_text(f"""#!/bin/bash
echo "$*" >> {log}
if [[ $1 == get ]]; then
    file=${{3}}
    if [[ -n "{failing_job or ''}" && $file == *-{failing_job or 'none'}.yaml ]]; then echo Failed; else echo Complete; fi
fi
""")
    fake.chmod(0o755)
    return {**os.environ, "KUBECTL": str(fake), "REID_BATCH_POLL_SECONDS": "0"}


def test_apply_runs_the_jobs_in_order_and_stops_at_a_failed_one(tmp_path):
    out = tmp_path / "rendered"
    subprocess.run([REID_BATCH, "k8s", str(REPO / "manifests" / "chexpert-study.yaml"), "--out", str(out)],
                   check=True, capture_output=True)
    env = _fake_kubectl(tmp_path, failing_job=None)
    subprocess.run(["bash", str(REPO / "k8s" / "apply.sh"), str(out)], env=env, check=True, capture_output=True)
    calls = (tmp_path / "kubectl.log").read_text().splitlines()
    applied = [Path(c.split()[-1]).stem for c in calls if c.startswith("apply")]
    assert applied == ["00-manifest", "10-prepare", "20-train-target", "30-finetune", "40-sample", "50-select",
                       "60-score", "70-report"]
    # Each Job is waited for before the next is applied.
    waits = [i for i, c in enumerate(calls) if c.startswith(f"get -f {out}/40-sample.yaml")]
    assert calls.index(f"apply -f {out}/40-sample.yaml") < waits[0] < calls.index(f"apply -f {out}/50-select.yaml")

    (tmp_path / "kubectl.log").unlink()
    env = _fake_kubectl(tmp_path, failing_job="sample")
    done = subprocess.run(["bash", str(REPO / "k8s" / "apply.sh"), str(out)], env=env, capture_output=True, text=True)
    assert done.returncode == 1 and "sample failed" in done.stderr
    applied = [Path(c.split()[-1]).stem for c in (tmp_path / "kubectl.log").read_text().splitlines() if c.startswith("apply")]
    assert applied[-1] == "40-sample"

    (tmp_path / "kubectl.log").unlink()
    env = _fake_kubectl(tmp_path, failing_job=None)
    subprocess.run(["bash", str(REPO / "k8s" / "apply.sh"), str(out), "--from", "sample"], env=env, check=True,
                   capture_output=True)
    calls = (tmp_path / "kubectl.log").read_text().splitlines()
    assert [c.split()[0] + " " + Path(c.split()[-1]).stem for c in calls if c.split()[0] in ("apply", "delete")][:4] == \
        ["apply 00-manifest", "delete 40-sample", "apply 40-sample", "delete 50-select"]


def test_apply_says_when_pods_cannot_be_scheduled_instead_of_polling_in_silence(tmp_path):
    out = tmp_path / "rendered"
    subprocess.run([REID_BATCH, "k8s", str(REPO / "manifests" / "chexpert-study.yaml"), "--out", str(out),
                    "--stages", "select"], check=True, capture_output=True)
    polls = tmp_path / "polls"
    fake = tmp_path / "kubectl"
    # The Job reports no condition for three polls, its pod stays Pending and Unschedulable, then it completes.
    fake.write_text(f"""#!/bin/bash
if [[ $1 == get && $2 == pods ]]; then
    printf 'reid-x-select-abcde\\tUnschedulable\\t0/12 nodes are available: 12 node(s) had untolerated taint\\n'
elif [[ $1 == get && $* == *metadata.name* ]]; then
    echo reid-x-select
elif [[ $1 == get ]]; then
    echo . >> {polls}
    (( $(wc -l < {polls}) > 3 )) && echo Complete
fi
exit 0
""")
    fake.chmod(0o755)
    env = {**os.environ, "KUBECTL": str(fake), "REID_BATCH_POLL_SECONDS": "0"}
    done = subprocess.run(["bash", str(REPO / "k8s" / "apply.sh"), str(out)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "select: pods cannot be scheduled" in done.stderr and "--toleration" in done.stderr
    # Reported once while the message stays the same, naming the pod and the scheduler's reason.
    assert done.stderr.count("reid-x-select-abcde: 0/12 nodes are available: 12 node(s) had untolerated taint") == 1
    assert "select complete" in done.stdout


@pytest.mark.parametrize("command", [["k8s", "manifests/chexpert-study.yaml"], ["plan", "manifests/demo.yaml"],
                                     ["plan", "manifests/demo.yaml", "--scheduler", "k8s", "--format", "shell"]])
def test_rendering_and_planning_never_import_torch(command):
    """They run on login nodes and laptops: no torch, torchvision or accelerate (seconds of import each)."""
    probe = ("import sys; from reid_batch.cli import main; code = main(sys.argv[1:]); "
             "heavy = {'torch', 'torchvision', 'accelerate'} & set(sys.modules); assert not heavy, heavy; sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", probe, *command], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
