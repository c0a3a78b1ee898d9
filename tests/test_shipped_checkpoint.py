"""The shipped checkpoint (checkpoints/SmallViT_8-tiny_imagenet-32px.npz).

Loads through vit_jax.checkpoint.load with exactly the SmallViT_8 tree, fits
the size limit, and (with ../shared's Tiny-ImageNet) reproduces the val
accuracy its provenance file states, through the documented eval command's
function.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, tiny_imagenet_val_dir

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


def test_stated_val_accuracy_is_reproduced():
  from configs import pretrain_tiny_imagenet
  config = pretrain_tiny_imagenet.get_config()
  config.dataset = f'folder:{tiny_imagenet_val_dir()}'
  config.train_split = 'val'  # only val is extracted; its classes are the same 200, in the same order
  got = evaluate.evaluate_checkpoint(config, str(NPZ))
  assert got['num_test_examples'] == 10_000
  assert got['accuracy_test'] == pytest.approx(stated_accuracy(), abs=1e-3)  # a few images on another CPU
