#!/usr/bin/env bash
# GPU step-time check: fp / ste / stompp train steps of CIFAR ResNet-18 (batch 256) and
# ImageNet-shape ResNet-50 (batch 128) in bfloat16 on one accelerator, and a markdown report.
#
#   bash benchmarks/gpu_prepare.sh                      # here, with PyPI: the wheels it lacks
#   bash benchmarks/gpu_check.sh [--tiny] [OUT_DIR]     # OUT_DIR: $OUT if set, else gpu_check_out
#
# On the lent GPU machine (device run, carry .gpu_carry) it first sources benchmarks/gpu_env.sh:
# the carried wheels installed with --no-index into a fresh target, the machine's own jax.
# At most about 8 minutes: each model runs in its own process (so the device's peak memory is
# that model's) under a timeout; benchmarks/step_time.py times the compile apart from the steps
# and prints step times, ratios, compile times, XLA step memory, the device's peak memory and
# the target verdicts (ste / stompp against fp: step <= 1.05, compile <= 1.3x, memory <= 1.10x).
# Writes OUT_DIR/report.md, OUT_DIR/<model>.log and OUT_DIR/<model>.json; exits 1 if a model
# failed or timed out, or (without --tiny) if JAX finds no GPU.
# --tiny (or GPU_CHECK_TINY=1): tiny_resnet at batch 4 and 2, 2 x 1 steps, on any backend (CPU
# included): proves the script end to end (tests/test_benchmarks.py runs it).
# ResNet-18 runs StoMPP twice, stompp@cond and stompp@select: the masks by the per-site lax.cond
# and by a plain select (binary.masks_by; the same masks; select is the GPU's default), to
# compare the two.
# Env overrides: R18_BATCH (256), R50_BATCH (128), REPS (5), STEPS (10), METHODS (both models'
# step_time.py --methods; default fp,ste,stompp@cond,stompp@select for ResNet-18, fp,ste,stompp for
# ResNet-50 and for --tiny).
set -uo pipefail

tiny="${GPU_CHECK_TINY:-0}"
if [ "${1:-}" = "--tiny" ]; then
  tiny=1
  shift
fi
out_dir="$(realpath -m "${1:-${OUT:-gpu_check_out}}")"
cd "$(dirname "$0")/.." || exit 1
mkdir -p "$out_dir"
if [ "$tiny" != 1 ] && [ -d .gpu_carry/wheels ]; then
  # shellcheck disable=SC1091  # benchmarks/gpu_env.sh is checked on its own.
  source benchmarks/gpu_env.sh || exit 1
fi
report="$out_dir/report.md"
if [ "$tiny" = 1 ]; then
  first="tiny_resnet:4"
  second="tiny_resnet:2"
  reps=2
  steps=1
  warmup=1
  limits=(900 900)  # A loaded CPU compiles slowly; the 8 minutes are for the GPU run.
  methods=("${METHODS:-fp,ste,stompp}" "${METHODS:-fp,ste,stompp}")
else
  first="resnet18:${R18_BATCH:-256}"
  second="resnet50:${R50_BATCH:-128}"
  reps="${REPS:-5}"
  steps="${STEPS:-10}"
  warmup=3
  limits=(180 270)
  methods=("${METHODS:-fp,ste,stompp@cond,stompp@select}" "${METHODS:-fp,ste,stompp}")
fi

backend="$(timeout 60 python -c 'import jax; print(jax.default_backend())' 2>/dev/null || echo none)"
{
  echo "# GPU step-time check"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'), commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- JAX backend: $backend"
  echo "- GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'nvidia-smi not available')"
  echo "- command: bash benchmarks/gpu_check.sh$([ "$tiny" = 1 ] && echo ' --tiny') (bfloat16; $first: ${methods[0]}; $second: ${methods[1]}; reps $reps x $steps steps)"
  echo
} > "$report"

if [ "$tiny" != 1 ] && [ "$backend" != "gpu" ] && [ "$backend" != "cuda" ] && [ "$backend" != "rocm" ]; then
  echo "No GPU backend (JAX reports '$backend'): nothing measured." | tee -a "$report"
  exit 1
fi

status=0
run_model() {  # run_model NAME:BATCH TIMEOUT_SECONDS METHODS
  local spec="$1" limit="$2" log="$out_dir/${1%%:*}_${1##*:}"
  echo "== $spec (timeout ${limit}s)"
  if timeout "$limit" python benchmarks/step_time.py --models="$spec" --methods="$3" \
      --dtype=bfloat16 --reps="$reps" --steps="$steps" --warmup="$warmup" \
      --json="$log.json" > "$log.log" 2>&1; then
    {
      echo "## $spec"
      echo
      grep -E '^(backend|\||(ste|stompp|stompp_ste)(@[a-z]+)? / fp|process-wide)' "$log.log"
      echo
    } >> "$report"
  else
    status=1
    {
      echo "## $spec: FAILED or timed out after ${limit}s; last lines of $log.log:"
      echo
      echo '```'
      tail -n 15 "$log.log"
      echo '```'
      echo
    } >> "$report"
  fi
}

run_model "$first" "${limits[0]}" "${methods[0]}"
run_model "$second" "${limits[1]}" "${methods[1]}"
cat "$report"
exit "$status"
