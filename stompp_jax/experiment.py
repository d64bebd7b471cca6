"""Build once: every piece of a run that its config determines, with no workdir I/O.

    exp = experiment.build(config)                 # checks the config, reads the data's sizes
    state = jax.jit(exp.init_state, out_shardings=exp.state_shardings)()
    step = exp.compile_train_step()                # (state, batch) -> (state, metrics, per-site)

The trainer (train.py: build -> check workdir -> restore -> loop), the benchmarks, the model
summary and the export take their pieces from here. `build_model` is the part that needs only
the input shape (no data): the model, its one abstract trace (models/inspect.py) and the site
table read from that trace.
"""

import dataclasses
import functools
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding

from stompp_jax import compiler
from stompp_jax import errors
from stompp_jax import layers
from stompp_jax import models
from stompp_jax import optimizers
from stompp_jax import parallel
from stompp_jax import sites as sites_lib
from stompp_jax import state as state_lib
from stompp_jax import steps
from stompp_jax.binary import context as bctx
from stompp_jax.binary import schedule
from stompp_jax.choices import check_at_least
from stompp_jax.choices import check_choice
from stompp_jax.choices import check_number
from stompp_jax.data import pipeline
from stompp_jax.data import sources
from stompp_jax.models import inspect
from stompp_jax.models import summary as summary_lib

NONFINITE_POLICIES = ('error', 'skip')
# train.* integer fields and their smallest valid value.
_TRAIN_MINIMUMS = {'batch_size': 1, 'eval_batch_size': 1, 'num_steps': 0, 'log_every': 1,
                   'eval_every': 0, 'eval_steps': 0, 'checkpoint_every': 1,
                   'keep_checkpoints': 1, 'recalibrate_bn_batches': 0}


def check_train_config(train_cfg: ml_collections.ConfigDict) -> None:
  """Checks the `train.*` fields (the trainer's own); one-line SetupErrors."""
  for field, minimum in _TRAIN_MINIMUMS.items():
    check_at_least(f'train.{field}', train_cfg[field], minimum)
  check_number('train.num_epochs', train_cfg.num_epochs, 0,
               hint=' (it sets the length unless train.num_steps > 0)')
  check_choice('train.on_nonfinite', train_cfg.on_nonfinite, NONFINITE_POLICIES)


def check_method(config: ml_collections.ConfigDict) -> None:
  """model.mode and binary.method must agree: fp with fp, a binary mode with a binary method."""
  method, mode = config.binary.method, config.model.mode
  if (method == 'fp') != (mode == 'fp'):
    raise errors.SetupError(f'model.mode={mode!r} with binary.method={method!r}: a float network uses'
                     ' mode=fp with method=fp; binary networks (mode bnn or bwn) use ste, stompp'
                     ' or stompp_ste.')


def total_train_steps(train_cfg, train_size: int) -> tuple[int, int]:
  """(total steps, steps per epoch) from num_steps or num_epochs."""
  steps_per_epoch = max(train_size // train_cfg.batch_size, 1)
  total = train_cfg.num_steps or math.ceil(train_cfg.num_epochs * steps_per_epoch)
  if total < 1:
    raise errors.SetupError(f'The run has {total} steps: set train.num_steps or train.num_epochs > 0.')
  return total, steps_per_epoch


@dataclasses.dataclass(frozen=True)
class ModelBuild:
  """The model and what its one abstract trace shows.

  Attributes:
    model: the Flax module (`model.apply(variables, x, train=..., ctx=...)`).
    image_shape: (H, W, C) it is built for; num_classes: its logits per example.
    trace: its abstract trace.
    rules: the binary-layer rules of `config.model` (read once, here: the site table is the
      answer to "is this layer binary" from then on).
    sites: the site table (binary layers in forward order; empty for method fp).
  """

  model: nn.Module
  image_shape: tuple[int, int, int]
  num_classes: int
  trace: inspect.Trace
  rules: bctx.BinaryRules
  sites: tuple[sites_lib.Site, ...]

  def summary(self, model_config: Any) -> summary_lib.Summary:
    """The model summary (params, memory, MACs by precision) of `config.model`."""
    return summary_lib.summarize_trace(self.trace, model_name=models.model_label(model_config),
                                       mode=model_config.mode, rules=self.rules)


def build_model(config: ml_collections.ConfigDict, *, num_classes: int,
                image_shape: tuple[int, int, int],
                model: Optional[nn.Module] = None) -> ModelBuild:
  """The model of `config.model` (or `model`), traced once, and its site table."""
  if model is None:
    model = models.create_model(config.model, num_classes=num_classes, image_shape=image_shape)
  else:
    model = models.from_module(model, config.model.mode)
  trace = inspect.trace_model(model, image_shape)
  rules = models.binary_rules(config.model)
  site_list = ()
  if config.binary.method != 'fp':
    site_list = sites_lib.discover_sites(trace, rules, layers.site_layers(model))
    if not site_list:
      raise errors.SetupError('No layer of the model matches the binary rules: check'
                       ' model.binary_include / model.binary_exclude.')
  return ModelBuild(model, tuple(image_shape), num_classes, trace, rules, site_list)


def binarization_config(config: ml_collections.ConfigDict, site_list: tuple[sites_lib.Site, ...],
                        total_steps: int, platform: str) -> bctx.BinarizationConfig:
  """The static binarization settings of `config.binary` for a site table, on devices of
  `platform` ('cpu', 'gpu', 'tpu'; it resolves the 'auto' of binary.masks_by, residuals and
  committed_backward).

  Raises errors.SetupError for a bad binary.* field (BinarizationConfig and ScheduleConfig
  check their own), and when binary.window_steps makes the freezing end after the run.
  """
  binarization = bctx.BinarizationConfig(
      method=config.binary.method,
      schedule=schedule.ScheduleConfig(
          total_steps=total_steps, order=config.binary.order, shape=config.binary.shape,
          span_start=config.binary.span_start, span_end=config.binary.span_end,
          window_overlap=config.binary.window_overlap,
          window_steps=config.binary.window_steps),
      sites=tuple(s.path for s in site_list),
      frozen_grad=config.binary.frozen_grad,
      refresh_every=config.binary.refresh_every,
      per_example_activation_masks=config.binary.per_example_activation_masks,
      **{field: bctx.for_platform(field, config.binary[field], platform)
         for field in bctx.PLATFORM_CHOICES})
  if site_list:
    schedule.span_steps(binarization.schedule, len(site_list))  # window_steps fit the run.
  return binarization


def saved_run_binarization(config: ml_collections.ConfigDict,
                           site_list: tuple[sites_lib.Site, ...],
                           train_size: int) -> tuple[int, bctx.BinarizationConfig]:
  """(total steps, `binarization_config`) of the run `config` describes, rebuilt outside its
  Experiment (to evaluate, recalibrate or export it) for the devices of `jax.default_backend()`,
  where those programs run; the platform only chooses how masks are computed, not their values.

  Raises errors.SetupError as `total_train_steps` and `binarization_config`.
  """
  total_steps, _ = total_train_steps(config.train, train_size)
  return total_steps, binarization_config(config, site_list, total_steps, jax.default_backend())


def kernel_mask(params: Any) -> Any:
  """True on every conv/dense kernel (the leaves weight decay applies to)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', None) == 'kernel', params)


def abstract_batch(batch_size: int, image_shape: tuple[int, ...], sharding: NamedSharding,
                   with_mask: bool) -> dict:
  """The shapes and dtypes of a global batch of the pipeline (pipeline.py documents them)."""
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  batch = {'image': spec((batch_size, *image_shape), jnp.float32),
           'label': spec((batch_size,), jnp.int32)}
  if with_mask:
    batch['mask'] = spec((batch_size,), jnp.float32)
  return batch


@dataclasses.dataclass(frozen=True)
class Experiment:
  """The pieces of one run (`build`); nothing here has touched a workdir.

  Attributes:
    config: the run's config.
    data: sizes, class count and image shape (after the transforms) of the data.
    total_steps, steps_per_epoch: from train.num_steps or train.num_epochs.
    mesh: the device mesh (axis 'data').
    net: the model, its trace and site table.
    site_tree: the site tree (binary/site_tree.py): params-shaped, the site index at each binary
      kernel and None elsewhere; the optimizer and the train step read it.
    binarization: the static binarization settings.
    lr_schedule: step -> learning rate.
    tx: the optimizer.
    init_state: () -> the initial TrainState (jit it with `state_shardings`).
    abstract_state: the TrainState as jax.ShapeDtypeStructs.
    state_shardings: the TrainState's shardings; batch_sharding: a batch's.
  """

  config: ml_collections.ConfigDict
  data: pipeline.DatasetInfo
  total_steps: int
  steps_per_epoch: int
  mesh: Mesh
  net: ModelBuild
  site_tree: Any
  binarization: bctx.BinarizationConfig
  lr_schedule: optax.Schedule
  tx: optax.GradientTransformation
  init_state: Callable[[], state_lib.TrainState]
  abstract_state: Any
  state_shardings: Any
  batch_sharding: NamedSharding

  @property
  def model(self) -> nn.Module:
    return self.net.model

  @property
  def platform(self) -> str:
    """The platform of the mesh's devices ('cpu', 'gpu', 'tpu'), which the compiles target."""
    return compiler.platform_of(self.batch_sharding)

  @property
  def eval_batch_size(self) -> int:
    """train.eval_batch_size, or the eval split's size when smaller (parallel.eval_batch_size)."""
    return parallel.eval_batch_size(self.config.train.eval_batch_size, self.data.eval_size,
                                    self.mesh)

  def abstract_batch(self, batch_size: int, with_mask: bool = False) -> dict:
    return abstract_batch(batch_size, self.data.image_shape, self.batch_sharding, with_mask)

  def compile_train_step(self) -> Callable:
    """The jitted, compiled `steps.train_step` (state donated): (state, batch) -> (state,
    averaged metrics, per-site values)."""
    return compiler.jit(
        functools.partial(steps.train_step, model=self.model, binarization=self.binarization,
                          sites=self.site_tree, tx=self.tx,
                          diagnostics=self.config.train.diagnostics),
        platform=self.platform,
        in_shardings=(self.state_shardings, self.batch_sharding),
        out_shardings=(self.state_shardings, None, None), donate_argnums=0,
    ).lower(self.abstract_state, self.abstract_batch(self.config.train.batch_size)).compile()

  def compile_eval_steps(self) -> dict[str, Callable]:
    """{'eval': ..., 'eval_fully_binary': ... (binary methods)}: compiled `steps.eval_step`s,
    (state, batch with mask) -> metrics."""
    fully_binary = {'eval_fully_binary': True} if self.config.binary.method != 'fp' else {}
    batch = self.abstract_batch(self.eval_batch_size, with_mask=True)
    return {
        name: compiler.jit(functools.partial(steps.eval_step, model=self.model,
                                             binarization=self.binarization,
                                             fully_binary=binary),
                           platform=self.platform, in_shardings=(self.state_shardings, self.batch_sharding),
                      ).lower(self.abstract_state, batch).compile()
        for name, binary in {**fully_binary, 'eval': False}.items()}


def check_config(config: ml_collections.ConfigDict) -> None:
  """Every check of `config` that needs no data, no devices and no model, each field by its
  owner (binary.* fields are checked by BinarizationConfig and ScheduleConfig when `build`
  makes them, the binary-layer rules by BinaryRules), and the environment's compiler setting
  (`compiler.check_setting`)."""
  compiler.check_setting()
  check_train_config(config.train)
  models.check_model_config(config.model)
  check_method(config)
  optimizers.check_optim_config(config.optim)
  parallel.check_mesh_config(config.mesh)
  sources.check_data_config(config.data)


def build(config: ml_collections.ConfigDict, *, model: Optional[nn.Module] = None,
          devices: Optional[Sequence[jax.Device]] = None) -> Experiment:
  """All pieces of the run `config` describes; reads the data's sizes, writes nothing.

  Args:
    config: a full config (configs/default.py lists every field).
    model: a Flax module to train instead of the zoo's `config.model.name` (the Experiment's
      config records its class: `models.with_own_class`).
    devices: the mesh's devices instead of `jax.devices()` (preflight.py: a TPU topology's
      compile-only devices).

  Raises:
    errors.SetupError: a bad field, missing or malformed data, or a batch that does not split
      over the devices (one-line messages). Anything else (a bug in `model`, say) propagates
      as it was raised.
  """
  check_config(config)
  if model is not None:
    config = models.with_own_class(config, model)
  parallel.initialize_distributed()
  info = pipeline.dataset_info(config.data)
  total_steps, steps_per_epoch = total_train_steps(config.train, info.train_size)
  mesh = parallel.make_mesh(config.mesh.num_devices, devices)
  parallel.check_batch_size(config.train.batch_size, mesh)
  parallel.check_batch_size(config.train.eval_batch_size, mesh, 'train.eval_batch_size')
  net = build_model(config, num_classes=info.num_classes, image_shape=info.image_shape,
                    model=model)
  batch_sharding = parallel.batch_sharding(mesh)
  binarization = binarization_config(config, net.sites, total_steps,
                                     compiler.platform_of(batch_sharding))
  params = net.trace.variables['params']
  site_tree = sites_lib.site_tree(params, net.sites)
  lr_schedule = optimizers.learning_rate_schedule(config.optim, total_steps=total_steps,
                                                  steps_per_epoch=steps_per_epoch)
  tx = optimizers.create_optimizer(config.optim, config.binary, lr_schedule=lr_schedule,
                                   sites=site_tree, kernel_mask=kernel_mask(params))
  sample = jnp.zeros((1, *info.image_shape), jnp.float32)
  init_state = functools.partial(state_lib.create_train_state, net.model, tx, config.seed, sample)
  abstract_state = jax.eval_shape(init_state)
  state_shardings = parallel.state_sharding(abstract_state, mesh, config.mesh.shard_params)
  return Experiment(config, info, total_steps, steps_per_epoch, mesh, net, site_tree, binarization,
                    lr_schedule, tx, init_state, abstract_state, state_shardings,
                    batch_sharding)
