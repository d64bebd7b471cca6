#!/usr/bin/env bash
# GPU step-time check (issue 8): fp / ste / stompp train steps of CIFAR ResNet-18 and
# ImageNet-shape ResNet-50 in bfloat16 on one accelerator, with a small markdown report.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # OUT_DIR: $OUT if set, else gpu_check_out
#
# At most about 8 minutes: each model runs in its own process (so the device's peak memory is
# that model's) under a timeout; compile time is measured apart from the step time by
# benchmarks/step_time.py. Writes OUT_DIR/report.md, OUT_DIR/<model>.log and OUT_DIR/<model>.json.
# Targets: stompp / fp <= 1.10 and stompp / ste <= 1.05 (paired ratios) on GPU.
# Env overrides: R18_BATCH (256), R50_BATCH (128), REPS (5), STEPS (10).
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
out_dir="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$out_dir"
report="$out_dir/report.md"
r18_batch="${R18_BATCH:-256}"
r50_batch="${R50_BATCH:-128}"
reps="${REPS:-5}"
steps="${STEPS:-10}"

backend="$(timeout 60 python -c 'import jax; print(jax.default_backend())' 2>/dev/null || echo none)"
{
  echo "# GPU step-time check"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'), commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- JAX backend: $backend"
  echo "- GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'nvidia-smi not available')"
  echo "- command: bash benchmarks/gpu_check.sh (bfloat16; batch ResNet-18 $r18_batch, ResNet-50 $r50_batch; reps $reps x $steps steps)"
  echo
} > "$report"

if [ "$backend" != "gpu" ] && [ "$backend" != "cuda" ] && [ "$backend" != "rocm" ]; then
  echo "No GPU backend (JAX reports '$backend'): nothing measured." | tee -a "$report"
  exit 1
fi

status=0
run_model() {  # run_model NAME:BATCH TIMEOUT_SECONDS
  local spec="$1" limit="$2" name="${1%%:*}"
  echo "== $spec (timeout ${limit}s)"
  if timeout "$limit" python benchmarks/step_time.py --models="$spec" --methods=fp,ste,stompp \
      --dtype=bfloat16 --reps="$reps" --steps="$steps" --warmup=3 \
      --json="$out_dir/$name.json" > "$out_dir/$name.log" 2>&1; then
    {
      echo "## $spec"
      echo
      grep -E '^(backend|\||stompp /|process-wide)' "$out_dir/$name.log"
      echo
    } >> "$report"
  else
    status=1
    {
      echo "## $spec: FAILED or timed out after ${limit}s; last lines of $name.log:"
      echo
      echo '```'
      tail -n 15 "$out_dir/$name.log"
      echo '```'
      echo
    } >> "$report"
  fi
}

run_model "resnet18:$r18_batch" 180
run_model "resnet50:$r50_batch" 270
cat "$report"
exit "$status"
