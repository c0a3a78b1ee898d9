"""Schedules, optimizers, losses and gradient accumulation against hand math."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from vit_jax import optim


def test_cosine_schedule_exact_values():
  s = optim.make_schedule(0.1, total_steps=10, warmup_steps=4,
                          decay_type='cosine')
  got = optim.schedule_values(s, 10)
  want = [0.1 * k / 4 for k in range(1, 5)]
  want += [0.1 * 0.5 * (1 + math.cos(math.pi * (k - 4) / 6))
           for k in range(5, 11)]
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
  assert got[0] == pytest.approx(0.025)  # The original's first update had 0.
  assert got[3] == pytest.approx(0.1)    # Warmup reaches base exactly.
  assert got[-1] == pytest.approx(0.0, abs=1e-9)
  assert optim.lr_at(s, 1) == pytest.approx(0.025)
  assert optim.lr_at(s, 5) == pytest.approx(want[4])


def test_linear_schedule_and_no_warmup():
  s = optim.make_schedule(1.0, total_steps=5, warmup_steps=0,
                          decay_type='linear', linear_end=0.5)
  np.testing.assert_allclose(optim.schedule_values(s, 5),
                             [0.9, 0.8, 0.7, 0.6, 0.5], rtol=1e-6)


def test_warmup_fraction_from_config():
  config = ml_collections.ConfigDict({
      'total_steps': 100, 'lr': {'base': 1e-3, 'warmup_steps': 0.1,
                               'decay_type': 'cosine'}})
  s = optim.schedule_from_config(config)
  assert optim.lr_at(s, 10) == pytest.approx(1e-3)
  assert optim.lr_at(s, 5) == pytest.approx(5e-4)


def test_schedule_errors():
  with pytest.raises(ValueError, match='warmup_steps'):
    optim.make_schedule(0.1, 10, 11)
  with pytest.raises(ValueError, match='decay_type'):
    optim.make_schedule(0.1, 10, 1, decay_type='step')


def test_sgd_momentum_clip_matches_hand_computation():
  cfg = ml_collections.ConfigDict({'name': 'sgd', 'momentum': 0.9,
                                       'grad_clip_norm': 1.0})
  s = optim.make_schedule(0.5, total_steps=4, warmup_steps=2)
  tx = optim.make_optimizer(cfg, s)
  params = {'w': jnp.array([1.0, 2.0])}
  state = tx.init(params)
  g1 = {'w': jnp.array([3.0, 4.0])}   # norm 5 -> clipped to norm 1
  g2 = {'w': jnp.array([0.3, 0.4])}   # norm 0.5 -> untouched
  u1, state = tx.update(g1, state, params)
  u2, state = tx.update(g2, state, params)
  m1 = np.array([0.6, 0.8])
  m2 = 0.9 * m1 + np.array([0.3, 0.4])
  np.testing.assert_allclose(u1['w'], -0.25 * m1, rtol=1e-6)  # lr(1)=0.25
  np.testing.assert_allclose(u2['w'], -0.5 * m2, rtol=1e-6)   # lr(2)=0.5


def test_bf16_momentum_accumulator():
  cfg = ml_collections.ConfigDict({'name': 'sgd', 'momentum': 0.9,
                                       'momentum_dtype': 'bfloat16'})
  tx = optim.make_optimizer(cfg, optim.make_schedule(0.1, 10))
  state = tx.init({'w': jnp.zeros((3, 3))})
  dtypes = {x.dtype for x in jax.tree.leaves(state) if x.ndim}
  assert dtypes == {jnp.dtype(jnp.bfloat16)}


def test_adamw_decays_kernels_only():
  cfg = ml_collections.ConfigDict({'name': 'adamw', 'weight_decay': 0.1,
                                       'grad_clip_norm': None})
  tx = optim.make_optimizer(cfg, lambda c: 1.0)
  params = {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones((2,))}
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  # Zero gradient: Adam's part is 0, decoupled decay is -lr * wd * p.
  np.testing.assert_allclose(updates['kernel'], -0.1 * np.ones((2, 2)))
  np.testing.assert_allclose(updates['bias'], np.zeros(2))


def test_bad_optimizer_name():
  with pytest.raises(ValueError, match="optim.name must be 'sgd' or 'adamw'"):
    optim.make_optimizer(ml_collections.ConfigDict({'name': 'lamb'}),
                         lambda c: 1.0)


def test_cross_entropy_with_label_smoothing():
  logits = jnp.array([[2.0, 0.0, -1.0]])
  logp = jax.nn.log_softmax(logits)[0]
  assert float(optim.cross_entropy(logits, jnp.array([0]))[0]) == \
      pytest.approx(-float(logp[0]), rel=1e-6)
  e = 0.3
  target = np.array([1 - e + e / 3, e / 3, e / 3])
  want = -float(np.sum(target * np.asarray(logp)))
  got = float(optim.cross_entropy(logits, jnp.array([0]), e)[0])
  assert got == pytest.approx(want, rel=1e-6)


def _mlp_loss(params, batch, rng, carry):
  h = jnp.tanh(batch['x'] @ params['w1'])
  # Dropout-free, so micro-batch rngs do not change the result.
  logits = h @ params['w2']
  del rng
  return jnp.mean(optim.cross_entropy(logits, batch['y'])), carry


def test_accumulation_equals_full_batch_gradient():
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
  params = {'w1': jax.random.normal(k1, (5, 16)),
            'w2': jax.random.normal(k2, (16, 3))}
  batch = {'x': jax.random.normal(k3, (32, 5)),
           'y': jax.random.randint(k4, (32,), 0, 3)}
  rng = jax.random.PRNGKey(1)
  l1, _, g1 = optim.accumulate_gradients(_mlp_loss, params, batch, rng, 1)
  l4, _, g4 = optim.accumulate_gradients(_mlp_loss, params, batch, rng, 4)
  assert float(l4) == pytest.approx(float(l1), rel=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # And the resulting SGD update is the same.
  tx = optax.sgd(0.1, 0.9)
  u1, _ = tx.update(g1, tx.init(params))
  u4, _ = tx.update(g4, tx.init(params))
  for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u4)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_microbatch_split_layout_and_error():
  x = jnp.arange(8)
  np.testing.assert_array_equal(optim.split_microbatches(x, 2),
                                [[0, 2, 4, 6], [1, 3, 5, 7]])
  with pytest.raises(ValueError, match='not divisible by accum_steps=3'):
    optim.split_microbatches(x, 3)
