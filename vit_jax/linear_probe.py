"""Few-shot linear probes on frozen representations (ViT paper, §4.1 "Metrics"): the math.

The paper measures representations by "solving a regularized least-squares
regression problem that maps the (frozen) representation of a subset of
training images to target vectors", which has an exact closed-form solution and
is cheap enough to run during training. Pure numpy, in three layers:

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
3. The model side lives elsewhere: ``evaluators.FewShotEvaluator`` (run by the
   training loop for a ``config.evals`` entry of type ``fewshot``, and by the
   ``python -m vit_jax.fewshot`` CLI) extracts the representation of a
   ``sow``-ed layer (``pre_logits`` by default) and calls this module.

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
from collections.abc import Mapping, Sequence

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
