"""Device mesh and shardings of the train state.

One 2-D mesh, axes ('data', 'fsdp'). The batch is split over both axes
together (every device sees its own examples). Parameters and optimizer state
are replicated along 'data' and, when the 'fsdp' axis has more than one
device, sharded along 'fsdp' on their largest dimension that the axis size
divides (ZeRO-3 / FSDP style: XLA inserts the all-gathers and
reduce-scatters). With the default `mesh = {data: -1, fsdp: 1}` this is plain
data parallelism with replicated params, the original's pmap setup.

Which arrays get sharded is decided per leaf by regex rules over the
'/'-joined path (first match wins) and a minimum size, in the spirit of
big_vision's rules, so that e.g. small LayerNorm vectors stay replicated.

The mesh uses `AxisType.Auto` axes: jax 0.10's `jax.make_mesh` defaults to
Explicit axes, which changes how jit propagates shardings.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

PyTree = Any
MESH_AXES = ('data', 'fsdp')
# Both axes together: the batch dimension is split over every device.
BATCH_AXES = MESH_AXES


def mesh_shape(mesh_config: Any, num_devices: int) -> tuple[int, int]:
  """Resolves `{data: d, fsdp: f}` (one of them may be -1) to sizes."""
  get = (mesh_config.get if mesh_config is not None else (lambda k, d: d))
  data, fsdp = int(get('data', -1)), int(get('fsdp', 1))
  if data == -1 and fsdp == -1:
    raise ValueError('Only one of config.mesh.data and config.mesh.fsdp may '
                     'be -1.')
  if data == -1:
    data = num_devices // fsdp if fsdp > 0 else 0
  if fsdp == -1:
    fsdp = num_devices // data if data > 0 else 0
  if data < 1 or fsdp < 1 or data * fsdp != num_devices:
    raise ValueError(
        f'config.mesh = data:{get("data", -1)}, fsdp:{get("fsdp", 1)} does not '
        f'fit the {num_devices} available devices (data * fsdp must equal '
        f'{num_devices}; use -1 for "the rest").')
  return data, fsdp


def make_mesh(mesh_config: Any = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp') mesh over all devices of all processes."""
  devices = list(devices) if devices is not None else jax.devices()
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(shape, MESH_AXES,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every device of the mesh."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def path_str(path: tuple) -> str:
  """'/'-joined names of a tree path (dict keys, attributes, indices)."""
  parts = []
  for k in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return '/'.join(parts)


def partition_spec(name: str, shape: Sequence[int], fsdp_size: int,
                   rules: Sequence[tuple[str, str]] = (('.*', 'fsdp'),),
                   min_size: int = 2 ** 12) -> P:
  """The PartitionSpec of one array of the train state.

  `rules` is a list of (regex, 'fsdp' | 'replicate'); the first regex that
  `re.search`es `name` decides. 'fsdp' shards the largest dimension divisible
  by `fsdp_size` (ties: the first), or replicates when none is, when the array
  has fewer than `min_size` elements, or when `fsdp_size` is 1.
  """
  strategy = 'replicate'
  for pattern, strat in rules:
    if re.search(pattern, name):
      strategy = strat
      break
  if strategy not in ('fsdp', 'replicate'):
    raise ValueError(f"Sharding rule strategy must be 'fsdp' or 'replicate', "
                     f'got {strategy!r}.')
  if strategy == 'replicate' or fsdp_size == 1 or \
      int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  dims = [i for i, n in enumerate(shape) if n % fsdp_size == 0]
  if not dims:
    return P()
  best = max(dims, key=lambda i: (shape[i], -i))
  spec = [None] * len(shape)
  spec[best] = 'fsdp'
  return P(*spec)


def state_shardings(abstract_state: PyTree, mesh: Mesh,
                    rules: Sequence[tuple[str, str]] = (('.*', 'fsdp'),),
                    min_size: int = 2 ** 12) -> PyTree:
  """NamedShardings for every leaf of a (possibly abstract) state pytree.

  The rule depends on path and shape only, so an optimizer's momentum gets the
  same sharding as its parameter (its path ends with the parameter's path).
  """
  fsdp_size = mesh.shape['fsdp']

  def one(path, leaf):
    return NamedSharding(mesh, partition_spec(path_str(path), leaf.shape,
                                              fsdp_size, rules, min_size))
  return jax.tree_util.tree_map_with_path(one, abstract_state)


def rules_from_config(mesh_config: Any) -> list[tuple[str, str]]:
  """`config.mesh.rules`: list of (regex, strategy); default shard all."""
  rules = (mesh_config.get('rules', None) if mesh_config is not None
           else None)
  if not rules:
    return [('.*', 'fsdp')]
  return [tuple(r) for r in rules]


def to_host(tree: PyTree) -> PyTree:
  """numpy copy of a tree of (possibly sharded, multi-process) jax.Arrays.

  Arrays not fully addressable by this process (FSDP across hosts) are
  all-gathered first; every process must call this together then.
  """
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(one, tree)
