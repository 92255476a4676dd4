"""slurm/submit.sh on a real single-node Slurm (slurm-wlm + munge, started here), and its job scripts.

The end-to-end test submits a tiny two-target manifest's whole pipeline (train-target and finetune as arrays over
the targets, sample over target x shard, the Ledoit-Wolf reference fitted once per target before sampling), fails
one sampling task on purpose through a wrapper command (test-only; the package knows nothing of it), re-submits
only that task and what follows, and checks the outputs are complete and the same as `reid-batch run` of the
manifest.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from reid_batch.registry import STAGES

REPO = Path(__file__).resolve().parents[1]
SUBMIT = REPO / "slurm" / "submit.sh"
VENV_BIN = Path(sys.executable).parent
REID_BATCH = str(VENV_BIN / "reid-batch")
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("munge", "unmunge", "sbatch", "squeue", "scontrol", "sinfo", "srun")

# The project's tiny end-to-end job (a few dozen 32 px patients, tiny networks, one epoch; also run inside the
# container image by docker/build-local.sh): the whole pipeline in well under a minute of compute.
SMOKE_MANIFEST = REPO / "docker" / "smoke.yaml"
RUN_ID = yaml.safe_load(SMOKE_MANIFEST.read_text())["run_id"]
TARGETS = ("cnn", "cnn-b")  # the smoke manifest's target, and a second one so that the target arrays have two tasks
SAMPLE_SHARDS = 2
FAILING_TASK = 1  # of the sample array: target 0 (cnn), shard 1


def built_stages() -> list[str]:
    return [stage.name for stage in STAGES]


def submit_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    # The same thread count in the reference run and in every job: float results then match bit for bit.
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def write_manifest(directory: Path) -> Path:
    """The smoke manifest with a second target (the target arrays get two tasks) and the Ledoit-Wolf Gaussian (fitted
    in the train-target array, read by every sampling task)."""
    directory.mkdir(parents=True, exist_ok=True)
    document = yaml.safe_load(SMOKE_MANIFEST.read_text())
    (first,) = document["targets"]
    assert first["name"] == TARGETS[0] and document["sampling"]["num_shards"] == SAMPLE_SHARDS
    document["targets"].append({**first, "name": TARGETS[1]})
    document["selection"]["mahalanobis"]["covariance"] = "ledoit_wolf"
    path = directory / "tiny.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def run_submit(args: list[str], cwd: Path, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["bash", str(SUBMIT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    if check and done.returncode != 0:
        raise AssertionError(f"submit.sh {args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def sbatch_lines(stdout: str) -> list[list[str]]:
    """The argument lists of a --dry-run's sbatch commands."""
    lines = [shlex.split(line) for line in stdout.splitlines()]
    assert all(line[0] == "sbatch" for line in lines), stdout
    return lines


# --------------------------------------------------------------------------------------------- job scripts


def test_dry_run_chains_every_job_afterok_with_arrays_sized_from_the_manifest(tmp_path):
    manifest = write_manifest(tmp_path)
    done = run_submit(["--dry-run", "--parallel", "3", "--partition", "gpu", "--account", "lab", "--gpus", "1",
                       "--time", "sample=02:00:00", "--logs", str(tmp_path / "logs"), manifest.name], tmp_path, submit_env())
    lines = sbatch_lines(done.stdout)
    jobs = ("prepare", "train-target", "finetune", "sample", "select", "score", "report")
    assert [line[line.index("--parsable") + 1] for line in lines] == [f"--job-name=reid-{RUN_ID}-{job}" for job in jobs]
    for line, previous in zip(lines[1:], jobs):
        assert f"--dependency=afterok:<{previous}>" in line and "--kill-on-invalid-dep=yes" in line
    assert not any(a.startswith("--dependency") for a in lines[0])
    assert all("--partition=gpu" in line and "--account=lab" in line for line in lines)
    train_target, finetune, sample, select, score = lines[1:6]
    # Targets are independent: one task per target (2), and sampling per target x shard (2 x 2).
    assert "--array=0-1%3" in train_target and "--gpus-per-task=1" in train_target
    assert "--array=0-1%3" in finetune and "--gpus-per-node=1" in finetune
    assert "--array=0-3%3" in sample and "--time=02:00:00" in sample and "--gpus-per-task=1" in sample
    assert "--array=0-1%3" in score and "--time=24:00:00" in score
    assert not any(a.startswith("--gpus") for a in select)
    assert not any(a.startswith("--array") for a in lines[0] + select + lines[6])

    def stage_lines(job: str) -> list[list[str]]:
        script = (tmp_path / "logs" / "jobs" / f"{job}.sh").read_text()
        return [line.split() for line in script.splitlines() if line.startswith("reid-batch")]

    assert stage_lines("prepare") == [["reid-batch", stage, "tiny.yaml"] for stage in
                                      ("make-phantoms", "train-prior", "train-reid", "train-demographics")]
    assert stage_lines("train-target") == [["reid-batch", stage, "tiny.yaml", "--array-over", "targets"]
                                           for stage in ("train-target", "mahalanobis-reference")]
    assert stage_lines("sample") == [["reid-batch", "sample", "tiny.yaml", "--array-over", "target-shards"]]
    assert stage_lines("score") == [["reid-batch", "score", "tiny.yaml"]]  # a shard per task: the default
    finetune_script = (tmp_path / "logs" / "jobs" / "finetune.sh").read_text()
    assert '-m reid_batch finetune "$5" --array-over targets' in finetune_script
    assert (tmp_path / "logs" / "jobs" / "report.sh").read_text().splitlines()[-3:] == \
        ["reid-batch evaluate tiny.yaml", "reid-batch calibrate tiny.yaml", "reid-batch report tiny.yaml"]


def test_resubmitting_failed_tasks_starts_at_that_array_and_chains_what_follows(tmp_path):
    manifest = write_manifest(tmp_path)
    done = run_submit(["--dry-run", "--from", "sample", "--array", "1,3", "--after", "77",
                       "--logs", str(tmp_path / "logs"), manifest.name], tmp_path, submit_env())
    lines = sbatch_lines(done.stdout)
    assert len(lines) == 4
    assert "--array=1,3%16" in lines[0] and "--dependency=afterok:77" in lines[0]
    assert "--array=0-1%16" in lines[2]  # score: all of its shards again


def test_stage_selection_leaves_out_jobs_with_nothing_to_do(tmp_path):
    manifest = write_manifest(tmp_path)
    done = run_submit(["--dry-run", "--stages", "make-phantoms,select", "--logs", str(tmp_path / "logs"),
                       manifest.name], tmp_path, submit_env())
    lines = sbatch_lines(done.stdout)
    assert len(lines) == 2 and f"--job-name=reid-{RUN_ID}-prepare" in lines[0] and f"--job-name=reid-{RUN_ID}-select" in lines[1]
    assert "--dependency=afterok:<prepare>" in lines[1]
    prepare = (tmp_path / "logs" / "jobs" / "prepare.sh").read_text()
    assert "make-phantoms" in prepare and "train-target" not in prepare


@pytest.mark.parametrize("args, message", [
    (["--stages", "sampel"], "unknown stage"),
    (["--from", "nowhere"], "unknown job"),
    (["--array", "1;rm"], "--array"),
    (["--from", "report", "--array", "1"], "no array job"),
    (["--cpus", "many"], "not a number"),
    (["--frobnicate"], "unknown option"),
    (["--gpus", "4"], "--finetune-gpus-per-node"),  # array tasks run one process: three GPUs would idle
])
def test_bad_options_exit_2_naming_the_problem_before_anything_is_submitted(tmp_path, args, message):
    manifest = write_manifest(tmp_path)
    done = run_submit([*args, "--dry-run", manifest.name], tmp_path, submit_env(), check=False)
    assert done.returncode == 2 and message in done.stderr and "sbatch" not in done.stdout


def test_an_invalid_manifest_is_refused_before_anything_is_submitted(tmp_path):
    (tmp_path / "bad.yaml").write_text("version: 1\nrun_id: x\n")
    done = run_submit(["--dry-run", "bad.yaml"], tmp_path, submit_env(), check=False)
    assert done.returncode == 2 and "invalid manifest" in done.stderr and "sbatch" not in done.stdout


def test_multi_node_finetune_gives_each_node_its_own_rank_and_one_rendezvous(tmp_path):
    """Run the generated finetune script with stand-ins for srun (2 'nodes'), scontrol and accelerate."""
    manifest = write_manifest(tmp_path)
    logs = tmp_path / "logs"
    run_submit(["--dry-run", "--finetune-nodes", "2", "--finetune-gpus-per-node", "4", "--logs", str(logs),
                manifest.name], tmp_path, submit_env())
    fakes = tmp_path / "fakes"
    fakes.mkdir()
    (fakes / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-a17\\ngpu-b03\\n'\n")
    # srun starts the command once per node, each with its own SLURM_NODEID, like the real one.
    (fakes / "srun").write_text('#!/bin/bash\necho "$@" > "$SRUN_CALL"\nwhile [[ $1 == --* ]]; do shift; done\n'
                                'for node in 0 1; do SLURM_NODEID=$node "$@"; done\n')
    (fakes / "accelerate").write_text('#!/bin/sh\necho "$@" >> "$CALLS"\n')
    for fake in fakes.iterdir():
        fake.chmod(0o755)
    calls = tmp_path / "calls.txt"
    srun_call = tmp_path / "srun.txt"
    env = submit_env(PATH=f"{fakes}{os.pathsep}{os.environ['PATH']}", CALLS=str(calls), SLURM_JOB_ID="4242",
                     SLURM_NNODES="2", SLURM_JOB_NODELIST="gpu-a17,gpu-b03", SLURM_NODEID="",
                     SLURM_CPUS_PER_TASK="12", SRUN_CALL=str(srun_call))
    subprocess.run(["bash", str(logs / "jobs" / "finetune.sh")], cwd=tmp_path, env=env, check=True, timeout=30)
    # Slurm 22.05-23.02 do not hand sbatch's --cpus-per-task to srun: the script passes it on.
    assert "--cpus-per-task=12" in srun_call.read_text().split()
    launches = [line.split() for line in calls.read_text().splitlines()]
    assert len(launches) == 2
    # The rendezvous port, for every job id, stays below the kernel's ephemeral range, where an outgoing connection
    # may hold it (the old 20000 + id mod 20000 fell inside Linux's default 32768-60999 for ids 12768-19999 mod 20000).
    low, _ = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    port = int(re.search(r"--main_process_port (\d+)", " ".join(launches[0])).group(1))
    assert 1024 < port and port + 19999 - 4242 % 20000 < min(low, 32768)
    for rank, words in enumerate(launches):
        assert words[0] == "launch" and "--multi_gpu" in words
        assert words[-6:] == ["-m", "reid_batch", "finetune", "tiny.yaml", "--array-over", "targets"]
    ranks = [re.search(r"--machine_rank (\d+)", " ".join(w)).group(1) for w in launches]
    assert ranks == ["0", "1"]
    for words in launches:
        text = " ".join(words)
        assert "--main_process_ip gpu-a17" in text and f"--main_process_port {10000 + 4242 % 20000}" in text
        assert "--num_processes 8" in text and "--num_machines 2" in text


def test_container_mode_runs_every_stage_through_apptainer_exec(tmp_path):
    manifest = write_manifest(tmp_path)
    fakes = tmp_path / "fakes"
    fakes.mkdir()
    # Stands in for apptainer: drops `exec`, its options and the image, and runs the command on the host.
    (fakes / "apptainer").write_text('#!/bin/bash\nshift\nwhile [[ $1 == --* ]]; do [[ $1 == --nv ]] && shift || '
                                     'shift 2; done\nshift\nexec "$@"\n')
    (fakes / "apptainer").chmod(0o755)
    env = submit_env(PATH=f"{fakes}{os.pathsep}{VENV_BIN}{os.pathsep}/usr/bin:/bin")
    logs = tmp_path / "logs"
    run_submit(["--dry-run", "--container", "/images/reid-batch.sif", "--bind", "/data:/data:ro", "--gpus", "1",
                "--logs", str(logs), manifest.name], tmp_path, env)
    sample = (logs / "jobs" / "sample.sh").read_text().splitlines()[-1]
    assert shlex.split(sample) == ["apptainer", "exec", "--nv", "--bind", str(tmp_path), "--bind", "/data:/data:ro",
                                   "--pwd", str(tmp_path), "/images/reid-batch.sif", "reid-batch", "sample", "tiny.yaml",
                                   "--array-over", "target-shards"]
    assert "exec apptainer exec --nv" in (logs / "jobs" / "finetune.sh").read_text()


def test_plan_prints_the_slurm_jobs_and_the_shell_summary_submit_reads(tmp_path):
    manifest = write_manifest(tmp_path)
    text = subprocess.run([REID_BATCH, "plan", str(manifest)], capture_output=True, text=True, check=True).stdout
    assert "[train-target] train-target, mahalanobis-reference: array of 2 (targets: cnn, cnn-b), after prepare" in text
    assert "[finetune] finetune: array of 2 (targets: cnn, cnn-b), after train-target" in text
    assert "[sample] sample: array of 4 (2 targets x 2 shards), after finetune" in text and "--array=0-3%16" in text
    assert "# target = targets[SLURM_ARRAY_TASK_ID / 2], shard = SLURM_ARRAY_TASK_ID % 2" in text
    assert "[score] score: array of 2 (shards), after select" in text
    assert "srun --cpus-per-task=$SLURM_CPUS_PER_TASK accelerate launch" in text
    shell = subprocess.run([REID_BATCH, "plan", str(manifest), "--format", "shell"], capture_output=True, text=True,
                           check=True).stdout
    values = dict(line.split("=", 1) for line in shell.splitlines())
    local = subprocess.run([REID_BATCH, "plan", str(manifest), "--scheduler", "local"], capture_output=True,
                           text=True, check=True).stdout
    assert f"reid-batch sample {manifest} --target cnn-b --shard 1" in local
    assert f"reid-batch finetune {manifest} --target cnn-b" in local and f"reid-batch score {manifest} --shard 1" in local
    assert values["run_id"] == RUN_ID and values["sample_shards"] == "2" and values["score_shards"] == "2"
    assert values["train-target_tasks"] == values["finetune_tasks"] == "2" and values["sample_tasks"] == "4"
    assert values["select_tasks"] == "''" and values["sample_stage_args"] == "'--array-over target-shards'"
    assert values["gpus"] == "0"


@pytest.mark.parametrize("stage, over, index, message", [
    ("train-target", "targets", "2", "SLURM_ARRAY_TASK_ID: task index 2 is outside 0..1: the manifest has 2 target(s)"),
    ("finetune", "targets", "-1", "SLURM_ARRAY_TASK_ID: task index -1 is outside 0..1"),
    ("sample", "target-shards", "4", "SLURM_ARRAY_TASK_ID: task index 4 is outside 0..3: the manifest has 2 target(s) "
                                     "x 2 shard(s)"),
    ("finetune", "targets", "one", "SLURM_ARRAY_TASK_ID: not an integer: 'one'"),
    ("finetune", "targets", None, "SLURM_ARRAY_TASK_ID / JOB_COMPLETION_INDEX: --array-over targets needs"),
])
def test_a_target_array_task_with_a_bad_index_exits_2_naming_the_variable(tmp_path, stage, over, index, message):
    manifest = write_manifest(tmp_path)
    env = {k: v for k, v in submit_env().items() if k not in ("SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX")}
    if index is not None:
        env["SLURM_ARRAY_TASK_ID"] = index
    done = subprocess.run([REID_BATCH, stage, str(manifest), "--array-over", over], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and message in done.stderr, done.stderr


@pytest.mark.parametrize("stage, choices", [("sample", "{targets,target-shards}"), ("finetune", "{targets}"),
                                            ("mahalanobis-reference", "{targets}")])
def test_stage_help_offers_the_array_over_targets(stage, choices):
    done = subprocess.run([REID_BATCH, stage, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and f"--array-over {choices}" in done.stdout, done.stderr


@pytest.mark.parametrize("script", ["slurm/submit.sh", "k8s/apply.sh", "docker/build-local.sh"])
def test_shell_scripts_pass_shellcheck(script):
    if shutil.which("shellcheck") is None:
        if os.environ.get("CI"):
            pytest.fail("shellcheck is missing; `make test` installs tests/system-packages.txt as root")
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    done = subprocess.run(["shellcheck", str(REPO / script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout


# ------------------------------------------------------------------------------------------- real Slurm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary(name: str) -> str | None:
    return shutil.which(name) or next((str(p) for p in (Path("/usr/sbin") / name, Path("/sbin") / name) if p.exists()), None)


def _wait_until(predicate, timeout: float, what: str, interval: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise TimeoutError(f"gave up after {timeout:.0f} s waiting for {what}")


def _stop(pid_file: Path) -> None:
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
        _wait_until(lambda: not Path(f"/proc/{pid}").exists(), 15, f"pid {pid} to exit")
    except ProcessLookupError:
        return
    except TimeoutError:
        os.kill(pid, signal.SIGKILL)


class Slurm:
    def __init__(self, root: Path, env: dict[str, str]):
        self.root = root
        self.env = env

    def command(self, *args: str) -> str:
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, check=True, timeout=30).stdout

    def job_states(self, job_id: str) -> dict[str, str]:
        """'<id>' or '<id>_<task>' -> Slurm state, for a job or every task of an array job."""
        states = {}
        for line in self.command("scontrol", "show", "job", "-o", job_id).splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            task = fields.get("ArrayTaskId")
            # A pending (or never started) array's tasks share one record: ArrayTaskId=0-1.
            states[f"{job_id}_{task}" if task else job_id] = fields["JobState"]
        return states

    @staticmethod
    def states_of(states: dict[str, str], job_id: str) -> set[str]:
        return {state for key, state in states.items() if key == job_id or key.startswith(f"{job_id}_")}

    def wait_for(self, job_ids: list[str], timeout: float) -> dict[str, str]:
        def finished():
            queued = self.command("squeue", "-h", "-o", "%i", "-j", ",".join(job_ids)).split()
            return not queued
        _wait_until(finished, timeout, f"jobs {job_ids} to leave the queue", interval=1.0)
        states = {}
        for job_id in job_ids:
            states.update(self.job_states(job_id))
        return states


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A private single-node Slurm (munged, slurmctld, slurmd) on loopback ports, stopped by PID at the end."""
    missing = [name for name in DAEMONS + CLIENTS if _binary(name) is None]
    if missing:
        if os.geteuid() != 0:
            pytest.skip(f"Slurm is not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge")
        pytest.fail(f"Slurm is not installed ({', '.join(missing)} missing); `make test` installs "
                    "tests/system-packages.txt as root")
    if os.geteuid() != 0:
        pytest.skip("a private Slurm needs root: munged runs as the munge user, slurmd as root")
    root = tmp_path_factory.mktemp("slurm")
    munge_user = pwd.getpwnam("munge")
    # munged wants its socket's directory searchable by all but writable only by itself: a fresh one, owned by munge.
    munge_dir = Path(tempfile.mkdtemp(prefix="reid-batch-munge-"))
    os.chown(munge_dir, munge_user.pw_uid, munge_user.pw_gid)
    munge_dir.chmod(0o711)
    key = munge_dir / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chown(key, munge_user.pw_uid, munge_user.pw_gid)
    key.chmod(0o400)
    munge_socket = munge_dir / "munge.socket"
    pid_files = {"munged": munge_dir / "munged.pid", "slurmctld": root / "slurmctld.pid", "slurmd": root / "slurmd.pid"}
    (root / "state").mkdir()
    (root / "spool").mkdir()
    cpus = os.cpu_count() or 1
    memory_mib = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 - 1024
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=reidtest
SlurmctldHost=localhost
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={pid_files['slurmctld']}
SlurmdPidFile={pid_files['slurmd']}
SlurmctldLogFile={root / 'slurmctld.log'}
SlurmdLogFile={root / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SchedulerParameters=kill_invalid_depend
MinJobAge=3600
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mib} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")
    env = submit_env(SLURM_CONF=str(conf))
    try:
        subprocess.run(["runuser", "-u", "munge", "--", _binary("munged"), f"--socket={munge_socket}",
                        f"--key-file={key}", f"--pid-file={pid_files['munged']}", f"--log-file={munge_dir / 'munged.log'}",
                        f"--seed-file={munge_dir / 'munged.seed'}"], check=True, timeout=30)
        _wait_until(lambda: subprocess.run(f"munge -S {munge_socket} -n | unmunge -S {munge_socket}", shell=True,
                                           capture_output=True).returncode == 0, 20, "munged")
        subprocess.run([_binary("slurmctld"), "-f", str(conf)], env=env, check=True, timeout=30)
        subprocess.run([_binary("slurmd"), "-f", str(conf), "-N", "localhost"], env=env, check=True, timeout=30)
        cluster = Slurm(root, env)

        def idle():
            try:
                return cluster.command("sinfo", "-h", "-N", "-o", "%t").split() == ["idle"]
            except subprocess.SubprocessError:
                return False
        _wait_until(idle, 60, "the Slurm node to be idle")
        yield cluster
    finally:
        for daemon in ("slurmd", "slurmctld", "munged"):
            _stop(pid_files[daemon])
        shutil.rmtree(munge_dir, ignore_errors=True)


# Values that differ between two runs of the same manifest (clocks, speeds) or name the run's own directory.
_VOLATILE = re.compile(r"(^created$|^generated$|^inputs$|seconds|elapsed|per_second|^size$|^ts$)")
_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(\+00:00|Z)?")


def _normalised(path: Path, run_dir: Path):
    def text_of(value):
        if isinstance(value, str):
            return _TIMESTAMP.sub("<time>", value.replace(str(run_dir), "<run>"))
        if isinstance(value, float) and value != value:
            return "NaN"  # NaN != NaN: compare missing values as equal
        if hasattr(value, "tolist"):  # a list column (features) reads back as a numpy array per row
            return value.tolist()
        return value

    if path.suffix == ".parquet":
        import pandas as pd

        frame = pd.read_parquet(path)
        frame = frame[[c for c in frame.columns if not _VOLATILE.search(c)]]
        return {c: [text_of(v) for v in frame[c].tolist()] for c in frame.columns}
    if path.suffix == ".json" or path.name in ("_COMMITTED", "_SHARD.json"):
        def clean(value):
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items() if not _VOLATILE.search(k)}
            if isinstance(value, list):
                return [clean(v) for v in value]
            return text_of(value)
        return clean(json.loads(path.read_text()))
    if path.suffix in (".csv", ".md", ".html", ".txt"):
        return text_of(path.read_text())
    return path.read_bytes()


def assert_same_outputs(slurm_dir: Path, local_dir: Path) -> int:
    """Same files, same content (after dropping timings and the runs' own directory names)."""
    def files(root: Path) -> set[str]:
        # Log files are per task, and a Slurm array's tasks are shards where a local run's are stages.
        return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.parent.name != "logs"}

    for part in ("out", "world"):
        ours, theirs = files(slurm_dir / part), files(local_dir / part)
        assert ours == theirs, f"{part}: only on Slurm {sorted(ours - theirs)[:5]}, only local {sorted(theirs - ours)[:5]}"
        for name in sorted(ours):
            a = _normalised(slurm_dir / part / name, slurm_dir)
            b = _normalised(local_dir / part / name, local_dir)
            assert a == b, f"{part}/{name} differs between the Slurm run and the local run"
    return len(files(slurm_dir / "out"))


@pytest.mark.slow
def test_the_pipeline_on_slurm_matches_a_local_run_and_finishes_after_a_failed_task_is_resubmitted(slurm, tmp_path):
    stages = built_stages()
    local_dir, slurm_dir = tmp_path / "local", tmp_path / "slurm"
    write_manifest(local_dir)
    write_manifest(slurm_dir)
    env = submit_env(SLURM_CONF=slurm.env["SLURM_CONF"])
    subprocess.run([REID_BATCH, "run", "tiny.yaml"], cwd=local_dir, env=env, check=True, timeout=600,
                   capture_output=True)

    # The test's hook: a wrapper that fails one sampling task, once. The package itself has no such switch.
    marker = tmp_path / "failed-once"
    wrapper = tmp_path / "reid-batch-failing-once"
    wrapper.write_text(f"""#!/bin/sh
if [ "$1" = sample ] && [ "${{SLURM_ARRAY_TASK_ID:-}}" = "{FAILING_TASK}" ] && [ ! -e {marker} ]; then
    touch {marker}
    echo "failing sampling task {FAILING_TASK} on purpose" >&2
    exit 1
fi
exec {REID_BATCH} "$@"
""")
    wrapper.chmod(0o755)
    # venv mode when the suite runs in one; otherwise the jobs find reid-batch on the PATH sbatch exports.
    venv = ["--venv", str(VENV_BIN.parent)] if (VENV_BIN / "activate").exists() else []
    common = [*venv, "--reid-batch", str(wrapper), "--cpus", "1", "--mem", "2G",
              "--time", "00:10:00", "--stages", ",".join(stages), "--logs", str(tmp_path / "logs")]
    submitted = run_submit([*common, "tiny.yaml"], slurm_dir, env).stdout.split("\n")
    jobs = dict(line.split()[:2] for line in submitted if line.strip())
    states = slurm.wait_for(list(jobs.values()), timeout=420)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted((tmp_path / "logs").glob("*.out")))

    # Targets ran as arrays: one task per target for training and stage 1.
    for job in ("train-target", "finetune"):
        assert {key: state for key, state in states.items() if key.startswith(f"{jobs[job]}_")} == \
            {f"{jobs[job]}_{i}": "COMPLETED" for i in range(len(TARGETS))}, (states, logs)
    # Each target's Ledoit-Wolf Gaussian was fitted once, in its train-target task; sampling tasks only read it.
    fitted = [line for p in (tmp_path / "logs").glob("train-target-*.out") for line in p.read_text().splitlines()
              if '"mahalanobis_reference_fitted"' in line]
    assert sorted(json.loads(line)["target"] for line in fitted) == sorted(TARGETS), logs
    sampling_logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("sample-*.out"))
    assert '"mahalanobis_reference_fitted"' not in sampling_logs
    assert sampling_logs.count('"mahalanobis_reference_read"') == len(TARGETS) * SAMPLE_SHARDS - 1  # one failed first

    if "sample" in jobs:
        sample = jobs["sample"]
        assert states[f"{sample}_{FAILING_TASK}"] == "FAILED", (states, logs)
        assert all(states[f"{sample}_{i}"] == "COMPLETED" for i in range(len(TARGETS) * SAMPLE_SHARDS)
                   if i != FAILING_TASK), (states, logs)
        before = list(jobs)[: list(jobs).index("sample")]
        after = list(jobs)[list(jobs).index("sample") + 1:]
        assert all(slurm.states_of(states, jobs[j]) == {"COMPLETED"} for j in before), (states, logs)
        # kill_invalid_depend: what depends on the failed array is cancelled, not left pending.
        assert all(slurm.states_of(states, jobs[j]) == {"CANCELLED"} for j in after), (states, logs)
        assert not (slurm_dir / f"out/{RUN_ID}/cnn/candidates/shard={FAILING_TASK}/_SHARD.json").exists()
        assert marker.exists()

        resubmitted = run_submit([*common, "--from", "sample", "--array", str(FAILING_TASK), "tiny.yaml"],
                                 slurm_dir, env).stdout.split("\n")
        again = dict(line.split()[:2] for line in resubmitted if line.strip())
        assert list(again) == ["sample", *after]
        states = slurm.wait_for(list(again.values()), timeout=420)
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted((tmp_path / "logs").glob("*.out")))
        assert {key for key in states if key.startswith(f"{again['sample']}_")} == {f"{again['sample']}_{FAILING_TASK}"}
    assert all(state == "COMPLETED" for state in states.values()), (states, logs)

    count = assert_same_outputs(slurm_dir, local_dir)
    assert count > 0
    # Every array task kept its own log in the run's output.
    shard_logs = slurm_dir / "out" / RUN_ID / "logs"
    if "sample" in jobs:
        for target in TARGETS:
            for shard in range(SAMPLE_SHARDS):
                log_file = shard_logs / f"sample-{target}-shard-{shard}.jsonl"
                events = [json.loads(line)["event"] for line in log_file.read_text().splitlines()]
                assert "sample_shard_done" in events and "array_task" in events, log_file

    # Stage 1 of the first target again (its array task alone), as 2 processes through srun + accelerate launch with
    # the allocation's rendezvous.
    shutil.rmtree(slurm_dir / "out" / RUN_ID / "cnn" / "finetune")
    resubmitted = run_submit([*common, "--stages", "finetune", "--array", "0", "--finetune-processes-per-node", "2",
                              "--cpus", "2", "tiny.yaml"], slurm_dir, env).stdout.split()
    states = slurm.wait_for([resubmitted[1]], timeout=300)
    assert states == {f"{resubmitted[1]}_0": "COMPLETED"}, states
    record = json.loads((slurm_dir / "out" / RUN_ID / "cnn" / "finetune" / "finetune.json").read_text())
    assert record["world_size"] == 2
    assert {p.name for p in shard_logs.glob("finetune-cnn-rank-*.jsonl")} == {"finetune-cnn-rank-0.jsonl",
                                                                             "finetune-cnn-rank-1.jsonl"}


@pytest.mark.slow
def test_a_job_stopped_by_sigterm_requeues_itself_and_its_dependants_wait_but_a_cancelled_one_does_not(slurm, tmp_path):
    """`scancel --signal=TERM --full` stands in for pre-emption: the stage exits 75 (as reid-batch does on SIGTERM)
    and the job requeues itself; a plain `scancel` is the user's decision: exit 75 too, but no requeue."""
    work = tmp_path / "work"
    write_manifest(work)
    runs = tmp_path / "runs"
    runs.mkdir()
    # Stands in for reid-batch's stages (plan goes to the real one): select, run N, appends N to a file; the first
    # run waits to be signalled and exits 75 on SIGTERM; later runs succeed at once.
    fake = tmp_path / "reid-batch-preemptible"
    fake.write_text(f"""#!/bin/bash
[[ $1 == plan ]] && exec {REID_BATCH} "$@"
echo "$1 ${{SLURM_RESTART_COUNT:-0}}" >> {runs}/$1
if [[ $1 == select && ${{SLURM_RESTART_COUNT:-0}} == 0 ]]; then
    trap 'echo "$1 got SIGTERM" >> {runs}/signals; exit 75' TERM
    touch {runs}/started
    for _ in $(seq 200); do sleep 0.1; done
    exit 0
fi
""")
    fake.chmod(0o755)
    env = submit_env(SLURM_CONF=slurm.env["SLURM_CONF"])
    common = ["--reid-batch", str(fake), "--cpus", "1", "--mem", "1G", "--time", "00:05:00",
              "--logs", str(tmp_path / "logs")]
    submitted = run_submit([*common, "--stages", "select,score", "tiny.yaml"], work, env).stdout.split("\n")
    jobs = dict(line.split()[:2] for line in submitted if line.strip())
    _wait_until(lambda: (runs / "started").exists(), 120, "the select job to start")
    slurm.command("scancel", "--signal=TERM", "--full", jobs["select"])
    states = slurm.wait_for(list(jobs.values()), timeout=300)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted((tmp_path / "logs").glob("*.out")))
    assert set(states.values()) == {"COMPLETED"}, (states, logs)
    assert (runs / "select").read_text().split("\n")[:2] == ["select 0", "select 1"], logs
    assert "requeued" in logs and (runs / "signals").exists()
    assert len((runs / "score").read_text().split("\n")) > 1  # the dependant ran, after the requeued job

    for path in runs.iterdir():
        path.unlink()
    submitted = run_submit([*common, "--stages", "select", "tiny.yaml"], work, env).stdout.split()
    _wait_until(lambda: (runs / "started").exists(), 120, "the select job to start")
    slurm.command("scancel", submitted[1])
    states = slurm.wait_for([submitted[1]], timeout=120)
    time.sleep(2)
    logs = "\n".join(p.read_text()[-1500:] for p in (tmp_path / "logs").glob(f"select-{submitted[1]}.out"))
    assert states == {submitted[1]: "CANCELLED"}, (states, logs)
    assert "not requeued" in logs, logs
    assert (runs / "select").read_text().split("\n")[:1] == ["select 0"] and "select 1" not in (runs / "select").read_text()
