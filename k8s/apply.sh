#!/usr/bin/env bash
# Run a rendered reid-batch job on Kubernetes: apply the files `reid-batch k8s MANIFEST --out DIR` wrote, in
# order, waiting for each Job to complete before the next (Kubernetes has no dependencies between Jobs).
#
#   k8s/apply.sh DIR [--from JOB] [--timeout SECONDS]      (kubectl's current context and namespace)
#
# Stops at the first Job that fails (exit 1). Re-running is safe: completed stages are committed and skipped;
# --from JOB (e.g. sample) starts there, after deleting that Job and the later ones so they run afresh.
set -euo pipefail

usage() { sed -n '2,8p' "$0"; }
dir="" from="" timeout=$((7 * 24 * 3600))
while [[ $# -gt 0 ]]; do
    case "$1" in
        --from) from=$2; shift 2 ;;
        --timeout) timeout=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "k8s/apply.sh: unknown option $1" >&2; exit 2 ;;
        *) dir=$1; shift ;;
    esac
done
[[ -n $dir && -d $dir ]] || { usage >&2; exit 2; }
kubectl=${KUBECTL:-kubectl}
poll=${REID_BATCH_POLL_SECONDS:-20}

job_status() {  # prints Complete, Failed or nothing
    "$kubectl" get -f "$1" -o jsonpath='{range .status.conditions[?(@.status=="True")]}{.type}{"\n"}{end}' |
        grep -E '^(Complete|Failed)$' | head -n 1 || true
}

unschedulable() {  # "pod: scheduler message" for each pod of the file's Job that the scheduler cannot place
    local name
    name=$("$kubectl" get -f "$1" -o jsonpath='{.metadata.name}' 2>/dev/null) || return 0
    "$kubectl" get pods -l "job-name=$name" -o jsonpath='{range .items[*]}{.metadata.name}{"\t"}{.status.conditions[?(@.type=="PodScheduled")].reason}{"\t"}{.status.conditions[?(@.type=="PodScheduled")].message}{"\n"}{end}' 2>/dev/null |
        awk -F'\t' '$2 == "Unschedulable" {print $1 ": " $3}' || true
}

started=0
[[ -n $from ]] || started=1
shopt -s nullglob
files=("$dir"/[0-9][0-9]-*.yaml)
[[ ${#files[@]} -gt 0 ]] || { echo "k8s/apply.sh: no rendered files in $dir" >&2; exit 2; }
for file in "${files[@]}"; do
    name=$(basename "$file" .yaml)
    job=${name#[0-9][0-9]-}
    if [[ $job == manifest ]]; then
        "$kubectl" apply -f "$file"
        continue
    fi
    if (( ! started )); then
        [[ $job == "$from" ]] || continue
        started=1
    fi
    if [[ -n $from ]]; then
        "$kubectl" delete --ignore-not-found -f "$file"
    fi
    "$kubectl" apply -f "$file"
    deadline=$((SECONDS + timeout)) reported=""
    while :; do
        status=$(job_status "$file")
        if [[ -z $status ]]; then
            # A pod that no node can take (a taint without a toleration, no GPU node, a quota) waits forever
            # without failing: say so, once per new scheduler message, rather than poll in silence for days.
            pending=$(unschedulable "$file")
            if [[ -n $pending && $pending != "$reported" ]]; then
                echo "k8s/apply.sh: $job: pods cannot be scheduled (see reid-batch k8s --node-selector," \
                     "--toleration, --runtime-class, and the namespace's GPU quota):" >&2
                while IFS= read -r line; do echo "  $line"; done <<<"$pending" >&2
                reported=$pending
            fi
        fi
        [[ $status == Complete ]] && { echo "k8s/apply.sh: $job complete"; break; }
        [[ $status == Failed ]] && { echo "k8s/apply.sh: $job failed; see: $kubectl describe -f $file" >&2; exit 1; }
        (( SECONDS < deadline )) || { echo "k8s/apply.sh: $job still running after ${timeout}s" >&2; exit 1; }
        sleep "$poll"
    done
done
(( started )) || { echo "k8s/apply.sh: no job named $from in $dir" >&2; exit 2; }
