r"""ViT-B_16 pre-trained on ImageNet-21k, fine-tuned on CIFAR-10 at 384x384.

The paper's recipe (Appendix B.1.1, Table 4): SGD momentum 0.9, batch 512
(here 8 micro-batches of 64 through gradient accumulation), warmup 500 steps
then cosine decay over 10k steps, base lr 0.03 (from the paper's sweep, the
original configs' default), global-norm clipping at 1, no weight decay, no
dropout, inception crop + flip for training, plain resize for eval; 98% of
the train split (the paper's dev protocol, as in the original code).

  # Get the checkpoint once (391 MiB):
  gsutil cp gs://vit_models/imagenet21k/ViT-B_16.npz .
  python -m vit_jax.main --config=configs/finetune_b16.py --workdir=/tmp/b16_cifar10 \
      --config.pretrained_path=ViT-B_16.npz

Without --config.pretrained_path it reads gs://vit_models/imagenet21k/
ViT-B_16.npz directly (needs network). Lower memory: --config.accum_steps=16.

Expected result: accuracy_test 0.9895 (paper Table 5: 98.95%); the original
code's README reports 99.02% (dropout 0.0, 2.2 h on 8x A100). On one CPU core
a step at 384 takes minutes: this config is for accelerators.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = common.get_config()   # Defaults are this recipe already.
  c.model_name = 'ViT-B_16'
  c.pretrained_dir = common.IMAGENET21K_DIR
  common.with_dataset(c, 'cifar10')
  c.image_size = 384
  c.batch_size = 512
  c.accum_steps = 8
  c.lr.warmup_steps = 500
  c.lr.decay_type = 'cosine'
  return c
