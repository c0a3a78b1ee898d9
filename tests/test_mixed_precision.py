"""Mixed precision, fused attention, remat, synthetic data and device prefetch.

Two paths to one result: the padded+masked `jax.nn.dot_product_attention`
(here with implementation='xla', the maths the cuDNN kernel runs on GPUs)
against the einsum attention and a float64 reference; remat against no
remat; bf16 against f32; the loop on `dataset=synthetic` with TensorFlow made
unimportable.
"""

import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, SUBPROCESS_ENV, tiny_config

from vit_jax import models, synthetic, train
from vit_jax.models import vit


def _cfg(layers=1):
  return dict(model_name='x', patches=dict(size=(16, 16)), hidden_size=32,
              transformer=dict(mlp_dim=64, num_heads=4, num_layers=layers, dropout_rate=0.,
                               attention_dropout_rate=0.),
              classifier='token', representation_size=None, resnet=None)


def _reference_attention(x, w, b, out_w, out_b):
  """The attention layer in float64 numpy, unpadded."""
  x, w, b, out_w, out_b = (np.asarray(a, np.float64) for a in (x, w, b, out_w, out_b))
  q, k, v = (np.einsum('btd,dhe->bthe', x, w[:, i]) + b[i] for i in range(3))
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1])
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum('bqhe,hed->bqd', np.einsum('bhqk,bkhe->bqhe', weights, v), out_w) + out_b


@pytest.mark.parametrize('tokens', [197, 577])   # ViT-B/16 at 224 and at 384
@pytest.mark.parametrize('multiple', [1, 64, 128])
def test_padded_masked_attention_equals_unpadded(tokens, multiple, monkeypatch):
  d, heads, hd = 16, 2, 8
  keys = jax.random.split(jax.random.key(tokens), 5)
  x = jax.random.normal(keys[0], (2, tokens, d))
  w = jax.random.normal(keys[1], (d, 3, heads, hd)) / np.sqrt(d)
  b = 0.1 * jax.random.normal(keys[2], (3, heads, hd))
  out_w = jax.random.normal(keys[3], (heads, hd, d)) / np.sqrt(d)
  out_b = 0.1 * jax.random.normal(keys[4], (d,))
  out = vit.fused_attention(x, w, b, out_w, out_b, implementation='xla', pad_multiple=multiple)
  assert out.shape == x.shape
  np.testing.assert_allclose(out, _reference_attention(x, w, b, out_w, out_b), atol=5e-6)
  if multiple > 1:   # Without the mask the padded keys (projected to the bias) would count.
    unmasked = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, 'dot_product_attention',
                        lambda q, k, v, **_: unmasked(q, k, v, implementation='xla'))
    wrong = vit.fused_attention(x, w, b, out_w, out_b, implementation='xla',
                                pad_multiple=multiple)
    assert np.abs(np.asarray(wrong) - np.asarray(out)).max() > 1e-3


@pytest.mark.parametrize('grid', [14, 24])   # 197 and 577 tokens
def test_fused_attention_model_equals_einsum_model(grid):
  x = jax.random.uniform(jax.random.key(1), (2, grid * 16, grid * 16, 3), minval=-1, maxval=1)
  einsum = models.get_model(_cfg(), num_classes=5, attention='einsum')
  fused = models.get_model(_cfg(), num_classes=5, attention='xla')
  params = einsum.init(jax.random.key(0), x)['params']
  assert jax.tree.structure(fused.init(jax.random.key(0), x)['params']) == \
      jax.tree.structure(params)
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(3), p.shape), params)
  labels = jnp.array([1, 2])

  def loss(model):
    def f(p):
      logits = model.apply({'params': p}, x, train=True)
      return -jax.nn.log_softmax(logits)[jnp.arange(2), labels].mean()
    return f
  np.testing.assert_allclose(fused.apply({'params': params}, x),
                             einsum.apply({'params': params}, x), atol=2e-6)
  g_e, g_f = jax.grad(loss(einsum))(params), jax.grad(loss(fused))(params)
  for a, b in zip(jax.tree.leaves(g_e), jax.tree.leaves(g_f)):
    np.testing.assert_allclose(a, b, atol=5e-6)


def test_attention_weights_requested_use_the_einsum_path():
  x = jax.random.uniform(jax.random.key(1), (1, 64, 64, 3), minval=-1, maxval=1)
  model = models.get_model(_cfg(), num_classes=5, attention='xla')
  params = model.init(jax.random.key(0), x)['params']
  out, inter = vit.get_intermediates(model, params, x)
  weights = vit.attention_weights(inter)
  assert len(weights) == 1 and weights[0].shape == (1, 4, 17, 17)
  np.testing.assert_allclose(np.asarray(weights[0]).sum(-1), 1., rtol=1e-5)
  np.testing.assert_allclose(out, model.apply({'params': params}, x), atol=2e-6)


def test_auto_attention_falls_back_to_einsum_where_the_kernel_refuses(monkeypatch):
  """'auto' on a GPU whose cuDNN refuses the shape runs the einsum path (same
  output); naming the kernel raises instead."""
  x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1, maxval=1)
  einsum = models.get_model(_cfg(), num_classes=5, attention='einsum')
  params = {'params': einsum.init(jax.random.key(0), x)['params']}
  expected = einsum.apply(params, x)

  def refuse(*args, **kwargs):
    raise NotImplementedError('Unsupported sequence length Q 5, KV 5.')
  monkeypatch.setattr(vit, '_resolve_attention', lambda attention, dtype: 'cudnn')   # A GPU.
  monkeypatch.setattr(jax.nn, 'dot_product_attention', refuse)
  auto = models.get_model(_cfg(), num_classes=5, attention='auto')
  np.testing.assert_array_equal(auto.apply(params, x), expected)
  cudnn = models.get_model(_cfg(), num_classes=5, attention='cudnn')
  with pytest.raises(NotImplementedError, match='Unsupported sequence length'):
    cudnn.apply(params, x)


def test_auto_attention_and_dtype_resolution_on_cpu():
  assert vit._resolve_attention('auto', jnp.bfloat16) == 'einsum'   # No GPU here.
  assert vit._resolve_attention('cudnn', jnp.float32) == 'cudnn'
  with pytest.raises(ValueError, match='attention must be one of'):
    vit._resolve_attention('flash', jnp.float32)
  assert models.resolve_dtype('auto') == jnp.float32     # bf16 is slower on CPUs.
  assert models.resolve_dtype('bfloat16') == jnp.bfloat16
  assert models.resolve_dtype(jnp.float16) == jnp.float16
  with pytest.raises(ValueError, match='dtype must be one of'):
    models.resolve_dtype('float16')


@pytest.mark.parametrize('backend, capability, dtype, attention', [
    ('gpu', '9.0', jnp.bfloat16, 'cudnn'),     # H100
    ('gpu', '8.0', jnp.bfloat16, 'cudnn'),     # A100
    ('gpu', '7.5', jnp.float32, 'einsum'),     # T4 (Colab): no bf16 units, no flash attention
    ('gpu', '7.0', jnp.float32, 'einsum'),     # V100
    ('gpu', 'gfx90a', jnp.bfloat16, 'einsum'),  # AMD: bf16 units, no cuDNN
    ('tpu', None, jnp.bfloat16, 'einsum'),
])
def test_auto_follows_the_hardware(monkeypatch, backend, capability, dtype, attention):
  class Device:
    pass
  device = Device()
  if capability:
    device.compute_capability = capability
  monkeypatch.setattr(jax, 'default_backend', lambda: backend)
  monkeypatch.setattr(jax, 'devices', lambda *a: [device])
  assert models.resolve_dtype('auto') == dtype
  assert vit._resolve_attention('auto', models.resolve_dtype('auto')) == attention
  assert vit._resolve_attention('auto', jnp.float32) == 'einsum'


def test_remat_keeps_the_tree_and_the_gradients():
  x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1, maxval=1)
  plain = models.get_model(_cfg(layers=2), num_classes=5)
  params = plain.init(jax.random.key(0), x)['params']
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(3), p.shape), params)

  def grads(model):
    return jax.grad(lambda p: jnp.sum(model.apply({'params': p}, x, train=True) ** 2))(params)
  reference = grads(plain)
  for policy in ('full', 'dots_with_no_batch_dims_saveable'):
    model = models.get_model(_cfg(layers=2), num_classes=5, remat=policy)
    assert jax.tree.structure(model.init(jax.random.key(0), x)['params']) == \
        jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(grads(model))):
      np.testing.assert_allclose(a, b, atol=1e-6)
  with pytest.raises(ValueError, match='remat must be None or one of'):
    models.get_model(_cfg(), num_classes=5, remat='sometimes').init(jax.random.key(0), x)


def test_bfloat16_model_keeps_float32_params_and_logits():
  x = jax.random.uniform(jax.random.key(1), (4, 32, 32, 3), minval=-1, maxval=1)
  f32 = models.get_model(_cfg(), num_classes=5)
  bf16 = models.get_model(_cfg(), num_classes=5, dtype='bfloat16')
  params = f32.init(jax.random.key(0), x)['params']
  assert all(p.dtype == jnp.float32
             for p in jax.tree.leaves(bf16.init(jax.random.key(0), x)['params']))
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(3), p.shape), params)
  a = f32.apply({'params': params}, x)
  b = bf16.apply({'params': params}, x)
  assert b.dtype == jnp.float32   # encoder_norm, head and logits stay f32.
  err = np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(a)).max()
  assert 1e-6 < err < 3e-2, err   # bf16 rounding: visible, and small.


def test_config_dtype_is_validated():
  config = tiny_config()
  config.dtype = 'half'
  with pytest.raises(train.ConfigError, match="config.dtype must be one of"):
    train.validate_config(config)


def test_device_prefetch_keeps_order_and_everything():
  assert list(train.device_prefetch(iter(range(7)), size=2)) == list(range(7))
  assert list(train.device_prefetch(iter([]), size=2)) == []
  seen = []

  def produce():
    for i in range(4):
      seen.append(i)
      yield i
  it = train.device_prefetch(produce(), size=2)
  assert next(it) == 0 and seen == [0, 1]   # Batch 1 is already on its way.


def test_synthetic_batches_are_fixed_and_on_the_devices():
  config = tiny_config()
  config.dataset = 'synthetic'
  config.num_classes = 7
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  it = synthetic.make_train_iter(config, start_step=3)
  a, b = synthetic.to_global(next(it), sharding), synthetic.to_global(next(it), sharding)
  assert a['image'] is b['image']   # Made once, reused: no per-step copy.
  assert a['image'].shape == (32, 8, 8, 3) and a['label'].dtype == jnp.int32
  assert float(a['image'].min()) >= -1 and float(a['image'].max()) <= 1
  assert 0 <= int(a['label'].min()) and int(a['label'].max()) < 7
  ev = [synthetic.to_global(s, sharding) for s in synthetic.make_eval_iter(config)]
  assert len(ev) == 1 and float(ev[0]['mask'].sum()) == 128
  assert synthetic.get_dataset_info(config).num_classes == 7


_NO_TENSORFLOW = '''
import importlib.machinery
_BLOCKED = ('tensorflow', 'tensorflow_datasets', 'tensorboard')
_orig = importlib.machinery.PathFinder.find_spec.__func__
def _find_spec(cls, name, path=None, target=None):
  if name.split('.')[0] in _BLOCKED:
    return None
  return _orig(cls, name, path, target)
importlib.machinery.PathFinder.find_spec = classmethod(_find_spec)
'''


def test_loop_on_synthetic_data_runs_without_tensorflow(tmp_path):
  """The real loop, timed on any machine: TensorFlow, TFDS and tensorboard unimportable."""
  (tmp_path / 'site').mkdir()
  (tmp_path / 'site' / 'sitecustomize.py').write_text(textwrap.dedent(_NO_TENSORFLOW))
  env = dict(SUBPROCESS_ENV, PYTHONPATH=f'{tmp_path / "site"}:{REPO}')
  check = subprocess.run([sys.executable, '-c', 'import tensorflow'], env=env,
                         capture_output=True, text=True)
  assert check.returncode != 0 and 'tensorflow' in check.stderr
  workdir = tmp_path / 'w'
  proc = subprocess.run(
      [sys.executable, '-m', 'vit_jax.main', '--config=tests/_tiny_config.py',
       f'--workdir={workdir}', '--config.dataset=synthetic', '--config.num_classes=7',
       '--config.total_steps=8', '--config.log_every=4', '--config.dtype=bfloat16'],
      env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'accuracy_test' in proc.stdout
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert any('img_sec_core_train' in r for r in rows)
  info = json.loads((workdir / 'run_info.json').read_text())
  assert info['dtype'] == 'bfloat16' and info['platform'] == 'cpu'
  assert 'no TensorBoard events' in proc.stderr
