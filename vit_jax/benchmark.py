r"""Throughput of any model preset or config: images/sec, compilation excluded.

The RPT report compares models by inference throughput (its Tables 1, 2 and 5)
and the original repository shipped an ``inference_time`` tool; this module is
both. Usage::

  python -m vit_jax.benchmark --model=ViT-B_16 --resolution=224 --batch=32
  python -m vit_jax.benchmark --model=ViT-Ti_16 --resolution=224 --batch=32 --train
  python -m vit_jax.benchmark --config=configs/scratch.py:vit_ti,cifar10 --batch=64

How it measures (and why):
- The step is compiled ahead of time (``jit(...).lower(...).compile()``) and
  that time is reported separately as ``compile_s``; the timed calls run the
  compiled executable only. A JAX monitoring listener counts backend
  compilations during the timed calls, and the run fails if there is one, so a
  silent retrace can never leak into a figure.
- One untimed warm-up call follows compilation (first-call allocations).
- Each repeat times one call with ``block_until_ready``; the reported figure is
  ``batch / median(call times)``. The median resists the bursts of host noise
  seen on shared machines.
- ``--train`` times the training loop's own step (``train_step.make_train_step``:
  forward, backward, gradient accumulation, clipping, the optax update with
  the state donated) under the paper's fine-tuning recipe
  (``FINETUNE_RECIPE``), or under ``--config``'s recipe. BatchNorm models
  update ``batch_stats``.
- Images live on the first device, so the figure is per device (the original's
  ``img_sec_core``); on a CPU the one device spans all host cores.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from vit_jax import cli, models

_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'


@dataclasses.dataclass
class Result:
  """One throughput measurement. `images_per_sec` = batch / median(step_times)."""
  name: str
  mode: str                 # 'inference' or 'train'
  batch: int
  resolution: int
  dtype: str
  num_params: int
  compile_s: float          # trace + lower + XLA compile, excluded from the figures
  step_times: list[float]   # seconds per timed call, one per repeat
  images_per_sec: float
  gflops_per_image: float | None = None   # XLA cost analysis, when available
  device: str = ''

  @property
  def achieved_gflops(self) -> float | None:
    """GFLOP/s actually reached: compare with the device's matmul peak."""
    if self.gflops_per_image is None:
      return None
    return self.gflops_per_image * self.images_per_sec

  def summary(self) -> str:
    times = self.step_times
    extra = ''
    if self.achieved_gflops is not None:
      extra = (f', {self.gflops_per_image:.2f} GFLOP/img, '
               f'{self.achieved_gflops:.0f} GFLOP/s')
    return (f'{self.name} {self.mode} @{self.resolution}px batch {self.batch} '
            f'{self.dtype}: {self.images_per_sec:.1f} img/s (median of {len(times)}; '
            f'min-max step {min(times) * 1e3:.1f}-{max(times) * 1e3:.1f} ms), '
            f'compile {self.compile_s:.2f} s, {self.num_params / 1e6:.2f}M params{extra} '
            f'[{self.device}]')


class _CompileCounter:
  """Counts XLA backend compilations while active (jax.monitoring listener)."""

  def __init__(self):
    self.count = 0
    self.active = False
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event: str, duration: float, **kwargs: Any) -> None:
    del duration, kwargs
    if self.active and event == _COMPILE_EVENT:
      self.count += 1


_COUNTER: _CompileCounter | None = None


def _compile_counter() -> _CompileCounter:
  # One listener per process: jax.monitoring has no public way to unregister.
  global _COUNTER
  if _COUNTER is None:
    _COUNTER = _CompileCounter()
  return _COUNTER


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 1,
               timer: Callable[[], float] = time.perf_counter) -> list[float]:
  """Calls `fn` warmup + repeats times; returns the `repeats` wall times (s).

  `fn` must return (a pytree of) jax arrays: each call is waited for with
  `block_until_ready`, since JAX dispatch is asynchronous. Raises if XLA
  compiles anything during the timed calls (a retrace would be timed).
  """
  if repeats < 1:
    raise ValueError(f'repeats must be >= 1, got {repeats}')
  for _ in range(warmup):
    jax.block_until_ready(fn())
  counter = _compile_counter()
  counter.count, counter.active = 0, True
  times = []
  try:
    for _ in range(repeats):
      start = timer()
      jax.block_until_ready(fn())
      times.append(timer() - start)
  finally:
    counter.active = False
  if counter.count:
    raise RuntimeError(
        f'{counter.count} XLA compilation(s) happened inside the timed calls: the '
        'step is being retraced (changing shapes/dtypes or non-hashable static '
        'arguments?), so the figures would include compile time.')
  return times


def _flops(compiled: Any) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - cost analysis is optional and backend dependent
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = (cost or {}).get('flops')
  return float(flops) if flops and flops > 0 else None


def _num_params(params: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


# The step that `--train` times is the training loop's own
# (`train_step.make_train_step`: gradient accumulation, clipping, schedule) under
# the paper's fine-tuning recipe (App. B.1.1): SGD momentum 0.9 with the
# momentum in bf16 (as configs/common.py), global-norm clipping at 1, warmup
# + cosine. `--config=...` times that config's own recipe instead.
FINETUNE_RECIPE = {
    'optim': {'name': 'sgd', 'momentum': 0.9, 'momentum_dtype': 'bfloat16',
              'grad_clip_norm': 1.0, 'weight_decay': 0.0},
    'lr': {'base': 0.01, 'warmup_steps': 500, 'decay_type': 'cosine'},
    'total_steps': 10_000, 'accum_steps': 1, 'label_smoothing': 0.0,
}


def train_recipe(config: Any = None) -> Any:
  """The ConfigDict whose optim / lr / accum_steps the timed step uses."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  recipe = ml_collections.ConfigDict(FINETUNE_RECIPE)
  if config is not None:
    for key in FINETUNE_RECIPE:
      if config.get(key) is not None:
        recipe[key] = config[key]
  return recipe


@dataclasses.dataclass
class CompiledStep:
  """A ready-to-time step: `call()` runs one batch and returns arrays to wait on.
  `hlo()` is the optimised HLO text of what runs (for profiles)."""
  call: Callable[[], Any]
  compile_s: float
  flops: float | None
  hlo: Callable[[], str]


def compile_step(model: Any, variables: dict[str, Any], *, batch: int, resolution: int,
                 train: bool = False, num_classes: int = 1000,
                 recipe: Any = None) -> CompiledStep:
  """Compiles (ahead of time, timed) one inference or training step on device 0.

  Inputs are fixed random images in [-1, 1] (and random labels): throughput
  does not depend on pixel values. `variables` = {'params', ['batch_stats']}.
  The training step is `train_step.make_train_step` under `train_recipe(recipe)`.
  """
  if batch < 1 or resolution < 1:
    raise ValueError(f'batch and resolution must be positive, got {batch}, {resolution}')
  key = jax.random.key(0)
  images = jax.random.uniform(key, (batch, resolution, resolution, 3), jnp.float32, -1., 1.)
  variables = jax.device_put(variables, jax.devices()[0])

  if train:
    from vit_jax import optim, train_step  # pylint: disable=g-import-not-at-top
    recipe = train_recipe(recipe)
    labels = jax.random.randint(jax.random.fold_in(key, 1), (batch,), 0, num_classes)
    batch_arrays = {'image': images, 'label': labels}
    schedule = optim.schedule_from_config(recipe)
    tx = optim.make_optimizer(recipe.optim, schedule)
    # The step donates its state: work on a copy so the caller's arrays survive.
    state = jax.tree.map(jnp.copy, dict(variables, step=jnp.zeros((), jnp.int32),
                                        opt_state=tx.init(variables['params'])))
    step_fn = jax.jit(train_step.make_train_step(model, tx, schedule, recipe),
                      donate_argnums=0)
    start = time.perf_counter()
    compiled = step_fn.lower(state, batch_arrays, key).compile()
    compile_s = time.perf_counter() - start
    box = {'state': state}

    def call():
      box['state'], metrics = compiled(box['state'], batch_arrays, key)
      return metrics['train_loss']
  else:
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    start = time.perf_counter()
    compiled = apply.lower(variables, images).compile()
    compile_s = time.perf_counter() - start

    def call():
      return compiled(variables, images)

  return CompiledStep(call=call, compile_s=compile_s, flops=_flops(compiled),
                      hlo=compiled.as_text)


def benchmark(model: Any, variables: dict[str, Any], *, batch: int, resolution: int,
              train: bool = False, repeats: int = 10, warmup: int = 1,
              num_classes: int = 1000, name: str = 'model', recipe: Any = None,
              timer: Callable[[], float] = time.perf_counter) -> Result:
  """Measures `model`'s inference (or training) images/sec on one device.

  `variables` is {'params': ..., ['batch_stats': ...]} as returned by init.
  """
  step = compile_step(model, variables, batch=batch, resolution=resolution, train=train,
                      num_classes=num_classes, recipe=recipe)
  times = time_calls(step.call, repeats, warmup, timer)
  device = jax.devices()[0]
  return Result(
      name=name, mode='train' if train else 'inference', batch=batch, resolution=resolution,
      dtype=jnp.dtype(getattr(model, 'dtype', jnp.float32)).name,
      num_params=_num_params(variables['params']), compile_s=step.compile_s,
      step_times=times, images_per_sec=batch / statistics.median(times),
      gflops_per_image=step.flops / batch / 1e9 if step.flops else None,
      device=f'{device.platform}:{device.device_kind}')


def model_config_from_experiment(config: Any) -> tuple[Any, str]:
  """(model config, display name) from a training config (configs/*.py schema).

  `config.model_name` picks a preset and `config.model` overrides its fields,
  exactly as training merges them (`config_schema.model_config`); either may be
  absent, not both.
  """
  from vit_jax import config_schema  # pylint: disable=g-import-not-at-top
  if config.get('model_name') is None and config.get('model') is None:
    raise ValueError('The config sets neither `model_name` nor `model`: nothing to benchmark.')
  merged = config_schema.model_config(config).to_dict()
  return merged, config.get('model_name') or merged['model_name']


def build(model_config: Any, *, num_classes: int, resolution: int, dtype: str = 'auto',
          seed: int = 0, **overrides: Any) -> tuple[Any, dict[str, Any]]:
  """(module, variables) of a randomly initialised preset or model config
  (`hub.init`); `overrides` replace model fields (e.g. attention='einsum')."""
  from vit_jax import hub  # pylint: disable=g-import-not-at-top
  model = hub.init(model_config, num_classes=num_classes, image_size=resolution, dtype=dtype,
                   seed=seed, **overrides)
  return model.module, model.variables


def run(model_config: Any, *, name: str, batch: int, resolution: int, train: bool = False,
        repeats: int = 10, dtype: str = 'auto', num_classes: int = 1000,
        recipe: Any = None) -> Result:
  """build + benchmark: the CLI's work, importable from scripts."""
  model, variables = build(model_config, num_classes=num_classes, resolution=resolution,
                           dtype=dtype)
  return benchmark(model, variables, batch=batch, resolution=resolution, train=train,
                   repeats=repeats, num_classes=num_classes, name=name, recipe=recipe)


def define_flags(fv: flags.FlagValues) -> None:
  """The flags of ``python -m vit_jax.benchmark`` besides --config (`cli.command`)."""
  flags.DEFINE_string('model', None, 'Preset name from vit_jax.models.MODEL_CONFIGS.',
                      flag_values=fv)
  flags.DEFINE_integer('resolution', None, 'Input side in pixels (default: config image_size).',
                       flag_values=fv)
  flags.DEFINE_integer('batch', 32, 'Batch size.', flag_values=fv)
  flags.DEFINE_integer('repeats', 10, 'Timed calls; the median is reported.', flag_values=fv)
  flags.DEFINE_integer('num_classes', None, 'Head size (default: config or 1000).',
                       flag_values=fv)
  flags.DEFINE_bool('train', False, 'Also time a training step (forward+backward+SGD).',
                    flag_values=fv)
  flags.DEFINE_enum('dtype', 'auto', models.DTYPES,
                    f"Computation dtype ('auto': {models.AUTO_DTYPE}; with "
                    '--config, default config.dtype).', flag_values=fv)
  flags.DEFINE_bool('json', False, 'Print one JSON object per result.', flag_values=fv)


@cli.command(define_flags, config='Training config file (file.py[:arg]).', lock_config=False,
             log=True)
def main(args: cli.Args) -> None:
  """Prints the throughput of --model or --config's model (and of its training step)."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)  # hide jax's "no TPU" backend probing
  if args.config is not None:
    model_config, name = model_config_from_experiment(args.config)
    resolution = args.resolution or args.config.get('image_size')
    num_classes = args.num_classes or args.config.get('num_classes') or 1000
  elif args.model:
    model_config, name = args.model, args.model
    resolution, num_classes = args.resolution, args.num_classes or 1000
  else:
    raise cli.UsageError('Give --model=PRESET (e.g. ViT-B_16) or --config=configs/FILE.py[:arg].')
  if not resolution:
    raise cli.UsageError('Give --resolution (the config has no image_size).')
  modes = [False, True] if args.train else [False]
  dtype = args.dtype
  if args.config is not None and not args.flags['dtype'].present:
    dtype = args.config.get('dtype', 'auto')
  results = [run(model_config, name=name, batch=args.batch, resolution=int(resolution),
                 train=t, repeats=args.repeats, dtype=dtype, num_classes=num_classes,
                 recipe=args.config)
             for t in modes]
  for r in results:
    print(json.dumps(dataclasses.asdict(r)) if args.json else r.summary(), flush=True)


if __name__ == '__main__':
  sys.exit(main())
