"""Training curves from workdirs' metrics.jsonl, as one PNG.

Training writes ``<workdir>/curves.png`` at the end of a run (`write_curves`:
training loss, test accuracy and learning rate against the step); several
runs side by side: ``python benchmarks/plot_curves.py --out=curves.png
LABEL=WORKDIR ...``. Each logged training loss is the mean over its log
interval. A line of metrics.jsonl may repeat a step after a resume; the later
line counts, as in vit_jax/train.py. matplotlib is imported only to draw.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from absl import logging

# (metric, panel title); `plot`'s default is the reproduction report's pair.
PANELS = {'train_loss': 'training loss', 'accuracy_test': 'test accuracy',
          'lr': 'learning rate'}
RUN_PANELS = ('train_loss', 'accuracy_test', 'lr')


def read_metrics(workdir: str) -> dict[str, dict[int, float]]:
  """{metric: {step: value}} from workdir/metrics.jsonl."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} not found: is {workdir!r} a training workdir?')
  out: dict[str, dict[int, float]] = {}
  with open(path) as f:
    for line in f:
      try:
        rec = json.loads(line)
      except ValueError:  # a line cut short by a killed run
        continue
      for k, v in rec.items():
        if k != 'step' and isinstance(v, (int, float)):
          out.setdefault(k, {})[int(rec['step'])] = float(v)
  return out


def plot(runs: Sequence[tuple[str, str]], out: str, title: str = '',
         panels: Sequence[str] = ('train_loss', 'accuracy_test')) -> None:
  """One panel per metric of `panels`, one line per (label, workdir) of `runs`."""
  # A bare Figure, not pyplot: no backend is chosen or changed (a notebook that
  # trains keeps its inline figures) and no global figure state is touched.
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  data = [(label, read_metrics(workdir)) for label, workdir in runs]
  fig = Figure(figsize=(5.5 * len(panels), 4))
  axes = fig.subplots(1, len(panels), squeeze=False)
  for ax, key in zip(axes[0], panels):
    for label, m in data:
      series = m.get(key, {})
      steps = sorted(series)
      if steps:
        ax.plot(steps, [series[s] for s in steps], label=label,
                marker='o' if key == 'accuracy_test' else None, markersize=3)
    name = PANELS.get(key, key)
    ax.set(xlabel='step', ylabel=name, title=name)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # e.g. a run with no eval yet
      ax.legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=110)


def write_curves(workdir: str, label: str = '') -> str | None:
  """``<workdir>/curves.png`` (loss, test accuracy, lr); None, with one log line, without matplotlib."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
  except ImportError:
    logging.warning('matplotlib is not installed: no curves.png (metrics.jsonl has the numbers).')
    return None
  out = os.path.join(workdir, 'curves.png')
  try:
    plot([(label or os.path.basename(os.path.normpath(workdir)), workdir)], out,
         panels=RUN_PANELS)
  except (OSError, ValueError, RuntimeError) as e:  # a figure never fails a finished run
    logging.warning('Could not write %s: %s', out, e)
    return None
  logging.info('Wrote the training curves to %s.', out)
  return out
