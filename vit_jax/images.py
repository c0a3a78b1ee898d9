"""Image files -> model inputs without TensorFlow (Pillow + numpy).

The same pixels as the training pipeline's eval path, `input_pipeline.decode_image`
followed by `preprocess.get_eval_fn(pp_eval, size, crop_fraction=...)`, so that
predict, analysis and hub see what evaluation saw (tests/test_images.py
compares the two on real and generated files).

Decoding. `tf.io.decode_image` decodes JPEGs with libjpeg-turbo's fast integer
IDCT (JDCT_IFAST, TensorFlow's own default) and "fancy" (triangle-filter)
chroma upsampling. Pillow offers either the accurate IDCT with fancy upsampling
(its default) or, in draft mode, the fast IDCT with box upsampling; neither is
TensorFlow's pair (the accurate IDCT differs by up to ~5 levels of 255). So a
colour JPEG is decoded in draft mode to its own colour space (YCbCr, box
upsampled, fast IDCT: the exact samples TensorFlow's decoder sees), and
libjpeg's fancy upsampling and its fixed-point YCbCr -> RGB conversion are
redone here in integer numpy, bit for bit. PNG/BMP/GIF/WebP decode losslessly
alike in both (alpha dropped, greyscale expanded; 16-bit PNGs keep their high
byte; a GIF's first frame, sized and placed as TensorFlow does, with its
transparent pixels black).

Resizing. `tf.image.resize(..., 'bilinear')` without antialiasing: half-pixel
centres, float32 arithmetic in TensorFlow's order (`_resize_bilinear`).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np

from vit_jax.dataset_info import IMAGE_EXTENSIONS

# The one default for pp.crop_fraction ('resize_crop' eval: resize to
# size / crop_fraction, then take the central crop), as in Inception/ResNet eval.
CROP_FRACTION = 0.875
EVAL_PP = ('resize', 'resize_crop')
# Evaluation on folder datasets decodes a JPEG whose shorter side is at least
# 2, 4 or 8 times DCT_MIN_SIDE * image_size at 1/2, 1/4 or 1/8 size (libjpeg's
# DCT scaling, see input_pipeline.decode_image); `min_side` below does the same.
DCT_MIN_SIDE = 4


class ImageError(ValueError):
  """An image file that cannot be listed, read or decoded (the message names it)."""


def collect_images(paths: Sequence[str]) -> list[str]:
  """Expands directories (recursively, sorted) into image files."""
  out = []
  for p in paths:
    if os.path.isdir(p):
      for root, dirs, files in os.walk(p):
        dirs.sort()
        out.extend(os.path.join(root, f) for f in sorted(files)
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    elif os.path.isfile(p):
      out.append(p)
    else:
      raise ImageError(f'{p!r} is neither an image file nor a directory.')
  if not out:
    raise ImageError(f'No image files ({", ".join(IMAGE_EXTENSIONS)}) found in {list(paths)}.')
  return out


# ---------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------


def read_image(path: str, min_side: int | None = None) -> np.ndarray:
  """Reads an image file as uint8 (H, W, 3), pixel for pixel as `tf.io.decode_image`.

  Greyscale is expanded to 3 channels, alpha dropped, a GIF gives its first
  frame. With `min_side`, a JPEG is decoded at the smallest DCT scale (1, 1/2,
  1/4, 1/8) that keeps its shorter side >= min_side, as
  `input_pipeline.decode_image(data, min_side)`. Raises ImageError naming the
  file and the reason if it cannot be used.
  """
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise ImageError(f'Cannot read image file {path!r}: {e.strerror or e}.') from None
  try:
    return decode_image(data, min_side)
  except ImageError as e:
    raise ImageError(f'Cannot decode image file {path!r}: {e}.') from None


def decode_image(data: bytes, min_side: int | None = None) -> np.ndarray:
  """Encoded image bytes -> uint8 (H, W, 3) (see read_image). Raises ImageError with the reason."""
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  if not data:
    raise ImageError('empty file (0 bytes)')
  im = None
  try:
    im = Image.open(io.BytesIO(data))
    if im.format == 'JPEG':
      short = min(im.size)
      ratio = max([1] + [r for r in (2, 4, 8) if min_side and short >= r * min_side])
      image = _decode_jpeg(im, ratio)
    else:
      image = _decode_other(im)
  except UnidentifiedImageError:
    raise ImageError('not an image file (JPEG, PNG, GIF, BMP or WebP expected)') from None
  except Image.DecompressionBombError as e:
    raise ImageError(f'too large to decode safely ({e})') from None
  except (OSError, SyntaxError, ValueError, EOFError) as e:
    kind = im.format if im is not None and im.format else 'image'
    raise ImageError(f'truncated or corrupt {kind} ({e})') from None
  return np.ascontiguousarray(image, dtype=np.uint8)


def _decode_other(im) -> np.ndarray:
  """PNG, BMP, GIF, WebP (lossless decoders: only the channel handling differs)."""
  if im.format == 'GIF':
    return _gif_first_frame(im)
  if im.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
    # 16-bit greyscale PNG: libpng's strip_16, as TensorFlow, keeps the high byte.
    grey = (np.asarray(im).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)
  if im.mode in ('1', 'L', 'LA', 'La', 'F'):
    return np.repeat(np.asarray(im.convert('L'))[..., None], 3, axis=-1)
  return np.asarray(im.convert('RGB'))


def _gif_first_frame(im) -> np.ndarray:
  """A GIF's first frame as TensorFlow's decoder gives it.

  TensorFlow sizes the output by the first frame (not the logical screen),
  draws the frame at its (left, top) offset on black, clipped to that size,
  and paints transparent pixels black. Pillow draws the frame on a screen-sized
  canvas filled with the background colour, so the frame is cut out of it.
  """
  im.seek(0)
  left, top, right, bottom = im.tile[0][1] if im.tile else (0, 0, *im.size)
  index = np.asarray(im)    # Loads the frame; palette indices in mode 'P'.
  frame = np.asarray(im.convert('RGB'))[top:bottom, left:right].copy()
  transparency = im.info.get('transparency')
  if im.mode == 'P' and isinstance(transparency, int):
    frame[index[top:bottom, left:right] == transparency] = 0
  h, w = frame.shape[:2]
  out = np.zeros_like(frame)
  out[top:, left:] = frame[:max(h - top, 0), :max(w - left, 0)]
  return out


def _jpeg_colorspace(im) -> str:
  """libjpeg's guess of a JPEG's colour space (jdapimin.c, default_decompress_parms)."""
  if len(im.layer) == 1:
    return 'L'
  if len(im.layer) == 4:
    return 'CMYK'
  if 'jfif' in im.info:
    return 'YCbCr'
  if 'adobe' in im.info:
    return 'RGB' if im.info.get('adobe_transform') == 0 else 'YCbCr'
  ids = tuple(layer[0] for layer in im.layer)
  return 'RGB' if ids == (ord('R'), ord('G'), ord('B')) else 'YCbCr'


def _decode_jpeg(im, ratio: int = 1) -> np.ndarray:
  """A JPEG as TensorFlow decodes it: fast IDCT, fancy upsampling, libjpeg's colour maths.

  `ratio` (1, 2, 4, 8): decode at 1/ratio size by libjpeg's DCT scaling.
  """
  space = _jpeg_colorspace(im)
  width, height = im.size
  # draft() picks the DCT scale from the size: exactly `ratio` for this one.
  im.draft('YCbCr' if space == 'YCbCr' else None,  # YCbCr: keep the decoded samples
           None if ratio == 1 else (width // ratio, height // ratio))
  # Draft mode: libjpeg's fast integer IDCT (TensorFlow's default), box upsampling.
  im.decoderconfig = (ratio, 1)
  if space == 'YCbCr' and im.mode != 'YCbCr':  # draft() declined: Pillow's own decode
    return np.asarray(im.convert('RGB'))
  planes = np.asarray(im)
  if space == 'L':
    return np.repeat(planes[..., None], 3, axis=-1)
  if space == 'CMYK':
    return _cmyk_to_rgb(planes.astype(np.int32), 'adobe' in im.info)
  max_h = max(layer[1] for layer in im.layer)
  max_v = max(layer[2] for layer in im.layer)
  height, width = planes.shape[:2]
  min_size = 8 // ratio  # libjpeg's min_DCT_scaled_size
  channels = []
  for c, (_, h_samp, v_samp, _) in enumerate(im.layer):
    plane = planes[..., c].astype(np.int32)
    # libjpeg upsamples a subsampled component by a larger IDCT where it can
    # (jdmaster.c); what is left is done by the upsampler, fancily only when
    # the IDCT is larger than 1x1 (jdsample.c).
    size = min_size
    while (size < 8 and (max_h * min_size) % (h_samp * size * 2) == 0
           and (max_v * min_size) % (v_samp * size * 2) == 0):
      size *= 2
    h_ratio, v_ratio = max_h * min_size // (h_samp * size), max_v * min_size // (v_samp * size)
    if min_size > 1:
      plane = _fancy_upsample(plane, h_ratio, v_ratio, width, height)
    channels.append(plane)
  out = np.stack(channels, axis=-1)
  return _ycc_to_rgb(out) if space == 'YCbCr' else out.astype(np.uint8)


def _fancy_upsample(plane: np.ndarray, h_ratio: int, v_ratio: int, width: int, height: int) -> np.ndarray:
  """libjpeg's triangle-filter upsampling (jdsample.c) of a box-upsampled plane.

  h2v1, h1v2 and h2v2 components are upsampled "fancily" (as TensorFlow asks);
  any other ratio, and h2 components at most 2 samples wide, by replication,
  as libjpeg does. Edges replicate the last real sample, as libjpeg's context
  rows and edge columns do.
  """
  if (h_ratio, v_ratio) not in ((2, 1), (1, 2), (2, 2)):
    return plane
  small = plane[::v_ratio, ::h_ratio]  # the component's own samples
  if h_ratio == 2 and small.shape[1] <= 2:
    return plane
  if v_ratio == 2:
    # Vertical pass: nearest row x 3 + next-nearest row (row above for even
    # output rows, row below for odd ones), kept unnormalised as libjpeg does.
    above = np.concatenate([small[:1], small[:-1]], axis=0)
    below = np.concatenate([small[1:], small[-1:]], axis=0)
    sums = np.empty((2 * small.shape[0], small.shape[1]), np.int32)
    sums[0::2] = 3 * small + above
    sums[1::2] = 3 * small + below
    if h_ratio == 1:
      out = np.empty_like(sums)
      out[0::2] = (sums[0::2] + 1) >> 2
      out[1::2] = (sums[1::2] + 2) >> 2
      return out[:height, :width]
    return _fancy_h2(sums, 8, 7, 4)[:height, :width]
  return _fancy_h2(small, 1, 2, 2)[:height, :width]


def _fancy_h2(cols: np.ndarray, bias_even: int, bias_odd: int, shift: int) -> np.ndarray:
  """Doubles the width: out[2j] = (3 c[j] + c[j-1] + b0) >> s, out[2j+1] = (3 c[j] + c[j+1] + b1) >> s."""
  left = np.concatenate([cols[:, :1], cols[:, :-1]], axis=1)
  right = np.concatenate([cols[:, 1:], cols[:, -1:]], axis=1)
  out = np.empty((cols.shape[0], 2 * cols.shape[1]), np.int32)
  out[:, 0::2] = (3 * cols + left + bias_even) >> shift
  out[:, 1::2] = (3 * cols + right + bias_odd) >> shift
  return out


def _ycc_to_rgb(ycc: np.ndarray) -> np.ndarray:
  """libjpeg's fixed-point YCbCr -> RGB (jdcolor.c, 16 fractional bits)."""
  def fix(x: float) -> int:
    return int(x * (1 << 16) + 0.5)

  half = 1 << 15
  y, cb, cr = (ycc[..., i].astype(np.int64) for i in range(3))
  cb, cr = cb - 128, cr - 128
  r = y + ((fix(1.40200) * cr + half) >> 16)
  g = y + ((-fix(0.34414) * cb - fix(0.71414) * cr + half) >> 16)
  b = y + ((fix(1.77200) * cb + half) >> 16)
  return np.clip(np.stack([r, g, b], axis=-1), 0, 255).astype(np.uint8)


def _cmyk_to_rgb(cmyk: np.ndarray, adobe: bool) -> np.ndarray:
  """TensorFlow's CMYK -> RGB (jpeg_mem.cc). Pillow has already inverted the
  samples (it assumes Adobe's inverted CMYK), so undo that where TF does not."""
  c, m, y, k = (cmyk[..., i] for i in range(4))
  if adobe:
    rgb = [(255 - x) * (255 - k) // 255 for x in (c, m, y)]
  else:
    rgb = [x * k // 255 for x in (c, m, y)]
  return np.stack(rgb, axis=-1).astype(np.uint8)


# ---------------------------------------------------------------------------
# Eval preprocessing
# ---------------------------------------------------------------------------


def hw(size: int | Sequence[int]) -> tuple[int, int]:
  """An image size as (height, width): an int is square, a pair is (h, w)."""
  if np.ndim(size) == 0:
    return (int(size), int(size))
  h, w = size
  return (int(h), int(w))


def _axis_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """TensorFlow's (lower, upper, lerp) per output pixel (resize_bilinear_op.cc,
  half-pixel centres, float32 arithmetic)."""
  scale = np.float32(in_size) / np.float32(out_size)
  x = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
  floor = np.floor(x)
  lower = np.maximum(floor.astype(np.int64), 0)
  upper = np.minimum(np.ceil(x).astype(np.int64), in_size - 1)
  return lower, upper, (x - floor).astype(np.float32)


def _resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """`tf.image.resize(image, size, 'bilinear')` (no antialiasing): float32 (h, w, C)."""
  image = np.asarray(image, np.float32)
  y0, y1, wy = _axis_weights(image.shape[0], size[0])
  x0, x1, wx = _axis_weights(image.shape[1], size[1])
  wy, wx = wy[:, None, None], wx[None, :, None]
  top, bottom = image[y0], image[y1]
  top = top[:, x0] + (top[:, x1] - top[:, x0]) * wx
  bottom = bottom[:, x0] + (bottom[:, x1] - bottom[:, x0]) * wx
  return top + (bottom - top) * wy


def _to_unit_range(image: np.ndarray) -> np.ndarray:
  return np.asarray(image, np.float32) / np.float32(127.5) - np.float32(1.0)


def eval_preprocess(image: np.ndarray, pp_eval: str, size: int | Sequence[int],
                    crop_fraction: float = CROP_FRACTION) -> np.ndarray:
  """uint8 (H, W, 3) -> float32 (h, w, 3) in [-1, 1], as `preprocess.get_eval_fn`.

  'resize': bilinear resize to `size`. 'resize_crop': resize to
  size / crop_fraction, then the central `size` crop.
  """
  h, w = hw(size)
  if pp_eval == 'resize':
    return _to_unit_range(_resize_bilinear(image, (h, w)))
  if pp_eval == 'resize_crop':
    if not 0.0 < crop_fraction <= 1.0:
      raise ValueError(f'pp.crop_fraction must be in (0, 1], got {crop_fraction}.')
    big = (round(h / crop_fraction), round(w / crop_fraction))
    image = _resize_bilinear(image, big)
    top, left = (big[0] - h) // 2, (big[1] - w) // 2
    return _to_unit_range(image[top:top + h, left:left + w, :])
  raise ValueError(f'Unknown eval preprocessing pp.eval={pp_eval!r}; expected one of {EVAL_PP}.')


def load_images(paths: Sequence[str], pp_eval: str, size: int | Sequence[int],
                crop_fraction: float = CROP_FRACTION, min_side: int | None = None
                ) -> tuple[np.ndarray, list[np.ndarray]]:
  """(float32 (N, h, w, 3) in [-1, 1], the raw uint8 images) for `paths`.

  `min_side=DCT_MIN_SIDE * image_size` decodes large JPEGs as evaluation on a
  folder dataset does (`read_image`); None decodes every file at full size.
  """
  raw = [read_image(p, min_side) for p in paths]
  return eval_batch(raw, pp_eval, size, crop_fraction), raw


def eval_batch(raw: Sequence[np.ndarray], pp_eval: str, size: int | Sequence[int],
               crop_fraction: float = CROP_FRACTION) -> np.ndarray:
  """Raw uint8 images -> float32 (N, h, w, 3) in [-1, 1] (eval_preprocess each)."""
  h, w = hw(size)
  if not raw:
    return np.zeros((0, h, w, 3), np.float32)
  return np.stack([eval_preprocess(image, pp_eval, size, crop_fraction)
                   for image in raw]).astype(np.float32)
