"""train_and_evaluate: the one entry point that the CLI, notebooks and tests call.

Builds the data, model, site table, optimizer and sharded train state, restores the newest
checkpoint of `workdir` if there is one, and trains with periodic logging, evaluation and
checkpoints. See README.md for the run directory and the metric keys.
"""

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
    site_list = sites_lib.discover_sites(model.init, rules, jax.random.PRNGKey(0),
                                         sites_lib.sample_input(image_shape), train=False)
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


class _Preemption:
  """SIGTERM (or the multi-host preemption service) asks the loop to save and stop."""

  def __init__(self):
    self.requested = False
    self._multi_host = jax.process_count() > 1
    if not self._multi_host:
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self.requested = True

  def reached(self, step: int) -> bool:
    if self._multi_host:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def close(self):
    if not self._multi_host:
      signal.signal(signal.SIGTERM, self._previous)


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

  Returns:
    The final row: {'step', 'eval/...': accuracies and losses, 'preempted': bool}.
  """
  check_choice('train.on_nonfinite', config.train.on_nonfinite, ('error', 'skip'))
  parallel.initialize_distributed()
  workdir_lib.prepare(workdir, config)
  config_json = config.to_dict()
  info = pipeline.dataset_info(config.data)
  model = models.create_model(config.model, num_classes=info.num_classes,
                              image_shape=info.image_shape)
  total_steps, steps_per_epoch = total_train_steps(config.train, info.train_size)
  binarization, site_list = build_binarization(config, model, info.image_shape, total_steps)
  if site_list:
    logging.info('Binarized sites (forward order):\n%s', sites_lib.site_table(site_list))

  mesh = parallel.make_mesh(config.mesh.num_devices)
  parallel.check_batch_size(config.train.batch_size, mesh)
  parallel.check_batch_size(config.train.eval_batch_size, mesh, 'train.eval_batch_size')
  lr_schedule = optimizers.learning_rate_schedule(config.optim, total_steps=total_steps,
                                                  steps_per_epoch=steps_per_epoch)
  sample = jnp.zeros((1, *info.image_shape), jnp.float32)
  abstract_params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), sample, train=False))['params']
  tx = optimizers.create_optimizer(config.optim, config.binary, lr_schedule=lr_schedule,
                                   kernel_sites=sites_lib.kernel_sites(site_list),
                                   kernel_mask=_kernel_mask(abstract_params))
  init_fn = functools.partial(state_lib.create_train_state, model, tx, config.seed, sample)
  abstract_state = jax.eval_shape(init_fn)
  state_shardings = parallel.state_sharding(abstract_state, mesh, config.mesh.shard_params)

  train_iter = pipeline.make_train_iterator(config.data, global_batch_size=config.train.batch_size,
                                            seed=config.seed)
  checkpointer = checkpoints.Checkpointer(workdir, config.train.keep_checkpoints)
  restored = checkpointer.restore_latest(
      checkpoints.abstract_like(abstract_state, state_shardings), train_iter)
  if restored is None:
    state = jax.jit(init_fn, out_shardings=state_shardings)()
    start_step = 0
  else:
    start_step, state = restored
    workdir_lib.trim_metrics(workdir, start_step)
    logging.info('Resumed from the checkpoint at step %d in %s.', start_step, checkpointer.directory)

  batch_sharding = parallel.batch_sharding(mesh)
  train_step = jax.jit(
      functools.partial(steps.train_step, model=model, binarization=binarization, tx=tx,
                        diagnostics=config.train.diagnostics),
      in_shardings=(state_shardings, batch_sharding),
      out_shardings=(state_shardings, None, None), donate_argnums=0)
  eval_fns = {'eval_fully_binary': True} if config.binary.method != 'fp' else {}
  eval_fns['eval'] = False
  eval_fns = {
      name: jax.jit(functools.partial(steps.eval_step, model=model, binarization=binarization,
                                      fully_binary=fully_binary),
                    in_shardings=(state_shardings, batch_sharding))
      for name, fully_binary in eval_fns.items()}

  def eval_batches():
    iterator = pipeline.make_eval_iterator(config.data,
                                           global_batch_size=config.train.eval_batch_size)
    for i, batch in enumerate(iterator):
      if config.train.eval_steps and i >= config.train.eval_steps:
        return
      yield parallel.global_batch(batch, mesh)

  writer = metrics_lib.MetricWriter(workdir)
  preemption = _Preemption()
  train_metrics, nonfinite_flags, per_site = None, [], {}
  last_row = {'step': start_step}
  window_start, window_steps, step_time = time.perf_counter(), 0, None
  step = start_step
  try:
    while step < total_steps:
      batch = parallel.global_batch(next(train_iter), mesh)
      state, averaged, per_site = train_step(state, batch)
      step += 1
      window_steps += 1
      train_metrics = averaged if train_metrics is None else train_metrics.merge(averaged)
      nonfinite_flags.append(averaged.nonfinite.total)
      is_last = step == total_steps
      if step % config.train.log_every == 0 or is_last:
        _check_finite(nonfinite_flags, step, config.train.on_nonfinite)
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
        results = evaluate(state, eval_fns, eval_batches)
        writer.write(step, 'eval', results)
        logging.info('eval at step %d | %s', step, ' | '.join(
            f'{k} {100 * v:.2f}%' for k, v in results.items() if k.endswith('accuracy')))
        last_row = {'step': step, **results}
        window_start = time.perf_counter()
      preempted = preemption.reached(step)
      if is_last or preempted or step % config.train.checkpoint_every == 0:
        _check_finite(nonfinite_flags, step, config.train.on_nonfinite)
        nonfinite_flags = []
        checkpointer.save(step, state, train_iter, config_json)
      if preempted:
        checkpointer.wait()
        logging.warning('Preempted: saved the checkpoint at step %d; run the same command to resume.', step)
        return {**last_row, 'step': step, 'preempted': True}
    checkpointer.wait()
    last_row = {**last_row, 'step': step, 'preempted': False}
    workdir_lib.write_done(workdir, last_row)
    return last_row
  finally:
    preemption.close()
    checkpointer.close()
    writer.close()


def _check_finite(flags: list, step: int, policy: str) -> None:
  """Raises at the first step whose loss or gradients were not finite (policy 'error')."""
  if not flags:
    return
  values = np.asarray(jax.device_get(flags))
  bad = np.flatnonzero(values > 0)
  if bad.size == 0:
    return
  first = step - len(flags) + int(bad[0]) + 1
  if policy == 'error':
    raise FloatingPointError(
        f'Loss or gradients are not finite at step {first} (the update was not applied): lower'
        ' optim.learning_rate, or set train.on_nonfinite=skip to drop such updates.')
  logging.warning('Skipped %d non-finite updates up to step %d.', bad.size, step)
