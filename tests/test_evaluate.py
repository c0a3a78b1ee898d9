"""vit_jax.evaluate and the fine-tuned vs. from-scratch comparison
(config.scratch_baseline), on the 1-layer digits ViT of tests/_tiny_config.py.
"""

import json
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from conftest import REPO, SUBPROCESS_ENV, tiny_config

from vit_jax import checkpoint as ckpt_lib
from vit_jax import evaluate, train

BASELINE = {'lr': {'base': 0.02}, 'optim': {'name': 'adamw', 'weight_decay': 0.1}}


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  """A 6-step run of the tiny config: its exported .npz and final metrics."""
  workdir = tmp_path_factory.mktemp('pretrained')
  result = train.run(tiny_config(), str(workdir))
  return workdir / 'tiny-test.npz', result.metrics


def test_evaluate_reproduces_the_training_eval(pretrained):
  npz, metrics = pretrained
  got = evaluate.evaluate_checkpoint(tiny_config(), str(npz))
  assert got['num_test_examples'] == 359  # every digit test image, once
  assert got['accuracy_test'] == metrics['accuracy_test']
  np.testing.assert_allclose(got['loss_test'], metrics['loss_test'], rtol=1e-6)


def test_evaluate_at_another_resolution_interpolates_posemb(pretrained, tmp_path):
  """At 12px (6x6 grid; trained 4x4) evaluate resizes the posemb itself: the
  same numbers as a checkpoint resized beforehand with interpolate_posembed."""
  npz, metrics = pretrained
  config = tiny_config()
  config.image_size = 12
  got = evaluate.evaluate_checkpoint(config, str(npz))
  params = ckpt_lib.load(str(npz))
  pos = params['Transformer']['posembed_input']
  pos['pos_embedding'] = ckpt_lib.interpolate_posembed(
      pos['pos_embedding'], 37, has_class_token=True, new_grid=(6, 6))
  ckpt_lib.save(params, str(tmp_path / 'resized.npz'))
  resized = evaluate.evaluate_checkpoint(config, str(tmp_path / 'resized.npz'))
  assert got == resized and got['num_test_examples'] == 359
  assert got['loss_test'] != metrics['loss_test']   # Another resolution, other numbers.


def test_evaluate_rejects_a_head_of_another_size(pretrained):
  npz, _ = pretrained
  config = tiny_config()
  config.num_classes = 7
  with pytest.raises(train.ConfigError, match='10-class head but digits has 7'):
    evaluate.evaluate_checkpoint(config, str(npz))


def test_evaluate_cli(pretrained):
  npz, metrics = pretrained
  out = subprocess.run(
      [sys.executable, '-m', 'vit_jax.evaluate', '--config=tests/_tiny_config.py',
       f'--checkpoint={npz}', '--json'],
      cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert json.loads(out.stdout.strip().splitlines()[-1])['accuracy_test'] == metrics['accuracy_test']
  bad = subprocess.run(
      [sys.executable, '-m', 'vit_jax.evaluate', '--config=tests/_tiny_config.py',
       '--checkpoint=/nonexistent.npz'],
      cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300, check=False)
  assert bad.returncode == 1 and 'ERROR (HubError): Checkpoint not found: /nonexistent.npz' \
      in bad.stderr


# ---------------------------------------------------------------------------
# config.scratch_baseline
# ---------------------------------------------------------------------------

def finetune_config(npz) -> ml_collections.ConfigDict:
  c = tiny_config()
  c.pretrained_path = str(npz)
  c.scratch_baseline = ml_collections.ConfigDict(BASELINE)
  return c


def test_baseline_config_is_the_same_run_from_scratch(pretrained):
  npz, _ = pretrained
  config = finetune_config(npz)
  base = train.scratch_baseline_config(config)
  assert base.pretrained_path is None and base.scratch_baseline is None
  assert base.optim.name == 'adamw' and base.lr.base == 0.02
  for key in ('total_steps', 'batch_size', 'image_size', 'dataset', 'seed'):
    assert base[key] == config[key]
  assert base.model == config.model
  assert train.scratch_baseline_config(tiny_config()) is None


def test_baseline_may_not_change_what_is_compared(pretrained):
  npz, _ = pretrained
  config = finetune_config(npz)
  config.scratch_baseline.total_steps = 100
  with pytest.raises(train.ConfigError, match='must not change total_steps'):
    train.scratch_baseline_config(config)


def test_baseline_needs_a_pretrained_checkpoint():
  config = tiny_config()
  config.scratch_baseline = ml_collections.ConfigDict(BASELINE)
  with pytest.raises(train.ConfigError, match='set config.pretrained_path'):
    train.validate_config(config)
  config = tiny_config()
  config.pretrained_path = 'x.npz'
  config.scratch_baseline = 3  # e.g. --config.scratch_baseline=3 in a config file
  with pytest.raises(train.ConfigError, match='scratch_baseline must be ConfigDict or dict or None'):
    train.validate_config(config)


def test_finetune_with_baseline_equals_two_separate_runs(pretrained, tmp_path):
  """Both halves of the comparison equal the runs a user would launch by hand."""
  npz, _ = pretrained
  config = finetune_config(npz)
  both = train.train_and_evaluate(config, str(tmp_path / 'both'))

  alone = finetune_config(npz)
  alone.scratch_baseline = None
  fine = train.train_and_evaluate(alone, str(tmp_path / 'fine'))
  scratch = tiny_config()
  scratch.update(ml_collections.ConfigDict(BASELINE))
  base = train.train_and_evaluate(scratch, str(tmp_path / 'scratch'))

  assert both['accuracy_test'] == fine['accuracy_test']
  assert both['accuracy_test_scratch'] == base['accuracy_test']
  assert both['loss_test_scratch'] == base['loss_test']
  # The fine-tune started from the checkpoint (head aside), the baseline did not.
  tuned = ckpt_lib.load(str(tmp_path / 'both' / 'tiny-test.npz'))
  from_scratch = ckpt_lib.load(str(tmp_path / 'both' / 'scratch' / 'tiny-test.npz'))
  np.testing.assert_array_equal(from_scratch['embedding']['kernel'],
                                ckpt_lib.load(str(tmp_path / 'scratch' / 'tiny-test.npz'))['embedding']['kernel'])
  assert not np.allclose(tuned['embedding']['kernel'], from_scratch['embedding']['kernel'])
  comparison = json.loads((tmp_path / 'both' / 'comparison.json').read_text())
  assert comparison['steps'] == config.total_steps
  assert comparison['fine_tuned']['accuracy_test'] == both['accuracy_test']
  assert comparison['from_scratch']['accuracy_test'] == base['accuracy_test']
