#!/usr/bin/env bash
# The committed TPU preflights (docs/preflight.md), resumable: each job writes NAME.json beside
# this script and is skipped when that file exists; a job that fails leaves no JSON and the next
# run tries it again. ResNet-50 compiles take minutes each on a laptop-class CPU (about 12 min
# per train step on 2 loaded cores), so run it in the background:
#
#   nohup nice -n 10 benchmarks/preflight/run.sh [--commit] [NAME...] > /tmp/preflight.out 2>&1 &
#
# --commit: `git commit` each JSON as it finishes (only that file, whatever else is staged).
# NAME...: only these jobs (default: all, in the order below).
# --list: print each job as NAME|ARGUMENTS (of python -m stompp_jax.preflight) and exit.
# PREFLIGHT_OUT: write the JSON there instead (e.g. a checkout other than the one that runs).
# PREFLIGHT_LOGS: where each job's output goes (default /tmp/stompp_preflight_logs).
# Needs libtpu (pip install ".[tpu]", or TPU_LIBRARY_PATH=.../libtpu.so); no TPU.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
OUT=${PREFLIGHT_OUT:-$HERE}
LOGS=${PREFLIGHT_LOGS:-/tmp/stompp_preflight_logs}
R50=configs/imagenet_r50.py
COND=" --config.binary.masks_by=cond"  # The masks' per-site branch (TPU's default is the select).

# NAME|preflight arguments. The headline first: each method on its own, fp before the others;
# the STE-on-frozen variant last (it compiles like StoMPP plus STE's kernel copy). FSDP
# (mesh.shard_params) on v4-8: on v4-32 its compile took more than 23 GB of host memory.
JOBS=(
  "r50_v4-32_fp|--config=$R50 --topology=v4-32 --methods=fp"
  "r50_v4-32_stompp|--config=$R50 --topology=v4-32 --methods=stompp"
  "r50_v4-32_stompp_cond|--config=$R50 --topology=v4-32 --methods=stompp$COND"
  "r50_v5e-256_fp|--config=$R50 --topology=v5e-256 --methods=fp"
  "r50_v5e-256_stompp|--config=$R50 --topology=v5e-256 --methods=stompp"
  "r50_v5e-256_stompp_cond|--config=$R50 --topology=v5e-256 --methods=stompp$COND"
  "r50_v5e-256_stompp_packed|--config=$R50 --topology=v5e-256 --methods=stompp --config.binary.residuals=packed$COND"
  "r50_v4-32_ste|--config=$R50 --topology=v4-32 --methods=ste"
  "r50_v5e-256_ste|--config=$R50 --topology=v5e-256 --methods=ste"
  "r50_v5e-256_fp_max_batch|--config=$R50 --topology=v5e-256 --methods=fp --find_max_batch"
  "r50_v5e-256_stompp_max_batch|--config=$R50 --topology=v5e-256 --methods=stompp --find_max_batch"
  "r50_v5e-256_stompp_max_batch_cond|--config=$R50 --topology=v5e-256 --methods=stompp --find_max_batch$COND"
  "r18_v5e-256_stompp|--config=configs/imagenet.py:model=resnet18 --topology=v5e-256 --methods=fp,stompp$COND"
  "r50_v4-8_stompp|--config=$R50 --topology=v4-8 --methods=stompp --per_chip_batch=16$COND"
  "r50_v4-8_stompp_shard_params|--config=$R50 --topology=v4-8 --methods=stompp --per_chip_batch=16 --config.mesh.shard_params=True$COND"
  "r50_v4-32_stompp_ste|--config=$R50 --topology=v4-32 --methods=stompp_ste"
  "r50_v4-32_stompp_ste_cond|--config=$R50 --topology=v4-32 --methods=stompp_ste$COND"
  "r50_v5e-256_stompp_ste|--config=$R50 --topology=v5e-256 --methods=stompp_ste"
  "r50_v5e-256_stompp_ste_cond|--config=$R50 --topology=v5e-256 --methods=stompp_ste$COND"
)

commit() {  # JSON: commit that file only; waits while another git command holds the index.
  local tries=0
  until [[ ! -e $(git -C "$OUT" rev-parse --git-dir)/index.lock ]] \
      && git -C "$OUT" add "$1" && git -C "$OUT" commit -q -m "Preflight: $(basename "$1" .json)" -- "$1"; do
    tries=$((tries + 1))
    if ((tries > 60)); then echo "run.sh: could not commit $1" >&2; return 1; fi
    sleep 5
  done
}

if [[ ${1:-} == --list ]]; then printf '%s\n' "${JOBS[@]}"; exit 0; fi
COMMIT=0
if [[ ${1:-} == --commit ]]; then COMMIT=1; shift; fi
for name in "$@"; do
  if ! printf '%s\n' "${JOBS[@]}" | grep -q "^$name|"; then
    echo "run.sh: no job named $name: use one of the names that --list prints." >&2
    exit 2
  fi
done
mkdir -p "$OUT" "$LOGS"
for job in "${JOBS[@]}"; do
  name=${job%%|*}
  if (($#)) && [[ " $* " != *" $name "* ]]; then continue; fi
  json=$OUT/$name.json
  if [[ -e $json ]]; then echo "$name: done ($json)"; continue; fi
  echo "$name: started $(date -u +%H:%M:%S), log $LOGS/$name.log"
  # shellcheck disable=SC2086  # The job's arguments split on spaces by design.
  if (cd "$ROOT" && python -m stompp_jax.preflight ${job#*|} --json="$json") > "$LOGS/$name.log" 2>&1; then
    # The code the figures belong to (the binarizers' memory changed with it).
    python - "$json" "$(git -C "$ROOT" rev-parse --short HEAD)" <<'PY'
import json, sys
with open(sys.argv[1]) as f:
  result = json.load(f)
result['code_commit'] = sys.argv[2]
with open(sys.argv[1], 'w') as f:
  json.dump(result, f, indent=1, sort_keys=True)
  f.write('\n')
PY
    echo "$name: finished $(date -u +%H:%M:%S)"
    if ((COMMIT)); then commit "$json"; fi
  else
    echo "$name: failed, see $LOGS/$name.log" >&2
  fi
done
