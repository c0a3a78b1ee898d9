"""The learning-rate protocol (paper App. B.1.1): dev split, grid, pick the
best on dev, retrain on full train, resume after a kill."""

import json
import subprocess
import sys

import ml_collections
import pytest
from conftest import REPO, SUBPROCESS_ENV, tiny_config

from vit_jax import sweep


class _Result:
  def __init__(self, metrics):
    self.metrics = metrics


class FakeTrain:
  """Dev accuracy peaks at lr 0.01: the known answer. Can die at call k."""

  def __init__(self, die_at=None):
    self.calls, self.die_at = [], die_at

  def __call__(self, config, workdir):
    self.calls.append((config.lr.base, config.train_split, config.test_split, workdir))
    if self.die_at is not None and len(self.calls) == self.die_at:
      raise KeyboardInterrupt('killed')
    acc = {0.001: 0.5, 0.003: 0.7, 0.01: 0.9, 0.03: 0.6}[config.lr.base]
    if config.test_split == 'test':
      acc -= 0.05
    return _Result({'accuracy_test': acc, 'loss_test': 1 - acc})


def _config():
  c = ml_collections.ConfigDict({'train_split': 'train', 'test_split': 'test',
                                 'lr': {'base': 0.5}, 'scratch_baseline': {'x': 1}})
  c.lock()
  return c


def test_dev_splits():
  assert sweep.dev_splits('train', 0.02) == ('train[:98%]', 'train[98%:]')
  assert sweep.dev_splits('train[:90%]', 0.1) == ('train[0%:81%]', 'train[81%:90%]')
  assert sweep.dev_splits('train[10%:60%]', 0.1) == ('train[10%:55%]', 'train[55%:60%]')
  assert sweep.dev_splits('train[:1000]', 0.1) == ('train[0:900]', 'train[900:1000]')
  with pytest.raises(sweep.SweepError, match='fraction in'):
    sweep.dev_splits('train', 1.5)
  with pytest.raises(sweep.SweepError, match='Cannot carve'):
    sweep.dev_splits('train[-100:]', 0.1)
  assert sweep.default_dev_fraction(3_680) == 0.1          # Pets
  assert sweep.default_dev_fraction(50_000) == 0.02        # CIFAR
  assert sweep.default_dev_fraction(1_281_167) == 0.01     # ImageNet


def test_picks_the_best_on_dev_and_retrains_on_full_train(tmp_path):
  fake = FakeTrain()
  state = sweep.run_sweep(_config(), str(tmp_path), num_train=50_000, train_fn=fake)
  # Four dev runs on train[:98%] scored on train[98%:], then the final one.
  assert [c[0] for c in fake.calls] == [0.001, 0.003, 0.01, 0.03, 0.01]
  assert all(c[1:3] == ('train[:98%]', 'train[98%:]') for c in fake.calls[:4])
  assert fake.calls[4][1:3] == ('train', 'test')
  assert state['best_lr'] == 0.01
  assert state['final']['accuracy_test'] == pytest.approx(0.85)
  saved = json.loads((tmp_path / 'sweep.json').read_text())
  assert saved['dev']['0.003']['accuracy_dev'] == 0.7 and saved['best_lr'] == 0.01
  table = sweep.format_table(state)
  assert '0.01      0.9000  <- best' in table and 'accuracy_test 0.8500' in table
  # Done means done: a relaunch trains nothing.
  again = FakeTrain()
  sweep.run_sweep(_config(), str(tmp_path), num_train=50_000, train_fn=again)
  assert again.calls == []


def test_ties_go_to_the_smaller_rate(tmp_path):
  def flat(config, workdir):
    return _Result({'accuracy_test': 0.5})
  state = sweep.run_sweep(_config(), str(tmp_path), grid=(0.03, 0.001), dev_fraction=0.1,
                          train_fn=flat)
  assert state['best_lr'] == 0.001


def test_resumes_after_a_kill(tmp_path):
  with pytest.raises(KeyboardInterrupt):
    sweep.run_sweep(_config(), str(tmp_path), num_train=50_000, train_fn=FakeTrain(die_at=3))
  assert set(json.loads((tmp_path / 'sweep.json').read_text())['dev']) == {'0.001', '0.003'}
  fake = FakeTrain()
  state = sweep.run_sweep(_config(), str(tmp_path), num_train=50_000, train_fn=fake)
  # Only the unfinished runs, in the same directories the killed one used.
  assert [c[0] for c in fake.calls] == [0.01, 0.03, 0.01]
  assert fake.calls[0][3] == str(tmp_path / 'lr_0.01')
  assert state['best_lr'] == 0.01
  # Another grid in the same workdir is refused, not mixed in.
  with pytest.raises(sweep.SweepError, match='belongs to another sweep'):
    sweep.run_sweep(_config(), str(tmp_path), grid=(0.1, 0.3), num_train=50_000,
                    train_fn=FakeTrain())


def test_real_sweep_on_digits_picks_the_rate_that_learns(tmp_path):
  """A known answer with the real loop: lr 1e-6 cannot move a zero head in 40
  steps (dev accuracy near chance), lr 0.1 learns (~0.38)."""
  config = tiny_config()
  config.total_steps, config.checkpoint_every, config.log_every = 40, 20, 10
  state = sweep.run_sweep(config, str(tmp_path), grid=(1e-6, 0.1))
  assert state['dev_fraction'] == 0.1 and state['dev_split'] == 'train[90%:]'
  dev = {k: v['accuracy_dev'] for k, v in state['dev'].items()}
  assert dev['0.1'] > dev['1e-06'] + 0.15, dev
  assert state['best_lr'] == 0.1
  assert state['final']['accuracy_test'] > 0.25
  cfg = json.loads((tmp_path / 'lr_0.1' / 'config.json').read_text())
  assert cfg['train_split'] == 'train[:90%]' and cfg['test_split'] == 'train[90%:]'


def test_command_line(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'vit_jax.sweep', '--config=tests/_tiny_config.py',
       f'--workdir={tmp_path}', '--grid=0.3', '--dev_split=0.2', '--config.total_steps=2'],
      cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'dev split train[80%:]' in out.stdout and '<- best' in out.stdout
  assert json.loads((tmp_path / 'sweep.json').read_text())['best_lr'] == 0.3
  bad = subprocess.run(
      [sys.executable, '-m', 'vit_jax.sweep', '--config=tests/_tiny_config.py',
       f'--workdir={tmp_path}/b', '--grid=0.3,-1'],
      cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 1 and 'ERROR (SweepError): ' in bad.stderr
  assert 'distinct positive learning rates' in bad.stderr
