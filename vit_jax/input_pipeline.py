"""Data sources -> tf.data -> per-process numpy batches -> global jax.Arrays.

Datasets (`config.dataset`):
  * a TFDS name, e.g. 'cifar10' or 'oxford_iiit_pet:3.*.*', read from
    `config.tfds_data_dir`; split strings like 'train[:98%]' are TFDS's own.
  * 'folder:<root>': image files (.jpg .jpeg .png .bmp .gif .webp, any case;
    the content decides the format) in class folders, labels = sorted class
    folder names. Layouts: root/train/<class> with root/test/<class> (else
    root/val/<class>) as 'test'; root/train/<class> alone or a flat
    root/<class>: 'train' and 'test' are a stratified, seeded split (10% of
    every class held out, `_held_out`). Any other split name is a folder
    root/<name>. Tiny-ImageNet's own layout (`train/<wnid>/images/*.JPEG`,
    `val/images/*.JPEG` + `val/val_annotations.txt`) is read directly, so
    'folder:/path/tiny-imagenet-200' with test split 'val' just works.
    Slices 'train[:90%]' / 'train[90%:]' are taken from a fixed,
    seed-independent permutation of the sorted file list, so the two parts are
    disjoint and class-balanced in expectation. `checked_config` decodes every
    file once before training; large JPEGs are decoded at reduced size
    (`DCT_MIN_SIDE`).
  * 'npz:<file.npz>': arrays x_train, y_train, x_test, y_test (`_npz_source`).
  * 'digits': scikit-learn's 8x8 handwritten digits (1,797 images, shipped with
    scikit-learn, no network). Split: every 5th image (index % 5 == 4) is
    'test' (359), the rest 'train' (1,438).

Determinism and resume (the original restarted the data on resume; we don't):
the training stream is a sequence of global positions 0, 1, 2, ... Position P
belongs to epoch P // N and maps to example perm_epoch[P % N], where perm_epoch
is a stateless shuffle keyed by (config.seed, epoch). Global batch k holds
positions [k*B, (k+1)*B); process p takes [k*B + p*b, k*B + (p+1)*b). The
augmentation seed of an example is derived from (config.seed, P). Hence batch k
is the same whether training started at 0 or resumed at k, and resuming only
computes integer positions before the first decode (cheap). Large TFDS splits
that do not fit in memory (more than `config.tfds_in_memory_max` examples; 0
forces streaming) are streamed instead: each epoch shuffled with a seeded buffer of
`config.shuffle_buffer`, and resumed by skipping raw, undecoded records.

Evaluation scores every example: the last batch is padded and `mask` marks real
examples (the original dropped the remainder, ~3% of CIFAR-10 test).

Config keys read here (defaults in brackets): dataset, tfds_data_dir [None],
tfds_download [True], tfds_in_memory_max [300_000], train_split, test_split,
num_classes [dataset's], image_size, pp.train ['inception_crop'],
pp.eval ['resize'], pp.crop_fraction [images.CROP_FRACTION = 0.875], pp.rotation_factor [0.02],
pp.zoom_factor [0.2], shuffle_buffer [50_000, streaming only], seed [0],
batch_size, batch_size_eval [batch_size], prefetch [2], data_threads [None = TF's
default; an int caps tf.data's private thread pool].
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
try:
  import tensorflow as tf
except ImportError:
  raise ImportError("vit_jax.input_pipeline needs TensorFlow: pip install 'vit_jax[train]'") from None

from vit_jax import checkpoint, preprocess
from vit_jax.images import CROP_FRACTION, DCT_MIN_SIDE, hw
from vit_jax.dataset_info import IMAGE_EXTENSIONS, DatasetInfo
from vit_jax.models.vit import config_value

# Keep TensorFlow off any accelerator: JAX owns them.
try:
  tf.config.set_visible_devices([], 'GPU')
except (RuntimeError, ValueError):  # already initialised / no GPU support
  pass

logger = logging.getLogger(__name__)

ACCEPTED_DATASETS = "a TFDS name (e.g. 'cifar10'), 'folder:<root>', 'npz:<file.npz>' or 'digits'"

# Probed before a TFDS download: TFDS fetches prepared data from GCS first.
TFDS_HOST = ('storage.googleapis.com', 443)

_SHUFFLE_SALT = 0x5EED
_AUGMENT_SALT = 0xA06


@dataclasses.dataclass(frozen=True, eq=False)
class Source:
  """One split of a dataset, ready for random access (or streaming).

  kind: 'files'   data = np.ndarray[str] of image paths
        'encoded' data = np.ndarray[object] of encoded image bytes (in memory)
        'array'   data = np.ndarray uint8 (N, H, W, 3)
        'stream'  data = callable returning a tf.data.Dataset of
                  (encoded bytes, label) in a fixed order (large TFDS splits).
  labels: int32 (N,) for random-access kinds; None for 'stream'.
  """

  description: str
  kind: str
  data: Any
  labels: np.ndarray | None
  num_examples: int | None
  class_names: tuple[str, ...]


# ----------------------------------------------------------------------------
# Split strings
# ----------------------------------------------------------------------------

_SPLIT_RE = re.compile(r'^\s*([\w.\-]+)\s*(?:\[\s*([^:\]]*?)\s*:\s*([^\]]*?)\s*\])?\s*$')


def parse_split(split: str) -> tuple[str, str | None, str | None]:
  """'train[:98%]' -> ('train', None, '98%'); 'test' -> ('test', None, None)."""
  m = _SPLIT_RE.match(split)
  if not m:
    raise ValueError(
        f"Cannot parse split {split!r}: expected 'name' or 'name[start:stop]' with integers or "
        "percentages, e.g. 'train[:98%]'."
    )
  return m.group(1), m.group(2) or None, m.group(3) or None


def _bound(spec: str | None, n: int, default: int, split: str) -> int:
  if spec is None:
    return default
  try:
    if spec.endswith('%'):
      value = round(float(spec[:-1]) * n / 100.0)
    else:
      value = int(spec)
  except ValueError as e:
    raise ValueError(f'Bad slice bound {spec!r} in split {split!r}.') from e
  if value < 0:
    value += n
  return min(max(value, 0), n)


def slice_indices(split: str, n: int) -> np.ndarray | None:
  """Indices selected by the slice in `split` (None = no slice) on a fixed permutation of range(n)."""
  _, start, stop = parse_split(split)
  if start is None and stop is None:
    return None
  a, b = _bound(start, n, 0, split), _bound(stop, n, n, split)
  # Seed-independent permutation so that slices of class-sorted lists stay balanced.
  perm = np.random.default_rng(20201022).permutation(n)
  return np.sort(perm[a:b])


def _apply_slice(split: str, data: Any, labels: np.ndarray) -> tuple[Any, np.ndarray]:
  sel = slice_indices(split, len(labels))
  if sel is None:
    return data, labels
  if len(sel) == 0:
    raise ValueError(f'Split {split!r} selects no examples (of {len(labels)}).')
  return data[sel], labels[sel]


# ----------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------


def _digits_source(split: str) -> Source:
  """scikit-learn's digits: 8x8 grey values 0..16 -> uint8 0..255 RGB."""
  from sklearn.datasets import load_digits

  name, _, _ = parse_split(split)
  digits = load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
  images = np.repeat(images[..., None], 3, axis=-1)
  labels = digits.target.astype(np.int32)
  is_test = np.arange(len(labels)) % 5 == 4  # fixed 80/20 rule, independent of config.seed
  if name == 'train':
    keep = ~is_test
  elif name == 'test':
    keep = is_test
  else:
    raise ValueError(f"Dataset 'digits' has splits 'train' and 'test', got {split!r}.")
  images, labels = _apply_slice(split, images[keep], labels[keep])
  return Source(f'digits/{split}', 'array', images, labels, len(labels), tuple(str(i) for i in range(10)))


def _is_image(name: str) -> bool:
  return not name.startswith('.') and name.lower().endswith(IMAGE_EXTENSIONS)


def _list_images(directory: str) -> list[str]:
  out = []
  for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
    dirnames.sort()
    out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f))
  return out


def _subdirs(path: str) -> list[str]:
  return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith('.'))


HELD_OUT_FRACTION = 0.1
_HELD_OUT_SEED = 20201022
_TEST_DIRS = ('test', 'val')  # The first that exists is the 'test' split.


def folder_layout(root: str) -> tuple[str, str | None]:
  """(directory of the classes of the train pool, directory of 'test' or None).

  root/train/<class> with root/test or root/val: those folders. root/train
  alone, or a flat root/<class>: None, i.e. 'train' and 'test' are a
  stratified split of the pool (`_held_out`).
  """
  if not os.path.isdir(root):
    raise ValueError(f"Image folder root {root!r} does not exist (from dataset 'folder:{root}').")
  train = os.path.join(root, 'train')
  test = next((os.path.join(root, d) for d in _TEST_DIRS if os.path.isdir(os.path.join(root, d))),
              None)
  if not os.path.isdir(train) and test is None:
    return root, None  # Flat: root/<class>/*.
  return train, test


def _folder_class_names(root: str, train_split: str) -> tuple[str, ...]:
  """Label order: sorted class folder names of the train split (identical for every split).

  Tiny-ImageNet lists its classes in root/wnids.txt; sorted, they are the same
  names as its train folders, and reading them lets 'val' be used without 'train'.
  """
  wnids = os.path.join(root, 'wnids.txt')
  if os.path.isfile(wnids):
    with open(wnids) as f:
      names = sorted({line.strip() for line in f if line.strip()})
    if names:
      return tuple(names)
  name = parse_split(train_split)[0]
  path = os.path.join(root, name)
  if not os.path.isdir(path):
    if name != 'train':
      raise ValueError(f'Split folder {path!r} does not exist; folders in {root!r}: '
                       f'{_subdirs(root)}.')
    path = folder_layout(root)[0]
  classes = tuple(_subdirs(path))
  if len(classes) < 2:
    raise ValueError(
        f'{path!r} has {len(classes)} class folder(s) {list(classes)}; a classifier needs at '
        'least two. Expected <root>/<class>/<images> (flat), or <root>/train/<class>/<images>.')
  return classes


def _class_files(directory: str, classes: tuple[str, ...]) -> tuple[list[str], list[int]]:
  """Images of every class folder of `directory`; an empty class folder is an error."""
  found = _subdirs(directory)
  class_index = {c: i for i, c in enumerate(classes)}
  unknown = [c for c in found if c not in class_index]
  if unknown:
    raise ValueError(f'{directory!r} has class folders that the train split lacks: '
                     f'{unknown[:5]}.')
  paths: list[str] = []
  labels: list[int] = []
  empty = []
  for c in found:
    files = _list_images(os.path.join(directory, c))
    if not files:
      empty.append(c)
    paths.extend(files)
    labels.extend([class_index[c]] * len(files))
  if empty:
    raise ValueError(
        f'Class folder(s) with no images in {directory!r}: {", ".join(empty)}. Add images '
        f'({", ".join(IMAGE_EXTENSIONS)}, any case) or remove the folder(s).')
  return paths, labels


def _held_out(labels: np.ndarray) -> np.ndarray:
  """Boolean mask of the held-out 'test' part: 10% of every class, seeded.

  Deterministic (a fixed seed and the sorted file list), stratified (per
  class, at least one image of any class with two or more).
  """
  test = np.zeros(len(labels), bool)
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    k = max(1, round(HELD_OUT_FRACTION * len(idx))) if len(idx) >= 2 else 0
    rng = np.random.default_rng([_HELD_OUT_SEED, int(c)])
    test[rng.permutation(idx)[:k]] = True
  return test


def _folder_source(root: str, split: str, train_split: str) -> Source:
  root = os.path.abspath(os.path.expanduser(root))
  name = parse_split(split)[0]
  classes = _folder_class_names(root, train_split)
  class_index = {c: i for i, c in enumerate(classes)}
  split_dir = os.path.join(root, name)
  pool, test_dir = folder_layout(root)
  if name == 'test' and test_dir is not None:
    split_dir = test_dir  # root/test, else root/val
  note = ''
  if name in ('train', 'test') and test_dir is None and os.path.isdir(pool):
    # No test/ or val/ folder: a stratified split of the pool.
    split_dir = pool
    paths, labels = _class_files(pool, classes)
    test = _held_out(np.array(labels))
    keep = test if name == 'test' else ~test
    paths = [p for p, k in zip(paths, keep) if k]
    labels = [lab for lab, k in zip(labels, keep) if k]
    share = HELD_OUT_FRACTION if name == 'test' else 1 - HELD_OUT_FRACTION
    note = (f' = {share:.0%} of every class of {pool} (no test/ or val/ folder: a '
            'stratified split, seeded)')
  elif not os.path.isdir(split_dir):
    raise ValueError(
        f'Split folder {split_dir!r} does not exist. Layouts: root/<class>/*, '
        f'root/train/<class>/* [+ root/test/ or root/val/]; folders in {root!r}: '
        f'{_subdirs(root)}.')
  elif os.path.isfile(os.path.join(split_dir, 'val_annotations.txt')):
    # Tiny-ImageNet validation layout: val/images/<file> listed with its wnid.
    annotations = os.path.join(split_dir, 'val_annotations.txt')
    paths, labels = [], []
    with open(annotations) as f:
      for lineno, line in enumerate(f, 1):
        fields = line.split('\t')
        if len(fields) < 2:
          continue
        if fields[1] not in class_index:
          raise ValueError(f'{annotations}:{lineno}: class {fields[1]!r} is not a class of the train split.')
        paths.append(os.path.join(split_dir, 'images', fields[0]))
        labels.append(class_index[fields[1]])
  else:
    try:
      paths, labels = _class_files(split_dir, classes)
    except ValueError as e:
      if os.path.isfile(os.path.join(root, 'wnids.txt')) and 'lacks' in str(e):
        raise ValueError(f"{e} Tiny-ImageNet's 'test' split has no labels: use "
                         "test_split='val'.") from None
      raise
  if not paths:
    raise ValueError(
        f'No images with extensions {IMAGE_EXTENSIONS} (any case) found under {split_dir!r}; '
        'expected root/<split>/<class>/<image files>.'
    )
  data, label_arr = _apply_slice(split, np.array(paths), np.array(labels, np.int32))
  return Source(f'folder:{root}/{split}{note}', 'files', data, label_arr, len(label_arr),
                _display_names(root, classes))


def _display_names(root: str, classes: tuple[str, ...]) -> tuple[str, ...]:
  """The class names people read (labels.txt, predict): the folder names, except
  that Tiny-ImageNet's root/words.txt turns its WordNet IDs into words
  ('n01443537' -> 'goldfish, Carassius auratus'). The label order is the folders'."""
  words = os.path.join(root, 'words.txt')
  if not os.path.isfile(words):
    return classes
  table = {}
  with open(words, encoding='utf-8', errors='replace') as f:
    for line in f:
      wnid, _, text = line.rstrip('\n').partition('\t')
      table[wnid.strip()] = text.strip()
  return tuple(table.get(c) or c for c in classes)


def _npz_source(path: str, split: str) -> Source:
  """Arrays x_<split> (N, H, W[, C]) and y_<split> (N,) from an `.npz`, as
  Keras' MNIST-style loaders save them (`np.savez(f, x_train=..., y_train=...,
  x_test=..., y_test=...)`). uint8 0..255, or floats in [0, 1]; 1 channel is
  repeated to RGB, a 4th (alpha) dropped. Classes 0..max label, named by number.
  """
  name = parse_split(split)[0]
  if not os.path.isfile(path):
    raise ValueError(f"Array file {path!r} does not exist (from dataset 'npz:{path}').")
  with np.load(path, allow_pickle=False) as npz:
    keys = set(npz.files)
    if f'x_{name}' not in keys or f'y_{name}' not in keys:
      raise ValueError(f'{path} has no x_{name} / y_{name} arrays (it has {sorted(keys)}); '
                       'expected x_train, y_train, x_test, y_test.')
    x, y = npz[f'x_{name}'], npz[f'y_{name}']
    num_classes = 1 + max(int(npz[k].max()) for k in ('y_train', 'y_test') if k in keys)
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4 or x.shape[-1] not in (1, 3, 4) or y.ndim != 1 or len(x) != len(y):
    raise ValueError(f'{path}: x_{name} must be (N, H, W) or (N, H, W, 1|3|4) and y_{name} '
                     f'(N,), got {x.shape} and {y.shape}.')
  if np.issubdtype(x.dtype, np.floating):
    if x.min() < 0 or x.max() > 1:
      raise ValueError(f'{path}: float x_{name} must lie in [0, 1] (or save uint8 0..255).')
    x = np.round(x * 255.0)
  x = np.clip(x, 0, 255).astype(np.uint8)
  x = np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x[..., :3]
  if num_classes < 2 or y.min() < 0:
    raise ValueError(f'{path}: labels must be 0..C-1 with at least two classes, got '
                     f'{int(y.min())}..{int(y.max())}.')
  images, labels = _apply_slice(split, x, y.astype(np.int32))
  return Source(f'npz:{path}/{split}', 'array', images, labels, len(labels),
                tuple(str(i) for i in range(num_classes)))


def _tfds_source(name: str, split: str, data_dir: str | None, download: bool, in_memory_max: int) -> Source:
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise ImportError(f"TFDS dataset {name!r} needs tensorflow-datasets: pip install 'vit_jax[train]'") from None

  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except ValueError as e:  # DatasetNotFoundError, or a name TFDS cannot parse
    raise ValueError(f'Unknown dataset {name!r}: expected {ACCEPTED_DATASETS}.') from e
  image_key, label_key = builder.info.supervised_keys or ('image', 'label')
  if not isinstance(image_key, str) or not isinstance(label_key, str):
    image_key, label_key = 'image', 'label'
  features = builder.info.features
  if image_key not in features or label_key not in features:
    raise ValueError(f'TFDS dataset {name!r} has no {image_key!r}/{label_key!r} features: {list(features)}.')
  class_names = tuple(features[label_key].names)
  decoders = {image_key: tfds.decode.SkipDecoding()}

  def raw() -> tf.data.Dataset:
    ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)
    return ds.map(lambda ex: (ex[image_key], tf.cast(ex[label_key], tf.int32)))

  try:
    raw()
  except AssertionError as e:  # TFDS: "could not find data in <data_dir>"
    if not download:
      raise ValueError(
          f'TFDS dataset {name!r} is not prepared in data_dir={data_dir!r}. Run '
          f'`tfds build {name} --data_dir=<dir>` on a machine with network access, or set '
          "config.tfds_download=True, or use 'folder:<root>' for local images."
      ) from e
    # Offline, download_and_prepare retries for minutes: probe first, in seconds.
    reason = checkpoint.unreachable(*TFDS_HOST)
    if reason:
      raise ValueError(
          f'TFDS dataset {name!r} is not prepared in {builder.data_dir} and it cannot be '
          f'downloaded: {reason}. Prepare it on a machine with network (`tfds build {name} '
          '--data_dir=DIR`), copy DIR here and set --config.tfds_data_dir=DIR; or use your '
          "own files: --config.dataset=folder:<root> or npz:<file.npz>.") from e
    logger.info('Downloading and preparing TFDS %s into %s (config.tfds_download=True).', name, data_dir)
    builder.download_and_prepare()
  try:
    num = builder.info.splits[split].num_examples
  except (KeyError, ValueError):
    num = None  # e.g. under tfds.testing.mock_data, whose info.splits is empty
  if in_memory_max <= 0 or (num is not None and num > in_memory_max):
    return Source(f'tfds:{name}/{split}', 'stream', raw, None, num, class_names)
  images, labels = [], []
  for image, label in raw().as_numpy_iterator():
    images.append(image)
    labels.append(label)
  if not images:
    raise ValueError(f'TFDS split {name}/{split} is empty.')
  data = np.empty(len(images), dtype=object)
  data[:] = images
  return Source(f'tfds:{name}/{split}', 'encoded', data, np.array(labels, np.int32), len(images), class_names)


@functools.lru_cache(maxsize=16)
def load_source(
    dataset: str,
    split: str,
    *,
    train_split: str = 'train',
    data_dir: str | None = None,
    download: bool = True,
    in_memory_max: int = 300_000,
    exclude: frozenset[str] = frozenset(),
) -> Source:
  """Returns the Source of one split (cached: listing a folder or reading TFDS happens once).

  `exclude`: image files to leave out (config.skipped_images, set by
  `checked_config` under config.skip_bad_images).
  """
  if not isinstance(dataset, str) or not dataset:
    raise ValueError(f'config.dataset must be {ACCEPTED_DATASETS}, got {dataset!r}.')
  if dataset == 'digits':
    return _digits_source(split)
  if dataset.startswith('npz:'):
    return _npz_source(os.path.expanduser(dataset[len('npz:'):]), split)
  if dataset.startswith('folder:'):
    root = dataset[len('folder:') :]
    if not root:
      raise ValueError("dataset 'folder:<root>' needs a root path, e.g. 'folder:/data/flowers'.")
    source = _folder_source(root, split, train_split)
    if exclude:
      keep = np.array([p not in exclude for p in source.data], bool)
      source = dataclasses.replace(source, data=source.data[keep], labels=source.labels[keep],
                                   num_examples=int(keep.sum()))
    return source
  return _tfds_source(dataset, split, data_dir, download, in_memory_max)


def _source(config: Any, split: str) -> Source:
  return load_source(
      config.dataset,
      split,
      train_split=config.get('train_split', 'train'),
      data_dir=config.get('tfds_data_dir'),
      download=bool(config.get('tfds_download', True)),
      in_memory_max=int(config.get('tfds_in_memory_max', 300_000)),
      exclude=frozenset(config.get('skipped_images') or ()),
  )


def checked_config(config: Any, workdir: str | None,
                   splits: tuple[str, ...] | None = None) -> Any:
  """Decodes every image file of the train and test splits (or `splits`)
  once, before training (or evaluation).

  Undecodable files stop the run with the full list (ValueError), unless
  config.skip_bad_images: then they are logged and the returned copy of the
  config lists them in `skipped_images`, which every split leaves out.
  Cached in the workdir (`check_images`); datasets without files pass as is.
  """
  paths: list[str] = []
  for split in dict.fromkeys(splits or (config.train_split, config.test_split)):
    source = load_source(config.dataset, split, train_split=config.get('train_split', 'train'),
                         data_dir=config.get('tfds_data_dir'),
                         download=bool(config.get('tfds_download', True)),
                         in_memory_max=int(config.get('tfds_in_memory_max', 300_000)))
    if source.kind == 'files':
      paths.extend(str(p) for p in source.data)
  bad = check_images(sorted(set(paths)), workdir, shard=_process_info(None, None))
  if not bad:
    return config
  if not config.get('skip_bad_images'):
    raise ValueError(bad_images_message(bad))
  logger.warning('Skipping %d undecodable image file(s) (config.skip_bad_images):\n%s',
                 len(bad), '\n'.join(f'  {p}: {r}' for p, r in sorted(bad.items())))
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.skipped_images = sorted(bad)
  return config


def get_dataset_info(config: Any) -> DatasetInfo:
  """Class count, split sizes and class names (label order) of config.dataset."""
  train = _source(config, config.train_split)
  test = _source(config, config.test_split)
  held_out = tuple(str(p) for p in test.data) if 'stratified split' in test.description else ()
  return DatasetInfo(len(train.class_names), int(train.num_examples or 0), int(test.num_examples or 0),
                     train.class_names, train.description, test.description, held_out)


# ----------------------------------------------------------------------------
# Index streams (integers only: cheap to skip)
# ----------------------------------------------------------------------------


def _shard_chunks(ds: tf.data.Dataset, chunk: int, count: int, index: int) -> tf.data.Dataset:
  """Keeps chunk c of `chunk` consecutive elements iff c % count == index (per-process share)."""
  if count == 1:
    return ds
  return ds.batch(chunk, drop_remainder=True).shard(count, index).unbatch()


def _train_positions(n: int, seed: int, start_position: int) -> tf.data.Dataset:
  """(position, example index) pairs from `start_position` on, epoch after epoch."""
  key = tf.constant([seed, _SHUFFLE_SALT], tf.int64)

  def epoch(e):
    perm = tf.random.experimental.stateless_shuffle(
        tf.range(n, dtype=tf.int64), seed=tf.random.experimental.stateless_fold_in(key, e)
    )
    return tf.data.Dataset.from_tensor_slices((e * n + tf.range(n, dtype=tf.int64), perm))

  e0, offset = divmod(start_position, n)
  return tf.data.Dataset.range(e0, 2**62).flat_map(epoch).skip(offset)


def _eval_positions(n: int, padded: int) -> tf.data.Dataset:
  """(position, example index, mask) for positions 0..padded-1; padding repeats example 0."""
  pos = tf.data.Dataset.range(padded)
  return pos.map(lambda p: (p, tf.where(p < n, p, tf.zeros_like(p)), tf.cast(p < n, tf.float32)))


# ----------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------


# JPEGs whose shorter side is at least 2, 4 or 8 times DCT_MIN_SIDE * image_size
# (images.DCT_MIN_SIDE = 4) are decoded at 1/2, 1/4 or 1/8 size by libjpeg's DCT
# scaling (cheaper, far less memory: a 8000x8000 photo for 384px training
# decodes as 2000x2000, 12 MB not 192 MB).


def decode_image(encoded: tf.Tensor, min_side: int | None = None) -> tf.Tensor:
  """JPEG/PNG/BMP/GIF/WebP bytes -> uint8 (H, W, 3); greyscale is expanded, alpha dropped.

  With `min_side`, a JPEG is decoded at the smallest DCT scale (1, 1/2, 1/4,
  1/8) that keeps its shorter side >= min_side; other formats at full size.
  """
  if not min_side:
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image

  def jpeg():
    shape = tf.io.extract_jpeg_shape(encoded)
    short = tf.minimum(shape[0], shape[1])
    scale = tf.add_n([tf.cast(short >= r * min_side, tf.int32) for r in (2, 4, 8)])
    return tf.switch_case(scale, [
        functools.partial(tf.io.decode_jpeg, encoded, channels=3, ratio=r)
        for r in (1, 2, 4, 8)])

  image = tf.cond(tf.io.is_jpeg(encoded), jpeg, lambda: decode_image(encoded))
  image.set_shape([None, None, 3])
  return image


def _loader(source: Source, image_size: int | tuple[int, int] | None = None
            ) -> Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
  """fn(example index) -> (uint8 image, int32 label) for random-access sources."""
  labels = tf.constant(source.labels, tf.int32)
  min_side = DCT_MIN_SIDE * min(hw(image_size)) if image_size else None
  if source.kind == 'files':
    paths = tf.constant(source.data)
    return lambda i: (decode_image(tf.io.read_file(tf.gather(paths, i)), min_side),
                      tf.gather(labels, i))
  if source.kind == 'encoded':
    blobs = tf.constant(source.data.tolist(), tf.string)
    return lambda i: (decode_image(tf.gather(blobs, i), min_side), tf.gather(labels, i))
  if source.kind == 'array':
    images = tf.constant(source.data, tf.uint8)
    return lambda i: (tf.gather(images, i), tf.gather(labels, i))
  raise ValueError(f'Source kind {source.kind!r} is not random-access.')


def _plain_reason(error: tf.errors.OpError) -> str:
  """TensorFlow's decode error in plain words."""
  message = (error.message or str(error)).strip()
  message = re.sub(r'\{\{function_node [^}]*\}\}\s*', '', message).splitlines()[0]
  message = re.sub(r'\s*\[Op:\w+\]$', '', message)
  if 'Unknown image file format' in message:
    return 'not an image file (JPEG, PNG, GIF, BMP or WebP expected)'
  if 'Input is empty' in message:
    return 'empty file (0 bytes)'
  if 'jpeg::Uncompress failed' in message or 'Invalid JPEG' in message:
    return 'truncated or corrupt JPEG'
  if 'PNG' in message or 'png' in message:
    return f'corrupt PNG ({message})'
  return message


def image_problem(path: str) -> str | None:
  """Why `path` cannot be used as an image (plain words), or None if it decodes.

  JPEGs are decoded at 1/8 size (DCT scaling): libjpeg still reads every
  coefficient, so truncation and corruption are found, at a fraction of the cost.
  """
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    return f'cannot be read ({e.strerror or e})'
  if not data:
    return 'empty file (0 bytes)'
  try:
    if bool(tf.io.is_jpeg(data)):
      tf.io.decode_jpeg(data, channels=3, ratio=8)
    else:
      decode_image(data)
  except tf.errors.OpError as e:
    return _plain_reason(e)
  return None


def check_image_file(path: str) -> None:
  """Raises ValueError naming `path` if it cannot be read and decoded as an image."""
  reason = image_problem(path)
  if reason is not None:
    raise ValueError(f'Cannot decode image file {path!r}: {reason}. Delete or re-save this '
                     f'file (accepted formats: {", ".join(IMAGE_EXTENSIONS)}).')


CHECK_CACHE = 'image_check.json'


def check_images(paths: list[str], cache_dir: str | None = None,
                 threads: int | None = None, *, shard: tuple[int, int] = (0, 1),
                 gather: Callable[[np.ndarray], np.ndarray] | None = None) -> dict[str, str]:
  """{path: reason} for every file of `paths` that cannot be decoded.

  Each file is decoded once, in parallel threads (TensorFlow's decoders
  release the GIL); results are cached in `cache_dir`/image_check.json by
  path, size and mtime, so a relaunch re-checks only new or changed files.

  `shard=(i, n)`: process i of a multi-process run decodes only every n-th
  file (its own cache file), and `gather` (default: an all-gather across the
  processes) combines the per-file findings, so every process returns the
  same dict after 1/n of the work. A file found bad elsewhere is re-checked
  here for its reason (few files).
  """
  index, count = shard
  if count > 1 and paths:
    mine = _check_images(paths[index::count], cache_dir, threads,
                         f'image_check.{index}-of-{count}.json')
    flags = np.zeros(len(paths), np.int8)
    flags[index::count] = [path in mine for path in paths[index::count]]
    flags = (gather or _gather_processes)(flags).reshape(-1, len(paths)).max(axis=0)
    return {p: mine.get(p) or image_problem(p) or 'cannot be decoded on another process'
            for p, f in zip(paths, flags) if f}
  return _check_images(paths, cache_dir, threads)


def _gather_processes(flags: np.ndarray) -> np.ndarray:
  """(processes, n): every process's `flags`, on every process."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(flags))


def _check_images(paths: list[str], cache_dir: str | None, threads: int | None,
                  cache_name: str = CHECK_CACHE) -> dict[str, str]:
  cache_path = os.path.join(cache_dir, cache_name) if cache_dir else None
  cache: dict[str, list] = {}
  if cache_path and os.path.isfile(cache_path):
    try:
      with open(cache_path) as f:
        cache = json.load(f)
    except (OSError, ValueError):
      cache = {}
  stamps, bad, todo = {}, {}, []
  for path in paths:
    try:
      st = os.stat(path)
    except OSError as e:
      bad[path] = f'cannot be read ({e.strerror or e})'
      continue
    stamps[path] = [st.st_size, st.st_mtime_ns]
    hit = cache.get(path)
    if hit and hit[:2] == stamps[path]:
      if hit[2]:
        bad[path] = hit[2]
    else:
      todo.append(path)
  if todo:
    start = time.perf_counter()
    logger.info('Checking %d image files (once: cached in %s)...', len(todo),
                cache_path or 'memory')
    with concurrent.futures.ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
      for path, reason in zip(todo, pool.map(image_problem, todo)):
        cache[path] = stamps[path] + [reason]
        if reason:
          bad[path] = reason
    logger.info('Checked %d image files in %.1fs: %d undecodable.', len(todo),
                time.perf_counter() - start, len(bad))
    if cache_path:
      os.makedirs(cache_dir, exist_ok=True)
      tmp = f'{cache_path}.tmp-{os.getpid()}'
      with open(tmp, 'w') as f:
        json.dump(cache, f)
      os.replace(tmp, cache_path)
  return bad


def bad_images_message(bad: dict[str, str],
                       skip_flag: str = '--config.skip_bad_images=True') -> str:
  """All undecodable files, one per line, and the two ways forward."""
  lines = [f'  {path}: {reason}' for path, reason in sorted(bad.items())]
  return (f'{len(bad)} image file(s) cannot be decoded:\n' + '\n'.join(lines) +
          f'\nDelete or re-save them, or leave them out: {skip_flag}.')


# ----------------------------------------------------------------------------
# Iterators
# ----------------------------------------------------------------------------


def _process_info(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return int(process_index), int(process_count)


def _per_process(global_batch: int, process_count: int, what: str) -> int:
  if global_batch <= 0 or global_batch % process_count:
    raise ValueError(f'{what}={global_batch} must be a positive multiple of the process count {process_count}.')
  return global_batch // process_count


def _check_classes(config: Any, source: Source) -> None:
  wanted = config.get('num_classes')
  if wanted is not None and int(wanted) < len(source.class_names):
    raise ValueError(
        f'config.num_classes={wanted} but {config.dataset!r} has {len(source.class_names)} classes '
        f'({list(source.class_names[:5])}...): set config.num_classes={len(source.class_names)}.'
    )


def _pp(config: Any, key: str, default: Any) -> Any:
  return config_value(config.get('pp'), key, default)


def _finish(ds: tf.data.Dataset, batch: int, config: Any) -> tf.data.Dataset:
  ds = ds.batch(batch, drop_remainder=True).prefetch(int(config.get('prefetch', 2)))
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  # No autotuning thread: deleting an iterator waits for that thread's next
  # wake-up, up to a minute (it was the ~45 s pause after each export).
  # AUTOTUNE parallelism then means one call per core.
  options.autotune.enabled = False
  threads = config.get('data_threads')
  if threads:  # cap tf.data's threads when JAX needs the same few cores
    options.threading.private_threadpool_size = int(threads)
  return ds.with_options(options)


class BatchIterator:
  """Iterates numpy batches; turns undecodable-image errors into a message naming the file."""

  def __init__(self, ds: tf.data.Dataset, diagnose: Callable[[int, Exception], None] | None = None):
    self._ds = ds
    self._it: Iterator[dict[str, np.ndarray]] = iter(ds.as_numpy_iterator())
    self._diagnose = diagnose
    self.batches_read = 0

  def __iter__(self) -> BatchIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    try:
      batch = next(self._it)
    except tf.errors.OpError as e:
      if self._diagnose is not None:
        self._diagnose(self.batches_read, e)
      raise
    self.batches_read += 1
    return batch


def _file_diagnosis(source: Source, index_ds_from: Callable[[int], tf.data.Dataset], batch: int, lookahead: int = 4):
  """Returns diagnose(batches_read, error): re-checks the files of the failing batch(es) eagerly."""

  def diagnose(batches_read: int, error: Exception) -> None:
    if source.kind != 'files':
      return
    checked = set()
    for idx in index_ds_from(batches_read).take(batch * lookahead).as_numpy_iterator():
      if idx in checked:
        continue
      checked.add(idx)
      check_image_file(str(source.data[idx]))  # raises ValueError naming the file

  return diagnose


def make_train_iter(
    config: Any,
    *,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> BatchIterator:
  """Infinite iterator of this process's training batches, starting at global step `start_step`.

  Yields {'image': float32 (b, H, W, 3) in [-1, 1], 'label': int32 (b,)} with
  b = config.batch_size // process_count. Batch k depends only on (config, k).
  """
  pi, pc = _process_info(process_index, process_count)
  b = _per_process(int(config.batch_size), pc, 'config.batch_size')
  source = _source(config, config.train_split)
  _check_classes(config, source)
  seed = int(config.get('seed', 0))
  train_fn = preprocess.get_train_fn(
      _pp(config, 'train', 'inception_crop'),
      config.image_size,
      rotation_factor=float(_pp(config, 'rotation_factor', preprocess.RPT_ROTATION_FACTOR)),
      zoom_factor=float(_pp(config, 'zoom_factor', preprocess.RPT_ZOOM_FACTOR)),
  )
  aug_key = tf.constant([seed, _AUGMENT_SALT], tf.int64)
  start_position = int(start_step) * b * pc

  def augment(pos, image, label):
    example_seed = tf.random.experimental.stateless_fold_in(aug_key, pos)
    return {'image': train_fn(image, example_seed), 'label': label}

  if source.kind == 'stream':
    buffer = int(config.get('shuffle_buffer', 50_000))
    if start_position:
      logger.info('Resuming the streamed dataset: skipping %d raw records.', start_position)
    # Shuffle before repeat: every epoch holds each example exactly once, reshuffled per epoch.
    ds = source.data().shuffle(buffer, seed=seed, reshuffle_each_iteration=True).repeat()
    ds = ds.enumerate().skip(start_position)
    ds = _shard_chunks(ds, b, pc, pi)
    ds = ds.map(lambda pos, ex: augment(pos, decode_image(ex[0]), ex[1]), num_parallel_calls=tf.data.AUTOTUNE)
    return BatchIterator(_finish(ds, b, config))

  n = int(source.num_examples)
  load = _loader(source, config.image_size)

  def indices_from(step: int) -> tf.data.Dataset:
    ds = _shard_chunks(_train_positions(n, seed, int(step) * b * pc), b, pc, pi)
    return ds.map(lambda pos, idx: idx)

  ds = _shard_chunks(_train_positions(n, seed, start_position), b, pc, pi)
  ds = ds.map(lambda pos, idx: augment(pos, *load(idx)), num_parallel_calls=tf.data.AUTOTUNE)
  diagnose = _file_diagnosis(source, lambda k: indices_from(start_step + k), b)
  return BatchIterator(_finish(ds, b, config), diagnose)


def make_eval_iter(
    config: Any,
    split: str | None = None,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> BatchIterator:
  """Finite iterator over ALL examples of `split` (default config.test_split), in order.

  Batches have b = config.batch_size_eval // process_count rows; the last global
  batch is padded and {'mask': float32 (b,)} is 1 for real examples, 0 for padding.
  Every process yields the same number of batches.
  """
  pi, pc = _process_info(process_index, process_count)
  batch_eval = int(config.get('batch_size_eval') or config.batch_size)
  b = _per_process(batch_eval, pc, 'config.batch_size_eval')
  source = _source(config, split or config.test_split)
  _check_classes(config, source)
  eval_fn = preprocess.get_eval_fn(
      _pp(config, 'eval', 'resize'), config.image_size, crop_fraction=float(_pp(config, 'crop_fraction', CROP_FRACTION))
  )
  if not source.num_examples:
    raise ValueError(f'Cannot evaluate on {source.description}: its size is unknown or zero.')
  n = int(source.num_examples)
  padded = math.ceil(n / batch_eval) * batch_eval

  def finish(image, label, mask):
    return {'image': eval_fn(image), 'label': label, 'mask': mask}

  if source.kind == 'stream':
    pad = tf.data.Dataset.from_tensors((tf.constant(b'', tf.string), tf.constant(0, tf.int32))).repeat(padded - n)
    ds = source.data().concatenate(pad).enumerate()
    ds = _shard_chunks(ds, b, pc, pi)

    def decode_or_blank(pos, ex):
      real = pos < n
      image = tf.cond(real, lambda: decode_image(ex[0]), lambda: tf.zeros([1, 1, 3], tf.uint8))
      return finish(image, ex[1], tf.cast(real, tf.float32))

    ds = ds.map(decode_or_blank, num_parallel_calls=tf.data.AUTOTUNE)
    return BatchIterator(_finish(ds, b, config))

  load = _loader(source, config.image_size)
  ds = _shard_chunks(_eval_positions(n, padded), b, pc, pi)

  def load_eval(pos, idx, mask):
    image, label = load(idx)
    return finish(image, label, mask)

  ds = ds.map(load_eval, num_parallel_calls=tf.data.AUTOTUNE)

  def indices_from(k: int) -> tf.data.Dataset:
    return _shard_chunks(_eval_positions(n, padded), b, pc, pi).skip(k * b).map(lambda pos, idx, mask: idx)

  return BatchIterator(_finish(ds, b, config), _file_diagnosis(source, indices_from, b))


def to_global(batch: dict[str, np.ndarray], sharding: Any) -> dict[str, Any]:
  """Per-process numpy batch -> global jax.Arrays laid out by `sharding` (batch dim sharded)."""
  import jax

  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
