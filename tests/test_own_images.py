"""Your own images, right the first time (issue 10): the one command on the
folder layouts users have, the architecture and recipe from the checkpoint,
every bad file at once, arrays, and TFDS offline in seconds."""

import json
import pathlib
import shutil
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest
from PIL import Image

from conftest import REPO, SHIPPED, SUBPROCESS_ENV
from vit_jax import checkpoint as ckpt_lib
from vit_jax import input_pipeline as ip
from vit_jax import config_schema, hub, models, train

# Three classes a pre-trained model tells apart at once: red, green, blue.
COLOURS = {'cherry': (200, 30, 30), 'lime': (30, 200, 30), 'plum': (30, 30, 200)}


def _image(colour, rng, size=(16, 16)):
  noise = rng.integers(-25, 25, (*size, 3))
  return Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8))


def _flat_folder(root: pathlib.Path, n: int = 10, colours=COLOURS) -> pathlib.Path:
  """root/<class>/*, in every accepted format and case, a PNG named .jpg included."""
  rng = np.random.default_rng(0)
  names = [('a.jpg', 'JPEG'), ('b.JPEG', 'JPEG'), ('c.png', 'PNG'), ('d.BMP', 'BMP'),
           ('e.gif', 'GIF'), ('f.webp', 'WEBP'), ('g.jpg', 'PNG')]  # g: PNG bytes, .jpg name
  for cls, colour in colours.items():
    (root / cls).mkdir(parents=True)
    for i in range(n):
      name, fmt = names[i % len(names)]
      _image(colour, rng).save(root / cls / f'{i}{name}', format=fmt)
  return root


def main(*args, timeout=600):
  return subprocess.run([sys.executable, '-m', 'vit_jax.main', *args], cwd=REPO,
                        env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=timeout,
                        check=False)


def _config(**kw):
  c = ml_collections.ConfigDict(dict(dataset='digits', train_split='train', test_split='test',
                                     image_size=8, batch_size=4, seed=0))
  c.update(kw)
  return c


# ---------------------------------------------------------------------------
# The architecture comes from the checkpoint.
# ---------------------------------------------------------------------------


def test_infer_model_from_sidecar_or_parameter_tree(tmp_path):
  assert ckpt_lib.infer_model(str(SHIPPED)).model_name == 'SmallViT_8'   # its sidecar
  bare = tmp_path / 'bare.npz'
  shutil.copy(SHIPPED, bare)   # No sidecar: the one preset with the same tree.
  assert not pathlib.Path(ckpt_lib.sidecar_path(str(bare))).exists()
  assert ckpt_lib.infer_model(str(bare)).model_name == 'SmallViT_8'
  # SL-ViT_8 and Rot-ViT_8 share its headline numbers but not its tree.
  assert ckpt_lib.match_preset(ckpt_lib.load(str(bare))) == ['SmallViT_8']
  # A given model must fit, and the error says what the file is.
  with pytest.raises(ckpt_lib.CheckpointError, match=r'does not fit the model ViT-Ti_16; it is '
                     r'another architecture: a SmallViT_8\. Drop config.model_name'):
    ckpt_lib.infer_model(str(bare), 'ViT-Ti_16')
  assert ckpt_lib.infer_model(str(bare), 'SmallViT_8').model_name == 'SmallViT_8'
  # predict needs no --model either.
  bundle = hub.load(str(bare))
  assert bundle.model_config.model_name == 'SmallViT_8' and bundle.image_size == (32, 32)


def test_infer_model_ambiguity_lists_candidates_and_custom_needs_a_sidecar(tmp_path, monkeypatch):
  params = ckpt_lib.load(str(SHIPPED))
  twin = models.get_config('SmallViT_8')
  twin.model_name = 'SmallViT_8_twin'
  monkeypatch.setitem(models.MODEL_CONFIGS, 'SmallViT_8_twin', twin)
  with pytest.raises(ckpt_lib.CheckpointError,
                     match='fits several presets: SmallViT_8, SmallViT_8_twin'):
    ckpt_lib.infer_model(params)
  monkeypatch.delitem(models.MODEL_CONFIGS, 'SmallViT_8_twin')
  # A custom architecture: no preset; the sidecar written with it names it.
  custom = models.get_config('testing')
  custom.model_name, custom.hidden_size = 'mine', 48
  model = models.get_model(custom, num_classes=3)
  import jax
  import jax.numpy as jnp
  p = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)), train=False)['params']
  path = str(tmp_path / 'mine.npz')
  ckpt_lib.save(p, path)
  with pytest.raises(ckpt_lib.CheckpointError, match='matches none of the presets'):
    ckpt_lib.infer_model(path)
  ckpt_lib.save(p, path, model_config=custom)
  assert ckpt_lib.infer_model(path).to_dict() == ml_collections.ConfigDict(
      json.loads(json.dumps(custom.to_dict()))).to_dict()


def test_recipe_by_model_size_and_command_line_values_win():
  from configs import folder
  c = folder.get_config('/data/x')
  c.pretrained_path = str(SHIPPED)
  r = config_schema.resolve_config(c)
  assert (r.model_name, r.recipe) == ('SmallViT_8', 'cpu')
  assert (r.image_size, r.batch_size, r.total_steps, r.lr.base, r.pp.train) == (
      32, 128, 300, 0.03, 'rpt_augment')
  assert r.num_classes is None   # From the data.
  config_schema.validate_config(r)
  assert config_schema.resolve_config(r).to_json() == r.to_json()   # Idempotent.
  c = folder.get_config('/data/x')
  c.model_name, c.pretrained_path, c.image_size = 'ViT-B_16', None, 224
  r = config_schema.resolve_config(c)
  assert r.recipe == 'paper'
  assert (r.image_size, r.batch_size, r.accum_steps, r.total_steps, r.lr.base,
          r.pp.train) == (224, 512, 8, 500, 0.003, 'inception_crop')


# ---------------------------------------------------------------------------
# Folder layouts, arrays, bad files.
# ---------------------------------------------------------------------------


def test_flat_folder_gets_a_stratified_seeded_split(tmp_path):
  root = _flat_folder(tmp_path / 'flat', n=10)
  rng = np.random.default_rng(1)
  for i in range(10, 30):   # plum: 30 images
    _image(COLOURS['plum'], rng).save(root / 'plum' / f'{i}.png')
  c = _config(dataset=f'folder:{root}')
  info = ip.get_dataset_info(c)
  assert info.class_names == ('cherry', 'lime', 'plum')
  train_src = ip.load_source(f'folder:{root}', 'train')
  test_src = ip.load_source(f'folder:{root}', 'test')
  assert np.bincount(test_src.labels).tolist() == [1, 1, 3]   # 10% of every class
  assert np.bincount(train_src.labels).tolist() == [9, 9, 27]
  assert not set(train_src.data) & set(test_src.data)
  assert len(set(train_src.data) | set(test_src.data)) == 50
  assert set(info.held_out_test_files) == set(test_src.data)
  assert 'stratified' in info.test_description
  ip.load_source.cache_clear()   # The same split again: deterministic.
  assert list(ip.load_source(f'folder:{root}', 'test').data) == list(test_src.data)


def test_train_only_folder_and_empty_class(tmp_path):
  root = tmp_path / 'r'
  _flat_folder(root / 'train', n=10)
  info = ip.get_dataset_info(_config(dataset=f'folder:{root}'))
  assert info[:3] == (3, 27, 3)
  (root / 'train' / 'empty').mkdir()
  ip.load_source.cache_clear()
  with pytest.raises(ValueError, match=r'Class folder\(s\) with no images in .*: empty'):
    ip.get_dataset_info(_config(dataset=f'folder:{root}'))


def test_npz_arrays(tmp_path):
  rng = np.random.default_rng(0)
  y_train, y_test = rng.integers(0, 3, 30), np.array([0, 1, 2, 2])
  x_train = (y_train[:, None, None] * 100 + rng.integers(0, 20, (30, 28, 28))).astype(np.uint8)
  x_test = (y_test[:, None, None] * 100).astype(np.uint8)
  path = tmp_path / 'mnist_like.npz'
  np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
  c = _config(dataset=f'npz:{path}', image_size=28, batch_size_eval=4,
              pp={'train': 'resize', 'eval': 'resize'})
  assert ip.get_dataset_info(c)[:4] == (3, 30, 4, ('0', '1', '2'))
  batch = next(iter(ip.make_eval_iter(c, process_index=0, process_count=1)))
  assert batch['image'].shape == (4, 28, 28, 3)
  np.testing.assert_array_equal(batch['label'], y_test)
  np.testing.assert_allclose(batch['image'][:, 0, 0, 0], y_test * 100 / 127.5 - 1, atol=1e-5)
  np.savez(path, x_train=x_train, y_train=y_train[:5], x_test=x_test, y_test=y_test)
  ip.load_source.cache_clear()
  with pytest.raises(ValueError, match=r'x_train must be .* got \(30, 28, 28, 1\) and \(5,\)'):
    ip.get_dataset_info(c)


def test_large_jpegs_decode_at_reduced_size():
  import tensorflow as tf
  big = np.zeros((768, 1024, 3), np.uint8)
  big[:, 512:] = 255
  import io
  buf = io.BytesIO()
  Image.fromarray(big).save(buf, format='JPEG')
  jpeg = buf.getvalue()
  assert ip.decode_image(tf.constant(jpeg)).shape == (768, 1024, 3)
  # Shorter side 768: >= 4 x 150 but not 8 x 150 -> 1/4 scale.
  small = ip.decode_image(tf.constant(jpeg), min_side=150).numpy()
  assert small.shape == (192, 256, 3)
  assert small[:, :120].mean() < 5 and small[:, 136:].mean() > 250
  buf = io.BytesIO()
  Image.fromarray(big).save(buf, format='PNG')   # Not JPEG: full size.
  assert ip.decode_image(tf.constant(buf.getvalue()), min_side=150).shape == (768, 1024, 3)


def _break_two(root: pathlib.Path) -> list[pathlib.Path]:
  bad = [root / 'lime' / 'zz_truncated.jpg', root / 'plum' / 'zz_text.png']
  good = (root / 'lime' / '0a.jpg').read_bytes()
  bad[0].write_bytes(good[:len(good) // 2])
  bad[1].write_text('not an image at all')
  return bad


def test_all_bad_files_at_once_cached_and_skippable(tmp_path, monkeypatch):
  root = _flat_folder(tmp_path / 'flat')
  bad = _break_two(root)
  c = _config(dataset=f'folder:{root}')
  with pytest.raises(ValueError) as e:
    ip.checked_config(c, str(tmp_path / 'work'))
  message = str(e.value)
  assert message.startswith('2 image file(s) cannot be decoded:')
  assert f'{bad[0]}: truncated or corrupt JPEG' in message
  assert f'{bad[1]}: not an image file' in message
  assert '--config.skip_bad_images=True' in message
  # Cached by path, size and mtime: nothing is decoded twice.
  monkeypatch.setattr(ip, 'image_problem', lambda path: pytest.fail(f're-checked {path}'))
  c.skip_bad_images = True
  checked = ip.checked_config(c, str(tmp_path / 'work'))
  assert checked.skipped_images == sorted(map(str, bad))
  info = ip.get_dataset_info(checked)
  assert info.num_train + info.num_test == 30
  bad[1].write_text('changed')   # A changed file is checked again.
  with pytest.raises(pytest.fail.Exception, match='re-checked'):
    ip.checked_config(c, str(tmp_path / 'work'))


def test_processes_share_the_image_check(tmp_path, monkeypatch):
  """Two processes (threads here, an all-gather stand-in between them) each decode
  half of the files and both return every bad file with its reason."""
  import threading
  root = _flat_folder(tmp_path / 'flat')
  bad = _break_two(root)
  paths = sorted(str(p) for p in root.rglob('*') if p.is_file())
  decoded = []
  real = ip.image_problem
  monkeypatch.setattr(ip, 'image_problem', lambda path: decoded.append(path) or real(path))
  barrier, slots = threading.Barrier(2), [None, None]

  def gather(flags):
    slots[index.value] = flags
    barrier.wait()
    return np.stack(slots)

  index = threading.local()
  results = [None, None]

  def process(i):
    index.value = i
    results[i] = ip.check_images(paths, str(tmp_path / 'work'), shard=(i, 2), gather=gather)
  threads = [threading.Thread(target=process, args=(i,)) for i in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  expected = {str(bad[0]): 'truncated or corrupt JPEG', str(bad[1]): 'not an image file'}
  for found in results:
    assert sorted(found) == sorted(expected)
    for path, reason in expected.items():
      assert found[path].startswith(reason)
  # Each file decoded once by its own process, plus each bad file once more by
  # the process that learnt of it from the other: len(paths) + 2 decodes.
  assert sorted(decoded) == sorted(paths + [str(b) for b in bad])
  assert sorted(p.name for p in (tmp_path / 'work').glob('image_check*')) == [
      'image_check.0-of-2.json', 'image_check.1-of-2.json']
  # The real all-gather, in this one process: (processes, files).
  assert ip._gather_processes(np.array([0, 1, 0], np.int8)).tolist() == [[0, 1, 0]]


def test_tfds_name_offline_fails_in_seconds(tmp_path, monkeypatch):
  monkeypatch.setattr(ip, 'TFDS_HOST', ('127.0.0.1', 9))   # Nothing listens: offline.
  start = time.time()
  with pytest.raises(ValueError, match=r"TFDS dataset 'fashion_mnist' is not prepared in "
                     r".*w10_tfds.*cannot be downloaded: 127.0.0.1 is not reachable.*tfds build "
                     r"fashion_mnist --data_dir=DIR.*folder:<root> or npz:<file.npz>"):
    ip.get_dataset_info(_config(dataset='fashion_mnist', tfds_data_dir=str(tmp_path / 'w10_tfds')))
  assert time.time() - start < 30


def _network_reachable() -> bool:
  return ckpt_lib.unreachable(*ip.TFDS_HOST, timeout=3) is None


def test_tfds_name_offline_fails_in_seconds_from_the_command_line(tmp_path):
  if _network_reachable():
    pytest.skip('storage.googleapis.com is reachable: this would download Fashion-MNIST.')
  start = time.time()
  out = main('--config=configs/quickstart.py', f'--workdir={tmp_path / "w"}',
             '--config.dataset=fashion_mnist', f'--config.tfds_data_dir={tmp_path / "tfds"}')
  assert out.returncode == 1
  assert "TFDS dataset 'fashion_mnist' is not prepared" in out.stderr
  assert 'Traceback' not in out.stderr
  assert time.time() - start < 60   # < 30 s of it after the imports


# ---------------------------------------------------------------------------
# The one command (acceptance).
# ---------------------------------------------------------------------------


def test_one_command_on_a_flat_folder_then_predict(tmp_path):
  root = _flat_folder(tmp_path / 'flat', n=10)
  workdir = tmp_path / 'work'
  out = main(f'--config=configs/folder.py:{root}', f'--config.pretrained_path={SHIPPED}',
             f'--workdir={workdir}', '--config.total_steps=6', '--config.batch_size=9',
             '--config.batch_size_eval=3', '--config.log_every=2', '--config.eval_every=0',
             '--config.checkpoint_every=0')
  assert out.returncode == 0, out.stderr[-3000:]
  log = out.stdout + out.stderr
  cfg = json.loads((workdir / 'config.json').read_text())
  assert (cfg['model_name'], cfg['recipe'], cfg['image_size']) == ('SmallViT_8', 'cpu', 32)
  assert (workdir / 'labels.txt').read_text().split() == list(COLOURS)
  assert len((workdir / 'test_files.txt').read_text().split()) == 3   # 1 of 10 per class
  assert 'stratified' in log and '27 train / 3 test examples, 3 classes (from the data)' in log
  params = ckpt_lib.load(str(workdir / 'SmallViT_8.npz'))
  assert params['head']['kernel'].shape == (192, 3)
  assert ckpt_lib.infer_model(str(workdir / 'SmallViT_8.npz')).model_name == 'SmallViT_8'
  # One console line per log step; no start-up notices.
  assert sum('step 4/6 |' in line for line in log.splitlines()) == 1
  assert "Unable to initialize backend 'tpu'" not in log
  # predict --workdir on those images: 3 classes, labels from the folders.
  pred = subprocess.run([sys.executable, '-m', 'vit_jax.predict', '--workdir', str(workdir),
                         '--top_k', '1', str(root / 'plum')], cwd=REPO, env=SUBPROCESS_ENV,
                        capture_output=True, text=True, timeout=300, check=False)
  assert pred.returncode == 0, pred.stderr[-3000:]
  lines = pred.stdout.splitlines()
  assert sum(line.startswith(str(root / 'plum')) for line in lines) == 10
  top1 = [line.split()[1] for line in lines if line.startswith('    ')]
  assert len(top1) == 10 and set(top1) <= set(COLOURS)
  assert top1.count('plum') >= 6   # Six steps of fine-tuning already see blue.
  # evaluate with the launch config: the model and 32px come from the export
  # (as training took them from the shipped checkpoint), the run's own score.
  export = str(workdir / 'SmallViT_8.npz')
  final = json.loads((workdir / 'final_metrics.json').read_text())
  metrics = _evaluate(f'--config=configs/folder.py:{root}', f'--checkpoint={export}')
  assert metrics['num_test_examples'] == 3
  assert metrics['accuracy_test'] == final['accuracy_test']
  assert metrics['loss_test'] == pytest.approx(final['loss_test'], abs=1e-5)
  # A test file gone bad: listed before any evaluation, or left out on request.
  broken = pathlib.Path((workdir / 'test_files.txt').read_text().split()[0])
  broken.write_bytes(b'not an image')
  out = _evaluate(f'--config=configs/folder.py:{root}', f'--checkpoint={export}', ok=False)
  assert out.returncode == 1 and '1 image file(s) cannot be decoded' in out.stderr
  assert str(broken) in out.stderr and '--config.skip_bad_images=True' in out.stderr
  metrics = _evaluate(f'--config=configs/folder.py:{root}', f'--checkpoint={export}',
                      '--config.skip_bad_images=True')
  assert metrics['num_test_examples'] == 2


def _evaluate(*args, ok=True):
  """python -m vit_jax.evaluate --json: its metrics (or the process, ok=False)."""
  out = subprocess.run([sys.executable, '-m', 'vit_jax.evaluate', '--json', *args], cwd=REPO,
                       env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300,
                       check=False)
  if not ok:
    return out
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.splitlines()[-1])


def test_one_command_stops_before_training_naming_both_bad_files(tmp_path):
  root = _flat_folder(tmp_path / 'flat', n=10)
  bad = _break_two(root)
  workdir = tmp_path / 'work'
  out = main(f'--config=configs/folder.py:{root}', f'--config.pretrained_path={SHIPPED}',
             f'--workdir={workdir}', '--config.total_steps=2', '--config.batch_size=9')
  assert out.returncode == 1
  assert '2 image file(s) cannot be decoded' in out.stderr
  for path in bad:
    assert str(path) in out.stderr
  assert 'Compiling' not in out.stdout + out.stderr
  assert not (workdir / 'checkpoints').exists()


def test_flowers_like_train_and_val_folders(tmp_path):
  """tf_flowers as users download it: train/ + val/, 5 classes of photos."""
  colours = {'daisy': (240, 240, 240), 'dandelion': (230, 200, 20), 'roses': (200, 20, 40),
             'sunflowers': (240, 150, 0), 'tulips': (180, 40, 160)}
  rng = np.random.default_rng(0)
  for split, n in (('train', 6), ('val', 2)):
    for cls, colour in colours.items():
      (tmp_path / 'flowers' / split / cls).mkdir(parents=True)
      for i in range(n):
        _image(colour, rng, (48, 64)).save(tmp_path / 'flowers' / split / cls / f'{i}.jpg')
  from configs import folder
  c = folder.get_config(str(tmp_path / 'flowers'))
  with c.unlocked():
    c.pretrained_path = str(SHIPPED)
    c.total_steps, c.batch_size, c.batch_size_eval = 2, 10, 10
    c.log_every, c.eval_every, c.checkpoint_every = 1, 0, 0
  result = train.run(c, str(tmp_path / 'work'))
  assert result.metrics['num_test_examples'] == 10   # val/ is the test split
  assert result.params['head']['kernel'].shape == (192, 5)
  assert (tmp_path / 'work' / 'labels.txt').read_text().split() == list(colours)
  assert not (tmp_path / 'work' / 'test_files.txt').exists()
  bundle = hub.load(str(tmp_path / 'work'))
  assert bundle.labels == list(colours) and bundle.image_size == (32, 32)


def test_no_preset_fixes_the_class_count():
  """A dataset override must never keep a preset's head size (issue 10, item 1)."""
  from configs import common, finetune_shipped, scratch
  assert finetune_shipped.get_config('cifar10').num_classes is None
  assert scratch.get_config('vit_ti,cifar10').num_classes is None
  assert common.with_dataset(common.get_config(), 'oxford_iiit_pet').num_classes is None
