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

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this clone's vit_jax

from absl import flags  # noqa: E402

from vit_jax import cli  # noqa: E402
from vit_jax.curves import plot, read_metrics  # noqa: E402

__all__ = ['main', 'plot', 'read_metrics']


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('out', None, 'Output .png.', flag_values=fv)
  flags.mark_flag_as_required('out', flag_values=fv)
  flags.DEFINE_string('title', '', 'Figure title.', flag_values=fv)
  flags.DEFINE_bool('lr', False, 'Add a learning-rate panel.', flag_values=fv)


@cli.command(define_flags, positional='runs', metavar='LABEL=WORKDIR [LABEL=WORKDIR ...]',
             min_args=1, errors=(*cli.USER_ERRORS, FileNotFoundError))
def main(args: cli.Args) -> None:
  """Writes one PNG of the runs' curves, one line per LABEL=WORKDIR."""
  runs = []
  for spec in args.runs:
    label, sep, workdir = spec.partition('=')
    if not sep:
      raise cli.UsageError(f'expected LABEL=WORKDIR, got {spec!r}')
    runs.append((label, workdir))
  panels = ('train_loss', 'accuracy_test') + (('lr',) if args.lr else ())
  plot(runs, args.out, args.title, panels)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  sys.exit(main())
