r"""Training curves from workdirs' metrics.jsonl, as one PNG.

  python benchmarks/plot_curves.py --out=docs/figures/table1_cifar10.png \
      --title="CIFAR-10 from scratch" "ViT-Ti=workdirs/table1_vit_ti_cifar10" \
      "ResNet-56=workdirs/table1_resnet56_cifar10"

Left: training loss (each logged point is the mean over its log interval);
right: test accuracy at every evaluation; `--lr` adds the learning rate. A
thin command line over vit_jax/curves.py, which also writes every run's own
``<workdir>/curves.png``.
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ''):  # python benchmarks/plot_curves.py from anywhere
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vit_jax.curves import plot, read_metrics  # noqa: E402

__all__ = ['main', 'plot', 'read_metrics']


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('runs', nargs='+', help='LABEL=WORKDIR')
  parser.add_argument('--out', required=True, help='output .png')
  parser.add_argument('--title', default='')
  parser.add_argument('--lr', action='store_true', help='add a learning-rate panel')
  args = parser.parse_args(argv)
  runs = []
  for spec in args.runs:
    label, sep, workdir = spec.partition('=')
    if not sep:
      parser.error(f'expected LABEL=WORKDIR, got {spec!r}')
    runs.append((label, workdir))
  panels = ('train_loss', 'accuracy_test') + (('lr',) if args.lr else ())
  try:
    plot(runs, args.out, args.title, panels)
  except FileNotFoundError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'wrote {args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
