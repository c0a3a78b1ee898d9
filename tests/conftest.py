"""Shared test helpers.

`../shared` (goldens and real datasets) sits beside the repository for the
team and CI, but not in a user's clone: tests that need it skip with a reason.
"""

import os
import pathlib
import re
import signal
import subprocess
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# `configs/*.py` import `configs.common`: tests load configs in-process too.
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

# Environment for `python -m vit_jax.main` subprocesses: CPU, quiet TF, and no
# inherited device-count flag (tests that want 8 devices set it themselves).
SUBPROCESS_ENV = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
                      TF_ENABLE_ONEDNN_OPTS='0', PYTHONUNBUFFERED='1')
SUBPROCESS_ENV.pop('XLA_FLAGS', None)
# The checkpoint shipped in the repository (official layout, SmallViT_8 at 32px).
SHIPPED = REPO / 'checkpoints' / 'SmallViT_8-tiny_imagenet-32px.npz'
SHARED = pathlib.Path(os.environ.get('VIT_JAX_SHARED', REPO.parent / 'shared'))


def shared_dir() -> pathlib.Path:
  """Returns ../shared, or skips the calling test when it is absent."""
  if not SHARED.is_dir():
    pytest.skip(f'{SHARED} not found: goldens and real data live in the team\'s '
                '../shared directory, which is not part of a user clone.')
  return SHARED


def golden_dir() -> pathlib.Path:
  return shared_dir() / 'golden'


def tiny_config():
  """tests/_tiny_config.py's config: a seconds-fast 1-layer ViT on digits."""
  import importlib.util
  spec = importlib.util.spec_from_file_location('_tiny_config', REPO / 'tests' / '_tiny_config.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def extract_once(archive: str, name: str, keep=lambda member: True) -> pathlib.Path:
  """Extracts the members of ../shared/data/<archive> that `keep` accepts, once.

  Into <cache>/<name> ($VIT_JAX_TEST_CACHE, default ~/.cache/vit_jax_test),
  never into the repository; later calls reuse it. Skips without ../shared.
  """
  import tarfile
  path = shared_dir() / 'data' / archive
  if not path.is_file():
    pytest.skip(f'{path} not found')
  out = pathlib.Path(os.environ.get(
      'VIT_JAX_TEST_CACHE', pathlib.Path.home() / '.cache' / 'vit_jax_test')) / name
  done = out / '.extracted'
  if not done.exists():
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path) as tar:
      tar.extractall(out, members=[m for m in tar if keep(m)], filter='data')
    done.touch()
  return out


def tiny_imagenet_val_dir() -> pathlib.Path:
  """Tiny-ImageNet's val split and class list (~10k files; train is not needed)."""
  keep = ('tiny-imagenet-200/val/', 'tiny-imagenet-200/wnids.txt', 'tiny-imagenet-200/words.txt')
  return extract_once('tiny-imagenet-200.tar.gz', 'tiny_imagenet_val',
                      lambda m: m.name.startswith(keep)) / 'tiny-imagenet-200'


def use_compile_cache(env: dict, tmp_path_factory) -> None:
  """Subprocesses share a persistent compilation cache: a relaunched run
  reuses the killed run's executables (compilation is most of their time)."""
  env['JAX_COMPILATION_CACHE_DIR'] = str(tmp_path_factory.mktemp('jax_cache'))
  env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  env['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'


def sigkill_at_step(cmd: list, env: dict, step: int, total: int) -> int:
  """Starts `cmd` (a `python -m vit_jax.main` run of `total` steps), SIGKILLs it
  once its log reaches `step`, and returns the step it was killed at."""
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  return kill_at_step(proc, step, total)


def kill_at_step(proc: subprocess.Popen, step: int, total: int) -> int:
  """SIGKILLs a running `vit_jax.main` (stderr piped, text) at `step`; returns it."""
  killed_at = None
  for line in proc.stderr:
    m = re.search(rf'step (\d+)/{total}', line)
    if m and int(m.group(1)) >= step:
      proc.send_signal(signal.SIGKILL)
      killed_at = int(m.group(1))
      break
  proc.wait(timeout=60)
  assert killed_at is not None and proc.returncode == -signal.SIGKILL, proc.returncode
  return killed_at
