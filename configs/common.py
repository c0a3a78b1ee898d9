"""Shared config defaults and dataset presets.

Every config file in this directory is a Python file with
`get_config(arg=None) -> ml_collections.ConfigDict`; run one with

  python -m vit_jax.main --config=configs/<file>.py[:arg] --workdir=DIR \
      [--config.key=value ...]

The keys, their types and what they mean are listed once, in
vit_jax/config_schema.py (`KEYS`; `python -m vit_jax.config_schema` prints
the table); a wrong type stops training with the key's name. Keys that take
None (num_classes, pretrained_path, eval_every, optim.grad_clip_norm, ...)
take `--config.<key>=None` on the command line.
"""

from __future__ import annotations

import re

import ml_collections
from ml_collections import config_dict

from vit_jax.images import CROP_FRACTION

IMAGENET21K_DIR = 'gs://vit_models/imagenet21k'
AUGREG_DIR = 'gs://vit_models/augreg'

# Fine-tuning presets: ViT paper, Appendix B.1.1 and Table 4 (steps, batch 512,
# cosine decay, no weight decay, clip 1.0), with the original code's dev
# splits (train[:98%] for CIFAR, train[:99%] for ImageNet; the paper holds out
# 2% / 1% / 10% of the training set to pick the lr). `lr` is a value from the
# paper's sweep: 0.03 as in the original configs for CIFAR/ImageNet; 0.003 for
# the 500-step small datasets (not tuned here).
# `expected` is the paper's Table 5 top-1 (ImageNet-21k pre-training,
# 384px) for ViT-B/16, B/32, L/16.
DATASET_PRESETS: dict[str, dict] = {
    'cifar10': {
        'dataset': 'cifar10', 'train_split': 'train[:98%]', 'test_split': 'test',
        'total_steps': 10_000, 'lr': 0.03,
        'expected': {'ViT-B_16': 98.95, 'ViT-B_32': 98.79, 'ViT-L_16': 99.16}},
    'cifar100': {
        'dataset': 'cifar100', 'train_split': 'train[:98%]', 'test_split': 'test',
        'total_steps': 10_000, 'lr': 0.03,
        'expected': {'ViT-B_16': 91.67, 'ViT-B_32': 91.97, 'ViT-L_16': 93.44}},
    'imagenet2012': {
        'dataset': 'imagenet2012', 'train_split': 'train[:99%]',
        'test_split': 'validation', 'total_steps': 20_000, 'lr': 0.03,
        'expected': {'ViT-B_16': 83.97, 'ViT-B_32': 81.28, 'ViT-L_16': 85.15}},
    'oxford_iiit_pet': {
        'dataset': 'oxford_iiit_pet', 'train_split': 'train[:90%]',
        'test_split': 'test', 'total_steps': 500, 'lr': 0.003,
        'expected': {'ViT-B_16': 94.43, 'ViT-B_32': 93.02, 'ViT-L_16': 94.73}},
    'oxford_flowers102': {
        'dataset': 'oxford_flowers102', 'train_split': 'train[:90%]',
        'test_split': 'test', 'total_steps': 500, 'lr': 0.003,
        'expected': {'ViT-B_16': 99.38, 'ViT-B_32': 99.11, 'ViT-L_16': 99.61}},
    # Not in the paper; the RPT report fine-tunes on it (its Table 5). TFDS
    # has only a 'train' split (3,670 images): hold out 10% as test.
    'tf_flowers': {
        'dataset': 'tf_flowers', 'train_split': 'train[:90%]',
        'test_split': 'train[90%:]', 'total_steps': 500, 'lr': 0.003,
        'expected': {}},
}


# Examples in each dataset's full training split (TFDS; Tiny-ImageNet's
# folder): the one place these counts live. `split_size` turns a split
# string into its count, e.g. to express epochs as steps.
TRAIN_EXAMPLES = {
    'cifar10': 50_000, 'cifar100': 50_000, 'imagenet2012': 1_281_167,
    'oxford_iiit_pet': 3_680, 'oxford_flowers102': 1_020, 'tf_flowers': 3_670,
    'tiny_imagenet': 100_000}


def split_size(dataset: str, split: str) -> int:
  """Examples in `split` ('train', 'train[:98%]', 'train[90%:]', 'train[:1000]')
  of `dataset`'s training split (TRAIN_EXAMPLES), rounded as TFDS does."""
  m = re.fullmatch(r'train(?:\[(-?\d*)(%?):(-?\d*)(%?)\])?', split.replace(' ', ''))
  if dataset not in TRAIN_EXAMPLES or not m:
    raise ValueError(f'split_size knows the training splits of {", ".join(TRAIN_EXAMPLES)} '
                     f'(e.g. "train[:98%]"), got {dataset!r}, {split!r}')
  n = TRAIN_EXAMPLES[dataset]

  def bound(value: str | None, percent: str | None, default: int) -> int:
    if not value:   # No bracket (None) or an open end ('').
      return default
    b = round(int(value) * n / 100) if percent else int(value)
    return min(max(b + n if b < 0 else b, 0), n)
  start, start_pct, end, end_pct = m.groups()
  return max(bound(end, end_pct, n) - bound(start, start_pct, 0), 0)


def get_config() -> ml_collections.ConfigDict:
  """Fine-tuning defaults: the paper's recipe for ViT-B_16 on CIFAR-10."""
  c = ml_collections.ConfigDict()
  c.model_name = 'ViT-B_16'
  c.model = ml_collections.ConfigDict()   # Overrides merged over the preset.
  c.pretrained_dir = IMAGENET21K_DIR
  # Follows model_name / pretrained_dir unless set explicitly.
  c.pretrained_path = (c.get_ref('pretrained_dir') + '/' +
                       c.get_ref('model_name') + '.npz')

  c.dataset = 'cifar10'
  c.tfds_data_dir = config_dict.placeholder(str)
  c.tfds_download = True
  c.train_split = 'train[:98%]'
  c.test_split = 'test'
  c.num_classes = config_dict.placeholder(int)  # None: from the dataset.
  c.skip_bad_images = False  # Image folders: train without undecodable files.
  c.image_size = 384
  c.pp = ml_collections.ConfigDict({'train': 'inception_crop', 'eval': 'resize',
                                        'crop_fraction': CROP_FRACTION})
  c.shuffle_buffer = 50_000
  c.prefetch = 2
  c.seed = 0

  c.batch_size = 512
  c.batch_size_eval = 512
  c.accum_steps = 8   # 64 examples per micro-batch; raise it if memory is short.
  c.total_steps = 10_000
  c.lr = ml_collections.ConfigDict({
      'base': 0.03, 'warmup_steps': 500, 'decay_type': 'cosine', 'linear_end': 1e-5})
  c.optim = ml_collections.ConfigDict({
      'name': 'sgd', 'momentum': 0.9, 'momentum_dtype': 'bfloat16', 'weight_decay': 0.0,
      'grad_clip_norm': 1.0})
  c.label_smoothing = 0.0
  c.dtype = 'auto'
  # Polyak averaging (paper Table 2): EMA of the params with this decay, e.g.
  # 0.9999; None = off. Eval then also reports accuracy_test_polyak and the
  # export holds the averaged params (the raw ones in <model_name>_raw.npz).
  c.polyak_decay = config_dict.placeholder(float)

  c.log_every = 10
  c.eval_every = 100
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'min_size': 2 ** 12})
  c.scratch_baseline = None
  c.resume_changed = False
  return c


def with_dataset(config: ml_collections.ConfigDict,
                 name: str) -> ml_collections.ConfigDict:
  """Applies a DATASET_PRESETS entry (splits, steps, lr); classes come from the data."""
  if name not in DATASET_PRESETS:
    raise ValueError(f'Unknown dataset preset {name!r}; known: '
                     f'{", ".join(sorted(DATASET_PRESETS))}. For your own '
                     'images use configs/folder.py:/path/to/root.')
  p = DATASET_PRESETS[name]
  config.dataset = p['dataset']
  config.train_split = p['train_split']
  config.test_split = p['test_split']
  config.total_steps = p['total_steps']
  config.lr.base = p['lr']
  if config.lr.warmup_steps >= config.total_steps:
    config.lr.warmup_steps = config.total_steps // 10
  return config


def expected_accuracy(model_name: str, dataset: str) -> float | None:
  """Paper Table 5 top-1 (%) for a preset pair, if the paper has it."""
  return DATASET_PRESETS.get(dataset, {}).get('expected', {}).get(model_name)
