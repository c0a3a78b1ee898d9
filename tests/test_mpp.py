"""Masked patch prediction (ViT paper App. B.1.2): corruption statistics over
many draws, 3-bit colour targets on known images, and the loop end to end
(pre-train, export in the official layout, load for fine-tuning)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from vit_jax import checkpoint as ckpt_lib
from vit_jax import hub, train
from vit_jax.models import mpp, vit


def test_corruption_statistics_over_many_draws():
  b, n, draws = 64, 64, 100
  keys = jax.random.split(jax.random.PRNGKey(0), draws)
  c = jax.vmap(lambda k: mpp.corrupt(k, b, n))(keys)
  corrupted, masked = np.asarray(c['corrupted']), np.asarray(c['masked'])
  source = np.asarray(c['source'])
  own = np.arange(b * n).reshape(b, n)
  replaced = source != own
  # Exactly 50% of every image's patches.
  assert np.all(corrupted.sum(-1) == n // 2)
  # Every position equally likely (uniform choice): 6,400 draws per position.
  per_pos = corrupted.mean(axis=(0, 1))
  assert np.all(np.abs(per_pos - 0.5) < 0.03), per_pos.min()
  # Only corrupted patches change; masked and replaced are disjoint.
  assert not np.any((masked | replaced) & ~corrupted)
  assert not np.any(masked & replaced)
  total = corrupted.sum()                                 # 204,800 patches
  frac = {'mask': masked.sum() / total, 'random': replaced.sum() / total,
          'keep': (corrupted & ~masked & ~replaced).sum() / total}
  # Binomial std of a fraction of 204,800 is < 0.001: 0.005 is > 5 sigma.
  assert abs(frac['mask'] - 0.8) < 0.005, frac
  assert abs(frac['random'] - 0.1) < 0.005, frac
  assert abs(frac['keep'] - 0.1) < 0.005, frac
  # A replacement is another patch, from anywhere in the batch, uniformly.
  src = source[replaced]
  assert not np.any(source[replaced] == np.broadcast_to(own, source.shape)[replaced])
  counts = np.bincount(src // n, minlength=b)              # source image
  assert counts.min() > 0.7 * counts.mean() and counts.max() < 1.3 * counts.mean()
  # Different draws differ.
  assert not np.array_equal(corrupted[0], corrupted[1])


def test_corruption_rates_are_configurable_and_checked():
  c = mpp.corrupt(jax.random.PRNGKey(1), 8, 100, rate=0.15, mask_prob=1.0, random_prob=0.)
  assert np.all(np.asarray(c['corrupted']).sum(-1) == 15)
  assert np.array_equal(np.asarray(c['masked']), np.asarray(c['corrupted']))
  with pytest.raises(ValueError, match='mask_prob \\+ random_prob <= 1'):
    mpp.corrupt(jax.random.PRNGKey(1), 8, 100, mask_prob=0.8, random_prob=0.3)


def test_apply_corruption_replaces_what_it_says():
  b, n, d = 4, 6, 5
  tokens = jax.random.normal(jax.random.PRNGKey(0), (b, n, d))
  c = mpp.corrupt(jax.random.PRNGKey(3), b, n)
  mask = jnp.full((1, 1, d), 7.)
  out = np.asarray(mpp.apply_corruption(tokens, c, mask))
  flat = np.asarray(tokens).reshape(b * n, d)
  for i in range(b):
    for j in range(n):
      if c['masked'][i, j]:
        np.testing.assert_array_equal(out[i, j], 7.)
      else:
        np.testing.assert_array_equal(out[i, j], flat[int(c['source'][i, j])])


def _to_model(uint8):
  return jnp.asarray(uint8, jnp.float32) / 127.5 - 1.   # the pipeline's scaling


def test_3bit_mean_colour_of_known_images():
  # Solid patches, level boundaries included: 31 -> 0, 32 -> 1, 64 -> 2, 255 -> 7.
  colours = [(0, 0, 0), (255, 255, 255), (31, 32, 64), (0, 128, 255), (224, 223, 96)]
  want = [0, 511, 0 * 64 + 1 * 8 + 2, 0 * 64 + 4 * 8 + 7, 7 * 64 + 6 * 8 + 3]
  img = np.zeros((1, 8, 8 * len(colours), 3), np.uint8)
  for k, col in enumerate(colours):
    img[0, :, 8 * k:8 * k + 8] = col
  got = mpp.targets(_to_model(img), (8, 8), 'color3bit')
  assert got.shape == (1, len(colours))
  np.testing.assert_array_equal(got[0], want)
  # The mean, not one pixel: half 0, half 64 -> mean 32 -> level 1.
  half = np.zeros((1, 8, 8, 3), np.uint8)
  half[0, :4] = 64
  assert int(mpp.targets(_to_model(half), (8, 8), 'color3bit')[0, 0]) == 1 * 64 + 1 * 8 + 1


def test_3bit_targets_of_random_images_match_integer_arithmetic():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (3, 16, 24, 3), dtype=np.uint8)
  got = np.asarray(mpp.targets(_to_model(img), (8, 8), 'color3bit'))
  p = img.astype(np.int64).reshape(3, 2, 8, 3, 8, 3).transpose(0, 1, 3, 2, 4, 5)
  levels = p.sum(axis=(3, 4)) // (32 * 64)                  # exact: floor(mean / 32)
  want = (levels[..., 0] * 64 + levels[..., 1] * 8 + levels[..., 2]).reshape(3, 6)
  np.testing.assert_array_equal(got, want)
  # 16 sub-patch targets: 2x2-pixel means of each 8x8 patch, raster order.
  sub = np.asarray(mpp.targets(_to_model(img), (8, 8), 'subpatch3bit'))
  assert sub.shape == (3, 6, 16)
  q = p.reshape(3, 2, 3, 4, 2, 4, 2, 3).sum(axis=(4, 6)) // (32 * 4)   # (3,2,3,4,4,3)
  want_sub = (q[..., 0] * 64 + q[..., 1] * 8 + q[..., 2]).reshape(3, 6, 16)
  np.testing.assert_array_equal(sub, want_sub)
  # Pixel regression targets: the patch itself, (ph, pw, C) flattened.
  pix = np.asarray(mpp.targets(_to_model(img), (8, 8), 'pixels'))
  np.testing.assert_allclose(pix[1, 4].reshape(8, 8, 3),
                             img[1, 8:16, 8:16] / 127.5 - 1, atol=1e-6)
  assert mpp.num_outputs('pixels', (8, 8)) == 192 and mpp.num_outputs('subpatch3bit', (8, 8)) == 8192


def test_loss_is_on_corrupted_patches_only():
  model = vit.VisionTransformer(
      num_classes=512, patches={'size': (4, 4)}, hidden_size=16, classifier='token_unpooled',
      transformer=dict(mlp_dim=32, num_heads=2, num_layers=1))
  obj = mpp.MaskedPatchPrediction(patch_size=(4, 4))
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 16, 16, 3), minval=-1.)
  params = model.init(jax.random.PRNGKey(1), x[:1], **obj.init_kwargs(16))['params']
  assert params['mask_embedding'].shape == (1, 1, 16)
  rng = jax.random.PRNGKey(5)
  corrupted = np.asarray(mpp.corrupt(rng, 2, 16)['corrupted'])
  out, got = obj._outputs(model, {'params': params}, x, rng, train=True)
  np.testing.assert_array_equal(got, corrupted)
  # Hand-computed: mean CE over each image's corrupted patches.
  tgt = np.asarray(mpp.targets(x, (4, 4), 'color3bit'))
  logp = np.asarray(jax.nn.log_softmax(out, -1))
  ce = -np.take_along_axis(logp, tgt[..., None], -1)[..., 0]
  want = (ce * corrupted).sum(-1) / corrupted.sum(-1)
  np.testing.assert_allclose(obj.loss(model, {'params': params}, {'image': x}, rng), want,
                             rtol=1e-5)


def test_pretrain_export_and_finetune_load(tmp_path):
  import importlib.util
  spec = importlib.util.spec_from_file_location('mpp_config', REPO / 'configs' / 'mpp.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config('digits,color3bit,smoke')
  config.total_steps = 30
  config.lr.base = 3e-3
  result = train.run(config, str(tmp_path / 'mpp'))
  # It learns: from ln(512) = 6.24 at init to well below.
  assert result.history[0]['train_loss'] > 5.5
  assert result.history[-1]['train_loss'] < result.history[0]['train_loss'] - 1.5
  final = json.loads((tmp_path / 'mpp' / 'final_metrics.json').read_text())
  assert 0 < final['accuracy_test'] <= 1
  # The export is the official layout: no [mask] embedding, a 512-way head.
  exported = ckpt_lib.load(str(tmp_path / 'mpp' / 'SmallViT_8.npz'))
  assert 'mask_embedding' in result.params and 'mask_embedding' not in exported
  assert exported['head']['kernel'].shape == (192, 512)
  assert 'pos_embedding' in exported['Transformer']['posembed_input']
  # So does `python -m vit_jax.export` of the last checkpoint.
  from vit_jax import export
  export.export(str(tmp_path / 'mpp'), str(tmp_path / 'again.npz'))
  assert 'mask_embedding' not in ckpt_lib.load(str(tmp_path / 'again.npz'))
  # A usual fine-tuning model (token classifier, 10 classes, 40px) loads it.
  ft_config = config.copy_and_resolve_references()
  with ft_config.unlocked():
    ft_config.mpp = None
    ft_config.model = {}
  model, mc = hub.build(ft_config, 10)
  init = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 40, 40, 3)))['params']
  params = ckpt_lib.load_pretrained(str(tmp_path / 'mpp' / 'SmallViT_8.npz'), init, mc)
  assert params['head']['kernel'].shape == (192, 10) and not np.any(params['head']['kernel'])
  np.testing.assert_array_equal(params['embedding']['kernel'], exported['embedding']['kernel'])
  # The tools load the export too (few-shot, analysis, predict): its head
  # predicts colours, so the run wrote no labels.txt and the classes are the
  # 512 numbered colours. (A labels.txt of the dataset's 10 digits, as older
  # runs wrote, is left out with a warning.)
  assert not (tmp_path / 'mpp' / 'labels.txt').exists()
  bundle = hub.load(str(tmp_path / 'mpp' / 'SmallViT_8.npz'))
  assert bundle.num_classes == 512 and bundle.labels is None
  (tmp_path / 'mpp' / 'labels.txt').write_text(''.join(f'{d}\n' for d in range(10)))
  assert hub.load(str(tmp_path / 'mpp')).labels is None
  with pytest.raises(hub.HubError, match='has 10 names but the model has 512'):
    hub.load(str(tmp_path / 'mpp'), labels=str(tmp_path / 'mpp' / 'labels.txt'))


def test_bad_mpp_config_is_a_clear_error(tmp_path):
  import importlib.util
  spec = importlib.util.spec_from_file_location('mpp_config', REPO / 'configs' / 'mpp.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config('digits,smoke')
  config.mpp.target = 'colour'
  with pytest.raises(train.ConfigError, match='mpp.target must be one of'):
    train.run(config, str(tmp_path))
  config = module.get_config('digits,smoke')
  config.model.classifier = 'token'
  with pytest.raises(ValueError, match="classifier='token_unpooled'"):
    train.run(config, str(tmp_path / 'b'))
  with pytest.raises(ValueError, match='configs/mpp.py needs'):
    module.get_config('imagenet')
