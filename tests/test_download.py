"""Official checkpoints by name: vit_jax.download against a real HTTP server.

The server is the standard library's, on 127.0.0.1, serving official-layout
files that the tests write (the shipped checkpoint under its own name), with
switches to die mid-file, to honour or ignore HTTP ranges, and to count
requests.
"""

import http.server
import pathlib
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import numpy as np
import pytest
from conftest import REPO, SHIPPED, SUBPROCESS_ENV

from vit_jax import checkpoint, config_schema, download



class _Handler(http.server.BaseHTTPRequestHandler):
  root: pathlib.Path
  fail_after: int | None = None
  ranges = True
  requests: list = []

  def do_GET(self):  # noqa: N802 - http.server's name
    self.requests.append((self.path, self.headers.get('Range')))
    path = self.root / urllib.parse.unquote(self.path.lstrip('/'))
    if not path.is_file():
      self.send_error(404, 'Not Found')
      return
    data = path.read_bytes()
    start = 0
    if self.ranges and self.headers.get('Range'):
      start = int(self.headers['Range'].split('=')[1].split('-')[0])
    body = data[start:]
    self.send_response(206 if start else 200)
    if start:
      self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
    self.send_header('Content-Length', str(len(body)))
    self.end_headers()
    if self.fail_after is not None:   # Dies mid-file: half a body, then the socket closes.
      self.wfile.write(body[:self.fail_after])
      self.wfile.flush()
      self.connection.shutdown(socket.SHUT_RDWR)
      return
    self.wfile.write(body)

  def log_message(self, *args):
    pass


class Server:
  """A file server on 127.0.0.1 in a thread; `stop()` shuts it down for good."""

  def __init__(self, root, **switches):
    self.handler = type('Handler', (_Handler,), dict(root=root, requests=[], **switches))
    self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), self.handler)
    self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}/'
    self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
    self.thread.start()

  @property
  def requests(self):
    return self.handler.requests

  def stop(self):
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """A bucket folder holding imagenet21k/SmallViT_8.npz, and an empty cache."""
  root = tmp_path / 'bucket'
  (root / 'imagenet21k').mkdir(parents=True)
  shutil.copy(SHIPPED, root / 'imagenet21k' / 'SmallViT_8.npz')
  monkeypatch.setenv('VIT_JAX_CACHE_DIR', str(tmp_path / 'cache'))
  return root


def _serve(monkeypatch, root, **switches):
  server = Server(root, **switches)
  monkeypatch.setenv('VIT_JAX_CHECKPOINT_URL', server.url)
  return server


def test_names_map_under_the_bucket(monkeypatch):
  monkeypatch.delenv('VIT_JAX_CHECKPOINT_URL', raising=False)
  assert download.bucket_path('ViT-B_16') == 'imagenet21k/ViT-B_16.npz'
  assert download.bucket_path('imagenet21k+imagenet2012/ViT-L_16') == \
      'imagenet21k+imagenet2012/ViT-L_16.npz'
  assert download.bucket_path('B_16') == f'augreg/{download.AUGREG["B_16"][1]}'
  assert download.bucket_path('gs://vit_models/augreg/x.npz') == 'augreg/x.npz'
  assert download.bucket_path(download.DEFAULT_BASE_URL + 'imagenet21k/ViT-B_32.npz') == \
      'imagenet21k/ViT-B_32.npz'
  for path in ('ViT-B_16.npz', 'runs/model.npz', '/abs/x.npz', 'gs://other/x.npz',
               'https://example.org/x.npz'):
    assert download.bucket_path(path) is None, path   # Paths, not names.
  assert download.resolve('no/such/local.npz') == 'no/such/local.npz'
  monkeypatch.setenv('VIT_JAX_CHECKPOINT_URL', 'http://mirror.local/vit')
  assert download.base_url() == 'http://mirror.local/vit/'
  assert download.bucket_path('http://mirror.local/vit/augreg/y.npz') == 'augreg/y.npz'


def test_first_download_then_cache_with_the_server_stopped(bucket, monkeypatch, capsys):
  server = _serve(monkeypatch, bucket)
  try:
    params = checkpoint.load('SmallViT_8')
  finally:
    server.stop()
  cached = pathlib.Path(download.cache_dir()) / 'imagenet21k' / 'SmallViT_8.npz'
  assert cached.read_bytes() == SHIPPED.read_bytes()
  assert [p for p, _ in server.requests] == ['/imagenet21k/SmallViT_8.npz']
  assert 'Downloading SmallViT_8.npz: 100.0%' in capsys.readouterr().err
  reference = checkpoint.flatten(checkpoint.load(str(SHIPPED)))
  for key, value in checkpoint.flatten(params).items():
    np.testing.assert_array_equal(value, reference[key])
  # Offline now: the cached file, no request (the server is gone).
  again = checkpoint.load(download.BUCKET + 'imagenet21k/SmallViT_8.npz')
  assert set(checkpoint.flatten(again)) == set(reference)
  assert len(server.requests) == 1


def test_server_dying_mid_file_leaves_no_final_file_and_resumes(bucket, monkeypatch):
  dest = pathlib.Path(download.cache_dir()) / 'imagenet21k' / 'SmallViT_8.npz'
  server = _serve(monkeypatch, bucket, fail_after=1 << 20)
  try:
    with pytest.raises(checkpoint.CheckpointError, match='(broke off|incomplete).* resume'):
      checkpoint.load('SmallViT_8')
  finally:
    server.stop()
  assert not dest.exists()
  part = pathlib.Path(str(dest) + '.part')
  assert part.stat().st_size == 1 << 20
  server = _serve(monkeypatch, bucket)   # Back up, with ranges.
  try:
    download.resolve('SmallViT_8', progress=False)
  finally:
    server.stop()
  assert server.requests == [('/imagenet21k/SmallViT_8.npz', f'bytes={1 << 20}-')]
  assert dest.read_bytes() == SHIPPED.read_bytes() and not part.exists()


def test_a_server_ignoring_ranges_restarts_cleanly(bucket, monkeypatch):
  dest = pathlib.Path(download.cache_dir()) / 'imagenet21k' / 'SmallViT_8.npz'
  dest.parent.mkdir(parents=True)
  pathlib.Path(str(dest) + '.part').write_bytes(b'stale bytes of an older attempt')
  server = _serve(monkeypatch, bucket, ranges=False)
  try:
    download.resolve('SmallViT_8', progress=False)
  finally:
    server.stop()
  assert dest.read_bytes() == SHIPPED.read_bytes()


def test_404_names_the_url_and_the_known_names(bucket, monkeypatch):
  server = _serve(monkeypatch, bucket)
  try:
    with pytest.raises(download.DownloadError, match='HTTP 404') as e:
      download.resolve('ViT-B_99', progress=False)
  finally:
    server.stop()
  assert f'{server.url}imagenet21k/ViT-B_99.npz' in str(e.value)
  assert 'check the name' in str(e.value) and 'curl' in str(e.value)
  assert not list(pathlib.Path(download.cache_dir()).rglob('*.npz'))


def test_offline_fails_in_seconds_with_the_manual_command(bucket, monkeypatch):
  with socket.socket() as s:   # A port nobody listens on.
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  monkeypatch.setenv('VIT_JAX_CHECKPOINT_URL', f'http://127.0.0.1:{port}/')
  start = time.monotonic()
  with pytest.raises(download.DownloadError, match='no network') as e:
    download.resolve('ViT-B_16', progress=False)
  assert time.monotonic() - start < 10
  assert f'curl -L --create-dirs -o {download.cache_dir()}/imagenet21k/ViT-B_16.npz' in str(e.value)


def test_a_non_checkpoint_download_is_refused_and_removed(bucket, monkeypatch):
  (bucket / 'imagenet21k' / 'Junk.npz').write_text('<html>a captive portal</html>')
  server = _serve(monkeypatch, bucket)
  try:
    with pytest.raises(download.DownloadError, match='not download as a valid .npz'):
      download.resolve('Junk', progress=False)
  finally:
    server.stop()
  assert not list(pathlib.Path(download.cache_dir()).rglob('Junk*'))


def test_pretrained_path_by_name_is_fetched_before_training(bucket, monkeypatch):
  from conftest import tiny_config
  server = _serve(monkeypatch, bucket)
  config = tiny_config()
  config.pretrained_path = 'SmallViT_8'
  try:
    config_schema.check_pretrained_available(config)
  finally:
    server.stop()
  assert (pathlib.Path(download.cache_dir()) / 'imagenet21k' / 'SmallViT_8.npz').is_file()


def test_checkpoint_cli_by_name_downloads_once(bucket, monkeypatch, tmp_path):
  server = _serve(monkeypatch, bucket)
  env = dict(SUBPROCESS_ENV, VIT_JAX_CHECKPOINT_URL=server.url,
             VIT_JAX_CACHE_DIR=str(tmp_path / 'cache'))
  cmd = [sys.executable, '-m', 'vit_jax.checkpoint', 'SmallViT_8']
  try:
    first = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  finally:
    server.stop()
  assert first.returncode == 0, first.stderr
  assert 'Transformer/posembed_input/pos_embedding' in first.stdout
  assert 'preset: SmallViT_8' in first.stdout
  second = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert second.returncode == 0, second.stderr
  assert second.stdout == first.stdout and 'Downloading' not in second.stderr
  assert len(server.requests) == 1
