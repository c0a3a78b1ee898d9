r"""ViT-L_16 (ImageNet-21k) fine-tuned on CIFAR-10 at 384.

Same recipe as finetune_b16.py (paper App. B.1.1). 304M parameters: use more
accumulation, or shard params and optimizer state over the devices with FSDP
(--config.mesh.fsdp=-1 --config.mesh.data=1, or e.g. data=2, fsdp=4).

  gsutil cp gs://vit_models/imagenet21k/ViT-L_16.npz .
  python -m vit_jax.main --config=configs/finetune_l16.py --workdir=/tmp/l16_cifar10 \
      --config.pretrained_path=ViT-L_16.npz

Expected result: accuracy_test 0.9916 (paper Table 5: 99.16%); the original
README: 99.13% (6.9 h on 8x A100).
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = common.get_config()
  c.model_name = 'ViT-L_16'
  common.with_dataset(c, 'cifar10')
  c.accum_steps = 32
  return c
