"""A seconds-fast training config for the subprocess tests of the train loop.

1-layer, width-32 ViT on scikit-learn's digits at 8x8 (patch 2: 16 tokens),
SGD-momentum with dropout, so sharding / multi-process / resume equivalence is
checked on the real loop (data, rng folding, optimizer, checkpoints).
Used as `--config=tests/_tiny_config.py` and loaded in-process by the tests.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = common.get_config()
  c.model_name = None
  c.model = ml_collections.ConfigDict({
      'model_name': 'tiny-test',
      'patches': {'size': (2, 2)},
      'hidden_size': 32,
      'transformer': {'mlp_dim': 64, 'num_heads': 2, 'num_layers': 1,
                      'dropout_rate': 0.1, 'attention_dropout_rate': 0.0},
      'classifier': 'token',
      'representation_size': None,
      'resnet': None,
  })
  c.pretrained_path = None
  c.dataset = 'digits'
  c.train_split = 'train'
  c.test_split = 'test'
  c.num_classes = 10
  c.image_size = 8
  c.pp.train = 'resize'
  c.pp.eval = 'resize'
  c.batch_size = 32
  c.batch_size_eval = 128
  c.accum_steps = 1
  c.total_steps = 6
  c.lr.base = 0.1
  c.lr.warmup_steps = 2
  c.optim.momentum_dtype = 'float32'
  c.log_every = 1
  c.eval_every = 0
  c.checkpoint_every = 2
  c.keep_checkpoints = 2
  c.mesh.min_size = 0   # Shard every divisible array under FSDP.
  return c
