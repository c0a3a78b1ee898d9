"""Hybrid ResNet backbone: the independent golden, numerics, layout and parameter counts."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import golden_dir
from flax import linen as nn

from vit_jax import checkpoint, models
from vit_jax.models import resnet, vit


def _shapes(name, res=224, num_classes=1000):
  model = models.get_model(name, num_classes=num_classes)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, res, res, 3)))['params']


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_tiny_hybrid_golden_logits_and_backbone_features():
  d = golden_dir()
  cfg = json.loads((d / 'tiny_hybrid.json').read_text())['vit_jax_config']
  g = dict(np.load(d / 'tiny_hybrid.golden.npz'))
  params = checkpoint.load(d / 'tiny_hybrid.npz')
  model = vit.VisionTransformer(**cfg)
  logits, state = jax.jit(lambda p, x: model.apply(
      {'params': p}, x, mutable=['intermediates']))(params, g['input'])
  inter = {k: v[0] for k, v in state['intermediates'].items() if isinstance(v, tuple)}
  # README: a correct float32 hybrid is within 1e-3 (we measure ~4e-6).
  np.testing.assert_allclose(logits, g['logits'], atol=1e-3, rtol=0)
  np.testing.assert_allclose(logits, g['logits_f64'], atol=1e-3, rtol=0)
  assert np.abs(logits - g['logits_f64']).max() < 1e-4
  np.testing.assert_allclose(inter['backbone_features'], g['backbone_features'], atol=1e-3, rtol=0)
  np.testing.assert_allclose(inter['patch_tokens'], g['patch_tokens'], atol=1e-3, rtol=0)
  np.testing.assert_allclose(inter['encoder_out'], g['encoder_out'], atol=1e-3, rtol=0)
  # The GPU's attention path ('xla': the cuDNN kernel's maths, padded and masked).
  fused = vit.VisionTransformer(**cfg, attention='xla')
  assert np.abs(fused.apply({'params': params}, g['input'], train=False)
                - g['logits_f64']).max() < 1e-4


def test_tiny_hybrid_parameter_tree_is_the_checkpoint_tree():
  d = golden_dir()
  meta = json.loads((d / 'tiny_hybrid.json').read_text())
  model = vit.VisionTransformer(**meta['vit_jax_config'])
  init = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))['params']
  flat = checkpoint.flatten(init)
  want = meta['weights_npz']['keys']
  assert sorted(flat) == sorted(want)
  for key, shape in want.items():
    got = flat[key].shape
    if len(key.split('/')) > 1 and key.split('/')[-2].startswith('gn'):
      assert tuple(shape) == (1, 1, 1, got[0]), key  # stored (1,1,1,C), (C,) in Flax
    else:
      assert tuple(got) == tuple(shape), key
  # The ResNet lives at the top level, next to `embedding` (not in a submodule).
  assert {'conv_root', 'gn_root', 'block1', 'block2', 'block3'} <= set(init)


def test_groupnorm_checkpoint_round_trip(tmp_path):
  params = checkpoint.load(golden_dir() / 'tiny_hybrid.npz')
  assert params['block1']['unit1']['gn1']['scale'].shape == (64,)
  path = tmp_path / 'h.npz'
  checkpoint.save(params, path)
  raw = np.load(path)
  assert raw['block1/unit1/gn1/scale'].shape == (1, 1, 1, 64)
  assert raw['gn_root/bias'].shape == (1, 1, 1, 64)
  orig = np.load(golden_dir() / 'tiny_hybrid.npz')
  assert sorted(raw.files) == sorted(orig.files)
  for k in orig.files:
    np.testing.assert_array_equal(raw[k], orig[k])


def test_weight_standardisation_adds_eps_to_std_not_variance():
  rng = np.random.RandomState(0)
  w = rng.randn(3, 3, 4, 5) * np.array([1, 1e-3, 1e-5, 10, 0.1])  # tiny std columns
  w = w.astype(np.float64)
  mean = w.mean(axis=(0, 1, 2), keepdims=True)
  std = w.std(axis=(0, 1, 2), keepdims=True)  # biased
  want = (w - mean) / (std + 1e-5)
  got = np.asarray(resnet.standardize_weight(jnp.asarray(w, jnp.float32)))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # sqrt(var + eps) would differ strongly on the 1e-5-std column:
  alt = (w - mean) / np.sqrt(std**2 + 1e-5)
  assert np.abs(got[..., 2] - alt[..., 2]).max() > 0.1


def _tf_same_pads(size, k, s):
  out = -(-size // s)
  total = max((out - 1) * s + k - size, 0)
  return total // 2, total - total // 2


@pytest.mark.parametrize('size', [9, 10])
def test_root_conv_and_maxpool_use_tf_same_padding(size):
  x = np.random.RandomState(0).randn(1, size, size, 3).astype(np.float32) - 5.

  class Root(nn.Module):
    @nn.compact
    def __call__(self, x):
      return resnet.backbone(x, num_layers=())

  params = Root().init(jax.random.PRNGKey(0), x)['params']
  got = Root().apply({'params': params}, x)
  # Second path: explicit TF padding (extra pixel at the end), numpy max-pool
  # over -inf padding.
  k = resnet.standardize_weight(params['conv_root']['kernel'])
  y = jax.lax.conv_general_dilated(x, k, (2, 2), [_tf_same_pads(size, 7, 2)] * 2,
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  gn = nn.GroupNorm(num_groups=32, epsilon=1e-6)
  y = nn.relu(gn.apply({'params': params['gn_root']}, y))
  y = np.asarray(y)
  lo, hi = _tf_same_pads(y.shape[1], 3, 2)
  yp = np.pad(y, ((0, 0), (lo, hi), (lo, hi), (0, 0)), constant_values=-np.inf)
  out = -(-y.shape[1] // 2)
  want = np.stack([np.stack([yp[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max(axis=(1, 2))
                             for j in range(out)], 1) for i in range(out)], 1)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_maxpool_pads_with_minus_infinity():
  # All-negative features: zero padding would leak zeros into the border.
  class Pool(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.max_pool(x, (3, 3), (2, 2), padding='SAME')

  x = -1. - np.random.RandomState(0).rand(1, 6, 6, 2).astype(np.float32)
  got = np.asarray(Pool().apply({}, x))
  assert got.max() < -1.


def test_gn3_starts_at_zero_so_units_start_as_projection_plus_relu():
  class Backbone(nn.Module):
    @nn.compact
    def __call__(self, x):
      return resnet.backbone(x, num_layers=(2, 3, 1), width_factor=0.5)

  init = jax.jit(Backbone().init)(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))['params']
  for s, units in enumerate((2, 3, 1), 1):
    for u in range(1, units + 1):
      unit = init[f'block{s}'][f'unit{u}']
      assert np.all(unit['gn3']['scale'] == 0)
      assert np.all(unit['gn1']['scale'] == 1)
      assert ('conv_proj' in unit) == (u == 1)


# The original's counts: 224px, 1000 classes, no pre_logits.
HYBRID_COUNTS = {
    'R50+ViT-B_16': 98_659_112,
    'R26+ViT-S_32': 36_431_912,
    'R50+ViT-L_32': 328_994_856,
    'R+Ti_16': 6_337_704,
}


@pytest.mark.parametrize('name', sorted(HYBRID_COUNTS))
def test_hybrid_parameter_counts(name):
  assert _count(_shapes(name)) == HYBRID_COUNTS[name]


def test_r26_b32_count_from_r26_s32_by_a_second_path():
  # The R26 backbone is shared: R26+B/32 - B/32 and R26+S/32 - S/32 differ
  # only by the embedding (2048 features in, or 32x32x3 pixels in).
  def backbone_params(hybrid, plain, width):
    return _count(_shapes(hybrid)) - _count(_shapes(plain)) - (2048 - 32 * 32 * 3) * width
  assert backbone_params('R26+ViT-B_32', 'ViT-B_32', 768) == backbone_params(
      'R26+ViT-S_32', 'ViT-S_32', 384)
  assert _count(_shapes('R26+ViT-B_32')) == 101_383_976


@pytest.mark.parametrize('name,res,grid,features', [
    ('R50+ViT-B_16', 384, 24, 1024),   # the fine-tuning resolution: 577 tokens
    ('R50+ViT-L_32', 224, 7, 2048),
    ('R26+ViT-S_32', 224, 7, 2048),
    ('R+Ti_16', 224, 7, 64),
])
def test_feature_map_and_token_grid(name, res, grid, features):
  shapes = _shapes(name, res=res)
  assert shapes['embedding']['kernel'].shape[2] == features
  assert shapes['Transformer']['posembed_input']['pos_embedding'].shape[1] == grid * grid + 1


def test_hybrid_load_pretrained_at_a_new_resolution():
  # Fine-tuning the hybrid: GroupNorm arrays load as (C,), the 4x4 grid of the
  # 64px checkpoint is resampled to 6x6 at 96px, the head starts at zero.
  d = golden_dir()
  cfg = json.loads((d / 'tiny_hybrid.json').read_text())['vit_jax_config']
  model = vit.VisionTransformer(**cfg)
  init = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 96, 96, 3)))['params']
  init = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), init)
  params = checkpoint.load_pretrained(d / 'tiny_hybrid.npz', init, cfg)
  orig = np.load(d / 'tiny_hybrid.npz')
  np.testing.assert_array_equal(params['block2']['unit1']['gn_proj']['scale'],
                                orig['block2/unit1/gn_proj/scale'].reshape(-1))
  np.testing.assert_array_equal(params['conv_root']['kernel'], orig['conv_root/kernel'])
  pe = params['Transformer']['posembed_input']['pos_embedding']
  assert pe.shape == (1, 37, 64)
  np.testing.assert_array_equal(pe[:, 0], orig['Transformer/posembed_input/pos_embedding'][:, 0])
  assert not np.any(params['head']['kernel'])
