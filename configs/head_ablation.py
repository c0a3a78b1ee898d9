r"""Class token vs. global average pooling (ViT paper App. D.3, Figure 9): `:<classifier>,<lr>`.

  for run in token,1e-3 gap,1e-3 gap,3e-4 token,3e-4; do
    python -m vit_jax.main --config=configs/head_ablation.py:$run \
        --config.dataset=folder:$CIFAR10_DIR --workdir=workdirs/head_${run/,/_}
  done

The paper: a [class] token and GAP over the patch tokens "work similarly
well, but require different learning-rates"; GAP at the class token's rate
did "very poorly" at first. The runs here are the position-embedding
ablation's setup (configs/posemb_ablation.py: SmallViT_8 from scratch on
CIFAR-10, AdamW, 300 steps of batch 128, learned 1-D position embeddings)
with the head and the peak learning rate as the only changes. Expected
result here (CIFAR-10 test top-1, mean of seeds 0-2; docs/reproduction.md
section 8b): token,1e-3 37.5%, gap,1e-3 37.0%, gap,3e-4 37.4%, token,3e-4
38.4%; seed-to-seed spread up to ~0.9 points.
"""

from __future__ import annotations

import ml_collections

from configs import posemb_ablation


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  parts = [p.strip() for p in (arg or '').split(',')]
  if len(parts) != 2 or parts[0] not in ('token', 'gap'):
    raise ValueError('configs/head_ablation.py needs ":<classifier>,<lr>" with a classifier of '
                     f'token or gap, e.g. ":gap,3e-4"; got {arg!r}.')
  try:
    lr = float(parts[1])
  except ValueError:
    raise ValueError(f'configs/head_ablation.py: the learning rate {parts[1]!r} is not a '
                     'number.') from None
  c = posemb_ablation.get_config('learn')
  c.model.classifier = parts[0]
  c.lr.base = lr
  return c
