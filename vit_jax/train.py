"""The one training loop: fine-tune a pre-trained ViT or train from scratch.

Reads top to bottom like the recipe (ViT paper, Appendix B.1.1; RPT report,
section 4.2):

  config -> mesh -> data -> model -> state (sharded init, pre-trained weights
  or resume) -> optimizer -> jitted train / eval steps -> loop (log, eval,
  checkpoint, NaN and divergence guards) -> export `<workdir>/<model_name>.npz`.

Workdir layout (others rely on it):
  config.json          the resolved config: the run's identity, written once
                       the launch is accepted; a relaunch that changes a
                       trajectory key is refused (vit_jax.workdir)
  checkpoints/<step>/  orbax checkpoints of {step, params, opt_state[,
                       batch_stats][, polyak]} plus vit_jax_digest.json;
                       training resumes from the newest one that verifies
  workdir.lock         the live run holding the workdir (vit_jax.workdir)
  config_changes.jsonl changes accepted with --config.resume_changed=True
  damaged_checkpoints/ steps that failed verification, moved aside
  <model_name>.npz     final params in the official layout (`checkpoint.load`);
                       the Polyak average when config.polyak_decay is set
  <model_name>_raw.npz the raw final params, only with config.polyak_decay
  <model_name>.json    its sidecar (checkpoint.read_sidecar): model config,
                       num_classes, eval preprocessing, timm.create_model
                       arguments or why there are none (export.sidecar_record)
  labels.txt           class names, one per line, in label order (not for MPP,
                       whose head predicts colours)
  test_files.txt       the held-out test images of a stratified folder split
  final_metrics.json   the final eval (and its step)
  run_info.json        dtype, platform, device kind and count, jax version
  metrics.jsonl        every logged scalar, one JSON object per line; after a
                       resume a step may repeat (the later line counts)
  events.out.tfevents* TensorBoard scalars, plain simple_value (train_loss,
                       lr, accuracy_test, loss_test, img_sec_core_train, ...),
                       when tensorboard is installed (vit_jax.metrics)
  curves.png           train loss, test accuracy and lr vs step, at the end
                       of the run, when matplotlib is installed (vit_jax.curves)

Differences from the original on purpose: the first update has a nonzero lr
and the logged lr is the one the step used; eval scores every test example;
checkpoints follow `checkpoint_every`; resume continues at the exact step with
the data position restored; the fine-tuned weights are exported.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import parameter_overview

from vit_jax import config_schema, evaluators, hub
from vit_jax import curves as curves_lib
from vit_jax import export as export_lib
from vit_jax import metrics as metrics_lib
from vit_jax import optim, sharding
from vit_jax import train_step as train_step_lib
from vit_jax import workdir as workdir_lib
from vit_jax.config_schema import (ConfigError, check_pretrained_available, model_config,
                                   pretrained_path, resolve_config, validate_config)

PyTree = Any


@dataclasses.dataclass
class TrainResult:
  """What `run` returns: final metrics, final (host) params, logged history."""
  metrics: dict[str, float]
  params: PyTree
  batch_stats: PyTree | None
  history: list[dict[str, float]]
  polyak: PyTree | None = None  # The Polyak average, with config.polyak_decay.


# ---------------------------------------------------------------------------
# Data: tf.data from input_pipeline, or `synthetic` (config_schema.data_module).
# ---------------------------------------------------------------------------

def device_prefetch(batches, size: int = 2):
  """Keeps `size` batches on the devices ahead of the step that uses them.

  The host-to-device copy of batch k+1 (an async `device_put` inside
  `to_global`) then overlaps step k instead of following it.
  """
  queue = collections.deque()
  for batch in batches:
    queue.append(batch)
    if len(queue) >= size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def objective_from_config(config: ml_collections.ConfigDict):
  """The self-supervised objective of `config.mpp` (masked patch prediction,
  vit_jax/models/mpp.py), or None for the supervised classification loss."""
  if config.get('mpp') is None:
    return None
  from vit_jax.models import mpp  # pylint: disable=g-import-not-at-top
  try:
    return mpp.from_config(config, tuple(model_config(config).patches.size))
  except ValueError as e:
    raise ConfigError(str(e)) from e


# ---------------------------------------------------------------------------
# Steps. Pure functions of (state, batch); `run` jits them with shardings.
# ---------------------------------------------------------------------------

# ---------------------------------------------------------------------------
# Helpers of the loop.
# ---------------------------------------------------------------------------

def _put(tree: PyTree, shardings: PyTree) -> PyTree:
  """Host numpy tree -> global arrays, every process passing the same values."""
  def one(x, s):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
  return jax.tree.map(one, tree, shardings)


class _DropOrbaxChatter:
  """Drops orbax's INFO lines (one per file written); keeps its warnings."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or '/orbax/' not in record.pathname


def quiet_orbax_logs() -> None:
  absl_logger = logging.get_absl_logger()
  if not any(isinstance(f, _DropOrbaxChatter) for f in absl_logger.filters):
    absl_logger.addFilter(_DropOrbaxChatter())


def write_run_info(workdir: str, model: Any) -> None:
  """<workdir>/run_info.json: the resolved dtype and where the run ran."""
  dtype = jnp.dtype(getattr(model, 'dtype', jnp.float32)).name
  device = jax.devices()[0]
  logging.info('Computing in %s on %d %s device(s) (%s).', dtype, jax.device_count(),
               device.platform, device.device_kind)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'run_info.json'), 'w') as f:
      json.dump({'dtype': dtype, 'platform': device.platform,
                 'device_kind': device.device_kind, 'device_count': jax.device_count(),
                 'process_count': jax.process_count(), 'jax': jax.__version__}, f, indent=2)


class DivergenceGuard:
  """Stops a run whose train loss ran away while staying finite.

  The NaN guard catches non-finite metrics; this one catches a finite blow-up
  (lr far too high): the logged train loss above
  max(FACTOR x the first logged train loss, ln(num_classes) + MARGIN) for
  PATIENCE log steps in a row. While the loss is above the bound no
  checkpoint is written, so the last checkpoint stays a good one.
  """
  FACTOR = 10.0
  MARGIN = 10.0
  PATIENCE = 3

  def __init__(self, num_classes: int):
    self.floor = math.log(max(num_classes, 2)) + self.MARGIN
    self.first: float | None = None
    self.over: list[tuple[int, float]] = []

  @property
  def bound(self) -> float:
    return max(self.FACTOR * (self.first or 0.0), self.floor)

  @property
  def suspect(self) -> bool:
    return bool(self.over)

  def update(self, step: int, loss: float) -> str | None:
    """Records a logged loss; returns why to stop, or None."""
    if self.first is None:
      self.first = loss
    if loss <= self.bound:
      self.over.clear()
      return None
    self.over.append((step, loss))
    if len(self.over) < self.PATIENCE:
      return None
    shown = ', '.join(f'{v:.4g} at step {s}' for s, v in self.over)
    return (f'train_loss {shown}: above {self.bound:.4g} (the larger of '
            f'{self.FACTOR:g}x the first logged train_loss {self.first:.4g} and '
            f'ln(num_classes)+{self.MARGIN:g}) for {self.PATIENCE} log steps in '
            'a row')


def _diverged_advice(config: ml_collections.ConfigDict, last_saved: int | None,
                     ckpt_dir: str) -> str:
  advice = (f'Lower config.lr.base (now {config.lr.base}), set '
            'config.optim.grad_clip_norm (e.g. 1.0) or check the data. ')
  if last_saved is None:
    return advice + 'No checkpoint was saved before.'
  return advice + (
      f'The last good checkpoint, step {last_saved} in {ckpt_dir}, is kept; to '
      'continue from it with a lower lr add --config.resume_changed=True, or '
      'start afresh in a new --workdir.')


# ---------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------

def run(config: ml_collections.ConfigDict, workdir: str, *,
        steps_after: int = 0) -> TrainResult:
  """Trains and evaluates; see the module docstring for what lands in workdir.

  Holds the workdir's lock (vit_jax.workdir) for the whole run.
  `steps_after`: steps of later runs of the same command (the scratch
  baseline), so that the logged ETA covers the whole command.
  """
  config = resolve_config(config)  # Model and recipe from the checkpoint.
  validate_config(config)
  logging.info('Config (resolved):\n%s', config)
  with workdir_lib.hold(workdir):
    return _run(config, workdir, steps_after)


def _run(config: ml_collections.ConfigDict, workdir: str,
         steps_after: int) -> TrainResult:
  # ========================= Config =========================
  quiet_orbax_logs()
  # A relaunch that would change the resumed trajectory fails here, in
  # seconds, and leaves config.json (the run's identity) as it was.
  accepted_changes = workdir_lib.check_config_drift(config, workdir)
  check_pretrained_available(config)  # Fail in seconds, before any data work.
  workdir_lib.remove_stale_exports(workdir)
  # TensorFlow comes in with the data: slow
  # imports, so only after the quick checks.
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  data = config_schema.data_module(config)
  # Every image decoded once, before compiling: all bad files in one message.
  config = data.checked_config(config, workdir)
  is_main = jax.process_index() == 0
  total_steps = config.total_steps
  log_every = config.get('log_every', 10) or 10
  ckpt_every = config.get('checkpoint_every') or 0
  writer = metrics_lib.MetricLog(metrics_lib.metric_writer(workdir, is_main),
                                 os.path.join(workdir, 'metrics.jsonl') if is_main else None)

  # ========================= Mesh =========================
  mesh = sharding.make_mesh(config.get('mesh'))
  config_schema.check_batch_fits_devices(config, mesh.size)
  batch_sh = sharding.batch_sharding(mesh)
  repl = sharding.replicated(mesh)
  logging.info('Mesh %s over %d devices in %d process(es).', dict(mesh.shape),
               mesh.size, jax.process_count())

  # ========================= Data =========================
  info = data.get_dataset_info(config)
  num_classes = config.get('num_classes') or info.num_classes
  wd = workdir_lib.Workdir(workdir)
  if is_main:
    if info.held_out_test_files:
      with open(os.path.join(workdir, 'test_files.txt'), 'w') as f:
        f.write(''.join(f'{p}\n' for p in info.held_out_test_files))
  logging.info('Dataset %s: %d train / %d test examples, %d classes%s.',
               config.dataset, info.num_train, info.num_test, num_classes,
               ' (num_classes set in the config)' if config.get('num_classes') else
               ' (from the data)')
  for what, description in (('train', info.train_description),
                            ('test', info.test_description)):
    if 'stratified' in description:
      logging.info('Split %s: %s%s.', what, description,
                   '; its files are listed in test_files.txt' if what == 'test' else '')

  # ========================= Model =========================
  objective = objective_from_config(config)  # None: classification.
  if objective is None and info.class_names and len(info.class_names) == num_classes:
    wd.write_labels(info.class_names)   # The head's classes (not MPP's targets).
  model, mc = hub.build(config, objective.num_outputs if objective else num_classes)
  teacher = hub.load_teacher(config, num_classes)
  write_run_info(workdir, model)

  # ========================= Optimizer =========================
  schedule = optim.schedule_from_config(config)
  tx = optim.make_optimizer(config.get('optim') or ml_collections.ConfigDict(),
                            schedule)

  # ========================= State: init, pre-trained or resume ============
  rng = jax.random.PRNGKey(config.get('seed', 0))
  init_rng, dropout_rng = jax.random.split(rng)
  dummy = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)

  def init_state(rng):
    variables = model.init({'params': rng, 'dropout': rng}, dummy, train=False,
                           **(objective.init_kwargs(config.image_size) if objective else {}))
    params = variables['params']
    state = {'step': jnp.zeros((), jnp.int32), 'params': params,
             'opt_state': tx.init(params)}
    if 'batch_stats' in variables:
      state['batch_stats'] = variables['batch_stats']
    if config.get('polyak_decay') is not None:
      state['polyak'] = params  # The average starts at the initial params.
    return state

  logging.info('Initialising the model%s...', f' and loading {pretrained_path(config)}'
               if pretrained_path(config) else '')
  abstract = jax.eval_shape(init_state, init_rng)
  rules = sharding.rules_from_config(config.get('mesh'))
  state_sh = sharding.state_shardings(
      abstract, mesh, rules, (config.get('mesh') or {}).get('min_size', 2 ** 12))

  ckpt_dir = wd.checkpoints_dir
  def make_manager():
    return ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
        max_to_keep=config.get('keep_checkpoints', 3) or None,
        enable_async_checkpointing=False, create=True,
        cleanup_tmp_directories=True))  # Leftovers of a run killed mid-save.
  target = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract, state_sh)
  # The newest step that verifies (digest, restores, holds its own step);
  # damaged or stray ones are moved to <workdir>/damaged_checkpoints.
  manager, latest, state = workdir_lib.restore_newest_intact(
      make_manager, lambda m, step: m.restore(
          step, args=ocp.args.StandardRestore(target)),
      workdir, ckpt_dir, lambda s: int(sharding.to_host(s['step'])))
  if latest is not None:
    logging.info('Resumed from %s at step %d.', ckpt_dir, latest)
  else:
    state = jax.jit(init_state, out_shardings=state_sh)(init_rng)
    if pretrained_path(config):
      # Paper App. B.1.1: new zero-init head, posemb resized to the new grid.
      path = pretrained_path(config)
      params = hub.load_pretrained(path, sharding.to_host(state['params']), mc)
      state['params'] = _put(params, state_sh['params'])
      if 'polyak' in state:
        state['polyak'] = _put(params, state_sh['polyak'])
      logging.info('Loaded pre-trained weights from %s.', path)
  start_step = int(sharding.to_host(state['step']))
  # The launch is accepted: config.json becomes this run's identity.
  workdir_lib.log_accepted_changes(workdir, accepted_changes, latest)
  workdir_lib.write_config(config, workdir)
  parameter_overview.log_parameter_overview(
      abstract['params'], include_stats=False, msg=f'Model {mc.model_name}: parameters')

  # ========================= Jitted steps =========================
  teacher_module = teacher_vars = teacher_sh = None
  if teacher is not None:
    teacher_module = teacher[0]
    teacher_sh = jax.tree.map(lambda _: repl, teacher[1])
    teacher_vars = _put(teacher[1], teacher_sh)
  train_step = jax.jit(
      train_step_lib.make_train_step(model, tx, schedule, config, teacher_module, objective),
      in_shardings=(state_sh, batch_sh, repl, teacher_sh),
      out_shardings=(state_sh, repl), donate_argnums=(0,))
  evals = evaluators.from_config(config, model, objective=objective,
                                 state_sh=state_sh, batch_sh=batch_sh)

  # ========================= Loop =========================
  history: list[dict[str, float]] = []
  pending: list[tuple[int, dict]] = []
  last_saved = latest
  meter = metrics_lib.Throughput()
  batch_size = config.batch_size
  guard = DivergenceGuard(num_classes)

  def flush(step: int) -> dict[str, float]:
    """Fetches pending step metrics, stops on NaN/Inf, returns their mean."""
    fetched = [(s, sharding.to_host(m)) for s, m in pending]
    pending.clear()
    for s, m in fetched:
      if not all(np.isfinite(v) for v in m.values()):
        raise FloatingPointError(
            f'Training diverged: non-finite metrics at step {s}: '
            f'{ {k: float(v) for k, v in m.items()} }. '
            + _diverged_advice(config, last_saved, ckpt_dir))
    return {k: float(np.mean([m[k] for _, m in fetched]))
            for k in fetched[0][1]} if fetched else {}

  train_iter = (device_prefetch(data.to_global(b, batch_sh) for b in
                                data.make_train_iter(config, start_step=start_step))
                if start_step < total_steps else None)
  for step in range(start_step + 1, total_steps + 1):
    batch = next(train_iter)
    if step == start_step + 1:
      logging.info('Compiling the train step (the first step includes it)...')
      compile_start = time.perf_counter()
    state, metrics = train_step(state, batch, dropout_rng, teacher_vars)
    pending.append((step, metrics))
    if step == start_step + 1:  # The first step includes compilation.
      jax.block_until_ready(metrics)
      compile_sec = time.perf_counter() - compile_start
      logging.info('First step (with compilation) took %.1fs.', compile_sec)
      writer.write_scalars(step, {'compile_sec': compile_sec})
      meter.start()
    else:
      meter.tick()

    if step % log_every == 0 or step == total_steps:
      jax.block_until_ready(metrics)
      means = flush(step)
      rate, avg_rate = meter.window()
      scalars = {'train_loss': means['train_loss'],
                 'grad_norm': means['grad_norm'],
                 # The lr this step's update used (the original logged the
                 # previous step's).
                 'lr': optim.lr_at(schedule, step)}
      if math.isfinite(rate):
        scalars['img_sec_core_train'] = rate * batch_size / mesh.size
      writer.write_scalars(step, scalars)
      history.append(dict(step=step, **scalars))
      why = guard.update(step, scalars['train_loss'])
      if why:
        raise FloatingPointError(f'Training diverged: {why}. '
                                 + _diverged_advice(config, last_saved, ckpt_dir))
      eta = (total_steps - step + steps_after) / avg_rate if avg_rate > 0 else float('nan')
      speed = (f'{rate * batch_size:.1f} img/s ({rate * batch_size / mesh.size:.1f}'
               '/core)' if math.isfinite(rate) else 'img/s after compilation')
      logging.info('step %d/%d | train_loss %.4f | lr %.2e | %s | ETA %s', step,
                   total_steps, scalars['train_loss'], scalars['lr'], speed,
                   metrics_lib.fmt_time(eta) + (f' (with the {steps_after} steps of the scratch '
                                     'baseline)' if steps_after else ''))

    due = [e for e in evals if e.every and step % e.every == 0 and step != total_steps]
    do_ckpt = (ckpt_every and step % ckpt_every == 0) or step == total_steps
    if due or do_ckpt:
      jax.block_until_ready(state['step'])
      meter.pause()
      flush(step)  # Never checkpoint a diverged state.
      for evaluator in due:
        ev = evaluator(state)
        writer.write_scalars(step, {k: v for k, v in ev.items() if not k.startswith('num_')})
        logging.info('step %d | %s', step, ' | '.join(
            f'{k} {v:.4f}' for k, v in ev.items() if not k.startswith('num_')))
      if do_ckpt and guard.suspect and step != total_steps:
        logging.warning('Not checkpointing step %d: train_loss %.4g is above '
                        'the divergence bound %.4g.', step, guard.over[-1][1],
                        guard.bound)
      elif do_ckpt:
        workdir_lib.save_step(manager, ckpt_dir, step, state, last_saved)
        last_saved = step
      meter.start()
  manager.wait_until_finished()

  # ========================= Final eval and export =========================
  final = {}
  for evaluator in evals:
    final.update(evaluator(state))
  writer.write_scalars(total_steps, final)
  writer.flush()
  logging.info('Final (step %d): %s', total_steps,
               ', '.join(f'{k} {v:.4f}' for k, v in final.items()))
  params = sharding.to_host(state['params'])
  batch_stats = (sharding.to_host(state['batch_stats'])
                 if 'batch_stats' in state else None)
  polyak = sharding.to_host(state['polyak']) if 'polyak' in state else None
  export_path = wd.export_path(model_name=mc.model_name)
  if is_main:
    export_lib.write(export_path, params, polyak, batch_stats, model_config=mc,
                     preprocessing=export_lib.preprocessing_from_config(config))
    with open(os.path.join(workdir, 'final_metrics.json'), 'w') as f:
      json.dump(dict(final, step=total_steps), f, indent=2)
    logging.info('Exported the trained params to %s.', export_path)
    curves_lib.write_curves(workdir)  # curves.png: loss, test accuracy, lr
  manager.close()
  writer.close()
  final['step'] = total_steps
  if history:
    final['train_loss'] = history[-1]['train_loss']
  return TrainResult(final, params, batch_stats, history, polyak)


def scratch_baseline_config(
    config: ml_collections.ConfigDict) -> ml_collections.ConfigDict | None:
  """The from-scratch twin of a fine-tuning config, or None.

  `config.scratch_baseline` (a ConfigDict of overrides, {} for none) asks
  for the RPT report's title comparison at equal cost: the same model, data,
  resolution, augmentation, batch size and number of steps, from random
  initialisation, with the recipe of training from scratch given by the
  overrides (e.g. AdamW at 1e-3 where fine-tuning uses SGD at 0.01).
  """
  over = config.get('scratch_baseline')
  if over is None:
    return None
  base = config.copy_and_resolve_references()
  with base.unlocked():
    base.update(over)
    base.pretrained_path = None
    base.scratch_baseline = None
  for key in _EQUAL_IN_BASELINE:
    if config_schema.lookup(base, key) != config_schema.lookup(config, key):
      raise ConfigError(
          f'config.scratch_baseline must not change {key}: the comparison is '
          f'at equal steps, data and resolution ({config_schema.lookup(config, key)[1]!r} '
          f'vs {config_schema.lookup(base, key)[1]!r}).')
  return base


_EQUAL_IN_BASELINE = ('dataset', 'train_split', 'test_split', 'image_size',
                      'batch_size', 'total_steps', 'model_name', 'model',
                      'pp.train', 'pp.eval', 'seed')


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, float]:
  """Runs training; returns the final metrics (accuracy_test, loss_test, ...).

  With config.scratch_baseline set, then trains the from-scratch twin
  (scratch_baseline_config) in workdir/scratch and adds its metrics with the
  suffix `_scratch`; workdir/comparison.json holds both.
  """
  config = resolve_config(config)  # The baseline trains the checkpoint's model.
  baseline = scratch_baseline_config(config)  # Fails before hours of training.
  metrics = run(config, workdir,
                steps_after=baseline.total_steps if baseline is not None else 0).metrics
  if baseline is None:
    return metrics
  logging.info('Training the from-scratch baseline in %s/scratch.', workdir)
  scratch = run(baseline, os.path.join(workdir, 'scratch')).metrics
  metrics.update({f'{k}_scratch': v for k, v in scratch.items()
                  if k in ('accuracy_test', 'loss_test', 'train_loss')})
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'comparison.json'), 'w') as f:
      json.dump({'steps': config.total_steps,
                 'fine_tuned': {'pretrained_path': pretrained_path(config),
                                'accuracy_test': metrics['accuracy_test']},
                 'from_scratch': {'accuracy_test': scratch['accuracy_test']}},
                f, indent=2)
  return metrics
