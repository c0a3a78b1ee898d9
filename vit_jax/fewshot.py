"""Few-shot linear evaluation of a checkpoint: ``python -m vit_jax.fewshot``.

  python -m vit_jax.fewshot --checkpoint=ViT-B_16 --dataset=cifar10 --shots=1,5,10,25

The paper's few-shot protocol (§4.1): ridge probes on a frozen representation
(`pre_logits` by default), the penalty picked by leave-one-out, test accuracy
averaged over seeds. The math is vit_jax.linear_probe's, the model side
vit_jax.evaluators.FewShotEvaluator's (the same evaluator training runs for a
``config.evals`` entry of type ``fewshot``).
"""

from __future__ import annotations

import dataclasses

from absl import flags

from vit_jax import cli
from vit_jax.evaluators import FewShotEvaluator
from vit_jax.linear_probe import DEFAULT_L2_REGS


def _floats(text: str) -> tuple[float, ...]:
  return tuple(float(v) for v in text.split(',') if v.strip())


def define_flags(fv: flags.FlagValues) -> None:
  """The flags of ``python -m vit_jax.fewshot``."""
  from vit_jax.models import AUTO_DTYPE, DTYPES  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('checkpoint', None, 'Official-layout .npz.', flag_values=fv)
  flags.DEFINE_string('model', None, 'Preset name, e.g. ViT-B_16.', flag_values=fv)
  flags.DEFINE_string('workdir', None, 'Training workdir (its .npz and config.json).',
                      flag_values=fv)
  flags.DEFINE_string('dataset', None, "TFDS name, 'folder:<root>' or 'digits'.", flag_values=fv)
  flags.DEFINE_string('train_split', 'train', 'Split the few-shot examples come from.',
                      flag_values=fv)
  flags.DEFINE_string('test_split', 'test', 'Split the accuracy is measured on.', flag_values=fv)
  flags.DEFINE_string('tfds_data_dir', None, 'TFDS data directory.', flag_values=fv)
  flags.DEFINE_integer('image_size', None, "Default: the checkpoint's resolution.",
                       flag_values=fv)
  flags.DEFINE_string('shots', '1,5,10,25', 'Examples per class, comma-separated.',
                      flag_values=fv)
  flags.DEFINE_string('seeds', '0,1,2', 'Seeds of the draws, comma-separated.', flag_values=fv)
  flags.DEFINE_string('l2_regs', ','.join(f'{v:g}' for v in DEFAULT_L2_REGS),
                      'L2 penalties, comma-separated.', flag_values=fv)
  flags.DEFINE_string('representation', 'pre_logits', 'Sown layer: pre_logits, encoder_out, '
                      'Transformer/block_outputs/<i>, ...', flag_values=fv)
  flags.DEFINE_enum('pool', 'auto', ['auto', 'first', 'mean'], 'Pooling of token features.',
                    flag_values=fv)
  flags.DEFINE_enum('standardize', 'feature', ['feature', 'global'],
                    'Feature standardisation statistics.', flag_values=fv)
  flags.DEFINE_integer('batch_size', 64, 'Images per forward pass.', flag_values=fv)
  flags.DEFINE_bool('skip_bad_images', False, 'Image folders: leave undecodable files out '
                    '(listed) instead of stopping with the list.', flag_values=fv)
  flags.DEFINE_bool('json', False, 'Print all results as JSON.', flag_values=fv)
  flags.DEFINE_enum('dtype', 'auto', DTYPES, f"Computation dtype ('auto': {AUTO_DTYPE}).",
                    flag_values=fv)
  flags.mark_flag_as_required('dataset', flag_values=fv)


@cli.command(define_flags)
def main(args: cli.Args) -> None:
  """Few-shot linear evaluation (ViT paper §4.1) of a checkpoint."""
  import json  # pylint: disable=g-import-not-at-top

  from vit_jax import hub  # pylint: disable=g-import-not-at-top
  bundle = hub.load(args.workdir or args.checkpoint or '', model=args.model,
                    checkpoint=args.checkpoint if args.workdir else None,
                    image_size=args.image_size, dtype=args.dtype)
  config = {
      'dataset': args.dataset, 'train_split': args.train_split, 'test_split': args.test_split,
      'tfds_data_dir': args.tfds_data_dir, 'image_size': bundle.image_size,
      'shots': tuple(int(v) for v in _floats(args.shots)),
      'seeds': tuple(int(v) for v in _floats(args.seeds)), 'l2_regs': _floats(args.l2_regs),
      'representation': args.representation, 'pool': args.pool, 'standardize': args.standardize,
      'batch_size': args.batch_size, 'pp_eval': bundle.pp_eval, 'crop_fraction': bundle.crop_fraction}
  evaluator = FewShotEvaluator(config, bundle.module, skip_bad_images=args.skip_bad_images)
  metrics = evaluator.run(bundle.params)
  results = evaluator.last_results
  if args.json:
    print(json.dumps({'metrics': metrics, 'results': {
        k: dataclasses.asdict(r) for k, r in results.items()}}, indent=2))
    return
  l2s = evaluator.l2_regs
  print(f'{evaluator.name}: few-shot accuracy of {args.representation}, mean over seeds '
        f'{evaluator.seeds}; L2 penalty chosen per seed by leave-one-out')
  print(f'{"shots":>5}  {"accuracy":>8}  {"std":>6}  chosen l2 (per seed)')
  for k, r in results.items():
    print(f'{k:>5}  {r.accuracy:8.4f}  {r.accuracy_std:6.4f}  ' +
          ', '.join(f'{v:g}' for v in r.chosen_l2))
  print('test accuracy per L2 penalty (mean over seeds):')
  print(f'{"shots":>5}  ' + ' '.join(f'{v:>7g}' for v in l2s))
  for k, r in results.items():
    print(f'{k:>5}  ' + ' '.join(f'{r.per_l2[v]:7.4f}' for v in l2s))


if __name__ == '__main__':
  raise SystemExit(main())
