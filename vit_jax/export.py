"""Export a training checkpoint (any step) to an official-layout ``.npz``.

The original code could not do this, and it was its most asked question::

  python -m vit_jax.export --workdir=/tmp/vit_cifar10 --out=model.npz           # latest step
  python -m vit_jax.export --workdir=/tmp/vit_cifar10 --step=500 --out=s500.npz

The export rule, the same for training's final export and for this command
(`write`): with Polyak averaging (config.polyak_decay) the file holds the
averaged params and ``<name>_raw.npz`` beside it the raw ones; masked patch
prediction's ``mask_embedding`` is left out (vit_jax/models/mpp.py).

Training keeps orbax checkpoints of its whole state (step, params, optimizer
state, BatchNorm statistics) in ``workdir/checkpoints``. We read ONLY the
parameters (and ``batch_stats`` if any) with orbax's partial restore, as host
numpy arrays: no optimizer, no model code and no device mesh are needed, so a
checkpoint written on 8 GPUs exports on a laptop. The result is written by
``vit_jax.checkpoint.save``, i.e. the layout of ``gs://vit_models/*.npz``, and
read back to check that it is bit-identical; the sidecar ``<out minus .npz>.json``
records the architecture (from the workdir's config.json), so that
``--config.pretrained_path=<out>`` needs no model name.

The file is also what timm's ViT loader reads, so it moves to PyTorch as is.
The sidecar's ``timm`` entry holds the exact ``timm.create_model(**...)``
arguments (`timm_recipe`: architecture, tanh GELU, pooling, class count,
``custom_load=True`` for the ``.npz``); for what timm cannot represent
faithfully (hybrids, ``pre_logits``, SPT/RPT tokenizers, LSA, non-1-D
position embeddings, ...) it is null and ``timm_unsupported`` says why::

  import json, timm
  args = json.load(open('model.json'))['timm']   # written by this command
  model = timm.create_model(**args).eval()       # run where model.npz lies
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import flags

from vit_jax import cli
from vit_jax.images import CROP_FRACTION, hw
from vit_jax.models.vit import config_value
from vit_jax.workdir import Workdir, WorkdirError

class ExportError(ValueError):
  """The checkpoint cannot be exported, and why."""


def raw_path(path: str) -> str:
  """Where the raw params go when `path` holds the Polyak average."""
  base, ext = os.path.splitext(path)
  return f'{base}_raw{ext or ".npz"}'


def write(path: str, params: Any, polyak: Any | None = None,
          batch_stats: Any | None = None, model_config: Any = None,
          preprocessing: Mapping[str, Any] | None = None) -> list[str]:
  """Writes trained params in the official layout; returns the files written.

  `path` gets the Polyak average when there is one (what the paper reports),
  the raw params then going to `raw_path(path)`. With `model_config`, each
  file gets its sidecar (`sidecar_record`): the architecture, the class
  count, `preprocessing` (see `preprocessing_from_config`) and the timm recipe.
  """
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from vit_jax.models import mpp  # pylint: disable=g-import-not-at-top
  files = [(path, polyak if polyak is not None else params)]
  if polyak is not None:
    files.append((raw_path(path), params))
  for out, tree in files:
    tree = mpp.export_params(tree)
    checkpoint.save(tree, out, batch_stats=batch_stats)
    if model_config is not None:
      checkpoint.write_sidecar(out, model_config, **sidecar_record(
          model_config, tree, preprocessing, file=os.path.basename(out)))
  return [out for out, _ in files]


# ---------------------------------------------------------------------------
# The sidecar's extra fields, and the timm recipe.
# ---------------------------------------------------------------------------

# timm's registry entry whose constructor we call; every architecture argument
# is given explicitly, so the name only picks the VisionTransformer class.
TIMM_MODEL_NAME = 'vit_base_patch16_224'
# Model-config keys that change nothing timm has to reproduce.
_TIMM_NEUTRAL_KEYS = {'model_name', 'model_type', 'patches', 'hidden_size', 'transformer',
                      'classifier', 'representation_size', 'resnet', 'posemb', 'tokenizer',
                      'head_bias_init', 'dtype', 'attention', 'remat'}
_TIMM_NEUTRAL_TRANSFORMER_KEYS = {'mlp_dim', 'num_heads', 'num_layers', 'dropout_rate',
                                  'attention_dropout_rate', 'locality_attention'}


class TimmUnsupported(ExportError):
  """timm's VisionTransformer cannot reproduce this model; the message says why."""


def _as_dict(cfg: Any) -> dict[str, Any]:
  return cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg or {})


def timm_unsupported(model_config: Any) -> str | None:
  """Why timm's VisionTransformer cannot reproduce `model_config`, or None."""
  mc = _as_dict(model_config)
  t = _as_dict(mc.get('transformer'))
  if config_value(mc, 'model_type', 'vit') != 'vit':
    return f'model_type {mc["model_type"]!r} is not a ViT'
  if mc.get('resnet'):
    return 'hybrid (ResNet + ViT) models are not exported to timm'
  if mc.get('representation_size'):
    return ("the model has a pre_logits layer (representation_size="
            f"{mc['representation_size']}), which timm's loader silently drops")
  if mc.get('tokenizer'):
    return (f"timm has no {config_value(mc['tokenizer'], 'type', '?')!r} tokenizer "
            '(shifted/rotated patch tokenization)')
  if t.get('locality_attention'):
    return 'timm has no locality self-attention (LSA: learned temperature, diagonal mask)'
  if config_value(mc, 'posemb', 'learn') != 'learn':
    return (f"timm's ViT has only learned 1-D position embeddings, not posemb="
            f"{mc['posemb']!r}")
  classifier = config_value(mc, 'classifier', 'token')
  if classifier not in ('token', 'gap'):
    return f'classifier {classifier!r} has no timm VisionTransformer equivalent'
  extra = sorted(set(mc) - _TIMM_NEUTRAL_KEYS) + sorted(
      f'transformer.{k}' for k in set(t) - _TIMM_NEUTRAL_TRANSFORMER_KEYS)
  if extra:
    return f'model config keys timm knows nothing of: {", ".join(extra)}'
  d, mlp = int(mc['hidden_size']), int(t['mlp_dim'])
  if int(d * (mlp / d)) != mlp:
    return f'timm cannot express mlp_dim {mlp} as int(hidden_size {d} * mlp_ratio)'
  return None


def timm_recipe(model_config: Any, num_classes: int, image_size: Any, *,
                file: str | None = None, pp_eval: str = 'resize',
                crop_fraction: float = CROP_FRACTION) -> dict[str, Any]:
  """The exact ``timm.create_model(**recipe)`` arguments for `model_config`.

  The result builds timm's VisionTransformer with our architecture (tanh
  GELU, LayerNorm eps 1e-6, and for `gap` no class token and the final norm
  before pooling: `fc_norm=False`) and `num_classes` outputs, and with `file`
  (an exported ``.npz``) loads it through timm's own ``.npz`` reader
  (``custom_load=True``; without it timm treats the file as a torch
  checkpoint). The overlay also gives timm's data config our eval
  preprocessing: inputs in [-1, 1], bilinear squash resize (+ central crop for
  ``resize_crop``). Raises TimmUnsupported with the reason when timm cannot
  reproduce the model.
  """
  why = timm_unsupported(model_config)
  if why:
    raise TimmUnsupported(why)
  mc = _as_dict(model_config)
  t = mc['transformer']
  h, w = hw(image_size)
  gap = config_value(mc, 'classifier', 'token') == 'gap'
  recipe = {
      'model_name': TIMM_MODEL_NAME,
      'pretrained': file is not None,
      'img_size': [h, w],
      'patch_size': list(hw(config_value(mc['patches'], 'size'))),
      'embed_dim': int(mc['hidden_size']),
      'depth': int(t['num_layers']),
      'num_heads': int(t['num_heads']),
      'mlp_ratio': int(t['mlp_dim']) / int(mc['hidden_size']),
      'qkv_bias': True,
      'act_layer': 'gelu_tanh',  # flax nn.gelu is the tanh approximation
      'class_token': not gap,
      'global_pool': 'avg' if gap else 'token',
      'fc_norm': False,  # ours: encoder_norm, then pool (timm's gap default differs)
      'num_classes': int(num_classes or 0),
  }
  if file is not None:
    squash = pp_eval in ('resize', 'resize_crop')
    recipe['pretrained_cfg_overlay'] = {
        'file': file, 'custom_load': True, 'num_classes': int(num_classes or 0),
        'input_size': [3, h, w], 'mean': [0.5, 0.5, 0.5], 'std': [0.5, 0.5, 0.5],
        'interpolation': 'bilinear',
        'crop_pct': float(crop_fraction) if pp_eval == 'resize_crop' else 1.0,
        'crop_mode': 'squash' if squash else 'center'}
  return recipe


def preprocessing_from_config(config: Any) -> dict[str, Any] | None:
  """{'image_size': [h, w], 'pp_eval', 'crop_fraction'} of a training config, or None."""
  size = config_value(config, 'image_size')
  if not size:
    return None
  pp = config_value(config, 'pp', {})
  return {'image_size': list(hw(size)), 'pp_eval': config_value(pp, 'eval', 'resize'),
          'crop_fraction': float(config_value(pp, 'crop_fraction', CROP_FRACTION))}


def sidecar_record(model_config: Any, params: Any,
                   preprocessing: Mapping[str, Any] | None = None,
                   file: str | None = None) -> dict[str, Any]:
  """The sidecar's fields besides "model": num_classes, preprocessing, timm.

  The class count and a `pre_logits` Dense are read off `params`; the image
  size from `preprocessing`, else from the position embeddings. `file`: the
  ``.npz`` name the timm recipe loads (relative to the sidecar's directory).
  """
  from vit_jax import checkpoint, hub  # pylint: disable=g-import-not-at-top
  info = checkpoint.describe(params)
  num_classes = info.get('num_classes')
  record: dict[str, Any] = {'num_classes': num_classes}
  if preprocessing:
    record['preprocessing'] = dict(preprocessing)
  mc = _as_dict(model_config)
  if info.get('representation_size') and not mc.get('representation_size'):
    mc['representation_size'] = info['representation_size']
  why = timm_unsupported(mc)
  size = (preprocessing or {}).get('image_size')
  if not why and not size:
    size = hub.trained_image_size(params, mc)
    if not size:
      why = 'the image size is unknown (no training config, no square position grid)'
  if why:
    return dict(record, timm=None, timm_unsupported=why)
  pp = preprocessing or {}
  return dict(record, timm=timm_recipe(
      mc, num_classes, size, file=file, pp_eval=pp.get('pp_eval', 'resize'),
      crop_fraction=pp.get('crop_fraction', CROP_FRACTION)))


def _flat(tree: Any) -> dict[str, np.ndarray]:
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  return checkpoint.flatten(tree)


def export(workdir: str, out: str, step: int | None = None) -> tuple[int, str]:
  """Writes step ``step`` (default latest) of ``workdir`` to ``out``; returns (step, out).

  Raises ExportError unless the written file loads back bit-identically.
  """
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from vit_jax.models import mpp  # pylint: disable=g-import-not-at-top
  wd = Workdir(workdir)
  try:
    step, variables = wd.restore(step)
  except WorkdirError as e:
    raise ExportError(str(e)) from None
  # The sidecar: fine-tuning and predict take the architecture from it.
  model_config = preprocessing = None
  if wd.is_run():
    import ml_collections  # pylint: disable=g-import-not-at-top

    from vit_jax import config_schema  # pylint: disable=g-import-not-at-top
    config = wd.config()
    model_config = config_schema.model_config(ml_collections.ConfigDict(config))
    preprocessing = preprocessing_from_config(config)
  write(out, variables['params'], variables.get('polyak'), variables.get('batch_stats'),
        model_config=model_config, preprocessing=preprocessing)
  back = checkpoint.load_variables(out)
  written = {'params': mpp.export_params(variables.get('polyak') or variables['params'])}
  if 'batch_stats' in variables:
    written['batch_stats'] = variables['batch_stats']
  for name in written:
    want, got = _flat(written[name]), _flat(back.get(name, {}))
    bad = sorted(k for k in want if k not in got or want[k].dtype != got[k].dtype or
                 not np.array_equal(want[k], got[k]))
    if bad or set(got) != set(want):
      raise ExportError(f'{out} does not load back identically ({name}: {bad[:5]}...).')
  return step, out


def default_out(workdir: str, step: int | None = None) -> str:
  """``workdir/<model_name>.npz`` (where predict/analysis look), or
  ``workdir/<model_name>_step<N>.npz`` for a step other than the latest
  (`Workdir.export_path`)."""
  wd = Workdir(workdir)
  return wd.export_path(step, None if wd.is_run() else 'model')


def define_flags(fv: flags.FlagValues) -> None:
  """The flags of ``python -m vit_jax.export``."""
  flags.DEFINE_string('workdir', None, 'Training workdir (or its checkpoints/).', flag_values=fv)
  flags.DEFINE_integer('step', None, 'Step to export (default: latest).', flag_values=fv)
  flags.DEFINE_string('out', None, 'Output .npz (default: WORKDIR/<model_name>.npz for the '
                      'latest step, WORKDIR/<model_name>_step<N>.npz otherwise).', flag_values=fv)
  flags.DEFINE_bool('list', False, 'List the available steps and exit.', flag_values=fv)
  flags.mark_flag_as_required('workdir', flag_values=fv)


@cli.command(define_flags)
def main(args: cli.Args) -> None:
  """Exports a step of a workdir (or lists the steps)."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.ERROR)  # orbax warns about read-only mode at INFO/WARNING
  if args.list:
    print(' '.join(map(str, Workdir(args.workdir).steps())))
    return
  step = args.step
  if step is not None and step == Workdir(args.workdir).steps()[-1]:
    step = None  # the latest step goes where predict looks
  out = args.out or default_out(args.workdir, step)
  step, out = export(args.workdir, out, args.step)
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  n = sum(np.size(v) for v in _flat(checkpoint.load(out)).values())
  print(f'exported step {step} of {args.workdir}: {n:,} parameters -> {out} '
        f'({os.path.getsize(out) / 2**20:.1f} MiB), verified bit-identical on reload')
  side = checkpoint.read_sidecar(out)
  if side is not None:
    print(f'sidecar {checkpoint.sidecar_path(out)}: ' + (
        'timm.create_model(**sidecar["timm"]) loads it in PyTorch' if side.get('timm')
        else f'no timm recipe: {side.get("timm_unsupported")}'))


if __name__ == '__main__':
  sys.exit(main())
