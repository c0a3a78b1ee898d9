"""`--config.dataset=synthetic`: fixed random images made on the device.

Times the *real* training loop (its step, accumulation, logging, checkpoints)
on any machine without data and without TensorFlow, as timm's benchmark
does: one batch of uniform random images in [-1, 1] and random labels, made
once on the devices with the batch sharding, then fed to every step. Nothing
is copied from the host per step, so the loop's images/sec is the step's.

The same interface as `vit_jax.input_pipeline` (get_dataset_info,
make_train_iter, make_eval_iter, to_global), so `config_schema.data_module` picks
one or the other.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from vit_jax.dataset_info import DatasetInfo

NAME = 'synthetic'
DEFAULT_NUM_CLASSES = 1000   # config.num_classes = None: an ImageNet-sized head.
NUM_EVAL_BATCHES = 1


class _Spec(NamedTuple):
  """What a batch will be; `to_global` makes it on the devices."""
  batch: int
  image_size: int
  num_classes: int
  seed: int
  with_mask: bool


def num_classes(config: Any) -> int:
  return int(config.get('num_classes') or DEFAULT_NUM_CLASSES)


def checked_config(config: Any, workdir: str | None,
                   splits: tuple[str, ...] | None = None) -> Any:
  """No files to check (input_pipeline.checked_config decodes image folders)."""
  del workdir, splits
  return config


def get_dataset_info(config: Any) -> DatasetInfo:
  n = num_classes(config)
  return DatasetInfo(n, int(config.batch_size),
                     NUM_EVAL_BATCHES * int(config.get('batch_size_eval') or config.batch_size),
                     tuple(f'class_{i}' for i in range(n)), NAME, NAME)


def make_train_iter(config: Any, *, start_step: int = 0, **unused: Any) -> Iterator[_Spec]:
  """The same fixed batch for every step (global batch config.batch_size)."""
  del start_step, unused
  spec = _Spec(int(config.batch_size), int(config.image_size), num_classes(config),
               int(config.get('seed', 0)), False)
  while True:
    yield spec


def make_eval_iter(config: Any, split: str | None = None, **unused: Any) -> Iterator[_Spec]:
  del split, unused
  batch = int(config.get('batch_size_eval') or config.batch_size)
  for i in range(NUM_EVAL_BATCHES):
    yield _Spec(batch, int(config.image_size), num_classes(config),
                int(config.get('seed', 0)) + 1 + i, True)


_CACHE: dict[tuple[_Spec, Any], dict[str, jax.Array]] = {}


def to_global(spec: _Spec, sharding: Any) -> dict[str, jax.Array]:
  """The batch `spec` describes, made once on the devices with `sharding`."""
  key = (spec, sharding)
  if key not in _CACHE:
    def make():
      k_img, k_lab = jax.random.split(jax.random.key(spec.seed))
      out = {'image': jax.random.uniform(
                 k_img, (spec.batch, spec.image_size, spec.image_size, 3), jnp.float32, -1., 1.),
             'label': jax.random.randint(k_lab, (spec.batch,), 0, spec.num_classes, jnp.int32)}
      if spec.with_mask:
        out['mask'] = jnp.ones((spec.batch,), jnp.float32)
      return out
    _CACHE[key] = jax.jit(make, out_shardings=sharding)()
  return _CACHE[key]
