#!/usr/bin/env bash
# Submit the whole reid-batch pipeline for one job manifest as dependent Slurm jobs:
#
#   prepare       make-phantoms, train-prior, train-reid, train-demographics (one job, in sequence)
#   train-target  array over the manifest's targets: train-target, mahalanobis-reference
#   finetune      array over the targets; each task: srun + accelerate launch over --finetune-nodes x
#                 --finetune-gpus-per-node processes
#   sample        array over targets x sampling.num_shards  (target = index / num_shards, shard = index % num_shards)
#   select        one CPU job
#   score         array over demographics.num_shards         (shard = SLURM_ARRAY_TASK_ID)
#   report        evaluate, calibrate, report (one job, in sequence)
#
# Targets are independent: an array over targets trains and fine-tunes all of them at once. Each task's stage gets
# `--array-over targets|target-shards` and maps SLURM_ARRAY_TASK_ID through the manifest's target order. The job
# list, task counts and those arguments come from `reid-batch plan --format shell` (the stage registry).
#
# each `afterok` the one before, with --kill-on-invalid-dep=yes so a failure cancels what depends on it instead
# of leaving it pending forever. Committed outputs are never redone, so re-submitting is always safe; to finish
# a run after array tasks failed, re-submit only those tasks and what follows:
#
#   slurm/submit.sh --from sample --array 3,7 MANIFEST
#
# Pre-emption: Slurm sends SIGTERM first; reid-batch commits what it finished and exits 75. Jobs are submitted
# with --requeue (Slurm's PreemptMode=REQUEUE and node failures requeue them), and a job signalled while still
# running (`scancel --signal=TERM --full JOB`) requeues itself, at most --max-requeues times; the requeued job
# resumes from the commits and its dependants keep waiting. A plain scancel or a time limit ends the job.
#
# Run `slurm/submit.sh --help` for the options. Prints one line per job: `<job> <job id> <stages>`.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: slurm/submit.sh [options] MANIFEST

Where the code comes from (default: `reid-batch` and `accelerate` on PATH):
  --container IMAGE        run every stage inside IMAGE (.sif or docker://...) with apptainer/singularity exec
  --runtime NAME           apptainer or singularity (default: whichever is installed)
  --bind SPEC              extra container bind, e.g. /data:/data:ro (repeatable; the working directory is bound)
  --venv DIR               activate the virtual environment DIR in each job
  --setup COMMAND          shell line run first in each job (e.g. 'module load cuda/12.8')
  --reid-batch COMMAND     the command that runs reid-batch, split into words (default: reid-batch)

Resources (defaults in brackets; sbatch's own SBATCH_* environment variables also apply):
  --partition NAME         [cluster default]         --account NAME    [cluster default]
  --qos NAME               [cluster default]         --cpus N          cpus per task [8]
  --mem SIZE               memory per job [32G]      --parallel N      array tasks at once [16]
  --gpus N                 GPUs per GPU job, 0 or 1 [0 if the manifest's compute.device is cpu, else 1]:
                           each task runs one process; more GPUs go to more shards or to fine-tuning
  --finetune-nodes N       nodes for finetune [1]
  --finetune-gpus-per-node N   GPUs per finetune node, one process each [--gpus]
  --finetune-processes-per-node N   processes per finetune node [its GPUs, or 1 without GPUs]
  --time T                 time limit of every job [24:00:00]; --time JOB=T for one job (repeatable)
  --max-requeues N         a job pre-empted with SIGTERM (reid-batch exit 75) requeues itself at most N times [3]
  --sbatch-arg ARG         extra sbatch argument for every job (repeatable)

What to submit:
  --stages LIST            comma-separated stages to run (default: all)
  --from JOB               start at prepare|train-target|finetune|sample|select|score|report
  --array IDS              task ids of the first array job submitted (re-submit failed tasks), e.g. 3,7
                           (train-target, finetune: target index; sample: target index x num_shards + shard)
  --after JOB_ID           the first job waits for this job (afterok)
  --logs DIR               job scripts and logs [slurm-logs/<run_id>]
  --dry-run                write the job scripts and print the sbatch commands; submit nothing
EOF
}

die() { echo "slurm/submit.sh: $*" >&2; exit 2; }

container="" runtime="" venv="" setup="" reid_batch="reid-batch"
partition="" account="" qos="" cpus=8 mem=32G parallel=16 gpus="" ft_nodes=1 ft_gpus="" ft_procs=""
default_time=24:00:00 max_requeues=3 stages="" from="" array_ids="" after="" logs="" dry_run=0
binds=() extra=()
declare -A times=()

while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --container) container=$2; shift 2 ;;
        --runtime) runtime=$2; shift 2 ;;
        --bind) binds+=("$2"); shift 2 ;;
        --venv) venv=$2; shift 2 ;;
        --setup) setup=$2; shift 2 ;;
        --reid-batch) reid_batch=$2; shift 2 ;;
        --partition) partition=$2; shift 2 ;;
        --account) account=$2; shift 2 ;;
        --qos) qos=$2; shift 2 ;;
        --cpus) cpus=$2; shift 2 ;;
        --mem) mem=$2; shift 2 ;;
        --parallel) parallel=$2; shift 2 ;;
        --gpus) gpus=$2; shift 2 ;;
        --finetune-nodes) ft_nodes=$2; shift 2 ;;
        --finetune-gpus-per-node) ft_gpus=$2; shift 2 ;;
        --finetune-processes-per-node) ft_procs=$2; shift 2 ;;
        --time)
            if [[ $2 == *=* ]]; then times[${2%%=*}]=${2#*=}; else default_time=$2; fi
            shift 2 ;;
        --max-requeues) max_requeues=$2; shift 2 ;;
        --sbatch-arg) extra+=("$2"); shift 2 ;;
        --stages) stages=$2; shift 2 ;;
        --from) from=$2; shift 2 ;;
        --array) array_ids=$2; shift 2 ;;
        --after) after=$2; shift 2 ;;
        --logs) logs=$2; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        --) shift; break ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) break ;;
    esac
done
[[ $# -eq 1 ]] || { usage >&2; exit 2; }
manifest=$1
[[ -f $manifest ]] || die "manifest not found: $manifest"
for number in "$cpus" "$parallel" "$ft_nodes" "$max_requeues" ${gpus:+"$gpus"} ${ft_gpus:+"$ft_gpus"} ${ft_procs:+"$ft_procs"}; do
    [[ $number =~ ^[0-9]+$ ]] || die "not a number: $number"
done
[[ -z $array_ids || $array_ids =~ ^[0-9,-]+(%[0-9]+)?$ ]] || die "--array wants ids like 3,7 or 0-9: $array_ids"

# The command prefix every stage runs under: a container runtime, or nothing (venv / PATH).
prefix=()
if [[ -n $container ]]; then
    if [[ -z $runtime ]]; then
        runtime=$(command -v apptainer || command -v singularity || true)
        [[ -n $runtime ]] || die "--container needs apptainer or singularity on PATH (or --runtime)"
        runtime=$(basename "$runtime")
    fi
    prefix=(--bind "$PWD")
    for bind in "${binds[@]}"; do prefix+=(--bind "$bind"); done
    prefix=("$runtime" exec "${prefix[@]}" --pwd "$PWD" "$container")
fi

# Everything this script needs from the manifest (validated here, before anything is submitted).
summary=$(
    # shellcheck disable=SC1091
    [[ -z $venv ]] || source "$venv/bin/activate"
    [[ -z $setup ]] || eval "$setup"
    # shellcheck disable=SC2086 # the command may be several words, as it is in the job scripts
    "${prefix[@]}" $reid_batch plan "$manifest" --format shell
) || die "reid-batch could not read $manifest (see above)"
declare -A info=()
while IFS='=' read -r key value; do
    [[ -n $key ]] && info[$key]=$(eval "printf '%s' $value")  # values are shlex-quoted by reid-batch
done <<<"$summary"
run_id=${info[run_id]}
for job in "${!times[@]}"; do
    [[ " ${info[jobs]} " == *" $job "* ]] || die "--time: unknown job $job (jobs: ${info[jobs]})"
done
gpus=${gpus:-${info[gpus]}}
# One process per array task and per serial job: a second GPU there would sit idle for the whole run.
(( gpus <= 1 )) || die "--gpus $gpus: sample, score and the serial jobs run one process on one GPU; for more GPUs \
raise sampling.num_shards / demographics.num_shards (one GPU per array task), and give fine-tuning \
--finetune-gpus-per-node"
ft_gpus=${ft_gpus:-$gpus}
ft_procs_per_node=${ft_procs:-$(( ft_gpus > 0 ? ft_gpus : 1 ))}
(( ft_procs_per_node > 0 && ft_nodes > 0 )) || die "finetune needs at least one node and one process per node"
if [[ -n $container ]] && (( gpus > 0 || ft_gpus > 0 )); then
    prefix=("${prefix[0]}" exec --nv "${prefix[@]:2}")
fi
logs=${logs:-slurm-logs/$run_id}
mkdir -p "$logs/jobs"
logs=$(cd "$logs" && pwd)

# Each job's script: the environment lines, then the stages.
q() { printf '%q' "$1"; }
prelude() {
    echo '#!/usr/bin/env bash'
    echo "# written by slurm/submit.sh for run $run_id"
    echo 'set -euo pipefail'
    [[ -z $venv ]] || echo "source $(q "$venv")/bin/activate"
    [[ -z $setup ]] || echo "$setup"
    echo "echo \"reid-batch: job \$SLURM_JOB_ID \${SLURM_ARRAY_TASK_ID:+task \$SLURM_ARRAY_TASK_ID }on \$(hostname)\" >&2"
    echo "max_requeues=$max_requeues"
    cat <<'EOF'
# A SIGTERM that leaves the job RUNNING (`scancel --signal=TERM --full`, a node agent) reaches reid-batch too: it
# commits what it finished and exits 75 (a launcher may turn that into 1, so any failure after a SIGTERM counts).
# The job then requeues itself, at most max_requeues times; the new run resumes from the commits and afterok
# dependants keep waiting. A job Slurm itself ends (scancel, time limit) is not requeued here.
terminated=0
trap 'terminated=1' TERM
requeue_if_preempted() {
    local code=$? id=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
    id=${id:-${SLURM_JOB_ID:-}}
    (( code == 75 || (code != 0 && terminated) )) && [[ -n $id ]] || return 0
    local state
    state=$(squeue -h -j "$id" -o %T 2>/dev/null || true)
    if [[ $state != RUNNING ]]; then  # ended by Slurm: scancel, time limit, or pre-emption (REQUEUE mode requeues)
        echo "reid-batch: job $id is ${state:-gone}, ended by Slurm: not requeued here" >&2
    elif (( ${SLURM_RESTART_COUNT:-0} >= max_requeues )); then
        echo "reid-batch: job $id was requeued $max_requeues times already: not requeued" >&2
    elif scontrol requeue "$id"; then
        echo "reid-batch: pre-empted; job $id requeued, it resumes from what was committed" >&2
    fi
}
trap requeue_if_preempted EXIT
EOF
}
prefix_words() { local w; for w in "${prefix[@]}"; do printf '%q ' "$w"; done; }
# $2: what an array task adds to take its part from its index (`--array-over targets`), from the plan.
stage_line() { echo "$(prefix_words)$reid_batch $1 $(q "$manifest")${2:+ $2}"; }

finetune_script() {
    local multi=""
    if (( ft_nodes * ft_procs_per_node > 1 )); then multi="--multi_gpu "; fi
    # One launcher per node. The single quotes keep $SLURM_NODEID & co. for each node's own shell to expand;
    # the head node and port are the same for every node, so they are fixed here and passed as arguments.
    # srun gets the job's --cpus-per-task explicitly: Slurm 22.05-23.02 do not pass sbatch's on to srun, and each
    # node's launcher (and its data loaders) would get one CPU.
    cat <<EOF
head_node=\$(scontrol show hostnames "\$SLURM_JOB_NODELIST" | head -n 1)
port=\$(( 10000 + SLURM_JOB_ID % 20000 ))  # 10000-29999: below Linux's ephemeral ports (32768-60999)
srun --nodes="\$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \${SLURM_CPUS_PER_TASK:+--cpus-per-task=\$SLURM_CPUS_PER_TASK} bash -c '
    exec $(prefix_words)accelerate launch ${multi}--num_machines "\$SLURM_NNODES" --machine_rank "\$SLURM_NODEID" \\
        --main_process_ip "\$1" --main_process_port "\$2" --num_processes \$(( SLURM_NNODES * \$3 )) \\
        --mixed_precision "\$4" --dynamo_backend no -m reid_batch finetune "\$5" ${info[finetune_stage_args]}
' finetune "\$head_node" "\$port" $ft_procs_per_node $(q "${info[finetune_mixed_precision]}") $(q "$manifest")
EOF
}

job_stages() {  # the stages of a job (from the stage registry, through `reid-batch plan`), filtered by --stages
    local stage
    for stage in ${info[${1}_stages]}; do
        if [[ -z $stages || ",$stages," == *",$stage,"* ]]; then printf '%s ' "$stage"; fi
    done
}

read -ra jobs <<<"${info[jobs]}"
if [[ -n $from ]]; then
    found=0
    for i in "${!jobs[@]}"; do [[ ${jobs[$i]} == "$from" ]] && { jobs=("${jobs[@]:$i}"); found=1; break; }; done
    (( found )) || die "--from: unknown job $from"
fi
if [[ -n $stages ]]; then
    IFS=',' read -ra wanted <<<"$stages"
    for stage in "${wanted[@]}"; do
        [[ " ${info[stages]} " == *" $stage "* ]] || die "--stages: unknown stage $stage"
    done
fi

if [[ -n $array_ids ]]; then
    array_jobs=""
    for job in "${jobs[@]}"; do
        if [[ -n ${info[${job}_tasks]} && -n $(job_stages "$job") ]]; then array_jobs+=$job; fi
    done
    [[ -n $array_jobs ]] || die "--array given but no array job (train-target, finetune, sample, score) is submitted"
fi

previous=$after
array_used=0
for job in "${jobs[@]}"; do
    chosen=$(job_stages "$job")
    [[ -n $chosen ]] || continue
    script="$logs/jobs/$job.sh"
    args=(--parsable --job-name="reid-$run_id-$job" --chdir="$PWD" --cpus-per-task="$cpus" --mem="$mem"
          --time="${times[$job]:-$default_time}")
    [[ -z $partition ]] || args+=(--partition="$partition")
    [[ -z $account ]] || args+=(--account="$account")
    [[ -z $qos ]] || args+=(--qos="$qos")
    tasks=${info[${job}_tasks]}  # empty: not an array job
    if [[ -n $tasks ]]; then
        if [[ -n $array_ids && $array_used == 0 ]]; then
            ids=$array_ids
            array_used=1
        else
            ids="0-$(( tasks - 1 ))"
        fi
        [[ $ids == *%* ]] || ids="$ids%$parallel"
        args+=(--array="$ids" --output="$logs/$job-%A_%a.out")
    else
        args+=(--output="$logs/$job-%j.out")
    fi
    case $job in
        finetune)
            args+=(--nodes="$ft_nodes" --ntasks-per-node=1)
            if (( ft_gpus > 0 )); then args+=(--gpus-per-node="$ft_gpus"); fi
            ;;
        select)
            ;;
        *)
            if (( gpus > 0 )); then args+=(--gpus-per-task="$gpus"); fi
            ;;
    esac
    [[ -z $previous ]] || args+=(--dependency="afterok:$previous" --kill-on-invalid-dep=yes)
    (( max_requeues == 0 )) || args+=(--requeue --open-mode=append)  # a requeued run keeps the first one's log
    args+=("${extra[@]}")
    {
        prelude
        if [[ $job == finetune ]]; then finetune_script
        else for stage in $chosen; do stage_line "$stage" "${info[${job}_stage_args]}"; done
        fi
    } >"$script"
    chmod +x "$script"
    if (( dry_run )); then
        printf 'sbatch'; printf ' %q' "${args[@]}" "$script"; printf '\n'
        id="<$job>"
    else
        id=$(sbatch "${args[@]}" "$script") || die "sbatch failed for $job"
        id=${id%%;*}
        echo "$job $id ${chosen% }"
    fi
    previous=$id
done
exit 0
