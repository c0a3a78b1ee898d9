r"""R50+ViT-B_16 hybrid (ImageNet-21k) fine-tuned on CIFAR-10 at 384.

A ResNet-50 stem (3 stages, BiT-style StdConv + GroupNorm) turns the image
into a 24x24 feature map, whose 1x1 "patches" the ViT-B encoder reads (paper
section 3.1, "Hybrid Architecture"). Same fine-tuning recipe as
finetune_b16.py (App. B.1.1: hybrids use the exact same setup).

  gsutil cp gs://vit_models/imagenet21k/R50+ViT-B_16.npz .
  python -m vit_jax.main --config=configs/finetune_r50_b16.py --workdir=/tmp/r50b16 \
      --config.pretrained_path=R50+ViT-B_16.npz

Expected result: accuracy_test ~0.987 (original README: 98.72% with dropout
0.0, 98.94% with dropout 0.1).
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = common.get_config()
  c.model_name = 'R50+ViT-B_16'
  common.with_dataset(c, 'cifar10')
  c.accum_steps = 16
  return c
