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
from collections.abc import Sequence

from vit_jax.evaluators import FewShotEvaluator
from vit_jax.linear_probe import DEFAULT_L2_REGS


def _floats(text: str) -> tuple[float, ...]:
  return tuple(float(v) for v in text.split(',') if v.strip())


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m vit_jax.fewshot``: few-shot accuracies of a checkpoint."""
  import argparse  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  from vit_jax import hub  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(
      prog='python -m vit_jax.fewshot',
      description='Few-shot linear evaluation (ViT paper §4.1) of a checkpoint.')
  parser.add_argument('--checkpoint', help='official-layout .npz')
  parser.add_argument('--model', help='preset name, e.g. ViT-B_16')
  parser.add_argument('--workdir', help='training workdir (its .npz and config.json)')
  parser.add_argument('--dataset', required=True, help="TFDS name, 'folder:<root>' or 'digits'")
  parser.add_argument('--train_split', default='train')
  parser.add_argument('--test_split', default='test')
  parser.add_argument('--tfds_data_dir')
  parser.add_argument('--image_size', type=int, help='default: the checkpoint\'s resolution')
  parser.add_argument('--shots', default='1,5,10,25')
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--l2_regs', default=','.join(f'{v:g}' for v in DEFAULT_L2_REGS))
  parser.add_argument('--representation', default='pre_logits',
                      help="sown layer: pre_logits, encoder_out, Transformer/block_outputs/<i>, ...")
  parser.add_argument('--pool', default='auto', choices=('auto', 'first', 'mean'))
  parser.add_argument('--standardize', default='feature', choices=('feature', 'global'))
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--json', action='store_true', help='print all results as JSON')
  parser.add_argument('--dtype', default='auto', choices=('auto', 'float32', 'bfloat16'),
                      help="computation dtype ('auto': bfloat16 on GPU/TPU, float32 on CPU)")
  args = parser.parse_args(argv)
  try:
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
    evaluator = FewShotEvaluator(config, bundle.module)
    metrics = evaluator.run(bundle.params)
  except ValueError as e:  # FewShotError, HubError, ...
    print(f'error: {e}', file=sys.stderr)
    return 1
  results = evaluator.last_results
  if args.json:
    print(json.dumps({'metrics': metrics, 'results': {
        k: dataclasses.asdict(r) for k, r in results.items()}}, indent=2))
    return 0
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
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
