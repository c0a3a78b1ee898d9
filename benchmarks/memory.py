r"""Device memory a fine-tune step needs, counted from the step's shapes.

  python benchmarks/memory.py --model=ViT-H_14 --resolution=384 --batch=512 \
      --accum_steps=32 --remat=dots_with_no_batch_dims_saveable --calibrate

Nothing is allocated or run (`jax.eval_shape` only), so a CPU answers "does
ViT-H/14 at 384 with batch 512 fit one 80 GB GPU?" without one. The estimate
adds what the training loop's step holds at its peak, the start of a
micro-batch's backward pass:
- the train state: f32 params and the optimizer state (`benchmark.train_recipe`:
  SGD momentum in bf16);
- the batch on the device (f32 images) and, with `accum_steps` > 1, the f32
  gradient accumulator (`optim.accumulate_gradients`);
- the f32 gradients being formed;
- the residuals one micro-batch's backward pass keeps: the leaves of
  `jax.vjp`'s closure over the model's loss, under the `--remat` policy.
It leaves out one block's transient working memory and XLA's own buffers, so
`--calibrate` also prints the estimate for ViT-L/16 at 384, a 32-image step
with remat, which one H100 measured at 11.1 GiB peak (benchmarks/RESULTS.md).

The residuals are counted on this machine's attention path: on a CPU the
einsum path, which keeps the T x T attention weights when nothing is
rematerialised, where cuDNN flash attention on a GPU keeps only its output;
without `--remat` a CPU's estimate is therefore high. (XLA:CPU's own buffer
plan for the compiled step, `memory_analysis()`, came out 8.5x the H100's
measured peak for the calibration case: useless for a GPU.)
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this clone's vit_jax

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import flags  # noqa: E402

from vit_jax import benchmark, cli, models  # noqa: E402
from vit_jax.models import vit  # noqa: E402

# What one H100 measured (RESULTS.md, 2026-11-26): ViT-L/16 at 384, a 32-image
# bf16 step with per-block remat, peak bytes in use.
CALIBRATION = dict(model='ViT-L_16', resolution=384, batch=32, accum_steps=1,
                   remat='dots_with_no_batch_dims_saveable', measured_gib=11.1)


def step_memory(model: str, *, resolution: int, batch: int, accum_steps: int = 1,
                remat: str | None = None, dtype: str = 'bfloat16',
                num_classes: int = 1000) -> dict[str, int]:
  """Bytes of each part of the step's peak (module docstring) and their sum."""
  if batch % accum_steps:
    raise ValueError(f'batch {batch} is not divisible by accum_steps {accum_steps}')
  from vit_jax import optim  # pylint: disable=g-import-not-at-top
  module = models.get_model(model, num_classes=num_classes, dtype=dtype,
                            **({'remat': remat} if remat else {}))
  x = jnp.zeros((1, resolution, resolution, 3), jnp.float32)
  params = jax.eval_shape(lambda k: module.init(k, x, train=False), jax.random.key(0))['params']
  recipe = benchmark.train_recipe()
  tx = optim.make_optimizer(recipe.optim, optim.schedule_from_config(recipe))
  micro = jax.ShapeDtypeStruct((batch // accum_steps, resolution, resolution, 3), jnp.float32)

  def loss(p, images):
    logits = module.apply({'params': p}, images, train=True,
                          rngs={'dropout': jax.random.key(0)})
    return jax.nn.logsumexp(logits.astype(jnp.float32), -1).mean()
  backward = jax.eval_shape(lambda p, im: jax.vjp(lambda p: loss(p, im), p)[1], params, micro)
  size = lambda tree: sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))
  f32_params = sum(a.size * 4 for a in jax.tree.leaves(params))
  out = dict(params=size(params), optimizer=size(jax.eval_shape(tx.init, params)),
             batch=batch * resolution * resolution * 3 * 4, gradients=f32_params,
             accumulator=f32_params if accum_steps > 1 else 0, residuals=size(backward))
  out['total'] = sum(out.values())
  return out


def report(name: str, mem: dict[str, int]) -> str:
  parts = ', '.join(f'{k} {v / 2**30:.2f}' for k, v in mem.items() if k != 'total')
  return f'{name}: ~{mem["total"] / 2**30:.1f} GiB ({parts})'


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('model', 'ViT-B_16', 'Preset name (models.MODEL_CONFIGS).', flag_values=fv)
  flags.DEFINE_integer('resolution', 384, 'Image side in pixels.', flag_values=fv)
  flags.DEFINE_integer('batch', 512, 'Images per step (all micro-batches).', flag_values=fv)
  flags.DEFINE_integer('accum_steps', 1, 'Micro-batches per step.', flag_values=fv)
  flags.DEFINE_string('remat', None, f'Per-block remat policy, one of {vit.REMAT_POLICIES}.',
                      flag_values=fv)
  flags.DEFINE_enum('dtype', 'bfloat16', ['bfloat16', 'float32'], 'Compute dtype.',
                    flag_values=fv)
  flags.DEFINE_bool('calibrate', False, 'Also estimate the step one H100 measured.',
                    flag_values=fv)


@cli.command(define_flags)
def main(args: cli.Args) -> None:
  """Prints the estimate for the flags' shapes (and the calibration case)."""
  print(f'attention path of this backend: {jax.default_backend()}', flush=True)
  if args.calibrate:
    case = dict(CALIBRATION)
    measured = case.pop('measured_gib')
    mem = step_memory(**case)
    print(report(f'{case["model"]} @{case["resolution"]} batch {case["batch"]} remat',
                 mem) + f'; one H100 measured {measured} GiB '
          f'(estimate/measured {mem["total"] / 2**30 / measured:.2f})', flush=True)
  mem = step_memory(args.model, resolution=args.resolution, batch=args.batch,
                    accum_steps=args.accum_steps, remat=args.remat, dtype=args.dtype)
  print(report(f'{args.model} @{args.resolution} batch {args.batch} = {args.accum_steps} x '
               f'{args.batch // args.accum_steps}{" remat " + args.remat if args.remat else ""}',
               mem), flush=True)


if __name__ == '__main__':
  sys.exit(main())
