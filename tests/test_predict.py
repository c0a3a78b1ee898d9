"""vit_jax.predict: probabilities equal a direct model.apply, and (acceptance)
an exported .npz of a short training run predicts exactly what the run's own
eval scored."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from vit_jax import checkpoint, hub, images, predict
from vit_jax.models import vit


def _write_digit_folder(root, per_class_train=12, per_class_test=6):
  """scikit-learn's 8x8 digits as PNG files in the image-folder layout."""
  from sklearn.datasets import load_digits
  digits = load_digits()
  images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
  counts = {}
  for image, label in zip(images, digits.target):
    n = counts.get(label, 0)
    if n >= per_class_train + per_class_test:
      continue
    counts[label] = n + 1
    split = 'train' if n < per_class_train else 'test'
    d = os.path.join(root, split, f'digit{label}')
    os.makedirs(d, exist_ok=True)
    Image.fromarray(np.repeat(image[..., None], 3, -1)).save(os.path.join(d, f'{n:03d}.png'))
  return root


def _tiny_model(num_classes=3):
  return vit.VisionTransformer(
      num_classes=num_classes, patches={'size': (4, 4)}, hidden_size=16, classifier='token',
      transformer={'mlp_dim': 32, 'num_heads': 2, 'num_layers': 1})


@pytest.fixture(scope='module')
def saved_model(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('predict')
  model = _tiny_model()
  params = jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32))['params']
  rng = np.random.default_rng(0)  # the head is zero-initialised: make the logits non-trivial
  params = jax.tree.map(lambda p: np.asarray(p) + 0.3 * rng.normal(size=p.shape).astype(np.float32),
                        params)
  path = checkpoint.save(params, str(tmp / 'model.npz'))
  (tmp / 'labels.txt').write_text('cat\ndog\nbird\n')
  os.makedirs(tmp / 'imgs' / 'sub')
  for i, size in enumerate([(32, 32), (20, 45), (64, 48)]):
    image = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp / 'imgs' / ('sub' if i == 2 else '') / f'{i}.png')
  return tmp, model, params, path


def _workdir(tmp, path, wd):
  """A workdir-like folder for the fixture's model (its config is preset-free)."""
  cfg = {'model': {'model_name': 'tiny', 'patches': {'size': [4, 4]}, 'hidden_size': 16,
                        'classifier': 'token', 'representation_size': None, 'resnet': None,
                        'transformer': {'mlp_dim': 32, 'num_heads': 2, 'num_layers': 1,
                                         'dropout_rate': 0.0, 'attention_dropout_rate': 0.0}},
             'model_name': None, 'image_size': 32, 'pp': {'eval': 'resize', 'crop_fraction': 0.875}}
  os.makedirs(wd, exist_ok=True)
  (wd / 'config.json').write_text(json.dumps(cfg))
  os.link(path, wd / 'tiny.npz')
  os.link(tmp / 'labels.txt', wd / 'labels.txt')
  return wd


def test_predict_matches_direct_apply(saved_model, capsys):
  tmp, model, params, path = saved_model
  wd = _workdir(tmp, path, tmp / 'workdir')
  assert predict.main([f'--workdir={wd}', '--json', '--top_k=3', str(tmp / 'imgs')]) == 0
  out = json.loads(capsys.readouterr().out)
  files = [str(tmp / 'imgs' / '0.png'), str(tmp / 'imgs' / '1.png'), str(tmp / 'imgs' / 'sub' / '2.png')]
  assert [o['image'] for o in out] == files  # directories expand recursively, sorted

  # Direct path: PIL decode (PNG is lossless), the eval resize, model.apply, softmax.
  import tensorflow as tf
  images = np.stack([tf.image.resize(np.asarray(Image.open(f).convert('RGB'), np.float32), (32, 32),
                                     method='bilinear').numpy() / 127.5 - 1 for f in files])
  probs = np.asarray(jax.nn.softmax(model.apply({'params': params}, images, train=False)))
  for o, p in zip(out, probs):
    got = {r['label']: r['prob'] for r in o['top_k']}
    assert sum(got.values()) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose([got[c] for c in range(3)], p, atol=1e-6)
    assert [r['label'] for r in o['top_k']] == list(np.argsort(-p))
    assert [r['name'] for r in o['top_k']] == [['cat', 'dog', 'bird'][c] for c in np.argsort(-p)]
  assert len({int(np.argmax(p)) for p in probs}) > 1 or probs.std() > 0.01  # non-trivial logits
  # The same from Python: hub.load(...).predict(paths), and the model called on a batch.
  bundle = hub.load(str(wd))
  assert bundle.predict([str(tmp / 'imgs')], k=3) == [o['top_k'] for o in out]
  # Batch by batch (one batch of images in memory): the same numbers.
  compiled = bundle._apply._cache_size()
  chunks = list(bundle.iter_probs([str(tmp / 'imgs')], batch_size=2))
  assert [files for files, _ in chunks] == [files[:2], files[2:]]
  assert bundle._apply._cache_size() == compiled + 1   # the short last batch padded: one shape
  np.testing.assert_allclose(np.concatenate([p for _, p in chunks]), probs, atol=1e-6)
  assert predict.main([f'--workdir={wd}', '--json', '--top_k=3', '--batch_size=2',
                       str(tmp / 'imgs')]) == 0
  again = json.loads(capsys.readouterr().out)   # equal up to batch-size-dependent rounding
  assert [o['image'] for o in again] == files
  for a, b in zip(again, out):
    assert [r['label'] for r in a['top_k']] == [r['label'] for r in b['top_k']]
    np.testing.assert_allclose([r['prob'] for r in a['top_k']], [r['prob'] for r in b['top_k']],
                               atol=1e-6)
  batch, raw = bundle.load_images(files)
  assert [r.shape for r in raw] == [(32, 32, 3), (20, 45, 3), (64, 48, 3)]
  np.testing.assert_allclose(bundle(batch), model.apply({'params': params}, images, train=False),
                             atol=1e-5)


def test_image_size_from_checkpoint_and_top_k(saved_model):
  _, _, _, path = saved_model
  params = checkpoint.load(path)
  import ml_collections
  mc = ml_collections.ConfigDict({'patches': {'size': (4, 4)}, 'classifier': 'token', 'resnet': None})
  assert hub.trained_image_size(params, mc) == (32, 32)
  mc.resnet = {'num_layers': (3, 4, 9)}  # R50 hybrid: the backbone downsamples 16x
  assert hub.trained_image_size(params, mc) == (512, 512)
  bundle = hub.Model(module=None, params=None, model_config=None, image_size=(32, 32),
                     labels=['a', 'b', 'c'])
  res = bundle.top_k(np.array([[0.1, 0.7, 0.2]]), 2)
  assert res == [[{'label': 1, 'name': 'b', 'prob': 0.7}, {'label': 2, 'name': 'c', 'prob': 0.2}]]


def test_predict_clear_errors(saved_model, tmp_path, capsys):
  _, _, _, path = saved_model
  bad = tmp_path / 'broken.jpg'
  bad.write_bytes(b'not an image')
  (tmp_path / 'two.txt').write_text('a\nb\n')
  assert predict.main([f'--checkpoint={tmp_path}/missing.npz', '--model=ViT-B_16', str(bad)]) == 1
  assert capsys.readouterr().err.startswith('ERROR (HubError): Checkpoint not found')
  assert predict.main([str(bad)]) == 1
  err = capsys.readouterr().err
  assert err.startswith('ERROR (PredictError): ') and 'Pass --workdir=DIR, or --checkpoint=PATH.npz' in err
  os.makedirs(tmp_path / 'empty')
  with pytest.raises(hub.HubError, match='Checkpoint .* is a directory'):
    hub.load(str(tmp_path))
  with pytest.raises(hub.HubError, match='Label file .* has 2 names but the model has 3'):
    cfg = tmp_path / 'wd'
    os.makedirs(cfg)
    (cfg / 'config.json').write_text(json.dumps({
        'model': {'model_name': 'm', 'patches': {'size': [4, 4]}, 'hidden_size': 16, 'classifier': 'token',
                   'transformer': {'mlp_dim': 32, 'num_heads': 2, 'num_layers': 1}}, 'image_size': 32}))
    os.link(path, cfg / 'm.npz')
    hub.load(str(cfg), labels=str(tmp_path / 'two.txt'))
  bundle = hub.load(str(cfg))
  with pytest.raises(images.ImageError, match=r"Cannot decode image file '.*broken.jpg'"):
    bundle.load_images([str(bad)])
  with pytest.raises(images.ImageError, match='neither an image file nor a directory'):
    bundle.load_images([str(tmp_path / 'nope.jpg')])
  assert predict.main([f'--workdir={cfg}', str(tmp_path / 'empty')]) == 1
  assert capsys.readouterr().err.startswith('ERROR (ImageError): No image files')


def test_unreadable_files_do_not_stop_the_others(saved_model, tmp_path, capsys):
  """A folder with broken files among good ones: every readable image gets the
  same prediction as alone, the broken ones are named in one error, exit 1."""
  tmp, _, _, path = saved_model
  folder = tmp_path / 'mixed'
  shutil.copytree(tmp / 'imgs', folder)
  (folder / '00_empty.png').write_bytes(b'')
  (folder / '1a_broken.jpg').write_bytes(b'not an image')
  wd = _workdir(tmp, path, tmp_path / 'wd')
  args = [f'--workdir={wd}', '--json', '--top_k=3', '--batch_size=2']
  assert predict.main(args + [str(tmp / 'imgs')]) == 0
  clean = json.loads(capsys.readouterr().out)
  assert predict.main(args + [str(folder)]) == 1
  captured = capsys.readouterr()
  out = json.loads(captured.out)
  good = [o for o in out if 'top_k' in o]
  assert [os.path.relpath(o['image'], folder) for o in good] == ['0.png', '1.png', 'sub/2.png']
  for a, b in zip(good, clean):   # Batches regrouped around the broken files: same numbers.
    np.testing.assert_allclose([r['prob'] for r in a['top_k']], [r['prob'] for r in b['top_k']],
                               atol=1e-6)
  assert [(os.path.basename(o['image']), o['error'].split(':')[0]) for o in out if 'error' in o] == [
      ('00_empty.png', f"Cannot decode image file '{folder}/00_empty.png'"),
      ('1a_broken.jpg', f"Cannot decode image file '{folder}/1a_broken.jpg'")]
  assert captured.err.startswith('ERROR (ImageError): 2 of 5 image files could not be used '
                                 '(the others are printed above): ')
  assert '00_empty.png' in captured.err and 'empty file (0 bytes)' in captured.err
  # Only broken files: nothing printed but the error.
  assert predict.main(args[:1] + [str(folder / '1a_broken.jpg')]) == 1
  captured = capsys.readouterr()
  assert captured.out == '' and captured.err.startswith(
      'ERROR (ImageError): 1 of 1 image files could not be used: Cannot decode')
  # From Python, strict by default.
  bundle = hub.load(str(wd))
  with pytest.raises(images.ImageError, match='00_empty.png'):
    list(bundle.iter_images([str(folder)]))


def test_cli_text_output_with_preset(tmp_path, capsys):
  from vit_jax import models
  model = models.get_model('testing', num_classes=2)
  params = jax.jit(model.init)(jax.random.PRNGKey(1), np.zeros((1, 32, 32, 3), np.float32))['params']
  params['head']['bias'] = np.array([0.0, np.log(3.0)], np.float32)  # p = (0.25, 0.75) exactly
  checkpoint.save(params, str(tmp_path / 'm.npz'))
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'x.png')
  (tmp_path / 'l.txt').write_text('no\nyes\n')
  assert predict.main([f'--checkpoint={tmp_path}/m.npz', '--model=testing', f'--labels={tmp_path}/l.txt',
                       str(tmp_path / 'x.png')]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines == [str(tmp_path / 'x.png'), '    0.7500  yes  (1)', '    0.2500  no  (0)']
  # --image_size: position embeddings resampled as for fine-tuning (8x8 -> 12x12 grid)
  bundle = hub.load(str(tmp_path / 'm.npz'), model='testing', image_size=48)
  assert bundle.image_size == (48, 48)
  np.testing.assert_array_equal(
      bundle.params['Transformer']['posembed_input']['pos_embedding'],
      checkpoint.interpolate_posembed(params['Transformer']['posembed_input']['pos_embedding'],
                                      1 + 12 * 12, has_class_token=True))


def test_exported_npz_predicts_what_training_evaluated(tmp_path, capsys):
  """Acceptance (issue 5): train briefly, export a step from orbax, predict the
  test folder through the workdir: same accuracy and loss as training's eval."""
  import ml_collections

  from configs import quickstart
  from vit_jax import export, train

  data = _write_digit_folder(str(tmp_path / 'digits'))
  c = quickstart.get_config()  # its schema and optimizer; the rest is pinned here
  c.pretrained_path = None
  c.scratch_baseline = None
  c.dataset = f'folder:{data}'
  c.model_name = None
  c.model = ml_collections.ConfigDict({
      'model_name': 'vit-digits', 'patches': {'size': (4, 4)}, 'hidden_size': 32,
      'transformer': {'mlp_dim': 64, 'num_heads': 2, 'num_layers': 2, 'dropout_rate': 0.0,
                      'attention_dropout_rate': 0.0},
      'classifier': 'token', 'representation_size': None, 'resnet': None})
  c.image_size = 16
  c.pp.train = 'resize'
  c.pp.eval = 'resize'
  c.total_steps = 24
  c.batch_size = 32
  c.batch_size_eval = 32  # 60 test images: the last batch is padded
  c.eval_every = 0
  c.checkpoint_every = 12
  c.log_every = 12
  # Few-shot evaluation inside training (config.evals.fewshot), at step 12 and at the end.
  c.evals = {'fewshot': {'type': 'fewshot', 'dataset': f'folder:{data}', 'image_size': 16, 'shots': (1, 5),
                         'seeds': (0, 1), 'batch_size': 32, 'every': 12}}
  wd = str(tmp_path / 'workdir')
  metrics = train.run(c, wd).metrics

  # Export from the orbax checkpoint (not training's own .npz) ...
  step, out = export.export(wd, str(tmp_path / 'exported.npz'))
  assert step == 24
  a, b = checkpoint.load_flat(out), checkpoint.load_flat(os.path.join(wd, 'vit-digits.npz'))
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  # ... and predict the test folder through the workdir (config.json, labels.txt).
  assert predict.main([f'--workdir={wd}', f'--checkpoint={out}', '--json', '--top_k=10',
                       os.path.join(data, 'test')]) == 0
  out_json = json.loads(capsys.readouterr().out)
  assert len(out_json) == int(metrics['num_test_examples']) == 60
  correct, losses = [], []
  for o in out_json:
    truth = os.path.basename(os.path.dirname(o['image']))
    probs = {r['name']: r['prob'] for r in o['top_k']}
    correct.append(o['top_k'][0]['name'] == truth)
    losses.append(-np.log(probs[truth]))
  assert np.mean(correct) == pytest.approx(metrics['accuracy_test'], abs=1e-9)
  assert np.mean(losses) == pytest.approx(metrics['loss_test'], abs=1e-5)
  assert metrics['accuracy_test'] > 0.2  # it learned something in 24 steps (chance 0.1)

  # The few-shot numbers training logged are those of the exported model.
  from vit_jax import evaluators
  bundle = hub.load(wd, checkpoint=out)
  standalone = evaluators.FewShotEvaluator(c.evals.fewshot, bundle.module).run(bundle.params)
  assert set(standalone) == {'fewshot/digits_1shot', 'fewshot/digits_5shot'}
  for k, v in standalone.items():
    assert metrics[k] == pytest.approx(v, abs=1e-9), k


def test_batchnorm_model_uses_its_batch_stats(tmp_path, capsys):
  """ResNet-style models (RPT report's ResNet-56) need batch_stats at inference."""
  from vit_jax import models
  cfg = {'model_type': 'resnet_cifar', 'model_name': 'resnet8', 'blocks_per_stage': 1,
         'widths': [4, 8, 8]}
  model = models.get_model(dict(cfg), num_classes=3)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda v: np.asarray(v) + rng.uniform(0.1, 0.5, v.shape).astype(np.float32),
                           variables)  # non-trivial running statistics and head
  wd = tmp_path / 'wd'
  os.makedirs(wd)
  checkpoint.save(variables['params'], str(wd / 'resnet8.npz'), batch_stats=variables['batch_stats'])
  (wd / 'config.json').write_text(json.dumps({'model': cfg, 'image_size': 16}))
  image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
  Image.fromarray(image).save(tmp_path / 'x.png')
  assert predict.main([f'--workdir={wd}', '--json', '--top_k=3', str(tmp_path / 'x.png')]) == 0
  got = {r['label']: r['prob'] for r in json.loads(capsys.readouterr().out)[0]['top_k']}
  want = jax.nn.softmax(model.apply(variables, image[None].astype(np.float32) / 127.5 - 1, train=False))
  np.testing.assert_allclose([got[c] for c in range(3)], np.asarray(want)[0], atol=1e-6)
