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
  python -m vit_jax.analysis --workdir=/tmp/run --out_dir=figs photos/   # a training run

It writes attention_rollout.png (first --max_rollout_images images),
attention_distance.png (mean over all images; the paper used 128),
posemb_similarity.png, embedding_filters_pca.png and analysis.npz (the numbers).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import flags

from vit_jax import cli


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
    g = round(np.sqrt(num_tokens - k))
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


# ---------------------------------------------------------------------------
# Figures (matplotlib, Agg backend: files only, no display needed)
# ---------------------------------------------------------------------------


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def upsample_map(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bilinear resize of a (gh, gw) map to the image size (h, w)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  h, w = size
  return np.asarray(Image.fromarray(np.asarray(m, np.float32), mode='F').resize(
      (w, h), Image.BILINEAR))


def plot_rollout(images: Sequence[np.ndarray], maps: Sequence[np.ndarray], path: str,
                 titles: Sequence[str] | None = None) -> str:
  """Fig. 6: per image, the input, the rollout heat map over it, and input x map."""
  plt = _pyplot()
  n = len(images)
  fig, axes = plt.subplots(n, 3, figsize=(9, 3.1 * n), squeeze=False)
  for i, (image, m) in enumerate(zip(images, maps)):
    image = np.asarray(image)
    image = image / 255.0 if image.dtype == np.uint8 else (image + 1) / 2  # uint8 or [-1, 1]
    image = np.clip(image, 0, 1)
    mask = upsample_map(m / max(float(np.max(m)), 1e-12), image.shape[:2])
    axes[i, 0].imshow(image)
    axes[i, 0].set_title(titles[i] if titles else 'input', fontsize=9)
    axes[i, 1].imshow(image)
    axes[i, 1].imshow(mask, cmap='jet', alpha=0.5, vmin=0, vmax=1)
    axes[i, 1].set_title('attention rollout', fontsize=9)
    axes[i, 2].imshow(image * mask[..., None])
    axes[i, 2].set_title('input x rollout (paper Fig. 6)', fontsize=9)
    for ax in axes[i]:
      ax.axis('off')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def plot_attention_distance(distances: np.ndarray, path: str, image_size: int | None = None,
                            title: str = '', uniform: float | None = None) -> str:
  """Fig. 7 (right) / Fig. 11: one dot per head, layers along x.

  ``uniform`` (the distance of uniform attention over the patches) is drawn as
  a dashed line: heads well below it attend locally.
  """
  plt = _pyplot()
  d = np.asarray(distances)
  layers, heads = d.shape
  fig, ax = plt.subplots(figsize=(5.5, 4))
  cmap = plt.get_cmap('tab20' if heads > 10 else 'tab10')
  for h in range(heads):
    ax.scatter(np.arange(1, layers + 1), d[:, h], s=14, color=cmap(h % cmap.N),
               label=f'head {h + 1}')
  if uniform is not None:
    ax.axhline(uniform, ls='--', lw=1, color='gray', label='uniform attention')
  ax.set_xlabel('Network depth (layer)')
  ax.set_ylabel('Mean attention distance (pixels)')
  top = max(float(d.max()) if d.size else 1.0, uniform or 0.0) * 1.1
  if image_size:
    top = max(top, image_size / 2)
  ax.set_ylim(0, top)
  ax.set_xlim(0.5, layers + 0.5)
  ax.set_xticks(np.arange(1, layers + 1, max(1, layers // 12)))
  ax.set_title(title or (f'image width {image_size} px' if image_size else ''), fontsize=9)
  if heads <= 16:
    ax.legend(fontsize=6, ncol=2, loc='lower right', frameon=True, framealpha=0.8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def similarity_mosaic(sim: np.ndarray) -> np.ndarray:
  """Tiles the (gh, gw) similarity maps of all patches into one image, NaN gaps."""
  gh, gw = sim.shape[:2]
  out = np.full((gh * (gh + 1) - 1, gw * (gw + 1) - 1), np.nan)
  for i in range(gh):
    for j in range(gw):
      out[i * (gh + 1):i * (gh + 1) + gh, j * (gw + 1):j * (gw + 1) + gw] = sim[i, j]
  return out


def plot_posemb_similarity(sim: np.ndarray, path: str, title: str = '') -> str:
  """Fig. 7 (centre): tile (i, j) is the similarity of patch (i, j)'s embedding to all."""
  plt = _pyplot()
  gh, gw = sim.shape[:2]
  mosaic = similarity_mosaic(sim)
  fig, ax = plt.subplots(figsize=(6.5, 6))
  cmap = plt.get_cmap('viridis').with_extremes(bad='white')
  im = ax.imshow(mosaic, cmap=cmap, vmin=-1, vmax=1, interpolation='nearest')
  ax.set_xticks([j * (gw + 1) + (gw - 1) / 2 for j in range(gw)], [str(j + 1) for j in range(gw)],
                fontsize=6)
  ax.set_yticks([i * (gh + 1) + (gh - 1) / 2 for i in range(gh)], [str(i + 1) for i in range(gh)],
                fontsize=6)
  ax.set_xlabel('Input patch column')
  ax.set_ylabel('Input patch row')
  ax.tick_params(length=0)
  for s in ax.spines.values():
    s.set_visible(False)
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label='Cosine similarity')
  ax.set_title(title or 'Position embedding similarity', fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def plot_embedding_pcs(pcs: np.ndarray, path: str, ratio: np.ndarray | None = None,
                       cols: int = 7) -> str:
  """Fig. 7 (left): each component min-max scaled to [0, 1] and shown as RGB."""
  plt = _pyplot()
  k = len(pcs)
  rows = int(np.ceil(k / cols))
  fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.45 * rows), squeeze=False)
  for idx, ax in enumerate(axes.flat):
    ax.axis('off')
    if idx >= k:
      continue
    pc = pcs[idx]
    pc = (pc - pc.min()) / max(float(pc.max() - pc.min()), 1e-12)
    ax.imshow(pc if pc.shape[-1] == 3 else pc.mean(-1), cmap=None if pc.shape[-1] == 3 else 'gray',
              interpolation='nearest')
    if ratio is not None:
      ax.set_title(f'{100 * ratio[idx]:.1f}%', fontsize=6)
  fig.suptitle('RGB embedding filters (first principal components)', fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


# ---------------------------------------------------------------------------
# Running a model: ``python -m vit_jax.analysis``
# ---------------------------------------------------------------------------


def attention_fn(model: Any):
  """A jitted fn(params, images) -> per-layer attention weights [(b, heads, T, T), ...]."""
  import jax  # pylint: disable=g-import-not-at-top

  from vit_jax.models import vit  # pylint: disable=g-import-not-at-top

  @jax.jit
  def fn(p, x):
    _, inter = vit.get_intermediates(model, p, x, train=False)
    return vit.attention_weights(inter)

  def attentions(params: Any, images: np.ndarray) -> list[np.ndarray]:
    att = fn(params, images)
    if not att:
      raise AnalysisError('The model sowed no attention weights (is it a ViT?).')
    return [np.asarray(a) for a in att]
  return attentions


def iter_attentions(model: Any, params: Any, images: np.ndarray, batch_size: int = 16):
  """Yields, batch by batch, the per-layer attention weights [(b, heads, T, T), ...].

  Batches keep memory bounded: ViT-B/16 attention for 128 images is ~3 GB.
  """
  fn = attention_fn(model)
  for i in range(0, len(images), batch_size):
    yield fn(params, images[i:i + batch_size])


def model_attentions(model: Any, params: Any, images: np.ndarray,
                     batch_size: int = 16) -> list[np.ndarray]:
  """Per-layer attention weights (N, heads, T, T) of the model on ``images``."""
  chunks = list(iter_attentions(model, params, images, batch_size))
  return [np.concatenate([c[layer] for c in chunks]) for layer in range(len(chunks[0]))]


def position_embeddings(params: Any, model_config: Any, grid: tuple[int, int]) -> np.ndarray:
  """Learned embeddings from the params, or the fixed sincos2d ones."""
  table = params.get('Transformer', {}).get('posembed_input', {})
  pos = table.get('pos_embedding')
  if pos is not None:
    return np.asarray(pos)
  if 'row_embedding' in table:  # posemb='learn2d'
    from vit_jax.models import vit  # pylint: disable=g-import-not-at-top
    pos = np.asarray(vit.learn2d_table(table['row_embedding'], table['col_embedding']))
    if 'prefix_embedding' in table:
      pos = np.concatenate([np.asarray(table['prefix_embedding']), pos], 1)
    return pos
  posemb = model_config.get('posemb', 'learn') if hasattr(model_config, 'get') else 'learn'
  if posemb == 'sincos2d':
    from vit_jax.models import vit  # pylint: disable=g-import-not-at-top
    return vit.sincos2d(grid[0], grid[1], int(model_config.hidden_size))
  raise AnalysisError('The model has no position embeddings (posemb=none).')


def run_all(bundle: Any, paths: Sequence[str], out_dir: str,
            num_components: int = 28, max_rollout_images: int = 8,
            batch_size: int = 16) -> dict[str, str]:
  """Writes the four figures (and analysis.npz with their numbers) to ``out_dir``.

  ``paths``: image files and/or folders (recursive, sorted). Attention
  distances average over all images (the paper used 128); the rollout figure
  shows the first ``max_rollout_images``. Images are read and run
  ``batch_size`` at a time, so any number of them fits in memory (ViT-B/16's
  attention weights for 16 images are ~0.4 GB).
  """
  from vit_jax.models import vit  # pylint: disable=g-import-not-at-top

  os.makedirs(out_dir, exist_ok=True)
  prefix = vit.num_prefix_tokens(bundle.model_config)
  h, w = bundle.image_size
  attentions = attention_fn(bundle.module)
  maps, dist_sum, num_images, grid = [], 0.0, 0, None
  shown, shown_raw, shown_probs = [], [], []   # The first images, for the rollout figure.
  for files, batch, raw in bundle.iter_images(paths, batch_size):
    n = len(files)
    att = [a[:n] for a in attentions(bundle.params, batch)]
    if grid is None:
      grid, _ = infer_grid(att[0].shape[-1], prefix)
      px = (h / grid[0], w / grid[1])
    maps.append(rollout_map(attention_rollout(att), grid, prefix))
    dist_sum = dist_sum + attention_distances(att, grid, px, prefix) * n
    num_images += n
    take = min(max_rollout_images - len(shown), n)
    if take > 0:
      shown += files[:take]
      shown_raw += raw[:take]
      shown_probs.append(bundle.probs(batch[:take]))
  maps = np.concatenate(maps)
  dist = dist_sum / num_images
  written, numbers = {}, {'rollout_maps': maps, 'attention_distance': dist}

  top = bundle.top_k(np.concatenate(shown_probs), 1)
  titles = [f'{os.path.basename(p)}: {t[0]["name"]} ({t[0]["prob"]:.2f})' for p, t in zip(shown, top)]
  written['rollout'] = plot_rollout(shown_raw, maps[:len(shown)],
                                    os.path.join(out_dir, 'attention_rollout.png'), titles)
  written['distance'] = plot_attention_distance(
      dist, os.path.join(out_dir, 'attention_distance.png'), image_size=w,
      title=f'mean over {num_images} image(s); image width {w} px',
      uniform=float(token_distances(grid, px).mean()))

  try:
    sim = posemb_similarity(position_embeddings(bundle.params, bundle.model_config, grid), grid)
    written['posemb'] = plot_posemb_similarity(sim, os.path.join(out_dir, 'posemb_similarity.png'))
    numbers['posemb_similarity'] = sim
  except AnalysisError:
    pass

  kernel = bundle.params.get('embedding', {}).get('kernel')
  # Fig. 7 (left) is about RGB patches; a hybrid's 1x1 embedding of ResNet
  # features has no image-space picture.
  if kernel is not None and np.shape(kernel)[2] == 3:
    pcs, ratio = embedding_filter_pcs(kernel, num_components)
    written['filters'] = plot_embedding_pcs(pcs, os.path.join(out_dir, 'embedding_filters_pca.png'),
                                            ratio)
    numbers['filter_pcs'], numbers['filter_pcs_ratio'] = pcs, ratio
  np.savez(os.path.join(out_dir, 'analysis.npz'), **numbers)
  written['numbers'] = os.path.join(out_dir, 'analysis.npz')
  return written


def define_flags(fv: flags.FlagValues) -> None:
  """The flags of ``python -m vit_jax.analysis``."""
  from vit_jax.models import AUTO_DTYPE, DTYPES  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('checkpoint', None, 'Official-layout .npz.', flag_values=fv)
  flags.DEFINE_string('model', None, 'Preset name, e.g. ViT-B_16.', flag_values=fv)
  flags.DEFINE_string('workdir', None, 'Training workdir (its .npz, config.json, labels.txt).',
                      flag_values=fv)
  flags.DEFINE_string('labels', None, 'Class names, one per line (for the titles).',
                      flag_values=fv)
  flags.DEFINE_integer('image_size', None, 'Override the resolution (posembs are resized).',
                       flag_values=fv)
  flags.DEFINE_string('out_dir', 'analysis', 'Directory for the PNGs and analysis.npz.',
                      flag_values=fv)
  flags.DEFINE_integer('num_components', 28, 'Principal components of the embedding filters.',
                       flag_values=fv)
  flags.DEFINE_integer('max_rollout_images', 8, 'Images shown in the rollout figure '
                       '(distances use all).', flag_values=fv)
  flags.DEFINE_integer('batch_size', 16, 'Images read and run at a time (bounds memory).',
                       flag_values=fv)
  flags.DEFINE_enum('dtype', 'auto', DTYPES, f"Computation dtype ('auto': {AUTO_DTYPE}).",
                    flag_values=fv)


@cli.command(define_flags, positional='images', metavar='IMAGE [IMAGE ...]', min_args=1)
def main(args: cli.Args) -> None:
  """Attention rollout, attention distance, position-embedding similarity and
  embedding-filter PCs of a ViT (paper Figs. 6, 7, 11) as PNGs."""
  from vit_jax import hub  # pylint: disable=g-import-not-at-top
  bundle = hub.load(args.workdir or args.checkpoint or '', model=args.model,
                    checkpoint=args.checkpoint if args.workdir else None,
                    labels=args.labels, image_size=args.image_size, dtype=args.dtype)
  written = run_all(bundle, args.images, args.out_dir, args.num_components,
                    args.max_rollout_images, args.batch_size)
  for name, path in written.items():
    print(f'{name:>9}: {path}')


if __name__ == '__main__':
  raise SystemExit(main())
