r"""Original-style selection: `configs/vit.py:<model>,<dataset>`.

  python -m vit_jax.main --config=configs/vit.py:b16,cifar10 --workdir=DIR
  python -m vit_jax.main --config=configs/vit.py:l16,imagenet2012 --workdir=DIR \
      --config.pretrained_path=/data/ViT-L_16.npz --config.accum_steps=32

model: b16, b32, l16, l32, h14, r50_b16 (ImageNet-21k checkpoints from
gs://vit_models/imagenet21k/<name>.npz) or any preset name (e.g. ViT-B_8);
dataset: a preset of configs/common.py: cifar10, cifar100, imagenet2012,
oxford_iiit_pet, oxford_flowers102, tf_flowers.

The recipe is the paper's (App. B.1.1): SGD momentum 0.9, batch 512, warmup
then cosine, clip 1.0, no weight decay, 384px, with the dataset's steps/lr.

Expected results (paper Table 5, ImageNet-21k pre-training, %):
  dataset            B/16   B/32   L/16
  cifar10            98.95  98.79  99.16
  cifar100           91.67  91.97  93.44
  imagenet2012       83.97  81.28  85.15
  oxford_iiit_pet    94.43  93.02  94.73
  oxford_flowers102  99.38  99.11  99.61
"""

import ml_collections

from configs import common

MODELS = {
    'b16': 'ViT-B_16', 'b32': 'ViT-B_32', 'l16': 'ViT-L_16',
    'l32': 'ViT-L_32', 'h14': 'ViT-H_14', 'r50_b16': 'R50+ViT-B_16',
}
# Micro-batch 512 / accum: what fits a 16 GB accelerator, as in the original's
# notes (B/16: 8 on a V100 host; L/16: 32; ...).
ACCUM = {'ViT-B_32': 2, 'ViT-L_16': 32, 'ViT-L_32': 8, 'ViT-H_14': 64,
         'R50+ViT-B_16': 16}


def get_config(arg: str | None = 'b16,cifar10') -> ml_collections.ConfigDict:
  model, _, dataset = (arg or 'b16,cifar10').partition(',')
  model_name = MODELS.get(model.lower(), model)
  c = common.get_config()
  c.model_name = model_name
  common.with_dataset(c, dataset or 'cifar10')
  c.accum_steps = ACCUM.get(model_name, 8)
  return c
