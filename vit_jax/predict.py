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

A file that cannot be read or decoded does not stop the others: every
readable image is printed, then one error names the unusable files (with
``--json`` they are entries with an ``error``) and the exit status is 1.

Models load through :func:`vit_jax.hub.load`; the image loading, probabilities
and top-k are the loaded `hub.Model`'s (``model.predict(paths)`` in Python).
"""

from __future__ import annotations

import json
import sys

import numpy as np
from absl import flags

from vit_jax import cli, hub, images


class PredictError(ValueError):
  """A problem with the inputs of prediction, with what to do about it."""


def _missing() -> str:
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  raise PredictError('Pass --workdir=DIR, or --checkpoint=PATH.npz or an official name '
                     f'[--model=NAME, one of: {", ".join(sorted(models.MODEL_CONFIGS))}; default: '
                     "the checkpoint's own, from its sidecar .json or its parameter shapes].")


def define_flags(fv: flags.FlagValues) -> None:
  """The flags of ``python -m vit_jax.predict``."""
  from vit_jax.models import AUTO_DTYPE, DTYPES  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('checkpoint', None, 'Official-layout .npz (local or gs://).', flag_values=fv)
  flags.DEFINE_string('model', None, "Preset name, e.g. ViT-B_16 (default: the checkpoint's "
                      'own, from its sidecar .json or its parameter shapes).', flag_values=fv)
  flags.DEFINE_string('workdir', None, 'Training workdir: uses its .npz, config.json, labels.txt.',
                      flag_values=fv)
  flags.DEFINE_string('labels', None, 'Class names, one per line, in label order.',
                      flag_values=fv)
  flags.DEFINE_integer('top_k', 5, 'Classes printed per image.', flag_values=fv)
  flags.DEFINE_integer('image_size', None, 'Override the resolution (posembs are resized).',
                       flag_values=fv)
  flags.DEFINE_integer('batch_size', 32, 'Images per forward pass.', flag_values=fv)
  flags.DEFINE_bool('json', False, 'Print machine-readable JSON.', flag_values=fv)
  flags.DEFINE_enum('dtype', 'auto', DTYPES, f"Computation dtype ('auto': {AUTO_DTYPE}).",
                    flag_values=fv)


@cli.command(define_flags, positional='images', metavar='IMAGE [IMAGE ...]', min_args=1)
def main(args: cli.Args) -> None:
  """Prints the top-k classes of every image (files and/or directories, recursive)."""
  bundle = hub.load(args.workdir or args.checkpoint or _missing(), model=args.model,
                    checkpoint=args.checkpoint if args.workdir else None,
                    labels=args.labels, image_size=args.image_size, dtype=args.dtype)
  paths, results, skipped = [], [], []
  # A batch in memory; files that cannot be read are left out (and named below).
  for files, probs in bundle.iter_probs(args.images, args.batch_size, skipped):
    if not np.all(np.isfinite(probs)):
      raise PredictError(f'the model gave non-finite outputs for {bundle.source}; '
                         'no predictions printed.')
    paths += files
    results += bundle.top_k(probs, args.top_k)
  if args.json:
    print(json.dumps([{'image': p, 'top_k': r} for p, r in zip(paths, results)]
                     + [{'image': p, 'error': why} for p, why in skipped], indent=1))
  else:
    for path, rows in zip(paths, results):
      print(path)
      for r in rows:
        print(f'  {r["prob"]:8.4f}  {r["name"]}' + (f'  ({r["label"]})' if bundle.labels else ''))
  if skipped:
    raise images.ImageError(
        f'{len(skipped)} of {len(skipped) + len(paths)} image files could not be used'
        + (' (the others are printed above)' if paths else '') + ': '
        + '; '.join(why for _, why in skipped[:5]) + ('; ...' if len(skipped) > 5 else ''))


if __name__ == '__main__':
  sys.exit(main())
