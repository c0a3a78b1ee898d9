"""Masked patch prediction: the ViT paper's self-supervised pre-training.

Paper §4.6 and App. B.1.2: corrupt 50% of the patch embeddings, of those 80%
replaced by a learnable [mask] embedding, 10% by a random other patch
embedding and 10% kept as they are (BERT's recipe); then predict, from each
corrupted patch's output token through the head, one of three targets:

* ``color3bit`` (default): the 3-bit mean colour of the patch, 512 classes.
  The paper reports only this option because it gave the best few-shot
  results (all three "worked quite well, though L2 was slightly worse").
* ``subpatch3bit``: the 3-bit mean colours of the 4x4 grid of sub-patches
  (a downsized patch), 16 predictions of 512 classes.
* ``pixels``: L2 regression of the patch's pixels (ph * pw * 3 values in
  [-1, 1]).

3-bit colour: each channel's mean in 8-bit units (0..255, from the model's
[-1, 1] inputs) keeps its top 3 bits, ``floor(mean / 32)``; the class is
``64 r + 8 g + b``.

The model is the plain VisionTransformer with per-token outputs
(``classifier='token_unpooled'``) and ``num_classes = num_outputs(...)``, so
its parameter tree is the official one plus the top-level ``mask_embedding``
(created when the model is called with ``corruption=``). `export_params`
(applied by every export, vit_jax/export.py) drops that: the exported encoder loads into any fine-tuning config, whose
``load_pretrained`` replaces the MPP head like any other head.

The training loop (vit_jax/train.py) uses this module through
`MaskedPatchPrediction`, an objective: `loss` replaces the classification
loss and `eval_sums` the accuracy on labels, in the one loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models.embeddings import patchify

TARGETS = ('color3bit', 'subpatch3bit', 'pixels')
DEFAULTS = {'target': 'color3bit', 'corruption_rate': 0.5, 'mask_prob': 0.8,
            'random_prob': 0.1}
NUM_COLORS = 512  # 3 bits per channel
SUBPATCH_GRID = 4  # 4 x 4 = 16 sub-patch predictions


# ---------------------------------------------------------------------------
# Corruption (App. B.1.2).
# ---------------------------------------------------------------------------

def corrupt(rng: jax.Array, batch_size: int, num_patches: int, rate: float = 0.5,
            mask_prob: float = 0.8, random_prob: float = 0.1) -> dict[str, jax.Array]:
  """Draws which patch embeddings to corrupt and how.

  Exactly ``round(rate * num_patches)`` patches per image are corrupted,
  chosen uniformly; each of them independently is masked (``mask_prob``),
  replaced by a random other patch embedding of the batch (``random_prob``;
  uniform over the other B*N - 1) or kept. Returns (B, N) arrays:
  ``corrupted`` (bool, the patches the loss is on), ``masked`` (bool) and
  ``source`` (int32: flat index into the batch's B*N patch embeddings that
  each position reads; its own index unless replaced).
  """
  if not 0 < rate <= 1 or mask_prob < 0 or random_prob < 0 or mask_prob + random_prob > 1:
    raise ValueError(f'MPP corruption needs 0 < rate <= 1 and mask_prob + random_prob <= 1, '
                     f'got rate={rate}, mask_prob={mask_prob}, random_prob={random_prob}.')
  k_pick, k_kind, k_src = jax.random.split(rng, 3)
  b, n = batch_size, num_patches
  num = max(1, int(round(rate * n)))
  ranks = jnp.argsort(jnp.argsort(jax.random.uniform(k_pick, (b, n)), axis=1), axis=1)
  corrupted = ranks < num
  u = jax.random.uniform(k_kind, (b, n))
  masked = corrupted & (u < mask_prob)
  replaced = corrupted & (u >= mask_prob) & (u < mask_prob + random_prob)
  own = jnp.arange(b * n, dtype=jnp.int32).reshape(b, n)
  other = jax.random.randint(k_src, (b, n), 0, max(b * n - 1, 1), dtype=jnp.int32)
  other = other + (other >= own)  # Skip the patch itself: uniform over the others.
  source = jnp.where(replaced & (b * n > 1), other, own)
  return {'corrupted': corrupted, 'masked': masked, 'source': source}


def no_corruption(batch_size: int, num_patches: int) -> dict[str, jax.Array]:
  """The identity corruption (for init and for checks)."""
  zeros = jnp.zeros((batch_size, num_patches), bool)
  return {'corrupted': zeros, 'masked': zeros,
          'source': jnp.arange(batch_size * num_patches, dtype=jnp.int32).reshape(
              batch_size, num_patches)}


def apply_corruption(tokens: jax.Array, corruption: Mapping[str, jax.Array],
                     mask_embedding: jax.Array) -> jax.Array:
  """(B, N, D) patch embeddings -> corrupted ones (called inside the model)."""
  b, n, d = tokens.shape
  x = jnp.take(tokens.reshape(b * n, d), corruption['source'].reshape(-1), axis=0)
  x = x.reshape(b, n, d)
  return jnp.where(corruption['masked'][..., None], mask_embedding.astype(x.dtype), x)


# ---------------------------------------------------------------------------
# Targets.
# ---------------------------------------------------------------------------

def color3bit(mean: jax.Array) -> jax.Array:
  """(..., 3) mean colours in [-1, 1] -> (...) class in [0, 512).

  1e-4 grey levels absorb float32 rounding, so that a solid 64 (stored as
  64 / 127.5 - 1) falls into level 2 as it should, not 1; the true means of
  8-bit pixels over a patch of up to 100x100 are never that close below a
  level boundary.
  """
  levels = jnp.floor(((mean + 1.) * 127.5 + 1e-4) / 32.)
  levels = jnp.clip(levels, 0, 7).astype(jnp.int32)
  return levels[..., 0] * 64 + levels[..., 1] * 8 + levels[..., 2]


def _patches(images: jax.Array, patch_size: tuple[int, int]) -> jax.Array:
  """(B, H, W, 3) -> (B, N, ph, pw, 3), raster order (the model's token order)."""
  ph, pw = patch_size
  p = patchify(images.astype(jnp.float32), (ph, pw))
  b, gh, gw, _ = p.shape
  return p.reshape(b, gh * gw, ph, pw, images.shape[-1])


def targets(images: jax.Array, patch_size: tuple[int, int], target: str) -> jax.Array:
  """Per-patch targets: (B, N) for color3bit, (B, N, 16) for subpatch3bit,
  (B, N, ph*pw*3) floats for pixels."""
  p = _patches(images, patch_size)
  if target == 'color3bit':
    return color3bit(p.mean(axis=(2, 3)))
  if target == 'subpatch3bit':
    b, n, ph, pw, c = p.shape
    g = SUBPATCH_GRID
    sub = p.reshape(b, n, g, ph // g, g, pw // g, c).mean(axis=(3, 5))  # (B, N, 4, 4, 3)
    return color3bit(sub).reshape(b, n, g * g)
  if target == 'pixels':
    return p.reshape(p.shape[0], p.shape[1], -1)
  raise ValueError(f'mpp.target must be one of {TARGETS}, got {target!r}.')


def num_outputs(target: str, patch_size: tuple[int, int], channels: int = 3) -> int:
  """Width of the MPP head for a target."""
  return {'color3bit': NUM_COLORS, 'subpatch3bit': SUBPATCH_GRID ** 2 * NUM_COLORS,
          'pixels': int(np.prod(patch_size)) * channels}[target]


# ---------------------------------------------------------------------------
# The objective used by the training loop.
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MaskedPatchPrediction:
  """Loss and eval of masked patch prediction for the one training loop."""
  patch_size: tuple[int, int]
  target: str = 'color3bit'
  corruption_rate: float = 0.5
  mask_prob: float = 0.8
  random_prob: float = 0.1

  @property
  def num_outputs(self) -> int:
    return num_outputs(self.target, self.patch_size)

  def init_kwargs(self, image_size: int) -> dict[str, Any]:
    """Extra model.init arguments, so that `mask_embedding` is created."""
    n = (image_size // self.patch_size[0]) * (image_size // self.patch_size[1])
    return {'corruption': no_corruption(1, n)}

  def _outputs(self, model, variables, images, rng, train):
    b = images.shape[0]
    n = (images.shape[1] // self.patch_size[0]) * (images.shape[2] // self.patch_size[1])
    corruption = corrupt(rng, b, n, self.corruption_rate, self.mask_prob, self.random_prob)
    kwargs = {'rngs': {'dropout': rng}} if train else {}
    out = model.apply(variables, images, train=train, corruption=corruption, **kwargs)
    if out.ndim != 3 or out.shape[1] < n:
      raise ValueError('masked patch prediction needs per-token outputs: set '
                       "config.model.classifier='token_unpooled' (or 'unpooled').")
    return out[:, out.shape[1] - n:], corruption['corrupted']  # Drop the class token.

  def _per_patch(self, out, images):
    """(loss, correct) per patch, (B, N) each."""
    tgt = targets(images, self.patch_size, self.target)
    out = out.astype(jnp.float32)
    if self.target == 'pixels':
      loss = jnp.mean((out - tgt) ** 2, axis=-1)
      pred = color3bit(out.reshape(*out.shape[:2], -1, 3).mean(axis=2))
      correct = pred == color3bit(tgt.reshape(*tgt.shape[:2], -1, 3).mean(axis=2))
      return loss, correct.astype(jnp.float32)
    if self.target == 'subpatch3bit':
      out = out.reshape(*out.shape[:2], SUBPATCH_GRID ** 2, NUM_COLORS)
    logp = jax.nn.log_softmax(out, axis=-1)
    loss = -jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(out, -1) == tgt).astype(jnp.float32)
    if self.target == 'subpatch3bit':
      loss, correct = loss.mean(-1), correct.mean(-1)
    return loss, correct

  def loss(self, model, variables, batch, rng) -> jax.Array:
    """Per-example mean loss over the corrupted patches, (B,)."""
    out, corrupted = self._outputs(model, variables, batch['image'], rng, train=True)
    loss, _ = self._per_patch(out, batch['image'])
    w = corrupted.astype(jnp.float32)
    return jnp.sum(loss * w, -1) / jnp.sum(w, -1)

  def eval_sums(self, model, variables, batch) -> dict[str, jax.Array]:
    """Masked sums over examples of the per-image MPP accuracy and loss.

    The corruption is drawn from a fixed key, so every eval of a checkpoint
    gives the same number.
    """
    out, corrupted = self._outputs(model, variables, batch['image'],
                                   jax.random.PRNGKey(0), train=False)
    loss, correct = self._per_patch(out, batch['image'])
    w = corrupted.astype(jnp.float32)
    per_image_loss = jnp.sum(loss * w, -1) / jnp.sum(w, -1)
    per_image_acc = jnp.sum(correct * w, -1) / jnp.sum(w, -1)
    mask = batch['mask']
    return {'correct': jnp.sum(per_image_acc * mask), 'loss': jnp.sum(per_image_loss * mask),
            'count': jnp.sum(mask)}



def export_params(params: Mapping[str, Any]) -> dict[str, Any]:
  """The encoder and head in the official layout: `mask_embedding` dropped.

  vit_jax.export applies it to every export, so an MPP run's file loads into
  any fine-tuning config; other models have no such key.
  """
  return {k: v for k, v in params.items() if k != 'mask_embedding'}


def from_config(config: Any, patch_size: tuple[int, int]) -> MaskedPatchPrediction | None:
  """`config.mpp` (None: supervised) -> the objective, with clear errors."""
  cfg = config.get('mpp') if hasattr(config, 'get') else None
  if cfg is None:
    return None
  cfg = dict(cfg.to_dict() if hasattr(cfg, 'to_dict') else cfg)
  unknown = set(cfg) - set(DEFAULTS)
  if unknown:
    raise ValueError(f'unknown config.mpp keys {sorted(unknown)}; expected {sorted(DEFAULTS)}.')
  cfg = {**DEFAULTS, **cfg}
  if cfg['target'] not in TARGETS:
    raise ValueError(f'config.mpp.target must be one of {TARGETS}, got {cfg["target"]!r}.')
  if cfg['target'] == 'subpatch3bit' and (patch_size[0] % SUBPATCH_GRID or
                                          patch_size[1] % SUBPATCH_GRID):
    raise ValueError(f'config.mpp.target=subpatch3bit splits each patch into 4x4 '
                     f'sub-patches: the patch size {patch_size} must be divisible by 4.')
  return MaskedPatchPrediction(patch_size=tuple(patch_size), **cfg)
