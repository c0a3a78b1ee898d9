"""Per-example image preprocessing for training and evaluation (TensorFlow ops).

Every random op here is *stateless*: it takes an explicit `seed` tensor of shape
(2,) int64. The input pipeline derives that seed from (config.seed, position of
the example in the global example stream), so the augmentation of an example
does not depend on thread scheduling, on which process reads it, or on whether
the run was resumed. That is what makes resumed runs see identical batches.

Preprocessing is selected by name (`config.pp.train`, `config.pp.eval`):

  train: 'inception_crop'  ViT paper, Appendix B.1.1 (and the original vit_jax):
                           random crop of 5%-100% of the area with aspect ratio
                           in [3/4, 4/3], resize, random horizontal flip.
         'rpt_augment'     RPT report, section 4.2: "horizontal random flip,
                           random rotation and random zoom". The report gives no
                           factors; we use those of the Keras small-dataset ViT
                           recipe it follows (RandomRotation(0.02) = +-7.2 deg,
                           RandomZoom(0.2) = x/y scale in [0.8, 1.2], reflect
                           fill), configurable via pp.rotation_factor and
                           pp.zoom_factor.
         'resize'          plain resize, no augmentation.
  eval:  'resize'          plain resize (the original's eval).
         'resize_crop'     resize to size / crop_fraction, then central crop.

All outputs are float32 in [-1, 1] (`x / 127.5 - 1`, as the original).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
try:
  import tensorflow as tf
except ImportError:
  raise ImportError("vit_jax.preprocess needs TensorFlow: pip install 'vit_jax[train]' "
                    '(vit_jax.images has the eval preprocessing without it).') from None

from vit_jax.images import CROP_FRACTION, hw

TRAIN_PP = ('inception_crop', 'rpt_augment', 'resize')
EVAL_PP = ('resize', 'resize_crop')

# ViT paper B.1.1 / original vit_jax: inception crop area range and the TF default aspect range.
INCEPTION_AREA_RANGE = (0.05, 1.0)
INCEPTION_ASPECT_RANGE = (3.0 / 4.0, 4.0 / 3.0)
# RPT report 4.2 (factors from the Keras ViT-on-small-datasets recipe, see module doc).
RPT_ROTATION_FACTOR = 0.02  # fraction of a full turn: angle ~ U(-0.02, 0.02) * 2 pi
RPT_ZOOM_FACTOR = 0.2  # scale ~ U(1 - 0.2, 1 + 0.2), independently for x and y

ImageFn = Callable[..., tf.Tensor]


def to_unit_range(image: tf.Tensor) -> tf.Tensor:
  """Maps pixel values in [0, 255] to [-1, 1], the range the ViT checkpoints expect."""
  return tf.cast(image, tf.float32) / 127.5 - 1.0


def resize(image: tf.Tensor, size: int | Sequence[int]) -> tf.Tensor:
  """Bilinear resize (no antialiasing, as the original) to `size`; returns float32 in [0, 255]."""
  return tf.image.resize(tf.cast(image, tf.float32), hw(size), method='bilinear')


def split_seed(seed: tf.Tensor, num: int) -> list[tf.Tensor]:
  """Splits one stateless seed into `num` independent seeds."""
  seeds = tf.random.experimental.stateless_split(seed, num=num)
  return [seeds[i] for i in range(num)]


def inception_crop_box(
    image_shape: tf.Tensor,
    seed: tf.Tensor,
    area_range: Sequence[float] = INCEPTION_AREA_RANGE,
    aspect_ratio_range: Sequence[float] = INCEPTION_ASPECT_RANGE,
) -> tuple[tf.Tensor, tf.Tensor]:
  """Samples an Inception-style crop: returns (begin, size) for `tf.slice`.

  Same sampler as the original (`sample_distorted_bounding_box` with no
  bounding boxes, min_object_covered=0), but stateless.
  """
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      image_shape,
      bounding_boxes=tf.zeros([0, 0, 4], tf.float32),
      seed=seed,
      min_object_covered=0.0,
      aspect_ratio_range=tuple(aspect_ratio_range),
      area_range=tuple(area_range),
      max_attempts=100,
      use_image_if_no_bounding_boxes=True,
  )
  return begin, size


def inception_crop(image: tf.Tensor, seed: tf.Tensor, size: int | Sequence[int]) -> tf.Tensor:
  """Inception crop + resize + horizontal flip (ViT paper B.1.1). float32 in [-1, 1]."""
  crop_seed, flip_seed = split_seed(seed, 2)
  begin, crop_size = inception_crop_box(tf.shape(image), crop_seed)
  image = tf.slice(image, begin, crop_size)
  image.set_shape([None, None, 3])
  image = resize(image, size)
  image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  return to_unit_range(image)


def affine_matrix(
    angle: tf.Tensor,
    zoom_x: tf.Tensor,
    zoom_y: tf.Tensor,
    in_hw: tf.Tensor | Sequence[int],
    out_hw: tf.Tensor | Sequence[int] | None = None,
) -> tf.Tensor:
  """Projective-transform vector (8,): resize in_hw -> out_hw, then rotate + zoom about the centre.

  Maps output pixel p to c + R(angle) diag(zoom_x, zoom_y) (p - c) in the
  resized frame (Keras' RandomRotation followed by RandomZoom; zoom > 1 zooms
  out), then to the input frame with the half-pixel convention of
  `tf.image.resize` (x_in = (x + 0.5) * W_in / W_out - 0.5). One bilinear
  resampling does the resize and the augmentation together: cheaper and
  sharper than resizing, then transforming.
  """
  in_h, in_w = (tf.cast(v, tf.float32) for v in (in_hw[0], in_hw[1]))
  out_h, out_w = (in_h, in_w) if out_hw is None else (tf.cast(v, tf.float32) for v in (out_hw[0], out_hw[1]))
  angle = tf.cast(angle, tf.float32)
  zoom_x, zoom_y = tf.cast(zoom_x, tf.float32), tf.cast(zoom_y, tf.float32)
  sx, sy = in_w / out_w, in_h / out_h
  cx, cy = (out_w - 1.0) / 2.0, (out_h - 1.0) / 2.0
  cos, sin = tf.cos(angle), tf.sin(angle)
  a0, a1 = cos * zoom_x, -sin * zoom_y
  b0, b1 = sin * zoom_x, cos * zoom_y
  a2 = cx - (a0 * cx + a1 * cy)
  b2 = cy - (b0 * cx + b1 * cy)
  return tf.stack([
      sx * a0, sx * a1, sx * a2 + 0.5 * sx - 0.5,
      sy * b0, sy * b1, sy * b2 + 0.5 * sy - 0.5,
      0.0, 0.0,
  ])


def _map_coord(x: tf.Tensor, length: tf.Tensor, fill_mode: str) -> tf.Tensor:
  """Maps sample coordinates outside [0, length - 1] back inside ('REFLECT' or 'NEAREST')."""
  length = tf.cast(length, tf.float32)
  if fill_mode == 'REFLECT':
    # Mirror the continuous image [-0.5, length - 0.5] at its borders (Keras' 'reflect').
    t = tf.math.floormod(x + 0.5, 2.0 * length)
    x = tf.where(t < length, t, 2.0 * length - t) - 0.5
  elif fill_mode != 'NEAREST':
    raise ValueError(f"fill_mode must be 'REFLECT' or 'NEAREST', got {fill_mode!r}.")
  return tf.clip_by_value(x, 0.0, length - 1.0)


def sample_bilinear(image: tf.Tensor, x: tf.Tensor, y: tf.Tensor, fill_mode: str = 'REFLECT') -> tf.Tensor:
  """Bilinear samples of `image` (H, W, C) at float pixel coordinates x, y (any equal shape).

  Hand-written with four gathers because TF's ImageProjectiveTransform kernel
  is ~10x slower on CPU at 224 px.
  """
  image = tf.cast(image, tf.float32)
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  x = _map_coord(x, w, fill_mode)
  y = _map_coord(y, h, fill_mode)
  x0, y0 = tf.floor(x), tf.floor(y)
  wx, wy = (x - x0)[..., None], (y - y0)[..., None]
  x0, y0 = tf.cast(x0, tf.int32), tf.cast(y0, tf.int32)
  x1, y1 = tf.minimum(x0 + 1, w - 1), tf.minimum(y0 + 1, h - 1)
  flat = tf.reshape(image, [h * w, shape[2]])

  def at(yi, xi):
    return tf.gather(flat, yi * w + xi)

  top = at(y0, x0) * (1.0 - wx) + at(y0, x1) * wx
  bottom = at(y1, x0) * (1.0 - wx) + at(y1, x1) * wx
  return top * (1.0 - wy) + bottom * wy


def affine_transform(
    image: tf.Tensor,
    angle: tf.Tensor,
    zoom_x: tf.Tensor,
    zoom_y: tf.Tensor,
    size: int | Sequence[int] | None = None,
    fill_mode: str = 'REFLECT',
) -> tf.Tensor:
  """Resizes `image` (H, W, C) to `size` (default: unchanged) and rotates (radians,
  counter-clockwise on screen) and zooms it about its centre, in one bilinear pass.
  Returns float32 in the input's value range."""
  in_hw = tf.shape(image)[:2]
  if size is None:
    out_h, out_w = in_hw[0], in_hw[1]
  elif isinstance(size, int):
    out_h, out_w = size, size
  else:
    out_h, out_w = size  # ints or scalar tensors
  m = affine_matrix(angle, zoom_x, zoom_y, in_hw, (out_h, out_w))
  ys, xs = tf.meshgrid(tf.range(out_h, dtype=tf.float32), tf.range(out_w, dtype=tf.float32), indexing='ij')
  x_in = m[0] * xs + m[1] * ys + m[2]
  y_in = m[3] * xs + m[4] * ys + m[5]
  return sample_bilinear(image, x_in, y_in, fill_mode)


def rpt_augment(
    image: tf.Tensor,
    seed: tf.Tensor,
    size: int | Sequence[int],
    rotation_factor: float = RPT_ROTATION_FACTOR,
    zoom_factor: float = RPT_ZOOM_FACTOR,
    fill_mode: str = 'REFLECT',
) -> tf.Tensor:
  """RPT report 4.2: resize, random horizontal flip, random rotation, random zoom. [-1, 1].

  Geometry is that of Keras' Resizing -> RandomFlip -> RandomRotation ->
  RandomZoom (rotation and zoom happen in the output's frame).

  Flip-then-rotate equals rotate-by-minus-the-angle-then-flip, and the angle
  distribution is symmetric, so flipping last (cheaper) has Keras' distribution.
  """
  flip_seed, angle_seed, zoom_seed = split_seed(seed, 3)
  max_angle = rotation_factor * 2.0 * math.pi
  angle = tf.random.stateless_uniform([], angle_seed, -max_angle, max_angle)
  zoom = tf.random.stateless_uniform([2], zoom_seed, 1.0 - zoom_factor, 1.0 + zoom_factor)
  # Transform at no more pixels than the source has (in the output's aspect ratio),
  # then upscale: for CIFAR at 224 px this is ~5x cheaper than transforming at 224.
  out_h, out_w = hw(size)
  shape = tf.shape(image)
  in_area = tf.cast(shape[0] * shape[1], tf.float32)
  scale = tf.minimum(1.0, tf.sqrt(in_area / float(out_h * out_w)))
  mid_h = tf.maximum(1, tf.cast(tf.round(out_h * scale), tf.int32))
  mid_w = tf.maximum(1, tf.cast(tf.round(out_w * scale), tf.int32))
  image = affine_transform(image, angle, zoom[0], zoom[1], (mid_h, mid_w), fill_mode)
  image = tf.cond(
      tf.logical_and(tf.equal(mid_h, out_h), tf.equal(mid_w, out_w)),
      lambda: image,
      lambda: resize(image, (out_h, out_w)),
  )
  image = tf.ensure_shape(image, [out_h, out_w, None])
  image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  return to_unit_range(tf.clip_by_value(image, 0.0, 255.0))


def resize_crop(image: tf.Tensor, size: int | Sequence[int], crop_fraction: float) -> tf.Tensor:
  """Resizes to size / crop_fraction, then takes the central `size` crop. [-1, 1]."""
  if not 0.0 < crop_fraction <= 1.0:
    raise ValueError(f'pp.crop_fraction must be in (0, 1], got {crop_fraction}.')
  h, w = hw(size)
  big = (round(h / crop_fraction), round(w / crop_fraction))
  image = resize(image, big)
  top, left = (big[0] - h) // 2, (big[1] - w) // 2
  return to_unit_range(image[top : top + h, left : left + w, :])


def get_train_fn(
    name: str,
    size: int | Sequence[int],
    *,
    rotation_factor: float = RPT_ROTATION_FACTOR,
    zoom_factor: float = RPT_ZOOM_FACTOR,
) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
  """Returns fn(image_uint8 (H, W, 3), seed (2,) int64) -> float32 (h, w, 3) in [-1, 1]."""
  if name == 'inception_crop':
    return lambda image, seed: inception_crop(image, seed, size)
  if name == 'rpt_augment':
    return lambda image, seed: rpt_augment(image, seed, size, rotation_factor, zoom_factor)
  if name == 'resize':
    return lambda image, seed: to_unit_range(resize(image, size))
  raise ValueError(f'Unknown training preprocessing pp.train={name!r}; expected one of {TRAIN_PP}.')


def get_eval_fn(
    name: str, size: int | Sequence[int], *, crop_fraction: float = CROP_FRACTION
) -> Callable[[tf.Tensor], tf.Tensor]:
  """Returns fn(image_uint8 (H, W, 3)) -> float32 (h, w, 3) in [-1, 1]; deterministic."""
  if name == 'resize':
    return lambda image: to_unit_range(resize(image, size))
  if name == 'resize_crop':
    if not 0.0 < crop_fraction <= 1.0:
      raise ValueError(f'pp.crop_fraction must be in (0, 1], got {crop_fraction}.')
    return lambda image: resize_crop(image, size, crop_fraction)
  raise ValueError(f'Unknown eval preprocessing pp.eval={name!r}; expected one of {EVAL_PP}.')
