"""Official checkpoints by name, downloaded once into a local cache.

`resolve(name_or_path)` turns what a user names into a local file:

- an existing local path: itself;
- a bare model name (no `.npz`: that is a file path): the paper's ImageNet-21k file, ``ViT-B_16`` ->
  ``imagenet21k/ViT-B_16.npz``;
- a folder-qualified name: ``imagenet21k+imagenet2012/ViT-B_16`` (any
  folder of the bucket: ``imagenet21k``, ``imagenet21k+imagenet2012``,
  ``augreg``, ...);
- an AugReg short name of ``AUGREG`` (``B_16``, ``S_16``, ...): its
  recommended ``augreg/`` file;
- ``gs://vit_models/<file>`` or ``<BASE_URL><file>``: the same files by URL;
- any other ``http(s)://`` URL: downloaded and cached too;
- anything else (another ``gs://`` bucket, a missing local file): returned
  unchanged, for the caller's own error.

All of these map under ``https://storage.googleapis.com/vit_models/``;
``$VIT_JAX_CHECKPOINT_URL`` replaces that base URL (a mirror, or a test
server). Files land in ``$VIT_JAX_CACHE_DIR`` (default ``~/.cache/vit_jax``)
under their path in the bucket, and are read from there without touching
the network afterwards. A download streams into ``<file>.part`` with a
progress line, resumes from it (HTTP Range) after an interruption or
restarts if the server ignores ranges, checks the size against the server's
Content-Length and the zip's CRCs, opens it with ``allow_pickle=False``,
and only then renames it to its final name: a truncated file never carries
the final name.

The class names of the official heads come the same way (`official_labels`):
ImageNet-1k's and ImageNet-21k's WordNet lemmas, one line per class in the
heads' order, from ``https://storage.googleapis.com/bit_models/``
(``$VIT_JAX_LABELS_URL`` replaces that base), cached under ``labels/``.

No TensorFlow, no JAX: standard library and numpy only.
"""

from __future__ import annotations

import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable

import numpy as np

DEFAULT_BASE_URL = 'https://storage.googleapis.com/vit_models/'
BUCKET = 'gs://vit_models/'
DEFAULT_FOLDER = 'imagenet21k'
TIMEOUT_S = 10.0
DEFAULT_LABELS_URL = 'https://storage.googleapis.com/bit_models/'
# The class names of the official heads, by their class count.
LABEL_FILES = {1000: 'ilsvrc2012_wordnet_lemmas.txt', 21843: 'imagenet21k_wordnet_lemmas.txt'}
_CHUNK = 1 << 20

# AugReg (Steiner et al.) short name -> (model preset, file in augreg/): the
# recommended (best upstream) checkpoints of the original README.
AUGREG = {
    'Ti_16': ('ViT-Ti_16',
              'Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz'),
    'S_16': ('ViT-S_16',
             'S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz'),
    'S_32': ('ViT-S_32',
             'S_32-i21k-300ep-lr_0.001-aug_none-wd_0.1-do_0.0-sd_0.0.npz'),
    'B_16': ('ViT-B_16',
             'B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz'),
    'B_32': ('ViT-B_32',
             'B_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0.npz'),
    'L_16': ('ViT-L_16',
             'L_16-i21k-300ep-lr_0.001-aug_strong1-wd_0.1-do_0.0-sd_0.0.npz'),
    'R_Ti_16': ('R+Ti_16',
                'R_Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz'),
    'R26_S_32': ('R26+ViT-S_32',
                 'R26_S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0.npz'),
    'R50_L_32': ('R50+ViT-L_32',
                 'R50_L_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1.npz'),
}

# A name: `[folder/]model`, never ending in .npz (that is a file path).
_NAME = re.compile(r'^(?:(?P<folder>[\w.+\-]+)/)?(?P<name>[\w.+\-]+)$')


class DownloadError(OSError):
  """A checkpoint could not be fetched; the message says how to get it by hand."""


def base_url() -> str:
  return _url_base('VIT_JAX_CHECKPOINT_URL', DEFAULT_BASE_URL)


def _url_base(env_var: str, default: str) -> str:
  """$env_var (a mirror, a test server) or `default`, ending in '/'."""
  url = os.environ.get(env_var) or default
  return url if url.endswith('/') else url + '/'


def cache_dir() -> str:
  return os.path.expanduser(os.environ.get('VIT_JAX_CACHE_DIR') or '~/.cache/vit_jax')


def is_official(path: str) -> bool:
  """Whether `path` is a cached file of the official bucket (resolved from a name)."""
  rel = os.path.relpath(os.path.abspath(path), os.path.abspath(cache_dir()))
  return not rel.startswith(('..', 'urls' + os.sep, 'labels' + os.sep))


def official_labels(num_classes: int, *, progress: bool = True) -> str | None:
  """The class-name file of an official head of `num_classes` classes (a local
  copy, downloaded once), or None for a class count no official head has."""
  name = LABEL_FILES.get(num_classes)
  if name is None:
    return None
  dest = os.path.join(cache_dir(), 'labels', name)
  if not os.path.isfile(dest):
    url = _url_base('VIT_JAX_LABELS_URL', DEFAULT_LABELS_URL) + name
    download(url, dest, progress=progress,
             check=lambda part, url: _check_lines(part, url, num_classes))
  return dest


def bucket_path(name: str) -> str | None:
  """'ViT-B_16' -> 'imagenet21k/ViT-B_16.npz'; None when `name` is no such name.

  Local paths are not names: callers check for an existing file first.
  """
  name = os.fspath(name)
  for prefix in (BUCKET, base_url(), DEFAULT_BASE_URL):
    if name.startswith(prefix):
      return name[len(prefix):]
  if '://' in name or name.startswith(('/', '.', '~')):
    return None
  if name in AUGREG:
    return f'augreg/{AUGREG[name][1]}'
  m = _NAME.match(name)
  if not m or name.endswith('.npz'):
    return None
  return f'{m["folder"] or DEFAULT_FOLDER}/{m["name"]}.npz'


def resolve(name_or_path: str, *, progress: bool = True) -> str:
  """A local file for `name_or_path` (see the module doc); downloads at most once."""
  path = os.fspath(name_or_path)
  if os.path.exists(path):
    return path
  rel = bucket_path(path)
  if rel is not None:
    url = base_url() + urllib.parse.quote(rel)   # 'R50+ViT-B_16' -> 'R50%2BViT-B_16'
    dest = os.path.join(cache_dir(), *rel.split('/'))
  elif path.startswith(('http://', 'https://')):
    rest = path.split('://', 1)[1]
    url, dest = path, os.path.join(cache_dir(), 'urls', *rest.split('/'))
  else:
    return path
  if not os.path.isfile(dest):
    download(url, dest, progress=progress)
  return dest


def _manual(url: str, dest: str) -> str:
  return (f'Get it by hand on a machine with network and copy it to {dest}:\n'
          f'  curl -L --create-dirs -o {dest} {url}\n'
          'or point VIT_JAX_CHECKPOINT_URL at a mirror holding the same paths.')


def download(url: str, dest: str, *, progress: bool = True, timeout: float | None = None,
             check: Callable[[str, str], None] | None = None) -> None:
  """Fetches `url` into `dest` through `dest.part` (resumed when present);
  `check(part, url)` (default: a whole .npz) vets the file before the rename."""
  timeout = timeout or TIMEOUT_S
  os.makedirs(os.path.dirname(dest) or '.', exist_ok=True)
  part = dest + '.part'
  offset = os.path.getsize(part) if os.path.isfile(part) else 0
  request = urllib.request.Request(url, headers={'Range': f'bytes={offset}-'} if offset else {})
  try:
    response = urllib.request.urlopen(request, timeout=timeout)
  except urllib.error.HTTPError as e:
    if e.code == 416 and offset:   # The .part is already whole (or bogus): start again.
      os.remove(part)
      return download(url, dest, progress=progress, timeout=timeout, check=check)
    hint = (f'\nNo such file on the server: check the name. Official names: ViT-B_16, '
            f'imagenet21k+imagenet2012/ViT-B_16, AugReg {", ".join(AUGREG)}.'
            if e.code == 404 else '')
    raise DownloadError(f'Cannot download {url}: HTTP {e.code} {e.reason}.{hint}\n'
                        + _manual(url, dest)) from None
  except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
    reason = getattr(e, 'reason', e)
    raise DownloadError(f'Cannot download {url}: {reason} (no network?).\n'
                        + _manual(url, dest)) from None
  with response:
    if offset and response.status != 206:   # The server ignored the range: restart.
      offset = 0
    length = response.headers.get('Content-Length')
    total = offset + int(length) if length is not None else None
    done, shown = offset, 0.0
    try:
      with open(part, 'ab' if offset else 'wb') as f:
        while chunk := response.read(_CHUNK):
          f.write(chunk)
          done += len(chunk)
          if progress and time.monotonic() - shown > 0.5:
            shown = time.monotonic()
            _progress(url, done, total)
    except (OSError, http.client.HTTPException) as e:   # Reset, timeout, full disk.
      raise DownloadError(f'Download of {url} broke off at {done:,} of '
                          f'{total or "?":,} bytes ({e}). Run the command again to '
                          f'resume from {part}.') from None
  if progress:
    _progress(url, done, total)
    print(file=sys.stderr)
  size = os.path.getsize(part)
  if total is not None and size != total:
    raise DownloadError(f'Download of {url} is incomplete: {size:,} of {total:,} bytes. '
                        f'Run the command again to resume from {part}.')
  (check or _check_npz)(part, url)
  os.replace(part, dest)


def _check_npz(path: str, url: str) -> None:
  """A whole, pickle-free .npz, or the .part is removed and an error raised."""
  try:
    with zipfile.ZipFile(path) as z:
      bad = z.testzip()
    if bad is not None:
      raise ValueError(f'member {bad} fails its CRC check')
    with np.load(path, allow_pickle=False) as npz:
      for key in npz.files:
        npz[key]   # Refuses object arrays.
  except (ValueError, zipfile.BadZipFile, OSError) as e:
    os.remove(path)
    raise DownloadError(f'{url} did not download as a valid .npz checkpoint ({e}); '
                        'the partial file was removed. Run the command again.') from None


def _check_lines(path: str, url: str, num_classes: int) -> None:
  """A text file of `num_classes` lines, or the .part is removed and an error raised."""
  try:
    with open(path, encoding='utf-8') as f:
      lines = f.read().rstrip('\n').split('\n')
  except (OSError, UnicodeDecodeError) as e:
    lines, problem = [], str(e)
  else:
    problem = f'{len(lines)} lines'
  if len(lines) != num_classes:
    os.remove(path)
    raise DownloadError(f'{url} did not download as {num_classes} class names ({problem}); '
                        'the partial file was removed. Run the command again.')


def _progress(url: str, done: int, total: int | None) -> None:
  name = url.rsplit('/', 1)[-1]
  if total:
    print(f'\rDownloading {name}: {100 * done / total:5.1f}% '
          f'({done / 2**20:.1f} of {total / 2**20:.1f} MiB)', end='', file=sys.stderr, flush=True)
  else:
    print(f'\rDownloading {name}: {done / 2**20:.1f} MiB', end='', file=sys.stderr, flush=True)
