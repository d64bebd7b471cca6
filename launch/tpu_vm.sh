#!/usr/bin/env bash
# Cloud TPU VM launcher: create a TPU VM (or a queued resource), install the project on every
# worker, start the same training command on all of them, watch it, fetch results, delete the VM.
# Walk-through: launch/README.md. Written for bash 3.2 too (macOS laptops).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_vm.sh [--setting=VALUE ...] COMMAND [ARGS]

Commands:
  preflight -- ARGS                on this machine, before creating anything: compile the run for
                                   ACCELERATOR_TYPE with the TPU compiler (no TPU needed; pip
                                   install ".[tpu]"): `python -m stompp_jax.preflight
                                   --topology=ACCELERATOR_TYPE ARGS` prints HBM per chip, fits or
                                   not, FLOPs and a roofline estimate (docs/preflight.md)
  create [-- GCLOUD_FLAGS]         create the TPU VM (e.g. -- --spot)
  create-queued [-- GCLOUD_FLAGS]  request it as a queued resource (e.g. -- --spot)
  install                          on every worker: the code (git clone of REPO at BRANCH, or a
                                   copy of this checkout if REPO is unset) and a Python venv with
                                   requirements.txt, jax[tpu] and gcsfs
  mount-data                       on every worker: Cloud Storage FUSE (gcsfuse, installed if
                                   missing) mounts DATA_BUCKET read-only at /mnt/stompp_data,
                                   for --config.data.dir=/mnt/stompp_data/tensorflow_datasets
  train -- ARGS                    start `python -m stompp_jax.main ARGS` on every worker in the
                                   background, output in ~/stompp_jax/train.log
  sweep -- ARGS                    start `python -m launch.sweep --run ARGS` the same way
  status                           VM state (or queued-resource state), and per worker whether
                                   training runs and its last log line
  logs [-f] [WORKER]               last 100 log lines of WORKER (default 0; or all); -f follows
  fetch [--checkpoints] [PATH]     copy gs://BUCKET/runs[/PATH] to ./runs[/PATH] (checkpoints
                                   only with --checkpoints)
  delete                           delete the TPU VM
  delete-queued                    delete the queued resource and its TPU VM

Settings, as --setting=VALUE before COMMAND or as environment variables:
  --name             NAME              TPU VM and queued-resource name
  --zone             ZONE              e.g. us-central2-b
  --project          PROJECT           default: gcloud's configured project
  --accelerator-type ACCELERATOR_TYPE  e.g. v4-32
  --runtime-version  RUNTIME_VERSION   default tpu-ubuntu2204-base (v4 and older); v5e:
                                       v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e
  --repo, --branch   REPO, BRANCH      git URL and branch (default main) for install
  --python-version   PYTHON_VERSION    Python of the workers' venv (default 3.11)
  --bucket           BUCKET            bucket that holds runs/ (fetch)
  --data-bucket      DATA_BUCKET       bucket that holds tensorflow_datasets/ (mount-data)
  --python           PYTHON            the local Python of preflight (default python3)

Example:
  launch/tpu_vm.sh --accelerator-type=v4-32 preflight -- --config=configs/imagenet_r50.py
  launch/tpu_vm.sh --name=stompp --zone=us-central2-b --accelerator-type=v4-32 create
  launch/tpu_vm.sh --name=stompp --zone=us-central2-b train -- \
      --config=configs/imagenet_r50.py --workdir=gs://BUCKET/runs/r50_bnn
EOF
}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REMOTE_DIR=stompp_jax  # On every worker, relative to the home directory.
LOG=train.log          # Inside REMOTE_DIR.
DATA_MOUNT=/mnt/stompp_data  # Where mount-data mounts DATA_BUCKET on every worker.
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
BRANCH=${BRANCH:-main}
PYTHON_VERSION=${PYTHON_VERSION:-3.11}

die() {
  echo "tpu_vm.sh: $*" >&2
  exit 2
}

set_setting() {  # --some-setting=VALUE -> SOME_SETTING=VALUE
  local var
  var=$(printf %s "${1%%=*}" | sed 's/^--//' | tr 'a-z-' 'A-Z_')
  case $var in
    NAME | ZONE | PROJECT | ACCELERATOR_TYPE | RUNTIME_VERSION | REPO | BRANCH | PYTHON_VERSION | BUCKET | DATA_BUCKET | PYTHON)
      printf -v "$var" %s "${1#*=}" ;;
    *) die "unknown setting ${1%%=*} (see launch/tpu_vm.sh --help)" ;;
  esac
}

require() {  # SETTING...: fail naming the first one that is empty.
  local var
  for var in "$@"; do
    if [[ -z ${!var:-} ]]; then
      die "$var is not set: pass --$(printf %s "$var" | tr 'A-Z_' 'a-z-')=... or export $var=..."
    fi
  done
}

gcloud_tpus() {  # ARGS: `gcloud compute tpus ARGS` in ZONE (and PROJECT).
  require ZONE
  gcloud compute tpus "$@" --zone="$ZONE" ${PROJECT:+"--project=$PROJECT"}
}

on_workers() {  # WORKER COMMAND: run the bash COMMAND on worker WORKER (a number, or all).
  require NAME
  gcloud_tpus tpu-vm ssh "$NAME" --worker="$1" --command="$2"
}

start_on_workers() {  # MODULE ARGS: `python -m MODULE ARGS` on all workers, detached, into LOG.
  local module=$1 command
  shift
  command="cd $REMOTE_DIR && { PATH=\"\$PWD/.venv/bin:\$PATH\" nohup python -m $module"
  command+="$(printf ' %q' "$@") > $LOG 2>&1 < /dev/null & }"
  on_workers all "$command"
  echo "started on every worker of $NAME; follow with: launch/tpu_vm.sh logs -f"
}

cmd_preflight() {  # Runs here, not on a worker: the slice need not exist yet.
  require ACCELERATOR_TYPE
  (($#)) || die "preflight needs the run's config: preflight -- --config=configs/imagenet_r50.py"
  cd "$ROOT"
  exec "${PYTHON:-python3}" -m stompp_jax.preflight --topology="$ACCELERATOR_TYPE" "$@"
}

cmd_create() {
  require NAME ACCELERATOR_TYPE
  gcloud_tpus tpu-vm create "$NAME" --accelerator-type="$ACCELERATOR_TYPE" \
    --version="$RUNTIME_VERSION" "$@"
}

cmd_create_queued() {
  require NAME ACCELERATOR_TYPE
  gcloud_tpus queued-resources create "$NAME" --node-id="$NAME" \
    --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" "$@"
  echo "queued; launch/tpu_vm.sh status shows when it is ACTIVE"
}

cmd_install() {
  require NAME ZONE
  local get_code branch steps
  if [[ -n ${REPO:-} ]]; then
    branch=$(printf %q "$BRANCH")
    get_code="if [ -d $REMOTE_DIR/.git ]; then git -C $REMOTE_DIR fetch --depth=1 origin $branch"
    get_code+=" && git -C $REMOTE_DIR checkout --force FETCH_HEAD"
    get_code+="; else git clone --depth=1 --branch $branch $(printf %q "$REPO") $REMOTE_DIR; fi"
  else
    ARCHIVE_DIR=$(mktemp -d)
    trap 'rm -rf "$ARCHIVE_DIR"' EXIT
    git -C "$ROOT" ls-files -z --cached --others --exclude-standard |
      tar -C "$ROOT" --null -T - -czf "$ARCHIVE_DIR/stompp_jax.tgz"
    gcloud_tpus tpu-vm scp "$ARCHIVE_DIR/stompp_jax.tgz" "$NAME:stompp_jax.tgz" --worker=all
    get_code="mkdir -p $REMOTE_DIR && tar -xzf stompp_jax.tgz -C $REMOTE_DIR"
  fi
  # uv brings its own Python: the TPU images' system Python can be older than the stack needs.
  # gcsfs lets tfds and orbax read and write gs:// paths without TensorFlow.
  steps=$(printf '%s; ' 'set -e' "$get_code" \
    "export PATH=\"\$HOME/.local/bin:\$PATH\"" \
    'command -v uv > /dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh' \
    "cd $REMOTE_DIR" \
    "[ -x .venv/bin/python ] || uv venv --python $(printf %q "$PYTHON_VERSION") .venv" \
    "uv pip install --python .venv/bin/python -r requirements.txt 'jax[tpu]' gcsfs")
  on_workers all "${steps%; }"
}

cmd_mount_data() {
  require NAME ZONE DATA_BUCKET
  local source install steps
  source=$(printf %q "${DATA_BUCKET#gs://}")
  # Cloud Storage FUSE from Google's apt repository (the TPU images are Ubuntu); array-record
  # reads the mounted files with random access, which it cannot do on gs:// itself.
  install='command -v gcsfuse > /dev/null || {'
  install+=' curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc > /dev/null'
  # shellcheck disable=SC2016  # $(lsb_release -cs) runs on the worker.
  install+=' && echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -cs) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list > /dev/null'
  install+=' && sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; }'
  steps=$(printf '%s; ' 'set -e' "$install" \
    "sudo mkdir -p $DATA_MOUNT && sudo chown \"\$(id -u):\$(id -g)\" $DATA_MOUNT" \
    "mountpoint -q $DATA_MOUNT || gcsfuse --implicit-dirs -o ro $source $DATA_MOUNT")
  on_workers all "${steps%; }"
}

cmd_train() {
  (($#)) || die "train needs the arguments of stompp_jax.main: train -- --config=... --workdir=gs://..."
  start_on_workers stompp_jax.main "$@"
}

cmd_sweep() {
  (($#)) || die "sweep needs a grid: sweep -- GRID --workdir-root=gs://BUCKET/runs"
  start_on_workers launch.sweep --run "$@"
}

cmd_status() {
  require NAME
  local vm_state='table(name.basename(),acceleratorType,state,health)'
  if gcloud_tpus tpu-vm describe "$NAME" --format="$vm_state" 2>/dev/null; then
    # The [s] and [l] keep pgrep from matching the command line of this very check.
    local training="pgrep -f '[s]tompp_jax[.]main|[l]aunch[.]sweep' > /dev/null && echo training || echo idle"
    on_workers all "echo \"\$(hostname): \$($training) | \$(tail -n 1 $REMOTE_DIR/$LOG 2>/dev/null)\""
  else
    gcloud_tpus queued-resources describe "$NAME" --format='table(name.basename(),state.state)'
  fi
}

cmd_logs() {
  local follow=''
  if [[ ${1:-} == -f ]]; then
    follow=' -F'
    shift
  fi
  on_workers "${1:-0}" "tail -n 100$follow $REMOTE_DIR/$LOG"
}

cmd_fetch() {
  require BUCKET
  local exclude='--exclude=(.*/)?checkpoints/.*'
  if [[ ${1:-} == --checkpoints ]]; then
    exclude=''
    shift
  fi
  local path=${1:+/$1}
  mkdir -p "runs$path"
  gcloud storage rsync --recursive ${exclude:+"$exclude"} "gs://${BUCKET#gs://}/runs$path" "runs$path"
}

cmd_delete() {
  require NAME
  gcloud_tpus tpu-vm delete "$NAME" --quiet
}

cmd_delete_queued() {
  require NAME
  gcloud_tpus queued-resources delete "$NAME" --force --quiet
}

main() {
  while [[ ${1:-} == --*=* ]]; do
    set_setting "$1"
    shift
  done
  case ${1:-} in
    -h | --help | help) usage; exit 0 ;;
    '') usage >&2; exit 2 ;;
  esac
  local command=$1
  shift
  if [[ ${1:-} == -- ]]; then shift; fi
  case $command in
    preflight | create | create-queued | install | mount-data | train | sweep | status | logs | fetch | delete | delete-queued)
      "cmd_$(printf %s "$command" | tr - _)" "$@" ;;
    *) die "unknown command '$command'; settings go before it as --name=VALUE (see --help)" ;;
  esac
}

main "$@"
