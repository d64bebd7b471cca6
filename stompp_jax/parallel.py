"""Processes, devices and shardings: one `data` mesh axis, jax.jit with NamedSharding, no pmap.

One process (a laptop, one GPU machine) and many processes (TPU pod slices, SLURM GPU jobs)
run the same code. Each process loads its own slice of the global batch; `global_batch` stitches
the slices into one global `jax.Array` sharded over the `data` axis. Under jit, BatchNorm
statistics over that array are global-batch statistics with no axis names.
"""

import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from stompp_jax import errors
from stompp_jax.choices import check_at_least

DATA_AXIS = 'data'
# Parameters smaller than this stay replicated when parameter sharding is on.
MIN_SHARDED_SIZE = 2**18  # Elements; tests lower it to shard a tiny model's kernels.


def initialize_distributed() -> None:
  """Starts `jax.distributed` when this job has several processes; a no-op otherwise.

  Explicit settings win: STOMPP_COORDINATOR_ADDRESS (host:port), STOMPP_NUM_PROCESSES and
  STOMPP_PROCESS_ID. Else `jax.distributed.initialize()` runs, with no arguments, exactly when
  JAX's own cluster detection finds a job of several processes (`cluster_process_count`).
  """
  if jax.distributed.is_initialized():
    return
  address = os.environ.get('STOMPP_COORDINATOR_ADDRESS')
  if address:
    try:
      num_processes = int(os.environ['STOMPP_NUM_PROCESSES'])
      process_id = int(os.environ['STOMPP_PROCESS_ID'])
    except (KeyError, ValueError):
      raise errors.SetupError('STOMPP_COORDINATOR_ADDRESS is set: also set STOMPP_NUM_PROCESSES and'
                       ' STOMPP_PROCESS_ID to integers.') from None
    jax.distributed.initialize(coordinator_address=address, num_processes=num_processes,
                               process_id=process_id)
  elif cluster_process_count() > 1:
    jax.distributed.initialize()


def cluster_process_count() -> int:
  """The number of processes of this job as JAX's cluster detection sees it, 1 outside a cluster.

  The detection that `jax.distributed.initialize()` runs when given no arguments, in its order:
  Cloud TPU VMs of `gcloud compute tpus tpu-vm create` (the metadata server's worker list, times
  MEGASCALE_NUM_SLICES), GKE TPU (TPU_WORKER_HOSTNAMES or TPU_PROCESS_ADDRESSES), SLURM
  (SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID), Open MPI,
  Kubernetes jobs.
  """
  from jax._src import clusters  # pylint: disable=g-import-not-at-top  # No public query.
  for env in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
    if not env.opt_in_only_method and env.is_env_present():
      return env.get_process_count()
  return 1


def wait_for_all_processes(name: str) -> None:
  """Blocks until every process of the job reaches the barrier `name`
  (`multihost_utils.sync_global_devices`)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def check_same_on_all_processes(what: str, value: int) -> None:
  """Raises SetupError unless every process passes the same `value` (a collective)."""
  if jax.process_count() == 1:
    return
  values = np.asarray(multihost_utils.process_allgather(np.int32(value))).ravel().tolist()
  if len(set(values)) > 1:
    raise errors.SetupError(f'The processes disagree on the {what} (per process: {values}): every'
                     ' process must see the same workdir, data and config.')


def check_mesh_config(mesh_cfg) -> None:
  """Checks `config.mesh` (one-line SetupErrors)."""
  check_at_least('mesh.num_devices', mesh_cfg.num_devices, 0)


def make_mesh(num_devices: int = 0, devices=None) -> Mesh:
  """A 1-D mesh with axis `data` over all devices (or the first `num_devices` of one process);
  over `devices` instead of `jax.devices()` when given (e.g. a TPU topology's, preflight.py)."""
  devices = jax.devices() if devices is None else list(devices)
  if num_devices:
    if jax.process_count() > 1 and num_devices != len(devices):
      raise errors.SetupError(f'mesh.num_devices={num_devices} with {jax.process_count()} processes: use 0'
                       ' (all devices) for multi-process runs.')
    if num_devices > len(devices):
      raise errors.SetupError(f'mesh.num_devices={num_devices} but only {len(devices)} devices exist:'
                       ' lower mesh.num_devices or use 0 for all.')
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dim split over `data`."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh, what: str = 'train.batch_size') -> None:
  if global_batch_size % mesh.size:
    raise errors.SetupError(f'{what}={global_batch_size} is not divisible by the {mesh.size} devices:'
                     f' use a multiple of {mesh.size}.')


def eval_batch_size(configured: int, eval_size: int, mesh: Mesh) -> int:
  """The global eval batch: `configured`, or less when the eval split is smaller, the split's
  size rounded up to a multiple of the device count (so a 256-image split is not padded to a
  1024-image batch)."""
  return min(configured, max(-(-eval_size // mesh.size), 1) * mesh.size)


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Turns this process's slice of the batch into global arrays sharded over `data`.

  Args:
    local_batch: {name: array (local_batch, ...)}, this process's consecutive slice.
    mesh: the mesh; the global batch is local_batch * process_count.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def state_sharding(abstract_tree, mesh: Mesh, shard_params: bool):
  """Shardings for a train-state pytree: replicated, or FSDP-style over `data` when asked.

  With `shard_params`, each large array is split along its largest dim divisible by the mesh
  size (parameters and their optimizer moments alike); small ones stay replicated.
  """
  def leaf_sharding(leaf):
    shape = getattr(leaf, 'shape', ())
    if not shard_params or int(np.prod(shape)) < MIN_SHARDED_SIZE:
      return replicated(mesh)
    dims = [d for d in np.argsort(shape)[::-1] if shape[d] % mesh.size == 0]
    if not dims:
      return replicated(mesh)
    spec = [None] * len(shape)
    spec[dims[0]] = DATA_AXIS
    return NamedSharding(mesh, P(*spec))

  return jax.tree.map(leaf_sharding, abstract_tree)
