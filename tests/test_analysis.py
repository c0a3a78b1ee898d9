"""Analyses of the ViT paper §4.5 / App. D.7-D.8 on analytic cases."""

import os

import numpy as np
import pytest

from vit_jax import analysis
from vit_jax.models import vit

# ----------------------------------------------------------------- rollout


@pytest.mark.parametrize('num_layers', [1, 3, 12])
def test_uniform_attention_gives_uniform_rollout(num_layers):
  t, heads = 1 + 16, 4
  att = [np.full((2, heads, t, t), 1.0 / t)] * num_layers
  roll = analysis.attention_rollout(att)
  # (A + I)/2 with A = U uniform: the L-fold product is (1 - 2^-L) U + 2^-L I.
  expected = (1 - 0.5**num_layers) / t * np.ones((t, t)) + 0.5**num_layers * np.eye(t)
  np.testing.assert_allclose(roll, np.broadcast_to(expected, (2, t, t)), atol=1e-12)
  m = analysis.rollout_map(roll, (4, 4), num_prefix_tokens=1)
  np.testing.assert_allclose(m, np.ones((2, 4, 4)), atol=1e-12)  # uniform over the image
  # without a class token ('gap'), the output is the mean of all rows: also uniform
  att = [np.full((heads, 16, 16), 1.0 / 16)] * num_layers
  m = analysis.rollout_map(analysis.attention_rollout(att), (4, 4), num_prefix_tokens=0)
  np.testing.assert_allclose(m, np.ones((1, 4, 4)), atol=1e-12)


def test_rollout_is_product_of_head_averaged_residual_layers():
  rng = np.random.default_rng(0)
  t = 5
  att = [rng.dirichlet(np.ones(t), size=(3, 2, t)) for _ in range(3)]  # (B=3, heads=2, t, t)
  roll = analysis.attention_rollout(att)
  for b in range(3):
    ref = np.eye(t)
    for a in att:  # independent loop: per layer 0.5 * mean_heads(A) + 0.5 * I
      ref = (0.5 * a[b].mean(0) + 0.5 * np.eye(t)) @ ref
    np.testing.assert_allclose(roll[b], ref, atol=1e-12)
  np.testing.assert_allclose(roll.sum(-1), 1.0, atol=1e-12)  # rows stay distributions


def test_rollout_map_follows_the_attended_patch():
  t = 1 + 9
  a = np.zeros((1, 1, t, t))
  a[0, 0, :, 1 + 5] = 1.0  # every token attends to patch 5 = (row 1, col 2)
  m = analysis.rollout_map(analysis.attention_rollout([a, a]), (3, 3))
  assert np.unravel_index(np.argmax(m[0]), (3, 3)) == (1, 2)
  assert m[0, 1, 2] == 1.0


# ------------------------------------------------------ attention distance


def test_attention_to_self_only_gives_distance_zero():
  att = np.broadcast_to(np.eye(1 + 16), (2, 3, 17, 17))
  np.testing.assert_array_equal(analysis.mean_attention_distance(att, (4, 4), 16), np.zeros(3))


def test_uniform_attention_distance_is_mean_pairwise_distance():
  att = np.full((1, 3, 1 + 49, 1 + 49), 1.0 / 50)
  d = analysis.token_distances((7, 7), 32.0)
  np.testing.assert_allclose(analysis.mean_attention_distance(att, (7, 7), 32.0), [d.mean()] * 3)
  # the paper's ViT-L/16 at 224 px: uniform attention spans ~0.52 of the width
  assert analysis.token_distances((14, 14), 16.0).mean() == pytest.approx(0.52 * 224, rel=0.05)


def test_two_token_distances():
  # 1x2 grid of 16-pixel patches, no class token: patch centres 16 px apart.
  swap = np.array([[[0.0, 1.0], [1.0, 0.0]]])  # (heads=1, 2, 2)
  half = np.full((1, 2, 2), 0.5)
  assert analysis.mean_attention_distance(swap, (1, 2), 16, num_prefix_tokens=0) == [16.0]
  assert analysis.mean_attention_distance(half, (1, 2), 16, num_prefix_tokens=0) == [8.0]
  # with a class token: its column is dropped and rows renormalised over patches
  with_cls = np.array([[[1.0, 0.0, 0.0], [0.5, 0.25, 0.25], [0.2, 0.8, 0.0]]])
  np.testing.assert_allclose(
      analysis.mean_attention_distance(with_cls, (1, 2), 16), [(8.0 + 16.0) / 2])
  # diagonal neighbour on a 3x3 grid: 16 * sqrt(2), rectangular pixels too
  a = np.zeros((1, 9, 9))
  a[0, :, 4] = 1.0  # everyone looks at the centre patch
  d = analysis.token_distances((3, 3), (10.0, 20.0))
  assert d[0, 4] == pytest.approx(np.hypot(10, 20))
  expected = np.mean(d[:, 4])
  np.testing.assert_allclose(
      analysis.mean_attention_distance(a, (3, 3), (10.0, 20.0), num_prefix_tokens=0), [expected])
  dist = analysis.attention_distances([a, np.eye(9)[None]], (3, 3), 16, num_prefix_tokens=0)
  assert dist.shape == (2, 1) and dist[1, 0] == 0.0


# ----------------------------------------------------- posemb similarity


def test_sincos2d_similarity_structure():
  g, d = 14, 768
  emb = vit.sincos2d(g, g, d)
  sim = analysis.posemb_similarity(emb, (g, g))
  assert sim.shape == (g, g, g, g)
  # analytic: <e(p), e(q)> = sum_i cos(dx w_i) + sum_i cos(dy w_i), |e|^2 = d / 2
  omega = 1.0 / 10_000 ** (np.arange(d // 4) / (d // 4 - 1))
  f = lambda delta: np.cos(delta * omega).sum()
  for (i, j, k, m) in [(0, 0, 3, 5), (7, 7, 7, 8), (2, 9, 13, 0)]:
    assert sim[i, j, k, m] == pytest.approx((f(k - i) + f(m - j)) / (d / 2), abs=1e-5)
  flat = sim.reshape(g * g, g * g)
  np.testing.assert_array_equal(np.argmax(flat, axis=1), np.arange(g * g))  # most similar to itself
  np.testing.assert_allclose(flat, flat.T, atol=1e-6)
  # similarity decreases with distance along the row and along the column
  for i, j in [(0, 0), (7, 7), (13, 4)]:
    row = sim[i, j, i, j:]
    col = sim[i, j, i:, j]
    assert np.all(np.diff(row) < 0) and np.all(np.diff(col) < 0)
  # translation invariance: depends on the offset only
  assert sim[2, 3, 4, 6] == pytest.approx(sim[8, 1, 10, 4], abs=1e-6)


def test_posemb_similarity_drops_class_token_and_infers_grid():
  rng = np.random.default_rng(0)
  posemb = rng.normal(size=(1, 1 + 4 * 4, 8))
  sim = analysis.posemb_similarity(posemb, (4, 4))
  p = posemb[0, 1:] / np.linalg.norm(posemb[0, 1:], axis=1, keepdims=True)
  np.testing.assert_allclose(sim.reshape(16, 16), p @ p.T, atol=1e-12)
  assert analysis.infer_grid(197) == ((14, 14), 1)
  assert analysis.infer_grid(196) == ((14, 14), 0)
  with pytest.raises(analysis.AnalysisError, match='Cannot infer a square patch grid from 13'):
    analysis.infer_grid(13)


# ------------------------------------------------------- embedding PCA


def test_embedding_filter_pcs_recover_planted_components():
  rng = np.random.default_rng(0)
  ph, pw, c, d = 4, 4, 3, 500
  basis = np.linalg.qr(rng.normal(size=(ph * pw * c, 3)))[0].T  # 3 orthonormal patterns
  coeffs = rng.normal(size=(d, 3)) * np.array([10.0, 5.0, 2.0])
  filters = coeffs @ basis + 0.01 * rng.normal(size=(d, ph * pw * c))
  kernel = filters.T.reshape(ph, pw, c, d)  # HWIO, as the embedding conv stores it
  pcs, ratio = analysis.embedding_filter_pcs(kernel, num_components=5)
  assert pcs.shape == (5, ph, pw, c)
  flat = pcs.reshape(5, -1)
  np.testing.assert_allclose(flat @ flat.T, np.eye(5), atol=1e-10)  # orthonormal
  for i in range(3):  # in order of variance, up to sign
    assert abs(flat[i] @ basis[i]) > 0.999
  assert ratio[:3].sum() > 0.999 and np.all(np.diff(ratio) <= 0)


def test_clear_errors():
  with pytest.raises(analysis.AnalysisError, match=r'grid 4x4 plus 1 prefix token\(s\) makes 17'):
    analysis.mean_attention_distance(np.ones((1, 2, 10, 10)), (4, 4), 16)
  with pytest.raises(analysis.AnalysisError, match=r'\(batch, heads, T, T\)'):
    analysis.attention_rollout([np.ones((3, 4))])
  with pytest.raises(analysis.AnalysisError, match='at least one layer'):
    analysis.attention_rollout([])
  with pytest.raises(analysis.AnalysisError, match=r'\(ph, pw, C, D\)'):
    analysis.embedding_filter_pcs(np.ones((3, 4)))


# ------------------------------------------------------------------- CLI


def test_cli_writes_figures_with_the_model_numbers(tmp_path, capsys):
  import jax
  from PIL import Image

  from vit_jax import checkpoint, models
  model = models.get_model('testing', num_classes=3)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32))['params']
  checkpoint.save(params, str(tmp_path / 'm.npz'))
  rng = np.random.default_rng(0)
  os.makedirs(tmp_path / 'imgs')
  for i in range(5):
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / 'imgs' / f'{i}.png')
  out = tmp_path / 'figs'
  assert analysis.main([f'--checkpoint={tmp_path}/m.npz', '--model=testing', f'--out_dir={out}',
                        '--num_components=8', '--max_rollout_images=1', str(tmp_path / 'imgs')]) == 0
  for name, min_size in [('attention_rollout.png', (600, 250)), ('attention_distance.png', (500, 400)),
                         ('posemb_similarity.png', (600, 600)), ('embedding_filters_pca.png', (600, 200))]:
    png = np.asarray(Image.open(out / name).convert('RGB'))
    assert png.shape[1] >= min_size[0] and png.shape[0] >= min_size[1], (name, png.shape)
    assert png.std() > 10, name  # not blank
  assert np.asarray(Image.open(out / 'attention_rollout.png')).shape[0] < 400  # one image row

  # The saved numbers are the module functions applied to the model's own attention.
  numbers = np.load(out / 'analysis.npz')
  images = np.stack([np.asarray(Image.open(tmp_path / 'imgs' / f'{i}.png'), np.float32) / 127.5 - 1
                     for i in range(5)])  # 32x32 already: the eval resize is the identity
  _, inter = vit.get_intermediates(model, params, images)
  att = [np.asarray(a) for a in vit.attention_weights(inter)]
  assert len(att) == 2 and att[0].shape == (5, 2, 65, 65)
  np.testing.assert_allclose(numbers['rollout_maps'],
                             analysis.rollout_map(analysis.attention_rollout(att), (8, 8)), atol=1e-5)
  np.testing.assert_allclose(numbers['attention_distance'],
                             analysis.attention_distances(att, (8, 8), 4.0), atol=1e-4)
  np.testing.assert_allclose(numbers['posemb_similarity'], analysis.posemb_similarity(
      params['Transformer']['posembed_input']['pos_embedding'], (8, 8)), atol=1e-6)
  assert numbers['filter_pcs'].shape == (8, 4, 4, 3)
  assert 'attention_rollout.png' in capsys.readouterr().out

  # Streamed 2 images at a time (the last batch padded), with the rollout
  # figure's 3 images taken from two batches: the same numbers.
  streamed = tmp_path / 'streamed'
  assert analysis.main([f'--checkpoint={tmp_path}/m.npz', '--model=testing', f'--out_dir={streamed}',
                        '--num_components=8', '--max_rollout_images=3', '--batch_size=2',
                        str(tmp_path / 'imgs')]) == 0
  again = np.load(streamed / 'analysis.npz')
  assert again['rollout_maps'].shape == (5, 8, 8)
  for key in numbers.files:
    np.testing.assert_allclose(again[key], numbers[key], atol=1e-6, err_msg=key)
  assert np.asarray(Image.open(streamed / 'attention_rollout.png')).shape[0] > 800  # three rows
