r"""Training curves from workdirs' metrics.jsonl, as one PNG.

  python benchmarks/plot_curves.py --out=docs/figures/table1_cifar10.png \
      --title="CIFAR-10 from scratch" "ViT-Ti=workdirs/table1_vit_ti_cifar10" \
      "ResNet-56=workdirs/table1_resnet56_cifar10"

Left: training loss (each logged point is the mean over its log interval);
right: test accuracy at every evaluation. A line of metrics.jsonl may repeat
a step after a resume; the later line counts, as in vit_jax/train.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(workdir: str) -> dict[str, dict[int, float]]:
  """{metric: {step: value}} from workdir/metrics.jsonl."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} not found: is {workdir!r} a training workdir?')
  out: dict[str, dict[int, float]] = {}
  with open(path) as f:
    for line in f:
      rec = json.loads(line)
      for k, v in rec.items():
        if k != 'step' and isinstance(v, (int, float)):
          out.setdefault(k, {})[int(rec['step'])] = float(v)
  return out


def plot(runs: list[tuple[str, str]], out: str, title: str = '') -> None:
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
  for label, workdir in runs:
    m = read_metrics(workdir)
    for ax, key in ((ax_loss, 'train_loss'), (ax_acc, 'accuracy_test')):
      series = m.get(key, {})
      steps = sorted(series)
      if steps:
        ax.plot(steps, [series[s] for s in steps], label=label,
                marker='o' if key == 'accuracy_test' else None, markersize=3)
  ax_loss.set(xlabel='step', ylabel='training loss', title='training loss')
  ax_acc.set(xlabel='step', ylabel='test accuracy', title='test accuracy')
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # e.g. a run with no eval yet
      ax.legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=110)
  plt.close(fig)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('runs', nargs='+', help='LABEL=WORKDIR')
  parser.add_argument('--out', required=True, help='output .png')
  parser.add_argument('--title', default='')
  args = parser.parse_args(argv)
  runs = []
  for spec in args.runs:
    label, sep, workdir = spec.partition('=')
    if not sep:
      parser.error(f'expected LABEL=WORKDIR, got {spec!r}')
    runs.append((label, workdir))
  try:
    plot(runs, args.out, args.title)
  except FileNotFoundError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'wrote {args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
