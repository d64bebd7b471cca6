"""train_and_evaluate: the one entry point that the CLI, notebooks and tests call.

Builds the data, model, site table, optimizer and sharded train state, restores the newest
checkpoint of `workdir` if there is one, and trains with periodic logging, evaluation and
checkpoints. See README.md for the run directory and the metric keys.
"""

import contextlib
import functools
import math
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from stompp_jax import checkpoints
from stompp_jax import errors
from stompp_jax import metrics as metrics_lib
from stompp_jax import models
from stompp_jax import optimizers
from stompp_jax import parallel
from stompp_jax import sites as sites_lib
from stompp_jax import state as state_lib
from stompp_jax import steps
from stompp_jax import workdir as workdir_lib
from stompp_jax.binary import context as bctx
from stompp_jax.binary import schedule
from stompp_jax.binary.choices import check_choice
from stompp_jax.data import pipeline
from stompp_jax.models import inspect


def total_train_steps(train_cfg, train_size: int) -> tuple[int, int]:
  """(total steps, steps per epoch) from num_steps or num_epochs."""
  steps_per_epoch = max(train_size // train_cfg.batch_size, 1)
  total = train_cfg.num_steps or math.ceil(train_cfg.num_epochs * steps_per_epoch)
  if total < 1:
    raise ValueError(f'The run has {total} steps: set train.num_steps or train.num_epochs > 0.')
  return total, steps_per_epoch


def build_binarization(config: ml_collections.ConfigDict, model, image_shape: tuple[int, ...],
                       total_steps: int) -> tuple[bctx.BinarizationConfig, tuple[sites_lib.Site, ...]]:
  """The static binarization settings and the model's site table (forward order)."""
  method, mode = config.binary.method, config.model.mode
  if (method == 'fp') != (mode == 'fp'):
    raise ValueError(f'model.mode={mode!r} with binary.method={method!r}: a float network uses'
                     ' mode=fp with method=fp; binary networks (mode bnn or bwn) use ste, stompp'
                     ' or stompp_ste.')
  rules = models.binary_rules(config.model)
  site_list = ()
  if method != 'fp':
    site_list = sites_lib.discover_sites(inspect.trace_model(model, image_shape), rules)
    if not site_list:
      raise ValueError('No layer of the model matches the binary rules: check'
                       ' model.binary_include / model.binary_exclude.')
  binarization = bctx.BinarizationConfig(
      method=method,
      schedule=schedule.ScheduleConfig(
          total_steps=total_steps, order=config.binary.order, shape=config.binary.shape,
          span_start=config.binary.span_start, span_end=config.binary.span_end,
          window_overlap=config.binary.window_overlap),
      sites=tuple(s.path for s in site_list),
      frozen_grad=config.binary.frozen_grad,
      refresh_every=config.binary.refresh_every,
      per_example_activation_masks=config.binary.per_example_activation_masks,
      rules=rules)
  return binarization, site_list


def _kernel_mask(params) -> Any:
  """True on every conv/dense kernel (the leaves weight decay applies to)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', None) == 'kernel', params)


NONFINITE_POLICIES = ('error', 'skip')


@contextlib.contextmanager
def _as_setup_errors():
  """Turns the ValueErrors and missing files of config and data checks into SetupError."""
  try:
    yield
  except errors.SetupError:
    raise
  except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
    raise errors.SetupError(' '.join(str(e).split())) from e


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the names and ranges of `config` that need no data or devices (one-line errors)."""
  check_choice('train.on_nonfinite', config.train.on_nonfinite, NONFINITE_POLICIES)
  check_choice('model.name', config.model.name, models.MODEL_NAMES)
  check_choice('binary.method', config.binary.method, bctx.METHODS)
  check_choice('binary.order', config.binary.order, schedule.ORDERS)
  check_choice('binary.shape', config.binary.shape, schedule.SHAPES)
  schedule.ScheduleConfig(  # Checks the span and the window overlap.
      total_steps=1, order=config.binary.order, shape=config.binary.shape,
      span_start=config.binary.span_start, span_end=config.binary.span_end,
      window_overlap=config.binary.window_overlap)


class _Preemption:
  """SIGTERM asks the loop to save and stop at the next step boundary.

  One process: a Python SIGTERM handler sets a flag. Several processes: jax.distributed's
  preemption service receives the SIGTERM of any host and picks one step where all hosts stop
  (`reached_preemption_sync_point`, as orbax uses), so every host saves the same step.
  """

  def __init__(self):
    self.requested = False
    self._sync = jax.process_count() > 1
    self._handles_signal = not self._sync
    if self._handles_signal:
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self.requested = True

  def reached(self, step: int) -> bool:
    if not self._sync:
      return self.requested
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError as e:  # The preemption service is off (jax_enable_preemption_service).
      logging.warning('No preemption service (%s): SIGTERM will stop this run without a'
                      ' checkpoint.', e)
      self._sync = False
      return False

  def close(self):
    if self._handles_signal:
      signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)


def _closing(close):
  """An ExitStack exit callback running `close`; its failure after an error is only logged,
  so it does not hide that error (e.g. a full disk fails the save and then the close)."""
  def exit_callback(exc_type, exc, traceback):
    del exc, traceback
    try:
      close()
    except Exception as e:  # pylint: disable=broad-except
      if exc_type is None:
        raise
      logging.warning('Cleaning up after the error below failed too: %s: %s', type(e).__name__, e)
    return False
  return exit_callback


def _format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def evaluate(state, eval_fns, eval_batches) -> dict[str, float]:
  """Runs every eval function over the eval split: {'{name}_loss', '{name}_accuracy'}."""
  totals = {name: None for name in eval_fns}
  for batch in eval_batches():
    for name, fn in eval_fns.items():
      m = fn(state, batch)
      totals[name] = m if totals[name] is None else totals[name].merge(m)
  results = {}
  for name, total in totals.items():
    for key, value in total.compute().items():
      results[f'{name}_{key}'] = float(value)
  return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains and evaluates one run in `workdir`, resuming it if it has checkpoints.

  Every check of the config, the data, the devices and the workdir's earlier run comes before
  anything is written to `workdir`; those failures raise errors.SetupError.

  Returns:
    The final row: {'step', 'eval/...': accuracies and losses, 'preempted': bool}. A finished
    run returns its done.json.

  Raises:
    errors.SetupError: a bad config field, missing or malformed data, a batch that does not split over
      the devices, or a workdir holding another run or only unreadable checkpoints.
    errors.NonFiniteError: a non-finite loss or gradient under train.on_nonfinite=error (naming
      the step; no checkpoint holds that update), or a non-finite state at a checkpoint.
    errors.DiskFullError: a checkpoint did not fit on disk (older ones are intact).
  """
  with contextlib.ExitStack() as cleanup:
    with _as_setup_errors():
      validate_config(config)
      parallel.initialize_distributed()
      info = pipeline.dataset_info(config.data)
      total_steps, steps_per_epoch = total_train_steps(config.train, info.train_size)
      mesh = parallel.make_mesh(config.mesh.num_devices)
      parallel.check_batch_size(config.train.batch_size, mesh)
      parallel.check_batch_size(config.train.eval_batch_size, mesh, 'train.eval_batch_size')
      workdir_lib.check_config(workdir, config)
      model = models.create_model(config.model, num_classes=info.num_classes,
                                  image_shape=info.image_shape)
      binarization, site_list = build_binarization(config, model, info.image_shape, total_steps)
      lr_schedule = optimizers.learning_rate_schedule(config.optim, total_steps=total_steps,
                                                      steps_per_epoch=steps_per_epoch)
      sample = jnp.zeros((1, *info.image_shape), jnp.float32)
      abstract_params = jax.eval_shape(
          lambda: model.init(jax.random.PRNGKey(0), sample, train=False))['params']
      tx = optimizers.create_optimizer(config.optim, config.binary, lr_schedule=lr_schedule,
                                       kernel_sites=sites_lib.kernel_sites(site_list),
                                       kernel_mask=_kernel_mask(abstract_params))
      init_fn = functools.partial(state_lib.create_train_state, model, tx, config.seed, sample)
      abstract_state = jax.eval_shape(init_fn)
      state_shardings = parallel.state_sharding(abstract_state, mesh, config.mesh.shard_params)
      train_iter = pipeline.make_train_iterator(
          config.data, global_batch_size=config.train.batch_size, seed=config.seed)
      checkpointer = checkpoints.Checkpointer(
          workdir, config.train.keep_checkpoints,
          checkpoints.abstract_like(abstract_state, state_shardings))
      cleanup.push(_closing(checkpointer.close))
      restored = checkpointer.restore_latest(train_iter)
      parallel.check_same_on_all_processes('checkpoint step to resume from',
                                            -1 if restored is None else restored[0])

    if restored is None:
      state = jax.jit(init_fn, out_shardings=state_shardings)()
      start_step = 0
    else:
      start_step, state = restored
      logging.info('Resumed from the checkpoint at step %d in %s.', start_step, checkpointer.directory)
      done = workdir_lib.read_done(workdir)
      if start_step >= total_steps and done is not None:
        logging.info('%s is a finished run (done.json): nothing to do.', workdir)
        return done
    workdir_lib.write_config(workdir, config)
    workdir_lib.trim_metrics(workdir, start_step)  # Rows a killed run logged after its checkpoint.
    if site_list:
      logging.info('Binarized sites (forward order):\n%s', sites_lib.site_table(site_list))
    return _train_loop(config, workdir, cleanup, total_steps=total_steps, start_step=start_step,
                       state=state, model=model, binarization=binarization, tx=tx,
                       lr_schedule=lr_schedule, mesh=mesh, state_shardings=state_shardings,
                       image_shape=info.image_shape, train_iter=train_iter,
                       checkpointer=checkpointer)


def _abstract_batch(batch_size: int, image_shape, sharding, with_mask: bool) -> dict:
  """The shapes and dtypes of a global batch of the pipeline (pipeline.py documents them)."""
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  batch = {'image': spec((batch_size, *image_shape), jnp.float32),
           'label': spec((batch_size,), jnp.int32)}
  if with_mask:
    batch['mask'] = spec((batch_size,), jnp.float32)
  return batch


def _train_loop(config, workdir, cleanup, *, total_steps, start_step, state, model, binarization,
                tx, lr_schedule, mesh, state_shardings, image_shape, train_iter,
                checkpointer) -> dict[str, Any]:
  """Trains from `start_step` to `total_steps` (or a preemption), logging and saving."""
  config_json = config.to_dict()
  policy = config.train.on_nonfinite
  batch_sharding = parallel.batch_sharding(mesh)
  # Every program is compiled before the first step and the processes then wait for each other:
  # a process still compiling must not keep the others waiting inside a collective (gloo on CPU
  # gives up after 30 s).
  train_batch = _abstract_batch(config.train.batch_size, image_shape, batch_sharding, False)
  eval_batch = _abstract_batch(config.train.eval_batch_size, image_shape, batch_sharding, True)
  train_step = jax.jit(
      functools.partial(steps.train_step, model=model, binarization=binarization, tx=tx,
                        diagnostics=config.train.diagnostics),
      in_shardings=(state_shardings, batch_sharding),
      out_shardings=(state_shardings, None, None), donate_argnums=0,
  ).lower(state, train_batch).compile()
  eval_fns = {'eval_fully_binary': True} if config.binary.method != 'fp' else {}
  eval_fns['eval'] = False
  eval_fns = {
      name: jax.jit(functools.partial(steps.eval_step, model=model, binarization=binarization,
                                      fully_binary=fully_binary),
                    in_shardings=(state_shardings, batch_sharding)).lower(state, eval_batch).compile()
      for name, fully_binary in eval_fns.items()}
  parallel.wait_for_all_processes('stompp_jax: every process compiled its programs')

  def eval_batches():
    iterator = pipeline.make_eval_iterator(config.data,
                                           global_batch_size=config.train.eval_batch_size)
    for i, batch in enumerate(iterator):
      if config.train.eval_steps and i >= config.train.eval_steps:
        return
      yield parallel.global_batch(batch, mesh)

  def run_eval(step):
    results = evaluate(state, eval_fns, eval_batches)
    writer.write(step, 'eval', results)
    logging.info('eval at step %d | %s', step, ' | '.join(
        f'{k} {100 * v:.2f}%' for k, v in results.items() if k.endswith('accuracy')))
    return {'step': step, **results}

  writer = metrics_lib.MetricWriter(workdir, start_step)
  cleanup.push(_closing(writer.close))
  preemption = _Preemption()
  cleanup.push(_closing(preemption.close))
  train_metrics, nonfinite_flags, per_site = None, [], {}
  last_row = {'step': start_step}
  window_start, window_steps, step_time = time.perf_counter(), 0, None
  step = start_step
  while step < total_steps:
    batch = parallel.global_batch(next(train_iter), mesh)
    state, averaged, per_site = train_step(state, batch)
    step += 1
    window_steps += 1
    train_metrics = averaged if train_metrics is None else train_metrics.merge(averaged)
    nonfinite_flags.append(averaged.nonfinite.total)
    if policy == 'error' and len(nonfinite_flags) > 1:
      # The previous step's flag: waiting for it keeps this step queued, so the loop stops one
      # step after a non-finite one without stalling the device.
      _check_finite(nonfinite_flags[:-1], step - 1, policy)
      nonfinite_flags = nonfinite_flags[-1:]
    is_last = step == total_steps
    if step % config.train.log_every == 0 or is_last:
      _check_finite(nonfinite_flags, step, policy)
      nonfinite_flags = []
      values = {k: float(v) for k, v in train_metrics.compute().items()}
      elapsed = time.perf_counter() - window_start
      step_time = elapsed / window_steps
      values.update(learning_rate=float(lr_schedule(step - 1)),
                    images_per_second=config.train.batch_size / step_time,
                    eta_seconds=step_time * (total_steps - step),
                    **{k: np.asarray(v) for k, v in per_site.items()})
      writer.write(step, 'train', values)
      logging.info('step %d/%d | loss %.4f | acc %.2f%% | %.0f img/s | ETA %s', step, total_steps,
                   values['loss'], 100 * values['accuracy'], values['images_per_second'],
                   _format_duration(values['eta_seconds']))
      train_metrics, window_start, window_steps = None, time.perf_counter(), 0
    if is_last or (config.train.eval_every and step % config.train.eval_every == 0):
      last_row = run_eval(step)
      window_start = time.perf_counter()
    preempted = preemption.reached(step)
    if is_last or preempted or step % config.train.checkpoint_every == 0:
      _check_finite(nonfinite_flags, step, policy)
      nonfinite_flags = []
      checkpointer.save(step, state, train_iter, config_json)
    if preempted:
      checkpointer.wait()
      parallel.wait_for_all_processes('stompp_jax: preemption checkpoint saved')  # Then exit.
      logging.warning('Preempted (SIGTERM): saved the checkpoint at step %d in %s; run the same'
                      ' command to resume.', step, checkpointer.directory)
      return {**last_row, 'step': step, 'preempted': True}
  checkpointer.wait()
  if last_row['step'] != step:  # Resumed at the last step: the final eval was not logged.
    last_row = run_eval(step)
  last_row = {**last_row, 'step': step, 'preempted': False}
  workdir_lib.write_done(workdir, last_row)
  return last_row


def _check_finite(flags: list, step: int, policy: str) -> None:
  """Raises at the first non-finite step under policy 'error'; `flags` end at `step`."""
  if not flags:
    return
  values = np.asarray(jax.device_get(flags))
  bad = np.flatnonzero(values > 0)
  if bad.size == 0:
    return
  first = step - len(flags) + int(bad[0]) + 1
  if policy == 'error':
    raise errors.NonFiniteError(
        f'The loss or gradients are not finite at step {first}; that update was not applied and'
        ' no checkpoint holds it: lower optim.learning_rate (or set'
        ' optim.grad_clip_norm), or set train.on_nonfinite=skip to drop such updates.')
  logging.warning('Skipped %d non-finite updates up to step %d.', bad.size, step)
