"""ResNet (BiT-style) backbone of the ViT paper's hybrid models (ViT paper §3.1, "Hybrid Architecture").

The hybrid feeds the ViT with the feature map of a ResNet instead of raw pixel
patches. The checkpoints (``R50+ViT-B_16.npz`` and friends) store the ResNet
parameters at the *top level* of the model, next to ``embedding`` and
``Transformer``::

    conv_root/kernel                    (7, 7, 3, 64 * wf)
    gn_root/{scale,bias}                (C,)   [(1, 1, 1, C) in the .npz]
    block{s}/unit{u}/conv{1,2,3}/kernel
    block{s}/unit{u}/gn{1,2,3}/{scale,bias}
    block{s}/unit1/{conv_proj,gn_proj}  (projection shortcut, first unit only)

To get that tree, :func:`backbone` is a plain function that *creates* its
modules: called from inside the ``@nn.compact`` method of the ViT, Flax
registers them under the ViT itself, so the parameter tree is the checkpoint
tree key for key (no nested ``ResNet`` scope to rename on load/save).

Numerics (checked against the independent golden in shared/golden/tiny_hybrid):
weight-standardised convs ``(w - mean) / (std + 1e-5)`` over (H, W, Cin)
(biased std), GroupNorm with 32 groups and eps 1e-6, TF "SAME" padding
everywhere (XLA's "SAME" pads the extra row/column at the bottom/right, as
TensorFlow does), max-pool padded with -inf, non-pre-activation bottleneck units.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

Dtype = Any

# Root width of the BiT ResNets; stage s has width 64 * wf * 2**s, output x4.
ROOT_WIDTH = 64
STDCONV_EPS = 1e-5
GN_GROUPS = 32
GN_EPS = 1e-6


def standardize_weight(kernel: jax.Array, eps: float = STDCONV_EPS) -> jax.Array:
  """Weight standardisation (Qiao et al. 2019), as used by BiT and the hybrids.

  Statistics over (H, W, Cin) per output channel, biased std, eps added to the
  std (not to the variance): this is what the original Flax code does and what
  the checkpoints were trained with.
  """
  axes = tuple(range(kernel.ndim - 1))
  kernel = kernel - jnp.mean(kernel, axis=axes, keepdims=True)
  return kernel / (jnp.std(kernel, axis=axes, keepdims=True) + eps)


class StdConv(nn.Module):
  """Bias-free 2D convolution with a weight-standardised kernel and TF 'SAME' padding."""

  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  dtype: Dtype = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', self.kernel_init,
                        (*self.kernel_size, x.shape[-1], self.features),
                        jnp.float32)
    # Standardise in float32 even for low-precision compute: the statistics of
    # a (H, W, Cin) slab are what the checkpoint expects.
    kernel = standardize_weight(kernel).astype(self.dtype)
    return jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel, window_strides=self.strides,
        padding='SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def group_norm(name: str, zero_scale: bool = False,
               dtype: Dtype = jnp.float32) -> nn.GroupNorm:
  """GroupNorm of the original models: 32 groups, eps 1e-6, params shaped (C,)."""
  return nn.GroupNorm(
      num_groups=GN_GROUPS, epsilon=GN_EPS, dtype=dtype,
      scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones,
      use_fast_variance=False, name=name)


class BottleneckUnit(nn.Module):
  """Non-pre-activation bottleneck: 1x1 -> 3x3 (carries the stride) -> 1x1 (x4).

  The projection shortcut (``conv_proj``/``gn_proj``) exists when the shape
  changes, which in these ResNets is exactly unit 1 of every stage. ``gn3``
  starts with scale 0 so each residual branch starts as the identity.
  """

  features: int
  strides: tuple[int, int] = (1, 1)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    out_features = self.features * 4
    residual = x
    if x.shape[-1] != out_features or self.strides != (1, 1):
      residual = StdConv(out_features, (1, 1), self.strides, dtype=self.dtype,
                         name='conv_proj')(x)
      residual = group_norm('gn_proj', dtype=self.dtype)(residual)

    y = StdConv(self.features, (1, 1), dtype=self.dtype, name='conv1')(x)
    y = nn.relu(group_norm('gn1', dtype=self.dtype)(y))
    y = StdConv(self.features, (3, 3), self.strides, dtype=self.dtype,
                name='conv2')(y)
    y = nn.relu(group_norm('gn2', dtype=self.dtype)(y))
    y = StdConv(out_features, (1, 1), dtype=self.dtype, name='conv3')(y)
    y = group_norm('gn3', zero_scale=True, dtype=self.dtype)(y)
    return nn.relu(residual + y)


class ResNetStage(nn.Module):
  """``num_units`` bottleneck units; the first one downsamples by ``first_stride``."""

  num_units: int
  features: int
  first_stride: tuple[int, int]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for u in range(self.num_units):
      strides = self.first_stride if u == 0 else (1, 1)
      x = BottleneckUnit(self.features, strides, dtype=self.dtype,
                         name=f'unit{u + 1}')(x)
    return x


def backbone(x: jax.Array, num_layers: Sequence[int], width_factor: float = 1,
             dtype: Dtype = jnp.float32) -> jax.Array:
  """Runs the hybrid's ResNet on NHWC images; call it inside a compact method.

  Args:
    x: images (B, H, W, 3).
    num_layers: units per stage, e.g. (3, 4, 9) for R50+ViT-B_16 (stride 16),
      (3, 4, 6, 3) for R50+ViT-L_32, (2, 2, 2, 2) for the R26 hybrids; empty for
      the root only (R+Ti_16: conv + max-pool, stride 4).
    width_factor: multiplies every width (BiT's "x1", "x2", ...).
    dtype: compute dtype.

  Returns:
    The feature map (B, H / stride, W / stride, C): C = 64 * wf without stages,
    else 256 * wf * 2**(len(num_layers) - 1). The stride is 4 * 2**(stages - 1).
  """
  width = int(ROOT_WIDTH * width_factor)
  # Root: 7x7/2 StdConv, GroupNorm, ReLU, 3x3/2 max-pool (padded with -inf).
  x = StdConv(width, (7, 7), (2, 2), dtype=dtype, name='conv_root')(x)
  x = nn.relu(group_norm('gn_root', dtype=dtype)(x))
  x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding='SAME')
  for s, num_units in enumerate(num_layers):
    first_stride = (1, 1) if s == 0 else (2, 2)
    x = ResNetStage(num_units, width * 2**s, first_stride, dtype=dtype,
                    name=f'block{s + 1}')(x)
  return x
