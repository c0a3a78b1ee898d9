"""vit_jax.evaluators: the list the loop runs, built from config.evals."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import tiny_config

from vit_jax import config_schema, evaluators, hub, input_pipeline


def _model(config):
  module, _ = hub.build(config, 10)
  params = jax.jit(module.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))['params']
  params['head']['kernel'] = jax.random.normal(jax.random.PRNGKey(1), params['head']['kernel'].shape)
  return module, {'params': params}


def test_from_config_lists_the_built_in_test_then_the_named_ones():
  config = tiny_config()
  config.eval_every = 4
  config.evals = ml_collections.ConfigDict({
      'val': {'type': 'classification', 'split': 'train[:40]', 'every': 2},
      'shots': {'type': 'fewshot', 'dataset': 'digits', 'image_size': 8, 'every': 3}})
  module, variables = _model(config)
  evals = evaluators.from_config(config, module)
  # The built-in one first, then config.evals in its (ConfigDict: sorted) key order.
  assert [(e.name, e.every) for e in evals] == [('test', 4), ('digits', 3), ('val', 2)]
  assert type(evals[1]) is evaluators.FewShotEvaluator
  # A classification evaluator scores every example of its split, named after itself.
  val = evals[2](variables)
  assert set(val) == {'accuracy_val', 'loss_val', 'num_val_examples'}
  assert val['num_val_examples'] == 40
  # The same numbers by hand, batch by batch.
  c = config.copy_and_resolve_references()
  c.test_split = 'train[:40]'
  logits, labels = [], []
  for batch in input_pipeline.make_eval_iter(c):
    keep = batch['mask'] > 0
    logits.append(np.asarray(module.apply(variables, batch['image'], train=False))[keep])
    labels.append(batch['label'][keep])
  logits, labels = np.concatenate(logits), np.concatenate(labels)
  assert val['accuracy_val'] == pytest.approx(np.mean(logits.argmax(-1) == labels), abs=1e-9)
  logp = jax.nn.log_softmax(logits)
  assert val['loss_val'] == pytest.approx(-np.mean(logp[np.arange(40), labels]), rel=1e-5)
  # With a Polyak average in the state, its metrics come too (and differ).
  state = dict(variables, polyak=jax.tree.map(lambda p: 0.5 * p, variables['params']))
  both = evals[2](state)
  assert both['accuracy_val'] == val['accuracy_val'] and 'loss_val_polyak' in both
  assert both['loss_val_polyak'] != both['loss_val'] and 'num_val_examples_polyak' not in both


@pytest.mark.parametrize('entry, message', [
    ({'fewshot': {'dataset': 'digits'}}, r"evals.fewshot.type must be one of classification, "
     r"fewshot, got None"),
    ({'test': {'type': 'classification', 'split': 'test'}}, 'evals.test is the built-in'),
    ({'val': {'type': 'classification'}}, r'evals.val.split is required'),
])
def test_bad_entries_are_config_errors(entry, message):
  config = tiny_config()
  config.evals = ml_collections.ConfigDict(entry)
  module, _ = _model(config)
  with pytest.raises(config_schema.ConfigError, match=message):
    evaluators.from_config(config, module)
