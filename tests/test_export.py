"""vit_jax.export: orbax training checkpoint (any step) -> official .npz,
bit-identical, without the optimizer."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from vit_jax import checkpoint, export
from vit_jax.workdir import Workdir


def _state(seed, with_batch_stats=False):
  rng = np.random.default_rng(seed)
  params = {'embedding': {'kernel': rng.normal(size=(4, 4, 3, 8)).astype(np.float32),
                          'bias': rng.normal(size=(8,)).astype(np.float32)},
            'Transformer': {'encoder_norm': {'scale': rng.normal(size=(8,)).astype(np.float32)}},
            'gn_root': {'scale': rng.normal(size=(8,)).astype(np.float32)},  # GroupNorm: (1,1,1,C) on disk
            'head': {'kernel': rng.normal(size=(8, 3)).astype(np.float32)}}
  params = jax.tree.map(jnp.asarray, params)
  state = {'step': jnp.asarray(seed, jnp.int32), 'params': params,
           'opt_state': optax.adamw(1e-3).init(params)}
  if with_batch_stats:
    state['batch_stats'] = {'bn': {'mean': jnp.asarray(rng.normal(size=(8,)), jnp.float32)}}
  return state


def _write(workdir, steps, with_batch_stats=False):
  """Checkpoints laid out as vit_jax.train writes them."""
  mgr = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'),
                              options=ocp.CheckpointManagerOptions(max_to_keep=5, create=True))
  states = {}
  for s in steps:
    states[s] = _state(s, with_batch_stats)
    mgr.save(s, args=ocp.args.StandardSave(states[s]))
  mgr.wait_until_finished()
  mgr.close()
  return states


def _assert_same(flat, tree):
  want = checkpoint.flatten(jax.tree.map(np.asarray, tree))
  assert set(flat) == set(want)
  for k, v in want.items():
    assert flat[k].dtype == v.dtype and np.array_equal(flat[k], v), k


def test_export_any_step_bit_identical(tmp_path, capsys):
  wd = str(tmp_path)
  states = _write(wd, [3, 7])
  assert Workdir(wd).steps() == [3, 7]
  step, out = export.export(wd, str(tmp_path / 'step3.npz'), step=3)
  assert step == 3
  _assert_same(checkpoint.flatten(checkpoint.load(out)), states[3]['params'])
  raw = np.load(out)
  assert raw['gn_root/scale'].shape == (1, 1, 1, 8)  # official GroupNorm layout on disk
  assert not any(k.startswith(('opt_state', 'step', 'batch_stats')) for k in raw.files)
  # CLI, latest step, default name from config.json
  (tmp_path / 'config.json').write_text('{"model_name": "ViT-Ti_16"}')
  assert export.main([f'--workdir={wd}']) == 0
  out = capsys.readouterr().out
  assert 'exported step 7' in out
  assert 'no timm recipe: the image size is unknown' in out  # the reason, printed
  # The sidecar names the architecture, for fine-tuning without model_name.
  side = checkpoint.read_sidecar(str(tmp_path / 'ViT-Ti_16.npz'))
  assert side['model']['hidden_size'] == 192
  _assert_same(checkpoint.flatten(checkpoint.load(str(tmp_path / 'ViT-Ti_16.npz'))), states[7]['params'])
  assert export.main([f'--workdir={wd}', '--step=3']) == 0  # an old step: its own file
  _assert_same(checkpoint.flatten(checkpoint.load(str(tmp_path / 'ViT-Ti_16_step3.npz'))),
               states[3]['params'])
  _assert_same(checkpoint.flatten(checkpoint.load(str(tmp_path / 'ViT-Ti_16.npz'))),
               states[7]['params'])  # not overwritten
  capsys.readouterr()
  assert export.main([f'--workdir={wd}', '--list']) == 0
  assert capsys.readouterr().out.split() == ['3', '7']


def test_export_keeps_batch_stats(tmp_path):
  states = _write(str(tmp_path), [5], with_batch_stats=True)
  _, out = export.export(str(tmp_path), str(tmp_path / 'bn.npz'))
  variables = checkpoint.load_variables(out)
  _assert_same(checkpoint.flatten(variables['params']), states[5]['params'])
  _assert_same(checkpoint.flatten(variables['batch_stats']), states[5]['batch_stats'])


def test_export_errors(tmp_path, capsys):
  with pytest.raises(export.ExportError, match='No orbax checkpoints under'):
    export.export(str(tmp_path), str(tmp_path / 'x.npz'))
  _write(str(tmp_path), [2])
  assert export.main([f'--workdir={tmp_path}', '--step=9', f'--out={tmp_path}/x.npz']) == 1
  err = capsys.readouterr().err
  assert err.startswith('ERROR (ExportError): ') and 'No checkpoint for step 9' in err
  assert 'available steps: [2]' in err
