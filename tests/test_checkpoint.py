"""Checkpoint load/save, posemb resampling, load_pretrained and clear errors."""

import json
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from conftest import SHIPPED, golden_dir

from vit_jax import checkpoint
from vit_jax.models import vit


def _tiny_cfg():
  return json.loads((golden_dir() / 'tiny.json').read_text())['vit_jax_config']


def _init(cfg, res, **kw):
  model = vit.VisionTransformer(**{**cfg, **kw})
  return jax.tree.map(np.asarray, model.init(jax.random.PRNGKey(0), jnp.zeros((1, res, res, 3)))['params'])


def test_load_matches_file_keys_and_model_tree():
  path = golden_dir() / 'tiny.npz'
  params = checkpoint.load(path)
  raw = np.load(path)
  assert set(checkpoint.flatten(params)) == set(raw.files)
  cfg = _tiny_cfg()
  init = _init(cfg, 32)
  assert jax.tree.map(np.shape, init) == jax.tree.map(np.shape, params)


def test_save_load_roundtrip_bit_identical(tmp_path):
  src = golden_dir() / 'tiny.npz'
  params = checkpoint.load(src)
  out = checkpoint.save(params, tmp_path / 'sub' / 'copy.npz')
  again = checkpoint.load(out)
  flat_a, flat_b = checkpoint.flatten(params), checkpoint.flatten(again)
  assert flat_a.keys() == flat_b.keys()
  for k in flat_a:
    assert flat_a[k].dtype == flat_b[k].dtype
    np.testing.assert_array_equal(flat_a[k], flat_b[k])
  # Same layout as the official file, key for key.
  a, b = np.load(src), np.load(out)
  assert sorted(a.files) == sorted(b.files)
  assert all(a[k].shape == b[k].shape for k in a.files)


def test_prefixes_and_groupnorm_shapes(tmp_path):
  rng = np.random.default_rng(0)
  flat = {'opt/target/gn_root/scale': rng.normal(size=(1, 1, 1, 8)).astype(np.float32),
          'opt/target/block1/unit1/gn1/bias': rng.normal(size=(1, 1, 1, 8)).astype(np.float32),
          'opt/target/cls': rng.normal(size=(1, 1, 8)).astype(np.float32)}
  np.savez(tmp_path / 'a.npz', **flat)
  p = checkpoint.load(tmp_path / 'a.npz')
  assert p['gn_root']['scale'].shape == (8,)
  assert p['block1']['unit1']['gn1']['bias'].shape == (8,)
  assert p['cls'].shape == (1, 1, 8)
  checkpoint.save(p, tmp_path / 'b.npz')
  b = np.load(tmp_path / 'b.npz')
  assert b['gn_root/scale'].shape == (1, 1, 1, 8)  # written back as the official files have it
  np.testing.assert_array_equal(b['gn_root/scale'], flat['opt/target/gn_root/scale'])
  np.savez(tmp_path / 'c.npz', **{'params/' + k[len('opt/target/'):]: v for k, v in flat.items()})
  assert checkpoint.load(tmp_path / 'c.npz').keys() == p.keys()


def test_batch_stats_roundtrip(tmp_path):
  params = {'conv': {'kernel': np.ones((3, 3, 3, 4), np.float32)}}
  stats = {'bn': {'mean': np.arange(4, dtype=np.float32), 'var': np.ones(4, np.float32)}}
  checkpoint.save(params, tmp_path / 'r.npz', batch_stats=stats)
  v = checkpoint.load_variables(tmp_path / 'r.npz')
  np.testing.assert_array_equal(v['batch_stats']['bn']['mean'], stats['bn']['mean'])
  assert checkpoint.load(tmp_path / 'r.npz').keys() == {'conv'}


def test_interpolate_posembed_equals_original_zoom():
  rng = np.random.default_rng(0)
  pe = rng.normal(size=(1, 1 + 14 * 14, 16)).astype(np.float32)
  out = checkpoint.interpolate_posembed(pe, 1 + 24 * 24, has_class_token=True)
  # The original procedure, written out.
  grid = pe[0, 1:].reshape(14, 14, -1)
  ref = scipy.ndimage.zoom(grid, (24 / 14, 24 / 14, 1), order=1).reshape(1, 576, -1)
  ref = np.concatenate([pe[:, :1], ref], axis=1)
  np.testing.assert_allclose(out, ref, atol=1e-6)
  np.testing.assert_array_equal(out[:, 0], pe[:, 0])  # class token kept


def test_interpolate_posembed_non_square_and_identity():
  rng = np.random.default_rng(1)
  pe = rng.normal(size=(1, 1 + 14 * 14, 8)).astype(np.float32)
  same = checkpoint.interpolate_posembed(pe, 197, True)
  np.testing.assert_allclose(same, pe, atol=1e-6)
  rect = checkpoint.interpolate_posembed(pe, 1 + 14 * 24, True, new_grid=(14, 24))
  assert rect.shape == (1, 1 + 14 * 24, 8)
  # Rows are unchanged in height; corners are aligned, so the corners are kept.
  g = rect[0, 1:].reshape(14, 24, 8)
  src = pe[0, 1:].reshape(14, 14, 8)
  np.testing.assert_allclose(g[0, 0], src[0, 0], atol=1e-6)
  np.testing.assert_allclose(g[-1, -1], src[-1, -1], atol=1e-6)
  gap = checkpoint.interpolate_posembed(pe[:, 1:], 100, has_class_token=False)
  assert gap.shape == (1, 100, 8)
  with pytest.raises(ValueError, match='not a square grid'):
    checkpoint.interpolate_posembed(pe, 1 + 14 * 24, True)


def test_load_pretrained_finetune_changes(tmp_path):
  cfg = json.loads((golden_dir() / 'tiny_in21k.json').read_text())['vit_jax_config']
  src = checkpoint.load(golden_dir() / 'tiny_in21k.npz')
  ft_cfg = {**cfg, 'num_classes': 5, 'representation_size': None}
  init = _init(ft_cfg, 48)
  ft = checkpoint.load_pretrained(golden_dir() / 'tiny_in21k.npz', init, ft_cfg)
  assert 'pre_logits' not in ft
  assert ft['head']['kernel'].shape == (64, 5) and not np.any(ft['head']['kernel'])
  assert ft['Transformer']['posembed_input']['pos_embedding'].shape == (1, 145, 64)
  np.testing.assert_array_equal(ft['embedding']['kernel'], src['embedding']['kernel'])
  # Keeping the representation layer keeps pre_logits.
  keep_cfg = {**cfg, 'num_classes': 5}
  keep = checkpoint.load_pretrained(golden_dir() / 'tiny_in21k.npz', _init(keep_cfg, 32), keep_cfg)
  np.testing.assert_array_equal(keep['pre_logits']['kernel'], src['pre_logits']['kernel'])


def test_truncated_file_error(tmp_path):
  data = (golden_dir() / 'tiny.npz').read_bytes()
  bad = tmp_path / 'truncated.npz'
  bad.write_bytes(data[: len(data) // 2])
  with pytest.raises(checkpoint.CheckpointError, match='not a readable .npz.*truncated or corrupt'):
    checkpoint.load(bad)
  junk = tmp_path / 'junk.npz'
  junk.write_bytes(b'not a zip at all')
  with pytest.raises(checkpoint.CheckpointError, match='truncated or corrupt'):
    checkpoint.load(junk)


def test_missing_file_error(tmp_path):
  # A missing file is never mistaken for a name to download; the hint names them.
  with pytest.raises(checkpoint.CheckpointError, match=r'not found.*\n.*load by name.*ViT-B_16'):
    checkpoint.load(tmp_path / 'ViT-B_16.npz')


def test_other_architecture_error():
  cfg = _tiny_cfg()
  other = {**cfg, 'hidden_size': 32, 'transformer': {**cfg['transformer'], 'num_layers': 3}}
  init = _init(other, 32)
  with pytest.raises(checkpoint.CheckpointError) as e:
    checkpoint.load_pretrained(golden_dir() / 'tiny.npz', init, other)
  msg = str(e.value)
  assert 'another architecture' in msg
  assert 'missing in checkpoint' in msg and 'encoderblock_2' in msg
  assert 'shape mismatch' in msg and 'Transformer/encoder_norm/bias: checkpoint (64,) vs model (32,)' in msg
  assert 'more' in msg


def test_cli_describes_file(capsys):
  assert checkpoint.main([str(golden_dir() / 'tiny.npz')]) == 0
  out = capsys.readouterr().out
  assert 'num_params: 75,082' in out
  assert 'preset: testing' in out
  assert 'Transformer/encoderblock_1/MlpBlock_3/Dense_1/kernel' in out


def test_cli_error_exit_code(tmp_path, capsys):
  assert checkpoint.main([str(tmp_path / 'nope.npz')]) == 1
  assert capsys.readouterr().err.startswith('ERROR (CheckpointError): Checkpoint not found')


def test_not_zip_is_error_type():
  assert issubclass(checkpoint.CheckpointError, ValueError)
  assert zipfile  # keep import used for readers: truncated files raise BadZipFile inside


def test_load_pretrained_deit_two_prefix_tokens_and_heads(tmp_path):
  """DeiT ('distill'): both heads reset, both prefix tokens kept on resize."""
  cfg = dict(num_classes=7, patches={'size': (4, 4)}, hidden_size=16, classifier='distill',
             transformer=dict(mlp_dim=32, num_heads=2, num_layers=1))
  src = _init(cfg, 16)
  src = jax.tree.map(lambda a: np.random.default_rng(0).normal(size=a.shape).astype(a.dtype), src)
  checkpoint.save(src, tmp_path / 'deit.npz')
  ft_cfg = {**cfg, 'num_classes': 3}
  ft = checkpoint.load_pretrained(tmp_path / 'deit.npz', _init(ft_cfg, 24), ft_cfg)
  assert not np.any(ft['head']['kernel']) and not np.any(ft['head_dist']['kernel'])
  assert ft['head_dist']['kernel'].shape == (16, 3)
  pe_old = src['Transformer']['posembed_input']['pos_embedding']
  pe_new = ft['Transformer']['posembed_input']['pos_embedding']
  assert pe_new.shape == (1, 2 + 36, 16)
  np.testing.assert_array_equal(pe_new[:, :2], pe_old[:, :2])
  np.testing.assert_allclose(
      pe_new, checkpoint.interpolate_posembed(pe_old, 38, 2), atol=0)


def test_fit_is_the_one_way_a_checkpoint_meets_a_model():
  # Shapes alone (jax.eval_shape) are enough; the shipped checkpoint (32px, 200 classes).
  from vit_jax import models
  path = str(SHIPPED)
  src = checkpoint.load(path)
  cfg = models.get_config('SmallViT_8')

  def shapes(num_classes, res):
    module = models.get_model(cfg, num_classes=num_classes)
    return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, res, res, 3)),
                                              train=False))['params']

  same = checkpoint.fit(src, shapes(200, 40), cfg)              # 4x4 -> 5x5 grid, head kept
  np.testing.assert_array_equal(same['head']['kernel'], src['head']['kernel'])
  assert same['Transformer']['posembed_input']['pos_embedding'].shape == (1, 26, 192)
  np.testing.assert_allclose(same['Transformer']['posembed_input']['pos_embedding'],
                             checkpoint.interpolate_posembed(
                                 src['Transformer']['posembed_input']['pos_embedding'], 26, True))
  new = checkpoint.fit(src, shapes(10, 32), cfg, new_head=True)
  assert new['head']['kernel'].shape == (192, 10) and not np.any(new['head']['kernel'])
  assert new['head']['kernel'].dtype == np.float32
  np.testing.assert_array_equal(new['embedding']['kernel'], src['embedding']['kernel'])
  # Without new_head a head of another width is a misfit of the same architecture:
  # the message lists it and does not claim another architecture.
  with pytest.raises(checkpoint.CheckpointError) as e:
    checkpoint.fit(src, shapes(10, 32), cfg, source='my.npz', path=path)
  msg = str(e.value)
  assert msg.startswith('my.npz does not fit the model SmallViT_8.\n'), msg
  assert 'head/kernel: checkpoint (192, 200) vs model (192, 10)' in msg
  assert 'another architecture' not in msg
