#!/usr/bin/env bash
# The issue-15 study (benchmarks/study.py) on an idle machine: resumable run by run, niced,
# under nohup, one process per run.
#
#   export STOMPP_DATA_DIR=/path/to/cifar10_jpeg       # the npz copy of CIFAR-10
#   bash benchmarks/run_study.sh [--commit] [study.py flags...]    # starts in the background
#   tail -f runs/study15/run_study.log
#
# Every run of `study.py FLAGS --names` is trained by `study.py FLAGS --only=NAME`; a run whose
# summary exists is skipped, an interrupted one resumes from its checkpoint, so the same command
# continues a study. Then `study.py FLAGS --analyze` writes results.md and plots/.
# --commit: `git add` + `git commit` each new summary as its run finishes (and the analysis at
# the end), in the repository that holds the summaries directory; only those files.
# --foreground: run here instead of under nohup (used by the tests).
set -euo pipefail
cd "$(dirname "$0")/.."
commit=0
foreground=0
summaries=docs/results/study
args=()
for a in "$@"; do
  case "$a" in
    --commit) commit=1 ;;
    --foreground) foreground=1 ;;
    --summaries=*) summaries="${a#*=}"; args+=("$a") ;;
    *) args+=("$a") ;;
  esac
done
if [[ $foreground == 0 ]]; then
  mkdir -p runs/study15
  flags=(--foreground)
  [[ $commit == 1 ]] && flags+=(--commit)
  nohup nice -n 10 bash "$0" "${flags[@]}" "${args[@]}" > runs/study15/run_study.log 2>&1 &
  echo "started (pid $!): tail -f runs/study15/run_study.log"
  exit 0
fi

commit_paths() {  # message, paths...: commits those paths if they changed.
  local message="$1"; shift
  [[ $commit == 1 ]] || return 0
  if [[ -n "$(git -C "$summaries" status --porcelain -- "$@")" ]]; then
    git -C "$summaries" add -- "$@"
    git -C "$summaries" commit -q -m "$message" -- "$@"
    echo "committed: $message"
  fi
}

names=$(python benchmarks/study.py "${args[@]}" --names)
failed=0
for name in $names; do
  if ! python benchmarks/study.py "${args[@]}" --only="$name"; then
    echo "failed: $name (the next command resumes it)"
    failed=1
    continue
  fi
  if [[ -f "$summaries/$name.json" ]]; then
    commit_paths "Study (issue 15): $name" "$(realpath "$summaries/$name.json")"
  fi
done
python benchmarks/study.py "${args[@]}" --analyze > /dev/null
commit_paths "Study (issue 15): tables, plots and verdicts" "$(realpath "$summaries/results.md")" \
  "$(realpath "$summaries/plots")"
echo "study finished (failed runs: $failed); results: $summaries/results.md"
exit $failed
