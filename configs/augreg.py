r"""Fine-tune an AugReg checkpoint (Steiner et al., "How to train your ViT?").

The AugReg models were pre-trained on ImageNet-21k with augmentation and
regularisation and transfer better than the paper's originals. Pick one by
its short name; the file is read from gs://vit_models/augreg/:

  python -m vit_jax.main --config=configs/augreg.py:B_16 --workdir=/tmp/augreg_b16
  python -m vit_jax.main --config=configs/augreg.py:S_16,cifar100 --workdir=DIR \
      --config.pretrained_path=/local/S_16-i21k-300ep-...npz

Argument: `<model>[,<dataset>]`, model in CHECKPOINTS below, dataset a preset
of configs/common.py (default cifar10). AugReg heads have no pre_logits layer.

Expected results (ImageNet-2012 fine-tunes at 384 from the original README,
for scale; CIFAR-10 fine-tunes land around 98.5-99%): B/16 85.49%, L/16
85.59%, S/16 83.73%, B/32 83.59%, Ti/16 78.22%, R50+L/32 85.99%.
"""

import ml_collections

from configs import common
from vit_jax import download

# Short name -> (model preset, checkpoint file in gs://vit_models/augreg/):
# one table, vit_jax.download's (`--config.pretrained_path=B_16` loads by name).
CHECKPOINTS = download.AUGREG


def get_config(arg: str | None = 'B_16') -> ml_collections.ConfigDict:
  name, _, dataset = (arg or 'B_16').partition(',')
  if name not in CHECKPOINTS:
    raise ValueError(f'Unknown AugReg model {name!r}; choose one of '
                     f'{", ".join(CHECKPOINTS)}.')
  preset, filename = CHECKPOINTS[name]
  c = common.get_config()
  c.model_name = preset
  c.pretrained_dir = common.AUGREG_DIR
  c.pretrained_path = f'{common.AUGREG_DIR}/{filename}'
  common.with_dataset(c, dataset or 'cifar10')
  c.accum_steps = 16 if name.startswith(('L_', 'R50')) else 8
  return c
