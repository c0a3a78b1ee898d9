"""Few-shot linear evaluation on frozen representations (ViT paper, §4.1 "Metrics").

The paper measures representations by "solving a regularized least-squares
regression problem that maps the (frozen) representation of a subset of
training images to target vectors", which has an exact closed-form solution and
is cheap enough to run during training. This module has three layers:

1. The solver (numpy, float64, host side): :func:`ridge_precompute` builds the
   design matrix (features standardised with the few-shot train statistics,
   plus a constant bias feature), takes ONE eigendecomposition of ``X^T X``
   (or of ``X X^T`` when there are fewer examples than features), and then
   :func:`ridge_weights` gives the solution for any L2 penalty in O(D^2 C).
2. The protocol, :func:`fewshot_accuracies`: for every seed draw k examples per
   class (k in {1, 5, 10, 25} by default), fit the ridge probe for every
   penalty of the grid, pick the penalty by closed-form leave-one-out squared
   error on the k-shot train set itself (no test labels are looked at), and
   report test accuracy averaged over seeds. Per-penalty test accuracies are
   returned as well (big_vision's reporting) for sweeps.
3. The model side: :class:`FewShotEvaluator` (used by the training loop through
   ``config.evals.fewshot``) and the ``python -m vit_jax.fewshot`` CLI extract
   the representation of a ``sow``-ed layer (``pre_logits`` by default).

Choice of the penalty. With k = 1 a held-out split of the few-shot train set
does not exist, so we use leave-one-out (LOO) cross-validation, which ridge
regression gives for free: with hat matrix ``H = X (X^T X + lam I)^-1 X^T`` the
LOO prediction of example i is ``y_i - (y_i - yhat_i) / (1 - H_ii)``. The
penalty with the lowest LOO squared error (Allen's PRESS, 1974) wins; ties go
to the larger penalty. We tried LOO *accuracy* first: it is coarse (0 for every
penalty at k = 1) and noisy; on a small CIFAR-10 ViT (5 seeds, 2,000 test
images) PRESS gave 0.366/0.515/0.540/0.554 at k = 1/5/10/25 against
0.366/0.507/0.539/0.537 for LOO accuracy, the best penalty in hindsight
reaching 0.384/0.520/0.540/0.554. (The standardisation statistics are those of
the whole k-shot set in the LOO fits too; that keeps LOO closed-form and is
what tests/test_fewshot.py checks against refitting.)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# The bias feature's value. A large constant makes the L2 penalty on the bias
# negligible (penalty on the effective bias b is lam * (b / BIAS_VALUE)^2), as in
# big_vision's few-shot evaluator, while keeping the problem one plain ridge
# regression with one eigendecomposition.
BIAS_VALUE = 100.0
# Powers of 4 from 1/4 to 16384; features are standardised, so X^T X has a
# diagonal of about N and useful penalties sit around N..100N (big_vision uses
# a fixed 1024).
DEFAULT_L2_REGS = tuple(float(2.0**k) for k in range(-2, 15, 2))
DEFAULT_SHOTS = (1, 5, 10, 25)
# Standard deviations below this are treated as this, so constant features do
# not blow up (same role as big_vision's +1e-5).
_STD_EPS = 1e-5


class FewShotError(ValueError):
  """Bad input to the few-shot evaluation (shapes, labels, too few examples)."""


# ---------------------------------------------------------------------------
# The solver: ridge regression through one eigendecomposition.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RidgeCache:
  """Everything needed to solve the ridge problem for any L2 penalty.

  The normal equations are ``(X^T X + lam I) W = X^T Y``. With ``X^T X = Q E Q^T``
  (primal, N >= D + 1) the solution is ``W = Q (E + lam)^-1 Q^T X^T Y``; with
  ``X X^T = U E U^T`` (dual, N < D + 1) it is ``W = X^T U (E + lam)^-1 U^T Y``.
  Both read ``lhs @ diag(1 / (E + lam)) @ rhs`` with ``rhs = P^T Y``, where the
  train-side basis ``P`` is ``X Q`` (primal) or ``U`` (dual). The same basis
  gives the fitted values and the hat matrix for leave-one-out:
  ``H = P diag(g) P^T`` with ``g = 1 / (E + lam)`` (primal) or ``E / (E + lam)``
  (dual).
  """

  mean: np.ndarray  # (1, D) feature mean of the few-shot train set
  std: np.ndarray  # (1, D) feature std (clipped at _STD_EPS)
  eigs: np.ndarray  # (R,) eigenvalues, clipped at 0
  lhs: np.ndarray  # (D + 1, R)
  rhs: np.ndarray  # (R, C)
  basis: np.ndarray  # (N, R) the train-side basis P
  dual: bool
  targets: np.ndarray  # (N, C) the {-1, 1} targets
  labels: np.ndarray  # (N,) integer labels
  bias_value: float


def feature_stats(x: np.ndarray, standardize: str = 'feature') -> tuple[np.ndarray, np.ndarray]:
  """Centre and scale used to standardise features, from the few-shot train set.

  'feature' divides each feature by its own std (big_vision's choice, so our
  numbers compare with theirs). 'global' divides every feature by one common
  scale (the root mean feature variance): relative feature scales survive, so
  near-constant noisy features are not inflated to unit variance, which is
  more robust at 1 shot when the std of C examples is itself noise.
  """
  x = np.asarray(x, np.float64)
  mean = x.mean(axis=0, keepdims=True)
  if standardize == 'feature':
    std = x.std(axis=0, keepdims=True)
  elif standardize == 'global':
    std = np.full((1, x.shape[1]), np.sqrt(np.mean(x.var(axis=0))))
  else:
    raise FewShotError(f"standardize must be 'feature' or 'global', got {standardize!r}.")
  return mean, np.maximum(std, _STD_EPS)


def design_matrix(x: np.ndarray, mean: np.ndarray, std: np.ndarray,
                  bias_value: float = BIAS_VALUE) -> np.ndarray:
  """Standardises features with train statistics and appends the bias feature."""
  x = (np.asarray(x, np.float64) - mean) / std
  return np.concatenate([x, np.full((x.shape[0], 1), bias_value)], axis=1)


def targets_pm1(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """The regression targets of the paper's probe: 2 * onehot - 1."""
  return 2.0 * np.eye(num_classes, dtype=np.float64)[labels] - 1.0


def _check_xy(x: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
  if x.ndim != 2:
    raise FewShotError(f'Features must be 2-D (examples, dims), got shape {x.shape}.')
  if labels.shape != (x.shape[0],):
    raise FewShotError(
        f'Labels must have shape ({x.shape[0]},) to match features {x.shape}, '
        f'got {labels.shape}.')
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise FewShotError(
        f'Labels must lie in [0, {num_classes}), got range '
        f'[{labels.min()}, {labels.max()}].')
  if not np.all(np.isfinite(x)):
    raise FewShotError('Features contain NaN or Inf; the model diverged or the '
                       'representation layer is wrong.')


def ridge_precompute(x: np.ndarray, labels: np.ndarray, num_classes: int,
                     bias_value: float = BIAS_VALUE, standardize: str = 'feature'
                     ) -> RidgeCache:
  """One eigendecomposition that serves every L2 penalty of a grid."""
  x = np.asarray(x, np.float64)
  labels = np.asarray(labels).astype(np.int64)
  _check_xy(x, labels, num_classes)
  if x.shape[0] < 1:
    raise FewShotError('Need at least one few-shot training example.')
  mean, std = feature_stats(x, standardize)
  xd = design_matrix(x, mean, std, bias_value)
  y = targets_pm1(labels, num_classes)
  n, d = xd.shape
  if n >= d:  # primal: eigh of the (D+1, D+1) Gram matrix of features
    eigs, q = np.linalg.eigh(xd.T @ xd)
    lhs, basis, dual = q, xd @ q, False
  else:  # dual: eigh of the (N, N) Gram matrix of examples
    eigs, u = np.linalg.eigh(xd @ xd.T)
    lhs, basis, dual = xd.T @ u, u, True
  return RidgeCache(mean=mean, std=std, eigs=np.maximum(eigs, 0.0), lhs=lhs,
                    rhs=basis.T @ y, basis=basis, dual=dual, targets=y,
                    labels=labels, bias_value=bias_value)


def ridge_weights(cache: RidgeCache, l2_reg: float) -> np.ndarray:
  """Solution ``W`` (D + 1, C) of ``min ||X W - Y||^2 + l2_reg ||W||^2``."""
  if not l2_reg > 0:
    raise FewShotError(f'L2 penalty must be > 0, got {l2_reg}.')
  return (cache.lhs / (cache.eigs + l2_reg)[None, :]) @ cache.rhs


def ridge_predict(cache: RidgeCache, w: np.ndarray, x: np.ndarray) -> np.ndarray:
  """Scores (N, C) of new examples under the probe ``w``."""
  return design_matrix(x, cache.mean, cache.std, cache.bias_value) @ w


def ridge_loo(cache: RidgeCache, l2_reg: float) -> tuple[float, float]:
  """Closed-form leave-one-out (accuracy, mean squared error) on the train set.

  Uses ``yhat_-i = y_i - (y_i - yhat_i) / (1 - H_ii)`` (Allen's PRESS), with
  the fitted values and the hat diagonal read off the cached decomposition.
  """
  gain = cache.eigs / (cache.eigs + l2_reg) if cache.dual else 1.0 / (cache.eigs + l2_reg)
  yhat = (cache.basis * gain[None, :]) @ cache.rhs
  h = np.einsum('nr,r,nr->n', cache.basis, gain, cache.basis)
  resid = (cache.targets - yhat) / np.maximum(1.0 - h, 1e-12)[:, None]
  loo = cache.targets - resid
  acc = float(np.mean(np.argmax(loo, axis=1) == cache.labels))
  return acc, float(np.mean(resid**2))


def ridge_accuracy(cache: RidgeCache, l2_reg: float, x_test: np.ndarray,
                   labels_test: np.ndarray) -> float:
  """Test accuracy of the probe fitted with penalty ``l2_reg``."""
  scores = ridge_predict(cache, ridge_weights(cache, l2_reg), x_test)
  return float(np.mean(np.argmax(scores, axis=1) == np.asarray(labels_test)))


# ---------------------------------------------------------------------------
# The protocol: k shots per class, several seeds, a penalty grid.
# ---------------------------------------------------------------------------


def sample_shots(labels: np.ndarray, num_classes: int, shots: int,
                 seed: int) -> np.ndarray:
  """Indices of ``shots`` examples per class, drawn with ``seed``.

  For one seed the draws are nested (the 5-shot set contains the 1-shot set),
  as in big_vision, so curves over k are not confounded by resampling.
  """
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  picked = []
  for c in range(num_classes):
    idx = np.flatnonzero(labels == c)
    if idx.size < shots:
      raise FewShotError(
          f'Class {c} has {idx.size} training example(s), fewer than the '
          f'{shots} shots asked for; lower `shots` or use a larger train split.')
    picked.append(rng.permutation(idx)[:shots])
  return np.concatenate(picked)


@dataclasses.dataclass
class ShotResult:
  """Few-shot results for one k, over seeds."""

  shots: int
  accuracy: float  # mean over seeds, penalty chosen by leave-one-out per seed
  accuracy_std: float
  per_seed: list[float]
  chosen_l2: list[float]  # the penalty leave-one-out chose for each seed
  per_l2: dict[float, float]  # test accuracy per penalty, mean over seeds


def fewshot_accuracies(x_train: np.ndarray, labels_train: np.ndarray,
                       x_test: np.ndarray, labels_test: np.ndarray,
                       num_classes: int,
                       shots: Sequence[int] = DEFAULT_SHOTS,
                       seeds: Sequence[int] = (0, 1, 2),
                       l2_regs: Sequence[float] = DEFAULT_L2_REGS,
                       bias_value: float = BIAS_VALUE,
                       standardize: str = 'feature',
                       train_rows: np.ndarray | None = None) -> dict[int, ShotResult]:
  """The paper's few-shot linear evaluation on precomputed representations.

  The k-shot sets are drawn from ``labels_train`` (every class needs at least
  max(shots) examples); ``x_test`` is scored in full. By default row i of
  ``x_train`` is example i. When only the drawn examples were embedded, pass
  their (sorted) example indices as ``train_rows``: row i of ``x_train`` is
  then example ``train_rows[i]``, and the draws are the same as with all rows.
  """
  x_train = np.asarray(x_train, np.float64)
  x_test = np.asarray(x_test, np.float64)
  labels_train = np.asarray(labels_train).astype(np.int64)
  labels_test = np.asarray(labels_test).astype(np.int64)
  if train_rows is None:
    _check_xy(x_train, labels_train, num_classes)
  else:
    train_rows = np.asarray(train_rows)
    _check_xy(x_train, labels_train[train_rows], num_classes)
  _check_xy(x_test, labels_test, num_classes)
  if x_train.shape[1] != x_test.shape[1]:
    raise FewShotError(f'Train features have {x_train.shape[1]} dims, test '
                       f'features {x_test.shape[1]}.')
  if not l2_regs or min(l2_regs) <= 0:
    raise FewShotError(f'l2_regs must be a non-empty list of positive penalties, got {l2_regs}.')
  if not seeds or not shots or min(shots) < 1:
    raise FewShotError(f'Need at least one seed and shots >= 1, got seeds={seeds}, shots={shots}.')
  results = {}
  for k in shots:
    per_seed, chosen, per_l2 = [], [], {float(lam): [] for lam in l2_regs}
    for seed in seeds:
      idx = sample_shots(labels_train, num_classes, k, seed)
      labels = labels_train[idx]
      if train_rows is not None:
        pos = np.searchsorted(train_rows, idx)
        if np.any(pos >= len(train_rows)) or np.any(train_rows[np.minimum(pos, len(train_rows) - 1)] != idx):
          raise FewShotError('train_rows does not contain every drawn example.')
        idx = pos
      cache = ridge_precompute(x_train[idx], labels, num_classes,
                               bias_value, standardize)
      # Leave-one-out squared error (PRESS) picks the penalty; ties go to the
      # largest penalty (the simplest probe). See the module docstring.
      best = max(l2_regs, key=lambda lam: (-ridge_loo(cache, lam)[1], lam))
      accs = {float(lam): ridge_accuracy(cache, lam, x_test, labels_test) for lam in l2_regs}
      for lam, a in accs.items():
        per_l2[lam].append(a)
      per_seed.append(accs[float(best)])
      chosen.append(float(best))
    results[k] = ShotResult(
        shots=k, accuracy=float(np.mean(per_seed)), accuracy_std=float(np.std(per_seed)),
        per_seed=per_seed, chosen_l2=chosen,
        per_l2={lam: float(np.mean(v)) for lam, v in per_l2.items()})
  return results


def results_to_metrics(name: str, results: Mapping[int, ShotResult],
                       per_l2: bool = False) -> dict[str, float]:
  """Flat metrics like ``fewshot/cifar10_5shot`` for the training logs."""
  out = {}
  for k, r in results.items():
    out[f'fewshot/{name}_{k}shot'] = r.accuracy
    if per_l2:
      for lam, a in r.per_l2.items():
        out[f'fewshot/{name}_{k}shot_l2={lam:g}'] = a
  return out


# ---------------------------------------------------------------------------
# The model side: representations of a sow-ed layer, the evaluator, the CLI.
# ---------------------------------------------------------------------------

_DEFAULTS = {
    'train_split': 'train', 'test_split': 'test', 'shots': DEFAULT_SHOTS, 'seeds': (0, 1, 2),
    'l2_regs': DEFAULT_L2_REGS, 'representation': 'pre_logits', 'pool': 'auto',
    'batch_size': 64, 'pp_eval': 'resize', 'crop_fraction': 0.875, 'tfds_data_dir': None,
    'name': None, 'standardize': 'feature', 'per_l2': False, 'every': 0,
}


def _cfg(config: Any, key: str) -> Any:
  value = config.get(key, None) if hasattr(config, 'get') else getattr(config, key, None)
  return _DEFAULTS.get(key) if value is None else value


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
  """Few-shot linear evaluation of a model during training (``config.evals.fewshot``).

  ``fewshot_config`` keys (defaults in brackets): dataset (required; a TFDS
  name, 'folder:<root>' or 'digits'), image_size (required), train_split
  ['train'], test_split ['test'; slices like 'test[:2000]' work], shots
  [(1, 5, 10, 25)], seeds [(0, 1, 2)], l2_regs [powers of 4, 1/4..16384],
  representation ['pre_logits'; any sown layer, e.g. 'encoder_out' or
  'Transformer/block_outputs/5'], pool ['auto'], batch_size [64], pp_eval
  ['resize'], crop_fraction [0.875], tfds_data_dir, name [from dataset],
  standardize ['feature'], per_l2 [False: also log every penalty], every
  [steps; read by the training loop].

  Only the images that some seed draws as shots are pushed through the model
  (at most max(shots) x classes x seeds), plus the whole test split.
  ``run(params)`` returns e.g. {'fewshot/cifar10_5shot': 0.87, ...}.
  """

  def __init__(self, fewshot_config: Any, model: Any):
    for key in ('dataset', 'image_size'):
      if _cfg(fewshot_config, key) is None:
        raise FewShotError(f'config.evals.fewshot.{key} is required.')
    self.config = fewshot_config
    self.model = model
    self.name = _cfg(fewshot_config, 'name') or _dataset_name(_cfg(fewshot_config, 'dataset'))
    self.shots = tuple(int(k) for k in _cfg(fewshot_config, 'shots'))
    self.seeds = tuple(int(s) for s in _cfg(fewshot_config, 'seeds'))
    self.l2_regs = tuple(float(v) for v in _cfg(fewshot_config, 'l2_regs'))
    self.batch_size = int(_cfg(fewshot_config, 'batch_size'))
    self._fn = make_representation_fn(model, _cfg(fewshot_config, 'representation'),
                                      _cfg(fewshot_config, 'pool'))
    self._jitted = {}
    self.last_results: dict[int, ShotResult] | None = None

  # -- data -----------------------------------------------------------------

  def _pipeline_config(self):
    import ml_collections  # pylint: disable=g-import-not-at-top
    c = self.config
    return ml_collections.ConfigDict({
        'dataset': _cfg(c, 'dataset'), 'train_split': _cfg(c, 'train_split'),
        'test_split': _cfg(c, 'test_split'), 'tfds_data_dir': _cfg(c, 'tfds_data_dir'),
        'image_size': _cfg(c, 'image_size'), 'batch_size': self.batch_size,
        'batch_size_eval': self.batch_size, 'seed': 0,
        'pp': {'eval': _cfg(c, 'pp_eval'), 'crop_fraction': float(_cfg(c, 'crop_fraction'))}})

  def _source(self, split: str):
    from vit_jax import input_pipeline  # pylint: disable=g-import-not-at-top
    c = self.config
    return input_pipeline.load_source(
        _cfg(c, 'dataset'), split, train_split=_cfg(c, 'train_split'),
        data_dir=_cfg(c, 'tfds_data_dir'))

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
    train = self._source(_cfg(self.config, 'train_split'))
    num_classes = len(train.class_names)
    if train.labels is None:
      raise FewShotError(f'{train.description} is streamed (too large to hold in memory); '
                         f'few-shot needs random access: use a smaller train_split slice.')
    rows = np.unique(np.concatenate([
        sample_shots(train.labels, num_classes, max(self.shots), s) for s in self.seeds]))
    x_pool = np.concatenate([self._features(variables, im)
                             for im, _ in self._subset_batches(train, rows)])
    xs, ys = [], []
    for images, labels, keep in self._test_batches():
      xs.append(self._features(variables, images)[keep])
      ys.append(labels[keep])
    return x_pool, rows, train.labels, np.concatenate(xs), np.concatenate(ys), num_classes

  def run(self, params: Any, batch_stats: Any = None) -> dict[str, float]:
    """Few-shot accuracies of the model with ``params`` (mean over seeds)."""
    x_pool, rows, labels_train, x_test, labels_test, num_classes = self.representations(
        params, batch_stats)
    self.last_results = fewshot_accuracies(
        x_pool, labels_train, x_test, labels_test, num_classes, shots=self.shots,
        seeds=self.seeds, l2_regs=self.l2_regs, standardize=_cfg(self.config, 'standardize'),
        train_rows=rows)
    return results_to_metrics(self.name, self.last_results, bool(_cfg(self.config, 'per_l2')))


def _floats(text: str) -> tuple[float, ...]:
  return tuple(float(v) for v in text.split(',') if v.strip())


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m vit_jax.fewshot``: few-shot accuracies of a checkpoint."""
  import argparse  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  from vit_jax import predict  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(
      prog='python -m vit_jax.fewshot',
      description='Few-shot linear evaluation (ViT paper §4.1) of a checkpoint.')
  parser.add_argument('--checkpoint', help='official-layout .npz')
  parser.add_argument('--model', help='preset name, e.g. ViT-B_16')
  parser.add_argument('--workdir', help='training workdir (its .npz and config.json)')
  parser.add_argument('--dataset', required=True, help="TFDS name, 'folder:<root>' or 'digits'")
  parser.add_argument('--train_split', default='train')
  parser.add_argument('--test_split', default='test')
  parser.add_argument('--tfds_data_dir')
  parser.add_argument('--image_size', type=int, help='default: the checkpoint\'s resolution')
  parser.add_argument('--shots', default='1,5,10,25')
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--l2_regs', default=','.join(f'{v:g}' for v in DEFAULT_L2_REGS))
  parser.add_argument('--representation', default='pre_logits',
                      help="sown layer: pre_logits, encoder_out, Transformer/block_outputs/<i>, ...")
  parser.add_argument('--pool', default='auto', choices=('auto', 'first', 'mean'))
  parser.add_argument('--standardize', default='feature', choices=('feature', 'global'))
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--json', action='store_true', help='print all results as JSON')
  parser.add_argument('--dtype', default='auto', choices=('auto', 'float32', 'bfloat16'),
                      help="computation dtype ('auto': bfloat16 on GPU/TPU, float32 on CPU)")
  args = parser.parse_args(argv)
  try:
    bundle = predict.load_bundle(args.checkpoint, args.model, args.workdir,
                                 image_size=args.image_size, dtype=args.dtype)
    config = {
        'dataset': args.dataset, 'train_split': args.train_split, 'test_split': args.test_split,
        'tfds_data_dir': args.tfds_data_dir, 'image_size': bundle.image_size,
        'shots': tuple(int(v) for v in _floats(args.shots)),
        'seeds': tuple(int(v) for v in _floats(args.seeds)), 'l2_regs': _floats(args.l2_regs),
        'representation': args.representation, 'pool': args.pool, 'standardize': args.standardize,
        'batch_size': args.batch_size, 'pp_eval': bundle.pp_eval, 'crop_fraction': bundle.crop_fraction}
    evaluator = FewShotEvaluator(config, bundle.model)
    metrics = evaluator.run(bundle.params)
  except (FewShotError, predict.PredictError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  results = evaluator.last_results
  if args.json:
    print(json.dumps({'metrics': metrics, 'results': {
        k: dataclasses.asdict(r) for k, r in results.items()}}, indent=2))
    return 0
  l2s = evaluator.l2_regs
  print(f'{evaluator.name}: few-shot accuracy of {args.representation}, mean over seeds '
        f'{evaluator.seeds}; L2 penalty chosen per seed by leave-one-out')
  print(f'{"shots":>5}  {"accuracy":>8}  {"std":>6}  chosen l2 (per seed)')
  for k, r in results.items():
    print(f'{k:>5}  {r.accuracy:8.4f}  {r.accuracy_std:6.4f}  ' +
          ', '.join(f'{v:g}' for v in r.chosen_l2))
  print('test accuracy per L2 penalty (mean over seeds):')
  print(f'{"shots":>5}  ' + ' '.join(f'{v:>7g}' for v in l2s))
  for k, r in results.items():
    print(f'{k:>5}  ' + ' '.join(f'{r.per_l2[v]:7.4f}' for v in l2s))
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
