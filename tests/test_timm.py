"""Exports load into timm with exactly the sidecar's `timm.create_model` arguments.

The comparison tests need PyTorch and timm (not dependencies of vit_jax) and
skip with the reason when they are absent; the refusals (pre_logits, hybrid,
...) run everywhere.
"""

import importlib.util
import json
import os
import shutil

import jax
import numpy as np
import pytest

from vit_jax import checkpoint, export, models

SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       'checkpoints', 'SmallViT_8-tiny_imagenet-32px.npz')
# Our float32 logits against timm's: the same math in another framework.
TOLERANCE = 1e-4


def _timm():
  """(timm, torch), or skips with the reason."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    pytest.skip('PyTorch is not installed: the timm comparison needs torch and timm '
                '(pip install torch timm).')
  if importlib.util.find_spec('timm') is None:
    pytest.skip('timm is not installed: the timm comparison needs it (pip install timm).')
  # benchmarks/train_step.py imports timm past a CPU torch + CUDA torchvision mismatch.
  path = os.path.join(os.path.dirname(SHIPPED), '..', 'benchmarks', 'train_step.py')
  spec = importlib.util.spec_from_file_location('_bench_train_step', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  timm, msg = module.import_timm()
  if timm is None:
    pytest.skip(msg)
  return timm, torch


def _config(classifier='token', **over):
  mc = models.get_config('SmallViT_8')
  mc.classifier = classifier
  mc.transformer.num_layers = 2
  for k, v in over.items():
    mc[k] = v
  return mc


def _random_params(mc, num_classes, size, seed=0):
  """Initialised params with a random head (ours is zero-initialised: all logits 0)."""
  model = models.get_model(mc, num_classes=num_classes)
  params = model.init(jax.random.PRNGKey(seed), np.zeros((1, size, size, 3), np.float32),
                      train=False)['params']
  params = jax.tree.map(np.asarray, params)
  rng = np.random.default_rng(seed)
  params['head'] = {'kernel': rng.normal(size=params['head']['kernel'].shape).astype(np.float32),
                    'bias': rng.normal(size=params['head']['bias'].shape).astype(np.float32)}
  return params


def _ours(mc, params, images):
  model = models.get_model(mc, num_classes=params['head']['bias'].shape[-1])
  return np.asarray(model.apply({'params': params}, images, train=False))


def _theirs(timm, torch, args, images):
  model = timm.create_model(**args).eval()
  with torch.no_grad():
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    return model(x).numpy()


def _export_and_compare(tmp_path, monkeypatch, mc, params, size):
  """Exports, loads into timm with the sidecar's arguments as written; max |diff|."""
  timm, torch = _timm()
  path = str(tmp_path / 'model.npz')
  pp = {'image_size': [size, size], 'pp_eval': 'resize', 'crop_fraction': 0.875}
  export.write(path, params, model_config=mc, preprocessing=pp)
  with open(tmp_path / 'model.json') as f:
    side = json.load(f)
  assert side['timm'] is not None, side.get('timm_unsupported')
  assert side['num_classes'] == params['head']['bias'].shape[-1]
  assert side['preprocessing'] == pp
  images = np.random.default_rng(1).uniform(-1, 1, (4, size, size, 3)).astype(np.float32)
  monkeypatch.chdir(tmp_path)  # the recipe names the .npz relative to its sidecar
  ours = _ours(mc, params, images)
  theirs = _theirs(timm, torch, side['timm'], images)
  diff = float(np.max(np.abs(ours - theirs)))
  print(f'max |logit diff| vs timm {timm.__version__}: {diff:.3g} '
        f'(logit scale {np.max(np.abs(ours)):.3g})')
  assert diff < TOLERANCE
  assert (ours.argmax(-1) == theirs.argmax(-1)).all()
  return side, images, ours, diff


@pytest.mark.parametrize('classifier', ['token', 'gap'])
def test_timm_matches_export(tmp_path, monkeypatch, classifier):
  mc = _config(classifier)
  params = _random_params(mc, 7, 32)
  side, images, ours, diff = _export_and_compare(tmp_path, monkeypatch, mc, params, 32)
  assert side['timm']['num_classes'] == 7 and side['timm']['act_layer'] == 'gelu_tanh'
  # The recipe's arguments matter: each one left at timm's default is caught.
  timm, torch = _timm()
  wrong = {'act_layer': 'gelu'} if classifier == 'token' else {'fc_norm': None}
  off = np.max(np.abs(ours - _theirs(timm, torch, dict(side['timm'], **wrong), images)))
  print(f'with {wrong} instead: max |logit diff| {off:.3g}')
  assert off > 10 * max(diff, 1e-7)


def test_timm_matches_shipped_checkpoint(tmp_path, monkeypatch):
  if not os.path.isfile(SHIPPED):
    pytest.skip(f'{SHIPPED} is not in this checkout.')
  mc = checkpoint.infer_model(SHIPPED)
  params = checkpoint.load(SHIPPED)
  assert checkpoint.describe(params)['num_classes'] == 200
  _export_and_compare(tmp_path, monkeypatch, mc, params, 32)


def test_timm_recipe_refused_for_pre_logits_and_hybrid(tmp_path, capsys):
  with pytest.raises(export.TimmUnsupported, match='pre_logits'):
    export.timm_recipe(_config(representation_size=16), 10, 32)
  with pytest.raises(export.TimmUnsupported, match='hybrid'):
    export.timm_recipe(models.get_config('R+Ti_16'), 10, 32)
  for name, reason in (('SL-ViT_8', 'tokenizer'), ('DeiT-Ti_8', 'distill')):
    with pytest.raises(export.TimmUnsupported, match=reason):
      export.timm_recipe(models.get_config(name), 10, 32)
  with pytest.raises(export.TimmUnsupported, match='posemb'):
    export.timm_recipe(_config(posemb='sincos2d'), 10, 32)
  # A pre_logits layer in the params counts even when the config forgot it.
  mc = _config(representation_size=16)
  params = _random_params(mc, 5, 16)
  mc.representation_size = None
  path = str(tmp_path / 'pre.npz')
  export.write(path, params, model_config=mc)
  side = checkpoint.read_sidecar(path)
  assert side['timm'] is None and 'pre_logits' in side['timm_unsupported']
  assert side['num_classes'] == 5 and side['model']['model_name'] == 'SmallViT_8'
  # Without a preprocessing record the image size comes from the position grid.
  mc = _config()
  export.write(str(tmp_path / 'tok.npz'), _random_params(mc, 5, 16), model_config=mc)
  side = checkpoint.read_sidecar(str(tmp_path / 'tok.npz'))
  assert side['timm']['img_size'] == [16, 16] and 'preprocessing' not in side
  assert side['timm']['pretrained_cfg_overlay'] == {
      'file': 'tok.npz', 'custom_load': True, 'num_classes': 5, 'input_size': [3, 16, 16],
      'mean': [0.5] * 3, 'std': [0.5] * 3, 'interpolation': 'bilinear', 'crop_pct': 1.0,
      'crop_mode': 'squash'}


def test_old_sidecar_still_reads(tmp_path):
  """A sidecar with "model" only (before num_classes/timm) still names the model."""
  shutil.copy(SHIPPED, tmp_path / 'old.npz')
  model = models.get_config('SmallViT_8').to_dict()
  (tmp_path / 'old.json').write_text(json.dumps({'model': model}, default=list))
  side = checkpoint.read_sidecar(str(tmp_path / 'old.npz'))
  assert side['model']['model_name'] == 'SmallViT_8'
  assert checkpoint.infer_model(str(tmp_path / 'old.npz')).hidden_size == 192
