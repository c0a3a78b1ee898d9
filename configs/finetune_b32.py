r"""ViT-B_32 (ImageNet-21k) fine-tuned on CIFAR-10 at 384: the fast one.

Same recipe as finetune_b16.py (paper App. B.1.1); 4x fewer tokens (144), so
it needs less accumulation.

  gsutil cp gs://vit_models/imagenet21k/ViT-B_32.npz .
  python -m vit_jax.main --config=configs/finetune_b32.py --workdir=/tmp/b32_cifar10 \
      --config.pretrained_path=ViT-B_32.npz

Other datasets: configs/vit.py:b32,cifar100 (or any preset in common.py).

Expected result: accuracy_test 0.9879 (paper Table 5: 98.79%); the original
README: 98.88% (0.8 h on 8x A100).
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = common.get_config()
  c.model_name = 'ViT-B_32'
  common.with_dataset(c, 'cifar10')
  c.accum_steps = 2
  return c
