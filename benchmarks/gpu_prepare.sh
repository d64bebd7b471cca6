#!/usr/bin/env bash
# Prepares, on a machine with PyPI, what the lent GPU machine lacks, into .gpu_carry/ (git-ignored),
# which travels with a device command (`carry: [".gpu_carry"]`; 64 MiB with the working tree):
#
#   bash benchmarks/gpu_prepare.sh [--data=DIR16]   # wheels; with --data, the 16x16 study data
#
# .gpu_carry/wheels/: one wheel per line of benchmarks/gpu_lacks.txt, for CPython 3.12 on x86-64
# Linux (`pip download --no-deps`), at the version requirements.txt pins, else the one installed
# here. .gpu_carry/cifar10_16/: DIR16's train.npz and test.npz (benchmarks/prepare_cifar16.py).
# On the GPU machine, `source benchmarks/gpu_env.sh` installs the wheels with --no-index into a
# fresh target folder and puts it on PYTHONPATH. Prints the sizes and fails (exit 1) over the limit.
set -euo pipefail
cd "$(dirname "$0")/.."
carry=.gpu_carry
data=""
for a in "$@"; do
  case "$a" in
    --data=*) data="${a#*=}"; data="${data/#\~/$HOME}" ;;
    *) echo "Error: unknown argument $a: use --data=DIR16 or nothing" >&2; exit 2 ;;
  esac
done
if [[ -n $data && ! -f "$data/train.npz" ]]; then
  echo "Error: --data=$data has no train.npz: run benchmarks/prepare_cifar16.py --out=$data first" >&2
  exit 2
fi
pins=$(python - <<'PY'
import importlib.metadata, re
pinned = {}
for line in open('requirements.txt'):
  m = re.match(r'([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^\s#]+)', line)
  if m:
    pinned[m.group(1).lower().replace('_', '-')] = m.group(2)
for line in open('benchmarks/gpu_lacks.txt'):
  name = line.split('#')[0].strip()
  if name:
    key = name.lower().replace('_', '-')
    print(f'{name}=={pinned.get(key) or importlib.metadata.version(name)}')
PY
)
rm -rf "$carry/wheels"
mkdir -p "$carry/wheels"
# shellcheck disable=SC2086  # One argument per pin.
python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d "$carry/wheels" -q $pins
if [[ -n $data ]]; then
  mkdir -p "$carry/cifar10_16"
  cp "$data/train.npz" "$data/test.npz" "$carry/cifar10_16/"
fi
tree_mib=$(( $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) / 1048576 ))
carry_mib=$(( $(du -sb "$carry" | cut -f1) / 1048576 ))
echo "wheels: $(find "$carry/wheels" -name '*.whl' | wc -l) of $(echo "$pins" | wc -w); .gpu_carry $carry_mib MiB + tracked files $tree_mib MiB (limit 64 MiB)"
(( carry_mib + tree_mib < 64 )) || { echo "Error: over the 64 MiB the device command carries" >&2; exit 1; }
