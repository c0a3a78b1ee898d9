"""The core install runs without TensorFlow; training modules say which extra they need.

Slow tests (CI's `-m slow`): a venv with `pip install -e <repo>` (core only,
no [train]) where `import tensorflow` fails, running the core path's commands
on the shipped checkpoint: checkpoint, predict, analysis, benchmark, and
export of a workdir trained on `--config.dataset=synthetic` (no TensorFlow).
The venv is cached under $VIT_JAX_TEST_CACHE (default ~/.cache/vit_jax_test)
and re-pointed at this repository on every run; a fresh machine builds it
from PyPI, and the tests skip when PyPI cannot be reached.

Fast tests: the one-line messages, with TensorFlow hidden from a subprocess of
this environment.
"""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, SHIPPED
from PIL import Image

NPZ = SHIPPED
TRAIN_HINT = "pip install 'vit_jax[train]'"
TF_MODULES = ('tensorflow', 'tensorflow_datasets', 'tensorboard')


def _env() -> dict:
  env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'PYTHONHOME', 'XLA_FLAGS')}
  env.update(JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1', PIP_DISABLE_PIP_VERSION_CHECK='1')
  return env


def _run(cmd: list, timeout: int = 600, **kw) -> subprocess.CompletedProcess:
  return subprocess.run([str(c) for c in cmd], cwd=REPO, env=_env(), capture_output=True,
                        text=True, timeout=timeout, **kw)


def _last_line(p: subprocess.CompletedProcess) -> str:
  lines = p.stderr.strip().splitlines()
  return lines[-1] if lines else ''


# ---------------------------------------------------------------------------
# Fast: the messages, TensorFlow hidden in this environment
# ---------------------------------------------------------------------------

# Makes every TensorFlow package unimportable, as in a core install.
HIDE_TF = ('import sys\n'
           + ''.join(f'sys.modules[{m!r}] = None\n' for m in TF_MODULES))


@pytest.mark.parametrize('module', ['vit_jax.input_pipeline', 'vit_jax.preprocess'])
def test_training_modules_name_the_extra_in_one_line(module):
  p = _run([sys.executable, '-c', HIDE_TF + f'import {module}'], timeout=300)
  assert p.returncode != 0
  assert _last_line(p) == f"ImportError: {module} needs TensorFlow: {TRAIN_HINT}" + (
      ' (vit_jax.images has the eval preprocessing without it).' if module.endswith('preprocess') else ''
  ), p.stderr


def test_remote_checkpoint_without_tensorflow_names_the_extra():
  code = HIDE_TF + (
      'from vit_jax import checkpoint\n'
      'for f in (checkpoint._read_bytes, checkpoint.read_sidecar):\n'
      '  try:\n'
      "    f('gs://some-bucket/own/model.npz')\n"
      '  except checkpoint.CheckpointError as e:\n'
      "    print('ERR', e)\n")
  p = _run([sys.executable, '-c', code], timeout=300)
  assert p.returncode == 0, p.stderr
  lines = p.stdout.strip().splitlines()
  assert len(lines) == 2, p.stdout
  for line in lines:
    assert line.startswith('ERR gs://some-bucket/own/model') and TRAIN_HINT in line


def test_core_modules_import_without_tensorflow():
  """What the core path imports at module level stays TensorFlow-free."""
  core = ['vit_jax.images', 'vit_jax.checkpoint', 'vit_jax.download', 'vit_jax.models',
          'vit_jax.dataset_info', 'vit_jax.synthetic']
  p = _run([sys.executable, '-c', HIDE_TF + ''.join(f'import {m}\n' for m in core)], timeout=300)
  assert p.returncode == 0, p.stderr


# ---------------------------------------------------------------------------
# Slow: a real core-only install
# ---------------------------------------------------------------------------


def _cache() -> pathlib.Path:
  return pathlib.Path(os.environ.get('VIT_JAX_TEST_CACHE', pathlib.Path.home() / '.cache' / 'vit_jax_test'))


@pytest.fixture(scope='module')
def core_python(tmp_path_factory) -> pathlib.Path:
  """The python of a venv holding `pip install -e <repo>` (core only)."""
  probe = tmp_path_factory.mktemp('pypi_probe')
  venv = _cache() / f'core_venv_py{sys.version_info.major}{sys.version_info.minor}'
  python = venv / 'bin' / 'python'
  if python.exists() and (_run([python, '-m', 'pip', '--version']).returncode != 0
                          or _run([python, '-c', 'import tensorflow']).returncode == 0):
    import shutil
    shutil.rmtree(venv)  # half-made, or somebody installed TensorFlow there: start over
  if not python.exists():
    p = _run([sys.executable, '-m', 'venv', venv])
    assert p.returncode == 0, p.stderr
  # Reachability of the package index pip is configured for (PyPI or a mirror).
  p = _run([python, '-m', 'pip', 'download', '-q', '--no-deps', '--retries=1', '--timeout=20',
            '-d', probe, 'six'], timeout=180)
  if p.returncode != 0:
    pytest.skip(f'PyPI is unreachable (pip download six: {_last_line(p) or p.stdout.strip()[-200:]})')
  p = _run([python, '-m', 'pip', 'install', '-q', '-e', REPO], timeout=1200)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  return python


@pytest.mark.slow
def test_core_install_has_no_tensorflow(core_python):
  for module in TF_MODULES:
    p = _run([core_python, '-c', f'import {module}'])
    assert p.returncode != 0 and 'ModuleNotFoundError' in p.stderr, (module, p.stderr)
  p = _run([core_python, '-c', 'import vit_jax.input_pipeline'])
  assert _last_line(p) == f'ImportError: vit_jax.input_pipeline needs TensorFlow: {TRAIN_HINT}', p.stderr
  p = _run([core_python, '-m', 'pip', 'check'])
  assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.slow
def test_core_checkpoint_cli(core_python):
  p = _run([core_python, '-m', 'vit_jax.checkpoint', NPZ])
  assert p.returncode == 0, p.stderr
  assert 'SmallViT_8' in p.stdout, p.stdout


@pytest.fixture
def pngs(tmp_path) -> list[pathlib.Path]:
  rng = np.random.default_rng(0)
  paths = []
  for i, size in enumerate(((32, 32), (48, 40))):
    path = tmp_path / f'img{i}.png'
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    paths.append(path)
  return paths


@pytest.mark.slow
def test_core_predict_cli(core_python, pngs):
  p = _run([core_python, '-m', 'vit_jax.predict', f'--checkpoint={NPZ}', '--top_k=2', *pngs])
  assert p.returncode == 0, p.stderr
  for path in pngs:
    assert path.name in p.stdout, p.stdout


@pytest.mark.slow
def test_core_analysis_cli(core_python, pngs, tmp_path):
  out = tmp_path / 'analysis'
  p = _run([core_python, '-m', 'vit_jax.analysis', f'--checkpoint={NPZ}', f'--out_dir={out}',
            '--num_components=4', *pngs])
  assert p.returncode == 0, p.stderr
  written = sorted(out.rglob('*.png'))
  assert written, p.stdout


@pytest.mark.slow
def test_core_benchmark_cli(core_python):
  p = _run([core_python, '-m', 'vit_jax.benchmark', '--model=SmallViT_8', '--resolution=32',
            '--batch=2', '--repeats=2', '--num_classes=200', '--json'])
  assert p.returncode == 0, p.stderr
  assert '"name"' in p.stdout or 'SmallViT_8' in p.stdout, p.stdout


@pytest.mark.slow
def test_core_train_synthetic_then_export(core_python, tmp_path):
  """A workdir made without TensorFlow (synthetic data), exported by the core install."""
  workdir = tmp_path / 'wd'
  p = _run([core_python, '-m', 'vit_jax.main', '--config=tests/_tiny_config.py',
            '--config.dataset=synthetic', '--config.total_steps=2', '--config.checkpoint_every=2',
            f'--workdir={workdir}'])
  assert p.returncode == 0, p.stderr[-4000:]
  out = tmp_path / 'exported.npz'
  p = _run([core_python, '-m', 'vit_jax.export', f'--workdir={workdir}', f'--out={out}'])
  assert p.returncode == 0, p.stderr[-4000:]
  assert out.is_file() and 'verified bit-identical' in p.stdout, p.stdout
