#!/usr/bin/env bash
# The study's decisive cells at a larger budget on one GPU (about 10 minutes on an H100/H200):
# CIFAR ResNet-56 and ResNet-20 BNN x {STE, StoMPP} x model.bnn_shortcut {binarized, real},
# seed 0, 40 window steps per site, batch 128, accuracies as trained and recalibrated.
#
#   STOMPP_DATA_DIR=/path/to/cifar10_jpeg bash benchmarks/gpu_study.sh OUT_DIR
#   bash benchmarks/gpu_study.sh OUT_DIR --tiny      # CPU smoke test: tiny ResNet, synthetic data
#
# Writes OUT_DIR/summaries/*.json (one per finished run), OUT_DIR/summaries/results.md and
# plots/, and OUT_DIR/log.txt. Runs go most decisive first (binarized reading, deep model) and
# no run starts after GPU_STUDY_BUDGET_S seconds (default 540), so the script ends near its
# budget with the most useful runs done. Rerunning continues (finished runs are skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: bash benchmarks/gpu_study.sh OUT_DIR [--tiny]}"
budget="${GPU_STUDY_BUDGET_S:-540}"
flags=(--out="$out/runs" --summaries="$out/summaries" --groups=main --methods=ste,stompp
       --deep_methods=ste,stompp --machine="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || true)")
if [[ "${2:-}" == "--tiny" ]]; then
  flags+=(--models=tiny_resnet --seeds=tiny_resnet:1 --data=synthetic --steps_per_site=1
          --batch=16 --eval_batch=16 --recalibrate=2 --compile_cache=)
else
  flags+=(--models=resnet20,resnet56 --seeds=resnet20:1,resnet56:1 --steps_per_site=40
          --batch=128 --recalibrate=20)
fi
mkdir -p "$out"
start=$(date +%s)
names=$(python benchmarks/study.py "${flags[@]}" --names)
ordered=$( (echo "$names" | grep '_binarized_' | sort -r; echo "$names" | grep -v '_binarized_' | sort -r) || true)
for name in $ordered; do
  if (( $(date +%s) - start >= budget )); then
    echo "budget of $budget s spent: $name and later runs not started" | tee -a "$out/log.txt"
    break
  fi
  python benchmarks/study.py "${flags[@]}" --only="$name" 2>&1 | tee -a "$out/log.txt" | grep -E '^\[' || true
done
python benchmarks/study.py "${flags[@]}" --analyze | tee "$out/results.txt"
echo "total $(( $(date +%s) - start )) s; summaries in $out/summaries"
