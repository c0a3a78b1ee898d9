r"""The paper's learning-rate protocol (App. B.1.1, Table 4) as one command.

  python -m vit_jax.sweep --config=configs/finetune_shipped.py:digits --workdir=DIR \
      [--grid=0.001,0.003,0.01,0.03] [--dev_split=0.1] [--config.key=value ...]

1. Hold out a dev split from the config's train split: 10% for Pets/Flowers-
   sized data (< 20k training images), 2% for CIFAR-sized (< 500k), 1% for
   ImageNet-sized, or --dev_split. The split strings are sliced, so the dev
   images are a fixed subset, never trained on during the sweep.
2. Fine-tune once per learning rate of the grid (default Table 4's {0.001,
   0.003, 0.01, 0.03}) on the rest of train, each into DIR/lr_<lr>, and
   score it on dev.
3. Pick the best dev accuracy (the smaller rate on a tie), retrain on the
   full train split with it into DIR/final, and report test accuracy.

Everything else (steps, batch, schedule, augmentation, model) is the
config's. DIR/sweep.json holds the splits, the grid and every result as it
arrives; the table of dev accuracies is printed at the end. Killed and
relaunched with the same command, it skips the runs sweep.json has, and the
run it was in resumes from its own checkpoints (vit_jax/train.py). A config
with `scratch_baseline` sweeps the fine-tune only.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
from absl import flags

from vit_jax import cli

PAPER_GRID = (0.001, 0.003, 0.01, 0.03)  # ViT paper Table 4.


class SweepError(ValueError):
  """A sweep that cannot run as asked (bad grid, split, or a changed sweep)."""


def default_dev_fraction(num_train: int) -> float:
  """App. B.1.1: 10% for Pets / Flowers, 2% for CIFAR, 1% for ImageNet."""
  if num_train < 20_000:
    return 0.10
  if num_train < 500_000:
    return 0.02
  return 0.01


def _fmt(x: float) -> str:
  return f'{x:.6f}'.rstrip('0').rstrip('.')


def dev_splits(train_split: str, fraction: float) -> tuple[str, str]:
  """('train' , 0.02) -> ('train[:98%]', 'train[98%:]'); slices compose.

  A train split that is already a percentage slice ('train[:90%]') is cut at
  the same fraction of *its* range ('train[:81%]', 'train[81%:90%]'); an
  integer slice in integers.
  """
  from vit_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  if not 0 < fraction < 1:
    raise SweepError(f'--dev_split must be a fraction in (0, 1), e.g. 0.1; got {fraction}.')
  name, start, stop = input_pipeline.parse_split(train_split)
  if start is None and stop is None:
    cut = _fmt(100 * (1 - fraction))
    return f'{name}[:{cut}%]', f'{name}[{cut}%:]'
  percent = [s.endswith('%') for s in (start, stop) if s is not None]
  if all(percent):
    a = float(start[:-1]) if start else 0.
    b = float(stop[:-1]) if stop else 100.
    cut, a_s, b_s = _fmt(b - (b - a) * fraction), _fmt(a), _fmt(b)
    return f'{name}[{a_s}%:{cut}%]', f'{name}[{cut}%:{b_s}%]'
  if not any(percent) and stop is not None and int(stop) >= 0 and int(start or 0) >= 0:
    a, b = int(start or 0), int(stop)
    cut = b - max(1, round((b - a) * fraction))
    return f'{name}[{a}:{cut}]', f'{name}[{cut}:{b}]'
  raise SweepError(f'Cannot carve a dev split out of {train_split!r}: use a split with '
                   "no slice, a percentage slice ('train[:90%]') or a non-negative "
                   "integer slice ('train[:5000]').")


def _lr_key(lr: float) -> str:
  return f'{lr:g}'  # 0.003 -> '0.003', 1e-06 -> '1e-06'.


def _write_json(path: str, data: Any) -> None:
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(data, f, indent=2)
  os.replace(tmp, path)


def _variant(config: ml_collections.ConfigDict, **changes: Any) -> ml_collections.ConfigDict:
  c = config.copy_and_resolve_references()
  with c.unlocked():
    for key, value in changes.items():
      *parents, leaf = key.split('.')
      node = c
      for part in parents:
        node = node[part]
      node[leaf] = value
    if 'scratch_baseline' in c:
      c.scratch_baseline = None
  return c


def run_sweep(config: ml_collections.ConfigDict, workdir: str,
              grid: Sequence[float] = PAPER_GRID, dev_fraction: float | None = None,
              train_fn: Callable[[ml_collections.ConfigDict, str], Any] | None = None,
              num_train: int | None = None) -> dict[str, Any]:
  """Runs (or resumes) the sweep; returns what sweep.json holds.

  `train_fn(config, workdir)` returns an object with `.metrics` (default
  vit_jax.train.run); `num_train` (default: read from the data) picks the
  default dev fraction.
  """
  grid = [float(g) for g in grid]
  if not grid or any(g <= 0 for g in grid) or len(set(grid)) != len(grid):
    raise SweepError(f'--grid needs distinct positive learning rates, got {grid}.')
  if train_fn is None:
    from vit_jax import train  # pylint: disable=g-import-not-at-top
    train_fn = train.run
  if dev_fraction is None:
    if num_train is None:
      from vit_jax import config_schema  # pylint: disable=g-import-not-at-top
      num_train = config_schema.data_module(config).get_dataset_info(config).num_train
    dev_fraction = default_dev_fraction(num_train)
  train_part, dev_part = dev_splits(config.train_split, dev_fraction)

  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'sweep.json')
  plan = {'train_split': config.train_split, 'test_split': config.test_split,
          'dev_fraction': dev_fraction, 'sweep_train_split': train_part,
          'dev_split': dev_part, 'grid': grid}
  state = {**plan, 'dev': {}, 'best_lr': None, 'final': None}
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    changed = [k for k in plan if old.get(k) != plan[k]]
    if changed:
      raise SweepError(f'{path} belongs to another sweep ({", ".join(changed)} differ: '
                       f'{ {k: old.get(k) for k in changed} } vs { {k: plan[k] for k in changed} }). '
                       'Use a fresh --workdir, or the same flags.')
    state.update({k: old[k] for k in ('dev', 'best_lr', 'final') if k in old})

  for lr in grid:
    key = _lr_key(lr)
    if key in state['dev']:
      continue
    run_dir = os.path.join(workdir, f'lr_{key}')
    metrics = train_fn(_variant(config, train_split=train_part, test_split=dev_part,
                                **{'lr.base': lr}), run_dir).metrics
    state['dev'][key] = {'accuracy_dev': float(metrics['accuracy_test']),
                         'loss_dev': float(metrics.get('loss_test', float('nan'))),
                         'workdir': run_dir}
    _write_json(path, state)

  best = max(grid, key=lambda g: (state['dev'][_lr_key(g)]['accuracy_dev'], -g))
  state['best_lr'] = best
  _write_json(path, state)
  if state['final'] is None:
    final_dir = os.path.join(workdir, 'final')
    metrics = train_fn(_variant(config, **{'lr.base': best}), final_dir).metrics
    state['final'] = {'lr': best, 'accuracy_test': float(metrics['accuracy_test']),
                      'loss_test': float(metrics.get('loss_test', float('nan'))),
                      'workdir': final_dir}
    _write_json(path, state)
  return state


def format_table(state: dict[str, Any]) -> str:
  lines = [f'dev split {state["dev_split"]} (train on {state["sweep_train_split"]}):',
           '  lr        accuracy_dev']
  for lr in state['grid']:
    acc = state['dev'][_lr_key(lr)]['accuracy_dev']
    mark = '  <- best' if lr == state['best_lr'] else ''
    lines.append(f'  {_lr_key(lr):8s}  {acc:.4f}{mark}')
  final = state['final']
  lines.append(f'retrained on {state["train_split"]} with lr {_lr_key(final["lr"])}: '
               f'accuracy_test {final["accuracy_test"]:.4f} ({state["test_split"]})')
  return '\n'.join(lines)


def define_flags(fv: flags.FlagValues) -> None:
  """The flags of ``python -m vit_jax.sweep`` besides --config (`cli.command`)."""
  flags.DEFINE_string('workdir', None, 'Sweep directory: sweep.json, lr_<lr>/ and final/.',
                      flag_values=fv)
  flags.DEFINE_string('grid', ','.join(_lr_key(g) for g in PAPER_GRID),
                      'Comma-separated learning rates (default: the paper\'s Table 4).',
                      flag_values=fv)
  flags.DEFINE_float('dev_split', None, 'Fraction of train held out as dev (default: '
                     '0.1 / 0.02 / 0.01 by the size of the train split).', flag_values=fv)
  flags.mark_flags_as_required(['config', 'workdir'], flag_values=fv)


@cli.command(define_flags, config='Fine-tuning config, as for vit_jax.main.', log=True)
def main(args: cli.Args) -> None:
  """Runs the sweep into --workdir; prints the table of dev accuracies and the test accuracy."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  try:
    grid = [float(x) for x in args.grid.split(',') if x.strip()]
  except ValueError as e:
    raise cli.UsageError(f'--grid must be comma-separated numbers, got {args.grid!r}.') from e
  state = run_sweep(args.config, args.workdir, grid, args.dev_split)
  print(format_table(state))
  print(f'Wrote {os.path.join(args.workdir, "sweep.json")}.')


if __name__ == '__main__':
  sys.exit(main())
