"""The training loop: equivalences (devices, processes, accumulation, resume)
and clear errors. Runs a 1-layer ViT on the embedded digits in seconds.

The subprocess tests launch `python -m vit_jax.main` exactly as a user would
and compare its `metrics.jsonl` / exported `.npz` with an in-process run.
"""

import json
import math
import os
import random
import re
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from conftest import (REPO, SUBPROCESS_ENV, golden_dir, sigkill_at_step, tiny_config,
                      use_compile_cache)

from vit_jax import checkpoint as ckpt_lib
from vit_jax import config_schema, models, optim, train, train_step

TINY = 'tests/_tiny_config.py'
TOTAL = 10  # steps of the reference run and of the runs compared with it
ENV = SUBPROCESS_ENV


@pytest.fixture(scope='module', autouse=True)
def _compile_cache(tmp_path_factory):
  use_compile_cache(ENV, tmp_path_factory)


def main_cmd(workdir, *overrides):
  return [sys.executable, '-m', 'vit_jax.main', f'--config={TINY}',
          f'--workdir={workdir}', f'--config.total_steps={TOTAL}', *overrides]


def run_main(workdir, *overrides, env=None, timeout=240):
  out = subprocess.run(main_cmd(workdir, *overrides), cwd=REPO,
                       env=env or ENV, capture_output=True, text=True,
                       timeout=timeout, check=False)
  assert out.returncode == 0, out.stderr[-4000:]
  return out


def train_losses(workdir) -> list[float]:
  """train_loss per step from metrics.jsonl (the last line of a step wins)."""
  losses = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      rec = json.loads(line)
      if 'train_loss' in rec:
        losses[rec['step']] = rec['train_loss']
  return [losses[k] for k in sorted(losses)]


def assert_params_close(a, b, rtol):
  fa, fb = ckpt_lib.flatten(a), ckpt_lib.flatten(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    np.testing.assert_allclose(fa[k], fb[k], rtol=rtol, atol=rtol, err_msg=k)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """One uninterrupted single-device, single-process run of the tiny config."""
  workdir = tmp_path_factory.mktemp('reference')
  config = tiny_config()
  config.total_steps = TOTAL
  # Few-shot linear probe on the pre-logits during training (paper 4.1).
  config.evals = ml_collections.ConfigDict({'fewshot': {
      'type': 'fewshot', 'dataset': 'digits', 'image_size': 8, 'shots': (2, 5), 'seeds': (0,),
      'every': 5}})
  result = train.run(config, str(workdir))
  return workdir, result


# ---------------------------------------------------------------------------
# The reference run itself.
# ---------------------------------------------------------------------------

def test_reference_run_outputs(reference):
  workdir, result = reference
  # Every test example is scored (359 = digits test split), none dropped.
  assert result.metrics['num_test_examples'] == 359
  assert len(result.history) == TOTAL
  # Logged lr is the lr the step used, nonzero at step 1 (base 0.1, warmup 2).
  assert result.history[0]['lr'] == pytest.approx(0.05)
  assert result.history[1]['lr'] == pytest.approx(0.1)
  # Exported .npz == final params, official layout, loadable.
  exported = ckpt_lib.load(str(workdir / 'tiny-test.npz'))
  assert_params_close(exported, result.params, rtol=0)
  assert exported['head']['kernel'].shape == (32, 10)
  assert (workdir / 'labels.txt').read_text().split() == [str(i) for i in range(10)]
  cfg = json.loads((workdir / 'config.json').read_text())
  assert cfg['model']['model_name'] == 'tiny-test' and cfg['total_steps'] == TOTAL
  # checkpoint_every=2, keep 2 -> the last two remain.
  steps = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir()
                 if p.name.isdigit())
  assert steps == [TOTAL - 2, TOTAL]
  final = json.loads((workdir / 'final_metrics.json').read_text())
  assert final['accuracy_test'] == pytest.approx(result.metrics['accuracy_test'])
  # Few-shot evaluator ran at step 5 and at the end, scores in [0, 1].
  logged = [json.loads(line) for line in
            (workdir / 'metrics.jsonl').read_text().splitlines()]
  fewshot_steps = [r['step'] for r in logged if 'fewshot/digits_5shot' in r]
  assert fewshot_steps == [5, TOTAL]
  assert 0.1 < result.metrics['fewshot/digits_5shot'] <= 1.0


# ---------------------------------------------------------------------------
# Equivalences.
# ---------------------------------------------------------------------------

def test_eight_devices_data_and_fsdp_match_one_device(reference, tmp_path):
  _, ref = reference
  want = [h['train_loss'] for h in ref.history]
  env = dict(ENV, XLA_FLAGS='--xla_force_host_platform_device_count=8')
  meshes = {'data': ('8', '1'), 'fsdp': ('2', '4')}
  # Both runs at once: each is mostly one busy thread (imports, compiling).
  procs = {name: subprocess.Popen(
      main_cmd(tmp_path / name, f'--config.mesh.data={d}',
               f'--config.mesh.fsdp={f}'),
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for name, (d, f) in meshes.items()}
  for name, proc in procs.items():
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    assert 'over 8 devices' in err
    workdir = tmp_path / name
    np.testing.assert_allclose(train_losses(workdir), want, rtol=1e-5,
                               err_msg=name)
    assert_params_close(ckpt_lib.load(str(workdir / 'tiny-test.npz')),
                        ref.params, rtol=1e-5)
    final = json.loads((workdir / 'final_metrics.json').read_text())
    assert final['accuracy_test'] == pytest.approx(
        ref.metrics['accuracy_test'], abs=1 / 359)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(reference, tmp_path):
  _, ref = reference
  port = _free_port()
  workdir = tmp_path / 'two'
  procs = [subprocess.Popen(
      main_cmd(workdir, f'--coordinator_address=localhost:{port}',
               '--num_processes=2', f'--process_id={i}',
               '--cpu_collectives=gloo'),
      cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-4000:]
  assert 'process 0 of 2' in outs[0][1] and 'process 1 of 2' in outs[1][1]
  np.testing.assert_allclose(train_losses(workdir),
                             [h['train_loss'] for h in ref.history], rtol=1e-5)
  assert_params_close(ckpt_lib.load(str(workdir / 'tiny-test.npz')),
                      ref.params, rtol=1e-5)


def test_two_processes_share_the_image_check_of_a_folder(tmp_path):
  """Each process decodes half of an image folder; a bad file found by either is
  skipped by both (the flags are all-gathered), and both train."""
  from PIL import Image
  rng = np.random.default_rng(0)
  root = tmp_path / 'images'
  for c in ('a', 'b'):
    (root / c).mkdir(parents=True)
    for i in range(12):
      Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / c / f'{i}.png')
  (root / 'b' / 'broken.png').write_bytes(b'not a png')
  port = _free_port()
  workdir = tmp_path / 'w'
  procs = [subprocess.Popen(
      main_cmd(workdir, f'--coordinator_address=localhost:{port}', '--num_processes=2',
               f'--process_id={i}', '--cpu_collectives=gloo', f'--config.dataset=folder:{root}',
               '--config.num_classes=None', '--config.skip_bad_images=True',
               '--config.total_steps=2', '--config.batch_size_eval=4'),
      cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-4000:]
    assert 'Skipping 1 undecodable image file(s)' in err and 'broken.png' in err
  checks = {f.name: json.loads(f.read_text()) for f in workdir.glob('image_check*.json')}
  assert sorted(checks) == ['image_check.0-of-2.json', 'image_check.1-of-2.json']
  assert sum(len(v) for v in checks.values()) == 25   # every file decoded once


def test_sigkill_and_relaunch_gives_identical_params(reference, tmp_path):
  _, ref = reference
  workdir = tmp_path / 'killed'
  # From step 3 on, the step-2 checkpoint exists (saved before step 3 runs).
  # A different step each run, seeded and printed so a failure can be replayed
  # (VIT_JAX_TEST_SEED=<seed> pytest ...).
  seed = int(os.environ.get('VIT_JAX_TEST_SEED', random.SystemRandom().randrange(2**31)))
  kill_at = random.Random(seed).randint(3, TOTAL - 2)
  print(f'SIGKILL at step {kill_at} (VIT_JAX_TEST_SEED={seed})')
  killed_at = sigkill_at_step(main_cmd(workdir), ENV, kill_at, TOTAL)
  assert not (workdir / 'tiny-test.npz').exists()
  out = run_main(workdir)
  resumed_at = int(re.search(r'Resumed from .* at step (\d+)', out.stderr).group(1))
  assert 0 < resumed_at <= killed_at
  # Bit-identical to the uninterrupted run: same batches (data position
  # restored), same dropout masks (rng folded with the step), same state.
  resumed = ckpt_lib.flatten(ckpt_lib.load(str(workdir / 'tiny-test.npz')))
  for k, v in ckpt_lib.flatten(ref.params).items():
    np.testing.assert_array_equal(resumed[k], v, err_msg=k)
  np.testing.assert_array_equal(train_losses(workdir),
                                [h['train_loss'] for h in ref.history])


def _tiny_model(classifier='token', dropout=0.0):
  return models.get_model({
      'model_name': 'm', 'patches': {'size': (2, 2)}, 'hidden_size': 32,
      'transformer': {'mlp_dim': 64, 'num_heads': 2, 'num_layers': 1,
                      'dropout_rate': dropout, 'attention_dropout_rate': 0.0},
      'classifier': classifier, 'representation_size': None, 'resnet': None},
      num_classes=10)


def _random_batch(n=32, size=8, seed=0):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  return {'image': jax.random.uniform(k1, (n, size, size, 3), minval=-1.),
          'label': jax.random.randint(k2, (n,), 0, 10)}


def _random_params(model, seed=1):
  params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 8, 8, 3)))['params']
  # Non-zero heads, so every loss term depends on the inputs.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape)
                                   for x, k in zip(leaves, keys)])


def test_accum_steps_4_equals_one_full_batch():
  model = _tiny_model()
  config = ml_collections.ConfigDict({'accum_steps': 1})
  schedule = optim.make_schedule(0.1, 10, 2)
  tx = optim.make_optimizer(ml_collections.ConfigDict(
      {'name': 'sgd', 'momentum': 0.9, 'grad_clip_norm': 1.0}), schedule)
  params = _random_params(model)
  state = {'step': jnp.zeros((), jnp.int32), 'params': params,
           'opt_state': tx.init(params)}
  batch = _random_batch(32)
  outs = {}
  for accum in (1, 4):
    config.accum_steps = accum
    step = jax.jit(train_step.make_train_step(model, tx, schedule, config))
    outs[accum] = step(state, batch, jax.random.PRNGKey(0))
  (s1, m1), (s4, m4) = outs[1], outs[4]
  assert float(m4['train_loss']) == pytest.approx(float(m1['train_loss']), rel=1e-6)
  for a, b in zip(jax.tree.leaves(s1['params']), jax.tree.leaves(s4['params'])):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_batchnorm_stats_threaded_through_micro_batches():
  model = models.get_model({'model_type': 'resnet_cifar', 'blocks_per_stage': 1},
                           num_classes=10)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
  tx = optax.sgd(0.0)
  state = {'step': jnp.zeros((), jnp.int32), 'params': variables['params'],
           'opt_state': tx.init(variables['params']),
           'batch_stats': variables['batch_stats']}
  batch = _random_batch(16)
  config = ml_collections.ConfigDict({'accum_steps': 2})
  new, _ = jax.jit(train_step.make_train_step(model, tx, lambda c: 0.0, config))(
      state, batch, jax.random.PRNGKey(0))
  # Second path: apply the two micro-batches (examples 0,2,4.. then 1,3,5..)
  # one after the other with mutable batch_stats.
  bs = variables['batch_stats']
  apply = jax.jit(lambda bs, x: model.apply(
      {'params': variables['params'], 'batch_stats': bs}, x, train=True,
      mutable=['batch_stats'])[1]['batch_stats'])
  for i in range(2):
    bs = apply(bs, batch['image'][i::2])
  for a, b in zip(jax.tree.leaves(new['batch_stats']), jax.tree.leaves(bs)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  changed = [not np.allclose(a, b) for a, b in zip(
      jax.tree.leaves(new['batch_stats']), jax.tree.leaves(variables['batch_stats']))]
  assert any(changed)


def test_deit_hard_label_distillation_loss():
  student, teacher = _tiny_model('distill'), _tiny_model('token')
  s_params, t_params = _random_params(student, 3), _random_params(teacher, 5)
  tx = optax.sgd(0.0)
  state = {'step': jnp.zeros((), jnp.int32), 'params': s_params,
           'opt_state': tx.init(s_params)}
  batch = _random_batch(16)
  config = ml_collections.ConfigDict({'accum_steps': 1})
  step = jax.jit(train_step.make_train_step(student, tx, lambda c: 0.0, config,
                                       teacher))
  _, metrics = step(state, batch, jax.random.PRNGKey(0), {'params': t_params})
  logits = jax.jit(lambda x: student.apply({'params': s_params}, x,
                                           train=True))(batch['image'])
  t_label = jnp.argmax(jax.jit(lambda x: teacher.apply(
      {'params': t_params}, x))(batch['image']), -1)
  assert len(set(np.asarray(t_label).tolist())) > 1  # a non-trivial teacher
  want = 0.5 * optim.cross_entropy(logits[:, 0], batch['label']).mean() + \
      0.5 * optim.cross_entropy(logits[:, 1], t_label).mean()
  assert float(metrics['train_loss']) == pytest.approx(float(want), rel=1e-6)


# ---------------------------------------------------------------------------
# Fine-tuning from an ImageNet-21k-layout checkpoint at a new resolution.
# ---------------------------------------------------------------------------

def test_finetune_from_in21k_checkpoint_at_new_resolution(tmp_path):
  golden = golden_dir()
  arch = json.loads((golden / 'tiny_in21k.json').read_text())
  model_cfg = arch['vit_jax_config']
  original = ckpt_lib.load(str(golden / 'tiny_in21k.npz'))
  config = tiny_config()
  config.model = ml_collections.ConfigDict({
      'model_name': 'tiny-in21k-ft', 'patches': model_cfg['patches'],
      'hidden_size': model_cfg['hidden_size'],
      'transformer': model_cfg['transformer'], 'classifier': 'token',
      'representation_size': None, 'resnet': None})
  config.pretrained_path = str(golden / 'tiny_in21k.npz')
  config.image_size = 48          # 12x12 grid instead of the checkpoint's 8x8.
  config.total_steps = 2
  # A zero lr is refused; 1e-30 (clipped grads) moves no weight by more than
  # 1e-29: the loaded weights compare up to that.
  config.lr.base = 1e-30
  result = train.run(config, str(tmp_path))
  p = ckpt_lib.flatten(result.params)
  # Head replaced by a zero-initialised 10-class one, pre_logits dropped
  # (paper App. B.1.1): the first loss is exactly ln(10).
  assert p['head/kernel'].shape == (64, 10) and np.abs(p['head/kernel']).max() < 1e-28
  assert not any(k.startswith('pre_logits') for k in p)
  assert result.history[0]['train_loss'] == pytest.approx(math.log(10), rel=1e-6)
  # Position embeddings resampled 8x8 -> 12x12, class token kept.
  key = 'Transformer/posembed_input/pos_embedding'
  want = ckpt_lib.interpolate_posembed(ckpt_lib.flatten(original)[key], 145, True)
  np.testing.assert_allclose(p[key], want, rtol=1e-6, atol=1e-28)
  assert p[key].shape == (1, 145, 64)
  # Everything else is the checkpoint's.
  for k, v in ckpt_lib.flatten(original).items():
    if not k.startswith(('head/', 'pre_logits/')) and k != key:
      np.testing.assert_allclose(p[k], v, rtol=0, atol=1e-28, err_msg=k)


# ---------------------------------------------------------------------------
# Clear errors.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('key,value,message', [
    ('batch_size', '512', "config.batch_size must be int, got str '512'"),
    ('total_steps', 10.5, 'config.total_steps must be int, got float 10.5'),
    ('lr.base', 'fast', 'config.lr.base must be int or float'),
    ('optim.grad_clip_norm', 'yes', 'config.optim.grad_clip_norm must be'),
    ('batch_size', True, 'config.batch_size must be int, got bool'),
])
def test_config_value_of_wrong_type(key, value, message):
  # ConfigDict refuses type changes of existing fields, but a config file
  # that builds its dict afresh can hold anything: validate catches it.
  *parents, leaf = key.split('.')
  raw = tiny_config().to_dict()
  node = raw
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(train.ConfigError, match=re.escape(message)):
    train.validate_config(ml_collections.ConfigDict(raw))


def test_batch_not_divisible_by_accum_steps():
  config = tiny_config()
  config.accum_steps = 5
  with pytest.raises(train.ConfigError, match='multiple of config.accum_steps=5'):
    train.validate_config(config)


def test_missing_checkpoint_says_where_to_get_it(tmp_path):
  config = tiny_config()
  config.pretrained_path = str(tmp_path / 'ViT-B_16.npz')
  start = time.time()
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    train.run(config, str(tmp_path / 'w'))
  assert time.time() - start < 10
  assert 'not found' in str(e.value)
  assert 'load by name' in str(e.value) and 'ViT-B_16' in str(e.value)
  assert not (tmp_path / 'w' / 'checkpoints').exists()  # never random init


def test_unreachable_storage_fails_fast(monkeypatch, tmp_path):
  """No network: seconds, not gfile's minutes, for gs:// files of any bucket."""
  from vit_jax import download

  def hang(address, timeout=None, *args, **kwargs):
    time.sleep(min(timeout or 30, 30))
    raise TimeoutError('timed out')
  monkeypatch.setattr(socket, 'create_connection', hang)
  start = time.time()
  with pytest.raises(ckpt_lib.CheckpointError, match='storage.googleapis.com is not reachable'):
    config_schema.check_remote_reachable('gs://another-bucket/ViT-B_16.npz', timeout=0.5)
  assert time.time() - start < 5
  # The official bucket goes through vit_jax.download (https, cached).
  monkeypatch.setattr(download, 'TIMEOUT_S', 0.5)
  monkeypatch.setenv('VIT_JAX_CACHE_DIR', str(tmp_path))
  config = tiny_config()
  config.pretrained_path = 'gs://vit_models/imagenet21k/ViT-B_16.npz'
  start = time.time()
  with pytest.raises(ckpt_lib.CheckpointError, match='no network') as e:
    config_schema.check_pretrained_available(config)
  assert time.time() - start < 5
  assert 'curl -L --create-dirs' in str(e.value)

  def refuse(*args, **kwargs):
    raise OSError('Name or service not known')
  monkeypatch.setattr(socket, 'create_connection', refuse)
  with pytest.raises(ckpt_lib.CheckpointError, match='is not reachable'):
    config_schema.check_remote_reachable('gs://another-bucket/ViT-B_16.npz')


def test_checkpoint_of_another_architecture(tmp_path):
  config = tiny_config()
  config.pretrained_path = str(golden_dir() / 'tiny.npz')  # width 64, 2 layers
  with pytest.raises(ckpt_lib.CheckpointError, match='another architecture'):
    train.run(config, str(tmp_path))


def test_unknown_dataset(tmp_path):
  config = tiny_config()
  config.dataset = 'no_such_dataset_xyz'
  with pytest.raises(ValueError, match="Unknown dataset 'no_such_dataset_xyz'"):
    train.run(config, str(tmp_path))


def test_nan_guard_stops_with_clear_message(tmp_path):
  config = tiny_config()
  config.lr.base = 1e38   # Finite, but the params overflow after step 1.
  config.log_every = 2
  # The guard looks at every step, not only the logged ones.
  with pytest.raises(FloatingPointError, match=r'Training diverged: non-finite '
                     r'metrics at step [12].*Lower config.lr.base.*No checkpoint'):
    train.run(config, str(tmp_path))
  # Nothing diverged was checkpointed (checkpoint_every=2).
  assert not any(p.name.isdigit() for p in (tmp_path / 'checkpoints').iterdir())


def test_batchnorm_model_and_distillation_end_to_end(tmp_path):
  # A BatchNorm ResNet (the RPT report's ResNet-56, 1 block per stage here):
  # batch_stats are trained, used by eval, and exported beside the params.
  config = tiny_config()
  config.model = ml_collections.ConfigDict({
      'model_type': 'resnet_cifar', 'model_name': 'tiny-resnet',
      'blocks_per_stage': 1})
  config.total_steps = 3
  teacher = train.run(config, str(tmp_path / 'teacher'))
  variables = ckpt_lib.load_variables(str(tmp_path / 'teacher' / 'tiny-resnet.npz'))
  assert set(variables) == {'params', 'batch_stats'}
  assert_params_close(variables['batch_stats'], teacher.batch_stats, rtol=0)
  # DeiT: a student with a distillation token learns from that frozen teacher.
  student = tiny_config()
  student.model.classifier = 'distill'
  student.total_steps = 2
  student.distill = ml_collections.ConfigDict({
      'teacher_model': 'ResNet-56',
      'teacher_checkpoint': str(tmp_path / 'teacher' / 'tiny-resnet.npz')})
  with pytest.raises(ckpt_lib.CheckpointError, match='cannot be used as .*does not fit'):
    train.run(student, str(tmp_path / 'wrong_teacher'))  # 9 blocks vs 1
  missing = student.copy_and_resolve_references()
  missing.distill.teacher_checkpoint = str(tmp_path / 'resnet56_cifar10' / 'ResNet-56.npz')
  with pytest.raises(ckpt_lib.CheckpointError, match=r"teacher_checkpoint='.*ResNet-56.npz' does "
                     r'not exist\. Train the teacher \(ResNet-56\) on the same data first'):
    train.run(missing, str(tmp_path / 'no_teacher'))
  student.distill = ml_collections.ConfigDict({
      'teacher_model': {'model_type': 'resnet_cifar', 'blocks_per_stage': 1},
      'teacher_checkpoint': student.distill.teacher_checkpoint})
  result = train.run(student, str(tmp_path / 'student'))
  # Zero-initialised heads: both cross-entropies start at ln(10).
  assert result.history[0]['train_loss'] == pytest.approx(math.log(10), rel=1e-6)
  assert 'head_dist' in result.params
  assert result.metrics['num_test_examples'] == 359
