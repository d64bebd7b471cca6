#!/usr/bin/env bash
# The equal-epochs study's binarized cells on the lent GPU machine, as one prepared command.
#
#   bash benchmarks/gpu_prepare.sh --data=~/stompp_data/cifar10_16     # here, with PyPI
#   bash benchmarks/gpu_study.sh "$OUT"          # there (device run, carry .gpu_carry)
#   bash benchmarks/gpu_study.sh OUT_DIR --tiny  # CPU smoke test: tiny ResNet, synthetic data
#
# On the GPU machine it first sources benchmarks/gpu_env.sh (the carried wheels, installed with
# --no-index into a fresh target; the machine's own jax). Cells, most decisive first: ResNet-56
# layerwise, STE and reverse, then ResNet-20 layerwise and STE (benchmarks/study.py's recipe:
# 10 epochs of 16x16 CIFAR-10 (JPEG copy), batch 128); a cell's seeds train as parallel processes
# on the one GPU, and each cell runs under its own timeout, so that the command ends inside
# GPU_STUDY_BUDGET_S seconds (default 540; a device command may run 600). Prints each run's step
# time after 50 steps and the cell's wall time. Writes OUT_DIR/summaries.tar.gz (one JSON per
# finished run; device commands bring back at most 8 files) and OUT_DIR/log.txt. GPU summaries go
# to their own folder (docs/results/equal_epochs_gpu/): no decision mixes GPU and CPU runs.
set -uo pipefail
out="$(realpath -m "${1:?usage: bash benchmarks/gpu_study.sh OUT_DIR [--tiny]}")"
cd "$(dirname "$0")/.." || exit 1
budget="${GPU_STUDY_BUDGET_S:-540}"
start=$(date +%s)
mkdir -p "$out/logs" "$out/summaries"
log="$out/log.txt"
if [[ "${2:-}" == "--tiny" ]]; then
  seeds="0 1"
  flags=(--models=tiny_resnet --data=synthetic --epochs=4 --batch=16 --eval_batch=16
         --recalibrate=2 --evals=2 --seeds=2 --compile_cache=)
  cells=("tiny_resnet stompp layerwise" "tiny_resnet ste layerwise")
else
  if [[ -d .gpu_carry/wheels ]]; then
    # shellcheck disable=SC1091  # benchmarks/gpu_env.sh is checked on its own.
    source benchmarks/gpu_env.sh || exit 1
  fi
  seeds="0 1 2"
  flags=(--data_dir="${STOMPP_STUDY_DATA:?no 16x16 data: run benchmarks/gpu_prepare.sh --data=DIR16 here first}"
         --seeds=3 --machine="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)")
  cells=("resnet56 stompp layerwise" "resnet56 ste layerwise" "resnet56 stompp reverse"
         "resnet20 stompp layerwise" "resnet20 ste layerwise")
fi
flags+=(--readings=binarized --out="$out/runs" --summaries="$out/summaries")
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # Seeds share the GPU: each takes what it uses.

for cell in "${cells[@]}"; do
  read -r model method order <<< "$cell"
  left=$(( budget - ($(date +%s) - start) ))
  if (( left < 60 )); then
    echo "budget of $budget s spent: $cell and later cells not started" | tee -a "$log"
    continue
  fi
  cell_start=$(date +%s)
  pids=()
  for seed in $seeds; do
    name="${model}_binarized_${method}_${order}_s${seed}"
    timeout -k 10 "$(( left - 20 ))" python benchmarks/study.py "${flags[@]}" --only="$name" \
      > "$out/logs/$name.txt" 2>&1 &
    pids+=($!)
  done
  statuses=()
  for pid in "${pids[@]}"; do wait "$pid"; statuses+=($?); done
  echo "$cell: $(( $(date +%s) - cell_start )) s, exit statuses ${statuses[*]}" | tee -a "$log"
  for seed in $seeds; do
    name="${model}_binarized_${method}_${order}_s${seed}"
    first=$(grep -m1 -E 'step ([5-9][0-9]|[0-9]{3,})/' "$out/logs/$name.txt" | sed -E 's/.*(step [0-9]+\/)/\1/')
    echo "  $name: ${first:-no step logged}; $(grep -E '^\[1/1\].*(as trained|stopped)' "$out/logs/$name.txt" | tail -1 | sed 's/.*: //')" | tee -a "$log"
  done
done
tar -czf "$out/summaries.tar.gz" -C "$out" summaries
echo "total $(( $(date +%s) - start )) s; $(find "$out/summaries" -name '*.json' | wc -l) summaries in $out/summaries.tar.gz" | tee -a "$log"
