r"""Inference throughput of the RPT report's Table 1 models (and ViT-Ti/S/B at 224).

  python benchmarks/table1.py --repeats=5 > table1.md

The report measures Table 1 at 224px (its tf_flowers setting) and Table 2 at
each dataset's resolution (tf_flowers 224, CIFAR 32, Tiny-ImageNet 64). For
every resolution group this script builds the presets that configs/scratch.py
trains there, compiles them all, then times them in interleaved rounds (one
call per model per round, order reversed every other round) and prints a
markdown table: median and best images/sec, compile time, parameters, XLA's
GFLOP per image, and the speed relative to ViT-Ti (the report's Table 2
comparison) as the median of same-round ratios, which survives a host whose
speed changes during the run.
"""

from __future__ import annotations

import datetime
import os
import pathlib
import platform
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this clone's vit_jax

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from configs import scratch  # noqa: E402
from vit_jax import benchmark, cli  # noqa: E402

# Report Table 2's resolution per dataset; one row group per distinct resolution.
GROUPS = {
    224: 'tf_flowers',
    32: 'cifar10',   # CIFAR-100 differs only in the head (100 classes)
    64: 'tiny_imagenet',
}
# ViT paper presets added to the 224 group (ImageNet heads, 1000 classes).
EXTRA_224 = ['ViT-Ti_16', 'ViT-S_16', 'ViT-B_16']


def rows_for(resolution: int) -> list[tuple[str, str, int]]:
  """[(table label, preset, num_classes)] measured at `resolution`."""
  dataset = GROUPS[resolution]
  classes = scratch.DATASETS[dataset]['num_classes']
  rows = [(f'{key} ({dataset})', scratch.model_name(key, dataset), classes)
          for key in ('vit_ti', 'sl_vit', 'rot_vit', 'deit_ti', 'resnet56')]
  if resolution == 224:
    rows += [(name, name, 1000) for name in EXTRA_224]
  return rows


def measure_group(resolution: int, batch: int, repeats: int,
                  only: set[str] | None) -> list[dict]:
  rows = [r for r in rows_for(resolution) if not only or r[1] in only]
  steps = []
  for label, preset, classes in rows:
    model, variables = benchmark.build(preset, num_classes=classes, resolution=resolution)
    step = benchmark.compile_step(model, variables, batch=batch, resolution=resolution,
                                  num_classes=classes)
    jax.block_until_ready(step.call())  # warm-up, untimed
    steps.append({'label': label, 'preset': preset, 'step': step,
                      'params': benchmark._num_params(variables['params']), 'times': []})
    print(f'  compiled {preset} @{resolution} in {step.compile_s:.1f} s', file=sys.stderr)
  for r in range(repeats):
    for s in (steps if r % 2 == 0 else steps[::-1]):
      s['times'].append(benchmark.time_calls(s['step'].call, 1, warmup=0)[0])
  ref = next((s for s in steps if s['label'].startswith('vit_ti')), steps[0])
  for s in steps:
    t = np.array(s['times'])
    s.update(median=batch / statistics.median(t), best=batch / t.min(),
             rel=float(np.median(np.array(ref['times']) / t)),
             gflops=s['step'].flops / batch / 1e9 if s['step'].flops else float('nan'))
  return steps


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('resolutions', '224,32,64', 'Comma list of report resolutions.',
                      flag_values=fv)
  flags.DEFINE_string('batch', '224:8,32:64,64:32', 'Per-resolution batch, "res:batch,...".',
                      flag_values=fv)
  flags.DEFINE_integer('repeats', 5, 'Interleaved timing rounds.', flag_values=fv)
  flags.DEFINE_string('only', '', 'Comma list of presets to keep.', flag_values=fv)


@cli.command(define_flags)
def main(args: cli.Args) -> None:
  """Prints the markdown table (compile progress goes to stderr)."""
  batches = {int(k): int(v) for k, v in (kv.split(':') for kv in args.batch.split(','))}
  only = set(filter(None, args.only.split(',')))
  resolutions = [int(r) for r in args.resolutions.split(',')]
  if not set(resolutions) <= set(GROUPS):
    raise cli.UsageError(f'--resolutions={args.resolutions}: the report resolutions are '
                         f'{sorted(GROUPS)}')
  dev = jax.devices()[0]
  print(f'<!-- {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, jax {jax.__version__}, '
        f'{dev.platform}:{dev.device_kind}, {os.cpu_count()} host cores, '
        f'{platform.processor() or platform.machine()}; {" ".join(sys.argv)} -->')
  print('| model | preset | res | batch | params (M) | GFLOP/img | img/s (median) | '
        'img/s (best) | vs ViT-Ti | compile (s) |')
  print('|---|---|---|---|---|---|---|---|---|---|')
  for res in resolutions:
    for s in measure_group(res, batches[res], args.repeats, only):
      print(f'| {s["label"]} | {s["preset"]} | {res} | {batches[res]} | {s["params"] / 1e6:.2f} | '
            f'{s["gflops"]:.2f} | {s["median"]:.1f} | {s["best"]:.1f} | {s["rel"]:.2f} | '
            f'{s["step"].compile_s:.1f} |', flush=True)


if __name__ == '__main__':
  sys.exit(main())
