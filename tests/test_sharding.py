"""Mesh sizes and per-leaf sharding rules (8 simulated devices in a subprocess)."""

import os
import subprocess
import sys
import textwrap

import ml_collections
import pytest
from jax.sharding import PartitionSpec as P

from vit_jax import sharding


def test_mesh_shape_resolves_minus_one():
  cfg = ml_collections.ConfigDict({'data': -1, 'fsdp': 4})
  assert sharding.mesh_shape(cfg, 8) == (2, 4)
  assert sharding.mesh_shape(ml_collections.ConfigDict({'data': 2, 'fsdp': -1}),
                             8) == (2, 4)
  assert sharding.mesh_shape(None, 8) == (8, 1)


def test_mesh_shape_errors():
  with pytest.raises(ValueError, match='does not fit the 8 available devices'):
    sharding.mesh_shape(ml_collections.ConfigDict({'data': 3, 'fsdp': 1}), 8)
  with pytest.raises(ValueError, match='Only one of'):
    sharding.mesh_shape(ml_collections.ConfigDict({'data': -1, 'fsdp': -1}), 8)


def test_partition_spec_largest_divisible_dim():
  # (768, 12, 64): 768 is largest and divisible by 4.
  assert sharding.partition_spec('a/query/kernel', (768, 12, 64), 4) == \
      P('fsdp', None, None)
  # (12, 64, 768) -> last dim.
  assert sharding.partition_spec('a/out/kernel', (12, 64, 768), 4) == \
      P(None, None, 'fsdp')
  # Largest dim not divisible -> next divisible one.
  assert sharding.partition_spec('head/kernel', (768, 21843), 4) == \
      P('fsdp', None)
  # Too small, or no divisible dim, or fsdp 1 -> replicated.
  assert sharding.partition_spec('ln/scale', (768,), 4) == P()
  assert sharding.partition_spec('x', (5, 4099), 4) == P()
  assert sharding.partition_spec('a/query/kernel', (768, 12, 64), 1) == P()


def test_partition_spec_regex_rules_first_match_wins():
  rules = [('posembed', 'replicate'), ('.*', 'fsdp')]
  assert sharding.partition_spec('Transformer/posembed_input/pos_embedding',
                                 (1, 197, 768), 4, rules) == P()
  assert sharding.partition_spec('Transformer/x/kernel', (768, 3072), 4,
                                 rules) == P(None, 'fsdp')
  with pytest.raises(ValueError, match="'fsdp' or 'replicate'"):
    sharding.partition_spec('a', (1024, 1024), 2, [('.*', 'tp')])


_EIGHT_DEVICES = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, ml_collections, optax
    from vit_jax import sharding
    assert jax.device_count() == 8
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=4)))
    assert dict(mesh.shape) == {'data': 2, 'fsdp': 4}
    def init(rng):
      params = {'kernel': jax.random.normal(rng, (64, 256)),
                'bias': jnp.zeros((256,))}
      return {'params': params, 'opt_state': optax.sgd(0.1, 0.9).init(params)}
    # As the loop does: shardings from the abstract state, outputs born sharded.
    shardings = sharding.state_shardings(jax.eval_shape(init, jax.random.PRNGKey(0)), mesh,
                                         [('.*', 'fsdp')], 1024)
    state = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(0))
    k = state['params']['kernel']
    assert k.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp'), k.sharding
    assert {s.data.shape for s in k.addressable_shards} == {(64, 64)}
    mom = state['opt_state'][0].trace['kernel']
    assert mom.sharding.spec == k.sharding.spec
    assert state['params']['bias'].sharding.is_fully_replicated
    # The sharded init gives the same numbers as a plain one.
    np.testing.assert_array_equal(sharding.to_host(state)['params']['kernel'],
                                  np.asarray(init(jax.random.PRNGKey(0))['params']['kernel']))
    x = jax.device_put(np.arange(16.), sharding.batch_sharding(mesh))
    assert {s.data.shape for s in x.addressable_shards} == {(2,)}
    print('OK')
""")


def test_eight_devices_fsdp_init():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', _EIGHT_DEVICES], env=env,
                       capture_output=True, text=True, timeout=120, check=False,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
  assert out.returncode == 0 and 'OK' in out.stdout, out.stderr[-3000:]
