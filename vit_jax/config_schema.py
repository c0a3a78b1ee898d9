"""The training config: its checked keys, and the data, model and checkpoint it names.

Every training-config fact that more than the loop needs lives here: the
types of the keys (`validate_config`), the module that serves its data
(`data_module`: tf.data or synthetic), the model a config builds (preset
`model_name` merged with the overrides in `model`: `model_config`), the
pre-trained checkpoint it starts from (`pretrained_path`, checked by
`check_pretrained_available`) and what that checkpoint decides (the model
and recipe a config leaves open: `resolve_config`). The loop
(vit_jax.train), the evaluators, vit_jax.hub, evaluate and benchmark read
them from here; none of them imports the loop.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping
from typing import Any

import ml_collections
from absl import logging

from vit_jax import checkpoint as ckpt_lib
from vit_jax import cli, models
from vit_jax.models import vit


class ConfigError(ValueError):
  """A config value has the wrong type or an impossible value."""



# ---------------------------------------------------------------------------
# Config validation: wrong types fail here, with the key's name, not deep in
# XLA or tf.data.
# ---------------------------------------------------------------------------

_NUM = (int, float)
_STR = (str,)
_INT = (int,)
_NONE = (type(None),)
_DICT = (ml_collections.ConfigDict, dict)

# Every key of a training config: (dotted key, accepted types, what it means).
# The one place these are documented (configs/common.py, the README and
# `python -m vit_jax.config_schema` show this table) and type-checked
# (`validate_config`). Types None means "a sub-config; its keys follow".
KEYS: tuple[tuple[str, tuple[type, ...] | None, str], ...] = (
    ('model_name', _STR + _NONE, "preset in vit_jax.models.MODEL_CONFIGS, e.g. 'ViT-B_16'"),
    ('model', _DICT + _NONE, 'ConfigDict merged over the preset (e.g. classifier=\'gap\'); '
     'may replace it fully; any model field, listed or not, can be set from the command '
     'line: --config.model.remat=full, --config.model.attention=einsum'),
    ('pretrained_dir', _STR + _NONE, 'where official checkpoints live'),
    ('pretrained_path', _STR + _NONE, 'checkpoint to fine-tune from: a path, URL or official '
     "name (ViT-B_16, imagenet21k+imagenet2012/ViT-B_16, AugReg B_16); None trains from "
     'scratch, never silently'),
    ('dataset', _STR, "TFDS name | 'folder:<root>' | 'npz:<file.npz>' | 'digits' | "
     "'synthetic' (random images made on the device; no data, no TensorFlow)"),
    ('skip_bad_images', (bool,), 'image folders: undecodable files stop the run (listed), or '
     'with True are left out (listed in skipped_images)'),
    ('tfds_data_dir', _STR + _NONE, 'TFDS data directory'),
    ('tfds_download', (bool,), 'let TFDS download the dataset'),
    ('train_split', _STR, "training split, slices allowed: 'train[:98%]'"),
    ('test_split', _STR, "the split of the built-in 'test' evaluator (accuracy_test)"),
    ('num_classes', _INT + _NONE, 'None: from the data'),
    ('image_size', _INT, 'training and eval resolution (paper: 384 for fine-tuning)'),
    ('pp.train', _STR, "'inception_crop' | 'rpt_augment' | 'resize'"),
    ('pp.eval', _STR, "'resize' | 'resize_crop'"),
    ('pp.crop_fraction', _NUM, "'resize_crop' keeps this central fraction "
     '(default images.CROP_FRACTION)'),
    ('seed', _INT, 'parameter init, dropout and data order'),
    ('shuffle_buffer', _INT + _NONE, 'streamed (TFDS) data only'),
    ('batch_size', _INT, 'global batch size'),
    ('batch_size_eval', _INT + _NONE, 'None: batch_size'),
    ('accum_steps', _INT, 'gradient accumulation: batch_size / accum_steps examples per '
     'micro-batch'),
    ('total_steps', _INT, 'optimizer updates'),
    ('lr.base', _NUM, 'peak learning rate'),
    ('lr.warmup_steps', _NUM, 'int, or a float = fraction of total_steps'),
    ('lr.decay_type', _STR, "'cosine' | 'linear'"),
    ('lr.linear_end', _NUM, "final lr of 'linear' decay"),
    ('optim.name', _STR, "'sgd' | 'adamw'"),
    ('optim.momentum', _NUM + _NONE, 'SGD momentum'),
    ('optim.momentum_dtype', _STR, "'bfloat16' halves the momentum's memory"),
    ('optim.weight_decay', _NUM + _NONE, 'decoupled weight decay'),
    ('optim.grad_clip_norm', _NUM + _NONE, 'global-norm clipping; None = off'),
    ('label_smoothing', _NUM, 'of the cross-entropy targets'),
    ('dtype', _STR, f"'auto' ({models.AUTO_DTYPE}) | 'float32' | 'bfloat16': "
     'computation dtype; params, optimizer state, softmax and loss stay float32'),
    ('polyak_decay', _NUM + _NONE, 'exponential moving average of the params (e.g. 0.9999); '
     'evaluated as <metric>_polyak and exported'),
    ('mpp', _DICT + _NONE, 'masked patch prediction pre-training (vit_jax/models/mpp.py)'),
    ('log_every', _INT, 'steps between console/TensorBoard lines'),
    ('eval_every', _INT + _NONE, "steps between runs of the built-in 'test' evaluator "
     '(0/None: only at the end)'),
    ('evals', _DICT + _NONE, 'more evaluators by name, each with a type (classification, '
     'fewshot) and its own every (vit_jax/evaluators.py); fewshot entries take '
     'skip_bad_images too (default: this config\'s)'),
    ('checkpoint_every', _INT + _NONE, 'steps between orbax checkpoints (and at the end)'),
    ('keep_checkpoints', _INT + _NONE, 'checkpoints kept; None keeps all'),
    ('mesh', _DICT + _NONE, 'data (-1 = all devices), fsdp (>1 shards params and optimizer '
     "state), min_size, rules [(regex, 'fsdp'|'replicate')]"),
    ('distill', _DICT + _NONE, 'DeiT hard-label distillation: teacher_model, '
     'teacher_checkpoint'),
    ('scratch_baseline', _DICT + _NONE, 'overrides of a from-scratch twin trained after a '
     'fine-tune, at equal steps (train.scratch_baseline_config)'),
    ('resume_changed', (bool,), 'True accepts a relaunch whose trajectory keys changed (logged '
     'in config_changes.jsonl); False refuses it'),
    ('recipes', _DICT + _NONE, 'named recipes {max_params, <values>}: the smallest that holds '
     "the model fills the values left None (configs/folder.py)"),
    ('recipe', _STR + _NONE, 'the recipe of `recipes` to use; None picks by size'),
)
_SCHEMA = {key: types for key, types, _ in KEYS}


def describe_keys() -> str:
  """The table of KEYS, as configs/common.py and `python -m vit_jax.config_schema` show it."""
  def types(t):
    return ' | '.join('None' if x is type(None) else 'ConfigDict' if x is ml_collections.ConfigDict
                      else x.__name__ for x in t if x is not dict)
  return '\n'.join(f'{key:22s} {types(t):24s} {doc}' for key, t, doc in KEYS)


_REQUIRED = ('dataset', 'train_split', 'test_split', 'image_size',
             'batch_size', 'total_steps', 'lr.base')


def lookup(config: Any, dotted: str) -> tuple[bool, Any]:
  """(present, value) of a dotted key such as 'lr.base'."""
  node = config
  for part in dotted.split('.'):
    if not hasattr(node, 'get') or part not in node:
      return False, None
    node = node[part]
  return True, node


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the key when a value has the wrong type."""
  for key in _REQUIRED:
    if not lookup(config, key)[0]:
      raise ConfigError(f'config.{key} is required but missing.')
  for key, types in _SCHEMA.items():
    present, value = lookup(config, key)
    if not present:
      continue
    # bool is an int subclass; a True batch size is a mistake, not a 1.
    if isinstance(value, bool) != (bool in types) or not isinstance(value, types):
      names = ' or '.join('None' if t is type(None) else t.__name__
                          for t in types)
      raise ConfigError(f'config.{key} must be {names}, got '
                        f'{type(value).__name__} {value!r}.')
  baseline = config.get('scratch_baseline')
  if baseline is not None:  # Its type: checked with the other KEYS above.
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
  sh, sw = vit.token_stride(mc)
  size = config.image_size
  if size % sh or size % sw:
    near = sorted({size // sh * sh, -(-size // sh) * sh} - {0})
    raise ConfigError(
        f'config.image_size={size} is not a whole number of {sh}x{sw} patches: '
        f'the last {size % sh} pixel rows and columns would be '
        f'dropped. Use image_size {" or ".join(map(str, near))}.')


def check_batch_fits_devices(config: ml_collections.ConfigDict,
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



def pretrained_path(config: ml_collections.ConfigDict) -> str | None:
  """config.pretrained_path; None, '' and 'None' (from a flag) mean scratch."""
  path = config.get('pretrained_path')
  return None if path in (None, '', 'None', 'none') else path



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


# ---------------------------------------------------------------------------
# The data module a config reads.
# ---------------------------------------------------------------------------

def data_module(config: Any):
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


# ---------------------------------------------------------------------------
# The model a config names.
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


@cli.command()
def main(args: cli.Args) -> None:
  """Prints every training-config key: its types and what it means (`KEYS`)."""
  del args
  print(describe_keys())


if __name__ == '__main__':
  sys.exit(main())
