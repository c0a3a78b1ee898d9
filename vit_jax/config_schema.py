"""The training config: its checked keys, and the data, model and checkpoint it names.

Every training-config fact that more than the loop needs lives here: the
types of the keys (`validate_config`), the module that serves its data
(`data_module`: tf.data or synthetic), the model a config builds (preset
`model_name` merged with the overrides in `model`: `model_config`), and the
pre-trained checkpoint it starts from (`pretrained_path`). The loop
(vit_jax.train), the evaluators, vit_jax.hub, evaluate and benchmark read
them from here; none of them imports the loop.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import ml_collections

from vit_jax import models
from vit_jax.models import vit


class ConfigError(ValueError):
  """A config value has the wrong type or an impossible value."""



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
