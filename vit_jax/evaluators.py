"""Evaluators: what the training loop measures, as `config.evals` lists it.

Each evaluator has a `name`, a cadence `every` (steps; 0 = only at the end)
and is called with the train state ({'params', ['batch_stats'], ['polyak']})
to return flat metrics:

* ``classification``: accuracy and loss over every example of a split
  (`make_eval_step` + `evaluate_split`); with Polyak averaging also those of
  the averaged params (``<metric>_polyak``). The built-in evaluator ``test``
  runs on ``config.test_split`` every ``config.eval_every`` steps: its
  ``accuracy_test`` is the run's result.
* ``fewshot``: few-shot linear probes of a frozen representation (ViT paper
  §4.1; the math is vit_jax.linear_probe's), `FewShotEvaluator`.

A config adds evaluators by name::

  config.evals.val = dict(type='classification', split='train[90%:]', every=500)
  config.evals.fewshot = dict(type='fewshot', dataset='cifar10', image_size=224,
                              every=1000)

`from_config` builds the list the loop runs; vit_jax.evaluate and the
``python -m vit_jax.fewshot`` CLI use the same classes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import config_schema, optim, sharding
from vit_jax.config_schema import ConfigError
from vit_jax.images import CROP_FRACTION
from vit_jax.models.vit import config_value
from vit_jax.linear_probe import (DEFAULT_L2_REGS, DEFAULT_SHOTS, FewShotError, ShotResult,
                                  fewshot_accuracies, results_to_metrics, sample_shots)

logger = logging.getLogger(__name__)

TYPES = ('classification', 'fewshot')
BUILT_IN = 'test'  # The classification evaluator of config.test_split.


# ---------------------------------------------------------------------------
# Classification: accuracy and loss over a whole split.
# ---------------------------------------------------------------------------

def make_eval_step(model, objective: Any = None) -> Callable:
  """eval_step(params, batch_stats, batch) -> masked sums of correct, loss.

  With an `objective`, its own accuracy and loss (e.g. masked patch
  prediction's) instead of the labels'.
  """
  def eval_step(params, batch_stats, batch):
    variables = {'params': params}
    if batch_stats is not None:
      variables['batch_stats'] = batch_stats
    if objective is not None:
      return objective.eval_sums(model, variables, batch)
    logits = model.apply(variables, batch['image'], train=False)
    mask = batch['mask']
    loss = optim.cross_entropy(logits, batch['label'])
    correct = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
    return {'correct': jnp.sum(correct * mask), 'loss': jnp.sum(loss * mask),
            'count': jnp.sum(mask)}
  return eval_step


def evaluate_split(eval_step: Callable, params: Any, batch_stats: Any,
                   config: Any, batch_sh: Any,
                   split: str | None = None, name: str = 'test') -> dict[str, float]:
  """accuracy_<name>, loss_<name>, num_<name>_examples over every example of
  `split` (default config.test_split).

  One pass of the data module's make_eval_iter (padded last batch, masked),
  so the count is exact; used by the training loop and by vit_jax.evaluate.
  """
  data = config_schema.data_module(config)
  sums = None
  for batch in data.make_eval_iter(config, split):
    out = eval_step(params, batch_stats, data.to_global(batch, batch_sh))
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  sums = {k: float(v) for k, v in sharding.to_host(sums).items()}
  return {f'accuracy_{name}': sums['correct'] / sums['count'],
          f'loss_{name}': sums['loss'] / sums['count'],
          f'num_{name}_examples': sums['count']}


def polyak_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
  """Eval metrics of the Polyak-averaged params, named `<metric>_polyak`."""
  return {f'{k}_polyak': v for k, v in metrics.items() if not k.startswith('num_')}


class ClassificationEvaluator:
  """Accuracy and loss of the model over every example of `split`.

  `state_sh` / `batch_sh`: the shardings of the train state and of a batch
  (the loop's); without them the step runs on the default device.
  """

  def __init__(self, name: str, config: Any, model: Any, *, every: int = 0,
               split: str | None = None, objective: Any = None,
               state_sh: Any = None, batch_sh: Any = None):
    self.name, self.every, self.config = name, int(every or 0), config
    self.split = split
    if state_sh is None:
      self._step = jax.jit(make_eval_step(model, objective))
    else:
      repl = jax.sharding.NamedSharding(batch_sh.mesh, jax.sharding.PartitionSpec())
      self._step = jax.jit(
          make_eval_step(model, objective),
          in_shardings=(state_sh['params'], state_sh.get('batch_stats'), batch_sh),
          out_shardings=repl)
    if batch_sh is None:
      batch_sh = sharding.batch_sharding(sharding.make_mesh(config.get('mesh')))
    self._batch_sh = batch_sh

  def _split(self, params: Any, batch_stats: Any) -> dict[str, float]:
    return evaluate_split(self._step, params, batch_stats, self.config, self._batch_sh,
                          self.split, self.name)

  def __call__(self, state: Mapping[str, Any]) -> dict[str, float]:
    metrics = self._split(state['params'], state.get('batch_stats'))
    if state.get('polyak') is not None:
      metrics.update(polyak_metrics(self._split(state['polyak'], state.get('batch_stats'))))
    return metrics


# ---------------------------------------------------------------------------
# Few-shot linear evaluation (ViT paper §4.1): the model side. The math is
# vit_jax.linear_probe's.
# ---------------------------------------------------------------------------

_DEFAULTS = {
    'train_split': 'train', 'test_split': 'test', 'shots': DEFAULT_SHOTS, 'seeds': (0, 1, 2),
    'l2_regs': DEFAULT_L2_REGS, 'representation': 'pre_logits', 'pool': 'auto',
    'batch_size': 64, 'pp_eval': 'resize', 'crop_fraction': CROP_FRACTION, 'tfds_data_dir': None,
    'name': None, 'standardize': 'feature', 'per_l2': False, 'every': 0,
}


def _cfg(config: Any, key: str) -> Any:
  return config_value(config, key, _DEFAULTS.get(key))


def flat_intermediates(state: Mapping[str, Any]) -> dict[str, Any]:
  """{'path/name': value} of a sown 'intermediates' collection.

  Single sows are unwrapped; repeated sows (``Transformer/block_outputs``) stay
  tuples and are addressed as ``Transformer/block_outputs/<i>``.
  """
  import jax  # pylint: disable=g-import-not-at-top
  flat = {}
  for path, value in jax.tree_util.tree_flatten_with_path(
      state, is_leaf=lambda v: isinstance(v, tuple))[0]:
    key = '/'.join(str(getattr(p, 'key', p)) for p in path)
    if isinstance(value, tuple) and len(value) == 1:
      flat[key] = value[0]
    elif isinstance(value, tuple):
      for i, v in enumerate(value):
        flat[f'{key}/{i}'] = v
    else:
      flat[key] = value
  return flat


def select_representation(flat: Mapping[str, Any], representation: str) -> Any:
  """The sown value whose key is ``representation`` or ends with ``/representation``.

  'pre_logits' (the paper's name) is the model's top-level sow 'representation'
  (a sow cannot share the name of the `pre_logits` submodule).
  """
  names = [representation]
  if representation == 'pre_logits':
    names.append('representation')
  hits = [k for k in flat for n in names if k == n or k.endswith('/' + n)]
  if representation == 'pre_logits' and 'representation' in hits:
    hits = ['representation']
  if len(hits) != 1:
    raise FewShotError(
        f'Representation {representation!r} ' +
        ('is ambiguous: ' + ', '.join(hits) if hits else 'was not sown by the model') +
        f'. Sown layers: {", ".join(sorted(flat))}.')
  return flat[hits[0]]


def make_representation_fn(model: Any, representation: str = 'pre_logits',
                           pool: str = 'auto'):
  """fn(variables, images) -> (B, D) features of a sown layer, pooled over tokens.

  3-D layers (B, T, D) are pooled: 'first' takes the class token, 'mean'
  averages tokens, 'auto' takes the class token when the model has one (and
  the layer is not the pre-class-token ``patch_tokens``), else the mean.
  """
  if pool not in ('auto', 'first', 'mean'):
    raise FewShotError(f"pool must be 'auto', 'first' or 'mean', got {pool!r}.")
  classifier = getattr(model, 'classifier', 'gap')
  has_token = classifier in ('token', 'token_unpooled', 'distill')

  def fn(variables, images):
    _, state = model.apply(variables, images, train=False, mutable=['intermediates'])
    x = select_representation(flat_intermediates(state['intermediates']), representation)
    if x.ndim == 3:
      first = pool == 'first' or (pool == 'auto' and has_token and
                                  not representation.endswith('patch_tokens'))
      x = x[:, 0] if first else x.mean(axis=1)
    return x.reshape(x.shape[0], -1).astype('float32')
  return fn


def _dataset_name(dataset: str) -> str:
  if dataset.startswith('folder:'):
    return os.path.basename(os.path.normpath(dataset[len('folder:'):])) or 'folder'
  return dataset.split(':')[0].split('/')[0]


class FewShotEvaluator:
  """Few-shot linear evaluation of a model (a ``config.evals`` entry of type ``fewshot``).

  ``fewshot_config`` keys (defaults in brackets): dataset (required; a TFDS
  name, 'folder:<root>' or 'digits'), image_size (required), train_split
  ['train'], test_split ['test'; slices like 'test[:2000]' work], shots
  [(1, 5, 10, 25)], seeds [(0, 1, 2)], l2_regs [powers of 4, 1/4..16384],
  representation ['pre_logits'; any sown layer, e.g. 'encoder_out' or
  'Transformer/block_outputs/5'], pool ['auto'], batch_size [64], pp_eval
  ['resize'], crop_fraction [images.CROP_FRACTION], tfds_data_dir, name [from dataset],
  standardize ['feature'], per_l2 [False: also log every penalty], every
  [steps; 0: only at the end of training].

  Only the images that some seed draws as shots are pushed through the model
  (at most max(shots) x classes x seeds), plus the whole test split.
  ``run(params)`` returns e.g. {'fewshot/cifar10_5shot': 0.87, ...}.
  """

  def __init__(self, fewshot_config: Any, model: Any, *, skip_bad_images: bool = False):
    for key in ('dataset', 'image_size'):
      if _cfg(fewshot_config, key) is None:
        raise FewShotError(f'config.evals.<name>.{key} is required for a fewshot evaluator.')
    self.config = fewshot_config
    self.model = model
    self.every = int(_cfg(fewshot_config, 'every'))
    self.name = _cfg(fewshot_config, 'name') or _dataset_name(_cfg(fewshot_config, 'dataset'))
    self.shots = tuple(int(k) for k in _cfg(fewshot_config, 'shots'))
    self.seeds = tuple(int(s) for s in _cfg(fewshot_config, 'seeds'))
    self.l2_regs = tuple(float(v) for v in _cfg(fewshot_config, 'l2_regs'))
    self.batch_size = int(_cfg(fewshot_config, 'batch_size'))
    self._fn = make_representation_fn(model, _cfg(fewshot_config, 'representation'),
                                      _cfg(fewshot_config, 'pool'))
    self._jitted = {}
    # The entry's own skip_bad_images, else the caller's (the loop: the config's).
    self.skip_bad_images = bool(config_value(fewshot_config, 'skip_bad_images',
                                             skip_bad_images))
    self._skipped: frozenset[str] = frozenset()   # Undecodable files left out.
    self._decodable: set[str] = set()   # Files checked and fine.
    self.last_results: dict[int, ShotResult] | None = None

  # -- data -----------------------------------------------------------------

  def _pipeline_config(self):
    import ml_collections  # pylint: disable=g-import-not-at-top
    c = self.config
    return ml_collections.ConfigDict({
        'dataset': _cfg(c, 'dataset'), 'train_split': _cfg(c, 'train_split'),
        'test_split': _cfg(c, 'test_split'), 'tfds_data_dir': _cfg(c, 'tfds_data_dir'),
        'image_size': _cfg(c, 'image_size'), 'batch_size': self.batch_size,
        'batch_size_eval': self.batch_size, 'seed': 0, 'skipped_images': sorted(self._skipped),
        'pp': {'eval': _cfg(c, 'pp_eval'), 'crop_fraction': float(_cfg(c, 'crop_fraction'))}})

  def _source(self, split: str):
    from vit_jax import input_pipeline  # pylint: disable=g-import-not-at-top
    c = self.config
    return input_pipeline.load_source(
        _cfg(c, 'dataset'), split, train_split=_cfg(c, 'train_split'),
        data_dir=_cfg(c, 'tfds_data_dir'), exclude=self._skipped)

  def _pool(self, num_shots: int):
    """(train source, its rows of every seed's draw), the files those rows and
    the test split read decoded first (once per evaluator: the loop's
    evaluations after the first decode nothing new): undecodable ones stop
    the run, all listed, or with `skip_bad_images` are left out of the split
    (the draw is redone without them, so every class still gets its shots)."""
    from vit_jax import input_pipeline  # pylint: disable=g-import-not-at-top
    test = self._source(_cfg(self.config, 'test_split'))
    to_check = [str(p) for p in test.data] if test.kind == 'files' else []
    while True:
      train = self._source(_cfg(self.config, 'train_split'))
      if train.labels is None:
        raise FewShotError(f'{train.description} is streamed (too large to hold in memory); '
                           f'few-shot needs random access: use a smaller train_split slice.')
      rows = np.unique(np.concatenate([
          sample_shots(train.labels, len(train.class_names), num_shots, s) for s in self.seeds]))
      if train.kind == 'files':
        to_check += [str(p) for p in train.data[rows]]
      new = sorted(set(to_check) - self._decodable - self._skipped)
      bad = input_pipeline.check_images(new, None)
      self._decodable |= set(new) - set(bad)   # Later evaluations decode them once only.
      if not bad:
        return train, rows
      if not self.skip_bad_images:
        raise ValueError(input_pipeline.bad_images_message(
            bad, 'skip_bad_images=True in the few-shot config (python -m vit_jax.fewshot: '
            '--skip_bad_images)'))
      logger.warning('Few-shot %s: leaving out %d undecodable image file(s):\n%s', self.name,
                     len(bad), '\n'.join(f'  {p}: {r}' for p, r in sorted(bad.items())))
      self._skipped |= frozenset(bad)
      to_check = []

  def _subset_batches(self, source, indices: np.ndarray):
    """Batches (images, labels) of the given examples, eval preprocessing."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    from vit_jax import input_pipeline, preprocess  # pylint: disable=g-import-not-at-top
    c = self.config
    eval_fn = preprocess.get_eval_fn(_cfg(c, 'pp_eval'), _cfg(c, 'image_size'),
                                     crop_fraction=float(_cfg(c, 'crop_fraction')))
    labels = tf.constant(source.labels[indices], tf.int32)
    if source.kind == 'files':
      data = tf.constant(source.data[indices])
      load = lambda d: input_pipeline.decode_image(tf.io.read_file(d))
    elif source.kind == 'encoded':
      data = tf.constant(source.data[indices].tolist(), tf.string)
      load = input_pipeline.decode_image
    elif source.kind == 'array':
      data = tf.constant(source.data[indices], tf.uint8)
      load = lambda d: d
    else:
      raise FewShotError(f'Cannot pick examples from {source.description} ({source.kind}).')
    ds = tf.data.Dataset.from_tensor_slices((data, labels))
    ds = ds.map(lambda d, y: (eval_fn(load(d)), y), num_parallel_calls=tf.data.AUTOTUNE)
    yield from ds.batch(self.batch_size).prefetch(2).as_numpy_iterator()

  def _test_batches(self):
    from vit_jax import input_pipeline  # pylint: disable=g-import-not-at-top
    # Every process reads the whole split: the features are replicated.
    for batch in input_pipeline.make_eval_iter(self._pipeline_config(),
                                               _cfg(self.config, 'test_split'),
                                               process_index=0, process_count=1):
      keep = batch['mask'] > 0
      yield batch['image'], batch['label'], keep

  # -- model ----------------------------------------------------------------

  def _features(self, variables: Any, images: np.ndarray) -> np.ndarray:
    import jax  # pylint: disable=g-import-not-at-top
    n = len(images)
    if n < self.batch_size:  # pad to one shape: one compilation
      pad = np.zeros((self.batch_size - n, *images.shape[1:]), images.dtype)
      images = np.concatenate([images, pad])
    leaf = jax.tree.leaves(variables)[0]
    sharding = getattr(leaf, 'sharding', None)
    mesh = getattr(sharding, 'mesh', None)
    key = id(mesh)
    if key not in self._jitted:
      if mesh is not None:
        repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self._jitted[key] = (jax.jit(self._fn, out_shardings=repl), repl)
      else:
        self._jitted[key] = (jax.jit(self._fn), None)
    fn, repl = self._jitted[key]
    if repl is not None and jax.process_count() > 1:
      images = jax.make_array_from_process_local_data(repl, images)
    return np.asarray(fn(variables, images))[:n]

  def representations(self, params: Any, batch_stats: Any = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """(x_pool, pool_rows, labels_train, x_test, labels_test, num_classes)."""
    variables = {'params': params}
    if batch_stats is not None:
      variables['batch_stats'] = batch_stats
    train, rows = self._pool(max(self.shots))
    num_classes = len(train.class_names)
    x_pool = np.concatenate([self._features(variables, im)
                             for im, _ in self._subset_batches(train, rows)])
    xs, ys = [], []
    for images, labels, keep in self._test_batches():
      xs.append(self._features(variables, images)[keep])
      ys.append(labels[keep])
    return x_pool, rows, train.labels, np.concatenate(xs), np.concatenate(ys), num_classes

  def __call__(self, state: Mapping[str, Any]) -> dict[str, float]:
    """The evaluator protocol: metrics of a train state {'params', ...}."""
    return self.run(state['params'], state.get('batch_stats'))

  def run(self, params: Any, batch_stats: Any = None) -> dict[str, float]:
    """Few-shot accuracies of the model with ``params`` (mean over seeds)."""
    x_pool, rows, labels_train, x_test, labels_test, num_classes = self.representations(
        params, batch_stats)
    self.last_results = fewshot_accuracies(
        x_pool, labels_train, x_test, labels_test, num_classes, shots=self.shots,
        seeds=self.seeds, l2_regs=self.l2_regs, standardize=_cfg(self.config, 'standardize'),
        train_rows=rows)
    return results_to_metrics(self.name, self.last_results, bool(_cfg(self.config, 'per_l2')))


# ---------------------------------------------------------------------------
# The list the loop runs.
# ---------------------------------------------------------------------------

def from_config(config: Any, model: Any, *, objective: Any = None,
                state_sh: Any = None, batch_sh: Any = None) -> list[Any]:
  """The built-in `test` evaluator, then one per `config.evals` entry.

  Raises ConfigError for an entry without a known `type` or named `test`.
  """
  kw = dict(objective=objective, state_sh=state_sh, batch_sh=batch_sh)
  evals = [ClassificationEvaluator(BUILT_IN, config, model,
                                   every=config.get('eval_every') or 0, **kw)]
  for name, entry in (config.get('evals') or {}).items():
    kind = entry.get('type') if hasattr(entry, 'get') else None
    if name == BUILT_IN:
      raise ConfigError(f'config.evals.{BUILT_IN} is the built-in evaluator of '
                        'config.test_split (its cadence is config.eval_every): use another name.')
    if kind == 'classification':
      if not entry.get('split'):
        raise ConfigError(f'config.evals.{name}.split is required for a classification '
                          "evaluator (e.g. 'train[90%:]').")
      evals.append(ClassificationEvaluator(name, config, model, every=entry.get('every', 0),
                                           split=entry['split'], **kw))
    elif kind == 'fewshot':
      evals.append(FewShotEvaluator(entry, model,
                                    skip_bad_images=bool(config.get('skip_bad_images'))))
    else:
      raise ConfigError(f'config.evals.{name}.type must be one of {", ".join(TYPES)}, '
                        f'got {kind!r}.')
  return evals
