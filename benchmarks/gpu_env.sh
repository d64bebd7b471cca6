# shellcheck shell=bash
# Sourced on the lent GPU machine, in the repository root: `source benchmarks/gpu_env.sh`.
# Installs .gpu_carry/wheels (benchmarks/gpu_prepare.sh) with --no-index --no-deps into a fresh
# target folder, puts it and the repository on PYTHONPATH, and checks that stompp_jax imports with
# the machine's own jax. Sets STOMPP_STUDY_DATA to .gpu_carry/cifar10_16 when it was carried.
gpu_target="${GPU_ENV_TARGET:-/tmp/stompp_gpu_site}"
rm -rf "$gpu_target"
python -m pip install -q --no-index --no-deps --target "$gpu_target" .gpu_carry/wheels/*.whl
export PYTHONPATH="$gpu_target:$PWD${PYTHONPATH:+:$PYTHONPATH}"
[[ -f .gpu_carry/cifar10_16/train.npz ]] && export STOMPP_STUDY_DATA="$PWD/.gpu_carry/cifar10_16"
python -c 'import jax, stompp_jax.train, stompp_jax.experiment; print(f"stompp_jax with jax {jax.__version__} on {jax.default_backend()}")'
