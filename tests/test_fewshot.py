"""Few-shot linear evaluation (ViT paper §4.1): the closed-form solver against
a direct solve of the same ridge problem, leave-one-out against brute force,
and a separable case that must score 100%."""

import os

import numpy as np
import pytest

from vit_jax import evaluators, fewshot, linear_probe


def _direct_ridge(x, labels, num_classes, l2):
  """The same ridge problem, written out and solved with numpy.linalg.solve."""
  mean = x.mean(0, keepdims=True)
  std = np.maximum(x.std(0, keepdims=True), 1e-5)
  xd = np.concatenate([(x - mean) / std, np.full((len(x), 1), linear_probe.BIAS_VALUE)], 1)
  y = 2.0 * np.eye(num_classes)[labels] - 1.0
  w = np.linalg.solve(xd.T @ xd + l2 * np.eye(xd.shape[1]), xd.T @ y)
  return w, xd, y, mean, std


@pytest.mark.parametrize('n,d', [(60, 8), (7, 40)])  # primal (N > D) and dual (N < D)
@pytest.mark.parametrize('l2', [0.25, 16.0, 4096.0])
def test_weights_match_direct_solve(n, d, l2):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, d)) * rng.uniform(0.1, 3, size=d) + rng.normal(size=d)
  labels = rng.integers(0, 4, size=n)
  cache = linear_probe.ridge_precompute(x, labels, 4)
  w_direct, *_ = _direct_ridge(x, labels, 4, l2)
  np.testing.assert_allclose(linear_probe.ridge_weights(cache, l2), w_direct, atol=1e-5, rtol=1e-5)
  x_test = rng.normal(size=(30, d))
  w_direct, _, _, mean, std = _direct_ridge(x, labels, 4, l2)
  xd_test = np.concatenate([(x_test - mean) / std, np.full((30, 1), linear_probe.BIAS_VALUE)], 1)
  np.testing.assert_allclose(linear_probe.ridge_predict(cache, linear_probe.ridge_weights(cache, l2), x_test),
                             xd_test @ w_direct, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('n,d', [(40, 6), (6, 20)])
def test_leave_one_out_matches_refitting(n, d):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(n, d))
  labels = rng.integers(0, 3, size=n)
  cache = linear_probe.ridge_precompute(x, labels, 3)
  _, xd, y, _, _ = _direct_ridge(x, labels, 3, 1.0)
  for l2 in (0.5, 50.0):
    preds = []
    for i in range(n):  # refit without example i (standardisation kept fixed)
      keep = np.arange(n) != i
      w = np.linalg.solve(xd[keep].T @ xd[keep] + l2 * np.eye(d + 1), xd[keep].T @ y[keep])
      preds.append(xd[i] @ w)
    preds = np.array(preds)
    acc, mse = linear_probe.ridge_loo(cache, l2)
    assert acc == pytest.approx(np.mean(preds.argmax(1) == labels), abs=1e-12)
    assert mse == pytest.approx(np.mean((preds - y) ** 2), rel=1e-8)


def test_protocol_accuracy_per_l2_matches_direct_solution():
  rng = np.random.default_rng(2)
  num_classes, d = 5, 12
  centres = rng.normal(size=(num_classes, d))
  labels_train = np.repeat(np.arange(num_classes), 30)
  x_train = centres[labels_train] + 1.5 * rng.normal(size=(len(labels_train), d))
  labels_test = rng.integers(0, num_classes, size=200)
  x_test = centres[labels_test] + 1.5 * rng.normal(size=(200, d))
  l2s = (1.0, 64.0)
  res = linear_probe.fewshot_accuracies(x_train, labels_train, x_test, labels_test, num_classes,
                                   shots=(2, 10), seeds=(0, 3), l2_regs=l2s)
  for k in (2, 10):
    for l2 in l2s:
      accs = []
      for seed in (0, 3):
        idx = linear_probe.sample_shots(labels_train, num_classes, k, seed)
        w, _, _, mean, std = _direct_ridge(x_train[idx], labels_train[idx], num_classes, l2)
        xd = np.concatenate([(x_test - mean) / std, np.full((200, 1), linear_probe.BIAS_VALUE)], 1)
        accs.append(np.mean((xd @ w).argmax(1) == labels_test))
      assert res[k].per_l2[l2] == pytest.approx(np.mean(accs), abs=1e-12)
    # the penalty is the one with the lowest leave-one-out squared error, and
    # the reported accuracy is the test accuracy at that penalty
    for seed, seed_acc, l2 in zip((0, 3), res[k].per_seed, res[k].chosen_l2):
      idx = linear_probe.sample_shots(labels_train, num_classes, k, seed)
      cache = linear_probe.ridge_precompute(x_train[idx], labels_train[idx], num_classes)
      assert l2 == min(l2s, key=lambda v: linear_probe.ridge_loo(cache, v)[1])
      assert seed_acc == linear_probe.ridge_accuracy(cache, l2, x_test, labels_test)
  assert res[10].accuracy > 0.5  # 5 classes, chance is 0.2


@pytest.mark.parametrize('standardize,centres', [
    # every feature informative: per-feature standardisation (the default)
    ('feature', 10.0 * np.random.default_rng(4).normal(size=(10, 32))),
    # signal in 10 of 32 features: at 1 shot per-feature standardisation would
    # blow the 22 pure-noise features up to unit variance; 'global' does not
    ('global', 10.0 * np.eye(10, 32)),
])
def test_separable_classes_score_100_percent(standardize, centres):
  rng = np.random.default_rng(3)
  num_classes, d = 10, 32
  labels_train = np.repeat(np.arange(num_classes), 40)
  x_train = centres[labels_train] + 0.3 * rng.normal(size=(len(labels_train), d))
  labels_test = np.repeat(np.arange(num_classes), 50)
  x_test = centres[labels_test] + 0.3 * rng.normal(size=(len(labels_test), d))
  res = linear_probe.fewshot_accuracies(x_train, labels_train, x_test, labels_test, num_classes,
                                   shots=(1, 5, 10, 25), seeds=(0, 1, 2),
                                   standardize=standardize)
  for k, r in res.items():
    assert r.accuracy == 1.0, (k, r)
  metrics = linear_probe.results_to_metrics('synthetic', res)
  assert metrics == {f'fewshot/synthetic_{k}shot': 1.0 for k in (1, 5, 10, 25)}


def test_sample_shots_nested_and_balanced():
  labels = np.repeat(np.arange(3), 10)
  a = linear_probe.sample_shots(labels, 3, 2, seed=7)
  b = linear_probe.sample_shots(labels, 3, 5, seed=7)
  assert np.bincount(labels[a]).tolist() == [2, 2, 2]
  assert np.bincount(labels[b]).tolist() == [5, 5, 5]
  assert set(a) <= set(b)
  assert not np.array_equal(a, linear_probe.sample_shots(labels, 3, 2, seed=8))


def test_clear_errors():
  labels = np.array([0, 0, 1])
  with pytest.raises(linear_probe.FewShotError, match='Class 1 has 1 training example'):
    linear_probe.sample_shots(labels, 2, 2, seed=0)
  with pytest.raises(linear_probe.FewShotError, match=r'Labels must lie in \[0, 2\)'):
    linear_probe.ridge_precompute(np.zeros((3, 4)), np.array([0, 1, 2]), 2)
  with pytest.raises(linear_probe.FewShotError, match='NaN or Inf'):
    linear_probe.ridge_precompute(np.full((3, 4), np.nan), labels, 2)
  with pytest.raises(linear_probe.FewShotError, match='must be > 0'):
    linear_probe.ridge_weights(linear_probe.ridge_precompute(np.eye(3), labels, 2), 0.0)


def test_evaluator_matches_direct_solution_on_digits():
  """FewShotEvaluator end to end (data, sown layer, probe) vs a direct path."""
  import jax
  import ml_collections

  from vit_jax import input_pipeline
  from vit_jax.models import vit

  model = vit.VisionTransformer(
      num_classes=10, patches={'size': (4, 4)}, hidden_size=32, classifier='token',
      transformer={'mlp_dim': 64, 'num_heads': 2, 'num_layers': 1})
  params = jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32))['params']
  cfg = {'dataset': 'digits', 'image_size': 16, 'shots': (1, 5), 'seeds': (0, 1), 'l2_regs': (1.0, 64.0),
             'batch_size': 128, 'per_l2': True}
  ev = evaluators.FewShotEvaluator(cfg, model)
  metrics = ev.run(params)
  assert set(metrics) == {'fewshot/digits_1shot', 'fewshot/digits_5shot',
                          'fewshot/digits_1shot_l2=1', 'fewshot/digits_1shot_l2=64',
                          'fewshot/digits_5shot_l2=1', 'fewshot/digits_5shot_l2=64'}

  # Direct path: every image through the training eval pipeline and vit's own
  # intermediates helper, then numpy.linalg.solve of the ridge problem.
  def embed(split):
    c = ml_collections.ConfigDict({'dataset': 'digits', 'image_size': 16, 'batch_size': 128,
                                       'train_split': 'train', 'test_split': 'test'})
    xs, ys = [], []
    rep = jax.jit(lambda x: vit.get_intermediates(model, params, x)[1]['representation'])
    for b in input_pipeline.make_eval_iter(c, split, process_index=0, process_count=1):
      keep = b['mask'] > 0
      xs.append(np.asarray(rep(b['image']))[keep])
      ys.append(b['label'][keep])
    return np.concatenate(xs), np.concatenate(ys)

  x_train, y_train = embed('train')
  x_test, y_test = embed('test')
  x_pool, rows, labels_all, x_test_ev, y_test_ev, _ = ev.representations(params)
  np.testing.assert_array_equal(labels_all, y_train)
  np.testing.assert_allclose(x_pool, x_train[rows], atol=1e-5)
  np.testing.assert_allclose(x_test_ev, x_test, atol=1e-5)
  np.testing.assert_array_equal(y_test_ev, y_test)
  for k in (1, 5):
    for l2 in (1.0, 64.0):
      accs = []
      for seed in (0, 1):
        idx = linear_probe.sample_shots(y_train, 10, k, seed)
        w, _, _, mean, std = _direct_ridge(x_train[idx].astype(np.float64), y_train[idx], 10, l2)
        cache = linear_probe.ridge_precompute(x_pool[np.searchsorted(rows, idx)], y_train[idx], 10)
        np.testing.assert_allclose(linear_probe.ridge_weights(cache, l2), w, atol=1e-5, rtol=1e-5)
        xd = np.concatenate([(x_test - mean) / std, np.full((len(x_test), 1), linear_probe.BIAS_VALUE)], 1)
        accs.append(np.mean((xd @ w).argmax(1) == y_test))
      assert metrics[f'fewshot/digits_{k}shot_l2={l2:g}'] == pytest.approx(np.mean(accs), abs=1e-9)
  assert metrics['fewshot/digits_5shot'] > 0.2  # random features still beat chance (0.1)


def test_evaluator_errors():
  with pytest.raises(linear_probe.FewShotError, match=r'evals.<name>.image_size is required'):
    evaluators.FewShotEvaluator({'dataset': 'digits'}, model=None)
  flat = {'encoder_out': 1, 'Transformer/block_outputs/0': 2, 'representation': 3}
  assert evaluators.select_representation(flat, 'pre_logits') == 3
  assert evaluators.select_representation(flat, 'block_outputs/0') == 2
  with pytest.raises(linear_probe.FewShotError, match="'head' was not sown by the model. Sown layers"):
    evaluators.select_representation(flat, 'head')


def test_cli_json_equals_evaluator(tmp_path, capsys):
  import json

  import jax

  from vit_jax import checkpoint, hub, models
  model = models.get_model('testing', num_classes=10)
  params = jax.jit(model.init)(jax.random.PRNGKey(2), np.zeros((1, 32, 32, 3), np.float32))['params']
  checkpoint.save(params, str(tmp_path / 'm.npz'))
  args = [f'--checkpoint={tmp_path}/m.npz', '--model=testing', '--dataset=digits', '--image_size=16',
          '--shots=2,5', '--seeds=3', '--l2_regs=1,100', '--test_split=test[:100]']
  assert fewshot.main([*args, '--json']) == 0
  out = json.loads(capsys.readouterr().out)
  bundle = hub.load(f'{tmp_path}/m.npz', model='testing', image_size=16)
  ev = evaluators.FewShotEvaluator(
      {'dataset': 'digits', 'image_size': 16, 'shots': (2, 5), 'seeds': (3,), 'l2_regs': (1.0, 100.0),
       'test_split': 'test[:100]'}, bundle.module)
  assert out['metrics'] == ev.run(bundle.params)
  assert out['results']['5']['chosen_l2'][0] in (1.0, 100.0)
  assert fewshot.main([*args]) == 0
  text = capsys.readouterr().out
  assert text.startswith('digits: few-shot accuracy of pre_logits')
  row = next(line for line in text.splitlines() if line.startswith('    5  '))
  assert float(row.split()[1]) == pytest.approx(out['metrics']['fewshot/digits_5shot'], abs=1e-4)


def _checkpoint_and_two_colour_folder(tmp_path, name, *, train, test, shape, ext):
  """tmp_path/m.npz (the 'testing' preset) and tmp_path/<name>/{train,test}/c{0,1}:
  noisy red and blue images, `train` and `test` per class."""
  import jax
  from PIL import Image

  from vit_jax import checkpoint, models
  model = models.get_model('testing', num_classes=10)
  params = jax.jit(model.init)(jax.random.PRNGKey(2), np.zeros((1, 32, 32, 3), np.float32))['params']
  checkpoint.save(params, str(tmp_path / 'm.npz'))
  rng = np.random.default_rng(0)
  for split, n in (('train', train), ('test', test)):
    for c, colour in enumerate(((200, 30, 30), (30, 30, 200))):
      (tmp_path / name / split / f'c{c}').mkdir(parents=True)
      for i in range(n):
        pixels = np.clip(rng.normal(colour, 40, shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / name / split / f'c{c}' / f'{i}.{ext}')


def test_cli_on_a_folder_of_jpegs(tmp_path, capsys):
  """The CLI passes the model's (h, w) resolution to the folder pipeline, whose
  JPEG decoding picks its DCT scale from it: the same numbers as an int size."""
  import json

  from vit_jax import hub
  # Images large enough for a reduced DCT scale at 16px.
  _checkpoint_and_two_colour_folder(tmp_path, 'data', train=6, test=3, shape=(160, 200, 3),
                                    ext='jpg')
  args = [f'--checkpoint={tmp_path}/m.npz', '--model=testing', f'--dataset=folder:{tmp_path}/data',
          '--image_size=16', '--shots=1,5', '--seeds=0', '--json']
  assert fewshot.main(args) == 0
  out = json.loads(capsys.readouterr().out)['metrics']
  bundle = hub.load(f'{tmp_path}/m.npz', model='testing', image_size=16)
  assert bundle.image_size == (16, 16)
  ev = evaluators.FewShotEvaluator(
      {'dataset': f'folder:{tmp_path}/data', 'image_size': 16, 'shots': (1, 5), 'seeds': (0,)},
      bundle.module)
  assert out == ev.run(bundle.params)
  assert 0.5 <= out['fewshot/data_5shot'] <= 1.0, out   # Two colours: easy.


def test_undecodable_images_are_listed_or_left_out(tmp_path, capsys, monkeypatch):
  """A folder with a corrupt file among the drawn shots and one in the test
  split: without --skip_bad_images the CLI stops naming both (one error, no
  traceback); with it, both are left out, every class still gets its shots,
  and the accuracy equals the run on the same folder without those files."""
  import shutil

  from vit_jax import hub
  _checkpoint_and_two_colour_folder(tmp_path, 'clean', train=3, test=3, shape=(24, 24, 3),
                                    ext='png')
  shutil.copytree(tmp_path / 'clean', tmp_path / 'dirty')
  for bad in ('train/c0/0_bad.png', 'test/c1/9_bad.png'):   # 3 shots of 3 (+1 bad): drawn.
    (tmp_path / 'dirty' / bad).write_bytes(b'not a png')
  args = [f'--checkpoint={tmp_path}/m.npz', '--model=testing', '--image_size=16',
          '--shots=1,3', '--seeds=0,1', '--json']
  assert fewshot.main([*args, f'--dataset=folder:{tmp_path}/dirty']) == 1
  err = capsys.readouterr().err
  assert '2 image file(s) cannot be decoded' in err and 'Traceback' not in err
  assert '0_bad.png' in err and '9_bad.png' in err and '--skip_bad_images' in err
  assert fewshot.main([*args, f'--dataset=folder:{tmp_path}/dirty', '--skip_bad_images']) == 0
  import json
  dirty = json.loads(capsys.readouterr().out)
  assert fewshot.main([*args, f'--dataset=folder:{tmp_path}/clean']) == 0
  clean = json.loads(capsys.readouterr().out)
  assert dirty['results'] == clean['results']   # Same draw, same features, same fits.
  bundle = hub.load(f'{tmp_path}/m.npz', model='testing', image_size=16)
  ev = evaluators.FewShotEvaluator(   # The loop's way: the entry asks for it.
      {'dataset': f'folder:{tmp_path}/dirty', 'image_size': 16, 'shots': (1, 3), 'seeds': (0, 1),
       'skip_bad_images': True}, bundle.module)
  assert list(ev.run(bundle.params).values()) == list(clean['metrics'].values())
  from vit_jax import input_pipeline
  decoded = []   # A second evaluation (the loop's next one) decodes nothing again.
  real_check = input_pipeline.check_images
  monkeypatch.setattr(input_pipeline, 'check_images',
                      lambda paths, *a, **k: decoded.extend(paths) or real_check(paths, *a, **k))
  assert list(ev.run(bundle.params).values()) == list(clean['metrics'].values())
  assert decoded == []
  assert sorted(os.path.basename(p) for p in ev._skipped) == ['0_bad.png', '9_bad.png']
