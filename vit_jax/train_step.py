"""The training step: one update of the params from one batch.

A pure function of (state, batch, rng[, teacher variables]); the loop
(vit_jax.train) and the benchmark (vit_jax.benchmark --train) jit the same
step, so what the benchmark times is what training runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from vit_jax import optim


def make_train_step(model, tx: optax.GradientTransformation,
                    schedule: Callable, config: Any,
                    teacher: Any = None, objective: Any = None) -> Callable:
  """Returns train_step(state, batch, rng, teacher_vars) -> (state, metrics).

  `teacher` is the frozen teacher module (or None); its variables come in as
  the `teacher_vars` argument, so they are not baked into the executable.

  Dropout rng: fold_in(rng, step), then fold_in(., micro-batch index) inside
  `optim.accumulate_gradients`, so resumed runs and any accum_steps draw
  reproducible masks. With `teacher` (DeiT hard-label distillation) the model
  returns (B, 2, C) logits at train time and the loss is
  0.5 * CE(cls, y) + 0.5 * CE(dist, argmax teacher(x)). An `objective`
  (objective_from_config) replaces the classification loss.
  """
  accum = int(config.get('accum_steps', 1) or 1)
  smoothing = float(config.get('label_smoothing', 0.0) or 0.0)
  polyak_decay = config.get('polyak_decay')

  def train_step(state, batch, rng, teacher_vars=None):
    def loss_fn(params, batch, rng, batch_stats):
      variables = {'params': params}
      if objective is not None:
        return jnp.mean(objective.loss(model, variables, batch, rng)), batch_stats
      kwargs = {'train': True, 'rngs': {'dropout': rng}}
      if batch_stats is not None:
        variables['batch_stats'] = batch_stats
        logits, new_vars = model.apply(variables, batch['image'],
                                       mutable=['batch_stats'], **kwargs)
        batch_stats = new_vars['batch_stats']
      else:
        logits = model.apply(variables, batch['image'], **kwargs)
      if teacher is not None:
        # DeiT hard-label distillation (Touvron et al.; RPT report, Table 1).
        t_logits = jax.lax.stop_gradient(
            teacher.apply(teacher_vars, batch['image'], train=False))
        t_labels = jnp.argmax(t_logits, axis=-1)
        loss = 0.5 * optim.cross_entropy(logits[:, 0], batch['label'],
                                         smoothing)
        loss += 0.5 * optim.cross_entropy(logits[:, 1], t_labels, smoothing)
      else:
        loss = optim.cross_entropy(logits, batch['label'], smoothing)
      return jnp.mean(loss), batch_stats

    step = state['step']
    loss, batch_stats, grads = optim.accumulate_gradients(
        loss_fn, state['params'], batch, jax.random.fold_in(rng, step),
        accum, state.get('batch_stats'))
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    new_state = dict(state, step=step + 1,
                     params=optax.apply_updates(state['params'], updates),
                     opt_state=opt_state)
    if batch_stats is not None:
      new_state['batch_stats'] = batch_stats
    if polyak_decay is not None:
      new_state['polyak'] = optim.polyak_update(state['polyak'], new_state['params'],
                                                polyak_decay)
    metrics = {'train_loss': loss, 'grad_norm': optax.global_norm(grads),
               'lr': schedule(step)}
    return new_state, metrics

  return train_step
