"""SPT / RPT tokenizers: analytic cases for shifts, rotations, patchify and the module."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax.models import embeddings as E


def _image(b=2, h=8, w=8, c=3, seed=0):
  return np.random.RandomState(seed).randn(b, h, w, c).astype(np.float32)


def test_angle_zero_and_shift_zero_give_copies_equal_to_input():
  x = _image()
  copies = E.rpt_copies(x, 0., 0., 0)
  assert len(copies) == 6  # N_R = 4 shifts + 2 rotations (RPT report §3.2.2)
  for c in copies:
    np.testing.assert_array_equal(np.asarray(c), x)
  # Same through the module: the concat is seven copies of the input.
  tok = E.PatchTokenizer('rpt', (4, 4), 16, shift=0, eval_angle=0.)
  params = tok.init(jax.random.PRNGKey(0), x)['params']
  got = tok.apply({'params': params}, x)
  want = _reference_tokens(params, np.concatenate([x] * 7, -1), 4)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize('k', [1, 2, 3])
def test_quarter_turns_give_exact_rotated_pixels(k):
  x = np.arange(2 * 6 * 6 * 2, dtype=np.float32).reshape(2, 6, 6, 2)
  # rotate() turns clockwise on screen; np.rot90 with k > 0 turns anticlockwise.
  got = np.asarray(E.rotate(x, k * np.pi / 2))
  np.testing.assert_allclose(got, np.rot90(x, -k, axes=(1, 2)), atol=1e-4, rtol=0)
  got = np.asarray(E.rotate(x, -k * np.pi / 2))
  np.testing.assert_allclose(got, np.rot90(x, k, axes=(1, 2)), atol=1e-4, rtol=0)


def test_clockwise_direction_on_a_one_hot_pixel():
  x = np.zeros((1, 5, 5, 1), np.float32)
  x[0, 0, 2, 0] = 1  # top middle
  y = np.asarray(E.rotate(x, np.pi / 2))
  assert y[0, 2, 4, 0] == pytest.approx(1, abs=1e-6)  # -> right middle
  assert np.sum(np.abs(y)) == pytest.approx(1, abs=1e-5)


def test_rotation_is_exact_on_linear_images_at_any_angle():
  # Bilinear interpolation reproduces an affine function exactly, so inside the
  # image the result must equal f(R^-1 p) computed in float64.
  h = w = 16
  rows, cols = np.mgrid[:h, :w].astype(np.float64)

  def f(r, c):
    return 0.3 * r - 0.2 * c + 1.0

  x = f(rows, cols)[None, :, :, None].astype(np.float32)
  a = 0.2
  cy = cx = (h - 1) / 2
  dy, dx = rows - cy, cols - cx
  src_c = np.cos(a) * dx + np.sin(a) * dy + cx
  src_r = -np.sin(a) * dx + np.cos(a) * dy + cy
  inside = (src_r >= 0) & (src_r <= h - 1) & (src_c >= 0) & (src_c <= w - 1)
  got = np.asarray(E.rotate(x, a))[0, :, :, 0]
  np.testing.assert_allclose(got[inside], f(src_r, src_c)[inside], atol=1e-4, rtol=0)
  # Corners come from outside the image: zeros (cropped to the input size).
  assert got[0, 0] == 0 and got[-1, -1] == 0
  assert inside.sum() > 0.8 * h * w


def test_per_example_angles():
  x = _image(b=3)
  angles = np.array([0., np.pi / 2, np.pi], np.float32)
  got = np.asarray(E.rotate(x, angles))
  np.testing.assert_allclose(got[0], x[0], atol=1e-6)
  np.testing.assert_allclose(got[1], np.rot90(x[1], -1), atol=1e-5)
  np.testing.assert_allclose(got[2], np.rot90(x[2], 2), atol=1e-5)


@pytest.mark.parametrize('patch', [4, 6])
def test_half_patch_shift_moves_one_hot_pixel_diagonally(patch):
  s = patch // 2
  x = np.zeros((1, 12, 12, 3), np.float32)
  r, c = 5, 6
  x[0, r, c, 1] = 1
  copies = [np.asarray(v) for v in E.diagonal_shifts(x, s)]
  for (sy, sx), copy in zip(E.DIAGONALS, copies):
    want = np.zeros_like(x)
    want[0, r + sy * s, c + sx * s, 1] = 1
    np.testing.assert_array_equal(copy, want)


def test_non_square_patches_shift_half_a_patch_per_axis():
  x = np.zeros((1, 8, 12, 1), np.float32)
  x[0, 4, 6, 0] = 1
  tok = E.PatchTokenizer('spt', (4, 6), 8)
  for (sy, sx), copy in zip(E.DIAGONALS, E.diagonal_shifts(x, (2, 3))):
    assert np.asarray(copy)[0, 4 + 2 * sy, 6 + 3 * sx, 0] == 1
  params = tok.init(jax.random.PRNGKey(0), x)['params']
  stacked = np.concatenate([x] + [np.asarray(v) for v in E.diagonal_shifts(x, (2, 3))], -1)
  p = E.patchify(stacked, (4, 6)).astype(np.float64)
  p = (p - p.mean(-1, keepdims=True)) / np.sqrt(p.var(-1, keepdims=True) + 1e-6)
  p = p * params['norm']['scale'] + params['norm']['bias']
  want = p @ params['proj']['kernel'] + params['proj']['bias']
  np.testing.assert_allclose(tok.apply({'params': params}, x), want, atol=1e-4, rtol=0)


def test_shift_drops_pixels_pushed_out_and_fills_zeros():
  x = np.ones((1, 4, 4, 1), np.float32)
  y = np.asarray(E.shift(x, 1, -2))[0, :, :, 0]
  want = np.zeros((4, 4))
  want[1:, :2] = 1
  np.testing.assert_array_equal(y, want)
  with pytest.raises(ValueError, match='not smaller than the image'):
    E.shift(x, 4, 0)


def test_patchify_then_dense_equals_strided_conv():
  x = _image(h=8, w=12, c=5)
  kernel = np.random.RandomState(1).randn(4, 4, 5, 7).astype(np.float32)
  conv = jax.lax.conv_general_dilated(x, kernel, (4, 4), 'VALID',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  dense = E.patchify(x, (4, 4)) @ kernel.reshape(-1, 7)
  assert dense.shape == (2, 2, 3, 7)
  np.testing.assert_allclose(dense, conv, atol=1e-4, rtol=0)
  with pytest.raises(ValueError, match='not divisible into 5x5 patches'):
    E.patchify(x, (5, 5))


def _reference_tokens(params, stacked, patch):
  """LN over each flattened patch, then the Dense: written out in numpy."""
  p = E.patchify(stacked, (patch, patch)).astype(np.float64)
  mu = p.mean(-1, keepdims=True)
  var = p.var(-1, keepdims=True)
  p = (p - mu) / np.sqrt(var + 1e-6) * params['norm']['scale'] + params['norm']['bias']
  return p @ params['proj']['kernel'] + params['proj']['bias']


def test_spt_module_matches_manual_pipeline_and_param_count():
  x = _image()
  tok = E.PatchTokenizer('spt', (4, 4), 24)
  params = tok.init(jax.random.PRNGKey(0), x)['params']
  n = sum(v.size for v in jax.tree.leaves(params))
  assert n == E.num_tokenizer_params('spt', (4, 4), 3, 24) == 2 * 240 + 240 * 24 + 24
  stacked = np.concatenate([x] + [np.asarray(v) for v in E.diagonal_shifts(x, 2)], -1)
  np.testing.assert_allclose(tok.apply({'params': params}, x),
                             _reference_tokens(params, stacked, 4), atol=1e-4, rtol=0)


def test_rpt_eval_uses_fixed_mid_range_angle():
  assert E.RPT_EVAL_ANGLE == pytest.approx((np.pi / 20 + np.pi / 14) / 2)
  x = _image()
  tok = E.PatchTokenizer('rpt', (4, 4), 16)
  params = tok.init(jax.random.PRNGKey(0), x)['params']
  assert sum(v.size for v in jax.tree.leaves(params)) == E.num_tokenizer_params(
      'rpt', (4, 4), 3, 16)
  a = E.RPT_EVAL_ANGLE
  copies = E.diagonal_shifts(x, 2) + [E.rotate(x, a), E.rotate(x, -a)]
  stacked = np.concatenate([x] + [np.asarray(v) for v in copies], -1)
  got = tok.apply({'params': params}, x, train=False)
  np.testing.assert_allclose(got, _reference_tokens(params, stacked, 4), atol=1e-4, rtol=0)


def test_rpt_train_angles_are_random_in_range_and_jittable():
  x = _image(b=4)
  tok = E.PatchTokenizer('rpt', (4, 4), 16)
  params = tok.init(jax.random.PRNGKey(0), x)['params']
  key = jax.random.PRNGKey(7)

  def apply(k):
    return tok.apply({'params': params}, x, train=True, rngs={'dropout': k},
                     mutable=['intermediates'])

  got, state = jax.jit(apply)(key)
  angles = np.asarray(state['intermediates']['rpt_angles'][0])
  assert angles.shape == (2, 4)  # per direction, per example
  assert np.all(angles >= np.pi / 20) and np.all(angles <= np.pi / 14)
  assert len(np.unique(angles)) == 8
  # The output is the eq. (4) pipeline at exactly those angles.
  copies = E.diagonal_shifts(x, 2) + [E.rotate(x, angles[0]), E.rotate(x, -angles[1])]
  stacked = np.concatenate([x] + [np.asarray(v) for v in copies], -1)
  np.testing.assert_allclose(got, _reference_tokens(params, stacked, 4), atol=1e-4, rtol=0)
  np.testing.assert_allclose(got, apply(key)[0], atol=1e-5, rtol=0)  # jit == eager
  assert np.abs(got - apply(jax.random.PRNGKey(8))[0]).max() > 1e-3  # angles change
  # An explicit 'rpt' stream takes precedence over 'dropout'.
  a = tok.apply({'params': params}, x, train=True, rngs={'rpt': key, 'dropout': key})
  b = tok.apply({'params': params}, x, train=True,
                rngs={'rpt': key, 'dropout': jax.random.PRNGKey(9)})
  np.testing.assert_array_equal(a, b)


def test_rpt_train_angle_range_is_respected():
  # With a degenerate range [a, a] training equals evaluation at angle a.
  x = _image()
  a = 0.21
  tok = E.PatchTokenizer('rpt', (4, 4), 16, angle_range=(a, a), eval_angle=a)
  params = tok.init(jax.random.PRNGKey(0), x)['params']
  train = tok.apply({'params': params}, x, train=True, rngs={'dropout': jax.random.PRNGKey(3)})
  np.testing.assert_allclose(train, tok.apply({'params': params}, x), atol=1e-5, rtol=0)


def test_tokenize_config_errors():
  x = jnp.zeros((1, 8, 8, 3))
  bad = E.PatchTokenizer('xyz', (4, 4), 8)
  with pytest.raises(ValueError, match="tokenizer type must be one of"):
    bad.init(jax.random.PRNGKey(0), x)
  from flax import linen as nn

  class Wrap(nn.Module):
    cfg: dict

    @nn.compact
    def __call__(self, x):
      return E.tokenize(x, self.cfg, patch_size=(4, 4), hidden_size=8, train=False)

  with pytest.raises(ValueError, match='unknown tokenizer options'):
    Wrap({'type': 'rpt', 'angle': 0.1}).init(jax.random.PRNGKey(0), x)
  params = Wrap({'type': 'rpt', 'angle_range': [0.1, 0.2]}).init(jax.random.PRNGKey(0), x)
  assert set(params['params']['embedding']) == {'norm', 'proj'}
