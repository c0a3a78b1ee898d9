"""ViT numerics against the independent goldens, and the paper's variants."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import golden_dir

from vit_jax import checkpoint
from vit_jax.models import vit


def _golden(name):
  d = golden_dir()
  cfg = json.loads((d / f'{name}.json').read_text())['vit_jax_config']
  return cfg, checkpoint.load(d / f'{name}.npz'), dict(np.load(d / f'{name}.golden.npz'))


@pytest.mark.parametrize('name', ['tiny', 'tiny_in21k', 'tiny_posemb48'])
def test_golden_logits_and_intermediates(name):
  cfg, params, g = _golden(name)
  model = vit.VisionTransformer(**cfg)
  logits, inter = vit.get_intermediates(model, params, g['input'])
  np.testing.assert_allclose(logits, g['logits'], atol=1e-4, rtol=0)
  np.testing.assert_allclose(logits, g['logits_f64'], atol=1e-4, rtol=0)
  np.testing.assert_allclose(inter['patch_tokens'], g['patch_tokens'], atol=1e-5, rtol=0)
  np.testing.assert_allclose(inter['Transformer/encoder_input'], g['encoder_input'], atol=1e-5, rtol=0)
  np.testing.assert_allclose(inter['Transformer/block_outputs'][0], g['block0_out'], atol=1e-4, rtol=0)
  np.testing.assert_allclose(inter['encoder_out'], g['encoder_out'], atol=1e-4, rtol=0)
  np.testing.assert_allclose(inter['representation'], g['pre_logits'], atol=1e-4, rtol=0)
  attn = vit.attention_weights(inter)
  assert len(attn) == cfg['transformer']['num_layers']
  assert attn[0].shape == (2, cfg['transformer']['num_heads'], 65, 65)
  np.testing.assert_allclose(np.sum(attn[0], -1), 1, atol=1e-5)
  # The GPU's path (padded input, one q/k/v matmul, masked keys; 'xla' runs
  # the cuDNN kernel's maths here) on the same checkpoint: 65 -> 80 tokens.
  fused = vit.VisionTransformer(**cfg, attention='xla')
  np.testing.assert_allclose(fused.apply({'params': params}, g['input'], train=False),
                             g['logits_f64'], atol=1e-4, rtol=0)


def test_golden_resized_posemb_matches_original_zoom():
  """tiny_posemb48: 8x8 -> 12x12 grid the way the original resamples."""
  cfg, params, g = _golden('tiny_posemb48')
  model = vit.VisionTransformer(**cfg)
  init = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 48, 48, 3)))['params']
  init = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), init)
  ft = checkpoint.load_pretrained(golden_dir() / 'tiny_posemb48.npz', init, cfg)
  pe = ft['Transformer']['posembed_input']['pos_embedding']
  np.testing.assert_allclose(pe, g['resize_pos_embedding_vit_jax_zoom'], atol=1e-6, rtol=0)
  # load_pretrained resets the head for fine-tuning; put it back to compare logits.
  ft['head'] = params['head']
  logits = model.apply({'params': ft}, g['resize_input'])
  np.testing.assert_allclose(logits, g['resize_logits_vit_jax_zoom'], atol=1e-4, rtol=0)
  # timm's resize (corners not aligned) is ~0.04 away: make sure we are not it.
  assert np.abs(logits - g['resize_logits']).max() > 1e-3


def _tiny(**kw):
  base = dict(num_classes=10, patches={'size': (4, 4)}, hidden_size=32,
              transformer=dict(mlp_dim=64, num_heads=2, num_layers=2,
                               dropout_rate=0.1, attention_dropout_rate=0.1))
  base.update(kw)
  return vit.VisionTransformer(**base)


@pytest.mark.parametrize('classifier,posemb,shape,has_cls,has_pe', [
    ('token', 'learn', (3, 10), True, True),
    ('gap', 'learn', (3, 10), False, True),
    ('gap', 'sincos2d', (3, 10), False, False),
    ('token', 'none', (3, 10), True, False),
    ('unpooled', 'learn', (3, 16, 10), False, True),
    ('token_unpooled', 'learn', (3, 17, 10), True, True),
])
def test_variants_shapes(classifier, posemb, shape, has_cls, has_pe):
  model = _tiny(classifier=classifier, posemb=posemb)
  x = jnp.ones((3, 16, 16, 3))
  params = model.init(jax.random.PRNGKey(0), x)['params']
  assert ('cls' in params) == has_cls
  assert ('posembed_input' in params['Transformer']) == has_pe
  assert model.apply({'params': params}, x).shape == shape


def test_feature_extractor_and_pre_logits():
  model = _tiny(num_classes=None, representation_size=24)
  x = jnp.ones((2, 16, 16, 3))
  params = model.init(jax.random.PRNGKey(0), x)['params']
  assert 'head' not in params and params['pre_logits']['kernel'].shape == (32, 24)
  feats = model.apply({'params': params}, x)
  assert feats.shape == (2, 24) and np.all(np.abs(feats) <= 1)  # tanh


def test_head_zero_init_and_dropout_only_in_train():
  model = _tiny()
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 16, 3), minval=-1, maxval=1)
  params = model.init(jax.random.PRNGKey(0), x)['params']
  assert not np.any(params['head']['kernel']) and not np.any(params['cls'])
  params['head']['kernel'] = jax.random.normal(jax.random.PRNGKey(2), params['head']['kernel'].shape)
  a = model.apply({'params': params}, x)
  np.testing.assert_array_equal(a, model.apply({'params': params}, x))
  t1 = model.apply({'params': params}, x, train=True, rngs={'dropout': jax.random.PRNGKey(3)})
  t2 = model.apply({'params': params}, x, train=True, rngs={'dropout': jax.random.PRNGKey(4)})
  assert np.abs(t1 - t2).max() > 1e-4


def test_sincos2d_structure():
  pe = vit.sincos2d(4, 5, 16)
  assert pe.shape == (20, 16)
  sim = pe @ pe.T
  # Each position is most similar to itself.
  np.testing.assert_array_equal(np.argmax(sim, 1), np.arange(20))


def test_sow_is_free_when_not_requested():
  model = _tiny()
  x = jnp.ones((1, 16, 16, 3))
  params = model.init(jax.random.PRNGKey(0), x)['params']
  out = model.apply({'params': params}, x)
  assert isinstance(out, jax.Array)  # no state returned, nothing stored


def test_wrong_resolution_error_mentions_interpolation():
  model = _tiny()
  params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 16, 16, 3)))['params']
  with pytest.raises(ValueError, match='interpolate_posembed'):
    model.apply({'params': params}, jnp.ones((1, 32, 32, 3)))
