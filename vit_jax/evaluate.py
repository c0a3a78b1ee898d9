r"""Evaluate a checkpoint on a config's test split: ``python -m vit_jax.evaluate``.

  python -m vit_jax.evaluate --config=configs/pretrain_tiny_imagenet.py \
      --checkpoint=checkpoints/SmallViT_8-tiny_imagenet-32px.npz

The config says which model (``model_name`` + ``model``), which data
(``dataset``, ``test_split``; override with ``--config.test_split=...``) and
which preprocessing (``image_size``, ``pp.eval``); the checkpoint gives every
parameter, head included. What the config leaves to the checkpoint, as
``configs/folder.py`` does (the model, and its recipe's ``image_size``), is
resolved from this checkpoint the way training resolved it from the
pre-trained one, so the config a run was launched with evaluates its export.
Evaluation is the training loop's own (`evaluators.evaluate_split`: every
example once, the last batch padded and masked), so the accuracy printed here
for a training run's exported ``.npz`` is the ``accuracy_test`` that run
logged. At another ``image_size`` the position embeddings are interpolated as
for fine-tuning (paper §3.2).
"""

from __future__ import annotations

import json
import math
import os
import sys

from absl import flags

from vit_jax import cli


def define_flags(fv: flags.FlagValues) -> None:
  """The flags of ``python -m vit_jax.evaluate`` besides --config (`cli.command`)."""
  from vit_jax.models import AUTO_DTYPE, DTYPES  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('checkpoint', None, 'Official-layout .npz (local or gs://), head included.',
                      flag_values=fv)
  flags.DEFINE_bool('json', False, 'Print the metrics as one JSON object.', flag_values=fv)
  flags.DEFINE_enum('dtype', None, DTYPES, f"Computation dtype ('auto': {AUTO_DTYPE}); "
                    'default config.dtype.', flag_values=fv)


def resolve_for(config, checkpoint: str):
  """`config` with what it leaves to the checkpoint (configs/folder.py: the
  model, and its recipe's image_size, batch, ...) taken from `checkpoint`, as
  training resolved them from the pre-trained one
  (`config_schema.resolve_config`)."""
  from vit_jax import config_schema  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.pretrained_path = checkpoint
  return config_schema.resolve_config(config)


def evaluate_checkpoint(config, checkpoint: str, dtype: str | None = None) -> dict[str, float]:
  """accuracy_test, loss_test, num_test_examples of `checkpoint` under `config`.

  Computes in `dtype`, default config.dtype (as training did).
  """
  return _evaluate(resolve_for(config, checkpoint), checkpoint, dtype)


def _evaluate(config, checkpoint: str, dtype: str | None) -> dict[str, float]:
  """evaluate_checkpoint on a config `resolve_for` resolved already."""
  from vit_jax import config_schema, evaluators, hub  # pylint: disable=g-import-not-at-top
  config_schema.validate_config(config)
  data = config_schema.data_module(config)
  # Image folders: undecodable test files listed up front (or left out under
  # config.skip_bad_images), as training does.
  config = data.checked_config(config, None, (config.test_split,))
  model = hub.load(checkpoint, model=config_schema.model_config(config),
                   image_size=config.image_size, dtype=dtype or config.get('dtype', 'auto'))
  data_classes = config.get('num_classes') or data.get_dataset_info(config).num_classes
  if model.num_classes != data_classes:
    raise config_schema.ConfigError(
        f'{checkpoint} has a {model.num_classes}-class head but {config.dataset} has '
        f'{data_classes} classes: evaluate a checkpoint on the label set it was '
        f'trained on (fine-tune it first with python -m vit_jax.main).')
  metrics = evaluators.ClassificationEvaluator('test', config, model.module)(model.variables)
  if not all(math.isfinite(v) for v in metrics.values()):
    raise ValueError(
        f'{checkpoint} gives non-finite metrics {metrics} on {config.dataset}: '
        'not reported. Is the checkpoint from a diverged run?')
  return metrics


@cli.command(define_flags, config='Config whose model, dataset and eval preprocessing to use.',
             log=True)
def main(args: cli.Args) -> None:
  """Prints accuracy_test and loss_test of --checkpoint on --config's test split."""
  if args.config is None or args.checkpoint is None:
    raise cli.UsageError('Both --config and --checkpoint are required.')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  config = resolve_for(args.config, args.checkpoint)
  metrics = _evaluate(config, args.checkpoint, args.dtype)
  if args.json:
    print(json.dumps(metrics))
  else:
    print(f'{args.checkpoint} on {config.dataset} '
          f'{config.test_split} @{config.image_size}px: '
          f'accuracy_test={metrics["accuracy_test"]:.4f} '
          f'loss_test={metrics["loss_test"]:.4f} '
          f'({int(metrics["num_test_examples"])} images)')


if __name__ == '__main__':
  sys.exit(main())
