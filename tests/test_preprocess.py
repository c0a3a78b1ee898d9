"""Preprocessing ops: analytic cases (identity, 90-degree rotation, zoom of a ramp,
central crop), the inception-crop sampler's ranges, value range and seeding."""

import math

import numpy as np
import pytest

from vit_jax import preprocess

tf = pytest.importorskip('tensorflow')


def _seed(i: int):
  return tf.constant([i, 7], tf.int64)


def test_unit_range_maps_0_and_255_to_minus1_and_1():
  x = tf.constant([0, 51, 255], tf.uint8)
  np.testing.assert_allclose(preprocess.to_unit_range(x).numpy(), [-1.0, 51 / 127.5 - 1, 1.0], rtol=0, atol=1e-7)


def test_resize_same_size_is_identity_and_eval_resize_range():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
  np.testing.assert_array_equal(preprocess.resize(img, (6, 5)).numpy(), img.astype(np.float32))
  out = preprocess.get_eval_fn('resize', 12)(tf.constant(img)).numpy()
  assert out.shape == (12, 12, 3) and out.dtype == np.float32
  assert -1.0 <= out.min() and out.max() <= 1.0


def test_resize_crop_is_central_crop_of_upscaled_image():
  rng = np.random.default_rng(1)
  img = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
  # size 4 with crop_fraction 0.5: resize to 8 (identity), keep the central 4x4 = rows/cols 2..5.
  out = preprocess.get_eval_fn('resize_crop', 4, crop_fraction=0.5)(tf.constant(img)).numpy()
  np.testing.assert_allclose(out, img[2:6, 2:6].astype(np.float32) / 127.5 - 1, atol=1e-6)
  with pytest.raises(ValueError, match=r'crop_fraction must be in \(0, 1\], got 1.5'):
    preprocess.get_eval_fn('resize_crop', 4, crop_fraction=1.5)


def test_inception_crop_box_respects_paper_area_and_aspect_ranges():
  shape = tf.constant([200, 300, 3], tf.int32)
  areas, aspects = [], []
  for i in range(300):
    begin, size = preprocess.inception_crop_box(shape, _seed(i))
    b, s = begin.numpy(), size.numpy()
    assert b[0] >= 0 and b[1] >= 0 and b[0] + s[0] <= 200 and b[1] + s[1] <= 300
    areas.append(s[0] * s[1] / (200 * 300))
    aspects.append(s[1] / s[0])
  areas, aspects = np.array(areas), np.array(aspects)
  # ViT paper B.1.1: area 5%-100%; aspect 3/4-4/3 (integer rounding of the box adds a little slack).
  assert areas.min() >= 0.05 * 0.93 and areas.max() <= 1.0
  full = areas == 1.0  # fallback to the whole image when 100 attempts fail (rare)
  assert full.mean() < 0.1
  assert aspects[~full].min() >= 0.75 * 0.97 and aspects[~full].max() <= (4 / 3) * 1.03
  # The range is explored (on a 2:3 image, aspect <= 4/3 caps the area at 0.89).
  assert areas.min() < 0.15 and areas.max() > 0.7
  b1, s1 = preprocess.inception_crop_box(shape, _seed(3))
  b2, s2 = preprocess.inception_crop_box(shape, _seed(3))
  np.testing.assert_array_equal(b1.numpy(), b2.numpy())
  np.testing.assert_array_equal(s1.numpy(), s2.numpy())


def test_train_fns_are_seeded_and_in_unit_range():
  rng = np.random.default_rng(2)
  img = tf.constant(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
  for name in preprocess.TRAIN_PP:
    fn = preprocess.get_train_fn(name, 16)
    a, b, c = fn(img, _seed(1)).numpy(), fn(img, _seed(1)).numpy(), fn(img, _seed(2)).numpy()
    assert a.shape == (16, 16, 3) and a.dtype == np.float32
    assert a.min() >= -1.0 and a.max() <= 1.0
    np.testing.assert_array_equal(a, b)
    if name != 'resize':
      assert np.abs(a - c).max() > 0.01, name
    else:
      np.testing.assert_array_equal(a, c)


def test_affine_identity_rotation_and_zoom_are_exact():
  rng = np.random.default_rng(3)
  img = rng.uniform(0, 255, (5, 5, 3)).astype(np.float32)
  same = preprocess.affine_transform(img, 0.0, 1.0, 1.0).numpy()
  np.testing.assert_allclose(same, img, atol=1e-4)
  # +90 degrees is a counter-clockwise quarter turn, exactly np.rot90 on a square image.
  rot = preprocess.affine_transform(img, math.pi / 2, 1.0, 1.0).numpy()
  np.testing.assert_allclose(rot, np.rot90(img, k=1, axes=(0, 1)), atol=1e-3)
  # Zoom 0.5 (zoom in x2) of a horizontal ramp I(x) = 10 x about the centre c = 4:
  # out(x) = I(c + 0.5 (x - c)) = 20 + 5 x; bilinear interpolation is exact on a ramp.
  ramp = np.tile((10.0 * np.arange(9, dtype=np.float32))[None, :, None], (9, 1, 1))
  zoomed = preprocess.affine_transform(ramp, 0.0, 0.5, 1.0).numpy()
  np.testing.assert_allclose(zoomed[4, :, 0], 20 + 5 * np.arange(9), atol=1e-3)


@pytest.mark.parametrize('in_hw,size', [((8, 8), 8), ((10, 7), (20, 16)), ((21, 30), 9), ((5, 9), (9, 5))])
def test_fused_resize_affine_equals_tf_resize(in_hw, size):
  # With no rotation/zoom, the single-pass transform is exactly tf.image.resize
  # (half-pixel centres; NEAREST edges = resize's clamping).
  rng = np.random.default_rng(5)
  img = rng.integers(0, 256, (*in_hw, 3), dtype=np.uint8)
  out = preprocess.affine_transform(img, 0.0, 1.0, 1.0, size, fill_mode='NEAREST').numpy()
  np.testing.assert_allclose(out, preprocess.resize(img, size).numpy(), atol=2e-3)


# Shapes where rpt_augment's intermediate resolution equals the input or the output.
@pytest.mark.parametrize('in_hw,size', [((8, 8), 8), ((4, 4), 16), ((21, 30), 9)])
def test_rpt_augment_without_rotation_and_zoom_is_resize_and_flip(in_hw, size):
  # The fused resize+affine pass must reproduce tf.image.resize exactly (NEAREST edge
  # handling = resize's clamping), up to the random flip.
  rng = np.random.default_rng(4)
  img = tf.constant(rng.integers(0, 256, (*in_hw, 3), dtype=np.uint8))
  ref = preprocess.to_unit_range(preprocess.resize(img, size)).numpy()
  flips = set()
  for i in range(6):
    out = preprocess.rpt_augment(img, _seed(i), size, rotation_factor=0.0, zoom_factor=0.0,
                                 fill_mode='NEAREST').numpy()
    assert out.shape == ref.shape
    same, flipped = np.allclose(out, ref, atol=1e-4), np.allclose(out, ref[:, ::-1], atol=1e-4)
    assert same or flipped
    flips.add(flipped and not same)
  assert flips == {True, False}  # both outcomes of the flip occur


def test_unknown_preprocessing_names_fail_clearly():
  with pytest.raises(ValueError, match=r"pp.train='autoaugment'.*inception_crop.*rpt_augment.*resize"):
    preprocess.get_train_fn('autoaugment', 32)
  with pytest.raises(ValueError, match=r"pp.eval='center'.*resize.*resize_crop"):
    preprocess.get_eval_fn('center', 32)
