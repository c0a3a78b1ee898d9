"""Patch tokenizers that widen a token's receptive field: SPT (SL-ViT) and RPT (Rot-ViT).

Both build transformed copies of the image, concatenate them with the image
along channels, cut the result into non-overlapping patches, and map each
flattened patch through LayerNorm and a Dense layer to the ViT width:

* **Shifted Patch Tokenization** (Lee et al. 2021, "Vision Transformer for
  Small-Size Datasets", §3.1): the four copies shifted by half a patch in the
  four diagonal directions.
* **Rotated Patch Tokenization** (RPT report §3.2, eq. 4-5): the same four
  shifts plus two rotated copies, clockwise and anticlockwise by an angle drawn
  from U(pi/20, pi/14) — N_R = 6 copies, so the projection matrix W_R is
  (P^2 * C * (N_R + 1)) x d.

Everything is plain JAX inside the module (bilinear resampling for the
rotations), so it is jit-able and runs on accelerators rather than in tf.data.

Randomness: at train time the RPT angles are drawn per example (independently
for the two rotation directions) from the 'rpt' rng stream when the caller
provides one, else from 'dropout' (which every training step already passes).
At evaluation the report gives no angle; we use a fixed ``eval_angle`` that
defaults to the middle of the training range, (pi/20 + pi/14) / 2 ~= 10.7
degrees, so eval tokens look like an average training token (0 would make the
rotated copies duplicates of the input, a distribution the model never saw).
Note: the report's Keras notebook (KuangshiAi/vision_transformer, Rot_ViT.ipynb)
draws the angle with ``np.random`` inside the layer, which TensorFlow evaluates
once at trace time, i.e. one angle for the whole run; per-example angles are
what the text (§3.2.2) describes and what we implement.

Conventions (tested in tests/test_embeddings.py): images are NHWC with rows
going down; ``rotate(x, a)`` turns the picture *clockwise* on screen by ``a``
radians about the image centre (so ``a = pi/2`` equals ``np.rot90(x, -1)``);
``shift(x, dy, dx)`` moves content down by ``dy`` and right by ``dx`` pixels;
pixels that come from outside the image are zero.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Dtype = Any

# RPT report §3.2.2: rotation angles are drawn from U(pi/20, pi/14).
RPT_ANGLE_RANGE = (math.pi / 20, math.pi / 14)
RPT_EVAL_ANGLE = sum(RPT_ANGLE_RANGE) / 2
TOKENIZERS = ('spt', 'rpt')
# The four diagonal directions (dy, dx), in units of the shift.
DIAGONALS = ((-1, -1), (-1, 1), (1, -1), (1, 1))


def shift(x: jax.Array, dy: int, dx: int) -> jax.Array:
  """Translates NHWC images by (dy, dx) pixels: out[i, j] = x[i - dy, j - dx], 0 outside."""
  _, h, w, _ = x.shape
  if abs(dy) >= h or abs(dx) >= w:
    raise ValueError(f'shift ({dy}, {dx}) is not smaller than the image {h}x{w}.')
  padded = jnp.pad(x, ((0, 0), (abs(dy), abs(dy)), (abs(dx), abs(dx)), (0, 0)))
  top, left = abs(dy) - dy, abs(dx) - dx
  return padded[:, top:top + h, left:left + w, :]


def diagonal_shifts(x: jax.Array, amount: int | tuple[int, int]) -> list[jax.Array]:
  """The four copies shifted by ``amount`` pixels along each diagonal (Lee et al. §3.1).

  ``amount`` is one int, or (rows, cols) for non-square patches.
  """
  ay, ax = (amount, amount) if isinstance(amount, int) else amount
  return [shift(x, sy * ay, sx * ax) for sy, sx in DIAGONALS]


def rotate(x: jax.Array, angle: jax.Array | float) -> jax.Array:
  """Rotates NHWC images clockwise by ``angle`` radians about their centre.

  Bilinear resampling; samples falling outside the image read zeros, so the
  rotated image is cropped to the input size with black corners (RPT report
  §3.2.2: "the rotated images are cropped to the same size as the input").

  Args:
    x: (B, H, W, C) images.
    angle: a scalar, or one angle per example, shape (B,).
  """
  b, h, w, _ = x.shape
  angle = jnp.broadcast_to(jnp.asarray(angle, jnp.float32), (b,))
  cos, sin = jnp.cos(angle)[:, None, None], jnp.sin(angle)[:, None, None]
  cy, cx = (h - 1) / 2, (w - 1) / 2
  rows, cols = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) - cy,
                            jnp.arange(w, dtype=jnp.float32) - cx, indexing='ij')
  # Output pixel p takes the input at R(-angle) p: with y pointing down, a
  # clockwise turn maps (dx, dy) -> (dx cos - dy sin, dx sin + dy cos).
  src_x = cos * cols + sin * rows + cx
  src_y = -sin * cols + cos * rows + cy
  return _bilinear(x, src_y, src_x)


def _bilinear(x: jax.Array, y: jax.Array, xs: jax.Array) -> jax.Array:
  """Samples x (B, H, W, C) at float coords y, xs (B, H', W'); zero outside."""
  b, h, w, c = x.shape
  y0, x0 = jnp.floor(y), jnp.floor(xs)
  wy, wx = y - y0, xs - x0
  flat = x.reshape(b, h * w, c)
  out = 0.
  for oy, ox, weight in ((0, 0, (1 - wy) * (1 - wx)), (0, 1, (1 - wy) * wx),
                         (1, 0, wy * (1 - wx)), (1, 1, wy * wx)):
    yi, xi = (y0 + oy).astype(jnp.int32), (x0 + ox).astype(jnp.int32)
    inside = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
    idx = (jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)).reshape(b, -1, 1)
    vals = jnp.take_along_axis(flat, idx, axis=1).reshape(*y.shape, c)
    out = out + vals * jnp.where(inside, weight, 0.)[..., None].astype(x.dtype)
  return out


def rpt_copies(x: jax.Array, angles_cw: jax.Array | float,
               angles_acw: jax.Array | float,
               shift_amount: int | tuple[int, int]) -> list[jax.Array]:
  """The N_R = 6 transformed copies R^1..R^6 of RPT (report eq. 4), input excluded.

  Order: four diagonal half-patch shifts, then the clockwise and the
  anticlockwise rotation. ``angles_*`` are non-negative magnitudes.
  """
  return diagonal_shifts(x, shift_amount) + [
      rotate(x, angles_cw), rotate(x, -jnp.asarray(angles_acw))]


def patchify(x: jax.Array, patch_size: tuple[int, int]) -> jax.Array:
  """(B, H, W, C) -> (B, H/ph, W/pw, ph*pw*C), flattening each patch row-major.

  The (ph, pw, C) order is the layout of a patch-embedding conv kernel, so a
  Dense on these vectors equals the usual strided conv.
  """
  b, h, w, c = x.shape
  ph, pw = patch_size
  if h % ph or w % pw:
    raise ValueError(f'image {h}x{w} is not divisible into {ph}x{pw} patches.')
  x = x.reshape(b, h // ph, ph, w // pw, pw, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // ph, w // pw, ph * pw * c)


class PatchTokenizer(nn.Module):
  """Transformed copies -> concat -> patchify -> LayerNorm -> Dense (SPT / RPT).

  Attributes:
    kind: 'spt' (four diagonal shifts) or 'rpt' (shifts + two rotations).
    patch_size: (ph, pw).
    hidden_size: output width d.
    shift: shift in pixels; None = half a patch per axis (ph // 2, pw // 2), as both papers.
    angle_range: (low, high) of the training angle distribution, radians.
    eval_angle: the fixed angle used when not training, radians.
  """

  kind: str
  patch_size: tuple[int, int]
  hidden_size: int
  shift: int | None = None
  angle_range: tuple[float, float] = RPT_ANGLE_RANGE
  eval_angle: float = RPT_EVAL_ANGLE
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    if self.kind not in TOKENIZERS:
      raise ValueError(f'tokenizer type must be one of {TOKENIZERS}, got {self.kind!r}')
    if self.shift is None:  # half a patch along each axis (both papers)
      amount = (self.patch_size[0] // 2, self.patch_size[1] // 2)
    else:
      amount = int(self.shift)
    copies = self.transformed_copies(x, amount, train)
    # RPT eq. (4): [X R^1 ... R^{N_R}] along channels, patchify, LN, W_R.
    x = jnp.concatenate([x] + copies, axis=-1)
    x = patchify(x, self.patch_size)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='norm')(x)
    return nn.Dense(self.hidden_size, dtype=self.dtype, name='proj')(x)

  def transformed_copies(self, x: jax.Array, amount: int | tuple[int, int],
                         train: bool) -> list[jax.Array]:
    if self.kind == 'spt':
      return diagonal_shifts(x, amount)
    if train:
      rng = self.make_rng('rpt' if self.has_rng('rpt') else 'dropout')
      low, high = self.angle_range
      angles = jax.random.uniform(rng, (2, x.shape[0]), minval=low, maxval=high)
      self.sow('intermediates', 'rpt_angles', angles)  # (clockwise, anticlockwise) x B
      return rpt_copies(x, angles[0], angles[1], amount)
    return rpt_copies(x, self.eval_angle, self.eval_angle, amount)


def tokenize(x: jax.Array, config: Any, *, patch_size: tuple[int, int],
             hidden_size: int, train: bool, dtype: Dtype = jnp.float32) -> jax.Array:
  """Runs the tokenizer described by ``config``; call inside a compact method.

  ``config`` is a dict/ConfigDict with ``type`` ('spt' | 'rpt') and optional
  ``shift``, ``angle_range``, ``eval_angle``. The module is named
  ``embedding`` (params ``embedding/norm``, ``embedding/proj``), taking the
  place of the patch-embedding conv. Returns (B, H/ph, W/pw, hidden_size).
  """
  cfg = dict(config.to_dict() if hasattr(config, 'to_dict') else config)
  kind = cfg.pop('type', None)
  unknown = set(cfg) - {'shift', 'angle_range', 'eval_angle'}
  if unknown:
    raise ValueError(f'unknown tokenizer options {sorted(unknown)}; '
                     'expected type, shift, angle_range, eval_angle.')
  if 'angle_range' in cfg:
    cfg['angle_range'] = tuple(float(a) for a in cfg['angle_range'])
  return PatchTokenizer(kind=kind, patch_size=tuple(patch_size), hidden_size=hidden_size,
                        dtype=dtype, name='embedding', **cfg)(x, train=train)


def num_tokenizer_params(kind: str, patch_size: tuple[int, int], channels: int,
                         hidden_size: int) -> int:
  """Parameter count of a tokenizer (LN over the patch vector + Dense), for docs/tests."""
  copies = {'spt': 4, 'rpt': 6}[kind]
  dim = int(np.prod(patch_size)) * channels * (copies + 1)
  return 2 * dim + dim * hidden_size + hidden_size
