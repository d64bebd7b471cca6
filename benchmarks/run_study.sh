#!/usr/bin/env bash
# The equal-epochs study (benchmarks/study.py, protocol in docs/study.md): niced, under nohup,
# run by run, each run in chunks of at most STUDY_CHUNK_S seconds (default 1800).
#
#   python benchmarks/prepare_cifar16.py --out=~/stompp_data/cifar10_16
#   bash benchmarks/run_study.sh [--commit] --data_dir=~/stompp_data/cifar10_16 [study.py flags]
#   tail -f runs/study/run_study.log
#
# A chunk ends with a SIGTERM: the run saves a checkpoint and exits with 75, and the next chunk
# resumes it (the summary's wall time sums the chunks). The plan is read again after every run,
# so the rule's extra seeds join when a decision calls for them; the same command continues a
# study after any stop. Then `study.py --analyze` writes results.md and plots/.
# --commit: `git add` + `git commit` each new summary as its run finishes (and the analysis at
# the end), in the repository that holds the summaries directory; only those files.
# --foreground: run here instead of under nohup (used by the tests).
set -euo pipefail
cd "$(dirname "$0")/.."
commit=0
foreground=0
summaries=docs/results/equal_epochs
chunk="${STUDY_CHUNK_S:-1800}"
# A CPU study: with libtpu installed (the TPU preflight), JAX would look for a TPU at each start.
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
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
  mkdir -p runs/study
  flags=(--foreground)
  [[ $commit == 1 ]] && flags+=(--commit)
  nohup nice -n 10 bash "$0" "${flags[@]}" "${args[@]}" > runs/study/run_study.log 2>&1 &
  echo "started (pid $!): tail -f runs/study/run_study.log"
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

failed=()
while true; do
  name=""
  for candidate in $(python benchmarks/study.py "${args[@]}" --names); do
    if [[ " ${failed[*]} " != *" $candidate "* ]]; then name=$candidate; break; fi
  done
  [[ -n $name ]] || break
  status=75
  while [[ $status == 75 ]]; do
    set +e
    timeout --preserve-status -k 600 -s TERM "$chunk" python benchmarks/study.py "${args[@]}" --only="$name"
    status=$?
    set -e
  done
  if [[ $status != 0 || ! -f "$summaries/$name.json" ]]; then
    echo "failed: $name (status $status; the next command resumes it)"
    failed+=("$name")
    continue
  fi
  commit_paths "Study: $name" "$(realpath "$summaries/$name.json")"
done
python benchmarks/study.py "${args[@]}" --analyze > /dev/null
commit_paths "Study: decisions, tables and curves" "$(realpath "$summaries/results.md")" \
  "$(realpath "$summaries/plots")"
echo "study finished (failed runs: ${failed[*]:-none}); results: $summaries/results.md"
[[ ${#failed[@]} == 0 ]]
