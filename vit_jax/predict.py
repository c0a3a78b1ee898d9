"""Classify image files with a ViT checkpoint: ``python -m vit_jax.predict``.

Two ways to say which model::

  # an official-layout .npz (gs://vit_models/..., or one exported by training)
  python -m vit_jax.predict --checkpoint=ViT-B_16.npz --model=ViT-B_16 \\
      --labels=ilsvrc2012_wordnet_lemmas.txt --top_k=5 cat.jpg photos/
  # a training workdir: its exported <model_name>.npz, config.json and labels.txt
  python -m vit_jax.predict --workdir=/tmp/vit_cifar10 --json photos/

Images go through exactly the evaluation preprocessing of training
(``input_pipeline.decode_image`` then ``preprocess.get_eval_fn(config.pp.eval,
config.image_size)``), so a prediction here equals the training run's own eval.
The architecture details that a checkpoint pins down (number of classes,
``pre_logits`` size, resolution from the position embeddings) are read from
the checkpoint itself, so ``--model`` only names the preset.

The loading helpers (:func:`load_bundle`, :func:`load_images`) are shared with
``vit_jax.analysis``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from vit_jax.dataset_info import IMAGE_EXTENSIONS


class PredictError(ValueError):
  """A problem with the inputs of prediction, with what to do about it."""


@dataclasses.dataclass
class Bundle:
  """A model ready for inference: module, parameters and how to feed it."""

  model: Any  # flax module
  params: Any
  image_size: tuple[int, int]
  batch_stats: Any = None  # BatchNorm models (ResNet-56) only
  pp_eval: str = 'resize'
  crop_fraction: float = 0.875
  labels: list[str] | None = None
  checkpoint: str = ''
  model_config: Any = None


# ---------------------------------------------------------------------------
# Loading a model
# ---------------------------------------------------------------------------


def read_labels(path: str) -> list[str]:
  """One class name per line, in label order (blank trailing lines ignored)."""
  try:
    with open(path) as f:
      lines = f.read().splitlines()
  except OSError as e:
    raise PredictError(f'Cannot read label file {path!r}: {e}.') from None
  while lines and not lines[-1].strip():
    lines.pop()
  if not lines:
    raise PredictError(f'Label file {path!r} is empty; it needs one class name per line.')
  return [line.strip() for line in lines]


def read_workdir_config(workdir: str) -> dict[str, Any]:
  """The resolved training config that training wrote to ``workdir/config.json``."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise PredictError(
        f'{path} not found: --workdir must be a training workdir (written by '
        f'`python -m vit_jax.main --workdir=...`).')
  with open(path) as f:
    return json.load(f)


def _get(d: Any, key: str, default: Any = None) -> Any:
  if d is None:
    return default
  value = d.get(key, default) if hasattr(d, 'get') else getattr(d, key, default)
  return default if value is None else value


def workdir_checkpoint(workdir: str, config: dict[str, Any]) -> str:
  """``workdir/<model_name>.npz`` (the final export), or the only .npz there.

  As in training, ``config.model.model_name`` overrides the preset's name.
  """
  name = _get(_get(config, 'model'), 'model_name') or _get(config, 'model_name')
  if name and os.path.isfile(os.path.join(workdir, f'{name}.npz')):
    return os.path.join(workdir, f'{name}.npz')
  found = sorted(f for f in os.listdir(workdir) if f.endswith('.npz'))
  if len(found) == 1:
    return os.path.join(workdir, found[0])
  raise PredictError(
      f'No exported model in {workdir} (looked for {name}.npz; found {found or "no .npz"}). '
      f'Export one with `python -m vit_jax.export --workdir={workdir} '
      f'--out={workdir}/{name or "model"}.npz`, or pass --checkpoint.')


def model_config_from_training(config: dict[str, Any]):
  """The model ConfigDict training built (train.model_config: preset + overrides)."""
  import ml_collections  # pylint: disable=g-import-not-at-top

  from vit_jax import train  # pylint: disable=g-import-not-at-top
  if not _get(config, 'model_name') and not _get(config, 'model'):
    raise PredictError('The training config names no model (neither model_name nor model).')
  return train.model_config(ml_collections.ConfigDict(config))


def _backbone_stride(model_config: Any) -> int:
  resnet = _get(model_config, 'resnet')
  if not resnet:
    return 1
  # Root conv /2, max-pool /2, then every stage after the first halves again.
  return 4 * 2 ** (len(tuple(_get(resnet, 'num_layers'))) - 1)


def num_prefix_tokens(model_config: Any) -> int:
  classifier = _get(model_config, 'classifier', 'token')
  return {'token': 1, 'token_unpooled': 1, 'distill': 2}.get(classifier, 0)


def image_size_from_params(params: Any, model_config: Any) -> tuple[int, int] | None:
  """Resolution a checkpoint was trained at, read off its position embeddings."""
  try:
    table = params['Transformer']['posembed_input']
  except (KeyError, TypeError):
    return None
  ph, pw = tuple(_get(_get(model_config, 'patches'), 'size'))
  s = _backbone_stride(model_config)
  if 'row_embedding' in table:  # posemb='learn2d': the grid is explicit.
    return (np.shape(table['row_embedding'])[1] * ph * s,
            np.shape(table['col_embedding'])[1] * pw * s)
  if 'pos_embedding' not in table:
    return None
  n = np.shape(table['pos_embedding'])[1] - num_prefix_tokens(model_config)
  g = round(math.sqrt(n))
  if g * g != n:
    return None
  return (g * ph * s, g * pw * s)


def _size2(size: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(size, (int, np.integer)):
    return (int(size), int(size))
  h, w = size
  return (int(h), int(w))


def _model_config(model: Any):
  """A preset name -> its ConfigDict; a ConfigDict -> a copy (we edit it)."""
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  if isinstance(model, str):
    return models.get_config(model)
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(model.to_dict() if hasattr(model, 'to_dict') else model)


def load_bundle(checkpoint: str | None = None, model: Any = None,
                workdir: str | None = None, labels: str | None = None,
                image_size: int | None = None, dtype: str = 'auto') -> Bundle:
  """Builds the model of a checkpoint (+ preset name) or of a training workdir.

  `model` is a preset name or a model ConfigDict (e.g. train.model_config).
  `dtype` is the computation dtype (models.resolve_dtype).
  """
  from vit_jax import checkpoint as ckpt  # pylint: disable=g-import-not-at-top
  from vit_jax import models  # pylint: disable=g-import-not-at-top

  pp_eval, crop_fraction, size = 'resize', 0.875, None
  if workdir:
    config = read_workdir_config(workdir)
    model_config = model_config_from_training(config)
    if model:
      model_config = _model_config(model)
    checkpoint = checkpoint or workdir_checkpoint(workdir, config)
    pp = _get(config, 'pp') or {}
    pp_eval = _get(pp, 'eval', 'resize')
    crop_fraction = float(_get(pp, 'crop_fraction', 0.875))
    size = _get(config, 'image_size')
    if labels is None and os.path.isfile(os.path.join(workdir, 'labels.txt')):
      labels = os.path.join(workdir, 'labels.txt')
  else:
    if not checkpoint:
      raise PredictError('Pass --workdir=DIR, or --checkpoint=PATH.npz [--model=NAME, one of: '
                         f'{", ".join(sorted(models.MODEL_CONFIGS))}; default: the '
                         "checkpoint's own, from its sidecar .json or its parameter shapes].")
    try:
      model_config = _model_config(model) if model else ckpt.infer_model(checkpoint)
    except (OSError, ckpt.CheckpointError) as e:
      raise PredictError(str(e)) from None
  try:
    variables = ckpt.load_variables(checkpoint)
  except (OSError, ckpt.CheckpointError) as e:
    raise PredictError(str(e)) from None
  params = variables['params']

  info = ckpt.describe(params)
  if info.get('num_classes') is None:
    raise PredictError(f'Checkpoint {checkpoint} has no classification head (`head/kernel`).')
  is_vit = _get(model_config, 'model_type', 'vit') == 'vit'
  if is_vit:
    model_config.representation_size = info.get('representation_size')
  trained_size = image_size_from_params(params, model_config) if is_vit else None
  if not (image_size or size or trained_size):
    raise PredictError('Cannot tell the input resolution of this model: pass --image_size.')
  size = _size2(image_size or size or trained_size)
  if trained_size and size != trained_size:
    # Fine-tuning-style resize of the position embeddings (checkpoint.py).
    ph, pw = tuple(model_config.patches.size)
    s = _backbone_stride(model_config)
    grid = (size[0] // (ph * s), size[1] // (pw * s))
    pos = params['Transformer']['posembed_input']
    prefix = num_prefix_tokens(model_config)
    if prefix > 1 or size[0] % (ph * s) or size[1] % (pw * s):
      raise PredictError(f'Cannot run this model at {size}: the image size must be a multiple '
                         f'of {ph * s}x{pw * s}, with at most one class token.')
    if 'row_embedding' in pos:  # posemb='learn2d'
      pos['row_embedding'] = ckpt.interpolate_axis_embedding(pos['row_embedding'], grid[0])
      pos['col_embedding'] = ckpt.interpolate_axis_embedding(pos['col_embedding'], grid[1])
    else:
      pos['pos_embedding'] = ckpt.interpolate_posembed(
          pos['pos_embedding'], grid[0] * grid[1] + prefix, has_class_token=prefix > 0,
          new_grid=grid)
  module = models.get_model(model_config, num_classes=int(info['num_classes']), dtype=dtype)
  _check_fits(module, params, size, checkpoint, model_config)
  names = read_labels(labels) if labels else None
  if names is not None and len(names) != info['num_classes']:
    raise PredictError(
        f'Label file {labels} has {len(names)} names but the checkpoint has '
        f'{info["num_classes"]} classes.')
  return Bundle(model=module, params=params, batch_stats=variables.get('batch_stats'),
                image_size=size, pp_eval=pp_eval,
                crop_fraction=crop_fraction, labels=names, checkpoint=checkpoint,
                model_config=model_config)


def _check_fits(module: Any, params: Any, size: tuple[int, int], checkpoint: str,
                model_config: Any) -> None:
  """Every key and shape of the model in the checkpoint, or a PredictError listing them."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from vit_jax import checkpoint as ckpt  # pylint: disable=g-import-not-at-top
  rng = jax.random.PRNGKey(0)
  expected = jax.eval_shape(lambda: module.init(
      {'params': rng, 'dropout': rng}, jnp.zeros((1, *size, 3)), train=False))['params']
  diff = ckpt.shape_diff(ckpt.flatten(params), ckpt.flatten(expected))
  if diff:
    raise PredictError(
        f'Checkpoint {checkpoint} does not fit the model '
        f'{_get(model_config, "model_name") or ""}: another architecture, or a '
        'damaged file?\n' + '\n'.join(diff))


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------


def collect_images(paths: Sequence[str]) -> list[str]:
  """Expands directories (recursively, sorted) into image files."""
  out = []
  for p in paths:
    if os.path.isdir(p):
      for root, dirs, files in os.walk(p):
        dirs.sort()
        out.extend(os.path.join(root, f) for f in sorted(files)
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    elif os.path.isfile(p):
      out.append(p)
    else:
      raise PredictError(f'{p!r} is neither an image file nor a directory.')
  if not out:
    raise PredictError(f'No image files ({", ".join(IMAGE_EXTENSIONS)}) found in {list(paths)}.')
  return out


def load_images(paths: Sequence[str], bundle: Bundle) -> tuple[np.ndarray, list[np.ndarray]]:
  """(preprocessed float32 (N, H, W, 3) in [-1, 1], raw uint8 images).

  Decoding and preprocessing are the training pipeline's own functions.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from vit_jax import input_pipeline, preprocess  # pylint: disable=g-import-not-at-top
  eval_fn = preprocess.get_eval_fn(bundle.pp_eval, bundle.image_size,
                                   crop_fraction=bundle.crop_fraction)
  batch, raw = [], []
  for path in paths:
    try:
      image = input_pipeline.decode_image(tf.io.read_file(path))
    except tf.errors.OpError as e:
      reason = (e.message or str(e)).strip().splitlines()[0]
      raise PredictError(f'Cannot decode image file {path!r}: {reason}.') from None
    raw.append(image.numpy())
    batch.append(eval_fn(image).numpy())
  return np.stack(batch).astype(np.float32), raw


# ---------------------------------------------------------------------------
# Prediction
# ---------------------------------------------------------------------------


def predict_probs(bundle: Bundle, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
  """Softmax probabilities (N, num_classes), float32, batch by batch."""
  import jax  # pylint: disable=g-import-not-at-top

  @jax.jit
  def probs_fn(variables, x):
    return jax.nn.softmax(bundle.model.apply(variables, x, train=False), axis=-1)

  variables = {'params': bundle.params}
  if bundle.batch_stats is not None:
    variables['batch_stats'] = bundle.batch_stats
  out = []
  for i in range(0, len(images), batch_size):
    out.append(np.asarray(probs_fn(variables, images[i:i + batch_size])))
  return np.concatenate(out)


def top_k(probs: np.ndarray, k: int, labels: list[str] | None) -> list[list[dict[str, Any]]]:
  """Per image, the k most probable classes as {'label', 'name', 'prob'}."""
  k = min(k, probs.shape[-1])
  order = np.argsort(-probs, axis=-1, kind='stable')[:, :k]
  return [[{'label': int(c), 'name': labels[c] if labels else str(int(c)),
            'prob': float(p[c])} for c in row] for p, row in zip(probs, order)]


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m vit_jax.predict', description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('images', nargs='+', help='image files and/or directories (recursive)')
  parser.add_argument('--checkpoint', help='official-layout .npz (local or gs://)')
  parser.add_argument('--model', help="preset name, e.g. ViT-B_16 (default: the checkpoint's "
                      'own, from its sidecar .json or its parameter shapes)')
  parser.add_argument('--workdir', help='training workdir: uses its .npz, config.json, labels.txt')
  parser.add_argument('--labels', help='class names, one per line, in label order')
  parser.add_argument('--top_k', type=int, default=5)
  parser.add_argument('--image_size', type=int, help='override the resolution (posembs are resized)')
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--json', action='store_true', help='print machine-readable JSON')
  parser.add_argument('--dtype', default='auto', choices=('auto', 'float32', 'bfloat16'),
                      help="computation dtype ('auto': bfloat16 on GPU/TPU, float32 on CPU)")
  args = parser.parse_args(argv)
  try:
    bundle = load_bundle(args.checkpoint, args.model, args.workdir, args.labels, args.image_size,
                         dtype=args.dtype)
    paths = collect_images(args.images)
    images, _ = load_images(paths, bundle)
  except PredictError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  probs = predict_probs(bundle, images, args.batch_size)
  if not np.all(np.isfinite(probs)):
    print(f'error: the model gave non-finite outputs for {bundle.checkpoint}; '
          'no predictions printed.', file=sys.stderr)
    return 1
  results = top_k(probs, args.top_k, bundle.labels)
  if args.json:
    print(json.dumps([{'image': p, 'top_k': r} for p, r in zip(paths, results)], indent=1))
  else:
    for path, rows in zip(paths, results):
      print(path)
      for r in rows:
        print(f'  {r["prob"]:8.4f}  {r["name"]}' + (f'  ({r["label"]})' if bundle.labels else ''))
  return 0


if __name__ == '__main__':
  sys.exit(main())
