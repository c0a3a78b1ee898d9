r"""Train and eval images/sec of our Flax ViT beside timm's PyTorch ViT of the same shape.

  python benchmarks/train_step.py --model=ViT-Ti_16 --resolution=224 --batch=32 --repeats=5

Prints, for the named preset: eval and train images/sec (and per CPU core), the
Flax compile times, and the same figures for timm's `VisionTransformer` built
with the same patch size, width, depth, heads, MLP, classifier and head size,
run in this process on this machine; then the ratio Flax/timm.

Why the timing is interleaved: shared hosts change speed by 2x for minutes at a
time, so figures taken minutes apart cannot be compared. Each round times one
Flax call and one timm call back to back (alternating which goes first), and the
ratio is the median of the per-round ratios (the ratio of the best times is
printed too: on a loaded host the fastest call is the least disturbed). A small f32 matmul is timed in each
round too, so a slow host shows up as a low GFLOP/s.

timm is optional. Install it without pulling CUDA wheels:
  pip install torch==2.13.0 && pip install -c <(echo torch==2.13.0) timm
If it is missing, the Flax figures are still printed.
"""

from __future__ import annotations

import functools
import os
import pathlib
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this clone's vit_jax

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from vit_jax import benchmark, cli, models  # noqa: E402


def import_timm() -> tuple[Any, str]:
  """Returns (timm module or None, message)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return None, 'PyTorch is not installed (pip install torch==2.13.0): timm comparison skipped.'
  try:
    import timm  # pylint: disable=g-import-not-at-top
  except ImportError as e:   # timm itself, or a module it imports (torchvision)
    return None, (f'timm cannot be imported ({e}; pip install -c <(echo torch==2.13.0) '
                  'timm torchvision): timm comparison skipped.')
  except RuntimeError as e:
    # A CUDA torchvision wheel next to a CPU torch fails to register its compiled
    # ops ("operator torchvision::nms does not exist"). timm's ViT never calls
    # them: declare the two schemas torchvision's Python side looks up, retry.
    if 'torchvision::' not in str(e):
      raise
    import torch  # pylint: disable=g-import-not-at-top
    for name in [m for m in sys.modules if m.split('.')[0] in ('torchvision', 'timm')]:
      del sys.modules[name]
    lib = torch.library.Library('torchvision', 'FRAGMENT')
    lib.define('nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
    lib.define('qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor')
    import_timm.lib = lib  # keep the registration alive
    import timm  # pylint: disable=g-import-not-at-top
  return timm, f'timm {timm.__version__}'


def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
  try:
    return cfg[key]
  except (KeyError, TypeError):
    return default


def timm_peer(model_config: dict[str, Any], *, resolution: int, num_classes: int):
  """timm VisionTransformer with our preset's shape, or a reason it has none."""
  timm, msg = import_timm()
  if timm is None:
    return None, msg
  import torch  # pylint: disable=g-import-not-at-top
  from timm.models.vision_transformer import VisionTransformer  # pylint: disable=g-import-not-at-top
  cfg = model_config
  if (cfg.get('model_type', 'vit') != 'vit' or cfg.get('resnet') or cfg.get('tokenizer')
      or cfg.get('classifier', 'token') not in ('token', 'gap')
      or cfg.get('representation_size')):
    return None, 'no timm peer for this architecture (plain ViT presets only).'
  t = cfg['transformer']
  model = VisionTransformer(
      img_size=resolution, patch_size=tuple(cfg['patches']['size']), num_classes=num_classes,
      embed_dim=cfg['hidden_size'], depth=t['num_layers'], num_heads=t['num_heads'],
      mlp_ratio=t['mlp_dim'] / cfg['hidden_size'], qkv_bias=True,
      class_token=cfg.get('classifier', 'token') == 'token',
      global_pool='token' if cfg.get('classifier', 'token') == 'token' else 'avg',
      fc_norm=False,  # ours: encoder_norm, then pool (paper eq. 4)
      act_layer=functools.partial(torch.nn.GELU, approximate='tanh'))  # ours: tanh GELU
  return model, f'{msg}, torch {torch.__version__}, {torch.get_num_threads()} threads'


def timm_steps(model: Any, *, batch: int, resolution: int, num_classes: int,
               bf16: bool) -> dict[str, Callable[[], Any]]:
  """{'eval': fn, 'train': fn}: one timm forward (no grad) / SGD step per call."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  x = torch.rand(batch, 3, resolution, resolution) * 2 - 1
  y = torch.randint(0, num_classes, (batch,))
  opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
  loss_fn = torch.nn.CrossEntropyLoss()
  autocast = functools.partial(torch.autocast, 'cpu', dtype=torch.bfloat16, enabled=bf16)

  def eval_step():
    model.eval()
    with torch.inference_mode(), autocast():
      return model(x)

  def train_step():
    model.train()
    opt.zero_grad(set_to_none=True)
    with autocast():
      loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    return loss

  return {'eval': eval_step, 'train': train_step}


def _matmul_ref() -> Callable[[], float]:
  """Returns fn() -> host f32 matmul GFLOP/s (one 1024^2 x 1024 product)."""
  n = 1024
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()

  def measure() -> float:
    start = time.perf_counter()
    f(a).block_until_ready()
    return 2 * n**3 / (time.perf_counter() - start) / 1e9
  return measure


def _cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('model', 'ViT-Ti_16', 'Preset in vit_jax.models.MODEL_CONFIGS.',
                      flag_values=fv)
  flags.DEFINE_integer('resolution', 224, 'Input side in pixels.', flag_values=fv)
  flags.DEFINE_integer('batch', 32, 'Batch size.', flag_values=fv)
  flags.DEFINE_integer('repeats', 5, 'Interleaved rounds; medians reported.', flag_values=fv)
  flags.DEFINE_integer('num_classes', 1000, 'Head size.', flag_values=fv)
  flags.DEFINE_enum('dtype', 'float32', models.DTYPES,
                    'bfloat16: Flax dtype=bfloat16 and timm under CPU autocast(bfloat16).',
                    flag_values=fv)
  flags.DEFINE_list('modes', ['eval', 'train'], 'Comma list of eval,train.', flag_values=fv)
  flags.DEFINE_bool('no_timm', False, 'Flax figures only.', flag_values=fv)


@cli.command(define_flags)
def main(args: cli.Args) -> None:
  """Prints Flax and timm images/sec per mode, and their same-round ratio."""
  modes = [m for m in args.modes if m]
  if not modes or not set(modes) <= {'eval', 'train'}:
    raise cli.UsageError(f'--modes must list eval and/or train, got {",".join(modes)!r}')

  cfg = models.get_config(args.model).to_dict()
  cores = _cores() if jax.devices()[0].platform == 'cpu' else jax.local_device_count()
  unit = 'CPU core' if jax.devices()[0].platform == 'cpu' else 'device'
  print(f'{args.model} @{args.resolution}px batch {args.batch} {args.dtype}; '
        f'jax {jax.__version__} on {jax.devices()[0].device_kind}, {cores} {unit}(s)')

  model, variables = benchmark.build(args.model, num_classes=args.num_classes,
                                     resolution=args.resolution, dtype=args.dtype)
  flax_calls, compile_s = {}, {}
  for mode in modes:
    step = benchmark.compile_step(model, variables, batch=args.batch, resolution=args.resolution,
                                  train=mode == 'train', num_classes=args.num_classes)
    flax_calls[mode], compile_s[mode] = step.call, step.compile_s
    jax.block_until_ready(step.call())  # warm-up, untimed
  del variables

  timm_calls = {}
  if args.no_timm:
    print('timm: skipped (--no_timm)')
  else:
    peer, msg = timm_peer(cfg, resolution=args.resolution, num_classes=args.num_classes)
    print(f'timm: {msg}')
    if peer is not None:
      timm_calls = timm_steps(peer, batch=args.batch, resolution=args.resolution,
                              num_classes=args.num_classes, bf16=args.dtype == 'bfloat16')
      for mode in modes:
        timm_calls[mode]()  # warm-up, untimed (first-call allocations)

  ref = _matmul_ref()
  times: dict[tuple[str, str], list[float]] = {}
  host = []
  for r in range(args.repeats):
    host.append(ref())
    for mode in modes:
      order = [('flax', flax_calls[mode])]
      if mode in timm_calls:
        order.append(('timm', timm_calls[mode]))
      for fw, call in (order if r % 2 == 0 else order[::-1]):
        times.setdefault((fw, mode), []).append(benchmark.time_calls(call, 1, warmup=0)[0])

  print(f'host f32 matmul GFLOP/s per round: {", ".join(f"{g:.0f}" for g in host)}')
  print(f'{"":8}{"":>7} {"img/s":>9} {"img/s/" + unit:>16} {"best img/s":>11} {"compile s":>10}')
  for mode in modes:
    for fw in ('flax', 'timm'):
      if (fw, mode) not in times:
        continue
      ips = args.batch / statistics.median(times[fw, mode])
      best = args.batch / min(times[fw, mode])
      comp = f'{compile_s[mode]:10.2f}' if fw == 'flax' else f'{"eager":>10}'
      print(f'{mode:8}{fw:>7} {ips:9.1f} {ips / cores:16.2f} {best:11.1f} {comp}')
    if ('timm', mode) in times:
      ratios = np.array(times['timm', mode]) / np.array(times['flax', mode])
      print(f'{mode:8}{"ratio":>7} Flax/timm = {np.median(ratios):.2f} '
            f'(median of {len(ratios)} same-round ratios; range {ratios.min():.2f}-'
            f'{ratios.max():.2f}); best/best = '
            f'{min(times["timm", mode]) / min(times["flax", mode]):.2f}')


if __name__ == '__main__':
  sys.exit(main())
