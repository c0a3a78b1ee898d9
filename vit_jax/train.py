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
  labels.txt           class names, one per line, in label order
  events.out.tfevents* TensorBoard scalars (train_loss, lr, accuracy_test,
                       loss_test, img_sec_core_train, ...)

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
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from vit_jax import checkpoint as ckpt_lib
from vit_jax import export as export_lib
from vit_jax import models, optim, sharding
from vit_jax import workdir as workdir_lib

PyTree = Any


class ConfigError(ValueError):
  """A config value has the wrong type or an impossible value."""


@dataclasses.dataclass
class TrainResult:
  """What `run` returns: final metrics, final (host) params, logged history."""
  metrics: dict[str, float]
  params: PyTree
  batch_stats: PyTree | None
  history: list[dict[str, float]]
  polyak: PyTree | None = None  # The Polyak average, with config.polyak_decay.


# ---------------------------------------------------------------------------
# Config validation: wrong types fail here, with the key's name, not deep in
# XLA or tf.data.
# ---------------------------------------------------------------------------

_NUM = (int, float)
_OPT_STR = (str, type(None))
_OPT_INT = (int, type(None))
_SCHEMA: dict[str, tuple[type, ...]] = {
    'model_name': _OPT_STR,
    'pretrained_path': _OPT_STR,
    'dataset': (str,),
    'train_split': (str,),
    'test_split': (str,),
    'num_classes': _OPT_INT,
    'image_size': (int,),
    'seed': (int,),
    'batch_size': (int,),
    'batch_size_eval': _OPT_INT,
    'total_steps': (int,),
    'accum_steps': (int,),
    'label_smoothing': _NUM,
    'mpp': (ml_collections.ConfigDict, dict, type(None)),
    'polyak_decay': _NUM + (type(None),),
    'eval_every': _OPT_INT,
    'checkpoint_every': _OPT_INT,
    'keep_checkpoints': _OPT_INT,
    'log_every': (int,),
    'lr.base': _NUM,
    'lr.warmup_steps': _NUM,
    'lr.decay_type': (str,),
    'lr.linear_end': _NUM,
    'optim.name': (str,),
    'optim.momentum': _NUM + (type(None),),
    'optim.momentum_dtype': (str,),
    'optim.weight_decay': _NUM + (type(None),),
    'optim.grad_clip_norm': _NUM + (type(None),),
    'dtype': (str,),
    'resume_changed': (bool,),
}
_REQUIRED = ('dataset', 'train_split', 'test_split', 'image_size',
             'batch_size', 'total_steps', 'lr.base')


def _lookup(config: Any, dotted: str) -> tuple[bool, Any]:
  node = config
  for part in dotted.split('.'):
    if not hasattr(node, 'get') or part not in node:
      return False, None
    node = node[part]
  return True, node


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the key when a value has the wrong type."""
  for key in _REQUIRED:
    if not _lookup(config, key)[0]:
      raise ConfigError(f'config.{key} is required but missing.')
  for key, types in _SCHEMA.items():
    present, value = _lookup(config, key)
    if not present:
      continue
    # bool is an int subclass; a True batch size is a mistake, not a 1.
    if isinstance(value, bool) != (bool in types) or not isinstance(value, types):
      names = ' or '.join('None' if t is type(None) else t.__name__
                          for t in types)
      raise ConfigError(f'config.{key} must be {names}, got '
                        f'{type(value).__name__} {value!r}.')
  baseline = config.get('scratch_baseline')
  if baseline is not None:
    if not isinstance(baseline, (ml_collections.ConfigDict, dict)):
      raise ConfigError('config.scratch_baseline must be None or a ConfigDict '
                        f'of overrides, got {type(baseline).__name__} {baseline!r}.')
    if not pretrained_path(config):
      raise ConfigError('config.scratch_baseline compares fine-tuning with '
                        'training from scratch: set config.pretrained_path.')
  if not config.get('model_name') and not config.get('model'):
    raise ConfigError('Set config.model_name (a preset, e.g. "ViT-B_16") '
                      'and/or config.model (a model config).')
  name = config.get('model_name')
  if name and name not in models.MODEL_CONFIGS:
    raise ConfigError(f'config.model_name={name!r} is not a preset; known: '
                      f'{", ".join(sorted(models.MODEL_CONFIGS))}.')
  for key in ('batch_size', 'total_steps', 'image_size', 'log_every'):
    if key in config and config[key] <= 0:
      raise ConfigError(f'config.{key} must be > 0, got {config[key]}.')
  decay = config.get('polyak_decay')
  if decay is not None and not 0 <= decay < 1:
    raise ConfigError(f'config.polyak_decay must be in [0, 1) (e.g. 0.9999) or None '
                      f'for no averaging, got {decay}.')
  accum = config.get('accum_steps', 1) or 1
  if accum < 1 or config.batch_size % accum:
    raise ConfigError(f'config.batch_size={config.batch_size} must be a '
                      f'multiple of config.accum_steps={accum}.')
  if config.get('dtype', 'auto') not in models.DTYPES:
    raise ConfigError(f'config.dtype must be one of {models.DTYPES}, got '
                      f'{config.dtype!r}.')
  lr = config.lr.base
  if not (math.isfinite(lr) and lr > 0):
    raise ConfigError(f'config.lr.base must be a finite number > 0, got {lr} '
                      '(a negative lr climbs the loss instead of descending it).')
  _check_image_fits_patches(config)


def _check_image_fits_patches(config: ml_collections.ConfigDict) -> None:
  """image_size must be a whole number of patches: none silently dropped."""
  mc = model_config(config)
  if mc.get('model_type', 'vit') != 'vit' or not mc.get('patches'):
    return
  ph, pw = tuple(mc.patches.size)
  resnet = mc.get('resnet')
  # Hybrid: the patches are cut from the ResNet feature map (root conv /2,
  # max-pool /2, each later stage /2).
  stride = 4 * 2 ** (len(tuple(resnet.num_layers)) - 1) if resnet else 1
  size = config.image_size
  if size % (ph * stride) or size % (pw * stride):
    cell = f'{ph * stride}x{pw * stride}'
    near = sorted({size // (ph * stride) * ph * stride,
                   -(-size // (ph * stride)) * ph * stride} - {0})
    raise ConfigError(
        f'config.image_size={size} is not a whole number of {cell} patches: '
        f'the last {size % (ph * stride)} pixel rows and columns would be '
        f'dropped. Use image_size {" or ".join(map(str, near))}.')


def _check_batch_fits_devices(config: ml_collections.ConfigDict,
                              num_devices: int) -> None:
  accum = config.get('accum_steps', 1) or 1
  per_step = config.batch_size // accum
  if per_step % num_devices:
    raise ConfigError(
        f'config.batch_size / config.accum_steps = {config.batch_size} / '
        f'{accum} = {per_step} examples per micro-batch, not divisible by the '
        f'{num_devices} devices. Change batch_size or accum_steps.')
  eval_bs = config.get('batch_size_eval') or config.batch_size
  if eval_bs % num_devices:
    raise ConfigError(f'config.batch_size_eval={eval_bs} is not divisible by '
                      f'the {num_devices} devices.')


# ---------------------------------------------------------------------------
# Model.
# ---------------------------------------------------------------------------

def _merge(base: dict, over: Mapping) -> dict:
  out = dict(base)
  for k, v in over.items():
    if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
      out[k] = _merge(dict(out[k]), v)
    else:
      out[k] = v
  return out


def model_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The preset `config.model_name` with `config.model` merged over it."""
  base = (models.get_config(config.model_name).to_dict()
          if config.get('model_name') else {})
  over = config.get('model') or {}
  if isinstance(over, ml_collections.ConfigDict):
    over = over.to_dict()
  merged = _merge(base, over)
  merged.setdefault('model_name', config.get('model_name') or 'model')
  return ml_collections.ConfigDict(merged)


def build_model(config: ml_collections.ConfigDict, num_classes: int):
  """(module, model config); computes in `config.dtype` (models.resolve_dtype)."""
  mc = model_config(config)
  return models.get_model(mc, num_classes=num_classes,
                          dtype=config.get('dtype', 'auto')), mc


# ---------------------------------------------------------------------------
# Data: tf.data from input_pipeline, or `synthetic` (no TensorFlow at all).
# ---------------------------------------------------------------------------

def data_module(config: ml_collections.ConfigDict):
  """The module that serves config.dataset: `synthetic` or `input_pipeline`.

  Both offer checked_config, get_dataset_info, make_train_iter, make_eval_iter,
  to_global.
  """
  # pylint: disable=g-import-not-at-top
  if config.dataset == 'synthetic':
    from vit_jax import synthetic
    return synthetic
  from vit_jax import input_pipeline  # TensorFlow comes in here.
  return input_pipeline


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
# Resolution: what the checkpoint decides (model, recipe), before anything runs.
# ---------------------------------------------------------------------------

def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy with the model and recipe filled in from the checkpoint.

  * Model: with neither config.model_name nor config.model set, the
    pre-trained checkpoint's own (`checkpoint.infer_model`: its sidecar, else
    the one preset with its parameter tree). A model that is set must fit the
    checkpoint; `load_pretrained` says what the file is when it does not.
  * Recipe: `config.recipes` (e.g. configs/folder.py) maps names to
    {'max_params': N, <config values>}; the smallest recipe whose max_params
    holds the model's parameter count (head and position embeddings
    excluded), or the one named by config.recipe, fills every value that is
    still None.
  Resolving a resolved config changes nothing.
  """
  config = config.copy_and_resolve_references()
  with config.unlocked():
    path = pretrained_path(config)
    if path and not (config.get('model_name') or config.get('model')):
      check_pretrained_available(config)
      mc = ckpt_lib.infer_model(path)
      name = mc.get('model_name')
      if name in models.MODEL_CONFIGS and _same(models.get_config(name), mc):
        config.model_name = name
      else:
        config.model_name, config.model = None, mc
      logging.info('Model %s, from the checkpoint %s.', mc.get('model_name'), path)
    recipes = config.get('recipes')
    if recipes and (config.get('model_name') or config.get('model')):
      num_params = ckpt_lib.num_backbone_params(model_config(config))
      name = config.get('recipe') or min(
          (r.max_params, n) for n, r in recipes.items() if r.max_params >= num_params)[1]
      if name not in recipes:
        raise ConfigError(f'config.recipe={name!r} is not one of config.recipes: '
                          f'{", ".join(recipes)}.')
      values = recipes[name].to_dict()
      values.pop('max_params', None)
      filled = _fill_none(config, values)
      config.recipe = name
      if filled:
        logging.info('Recipe %r of config.recipes (%s parameters): %s.', name,
                     f'{num_params:,}', ', '.join(filled))
  return config


def _same(a: ml_collections.ConfigDict, b: ml_collections.ConfigDict) -> bool:
  return (json.dumps(a.to_dict(), sort_keys=True, default=list) ==
          json.dumps(b.to_dict(), sort_keys=True, default=list))


def _fill_none(node: ml_collections.ConfigDict, values: Mapping,
               prefix: str = '') -> list[str]:
  """Sets the values whose key is None in `node`; returns 'key=value' of those."""
  filled = []
  for key, value in values.items():
    if isinstance(value, Mapping) and node.get(key) is not None:
      filled += _fill_none(node[key], value, f'{prefix}{key}.')
    elif node.get(key) is None:
      node[key] = value
      filled.append(f'{prefix}{key}={value}')
  return filled


# ---------------------------------------------------------------------------
# Steps. Pure functions of (state, batch); `run` jits them with shardings.
# ---------------------------------------------------------------------------

def make_train_step(model, tx: optax.GradientTransformation,
                    schedule: Callable, config: ml_collections.ConfigDict,
                    teacher: Any = None, objective: Any = None) -> Callable:
  """Returns train_step(state, batch, rng, teacher_vars) -> (state, metrics).

  `teacher` is the frozen teacher module (or None); its variables come in as
  the `teacher_vars` argument, so they are not baked into the executable.

  Dropout rng: fold_in(rng, step), then fold_in(., micro-batch index) inside
  `optim.accumulate_gradients`, so resumed runs and any accum_steps draw
  reproducible masks. With `teacher` (DeiT hard-label distillation) the model
  returns (B, 2, C) logits at train time and the loss is
  0.5 * CE(cls, y) + 0.5 * CE(dist, argmax teacher(x)). An `objective`
  (objective_from_config) replaces the classification loss.
  """
  accum = int(config.get('accum_steps', 1) or 1)
  smoothing = float(config.get('label_smoothing', 0.0) or 0.0)
  polyak_decay = config.get('polyak_decay')

  def train_step(state, batch, rng, teacher_vars=None):
    def loss_fn(params, batch, rng, batch_stats):
      variables = {'params': params}
      if objective is not None:
        return jnp.mean(objective.loss(model, variables, batch, rng)), batch_stats
      kwargs = {'train': True, 'rngs': {'dropout': rng}}
      if batch_stats is not None:
        variables['batch_stats'] = batch_stats
        logits, new_vars = model.apply(variables, batch['image'],
                                       mutable=['batch_stats'], **kwargs)
        batch_stats = new_vars['batch_stats']
      else:
        logits = model.apply(variables, batch['image'], **kwargs)
      if teacher is not None:
        # DeiT hard-label distillation (Touvron et al.; RPT report, Table 1).
        t_logits = jax.lax.stop_gradient(
            teacher.apply(teacher_vars, batch['image'], train=False))
        t_labels = jnp.argmax(t_logits, axis=-1)
        loss = 0.5 * optim.cross_entropy(logits[:, 0], batch['label'],
                                         smoothing)
        loss += 0.5 * optim.cross_entropy(logits[:, 1], t_labels, smoothing)
      else:
        loss = optim.cross_entropy(logits, batch['label'], smoothing)
      return jnp.mean(loss), batch_stats

    step = state['step']
    loss, batch_stats, grads = optim.accumulate_gradients(
        loss_fn, state['params'], batch, jax.random.fold_in(rng, step),
        accum, state.get('batch_stats'))
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    new_state = dict(state, step=step + 1,
                     params=optax.apply_updates(state['params'], updates),
                     opt_state=opt_state)
    if batch_stats is not None:
      new_state['batch_stats'] = batch_stats
    if polyak_decay is not None:
      new_state['polyak'] = optim.polyak_update(state['polyak'], new_state['params'],
                                                polyak_decay)
    metrics = {'train_loss': loss, 'grad_norm': optax.global_norm(grads),
               'lr': schedule(step)}
    return new_state, metrics

  return train_step


def make_eval_step(model, objective: Any = None) -> Callable:
  """eval_step(params, batch_stats, batch) -> masked sums of correct, loss.

  With an `objective`, its own accuracy and loss (e.g. masked patch
  prediction's) instead of the labels'.
  """
  def eval_step(params, batch_stats, batch):
    variables = {'params': params}
    if batch_stats is not None:
      variables['batch_stats'] = batch_stats
    if objective is not None:
      return objective.eval_sums(model, variables, batch)
    logits = model.apply(variables, batch['image'], train=False)
    mask = batch['mask']
    loss = optim.cross_entropy(logits, batch['label'])
    correct = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
    return {'correct': jnp.sum(correct * mask), 'loss': jnp.sum(loss * mask),
            'count': jnp.sum(mask)}
  return eval_step


def evaluate_split(eval_step: Callable, params: Any, batch_stats: Any,
                   config: ml_collections.ConfigDict, batch_sh: Any,
                   split: str | None = None) -> dict[str, float]:
  """Accuracy and loss over every example of `split` (default test_split).

  One pass of input_pipeline.make_eval_iter (padded last batch, masked), so
  the count is exact; used by the training loop and by vit_jax.evaluate.
  """
  data = data_module(config)
  sums = None
  for batch in data.make_eval_iter(config, split):
    out = eval_step(params, batch_stats, data.to_global(batch, batch_sh))
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  sums = {k: float(v) for k, v in sharding.to_host(sums).items()}
  return {'accuracy_test': sums['correct'] / sums['count'],
          'loss_test': sums['loss'] / sums['count'],
          'num_test_examples': sums['count']}


# ---------------------------------------------------------------------------
# Helpers of the loop.
# ---------------------------------------------------------------------------

_REMOTE_HOSTS = {'gs': ('storage.googleapis.com', 443)}


def check_remote_reachable(path: str, timeout: float = 10.0) -> None:
  """Fails in seconds, not minutes, when a gs:// file cannot be reached.

  tf.io.gfile retries for ~200 s without network; a TCP connect to the
  storage host with a timeout tells us first.
  """
  from vit_jax import download  # pylint: disable=g-import-not-at-top
  scheme = path.split('://', 1)[0] if '://' in path else None
  if scheme not in _REMOTE_HOSTS or download.bucket_path(path) is not None:
    return   # Official files come through vit_jax.download, with its own timeout.
  host, port = _REMOTE_HOSTS[scheme]
  reason = ckpt_lib.unreachable(host, port, timeout)
  if reason:
    raise ckpt_lib.CheckpointError(
        f'Cannot read {path}: {reason}. No network here? Download the checkpoint '
        f'on a machine that has one and set config.pretrained_path to the local '
        f'file.\n{ckpt_lib.DOWNLOAD_HINT}')


def pretrained_path(config: ml_collections.ConfigDict) -> str | None:
  """config.pretrained_path; None, '' and 'None' (from a flag) mean scratch."""
  path = config.get('pretrained_path')
  return None if path in (None, '', 'None', 'none') else path


def check_pretrained_available(config: ml_collections.ConfigDict) -> None:
  """Fails before any data or model work when the checkpoint is missing.

  Never falls back to random init: a fine-tune from scratch by accident is
  the worst kind of silent failure.
  """
  path = pretrained_path(config)
  if not path:
    return
  # An official name or URL: downloaded (once) now, not after the data work.
  path = ckpt_lib.local_path(path)
  if '://' in path:
    check_remote_reachable(path)
  elif not os.path.exists(path):
    raise ckpt_lib.CheckpointError(
        f'Pre-trained checkpoint not found: {path}\n{ckpt_lib.DOWNLOAD_HINT}'
        f'\nTo train from scratch instead, set --config.pretrained_path=None.')


def load_teacher(config: ml_collections.ConfigDict, num_classes: int):
  """(module, variables) of the frozen DeiT teacher, or None."""
  distill = config.get('distill')
  if not distill:
    return None
  teacher = models.get_model(distill.teacher_model, num_classes=num_classes)
  path = distill.teacher_checkpoint
  check_remote_reachable(path)
  variables = ckpt_lib.load_variables(path)
  size = config.image_size
  expected = jax.eval_shape(lambda: teacher.init(
      jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), train=False))
  want = ckpt_lib.flatten({k: v for k, v in expected.items()
                           if k in ('params', 'batch_stats')})
  got = ckpt_lib.flatten(variables)
  bad = sorted(k for k in set(want) | set(got)
               if k not in want or k not in got
               or tuple(want[k].shape) != tuple(np.shape(got[k])))
  if bad:
    raise ckpt_lib.CheckpointError(
        f'Teacher checkpoint {path} does not fit config.distill.teacher_model='
        f'{distill.teacher_model!r}: {len(bad)} keys missing or of another '
        f'shape, e.g. {", ".join(bad[:5])}.')
  return teacher, variables


def _put(tree: PyTree, shardings: PyTree) -> PyTree:
  """Host numpy tree -> global arrays, every process passing the same values."""
  def one(x, s):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
  return jax.tree.map(one, tree, shardings)


class _Throughput:
  """Images/sec of training only: compilation, eval and checkpoints excluded."""

  def __init__(self):
    self.steps = self.total_steps = 0
    self.time = self.total_time = 0.0
    self._t = None

  def start(self):
    self._t = time.perf_counter()

  def pause(self):
    if self._t is not None:
      dt = time.perf_counter() - self._t
      self.time += dt
      self.total_time += dt
      self._t = None

  def tick(self):
    self.steps += 1
    self.total_steps += 1

  def window(self) -> tuple[float, float]:
    """(steps/sec since the last call, steps/sec over the whole run)."""
    self.pause()
    rate = (self.steps / self.time if self.time > 0 and self.steps
            else float('nan'))
    total = (self.total_steps / self.total_time
             if self.total_time > 0 and self.total_steps else float('nan'))
    self.steps, self.time = 0, 0.0
    self.start()
    return rate, total


def _fmt_time(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


class _DropOrbaxChatter:
  """Drops orbax's INFO lines (one per file written); keeps its warnings."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or '/orbax/' not in record.pathname


def quiet_orbax_logs() -> None:
  absl_logger = logging.get_absl_logger()
  if not any(isinstance(f, _DropOrbaxChatter) for f in absl_logger.filters):
    absl_logger.addFilter(_DropOrbaxChatter())


class MetricLog:
  """clu writer (TensorBoard + log) plus `metrics.jsonl` for quick plots.

  After a resume the steps between the last checkpoint and the crash appear
  twice in metrics.jsonl; the later line is the one that counts.
  """

  def __init__(self, writer, jsonl_path: str | None):
    self._writer = writer
    self._path = jsonl_path

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if self._writer is not None:
      self._writer.write_scalars(step, scalars)
    if self._path:
      with open(self._path, 'a') as f:
        f.write(json.dumps({'step': int(step),
                            **{k: float(v) for k, v in scalars.items()}}) + '\n')

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


def _metric_writer(workdir: str, is_main: bool):
  """clu's TensorBoard writer (process 0), or None (other processes, or no TensorFlow)."""
  # pylint: disable=g-import-not-at-top
  try:
    from clu import metric_writers
  except ImportError:  # clu's writers import TensorFlow.
    logging.warning('TensorFlow is not installed: no TensorBoard events; '
                    'metrics go to metrics.jsonl and the log lines.')
    return None
  # TensorBoard only: the console gets one line per log step from the loop
  # (clu's logging writer printed each of them a second time).
  return metric_writers.SummaryWriter(workdir) if is_main else None


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
  # TensorFlow comes in with the data and clu's TensorBoard writer: slow
  # imports, so only after the quick checks.
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  data = data_module(config)
  # Every image decoded once, before compiling: all bad files in one message.
  config = data.checked_config(config, workdir)
  is_main = jax.process_index() == 0
  total_steps = config.total_steps
  log_every = config.get('log_every', 10) or 10
  eval_every = config.get('eval_every') or 0
  ckpt_every = config.get('checkpoint_every') or 0
  writer = MetricLog(_metric_writer(workdir, is_main),
                     os.path.join(workdir, 'metrics.jsonl') if is_main else None)

  # ========================= Mesh =========================
  mesh = sharding.make_mesh(config.get('mesh'))
  _check_batch_fits_devices(config, mesh.size)
  batch_sh = sharding.batch_sharding(mesh)
  repl = sharding.replicated(mesh)
  logging.info('Mesh %s over %d devices in %d process(es).', dict(mesh.shape),
               mesh.size, jax.process_count())

  # ========================= Data =========================
  info = data.get_dataset_info(config)
  num_classes = config.get('num_classes') or info.num_classes
  if is_main:
    with open(os.path.join(workdir, 'labels.txt'), 'w') as f:
      f.write(''.join(f'{name}\n' for name in info.class_names))
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
  model, mc = build_model(config, objective.num_outputs if objective else num_classes)
  teacher = load_teacher(config, num_classes)
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

  ckpt_dir = os.path.join(os.path.abspath(workdir), 'checkpoints')
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
      params = ckpt_lib.load_pretrained(
          path, sharding.to_host(state['params']), mc)
      state['params'] = _put(params, state_sh['params'])
      if 'polyak' in state:
        state['polyak'] = _put(params, state_sh['polyak'])
      logging.info('Loaded pre-trained weights from %s.', path)
  start_step = int(sharding.to_host(state['step']))
  # The launch is accepted: config.json becomes this run's identity.
  workdir_lib.log_accepted_changes(workdir, accepted_changes, latest)
  workdir_lib.write_config(config, workdir)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract['params']))
  logging.info('Model %s: %s parameters.', mc.model_name, f'{num_params:,}')

  # ========================= Jitted steps =========================
  teacher_module = teacher_vars = teacher_sh = None
  if teacher is not None:
    teacher_module = teacher[0]
    teacher_sh = jax.tree.map(lambda _: repl, teacher[1])
    teacher_vars = _put(teacher[1], teacher_sh)
  train_step = jax.jit(
      make_train_step(model, tx, schedule, config, teacher_module, objective),
      in_shardings=(state_sh, batch_sh, repl, teacher_sh),
      out_shardings=(state_sh, repl), donate_argnums=(0,))
  eval_step = jax.jit(
      make_eval_step(model, objective),
      in_shardings=(state_sh['params'], state_sh.get('batch_stats'), batch_sh),
      out_shardings=repl)

  def evaluate(state) -> dict[str, float]:
    ev = evaluate_split(eval_step, state['params'], state.get('batch_stats'),
                        config, batch_sh)
    if 'polyak' in state:
      ev.update(polyak_metrics(evaluate_split(
          eval_step, state['polyak'], state.get('batch_stats'), config, batch_sh)))
    return ev

  fewshot_cfg = (config.get('evals') or {}).get('fewshot')
  fewshot = None
  if fewshot_cfg:
    from vit_jax import fewshot as fewshot_lib  # pylint: disable=g-import-not-at-top
    fewshot = fewshot_lib.FewShotEvaluator(fewshot_cfg, model)

  # ========================= Loop =========================
  history: list[dict[str, float]] = []
  pending: list[tuple[int, dict]] = []
  last_saved = latest
  meter = _Throughput()
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
                 'lr': float(metrics_lr(schedule, step))}
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
                   _fmt_time(eta) + (f' (with the {steps_after} steps of the scratch '
                                     'baseline)' if steps_after else ''))

    do_eval = eval_every and step % eval_every == 0 and step != total_steps
    fewshot_every = fewshot_cfg.get('every', 0) if fewshot is not None else 0
    do_fewshot = (fewshot_every and step % fewshot_every == 0
                  and step != total_steps)
    do_ckpt = (ckpt_every and step % ckpt_every == 0) or step == total_steps
    if do_eval or do_ckpt or do_fewshot:
      jax.block_until_ready(state['step'])
      meter.pause()
      flush(step)  # Never checkpoint a diverged state.
      if do_eval:
        ev = evaluate(state)
        writer.write_scalars(step, {k: v for k, v in ev.items()
                                    if k.startswith(('accuracy_test', 'loss_test'))})
        logging.info('step %d | accuracy_test %.4f | loss_test %.4f', step,
                     ev['accuracy_test'], ev['loss_test'])
      if do_fewshot:
        shots = fewshot.run(state['params'])
        writer.write_scalars(step, shots)
        logging.info('step %d | %s', step,
                     ' | '.join(f'{k} {v:.4f}' for k, v in shots.items()))
      if do_ckpt and guard.suspect and step != total_steps:
        logging.warning('Not checkpointing step %d: train_loss %.4g is above '
                        'the divergence bound %.4g.', step, guard.over[-1][1],
                        guard.bound)
      elif do_ckpt:
        manager.save(step, args=ocp.args.StandardSave(state))
        workdir_lib.write_digest(ckpt_dir, step)
        last_saved = step
      meter.start()
  manager.wait_until_finished()

  # ========================= Final eval and export =========================
  final = evaluate(state)
  if fewshot is not None:
    final.update(fewshot.run(state['params']))
  writer.write_scalars(total_steps, final)
  writer.flush()
  logging.info('Final (step %d): %s', total_steps,
               ', '.join(f'{k} {v:.4f}' for k, v in final.items()))
  params = sharding.to_host(state['params'])
  batch_stats = (sharding.to_host(state['batch_stats'])
                 if 'batch_stats' in state else None)
  polyak = sharding.to_host(state['polyak']) if 'polyak' in state else None
  export_path = os.path.join(workdir, f'{mc.model_name}.npz')
  if is_main:
    export_lib.write(export_path, params, polyak, batch_stats, model_config=mc)
    with open(os.path.join(workdir, 'final_metrics.json'), 'w') as f:
      json.dump(dict(final, step=total_steps), f, indent=2)
    logging.info('Exported the trained params to %s.', export_path)
  manager.close()
  writer.close()
  final['step'] = total_steps
  if history:
    final['train_loss'] = history[-1]['train_loss']
  return TrainResult(final, params, batch_stats, history, polyak)


def polyak_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
  """Eval metrics of the Polyak-averaged params, named `<metric>_polyak`."""
  return {f'{k}_polyak': v for k, v in metrics.items() if k != 'num_test_examples'}


def metrics_lr(schedule: Callable, step: int) -> float:
  """lr used by update number `step` (1-based)."""
  return optim.lr_at(schedule, step)


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
    if _lookup(base, key) != _lookup(config, key):
      raise ConfigError(
          f'config.scratch_baseline must not change {key}: the comparison is '
          f'at equal steps, data and resolution ({_lookup(config, key)[1]!r} '
          f'vs {_lookup(base, key)[1]!r}).')
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
