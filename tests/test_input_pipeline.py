"""Data pipeline: sources, exact labels, resume-exact training batches, per-process
shards, padded/masked evaluation, clear errors, and the real CIFAR-10 test split."""

import os
import pathlib

import ml_collections
import numpy as np
import pytest
from conftest import SHIPPED, extract_once, tiny_imagenet_val_dir
from PIL import Image

from vit_jax import input_pipeline as ip

tf = pytest.importorskip('tensorflow')

# Each class gets a constant grey level, so an image tells its true label.
GREY = {'cat': 30, 'dog': 130, 'zebra': 230}


def _config(**kw) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(
      {
          'dataset': 'digits',
          'train_split': 'train',
          'test_split': 'test',
          'image_size': 8,
          'batch_size': 64,
          'batch_size_eval': 100,
          'seed': 0,
          'pp': {'train': 'inception_crop', 'eval': 'resize', 'crop_fraction': 0.875},
      }
  )
  c.update(kw)
  return c


def _write(path: pathlib.Path, grey: int, fmt: str, size=(6, 5)) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.full((*size, 3), grey, np.uint8)).save(path, format=fmt)


@pytest.fixture
def folder(tmp_path):
  """root/{train,test}/{cat,dog,zebra}/ with PNG, JPEG (any case) and BMP files, plus junk."""
  root = tmp_path / 'pets'
  layout = {
      'train': {'cat': ['a.png', 'b.PNG', 'c.jpg'], 'dog': ['x.jpeg', 'y.JPG'], 'zebra': ['1.bmp', '2.png', '3.Jpeg', '4.png']},
      'test': {'cat': ['t.png'], 'dog': ['u.png', 'v.jpg'], 'zebra': ['w.bmp']},
  }
  fmt = {'.png': 'PNG', '.jpg': 'JPEG', '.jpeg': 'JPEG', '.bmp': 'BMP'}
  for split, classes in layout.items():
    for cls, files in classes.items():
      for f in files:
        _write(root / split / cls / f, GREY[cls], fmt[os.path.splitext(f)[1].lower()])
  (root / 'train' / 'cat' / 'notes.txt').write_text('not an image')
  (root / 'train' / 'dog' / '.hidden.png').write_bytes(b'')
  return root


def _grey_label(images: np.ndarray) -> np.ndarray:
  """Recovers the label from the constant grey level of each image (JPEG error is a few levels)."""
  levels = (images.mean(axis=(1, 2, 3)) + 1) * 127.5
  ref = np.array(list(GREY.values()))
  return np.abs(levels[:, None] - ref[None]).argmin(axis=1)


def test_folder_classes_sizes_and_exact_labels(folder):
  c = _config(dataset=f'folder:{folder}', batch_size=4, batch_size_eval=3, pp={'train': 'resize', 'eval': 'resize'})
  info = ip.get_dataset_info(c)
  assert info[:4] == (3, 9, 4, ('cat', 'dog', 'zebra'))
  batches = list(ip.make_eval_iter(c, process_index=0, process_count=1))
  assert len(batches) == 2  # 4 examples, eval batch 3 -> padded to 6
  mask = np.concatenate([b['mask'] for b in batches])
  labels = np.concatenate([b['label'] for b in batches])
  images = np.concatenate([b['image'] for b in batches])
  np.testing.assert_array_equal(mask, [1, 1, 1, 1, 0, 0])
  real = mask == 1
  assert sorted(labels[real].tolist()) == [0, 1, 1, 2]
  np.testing.assert_array_equal(_grey_label(images[real]), labels[real])
  assert images.shape == (6, 8, 8, 3) and images.dtype == np.float32
  train = ip.make_train_iter(c, process_index=0, process_count=1)
  for _ in range(5):  # 20 draws from 9 examples: crosses epoch boundaries
    b = next(train)
    assert b['label'].dtype == np.int32 and b['image'].shape == (4, 8, 8, 3)
    np.testing.assert_array_equal(_grey_label(b['image']), b['label'])


def test_folder_slices_are_disjoint_and_complete(folder):
  first = ip.load_source(f'folder:{folder}', 'train[:50%]')
  rest = ip.load_source(f'folder:{folder}', 'train[50%:]')
  full = ip.load_source(f'folder:{folder}', 'train')
  assert (first.num_examples, rest.num_examples, full.num_examples) == (4, 5, 9)  # round(4.5) = 4
  assert not set(first.data) & set(rest.data)
  assert set(first.data) | set(rest.data) == set(full.data)
  lookup = dict(zip(full.data, full.labels))
  assert all(lookup[p] == label for p, label in zip(first.data, first.labels))


def test_tiny_imagenet_layout_is_read_directly(tmp_path):
  root = tmp_path / 'tiny-imagenet-200'
  wnids = ['n02', 'n01']
  (root).mkdir()
  (root / 'wnids.txt').write_text('\n'.join(wnids) + '\n')
  for k, w in enumerate(sorted(wnids)):
    for i in range(2):
      _write(root / 'train' / w / 'images' / f'{w}_{i}.JPEG', 60 + 100 * k, 'JPEG')
    (root / 'train' / w / f'{w}_boxes.txt').write_text('x\n')
  ann = []
  for i, w in enumerate(['n02', 'n01', 'n02']):
    _write(root / 'val' / 'images' / f'val_{i}.JPEG', 60 + 100 * sorted(wnids).index(w), 'JPEG')
    ann.append(f'val_{i}.JPEG\t{w}\t0\t0\t5\t5')
  (root / 'val' / 'val_annotations.txt').write_text('\n'.join(ann) + '\n')
  _write(root / 'test' / 'images' / 'test_0.JPEG', 0, 'JPEG')
  c = _config(dataset=f'folder:{root}', test_split='val')
  assert ip.get_dataset_info(c)[:4] == (2, 4, 3, ('n01', 'n02'))
  # words.txt names the WordNet IDs for people (labels.txt); the order stays.
  (root / 'words.txt').write_text('n00\tentity\nn02\tgoldfish, Carassius auratus\n')
  ip.load_source.cache_clear()   # Sources are cached per (dataset, split).
  assert ip.get_dataset_info(c).class_names == ('n01', 'goldfish, Carassius auratus')
  val = ip.load_source(f'folder:{root}', 'val')
  assert [os.path.basename(p) for p in val.data] == ['val_0.JPEG', 'val_1.JPEG', 'val_2.JPEG']
  np.testing.assert_array_equal(val.labels, [1, 0, 1])
  with pytest.raises(ValueError, match=r"lacks: \['images'\].*has no labels: use test_split='val'"):
    ip.load_source(f'folder:{root}', 'test')


def test_digits_embedded_dataset_values_and_split():
  from sklearn.datasets import load_digits

  digits = load_digits()
  c = _config(pp={'train': 'resize', 'eval': 'resize'}, batch_size_eval=100)
  info = ip.get_dataset_info(c)
  assert info[:4] == (10, 1438, 359, tuple('0123456789'))
  batches = list(ip.make_eval_iter(c, process_index=0, process_count=1))
  assert len(batches) == 4
  mask = np.concatenate([b['mask'] for b in batches])
  assert mask.sum() == 359 and mask[:359].all() and not mask[359:].any()
  images = np.concatenate([b['image'] for b in batches])[:359]
  labels = np.concatenate([b['label'] for b in batches])[:359]
  test_idx = np.arange(4, 1797, 5)  # every 5th image is test
  np.testing.assert_array_equal(labels, digits.target[test_idx])
  # 8x8 at image_size 8: resize is the identity; 0..16 -> 0..255 -> [-1, 1], grey -> RGB.
  expected = np.round(digits.images[test_idx] * 255 / 16) / 127.5 - 1
  np.testing.assert_allclose(images, np.repeat(expected[..., None], 3, -1), atol=1e-6)


def test_train_batches_are_resume_exact_across_epochs():
  c = _config(batch_size=256)  # 1438 train examples: epoch boundary inside step 5
  steps = [next(it) for it in [ip.make_train_iter(c, process_index=0, process_count=1)] for _ in range(8)]
  resumed = ip.make_train_iter(c, start_step=5, process_index=0, process_count=1)
  for k in range(5, 8):
    b = next(resumed)
    np.testing.assert_array_equal(b['image'], steps[k]['image'])
    np.testing.assert_array_equal(b['label'], steps[k]['label'])
  other_seed = next(ip.make_train_iter(_config(batch_size=256, seed=1), process_index=0, process_count=1))
  assert not np.array_equal(other_seed['label'], steps[0]['label'])


def test_each_epoch_is_a_permutation():
  n = 37
  pairs = list(ip._train_positions(n, seed=3, start_position=0).take(3 * n).as_numpy_iterator())
  pos, idx = np.array(pairs).T
  np.testing.assert_array_equal(pos, np.arange(3 * n))
  for e in range(3):
    np.testing.assert_array_equal(np.sort(idx[e * n : (e + 1) * n]), np.arange(n))
  assert not np.array_equal(idx[:n], idx[n : 2 * n])  # reshuffled every epoch


def test_process_shards_assemble_the_global_batch():
  c = _config(batch_size=64, batch_size_eval=100)
  whole = ip.make_train_iter(c, start_step=2, process_index=0, process_count=1)
  parts = [ip.make_train_iter(c, start_step=2, process_index=p, process_count=2) for p in range(2)]
  for _ in range(3):
    w = next(whole)
    got = [next(it) for it in parts]
    assert got[0]['image'].shape[0] == 32
    np.testing.assert_array_equal(np.concatenate([g['image'] for g in got]), w['image'])
    np.testing.assert_array_equal(np.concatenate([g['label'] for g in got]), w['label'])
  evals = [list(ip.make_eval_iter(c, process_index=p, process_count=2)) for p in range(2)]
  assert len(evals[0]) == len(evals[1]) == 4  # every process yields the same number of batches
  assert sum(b['mask'].sum() for e in evals for b in e) == 359
  with pytest.raises(ValueError, match='config.batch_size=63 must be a positive multiple of the process count 2'):
    ip.make_train_iter(_config(batch_size=63), process_index=0, process_count=2)


def test_corrupt_image_error_names_the_file(tmp_path):
  root = tmp_path / 'bad'
  for i in range(6):
    for cls in 'ab':
      _write(root / 'train' / cls / f'{i}.png', 10, 'PNG')
      _write(root / 'test' / cls / f'{i}.png', 10, 'PNG')
  (root / 'train' / 'a' / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 this is not really a jpeg')
  (root / 'test' / 'a' / 'zz_truncated.png').write_bytes(b'\x89PNG\r\n\x1a\n\x00\x00')
  c = _config(dataset=f'folder:{root}', batch_size=2, batch_size_eval=4)
  with pytest.raises(ValueError, match=r"Cannot decode image file '.*/train/a/broken\.jpg'"):
    it = ip.make_train_iter(c, process_index=0, process_count=1)
    for _ in range(10):
      next(it)
  with pytest.raises(ValueError, match=r"Cannot decode image file '.*/test/a/zz_truncated\.png'"):
    list(ip.make_eval_iter(c, process_index=0, process_count=1))


def test_unknown_dataset_and_bad_folder_messages(tmp_path):
  with pytest.raises(ValueError, match=r"Unknown dataset 'no_such_dataset_xyz': expected a TFDS name .*'folder:<root>', 'npz:<file.npz>' or 'digits'"):
    ip.get_dataset_info(_config(dataset='no_such_dataset_xyz'))
  (tmp_path / 'one_class' / 'train' / 'a').mkdir(parents=True)
  _write(tmp_path / 'one_class' / 'train' / 'a' / '0.png', 1, 'PNG')
  with pytest.raises(ValueError, match=r"has 1 class folder\(s\) \['a'\]; a classifier needs at least two"):
    ip.get_dataset_info(_config(dataset=f'folder:{tmp_path / "one_class"}'))
  _write(tmp_path / 'one_class' / 'train' / 'b' / '0.png', 1, 'PNG')
  with pytest.raises(ValueError, match=r"Split folder '.*one_class/validation' does not exist.*\['train'\]"):
    ip.get_dataset_info(_config(dataset=f'folder:{tmp_path / "one_class"}', test_split='validation'))
  with pytest.raises(ValueError, match=r"Image folder root '.*nowhere' does not exist"):
    ip.get_dataset_info(_config(dataset=f'folder:{tmp_path / "nowhere"}'))
  with pytest.raises(ValueError, match=r"'digits' has splits 'train' and 'test', got 'validation'"):
    ip.get_dataset_info(_config(test_split='validation'))
  with pytest.raises(ValueError, match=r'config.num_classes=5 but .* has 10 classes'):
    ip.make_train_iter(_config(num_classes=5), process_index=0, process_count=1)


def test_tfds_mock_in_memory_and_streaming(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=10):
    c = _config(dataset='cifar10', tfds_data_dir=str(tmp_path), train_split='train[:98%]', batch_size=4,
                batch_size_eval=4, image_size=16)
    info = ip.get_dataset_info(c)
    assert info.num_classes == 10 and len(info.class_names) == 10  # names are '0'..'9' under the mock
    assert info.num_train == 10 and info.num_test == 10  # the mock ignores slicing and info.splits is empty
    batches = list(ip.make_eval_iter(c, process_index=0, process_count=1))
    assert len(batches) == 3 and sum(b['mask'].sum() for b in batches) == 10
    first = [next(it) for it in [ip.make_train_iter(c, process_index=0, process_count=1)] for _ in range(4)]
    assert first[0]['image'].shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(next(ip.make_train_iter(c, start_step=3, process_index=0,
                                                          process_count=1))['image'], first[3]['image'])
    # Streaming path (used for splits larger than tfds_in_memory_max): also resume-exact.
    s = _config(**{**c.to_dict(), 'tfds_in_memory_max': 0, 'shuffle_buffer': 8})
    assert ip._source(s, s.train_split).kind == 'stream'
    streamed = [next(it) for it in [ip.make_train_iter(s, process_index=0, process_count=1)] for _ in range(4)]
    resumed = ip.make_train_iter(s, start_step=2, process_index=0, process_count=1)
    for k in (2, 3):
      b = next(resumed)
      np.testing.assert_array_equal(b['image'], streamed[k]['image'])
      np.testing.assert_array_equal(b['label'], streamed[k]['label'])
    # Every epoch of the stream holds each example once: labels of 10 positions = the split's labels.
    labels = np.concatenate([b['label'] for b in streamed])
    assert sorted(labels[:10].tolist()) == sorted(ip._source(c, 'train[:98%]').labels.tolist())


def test_unprepared_tfds_without_download_says_what_to_do(tmp_path):
  pytest.importorskip('tensorflow_datasets')
  c = _config(dataset='cifar10', tfds_data_dir=str(tmp_path), tfds_download=False)
  with pytest.raises(ValueError, match=r"TFDS dataset 'cifar10' is not prepared in data_dir=.*tfds build cifar10"):
    ip.get_dataset_info(c)


def test_to_global_makes_jax_arrays():
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  mesh = Mesh(np.array(jax.devices()), ('data',))
  batch = next(ip.make_train_iter(_config(batch_size=8), process_index=0, process_count=1))
  out = ip.to_global(batch, NamedSharding(mesh, PartitionSpec('data')))
  assert isinstance(out['image'], jax.Array) and out['image'].shape == (8, 8, 8, 3)
  np.testing.assert_array_equal(np.asarray(out['image']), batch['image'])
  np.testing.assert_array_equal(np.asarray(out['label']), batch['label'])


def _cifar_test_dir() -> pathlib.Path:
  """CIFAR-10's test split from ../shared/data, extracted once into the test cache."""
  return extract_once('cifar10_jpeg.tar.gz', 'cifar10_jpeg_test',
                      lambda m: m.name.startswith(('test/', './test/')))


def test_real_cifar10_test_split_is_scored_completely():
  root = _cifar_test_dir()
  # Only the test split is extracted, so it also provides the class list.
  c = _config(dataset=f'folder:{root}', train_split='test', test_split='test', image_size=32, batch_size_eval=512)
  info = ip.get_dataset_info(c)
  assert info.class_names == ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship',
                              'truck')
  assert info.num_test == 10_000
  n_real, n_batches, counts = 0, 0, np.zeros(10, int)
  for b in ip.make_eval_iter(c, process_index=0, process_count=1):
    n_batches += 1
    real = b['mask'] == 1
    n_real += int(real.sum())
    counts += np.bincount(b['label'][real], minlength=10)
    assert b['image'].shape == (512, 32, 32, 3)
  # The original dropped the last partial batch: 19 * 512 = 9,728 of 10,000. We score all of them.
  assert n_batches == 20 and n_real == 10_000
  np.testing.assert_array_equal(counts, [1000] * 10)


def test_real_tiny_imagenet_val_split():
  root = tiny_imagenet_val_dir()
  c = _config(dataset=f'folder:{root}', train_split='val', test_split='val', image_size=8, batch_size_eval=1000,
              pp={'train': 'resize', 'eval': 'resize'})
  info = ip.get_dataset_info(c)
  assert info.num_classes == 200 and info.num_test == 10_000
  # In the wnids' sorted order, named by words.txt: the shipped checkpoint's labels.
  shipped = SHIPPED.with_suffix('.labels.txt').read_text()
  assert list(info.class_names) == shipped.splitlines() and info.class_names[0].startswith('goldfish')
  counts = np.zeros(200, int)
  for b in ip.make_eval_iter(c, process_index=0, process_count=1):  # decodes every file, greyscale JPEGs too
    counts += np.bincount(b['label'][b['mask'] == 1], minlength=200)
  np.testing.assert_array_equal(counts, [50] * 200)
