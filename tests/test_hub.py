"""vit_jax.hub: one loader for names, files, URLs and training workdirs; the
import structure it made possible."""

import ast
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from conftest import REPO, SHIPPED

from vit_jax import checkpoint, download, hub, models
from vit_jax.workdir import Workdir



# ---------------------------------------------------------------------------
# Imports: no cycles, nothing reaches back up into the loop.
# ---------------------------------------------------------------------------

def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(REPO).with_suffix('').parts)
  if parts[-1] == '__init__':
    parts.pop()
  return '.'.join(parts)


def _import_graph() -> dict[str, set[str]]:
  """{module: vit_jax modules it imports}, function-level imports included."""
  files = {_module_name(p): p for p in (REPO / 'vit_jax').rglob('*.py')}
  graph = {}
  for name, path in files.items():
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        deps.update(a.name for a in node.names if a.name.startswith('vit_jax'))
      elif isinstance(node, ast.ImportFrom) and (node.module or '').startswith('vit_jax'):
        for a in node.names:  # `from vit_jax import x`: the submodule x if there is one.
          sub = f'{node.module}.{a.name}'
          deps.add(sub if sub in files else node.module)
    graph[name] = deps - {name}
  return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle of `graph` as [a, b, ..., a], or None (depth-first search)."""
  state, stack = {}, []

  def visit(m):
    state[m] = 'open'
    stack.append(m)
    for d in sorted(graph.get(m, ())):
      if state.get(d) == 'open':
        return stack[stack.index(d):] + [d]
      if d not in state:
        found = visit(d)
        if found:
          return found
    stack.pop()
    state[m] = 'done'
    return None

  for m in sorted(graph):
    if m not in state:
      found = visit(m)
      if found:
        return found
  return None


def test_no_import_cycles_and_only_the_launchers_import_the_loop():
  graph = _import_graph()
  assert {'vit_jax.hub', 'vit_jax.train', 'vit_jax.evaluators'} <= set(graph)
  # Only the launchers (main: one run; sweep: one run per learning rate) import the loop.
  assert sorted(m for m, deps in graph.items() if 'vit_jax.train' in deps) == [
      'vit_jax.main', 'vit_jax.sweep']
  assert _find_cycle(graph) is None, ' -> '.join(_find_cycle(graph))
  # The checker can fail: a planted cycle is found.
  graph['vit_jax.checkpoint'] = graph['vit_jax.checkpoint'] | {'vit_jax.hub'}
  assert _find_cycle(graph) in (['vit_jax.checkpoint', 'vit_jax.hub', 'vit_jax.checkpoint'],
                                ['vit_jax.hub', 'vit_jax.checkpoint', 'vit_jax.hub'])


# ---------------------------------------------------------------------------
# Files and names.
# ---------------------------------------------------------------------------

def test_a_file_needs_no_model_name_and_gives_its_labels():
  model = hub.load(str(SHIPPED))
  assert model.model_config.model_name == 'SmallViT_8' and model.image_size == (32, 32)
  assert model.num_classes == 200 and len(model.labels) == 200  # <name>.labels.txt beside it
  assert model.pp_eval == 'resize' and model.crop_fraction == hub.CROP_FRACTION
  x = jnp.zeros((2, 32, 32, 3))
  assert model.module.apply(model.variables, x, train=False).shape == (2, 200)


def test_num_classes_gives_the_fine_tuning_start(tmp_path):
  """hub.load(..., num_classes=N) is what training starts a fine-tune from
  (checkpoint.load_pretrained): the file's body, a zero head of N classes,
  here also at a new resolution (posembs resized)."""
  model = hub.load(str(SHIPPED), num_classes=7, image_size=40, labels=list('abcdefg'))
  assert model.num_classes == 7 and model.labels == list('abcdefg')
  head = model.params['head']
  assert head['kernel'].shape == (192, 7) and not np.any(head['kernel']) and not np.any(head['bias'])
  module = models.get_model('SmallViT_8', num_classes=7)
  init = jax.jit(module.init)(jax.random.PRNGKey(1), jnp.zeros((1, 40, 40, 3)))['params']
  tuned = checkpoint.load_pretrained(str(SHIPPED), jax.tree.map(np.asarray, init),
                                     models.get_config('SmallViT_8'))
  _same(model.params, tuned)
  probs = model.probs(np.zeros((2, 40, 40, 3), np.float32))
  np.testing.assert_allclose(probs, 1 / 7, rtol=1e-6)   # a zero head: uniform
  assert hub.load(str(SHIPPED), num_classes=7).labels is None   # the file's 200 names do not apply
  same = hub.load(str(SHIPPED), num_classes=200)   # the file's own count: its own head
  _same(same.params, hub.load(str(SHIPPED)).params)
  with pytest.raises(hub.HubError, match='num_classes must be positive'):
    hub.load(str(SHIPPED), num_classes=0)


def test_errors_are_hub_errors_with_the_reason(tmp_path):
  with pytest.raises(hub.HubError, match='Name a model'):
    hub.load('')
  with pytest.raises(hub.HubError, match='Checkpoint not found'):
    hub.load(str(tmp_path / 'missing.npz'))
  with pytest.raises(hub.HubError, match='does not fit the model ViT-Ti_16.*a SmallViT_8'):
    hub.load(str(SHIPPED), model='ViT-Ti_16')
  with pytest.raises(hub.HubError, match='step=3 needs a training workdir'):
    hub.load(str(SHIPPED), step=3)
  with pytest.raises(hub.HubError, match='multiple of its 8x8 patches'):
    hub.load(str(SHIPPED), image_size=30)
  with pytest.raises(hub.HubError, match='has 2 names but the model has 200'):
    hub.load(str(SHIPPED), labels=['a', 'b'])


def test_a_deit_runs_at_a_new_resolution(tmp_path):
  """Two prefix tokens (class + distillation) are kept through the posemb resize
  that fine-tuning uses: the case predict used to refuse."""
  cfg = models.get_config('testing')
  cfg.classifier = 'distill'
  module = models.get_model(cfg, num_classes=3)
  params = jax.jit(module.init)(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))['params']
  path = checkpoint.save(params, str(tmp_path / 'deit.npz'))
  model = hub.load(path, model=cfg, image_size=24)
  pos = params['Transformer']['posembed_input']['pos_embedding']
  assert pos.shape == (1, 2 + 16, 64)
  want = checkpoint.interpolate_posembed(np.asarray(pos), 2 + 36, 2)
  got = model.params['Transformer']['posembed_input']['pos_embedding']
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got[:, :2], pos[:, :2])  # the prefix tokens kept as they were
  assert model.module.apply(model.variables, jnp.ones((1, 24, 24, 3))).shape == (1, 3)
  # The same resize fine-tuning applies (checkpoint.load_pretrained).
  init = jax.jit(module.init)(jax.random.PRNGKey(1), jnp.zeros((1, 24, 24, 3)))['params']
  tuned = checkpoint.load_pretrained(path, jax.tree.map(np.asarray, init), cfg)
  np.testing.assert_array_equal(tuned['Transformer']['posembed_input']['pos_embedding'], want)


# ---------------------------------------------------------------------------
# Training workdirs: the export or any orbax step, with the run's labels and
# preprocessing.
# ---------------------------------------------------------------------------

@pytest.fixture
def workdir(tmp_path):
  """A workdir as vit_jax.train writes it: config.json, labels.txt, two orbax
  steps (the later with a Polyak average) and the export of the last."""
  module = models.get_model('testing', num_classes=3)
  wd = Workdir(tmp_path / 'run')
  (tmp_path / 'run').mkdir()
  (tmp_path / 'run' / 'config.json').write_text(json.dumps({
      'model_name': 'testing', 'image_size': 16,
      'pp': {'eval': 'resize_crop', 'crop_fraction': 0.5}}))
  wd.write_labels(['cat', 'dog', 'bird'])
  mgr = ocp.CheckpointManager(wd.checkpoints_dir, options=ocp.CheckpointManagerOptions(create=True))
  states = {}
  for step in (3, 6):
    params = jax.jit(module.init)(jax.random.PRNGKey(step), jnp.zeros((1, 16, 16, 3)))['params']
    params = jax.tree.map(lambda p: p + 0.01 * step, params)  # a head that is not zero
    states[step] = {'step': jnp.asarray(step), 'params': params,
                    'opt_state': optax.sgd(0.1, momentum=0.9).init(params)}
    if step == 6:
      states[step]['polyak'] = jax.tree.map(lambda p: p * 0.5, params)
    mgr.save(step, args=ocp.args.StandardSave(states[step]))
  mgr.wait_until_finished()
  mgr.close()
  checkpoint.save(jax.tree.map(np.asarray, states[6]['polyak']), wd.export_path())
  return wd, states


def _same(a, b):
  fa, fb = checkpoint.flatten(jax.tree.map(np.asarray, a)), checkpoint.flatten(
      jax.tree.map(np.asarray, b))
  assert set(fa) == set(fb)
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def test_a_workdir_loads_its_export_or_any_step(workdir):
  wd, states = workdir
  model = hub.load(wd.path)
  assert model.source == wd.export_path() and wd.export_path().endswith('/testing.npz')
  assert model.labels == ['cat', 'dog', 'bird'] and model.image_size == (16, 16)
  assert (model.pp_eval, model.crop_fraction) == ('resize_crop', 0.5)
  _same(model.params, states[6]['polyak'])
  # The export file by itself: the run's labels and preprocessing come with it.
  alone = hub.load(wd.export_path())
  assert (alone.labels, alone.pp_eval, alone.crop_fraction) == (model.labels, 'resize_crop', 0.5)
  # Any orbax step; the Polyak average when the step has one (the export rule).
  _same(hub.load(wd.path, step=3).params, states[3]['params'])
  latest = hub.load(wd.path, step=6)
  _same(latest.params, states[6]['polyak'])
  images = np.random.default_rng(0).uniform(-1, 1, (4, 16, 16, 3)).astype(np.float32)
  np.testing.assert_array_equal(model.probs(images), latest.probs(images))
  with pytest.raises(hub.HubError, match=r'No checkpoint for step 4 .* available steps: \[3, 6\]'):
    hub.load(wd.path, step=4)


def test_a_workdir_without_export_loads_its_latest_step(workdir):
  wd, states = workdir
  pathlib.Path(wd.export_path()).unlink()
  model = hub.load(wd.path)
  assert model.source.endswith('checkpoints/6')
  _same(model.params, states[6]['polyak'])


# ---------------------------------------------------------------------------
# Official names.
# ---------------------------------------------------------------------------

def test_an_official_name_downloads_once_through_the_hub(tmp_path, monkeypatch):
  from tests.test_download import Server  # pylint: disable=import-outside-toplevel
  root = tmp_path / 'bucket' / 'imagenet21k'
  root.mkdir(parents=True)
  (root / 'SmallViT_8.npz').write_bytes(SHIPPED.read_bytes())
  monkeypatch.setenv('VIT_JAX_CACHE_DIR', str(tmp_path / 'cache'))
  server = Server(tmp_path / 'bucket')
  monkeypatch.setenv('VIT_JAX_CHECKPOINT_URL', server.url)
  try:
    model = hub.load('SmallViT_8')
  finally:
    server.stop()
  assert model.source == str(tmp_path / 'cache' / 'imagenet21k' / 'SmallViT_8.npz')
  assert model.model_config.model_name == 'SmallViT_8' and len(server.requests) == 1
  again = hub.load('SmallViT_8')  # offline: the cached copy
  _same(again.params, model.params)


def test_official_heads_get_imagenet_class_names(tmp_path, monkeypatch):
  """An official file with ImageNet-1k's head is named by ImageNet-1k's class
  names, fetched once from the labels server; offline it stays numbered."""
  from tests.test_download import Server  # pylint: disable=import-outside-toplevel
  flat = checkpoint.flatten(checkpoint.load(str(SHIPPED)))
  rng = np.random.default_rng(0)
  flat['head/kernel'] = rng.normal(size=(192, 1000)).astype(np.float32)
  flat['head/bias'] = np.zeros(1000, np.float32)
  folder = tmp_path / 'bucket' / 'imagenet21k+imagenet2012'
  folder.mkdir(parents=True)
  checkpoint.save(checkpoint.unflatten(flat), str(folder / 'SmallViT_8.npz'))
  (tmp_path / 'labels').mkdir()
  names = [f'class {i}, synonym' for i in range(1000)]
  (tmp_path / 'labels' / 'ilsvrc2012_wordnet_lemmas.txt').write_text('\n'.join(names) + '\n')
  (tmp_path / 'labels' / 'imagenet21k_wordnet_lemmas.txt').write_text('too\nshort\n')
  monkeypatch.setenv('VIT_JAX_CACHE_DIR', str(tmp_path / 'cache'))
  bucket, labels = Server(tmp_path / 'bucket'), Server(tmp_path / 'labels')
  monkeypatch.setenv('VIT_JAX_CHECKPOINT_URL', bucket.url)
  monkeypatch.setenv('VIT_JAX_LABELS_URL', labels.url)
  try:
    model = hub.load('imagenet21k+imagenet2012/SmallViT_8')
    assert model.labels == names and len(labels.requests) == 1
    # A damaged label file is refused (and not kept); the classes stay numbered.
    with pytest.raises(download.DownloadError, match='did not download as 21843 class names'):
      download.official_labels(21843)
    assert not list((tmp_path / 'cache' / 'labels').glob('imagenet21k*'))
    assert download.official_labels(10) is None   # No official head has 10 classes.
  finally:
    bucket.stop()
    labels.stop()
  again = hub.load('imagenet21k+imagenet2012/SmallViT_8')   # offline: both cached
  assert again.labels == names and model.top_k(np.eye(1000)[:1])[0][0]['name'] == names[0]

  # A fresh cache and no labels server: the model loads with numbered classes.
  monkeypatch.setenv('VIT_JAX_CACHE_DIR', str(tmp_path / 'cache2'))
  (tmp_path / 'cache2' / 'imagenet21k+imagenet2012').mkdir(parents=True)
  (tmp_path / 'cache2' / 'imagenet21k+imagenet2012' / 'SmallViT_8.npz').write_bytes(
      (folder / 'SmallViT_8.npz').read_bytes())
  monkeypatch.setenv('VIT_JAX_LABELS_URL', labels.url)   # Stopped: connection refused.
  warnings = []   # (absl's handler may not reach caplog after other tests' CLIs ran)
  monkeypatch.setattr(hub.logging, 'warning', lambda msg, *args: warnings.append(msg % args))
  offline = hub.load('imagenet21k+imagenet2012/SmallViT_8')
  assert offline.labels is None
  assert any('Class names of the official 1000-class head unavailable' in w for w in warnings)
  # A local file that is not from the official bucket is not named.
  local = tmp_path / 'mine.npz'
  local.write_bytes((folder / 'SmallViT_8.npz').read_bytes())
  assert hub.load(str(local)).labels is None
