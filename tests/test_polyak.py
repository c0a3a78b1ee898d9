"""Polyak averaging (config.polyak_decay; the paper's Table 2 numbers): the
average equals a hand-computed EMA of the per-step params, it lives in the
train state (sharded like the params, checkpointed) and survives SIGKILL +
relaunch bit-exactly; eval reports both, export writes the average."""

import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import REPO, SUBPROCESS_ENV, sigkill_at_step, tiny_config

from vit_jax import checkpoint as ckpt_lib
from vit_jax import hub, models, optim, sharding, train

TINY = 'tests/_tiny_config.py'
TOTAL = 8
DECAY = 0.7  # Far from 1, so the average differs clearly from the params.


def _config(**kw):
  c = tiny_config()
  c.total_steps = TOTAL
  c.polyak_decay = DECAY
  for k, v in kw.items():
    setattr(c, k, v)
  return c


def _init_params():
  model = models.get_model(tiny_config().model, num_classes=10)
  return model.init(jax.random.PRNGKey(7), jnp.zeros((1, 8, 8, 3)))['params']


def test_polyak_update_formula():
  a = {'w': jnp.array([1., 2.]), 'b': jnp.array(4.)}
  p = {'w': jnp.array([3., 0.]), 'b': jnp.array(0.)}
  out = optim.polyak_update(a, p, 0.75)
  np.testing.assert_allclose(out['w'], [1.5, 1.5])
  np.testing.assert_allclose(out['b'], 3.)


def test_polyak_equals_hand_computed_ema(tmp_path):
  # Start from known params (a "pre-trained" file; the head is zero-initialised
  # on load), checkpoint every step, and fold the per-step params by hand.
  init = _init_params()
  pre = ckpt_lib.save(init, tmp_path / 'init.npz')
  workdir = tmp_path / 'run'
  config = _config(pretrained_path=str(pre), checkpoint_every=1, keep_checkpoints=None)
  result = train.run(config, str(workdir))

  start = ckpt_lib.flatten(ckpt_lib.load_pretrained(str(pre), init, config.model))
  mngr = ocp.CheckpointManager(workdir / 'checkpoints')
  assert mngr.all_steps() == list(range(1, TOTAL + 1))
  ema = {k: np.asarray(v, np.float32) for k, v in start.items()}
  for step in range(1, TOTAL + 1):
    state = mngr.restore(step)
    params = ckpt_lib.flatten(state['params'])
    ema = {k: (np.float32(DECAY) * ema[k] + np.float32(1 - DECAY) * params[k]).astype(np.float32)
           for k in ema}
    np.testing.assert_allclose(ckpt_lib.flatten(state['polyak'])['head/kernel'],
                               ema['head/kernel'], rtol=1e-6, atol=1e-7)
  got = ckpt_lib.flatten(result.polyak)
  raw = ckpt_lib.flatten(result.params)
  for k in ema:
    np.testing.assert_allclose(got[k], ema[k], rtol=1e-6, atol=1e-7, err_msg=k)
  # The average really differs from the last params (and from the start).
  assert np.abs(got['head/kernel'] - raw['head/kernel']).max() > 1e-3
  # Export: the average under the usual name, the raw params beside it.
  exported = ckpt_lib.flatten(ckpt_lib.load(str(workdir / 'tiny-test.npz')))
  exported_raw = ckpt_lib.flatten(ckpt_lib.load(str(workdir / 'tiny-test_raw.npz')))
  for k in raw:
    np.testing.assert_array_equal(exported[k], got[k], err_msg=k)
    np.testing.assert_array_equal(exported_raw[k], raw[k], err_msg=k)
  # `python -m vit_jax.export` of the last checkpoint follows the same rule.
  from vit_jax import export
  export.export(str(workdir), str(tmp_path / 'again.npz'))
  again = ckpt_lib.flatten(ckpt_lib.load(str(tmp_path / 'again.npz')))
  again_raw = ckpt_lib.flatten(ckpt_lib.load(str(tmp_path / 'again_raw.npz')))
  for k in raw:
    np.testing.assert_array_equal(again[k], got[k], err_msg=k)
    np.testing.assert_array_equal(again_raw[k], raw[k], err_msg=k)
  # Eval reports both, each a real accuracy of its own params.
  final = json.loads((workdir / 'final_metrics.json').read_text())
  for key in ('accuracy_test', 'accuracy_test_polyak', 'loss_test_polyak'):
    assert 0 <= final[key] and np.isfinite(final[key])
  assert final['loss_test_polyak'] != final['loss_test']


def test_polyak_state_is_sharded_like_the_params():
  config = _config()
  model, _ = hub.build(config, 10)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3))))
  abstract = {'params': params['params'], 'polyak': params['params']}
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ('data', 'fsdp'))
  sh = sharding.state_shardings(abstract, mesh, min_size=0)
  assert jax.tree.map(lambda s: s.spec, sh['polyak']) == jax.tree.map(lambda s: s.spec,
                                                                       sh['params'])


def test_polyak_decay_out_of_range_is_a_clear_error(tmp_path):
  with pytest.raises(train.ConfigError, match=r'polyak_decay must be in \[0, 1\)'):
    train.run(_config(polyak_decay=1.0), str(tmp_path))


def test_sigkill_and_relaunch_keeps_polyak_bit_exact(tmp_path):
  reference = train.run(_config(), str(tmp_path / 'reference'))
  workdir = tmp_path / 'killed'
  cmd = [sys.executable, '-m', 'vit_jax.main', f'--config={TINY}', f'--workdir={workdir}',
         f'--config.total_steps={TOTAL}', f'--config.polyak_decay={DECAY}']
  env = dict(SUBPROCESS_ENV)
  killed_at = sigkill_at_step(cmd, env, 5, TOTAL)   # checkpoint_every=2: from step 3 on one exists.
  assert not (workdir / 'tiny-test.npz').exists()
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-4000:]
  resumed_at = int(re.search(r'Resumed from .* at step (\d+)', out.stderr).group(1))
  assert 0 < resumed_at <= killed_at
  for name, want in (('tiny-test.npz', reference.polyak), ('tiny-test_raw.npz', reference.params)):
    got = ckpt_lib.flatten(ckpt_lib.load(str(workdir / name)))
    for k, v in ckpt_lib.flatten(want).items():
      np.testing.assert_array_equal(got[k], v, err_msg=f'{name}: {k}')
  final = json.loads((workdir / 'final_metrics.json').read_text())
  assert final['accuracy_test_polyak'] == reference.metrics['accuracy_test_polyak']
