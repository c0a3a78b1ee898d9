r"""Position-embedding ablation (ViT paper App. D.4, Table 8) at CPU scale: `:<posemb>`.

  for p in none learn learn2d rel sincos2d; do
    python -m vit_jax.main --config=configs/posemb_ablation.py:$p \
        --config.dataset=folder:$CIFAR10_DIR --workdir=workdirs/posemb_$p
  done          # = bash benchmarks/reproduce.sh posemb

  <posemb>  none      no position information: a bag of patches
            learn     1-D learned, raster order (the paper's default)
            learn2d   2-D learned: row and column tables of D/2, concatenated
            rel       1-D relative attention: a learned bias per offset, every layer
            sincos2d  fixed 2-D sine-cosine (not in Table 8; big_vision's default)

Every variant is the same model trained the same way from scratch on
CIFAR-10: SmallViT_8 (the RPT report's ViT-Ti, 8x8 patches: a 4x4 grid at
32px) with the from-scratch recipe of configs/scratch.py (AdamW 1e-3, 10%
warm-up, cosine, flip/rotation/zoom), 300 steps of batch 128 (0.77 epochs).
The paper's Table 8 (ViT-B/16, ImageNet 5-shot linear): none 0.614, 1-D
0.642, 2-D 0.640, relative 0.640: none clearly worst, the others within
0.2 points. Expected result here (CIFAR-10 test top-1, mean of seeds 0-2,
docs/reproduction.md section 8): none 37.2%, learn 37.5%, learn2d 37.8%,
rel 37.8%, sincos2d 40.0%; seed-to-seed spread up to ~0.6 points.
"""

from __future__ import annotations

import ml_collections

from configs import scratch
from vit_jax.models import vit


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  posemb = (arg or '').strip()
  if posemb not in vit.POSEMBS:
    raise ValueError(f'configs/posemb_ablation.py needs ":<posemb>", one of '
                     f'{", ".join(vit.POSEMBS)}; got {arg!r}.')
  c = scratch.get_config('vit_ti,cifar10')
  c.model_name = 'SmallViT_8'
  c.model = ml_collections.ConfigDict({'posemb': posemb})
  c.batch_size = 128
  c.batch_size_eval = 500
  c.total_steps = 300
  c.log_every = 25
  c.eval_every = 150
  c.checkpoint_every = 150
  return c
