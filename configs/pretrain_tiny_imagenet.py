r"""Pre-training the shipped checkpoint: a small ViT on Tiny-ImageNet at 32px.

  tar xzf tiny-imagenet-200.tar.gz -C ~/data      # 100k train / 10k val, 64x64
  TINY_IMAGENET_DIR=~/data/tiny-imagenet-200 \
  python -m vit_jax.main --config=configs/pretrain_tiny_imagenet.py \
      --workdir=workdirs/pretrain_tiny_imagenet

Kill it at any time and run the same command again: it resumes from the last
orbax checkpoint (every 200 steps) with the same data order. The workdir then
holds `SmallViT_8.npz` (official .npz layout), which is what
checkpoints/SmallViT_8-tiny_imagenet-32px.npz is; its provenance (measured
accuracy, steps, wall time) is in checkpoints/SmallViT_8-tiny_imagenet-32px.md.

Tiny-ImageNet plays the part of the paper's "large" upstream dataset
(ImageNet-21k) at a scale a 2-core CPU can pre-train on in under an hour. The
model is the RPT report's ViT-Ti (Lee et al.'s small-dataset ViT: depth 9,
width 192, 12 heads, MLP 384) with 8x8 patches, trained as the ViT paper
pre-trains: at a *lower* resolution (32px, a 4x4 grid) than it is later
fine-tuned at (e.g. 64px Tiny-ImageNet, an 8x8 grid; the position embeddings
are interpolated, paper section 3.2). Compute decides the resolution here:
16 tokens train at ~250 img/s on 2 cores, 64 tokens (64px) at ~60 img/s.

Expected result: the val accuracy stated in
checkpoints/SmallViT_8-tiny_imagenet-32px.md (checked there with
`python -m vit_jax.evaluate`), after the wall time stated there.

Recipe: the report's from-scratch setup (configs/scratch.py: AdamW 1e-3,
weight decay 1e-4 per step, 10% warm-up, cosine, flip/rotation/zoom, batch
256), for 2,400 steps = 6.1 epochs instead of 50 epochs.
"""

from __future__ import annotations

import ml_collections

from configs import scratch

# 2,400 x 256 = 614,400 images = 6.1 epochs of the 100k training images.
TOTAL_STEPS = 2400


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = scratch.get_config('vit_ti,tiny_imagenet')  # SmallViT_8, 200 classes
  c.image_size = 32
  c.total_steps = TOTAL_STEPS
  c.log_every = 50
  c.eval_every = 400
  c.checkpoint_every = 200
  c.keep_checkpoints = 2
  return c
