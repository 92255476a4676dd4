#!/usr/bin/env bash
# One prepared GPU benchmark (a few minutes on one H100): sampling at the study's sizes -- the full-size 1024 px
# PGGAN with a ResNet18 and a ViT-B/16 target at 224 px, bf16 autocast, channels_last, batch `auto` (the largest
# that fits) -- each measured against the study's way (batch 8, fp32, autograd on, one forward per term). Random
# weights (no checkpoints needed; same FLOPs). Then per target the ppa attack's per-sample latent optimisation
# (PPA_STEPS steps of PPA_BATCH latents together against PPA_ALONE of them one by one), and stage 1's fine-tuning
# step time per target on 1 GPU and on all of them (FT_PROCS processes under torchrun: the scaling). Writes one
# JSON per run and prints a summary.
#
#   bench/gpu.sh [OUT_DIR]                  # default OUT_DIR: bench-results/gpu-<date>
#
# Environment (defaults in brackets): PYTHON [python], DEVICE [cuda], MANIFEST [manifests/bench-full.yaml],
# TARGETS ["resnet18 vit-b16"], BATCH_SIZE [auto], BATCHES [10], BASELINE_BATCHES [4], COMPILE [0: also a
# torch.compile'd run when 1], PPA_BATCH [64], PPA_STEPS [10], PPA_ALONE [4], FT_STEPS [5], FT_PROCS [the GPUs
# nvidia-smi lists]. A CPU dry run with tiny models checks the script:
#   DEVICE=cpu MANIFEST=tiny.yaml TARGETS="cnn vit" BATCH_SIZE=8 BATCHES=1 BASELINE_BATCHES=1 PPA_BATCH=4 \
#     PPA_STEPS=1 PPA_ALONE=1 FT_STEPS=1 FT_PROCS=2 bench/gpu.sh /tmp/x
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench-results/gpu-$(date -u +%Y%m%dT%H%M%SZ)}
PYTHON=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}
MANIFEST=${MANIFEST:-manifests/bench-full.yaml}
TARGETS=${TARGETS:-resnet18 vit-b16}
BATCH_SIZE=${BATCH_SIZE:-auto}
BATCHES=${BATCHES:-10}
BASELINE_BATCHES=${BASELINE_BATCHES:-4}
COMPILE=${COMPILE:-0}
PPA_BATCH=${PPA_BATCH:-64}
PPA_STEPS=${PPA_STEPS:-10}
PPA_ALONE=${PPA_ALONE:-4}
FT_STEPS=${FT_STEPS:-5}
FT_PROCS=${FT_PROCS:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}
(( FT_PROCS >= 1 )) || FT_PROCS=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true; fi

run() {  # run NAME ARGS...
  local name=$1; shift
  echo "== $name" >&2
  "$PYTHON" -m reid_batch bench "$MANIFEST" --stage sample --device "$DEVICE" --batch-size "$BATCH_SIZE" \
    --batches "$BATCHES" --baseline-batches "$BASELINE_BATCHES" --json "$OUT/$name.json" "$@" 2> "$OUT/$name.log"
}

for target in $TARGETS; do
  run "sample-$target" --target "$target"
  if [ "$COMPILE" = 1 ]; then run "sample-$target-compiled" --target "$target" --compile --no-baseline; fi
done
for target in $TARGETS; do
  echo "== ppa-$target" >&2
  "$PYTHON" -m reid_batch bench "$MANIFEST" --stage ppa --device "$DEVICE" --target "$target" --batch-size "$PPA_BATCH" \
    --steps "$PPA_STEPS" --baseline-batches "$PPA_ALONE" --json "$OUT/ppa-$target.json" 2> "$OUT/ppa-$target.log"
done
for target in $TARGETS; do
  echo "== finetune-$target" >&2
  "$PYTHON" -m reid_batch bench "$MANIFEST" --stage finetune --device "$DEVICE" --target "$target" --steps "$FT_STEPS" \
    --json "$OUT/finetune-$target-1.json" 2> "$OUT/finetune-$target-1.log"
  if (( FT_PROCS > 1 )); then
    # On a CPU (the dry run) Accelerate needs telling that the processes are CPU ones (gloo).
    if [ "$DEVICE" = cpu ]; then export ACCELERATE_USE_CPU=true; fi
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$FT_PROCS" -m reid_batch bench "$MANIFEST" \
      --stage finetune --device "$DEVICE" --target "$target" --steps "$FT_STEPS" \
      --json "$OUT/finetune-$target-$FT_PROCS.json" 2> "$OUT/finetune-$target-$FT_PROCS.log"
  fi
done
"$PYTHON" - "$OUT" <<'PY'
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    r = json.loads(path.read_text())
    if r["stage"] == "finetune":
        print(f"{path.stem}: {r['processes']} process(es), {r['seconds_per_step']:.3f} s/step, "
              f"{r['images_per_second']:.1f} images/s (global batch {r['batch_size']})")
        continue
    if r["stage"] == "ppa":
        print(f"{path.stem}: {r['latent_steps_per_second']:.1f} latent-steps/s (batch {r['fast']['batch_size']}), "
              f"MFU {100 * r['mfu']:.1f}%, one by one {r['baseline']['latent_steps_per_second']:.1f}/s, "
              f"speed-up {r['speedup']:.1f}x")
        continue
    line = (f"{path.stem}: {r['candidates_per_second']:.1f} candidates/s (batch {r['fast']['batch_size']}, "
            f"{r['mixed_precision']}), MFU {100 * r['mfu']:.1f}% of {r['peak']['flops_per_second'] / 1e9:.0f} GFLOP/s ({r['peak']['dtype']} matmul)")
    if "baseline" in r:
        line += f", baseline {r['baseline']['items_per_second']:.1f}/s, speed-up {r['speedup']:.1f}x"
    print(line)
PY
