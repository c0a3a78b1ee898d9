"""The RPT report's Table 1 models: parameter counts, LSA, DeiT heads, ResNet-56, configs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import scratch
from vit_jax import checkpoint, models
from vit_jax.models import embeddings, resnet_cifar, vit


def _count(name, res, num_classes, collection='params'):
  model = models.get_model(name, num_classes=num_classes)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, res, res, 3)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes[collection]))


def _vit_params(patch, res, width, mlp, layers, classes, prefix_tokens=1, heads=1):
  """Closed-form count of a ViT (patch conv, tokens, blocks, encoder_norm, heads)."""
  tokens = (res // patch)**2 + prefix_tokens
  block = 4 * width + 4 * (width * width + width) + 2 * width * mlp + mlp + width
  return (patch * patch * 3 * width + width + prefix_tokens * width + tokens * width
          + layers * block + 2 * width + heads * (width * classes + classes))


# CIFAR-10 (32px, 10 classes), the setting of the report's "2.58M at 32x32".
SMALL_VIT = _vit_params(4, 32, 192, 384, 9, 10)


def test_small_vit_is_lee_et_al_and_close_to_report():
  assert SMALL_VIT == 2_697_610
  assert _count('SmallViT_4', 32, 10) == SMALL_VIT
  assert abs(SMALL_VIT / 2.58e6 - 1) < 0.05   # report: 2.58M


def test_sl_vit_count_is_small_vit_plus_spt_plus_temperatures():
  spt = embeddings.num_tokenizer_params('spt', (4, 4), 3, 192)
  want = SMALL_VIT - (4 * 4 * 3 * 192 + 192) + spt + 9  # one LSA temperature per layer
  assert _count('SL-ViT_4', 32, 10) == want == 2_734_963
  assert abs(want / 2.7e6 - 1) < 0.02         # report: 2.7M


def test_rot_vit_count_is_small_vit_plus_rpt():
  rpt = embeddings.num_tokenizer_params('rpt', (4, 4), 3, 192)
  # RPT report eq. (4): W_R is (P^2 C (N_R + 1)) x d with N_R = 6, plus the LN.
  assert rpt == 2 * 336 + 336 * 192 + 192
  want = SMALL_VIT - (4 * 4 * 3 * 192 + 192) + rpt
  assert _count('Rot-ViT_4', 32, 10) == want == 2_753_578
  assert abs(want / 2.6e6 - 1) < 0.06         # report: 2.6M (see configs/scratch.py)


def test_deit_ti_count_has_two_tokens_and_two_heads():
  want = _vit_params(4, 32, 192, 768, 12, 10, prefix_tokens=2, heads=2)
  assert _count('DeiT-Ti_4', 32, 10) == want == 5_365_076
  # At 224px the backbone is the DeiT paper's DeiT-Ti (5.7M with 1000 classes).
  assert _count('DeiT-Ti_16', 224, 1000) == 5_717_416 + 192 + 192 + 192 * 1000 + 1000


def test_resnet56_counts():
  # He et al. 2016 Table 6: 0.85M (report Table 1: 0.8M). Option-A shortcuts
  # add nothing: 55 convs 3x3 + BN scale/bias + the head.
  convs = 3 * 16 + 18 * 16 * 16 + (16 * 32 + 17 * 32 * 32) + (32 * 64 + 17 * 64 * 64)
  bn = 2 * (16 + 18 * 16 + 18 * 32 + 18 * 64)
  want = 9 * convs + bn + 64 * 10 + 10
  assert _count('ResNet-56', 32, 10) == want == 853_018
  assert _count('ResNet-56', 32, 10, 'batch_stats') == bn


def _tiny_params(model, x, seed=0):
  params = jax.jit(model.init)(jax.random.PRNGKey(seed), x)['params']
  # Heads are zero-initialised: give every leaf random values so outputs differ.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  leaves = [leaf + 0.1 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)]
  return jax.tree.unflatten(tree, leaves)


def _intermediates(model, params, x):
  return jax.jit(lambda p, x: vit.get_intermediates(model, p, x))(params, x)


def _tiny_vit(**kw):
  return vit.VisionTransformer(
      num_classes=5, patches={'size': (4, 4)}, hidden_size=32,
      transformer={'mlp_dim': 64, 'num_heads': 2, 'num_layers': 2, 'dropout_rate': 0.0,
                   'attention_dropout_rate': 0.0, **kw.pop('transformer', {})}, **kw)


def test_locality_self_attention_masks_diagonal_with_learned_temperature():
  model = _tiny_vit(transformer={'locality_attention': True}, tokenizer={'type': 'spt'})
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 16, 16, 3))
  init = jax.jit(model.init)(jax.random.PRNGKey(0), x)['params']
  temp = init['Transformer']['encoderblock_0']['MultiHeadDotProductAttention_1']['temperature']
  assert float(temp) == pytest.approx(math.sqrt(16))  # sqrt(head_dim) (Lee et al. §3.2)
  params = _tiny_params(model, x)
  _, inter = _intermediates(model, params, x)
  attn = vit.attention_weights(inter)[0]
  assert attn.shape == (2, 2, 17, 17)
  np.testing.assert_array_equal(np.diagonal(attn, axis1=2, axis2=3), 0)
  np.testing.assert_allclose(attn.sum(-1), 1, atol=1e-5)
  # Second path: softmax(q k^T / tau) with the diagonal removed, from the block input.
  blk = params['Transformer']['encoderblock_0']
  h = np.asarray(inter['Transformer/encoder_input'], np.float64)
  mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
  h = (h - mu) / np.sqrt(var + 1e-6) * blk['LayerNorm_0']['scale'] + blk['LayerNorm_0']['bias']
  a = blk['MultiHeadDotProductAttention_1']
  q = np.einsum('btd,dhe->bhte', h, a['query']['kernel']) + np.asarray(a['query']['bias'])[:, None]
  k = np.einsum('btd,dhe->bhte', h, a['key']['kernel']) + np.asarray(a['key']['bias'])[:, None]
  logits = np.einsum('bhqe,bhke->bhqk', q, k) / float(a['temperature'])
  logits[..., np.arange(17), np.arange(17)] = -np.inf
  want = np.exp(logits - logits.max(-1, keepdims=True))
  want /= want.sum(-1, keepdims=True)
  np.testing.assert_allclose(attn, want, atol=1e-5)


def test_deit_distill_heads_train_stacked_eval_averaged():
  model = _tiny_vit(classifier='distill')
  x = jax.random.normal(jax.random.PRNGKey(3), (3, 16, 16, 3))
  params = _tiny_params(model, x)
  assert params['dist'].shape == (1, 1, 32)
  assert params['Transformer']['posembed_input']['pos_embedding'].shape == (1, 18, 32)
  apply = jax.jit(model.apply, static_argnames='train')
  train = apply({'params': params}, x, train=True, rngs={'dropout': jax.random.PRNGKey(0)})
  evals = apply({'params': params}, x, train=False)
  assert train.shape == (3, 2, 5) and evals.shape == (3, 5)
  assert np.abs(train[:, 0] - train[:, 1]).max() > 1e-3     # two different heads
  np.testing.assert_allclose(evals, train.mean(1), atol=1e-5)  # no dropout: same tokens
  # The distillation head reads token 1 (the distillation token).
  _, inter = _intermediates(model, params, x)
  tok = np.asarray(inter['encoder_out'])[:, 1]
  want = tok @ np.asarray(params['head_dist']['kernel']) + np.asarray(params['head_dist']['bias'])
  np.testing.assert_allclose(train[:, 1], want, atol=1e-4)


def test_rpt_and_spt_plug_into_vit_with_checkpoint_round_trip(tmp_path):
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 16, 16, 3))
  for kind in ('rpt', 'spt'):
    model = _tiny_vit(tokenizer={'type': kind})
    params = _tiny_params(model, x)
    assert set(params['embedding']) == {'norm', 'proj'}
    path = tmp_path / f'{kind}.npz'
    checkpoint.save(params, path)
    back = checkpoint.load(path)
    apply = jax.jit(model.apply)
    np.testing.assert_allclose(apply({'params': back}, x), apply({'params': params}, x), atol=0)


def test_resnet56_option_a_shortcut_is_subsample_and_zero_pad():
  block = resnet_cifar.BasicBlock(features=32, strides=2)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 16))
  variables = block.init(jax.random.PRNGKey(1), x, train=False)
  # Zero convs: the residual branch is BN(0) = bias = 0, leaving relu(shortcut).
  params = jax.tree.map(jnp.zeros_like, variables['params'])
  params = jax.tree_util.tree_map_with_path(
      lambda p, v: jnp.ones_like(v) if p[-1].key == 'scale' else v, params)
  y = jax.jit(block.apply, static_argnames='train')(
      {'params': params, 'batch_stats': variables['batch_stats']}, x, train=False)
  want = np.zeros((2, 4, 4, 32), np.float32)
  want[..., 8:24] = np.maximum(np.asarray(x)[:, ::2, ::2, :], 0)
  np.testing.assert_allclose(y, want, atol=1e-6)


def test_resnet56_batchnorm_statistics_and_checkpoint_round_trip(tmp_path):
  # ResNet-56's code path with one block per stage (ResNet-8), to compile fast.
  model = models.get_model('ResNet-56', num_classes=10, blocks_per_stage=1)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))
  variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(1), x))(x)
  _, new = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(
      variables, x)
  apply = jax.jit(model.apply)
  # Running mean moves 10% of the way (momentum 0.9) to the batch mean of the first conv.
  k = variables['params']['conv_init']['kernel']
  conv = jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(new['batch_stats']['bn_init']['mean'],
                             0.1 * conv.mean(axis=(0, 1, 2)), atol=1e-5)
  # Eval uses the running statistics, train the batch's: outputs differ.
  trained = {'params': variables['params'], 'batch_stats': new['batch_stats']}
  assert np.abs(apply(trained, x) - apply(variables, x)).max() > 1e-4
  path = tmp_path / 'r56.npz'
  checkpoint.save(trained['params'], path, batch_stats=trained['batch_stats'])
  back = checkpoint.load_variables(path)
  assert set(back) == {'params', 'batch_stats'}
  np.testing.assert_array_equal(apply(back, x), apply(trained, x))


@pytest.mark.parametrize('model', sorted(scratch.MODELS))
def test_scratch_configs_resolve_and_follow_the_report_recipe(model):
  for dataset in scratch.DATASETS:
    c = scratch.get_config(f'{model},{dataset}')
    assert c.model_name in models.MODEL_CONFIGS
    assert c.pretrained_path is None and c.pp.train == 'rpt_augment'
    assert (c.optim.name, c.lr.base, c.batch_size) == ('adamw', 1e-3, 256)
    assert c.lr.decay_type == 'cosine'
    n = {'tf_flowers': 3303, 'cifar10': 50_000, 'cifar100': 50_000, 'tiny_imagenet': 100_000}
    assert c.total_steps == 50 * math.ceil(n[dataset] / 256)
    assert c.lr.warmup_steps == c.total_steps // 10
    # The preset's patch tiles the dataset's resolution.
    cfg = models.get_config(c.model_name)
    if cfg.get('patches'):
      assert c.image_size % cfg.patches.size[0] == 0
    assert ('distill' in c) == (model == 'deit_ti')
  assert scratch.get_config(f'{model},cifar10,smoke').total_steps == 3


def test_scratch_config_errors():
  with pytest.raises(ValueError, match='needs "<model>,<dataset>'):
    scratch.get_config('vit_ti')
  with pytest.raises(ValueError, match='Models: vit_ti, sl_vit'):
    scratch.get_config('vit_xl,cifar10')
  assert scratch.expected_accuracy('rot_vit', 'cifar100') == 54.75
  assert scratch.expected_accuracy('deit_ti', 'cifar10') is None


def test_split_size_counts_tfds_splits():
  from configs import common
  assert common.split_size('cifar10', 'train') == 50_000
  assert common.split_size('cifar10', 'train[:98%]') == 49_000
  assert common.split_size('tf_flowers', 'train[:90%]') == 3303
  assert common.split_size('tf_flowers', 'train[90%:]') == 367
  assert common.split_size('imagenet2012', 'train[:99%]') == 1_268_355
  assert common.split_size('cifar100', 'train[:1000]') == 1000
  assert common.split_size('cifar100', 'train[-10%:]') == 5000
  for preset in common.DATASET_PRESETS.values():   # Every preset's split is counted.
    assert common.split_size(preset['dataset'], preset['train_split']) > 0
  with pytest.raises(ValueError, match='split_size knows'):
    common.split_size('cifar10', 'test')
  with pytest.raises(ValueError, match='split_size knows'):
    common.split_size('mnist', 'train')


def test_finetune_rpt_config():
  """The report's Table 5: four checkpoints x four datasets, 100 epochs each."""
  from configs import finetune_rpt as ft
  files = {'b16': 'imagenet21k/ViT-B_16.npz', 'b16s': 'imagenet21k+imagenet2012/ViT-B_16.npz',
           'b32': 'imagenet21k/ViT-B_32.npz', 'r50_b16': 'imagenet21k/R50+ViT-B_16.npz'}
  for model, file in files.items():
    for dataset, n in {'tf_flowers': 3303, 'cifar10': 49_000, 'cifar100': 49_000,
                       'tiny_imagenet': 100_000}.items():
      c = ft.get_config(f'{model},{dataset}')
      assert c.pretrained_path == f'gs://vit_models/{file}'
      assert (c.optim.name, c.batch_size, c.image_size) == ('sgd', 512, 384)
      assert c.total_steps == math.ceil(100 * n / 512)   # "fine-tuned for 100 epochs"
      assert c.batch_size % c.accum_steps == 0
      assert 30 < ft.EXPECTED[model][dataset] < 100
  assert ft.get_config('r50_b16,cifar10').model_name == 'R50+ViT-B_16'
  assert ft.get_config('b16s,tiny_imagenet').test_split == 'val'
  with pytest.raises(ValueError, match='a model of b16, b16s, b32, r50_b16 and a dataset of '
                                       'tf_flowers'):
    ft.get_config('r50_b16')
  with pytest.raises(ValueError, match='needs ":<model>,<dataset>"'):
    ft.get_config('b16,mnist')
