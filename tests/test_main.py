"""The command line: config files with args and overrides, clear failures,
and one full run on an image folder as a new user would do it."""

import importlib
import re
import json
import pathlib
import socket
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest
from PIL import Image

from conftest import REPO, SUBPROCESS_ENV
from vit_jax import checkpoint as ckpt_lib
from vit_jax import config_schema

ENV = SUBPROCESS_ENV


def main(*args, timeout=300):
  return subprocess.run([sys.executable, '-m', 'vit_jax.main', *args],
                        cwd=REPO, env=ENV, capture_output=True, text=True,
                        timeout=timeout, check=False)


@pytest.mark.parametrize('spec', [
    'finetune_b16', 'finetune_b32', 'finetune_l16', 'finetune_r50_b16',
    'quickstart', 'vit:b16,cifar10', 'vit:l16,imagenet2012',
    'vit:b32,oxford_iiit_pet', 'augreg:B_16', 'augreg:S_16,cifar100',
    'folder:/data/x', 'folder:/data/x,scratch', 'pretrain_tiny_imagenet',
    'finetune_shipped:digits', 'finetune_shipped:cifar10',
    'finetune_shipped:tiny_imagenet', 'posemb_ablation:learn',
    'head_ablation:gap,3e-4', 'finetune_rpt:b16s,tiny_imagenet', 'finetune_rpt:r50_b16,tf_flowers',
    'scratch:rot_vit,cifar10', 'mpp:tiny_imagenet'])
def test_every_config_validates(spec):
  name, _, arg = spec.partition(':')
  module = importlib.import_module(f'configs.{name}')
  config = module.get_config(arg) if arg else module.get_config()
  assert module.__doc__ and 'python -m vit_jax.main' in module.__doc__
  # It states the result to expect, with a number ("Expected result: ... 0.98").
  assert re.search(r'[Ee]xpected.{0,400}?\d', module.__doc__, re.S), module.__doc__
  if config.get('recipes'):
    # Model and recipe come from the checkpoint at run time; here, a given model.
    config.model_name = 'ViT-B_16'
    config = config_schema.resolve_config(config)
  config_schema.validate_config(config)


def test_paper_recipe_in_finetune_b16():
  config = importlib.import_module('configs.finetune_b16').get_config()
  assert config.pretrained_path == 'gs://vit_models/imagenet21k/ViT-B_16.npz'
  assert (config.image_size, config.batch_size, config.total_steps) == (384, 512, 10_000)
  assert (config.lr.warmup_steps, config.lr.decay_type) == (500, 'cosine')
  assert (config.optim.name, config.optim.momentum) == ('sgd', 0.9)
  assert config.optim.grad_clip_norm == 1.0 and config.optim.weight_decay == 0.0
  assert config.accum_steps > 1 and config.batch_size % config.accum_steps == 0
  assert config.train_split == 'train[:98%]'
  # Overriding the model name moves the default checkpoint along.
  config.model_name = 'ViT-B_32'
  assert config.pretrained_path == 'gs://vit_models/imagenet21k/ViT-B_32.npz'


def test_dataset_presets_follow_the_paper():
  common = importlib.import_module('configs.common')
  steps = {k: v['total_steps'] for k, v in common.DATASET_PRESETS.items()}
  # Paper Table 4.
  assert steps['imagenet2012'] == 20_000
  assert steps['cifar10'] == steps['cifar100'] == 10_000
  assert steps['oxford_iiit_pet'] == steps['oxford_flowers102'] == 500
  for p in common.DATASET_PRESETS.values():
    assert p['lr'] in (0.001, 0.003, 0.01, 0.03)  # Table 4's sweep
  assert common.expected_accuracy('ViT-B_16', 'cifar10') == 98.95
  with pytest.raises(ValueError, match='configs/folder.py'):
    common.with_dataset(common.get_config(), 'mnist')


def test_missing_checkpoint_via_cli_fails_fast_with_download_hint(tmp_path):
  start = time.time()
  out = main('--config=configs/vit.py:b32,cifar100', f'--workdir={tmp_path}',
             f'--config.pretrained_path={tmp_path}/ViT-B_32.npz')
  assert out.returncode == 1
  assert 'Pre-trained checkpoint not found' in out.stderr
  assert 'load by name' in out.stderr and 'ViT-B_16' in out.stderr
  assert time.time() - start < 120  # no data or model work before the check
  # A refused launch leaves no config.json: it is the identity of an accepted run.
  assert not (tmp_path / 'config.json').exists()
  cfg = importlib.import_module('configs.vit').get_config('b32,cifar100')
  assert cfg.model_name == 'ViT-B_32' and cfg.dataset == 'cifar100'
  assert cfg.num_classes is None  # From the data, never from a preset.


def _network_reachable() -> bool:
  try:
    socket.create_connection(('storage.googleapis.com', 443), timeout=3).close()
    return True
  except OSError:
    return False


def test_finetune_b16_without_file_or_network_fails_fast(tmp_path):
  if _network_reachable():
    pytest.skip('storage.googleapis.com is reachable: this would download '
                'ViT-B_16.npz (391 MiB).')
  start = time.time()
  out = subprocess.run(
      [sys.executable, '-m', 'vit_jax.main', '--config=configs/finetune_b16.py',
       f'--workdir={tmp_path}'], cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(ENV, VIT_JAX_CACHE_DIR=str(tmp_path / 'cache')))   # Nothing cached.
  assert out.returncode == 1
  assert 'Cannot download https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz' \
      in out.stderr and 'no network' in out.stderr
  assert 'curl -L --create-dirs' in out.stderr
  assert time.time() - start < 120   # not tf.io.gfile's ~200 s of retries


def test_wrong_type_on_command_line_is_rejected(tmp_path):
  out = main('--config=configs/quickstart.py', f'--workdir={tmp_path}',
             '--config.batch_size=lots')
  assert out.returncode != 0
  assert 'batch_size' in out.stderr and 'lots' in out.stderr


def test_missing_flags_say_what_is_needed():
  out = main('--config=configs/quickstart.py')
  assert out.returncode != 0 and 'workdir' in out.stderr


def _write_folder(root: pathlib.Path):
  """Two classes a model separates easily: dark vs bright 8x8 PNGs."""
  rng = np.random.default_rng(0)
  for split, n in (('train', 24), ('test', 10)):
    for label, cls in enumerate(('dark', 'bright')):
      d = root / split / cls
      d.mkdir(parents=True)
      for i in range(n):
        base = 40 if label == 0 else 215
        img = np.clip(base + rng.integers(-30, 30, (8, 8, 3)), 0, 255)
        Image.fromarray(img.astype(np.uint8)).save(d / f'{i}.png')


def test_image_folder_from_the_command_line(tmp_path):
  root = tmp_path / 'images'
  _write_folder(root)
  workdir = tmp_path / 'work'
  out = main(f'--config=configs/folder.py:{root},scratch', f'--workdir={workdir}',
             '--config.total_steps=8', '--config.image_size=8',
             '--config.batch_size=16', '--config.batch_size_eval=20',
             '--config.pp.train=resize', '--config.model.patches.size=(4, 4)',
             '--config.model.transformer.num_layers=1', '--config.lr.base=0.01',
             '--config.log_every=4')
  assert out.returncode == 0, out.stderr[-4000:]
  assert 'Final: accuracy_test=' in out.stdout
  # Class names from the folders, in label order; all 20 test images scored.
  assert (workdir / 'labels.txt').read_text().split() == ['bright', 'dark']
  final = json.loads((workdir / 'final_metrics.json').read_text())
  assert final['num_test_examples'] == 20 and final['accuracy_test'] == 1.0
  # The resolved config, command-line overrides included.
  cfg = ml_collections.ConfigDict(json.loads((workdir / 'config.json').read_text()))
  assert cfg.total_steps == 8 and cfg.dataset == f'folder:{root}'
  assert tuple(cfg.model.patches.size) == (4, 4)
  params = ckpt_lib.load(str(workdir / 'vit-scratch.npz'))
  assert params['head']['kernel'].shape == (64, 2)
  assert params['embedding']['kernel'].shape == (4, 4, 3, 64)
