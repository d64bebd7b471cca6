#!/usr/bin/env bash
# Training on the GPUs of one machine.
#
#   launch/gpu_local.sh --config=configs/cifar10_r18.py --workdir=runs/r18
#   GPUS=0,1 launch/gpu_local.sh --config=... --workdir=...        # only GPUs 0 and 1
#   launch/gpu_local.sh --process-per-gpu --config=... --workdir=...
#
# By default one process drives every visible GPU: the normal way for JAX on one machine, and the
# fastest. --process-per-gpu starts one process per GPU that find each other through
# STOMPP_COORDINATOR_ADDRESS / STOMPP_NUM_PROCESSES / STOMPP_PROCESS_ID, the multi-host code path
# on one machine: a way to test it without a cluster. Its output lines start with [process N].
#
# Environment: GPUS (comma-separated GPU indices, as in CUDA_VISIBLE_DEVICES; default all),
# PYTHON (default python), COORDINATOR_PORT (default 12355, --process-per-gpu only).
set -euo pipefail

die() {
  echo "gpu_local.sh: $*" >&2
  exit 2
}
per_gpu=false
if [[ ${1:-} == --process-per-gpu ]]; then
  per_gpu=true
  shift
fi
(($#)) || die "usage: launch/gpu_local.sh [--process-per-gpu] --config=... --workdir=DIR [--config.a.b=v ...]"
[[ -d stompp_jax ]] || die "run it from the repository root (configs/ and stompp_jax/ are relative to it)"
python=${PYTHON:-python}

if ! $per_gpu; then
  if [[ -n ${GPUS:-} ]]; then
    export CUDA_VISIBLE_DEVICES=$GPUS
  fi
  exec "$python" -m stompp_jax.main "$@"
fi

IFS=, read -r -a gpus <<<"${GPUS:-$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd,)}"
((${#gpus[@]})) || die "no GPUs found by nvidia-smi; list them in GPUS, e.g. GPUS=0,1"
export STOMPP_COORDINATOR_ADDRESS=127.0.0.1:${COORDINATOR_PORT:-12355}
export STOMPP_NUM_PROCESSES=${#gpus[@]}
export PYTHONUNBUFFERED=1
pids=()
for i in "${!gpus[@]}"; do
  CUDA_VISIBLE_DEVICES=${gpus[i]} STOMPP_PROCESS_ID=$i "$python" -m stompp_jax.main "$@" 2>&1 |
    sed -u "s/^/[process $i] /" &
  pids+=("$!")
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
