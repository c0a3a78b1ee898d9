"""ResNet-56 for CIFAR (He et al. 2016, "Deep Residual Learning", §4.2): the RPT report's CNN baseline.

The CIFAR ResNets are 6n + 2 layers deep: a 3x3 conv with 16 filters, then
three stages of n basic blocks (two 3x3 convs each) with 16, 32 and 64
filters, the 2nd and 3rd starting with stride 2, then global average pooling
and a Dense head. n = 9 gives ResNet-56.

Shortcuts use He et al.'s option A (identity; when the shape changes, take
every other pixel and zero-pad the new channels), which adds no parameters:
that is the 0.85M-parameter model of their Table 6 (the report's Table 1 says
0.8M). BatchNorm statistics live in the mutable 'batch_stats' collection:

    variables = model.init(rng, x, train=False)
    logits, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])

The model sows 'pre_logits' (the pooled 64-d features) into 'intermediates',
like the ViT, so the few-shot evaluator can probe it too.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

Dtype = Any


class BasicBlock(nn.Module):
  """conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU."""

  features: int
  strides: int = 1
  bn_momentum: float = 0.9
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    def conv(s: int, name: str) -> nn.Conv:
      return nn.Conv(self.features, (3, 3), (s, s), padding=((1, 1), (1, 1)),
                     use_bias=False, kernel_init=nn.initializers.he_normal(),
                     dtype=self.dtype, name=name)

    def norm(name: str) -> nn.BatchNorm:
      return nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                          epsilon=1e-5, dtype=self.dtype, name=name)

    y = nn.relu(norm('bn1')(conv(self.strides, 'conv1')(x)))
    y = norm('bn2')(conv(1, 'conv2')(y))
    residual = x
    if self.strides != 1 or x.shape[-1] != self.features:
      # Option A shortcut: subsample, then zero-pad the extra channels.
      residual = x[:, ::self.strides, ::self.strides, :]
      extra = self.features - x.shape[-1]
      residual = jnp.pad(residual, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    return nn.relu(residual + y)


class ResNetCifar(nn.Module):
  """ResNet-(6n+2) for 32x32-ish inputs; ``blocks_per_stage=9`` is ResNet-56.

  Attributes:
    num_classes: head size; None returns the pooled features.
    blocks_per_stage: n.
    widths: filters of the three stages.
  """

  num_classes: int | None
  blocks_per_stage: int = 9
  widths: tuple[int, ...] = (16, 32, 64)
  bn_momentum: float = 0.9
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    if x.ndim != 4:
      raise ValueError(f'expected NHWC images, got shape {x.shape}')
    x = nn.Conv(self.widths[0], (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                kernel_init=nn.initializers.he_normal(), dtype=self.dtype, name='conv_init')(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                     epsilon=1e-5, dtype=self.dtype, name='bn_init')(x)
    x = nn.relu(x)
    for s, width in enumerate(self.widths):
      for b in range(self.blocks_per_stage):
        strides = 2 if (s > 0 and b == 0) else 1
        x = BasicBlock(width, strides, self.bn_momentum, self.dtype,
                       name=f'stage{s + 1}_block{b + 1}')(x, train=train)
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    self.sow('intermediates', 'pre_logits', x)
    if not self.num_classes:
      return x
    return nn.Dense(self.num_classes, name='head')(x)
