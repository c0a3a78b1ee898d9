"""The shipped checkpoint (checkpoints/SmallViT_8-tiny_imagenet-32px.npz).

Loads through vit_jax.checkpoint.load with exactly the SmallViT_8 tree, fits
the size limit, and (with ../shared's Tiny-ImageNet) reproduces the val
accuracy its provenance file states, through the documented eval command's
function.
"""

import os
import pathlib
import re
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, shared_dir

from vit_jax import checkpoint as ckpt_lib
from vit_jax import evaluate, models

NAME = 'SmallViT_8-tiny_imagenet-32px'
NPZ = REPO / 'checkpoints' / f'{NAME}.npz'
PROVENANCE = REPO / 'checkpoints' / f'{NAME}.md'
LABELS = REPO / 'checkpoints' / f'{NAME}.labels.txt'


def stated_accuracy() -> float:
  """The `accuracy_test=...` the provenance file quotes from the eval command."""
  m = re.search(r'accuracy_test=([0-9.]+)', PROVENANCE.read_text())
  assert m, f'{PROVENANCE} quotes no accuracy_test=...'
  return float(m.group(1))


def test_checkpoint_is_small_and_has_the_smallvit_8_tree():
  assert NPZ.stat().st_size <= 25 * 2 ** 20
  params = ckpt_lib.load(str(NPZ))
  model = models.get_model('SmallViT_8', num_classes=200)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))
  want = {k: v.shape for k, v in ckpt_lib.flatten(shapes['params']).items()}
  got = {k: v.shape for k, v in ckpt_lib.flatten(params).items()}
  assert got == want
  assert sum(int(np.prod(s)) for s in got.values()) == 2_752_712
  assert all(np.isfinite(v).all() for v in ckpt_lib.flatten(params).values())
  # 32px pre-training: a 4x4 grid plus the class token.
  assert params['Transformer']['posembed_input']['pos_embedding'].shape == (1, 17, 192)


def test_labels_and_provenance():
  names = LABELS.read_text().splitlines()
  assert len(names) == 200 and names[0].startswith('goldfish')
  text = PROVENANCE.read_text()
  for needed in ('python -m vit_jax.main --config=configs/pretrain_tiny_imagenet.py',
                 'python -m vit_jax.evaluate', 'Wall time', 'steps'):
    assert needed in text, needed
  assert 0.005 < stated_accuracy() < 1.0  # above chance (1/200)


def _tiny_imagenet() -> pathlib.Path:
  archive = shared_dir() / 'data' / 'tiny-imagenet-200.tar.gz'
  cache = pathlib.Path(os.environ.get(
      'VIT_JAX_TEST_CACHE', pathlib.Path.home() / '.cache' / 'vit_jax_test'))
  root = cache / 'tiny-imagenet-200'
  done = cache / '.tiny-imagenet-200.extracted'
  if not done.exists():
    with tarfile.open(archive) as tar:
      tar.extractall(cache, filter='data')
    done.touch()
  return root


def test_stated_val_accuracy_is_reproduced():
  from configs import pretrain_tiny_imagenet
  root = _tiny_imagenet()
  config = pretrain_tiny_imagenet.get_config()
  config.dataset = f'folder:{root}'
  got = evaluate.evaluate_checkpoint(config, str(NPZ))
  assert got['num_test_examples'] == 10_000
  assert got['accuracy_test'] == pytest.approx(stated_accuracy(), abs=1e-3)  # a few images on another CPU
