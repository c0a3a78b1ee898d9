"""Optimizers, learning-rate schedules, losses and gradient accumulation.

Everything the train step needs besides the model, as plain optax objects and
pure functions, so that the step in `train.py` stays short and each piece can
be tested against a hand computation.

Recipe (ViT paper, Appendix B.1.1 / Table 4): fine-tuning uses SGD with
momentum 0.9, global-norm clipping at 1, no weight decay, linear warmup then
cosine decay. Training from scratch (RPT report, section 4.2) uses AdamW with
lr 1e-3, weight decay 1e-4, 10% warmup and cosine decay.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def make_schedule(base: float, total_steps: int, warmup_steps: int = 0,
                  decay_type: str = 'cosine', linear_end: float = 1e-5
                  ) -> Callable[[jax.Array], jax.Array]:
  """Returns optax's schedule: lr of the update that follows `count` updates.

  The update number is k = count + 1 (k = 1 is the first update). With
  w = warmup_steps and T = total_steps:

    k <= w:  lr = base * k / w                  (first update: base / w, not 0)
    k >  w:  p = (k - w) / (T - w)
             cosine: lr = base * 0.5 * (1 + cos(pi * p))
             linear: lr = base + (linear_end - base) * p

  so the warmup reaches `base` exactly at k = w and the decay reaches its end
  value (0 for cosine, `linear_end` for linear) at the last update k = T.
  The original code evaluated its schedule at the 0-based step, so its first
  update had lr 0 and the lr it logged was that of the previous update; here
  the lr logged for step k is the lr that update k used (`lr_at(k)`).
  """
  if total_steps <= 0:
    raise ValueError(f'total_steps must be > 0, got {total_steps}.')
  if not 0 <= warmup_steps <= total_steps:
    raise ValueError(f'warmup_steps must be in [0, total_steps={total_steps}], '
                     f'got {warmup_steps}.')
  if decay_type not in ('cosine', 'linear', 'constant'):
    raise ValueError(f"decay_type must be 'cosine', 'linear' or 'constant', got "
                     f'{decay_type!r}.')

  def schedule(count):
    k = jnp.asarray(count, jnp.float32) + 1.0
    warm = base * k / max(warmup_steps, 1)
    p = jnp.clip((k - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0,
                 1.0)
    if decay_type == 'cosine':
      decay = base * 0.5 * (1.0 + jnp.cos(jnp.pi * p))
    elif decay_type == 'linear':
      decay = base + (linear_end - base) * p
    else:
      decay = jnp.full_like(p, base)
    return jnp.where(k <= warmup_steps, warm, decay)

  return schedule


def schedule_from_config(config) -> Callable[[jax.Array], jax.Array]:
  """`make_schedule` from `config.lr` and `config.total_steps`."""
  lr = config.lr
  warmup = lr.warmup_steps
  if isinstance(warmup, float):  # A fraction of training, e.g. 0.1 (RPT, 4.2).
    warmup = round(warmup * config.total_steps)
  return make_schedule(float(lr.base), int(config.total_steps), int(warmup),
                       lr.get('decay_type', 'cosine'),
                       float(lr.get('linear_end', 1e-5)))


def lr_at(schedule: Callable[[jax.Array], jax.Array], step: int) -> float:
  """The lr that update number `step` (1-based, as logged) used."""
  return float(schedule(step - 1))


def _decay_mask(params: PyTree) -> PyTree:
  # Decoupled weight decay on matrices/kernels only; biases, LayerNorm scales
  # and the like (1-D) are left alone, as in common AdamW practice.
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(optim_config, schedule: Callable[[jax.Array], jax.Array]
                   ) -> optax.GradientTransformation:
  """Builds the optax chain: clip by global norm -> SGD-momentum | AdamW.

  optim_config keys: name ('sgd' | 'adamw'), grad_clip_norm (None or <= 0
  disables), momentum (sgd), momentum_dtype ('float32' | 'bfloat16'; the
  original kept SGD momentum in bf16 to save memory), weight_decay, b1, b2,
  eps (adamw).
  """
  name = optim_config.get('name', 'sgd')
  clip = optim_config.get('grad_clip_norm', None)
  mdtype = optim_config.get('momentum_dtype', 'float32')
  if mdtype not in _DTYPES:
    raise ValueError(f'optim.momentum_dtype must be one of {sorted(_DTYPES)}, '
                     f'got {mdtype!r}.')
  mdtype = _DTYPES[mdtype]
  wd = float(optim_config.get('weight_decay', 0.0) or 0.0)
  chain = []
  if clip is not None and clip > 0:
    chain.append(optax.clip_by_global_norm(float(clip)))
  if name == 'sgd':
    momentum = optim_config.get('momentum', 0.9)
    if wd:
      # Coupled L2-style decay for SGD (added to the gradient before momentum).
      chain.append(optax.add_decayed_weights(wd, mask=_decay_mask))
    chain.append(optax.sgd(schedule, momentum=momentum or None,
                           accumulator_dtype=mdtype))
  elif name == 'adamw':
    chain.append(optax.adamw(schedule, b1=optim_config.get('b1', 0.9),
                             b2=optim_config.get('b2', 0.999),
                             eps=optim_config.get('eps', 1e-8),
                             mu_dtype=mdtype, weight_decay=wd,
                             mask=_decay_mask))
  else:
    raise ValueError(f"optim.name must be 'sgd' or 'adamw', got {name!r}.")
  return optax.chain(*chain)


# ---------------------------------------------------------------------------
# Losses.
# ---------------------------------------------------------------------------

def cross_entropy(logits: jax.Array, labels: jax.Array,
                  label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy with integer labels, in float32.

  With label_smoothing = e the target is (1 - e) * onehot + e / C.
  """
  logits = logits.astype(jnp.float32)
  num_classes = logits.shape[-1]
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if label_smoothing:
    onehot = optax.smooth_labels(onehot, label_smoothing)
  return -jnp.sum(onehot * jax.nn.log_softmax(logits, axis=-1), axis=-1)


# ---------------------------------------------------------------------------
# Gradient accumulation.
# ---------------------------------------------------------------------------

def split_microbatches(batch: PyTree, accum_steps: int) -> PyTree:
  """(B, ...) -> (accum_steps, B // accum_steps, ...).

  Micro-batch i holds examples i, i + n, i + 2n, ... (n = accum_steps), i.e.
  the batch is viewed as (B / n, n) and the second axis is moved first. With
  the batch sharded along its first axis in contiguous blocks, every device
  thus keeps its own examples in every micro-batch: no data moves.
  """
  def split(x):
    b = x.shape[0]
    if b % accum_steps:
      raise ValueError(f'Batch size {b} is not divisible by accum_steps='
                       f'{accum_steps}.')
    x = x.reshape((b // accum_steps, accum_steps) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, batch)


def accumulate_gradients(loss_fn: Callable[..., tuple[jax.Array, Any]],
                         params: PyTree, batch: PyTree, rng: jax.Array,
                         accum_steps: int, carry: Any = None
                         ) -> tuple[jax.Array, Any, PyTree]:
  """Mean loss and mean gradient over `accum_steps` equal micro-batches.

  `loss_fn(params, batch, rng, carry) -> (loss, carry)` returns the mean loss
  of a (micro-)batch; `carry` is threaded through micro-batches in order
  (BatchNorm statistics). Since every micro-batch has the same size, the mean
  of the micro-batch mean gradients is exactly the full-batch mean gradient;
  only memory changes. Micro-batch i gets the rng `fold_in(rng, i)`, so
  dropout masks differ between micro-batches.

  Returns (loss, carry, grads).
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if accum_steps == 1:
    (loss, carry), grads = grad_fn(params, batch, jax.random.fold_in(rng, 0),
                                   carry)
    return loss, carry, grads

  micro = split_microbatches(batch, accum_steps)

  def body(acc, xs):
    i, mb = xs
    loss_sum, grad_sum, c = acc
    (loss, c), grads = grad_fn(params, mb, jax.random.fold_in(rng, i), c)
    grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
    return (loss_sum + loss, grad_sum, c), None

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  (loss_sum, grad_sum, carry), _ = jax.lax.scan(
      body, (jnp.zeros((), jnp.float32), zeros, carry),
      (jnp.arange(accum_steps), micro))
  grads = jax.tree.map(lambda g, p: (g / accum_steps).astype(p.dtype),
                       grad_sum, params)
  return loss_sum / accum_steps, carry, grads


def polyak_update(average: PyTree, params: PyTree, decay: float) -> PyTree:
  """One step of Polyak (exponential moving) averaging of the parameters.

  average <- decay * average + (1 - decay) * params, leaf by leaf in the
  params' dtype (Polyak & Juditsky 1992; the paper's Table 2 numbers).
  """
  return jax.tree.map(lambda a, p: (decay * a + (1. - decay) * p).astype(a.dtype),
                      average, params)


def schedule_values(schedule: Callable[[jax.Array], jax.Array],
                    total_steps: int) -> np.ndarray:
  """lr of updates 1..total_steps, for plots and tests."""
  return np.asarray(jax.vmap(schedule)(jnp.arange(total_steps)))
