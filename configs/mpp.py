r"""Masked patch prediction pre-training (ViT paper §4.6, App. B.1.2): `:<dataset>[,<target>][,smoke]`.

  TINY_IMAGENET_DIR=~/data/tiny-imagenet-200 \
  python -m vit_jax.main --config=configs/mpp.py:tiny_imagenet --workdir=workdirs/mpp_tin
  # then fine-tune the exported encoder like any checkpoint (the MPP head is
  # replaced by a new zero-initialised head, as for every fine-tune):
  python -m vit_jax.main --config=configs/finetune_shipped.py:digits \
      --config.pretrained_path=workdirs/mpp_tin/SmallViT_8.npz --workdir=workdirs/ft_mpp

  <dataset>  tiny_imagenet  SmallViT_8 at 32px, the model and resolution of the shipped
                            supervised checkpoint (configs/pretrain_tiny_imagenet.py)
             cifar10        SmallViT_8 at 32px on CIFAR-10's train split
             digits         SmallViT_8 at 32px on the embedded digits (seconds; tests)
  <target>   color3bit (default) | subpatch3bit | pixels (vit_jax/models/mpp.py)
  smoke      5 steps at batch 16, a 256-image eval: checks the wiring only.

What the paper does and what we do:
* Corruption: 50% of the patch embeddings; of those 80% [mask], 10% a random
  other patch embedding, 10% unchanged (config.mpp, BERT's recipe).
* Target: the 3-bit mean colour (512 classes) of each corrupted patch, from
  its output token through the head (a Dense on every token:
  `classifier='token_unpooled'`). The default, because the paper reports this
  option: it gave the best few-shot accuracy of the three it tried; the other
  two are `subpatch3bit` (16 x 512) and `pixels` (L2; "slightly worse").
* Optimiser: Adam (= `adamw` with weight decay 0), linear warm-up then cosine
  decay, as the paper. The paper's base lr (2e-4, 10k warm-up steps, 1M steps
  at batch 4096 on JFT) is for a budget ~10^4 times ours; at a few hundred
  steps we use the from-scratch lr of this project (1e-3, configs/scratch.py)
  with a 10% warm-up and gradient clipping at 1.
* The eval metric (`accuracy_test`) is the MPP accuracy: the fraction of
  corrupted test patches whose target is predicted exactly (a fixed
  corruption, so evals are comparable), averaged over images.

Expected result (tiny_imagenet, color3bit, docs/reproduction.md sections 6,
6b): MPP accuracy on Tiny-ImageNet val 20.6% after 600 steps (11 min on 2 CPU
cores; 6.3% for always predicting the most frequent colour), 38.7% after
4,800 (--config.total_steps=4800, the supervised checkpoint's budget, 40
min). Fine-tuned on digits: 91.2 +- 2.6% from 600 steps, 96.2 +- 0.4% from
4,800 (3 seeds; from scratch 95.0 +- 1.4%, supervised 97.0 +- 0.9%).

Export: `<workdir>/SmallViT_8.npz` holds the encoder and the MPP head in the
official layout (the [mask] embedding is dropped), loadable by every
fine-tuning config. The comparison of MPP vs. from scratch vs. supervised
pre-training is in docs/reproduction.md.
"""

from __future__ import annotations

import ml_collections

from configs import common, scratch

TARGETS = ('color3bit', 'subpatch3bit', 'pixels')
DATASETS = {
    'tiny_imagenet': {k: scratch.DATASETS['tiny_imagenet'][k]
                      for k in ('dataset', 'train_split', 'test_split')},
    'cifar10': {k: scratch.DATASETS['cifar10'][k]
                for k in ('dataset', 'train_split', 'test_split')},
    'digits': {'dataset': 'digits', 'train_split': 'train', 'test_split': 'test'},
}
TOTAL_STEPS = 400
BATCH_SIZE = 128


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  parts = [p.strip() for p in (arg or '').split(',') if p.strip()]
  smoke = 'smoke' in parts
  parts = [p for p in parts if p != 'smoke']
  if not parts or parts[0] not in DATASETS or len(parts) > 2 or (
      len(parts) == 2 and parts[1] not in TARGETS):
    raise ValueError(f'configs/mpp.py needs ":<dataset>[,<target>][,smoke]" with a dataset '
                     f'of {", ".join(DATASETS)} and a target of {", ".join(TARGETS)}; '
                     f'got {arg!r}.')
  dataset, target = parts[0], (parts[1] if len(parts) == 2 else 'color3bit')
  c = common.get_config()
  c.model_name = 'SmallViT_8'
  # Per-token outputs: the head predicts every patch's target. The class token
  # stays, so the export has the tree of a 'token' classifier.
  c.model = ml_collections.ConfigDict({'classifier': 'token_unpooled'})
  c.pretrained_path = None
  c.update(DATASETS[dataset])
  c.num_classes = None  # Unused: the head's width comes from the target.
  c.image_size = 32
  c.pp.train = 'rpt_augment' if dataset != 'digits' else 'resize'
  c.pp.eval = 'resize'
  c.pp.rotation_factor = 0.02
  c.pp.zoom_factor = 0.2
  c.mpp = ml_collections.ConfigDict({'target': target, 'corruption_rate': 0.5,
                                     'mask_prob': 0.8, 'random_prob': 0.1})
  c.batch_size = BATCH_SIZE
  c.batch_size_eval = 256
  c.accum_steps = 1
  c.total_steps = TOTAL_STEPS
  c.lr.base = 1e-3
  c.lr.decay_type = 'cosine'
  c.lr.warmup_steps = c.get_ref('total_steps') // 10
  c.optim = ml_collections.ConfigDict({
      'name': 'adamw', 'weight_decay': 0.0, 'grad_clip_norm': 1.0,
      'momentum_dtype': 'float32'})  # Adam: no weight decay.
  c.log_every = 20
  c.eval_every = 200
  c.checkpoint_every = 200
  c.keep_checkpoints = 2
  if smoke:
    c.batch_size, c.batch_size_eval, c.total_steps = 16, 64, 5
    c.log_every, c.eval_every, c.checkpoint_every = 1, 0, 5
    c.test_split = c.test_split if '[' in c.test_split else f'{c.test_split}[:256]'
  return c
