"""Looking inside a ViT: the analyses of the paper's §4.5 and Appendix D.7-D.8.

* :func:`attention_rollout` / :func:`rollout_map` - attention from the output
  token to the input (Fig. 6, App. D.8; Abnar & Zuidema 2020).
* :func:`mean_attention_distance` - the "receptive field size" of every head
  in every layer (Fig. 7 right, Fig. 11, App. D.7).
* :func:`posemb_similarity` - cosine similarity of position embeddings
  (Fig. 7 centre).
* :func:`embedding_filter_pcs` - principal components of the patch-embedding
  filters (Fig. 7 left).

The math is numpy on arrays (so it is testable on analytic cases); the plot_*
functions draw one PNG each with matplotlib, and ``python -m vit_jax.analysis``
runs all of them on a checkpoint and some images::

  python -m vit_jax.analysis --checkpoint=ViT-B_16.npz --model=ViT-B_16 \\
      --out_dir=figs img1.jpg img2.jpg
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np


class AnalysisError(ValueError):
  """Bad input to an analysis (shapes, token counts, missing parameters)."""


# ---------------------------------------------------------------------------
# Attention rollout (App. D.8)
# ---------------------------------------------------------------------------


def _as_bhtt(a: Any) -> np.ndarray:
  a = np.asarray(a, np.float64)
  if a.ndim == 3:  # (heads, T, T): one image
    a = a[None]
  if a.ndim != 4 or a.shape[-1] != a.shape[-2]:
    raise AnalysisError(
        f'Attention weights must be (batch, heads, T, T) or (heads, T, T), got {a.shape}.')
  return a


def attention_rollout(attentions: Sequence[Any], add_residual: bool = True) -> np.ndarray:
  """Attention rollout (B, T, T): how much each token at the top draws on each input token.

  Paper App. D.8: average the attention weights over heads, then multiply the
  per-layer matrices through all layers. As in Abnar & Zuidema, the residual
  connection is accounted for by adding the identity and renormalising rows,
  i.e. each layer contributes ``(A + I) / 2``. ``attentions`` is a list over
  layers (first layer first) of (B, heads, T, T) or (heads, T, T) arrays.
  """
  if not len(attentions):
    raise AnalysisError('attention_rollout needs the attention weights of at least one layer.')
  rollout = None
  for a in attentions:
    a = _as_bhtt(a).mean(axis=1)  # (B, T, T), average heads
    if add_residual:
      a = a + np.eye(a.shape[-1])[None]
      a = a / a.sum(axis=-1, keepdims=True)
    if rollout is not None and rollout.shape != a.shape:
      raise AnalysisError(f'Layers disagree in shape: {rollout.shape} vs {a.shape}.')
    # Token i at layer l mixes tokens j of layer l-1: R_l = A_l R_{l-1}.
    rollout = a if rollout is None else a @ rollout
  return rollout


def rollout_map(rollout: np.ndarray, grid: tuple[int, int],
                num_prefix_tokens: int = 1) -> np.ndarray:
  """The rollout as a (B, gh, gw) map over the patch grid, normalised to max 1.

  With a class token the output is the class token's row; without one
  (classifier 'gap') the output is the mean over tokens, so the map is the
  mean of all rows. Prefix tokens (class/distillation) are dropped as keys.
  """
  rollout = np.asarray(rollout)
  if rollout.ndim == 2:
    rollout = rollout[None]
  gh, gw = grid
  t = rollout.shape[-1]
  if t != num_prefix_tokens + gh * gw:
    raise AnalysisError(
        f'Rollout has {t} tokens but grid {gh}x{gw} plus {num_prefix_tokens} prefix '
        f'token(s) makes {num_prefix_tokens + gh * gw}.')
  rows = rollout[:, 0] if num_prefix_tokens else rollout.mean(axis=1)
  m = rows[:, num_prefix_tokens:].reshape(-1, gh, gw)
  return m / np.maximum(m.max(axis=(1, 2), keepdims=True), 1e-12)


# ---------------------------------------------------------------------------
# Mean attention distance (App. D.7, Fig. 11)
# ---------------------------------------------------------------------------


def token_distances(grid: tuple[int, int], pixels_per_token: float | tuple[float, float]
                    ) -> np.ndarray:
  """Euclidean distance in pixels between the centres of every pair of patches."""
  gh, gw = grid
  py, px = (pixels_per_token, pixels_per_token) if np.isscalar(pixels_per_token) \
      else pixels_per_token
  yy, xx = np.meshgrid(np.arange(gh) * py, np.arange(gw) * px, indexing='ij')
  pos = np.stack([yy.ravel(), xx.ravel()], axis=1)
  return np.sqrt(((pos[:, None, :] - pos[None, :, :]) ** 2).sum(-1))


def mean_attention_distance(attention: Any, grid: tuple[int, int],
                            pixels_per_token: float | tuple[float, float],
                            num_prefix_tokens: int = 1) -> np.ndarray:
  """Mean attention distance in pixels per head, averaged over images and queries.

  Paper App. D.7 / Fig. 11: "averaging the distance between the query pixel
  and all other pixels, weighted by the attention weight". Queries and keys are
  the patch tokens; the class token has no position, so it is dropped as a
  query and as a key, and each query's weights over the patches are
  renormalised to sum to 1. ``attention`` is (B, heads, T, T) or (heads, T, T);
  returns (heads,).
  """
  a = _as_bhtt(attention)
  gh, gw = grid
  n = gh * gw
  if a.shape[-1] != num_prefix_tokens + n:
    raise AnalysisError(
        f'Attention has {a.shape[-1]} tokens but grid {gh}x{gw} plus '
        f'{num_prefix_tokens} prefix token(s) makes {num_prefix_tokens + n}.')
  a = a[..., num_prefix_tokens:, num_prefix_tokens:]
  a = a / np.maximum(a.sum(axis=-1, keepdims=True), 1e-12)
  dist = token_distances(grid, pixels_per_token)
  per_query = (a * dist[None, None]).sum(axis=-1)  # (B, heads, N)
  return per_query.mean(axis=(0, 2))


def attention_distances(attentions: Sequence[Any], grid: tuple[int, int],
                        pixels_per_token: float | tuple[float, float],
                        num_prefix_tokens: int = 1) -> np.ndarray:
  """(layers, heads) mean attention distances, the data of Fig. 7 (right)."""
  return np.stack([mean_attention_distance(a, grid, pixels_per_token, num_prefix_tokens)
                   for a in attentions])


# ---------------------------------------------------------------------------
# Position-embedding similarity (Fig. 7 centre) and filter PCs (Fig. 7 left)
# ---------------------------------------------------------------------------


def posemb_similarity(posemb: Any, grid: tuple[int, int]) -> np.ndarray:
  """Cosine similarity of every patch's position embedding with every other's.

  ``posemb`` is (1, T, D) or (T, D); prefix rows (class token) are detected
  from ``T - gh * gw`` and dropped. Returns (gh, gw, gh, gw): entry
  [i, j, :, :] is the map of Fig. 7 (centre) for the patch at row i, column j.
  """
  p = np.asarray(posemb, np.float64)
  if p.ndim == 3:
    p = p[0]
  if p.ndim != 2:
    raise AnalysisError(f'Position embeddings must be (1, T, D) or (T, D), got {np.shape(posemb)}.')
  gh, gw = grid
  extra = p.shape[0] - gh * gw
  if extra < 0:
    raise AnalysisError(f'{p.shape[0]} position embeddings cannot cover a {gh}x{gw} grid.')
  p = p[extra:]
  p = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
  return (p @ p.T).reshape(gh, gw, gh, gw)


def infer_grid(num_tokens: int, num_prefix_tokens: int | None = None) -> tuple[tuple[int, int], int]:
  """(grid, prefix) for square grids from a token count, e.g. 197 -> ((14, 14), 1)."""
  prefixes = [num_prefix_tokens] if num_prefix_tokens is not None else [1, 0, 2]
  for k in prefixes:
    g = int(round(np.sqrt(num_tokens - k)))
    if g > 0 and g * g == num_tokens - k:
      return (g, g), k
  raise AnalysisError(f'Cannot infer a square patch grid from {num_tokens} tokens; pass grid=.')


def embedding_filter_pcs(kernel: Any, num_components: int = 28
                         ) -> tuple[np.ndarray, np.ndarray]:
  """Top principal components of the patch-embedding filters (Fig. 7 left).

  The embedding is a conv kernel (ph, pw, C, D): D filters, each a (ph, pw, C)
  image patch. We centre the D filters and take the right singular vectors of
  the (D, ph*pw*C) matrix. Returns (components (k, ph, pw, C), explained
  variance ratio (k,)).
  """
  k = np.asarray(kernel, np.float64)
  if k.ndim != 4:
    raise AnalysisError(f'Embedding kernel must be (ph, pw, C, D), got {k.shape}.')
  ph, pw, c, d = k.shape
  f = k.reshape(ph * pw * c, d).T  # (D, ph*pw*C): one row per filter
  f = f - f.mean(axis=0, keepdims=True)
  _, s, vt = np.linalg.svd(f, full_matrices=False)
  var = s**2
  num = min(num_components, vt.shape[0])
  ratio = var[:num] / max(var.sum(), 1e-300)
  return vt[:num].reshape(num, ph, pw, c), ratio
