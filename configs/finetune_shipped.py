r"""Fine-tune the shipped checkpoint vs. train it from scratch: `:<dataset>`.

  python -m vit_jax.main --config=configs/finetune_shipped.py:cifar10 \
      --config.dataset=folder:/data/cifar10 --workdir=workdirs/ft_cifar10

  <dataset>  digits         the embedded 8x8 digits at 40px (the quickstart)
             cifar10        CIFAR-10 at 32px (TFDS, or a folder as above)
             tiny_imagenet  Tiny-ImageNet val at 48px ($TINY_IMAGENET_DIR)

One run is the RPT report's Table 5 comparison for one dataset: the model of
checkpoints/SmallViT_8-tiny_imagenet-32px.npz (RPT report's ViT-Ti with 8x8
patches, pre-trained on Tiny-ImageNet at 32px by
configs/pretrain_tiny_imagenet.py) is
1. fine-tuned with the ViT paper's recipe (App. B.1.1: SGD momentum 0.9,
   warm-up then cosine, gradient clipping at 1, no weight decay; new
   zero-initialised head; position embeddings interpolated when the
   resolution changes, §3.2), and then
2. trained from random initialisation with the report's from-scratch recipe
   (§4.2: AdamW 1e-3, weight decay 1e-4 per step), into workdir/scratch:
   `config.scratch_baseline` keeps model, data, resolution, augmentation,
   batch and steps equal.
Both test accuracies are printed at the end and kept in
workdir/comparison.json.

Expected results (MEASURED below; docs/reproduction.md, Table 5), test top-1
fine-tuned vs. from scratch: digits 97.77% vs. 95.26%, CIFAR-10 (the JPEG
folder) 52.02% vs. 40.45%, Tiny-ImageNet val 15.48% vs. 3.16%. Budgets are sized for 2 CPU
cores; on real hardware raise total_steps for both halves alike.

Note for Tiny-ImageNet: it is also the upstream dataset, so that fine-tune
re-uses labels the checkpoint has already learned (at 32px). It measures the
paper's "pre-train at low, fine-tune at higher resolution" step, not
transfer to new classes; CIFAR-10 and digits do.
"""

from __future__ import annotations

import pathlib

import ml_collections

from configs import common, scratch

CHECKPOINT = str(pathlib.Path(__file__).resolve().parents[1] / 'checkpoints' /
                 'SmallViT_8-tiny_imagenet-32px.npz')



def _data(name: str) -> dict:
  """Source and splits of a dataset as configs/scratch.py reads it (classes: from the data)."""
  return {k: scratch.DATASETS[name][k]
          for k in ('dataset', 'train_split', 'test_split')}

# Per dataset: data, resolution, augmentation, budget, fine-tuning lr (from
# the paper's grid {0.001, 0.003, 0.01, 0.03}, picked on a dev split by
# `python -m vit_jax.sweep`, docs/reproduction.md section 9).
DATASETS = {
    'digits': {'dataset': 'digits', 'train_split': 'train', 'test_split': 'test',
               'image_size': 40,
               # No flips or big crops: a mirrored or cropped digit is another digit.
               'pp_train': 'resize', 'batch_size': 64, 'total_steps': 300,
               # Picked as the paper does (App. B.1.1) by `python -m vit_jax.sweep`
               # on train[:90%] / dev train[90%:] (docs/reproduction.md, section 9):
               # lr 0.001 -> 0.625, 0.003 -> 0.813, 0.01 -> 0.924, 0.03 -> 0.972.
               'lr': 0.03, 'eval_every': 100},
    'cifar10': {**_data('cifar10'), 'image_size': 32, 'pp_train': 'rpt_augment',
                'batch_size': 128, 'total_steps': 400,
                # Swept on train[:98%] / dev train[98%:]: 0.001 -> 0.471,
                # 0.003 -> 0.479, 0.01 -> 0.509, 0.03 -> 0.529.
                'lr': 0.03, 'eval_every': 100},
    # $TINY_IMAGENET_DIR, as in configs/scratch.py.
    'tiny_imagenet': {**_data('tiny_imagenet'), 'image_size': 48,
                      'pp_train': 'rpt_augment', 'batch_size': 128, 'total_steps': 200,
                      # Swept on train[:98%] / dev train[98%:]: 0.001 -> 0.147,
                      # 0.003 -> 0.151, 0.01 -> 0.166, 0.03 -> 0.195.
                      'lr': 0.03, 'eval_every': 100},
}

# Measured here (docs/reproduction.md): test accuracy after total_steps.
MEASURED = {
    'digits': {'accuracy_test': 0.9777, 'accuracy_test_scratch': 0.9526},
    # lr 0.03 (the sweep's pick; 0.5202 with the earlier untuned 0.01).
    'cifar10': {'accuracy_test': 0.5403, 'accuracy_test_scratch': 0.4045},
    # lr 0.03 (the sweep's pick; 0.1548 with the earlier untuned 0.01).
    'tiny_imagenet': {'accuracy_test': 0.1798, 'accuracy_test_scratch': 0.0316},
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  name = (arg or '').strip()
  if name not in DATASETS:
    raise ValueError(f'configs/finetune_shipped.py needs ":<dataset>", one of '
                     f'{", ".join(DATASETS)}; got {arg!r}.')
  d = DATASETS[name]
  c = common.get_config()
  c.model_name = 'SmallViT_8'
  c.model = ml_collections.ConfigDict()
  c.pretrained_path = CHECKPOINT
  c.dataset = d['dataset']
  c.train_split = d['train_split']
  c.test_split = d['test_split']
  c.image_size = d['image_size']
  c.pp.train = d['pp_train']
  c.pp.eval = 'resize'
  c.pp.rotation_factor = 0.02  # rpt_augment's factors (configs/scratch.py)
  c.pp.zoom_factor = 0.2
  c.batch_size = d['batch_size']
  c.batch_size_eval = 250
  c.accum_steps = 1
  c.total_steps = d['total_steps']
  c.lr.base = d['lr']
  c.lr.warmup_steps = c.get_ref('total_steps') // 10
  c.optim = ml_collections.ConfigDict({
      'name': 'sgd', 'momentum': 0.9, 'momentum_dtype': 'float32',
      'weight_decay': 0.0, 'grad_clip_norm': 1.0})
  # 0.1 x lr 1e-3 = the report's 1e-4 per step (see configs/scratch.py).
  c.scratch_baseline = ml_collections.ConfigDict({
      'lr': {'base': 1e-3},
      'optim': {'name': 'adamw', 'weight_decay': 0.1, 'grad_clip_norm': None}})
  c.label_smoothing = 0.0
  c.log_every = 10
  c.eval_every = d['eval_every']
  c.checkpoint_every = d['eval_every']
  c.keep_checkpoints = 2
  return c
