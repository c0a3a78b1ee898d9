"""Position-embedding ablation (paper App. D.4, Table 8): the learned 2-D and
the relative variants next to learn / sincos2d / none. Shapes, numerics
against direct formulas, and resizing by load_pretrained."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from vit_jax import analysis, checkpoint
from vit_jax.models import vit

D, HEADS = 32, 2


def _model(posemb, classifier='token', patch=4, num_classes=10):
  return vit.VisionTransformer(
      num_classes=num_classes, patches={'size': (patch, patch)}, hidden_size=D,
      transformer=dict(mlp_dim=64, num_heads=HEADS, num_layers=2, dropout_rate=0.,
                       attention_dropout_rate=0.),
      classifier=classifier, posemb=posemb)


def _init(model, h=16, w=16, seed=0):
  return model.init(jax.random.PRNGKey(seed), jnp.zeros((1, h, w, 3)))['params']


def _flat_shapes(params):
  return {k: tuple(v.shape) for k, v in checkpoint.flatten(params).items()}


def test_existing_variants_keep_the_checkpoint_tree():
  # The official tree is the contract: 'learn' is exactly pos_embedding, and
  # none of the new parameters appear in learn / sincos2d / none.
  learn = _flat_shapes(_init(_model('learn')))
  assert learn['Transformer/posembed_input/pos_embedding'] == (1, 17, D)
  assert [k for k in learn if 'posembed' in k] == ['Transformer/posembed_input/pos_embedding']
  for posemb in ('learn', 'sincos2d', 'none'):
    keys = _flat_shapes(_init(_model(posemb)))
    assert not any('rel_embedding' in k or 'row_embedding' in k for k in keys)
  none = _flat_shapes(_init(_model('none')))
  assert set(learn) - set(none) == {'Transformer/posembed_input/pos_embedding'}


@pytest.mark.parametrize('classifier,prefix', [('token', 1), ('gap', 0)])
def test_learn2d_shapes_and_values(classifier, prefix):
  model = _model('learn2d', classifier)
  params = _init(model, 16, 24)                    # 4 x 6 grid
  shapes = _flat_shapes(params)
  pe = {k.split('/')[-1]: v for k, v in shapes.items() if 'posembed_input' in k}
  want = {'row_embedding': (1, 4, D // 2), 'col_embedding': (1, 6, D // 2)}
  if prefix:
    want['prefix_embedding'] = (1, 1, D)
  assert pe == want
  # Every table is random, not zero (normal(0.02) init, like 'learn').
  table = params['Transformer']['posembed_input']
  assert all(float(np.std(v)) > 0.005 for v in table.values())
  # The encoder input minus the tokens is concat(row[i], col[j]) at patch (i, j).
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 24, 3))
  _, inter = vit.get_intermediates(model, params, x)
  added = np.asarray(inter['Transformer/encoder_input'])
  tokens = np.asarray(inter['patch_tokens'])
  row, col = np.asarray(table['row_embedding'])[0], np.asarray(table['col_embedding'])[0]
  for i in range(4):
    for j in range(6):
      want_pe = np.concatenate([row[i], col[j]])
      np.testing.assert_allclose(added[:, prefix + i * 6 + j] - tokens[:, i * 6 + j],
                                 np.broadcast_to(want_pe, (2, D)), atol=1e-6)
  if prefix:
    cls = np.asarray(params['cls'])[0, 0] + np.asarray(table['prefix_embedding'])[0, 0]
    np.testing.assert_allclose(added[:, 0], np.broadcast_to(cls, (2, D)), atol=1e-6)
  # Position matters: permuting patches changes the output.
  out = model.apply({'params': params}, x)
  assert out.shape == (2, 10)


def test_relative_shapes():
  params = _init(_model('rel'))                     # 16 patches + cls = 17 tokens
  shapes = _flat_shapes(params)
  assert not any('posembed_input' in k for k in shapes)
  rel = {k: v for k, v in shapes.items() if k.endswith('rel_embedding')}
  assert rel == {f'Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/rel_embedding':
                 (2 * 17 - 1, HEADS, D // HEADS) for i in range(2)}


def test_relative_attention_matches_the_formula():
  """logits[i, j] = q_i . k_j / sqrt(d) + q_i . r_{i-j} / sqrt(d), by loops."""
  t, hd = 5, D // HEADS
  mha = vit.MultiHeadDotProductAttention(num_heads=HEADS, relative=True)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, t, D))
  params = mha.init(jax.random.PRNGKey(1), x, deterministic=True)['params']
  params['rel_embedding'] = jax.random.normal(jax.random.PRNGKey(2), params['rel_embedding'].shape)
  (out, state) = mha.apply({'params': params}, x, deterministic=True, mutable=['intermediates'])
  weights = np.asarray(state['intermediates']['attention_weights'][0])
  p = jax.tree.map(np.asarray, params)
  xn = np.asarray(x, np.float64)
  q = np.einsum('btd,dhe->bhte', xn, p['query']['kernel']) + p['query']['bias'][None, :, None]
  k = np.einsum('btd,dhe->bhte', xn, p['key']['kernel']) + p['key']['bias'][None, :, None]
  rel = p['rel_embedding']                                           # (2t-1, H, hd)
  logits = np.zeros((2, HEADS, t, t))
  for i in range(t):
    for j in range(t):
      r = rel[i - j + t - 1]
      logits[:, :, i, j] = (np.einsum('bhe,bhe->bh', q[:, :, i], k[:, :, j]) +
                            np.einsum('bhe,he->bh', q[:, :, i], r)) / np.sqrt(hd)
  want = np.exp(logits - logits.max(-1, keepdims=True))
  want /= want.sum(-1, keepdims=True)
  np.testing.assert_allclose(weights, want, rtol=1e-4, atol=1e-5)
  # Zero relative keys give plain attention.
  params['rel_embedding'] = jnp.zeros_like(params['rel_embedding'])
  plain = vit.MultiHeadDotProductAttention(num_heads=HEADS)
  np.testing.assert_allclose(
      mha.apply({'params': params}, x, deterministic=True),
      plain.apply({'params': {k: v for k, v in params.items() if k != 'rel_embedding'}},
                  x, deterministic=True), atol=1e-6)


def test_every_variant_trains_a_step():
  for posemb in vit.POSEMBS:
    model = _model(posemb)
    params = _init(model)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
    grads = jax.grad(lambda p: jnp.sum(model.apply({'params': p}, x, train=True,
                                                    rngs={'dropout': jax.random.PRNGKey(0)})
                                       ** 2))(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads)), posemb


def test_load_pretrained_resizes_learn2d(tmp_path):
  src = _init(_model('learn2d', num_classes=5), 16, 16, seed=3)     # 4 x 4 grid
  path = checkpoint.save(src, tmp_path / 'l2d.npz')
  cfg = {'classifier': 'token', 'representation_size': None, 'model_name': 'l2d'}
  target = _model('learn2d', num_classes=10)
  init = _init(target, 24, 32)                                     # 6 x 8 grid
  ft = checkpoint.load_pretrained(str(path), init, cfg)
  old, new = src['Transformer']['posembed_input'], ft['Transformer']['posembed_input']
  assert new['row_embedding'].shape == (1, 6, D // 2)
  assert new['col_embedding'].shape == (1, 8, D // 2)
  np.testing.assert_array_equal(new['prefix_embedding'], old['prefix_embedding'])
  # Ends are kept (corners aligned) and the 2-D table equals the bilinear
  # resize of the old 2-D table, as for posemb='learn'.
  np.testing.assert_allclose(new['row_embedding'][0, [0, -1]], old['row_embedding'][0, [0, -1]],
                             rtol=1e-6)
  table_old = np.asarray(vit.learn2d_table(old['row_embedding'], old['col_embedding']))
  want = scipy.ndimage.zoom(table_old[0].reshape(4, 4, D), (6 / 4, 8 / 4, 1), order=1)
  got = np.asarray(vit.learn2d_table(new['row_embedding'], new['col_embedding']))
  np.testing.assert_allclose(got[0].reshape(6, 8, D), want, atol=1e-6)
  assert np.all(ft['head']['kernel'] == 0) and ft['head']['kernel'].shape == (D, 10)
  out = target.apply({'params': ft}, jnp.ones((1, 24, 32, 3)))
  assert out.shape == (1, 10)
  # analysis reads the 2-D tables as the (1, T, D) embedding.
  pe = analysis.position_embeddings(ft, cfg, (6, 8))
  assert pe.shape == (1, 49, D)


def test_relative_embedding_at_another_length_is_a_clear_error(tmp_path):
  path = checkpoint.save(_init(_model('rel')), tmp_path / 'rel.npz')
  init = _init(_model('rel'), 24, 24)
  with pytest.raises(checkpoint.CheckpointError, match='relative embeddings have one row per'):
    checkpoint.load_pretrained(str(path), init, {'model_name': 'rel'})
  # Same resolution loads.
  checkpoint.load_pretrained(str(path), _init(_model('rel')), {'model_name': 'rel'})


def test_learn2d_wrong_grid_says_how_to_fix():
  model = _model('learn2d')
  params = _init(model)
  with pytest.raises(ValueError, match='load_pretrained'):
    model.apply({'params': params}, jnp.ones((1, 24, 24, 3)))


def test_relative_takes_the_einsum_path_under_every_attention_kernel():
  # The fused kernels have no relative bias: 'xla' must give the einsum numbers.
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  params = _init(_model('rel'))
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(1), p.shape),
                        params)
  outs = {}
  for attention in ('einsum', 'xla'):
    model = vit.VisionTransformer(
        num_classes=10, patches={'size': (4, 4)}, hidden_size=D,
        transformer=dict(mlp_dim=64, num_heads=HEADS, num_layers=2, dropout_rate=0.,
                         attention_dropout_rate=0.),
        posemb='rel', attention=attention)
    outs[attention] = model.apply({'params': params}, x)
  np.testing.assert_allclose(outs['xla'], outs['einsum'], atol=1e-6)


def test_predict_reads_and_resizes_a_learn2d_checkpoint(tmp_path):
  import ml_collections

  from vit_jax import hub
  cfg = ml_collections.ConfigDict(dict(
      model_name='l2d', patches={'size': (4, 4)}, hidden_size=D, classifier='token',
      representation_size=None, posemb='learn2d',
      transformer=dict(mlp_dim=64, num_heads=HEADS, num_layers=2, dropout_rate=0.,
                       attention_dropout_rate=0.)))
  params = _init(_model('learn2d'), 16, 16, seed=2)
  params['head']['kernel'] = jax.random.normal(jax.random.PRNGKey(3), params['head']['kernel'].shape)
  path = checkpoint.save(params, tmp_path / 'l2d.npz')
  assert hub.trained_image_size(params, cfg) == (16, 16)
  bundle = hub.load(str(path), model=cfg)
  assert bundle.image_size == (16, 16)
  big = hub.load(str(path), model=cfg, image_size=24)
  row = big.params['Transformer']['posembed_input']['row_embedding']
  assert big.image_size == (24, 24) and row.shape == (1, 6, D // 2)
  assert big.module.apply({'params': big.params}, jnp.ones((1, 24, 24, 3))).shape == (1, 10)
