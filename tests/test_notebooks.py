"""Executes notebooks/*.ipynb top to bottom (issue 5, item 6) and checks what they computed.

Each notebook ends with a `NOTEBOOK_SUMMARY {json}` line; the tests read it back from the
executed cells, plus the figures they drew. Like papermill, the only change made to a notebook
is a cell inserted after its `parameters` cell that points WORKDIR at pytest's tmp_path; every
other setting is the notebook's own CPU default, so what runs here is what a user runs.
The kernel (`python3`, from ipykernel) starts in tmp_path with the repository on PYTHONPATH.

Both notebooks train the same tiny model shape with the same optimizer settings, so they share
one persistent XLA compilation cache (JAX_COMPILATION_CACHE_DIR, a temporary directory): the
second notebook reuses the first one's compiled train and eval steps.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from typing import Any

import numpy as np
import pytest

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / 'notebooks'
CELL_TIMEOUT_S = 600
ANALYSIS_FILES = ('attention_rollout.png', 'attention_distance.png', 'posemb_similarity.png',
                  'embedding_filters_pca.png')


@pytest.fixture(scope='module')
def compilation_cache(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp('jax_compilation_cache'))


def _kernel_ready() -> None:
  from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
  try:
    KernelSpecManager().get_kernel_spec('python3')
  except NoSuchKernel:
    pytest.fail('No Jupyter kernel "python3": install the test extra (`pip install -e .[test]` '
                'brings ipykernel) or run `python -m ipykernel install --user`.')


def execute(name: str, tmp_path: pathlib.Path, cache_dir: str,
            **overrides: Any) -> tuple[Any, float]:
  """Runs notebooks/<name> in tmp_path with `overrides` injected after its parameters cell."""
  _kernel_ready()
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  index = [i for i, c in enumerate(nb.cells) if 'parameters' in c.metadata.get('tags', [])]
  assert len(index) == 1, f'{name} needs exactly one cell tagged "parameters"'
  source = '# Injected by tests/test_notebooks.py\n' + ''.join(
      f'{k} = {v!r}\n' for k, v in overrides.items())
  injected = nbformat.v4.new_code_cell(source)
  injected.metadata['tags'] = ['injected-parameters']
  nb.cells.insert(index[0] + 1, injected)

  env_path = os.pathsep.join(p for p in (str(REPO), os.environ.get('PYTHONPATH')) if p)
  client = nbclient.NotebookClient(
      nb, timeout=CELL_TIMEOUT_S, kernel_name='python3',
      resources={'metadata': {'path': str(tmp_path)}})
  env = {'PYTHONPATH': env_path, 'JAX_COMPILATION_CACHE_DIR': cache_dir,
         'TF_CPP_MIN_LOG_LEVEL': '2', 'TF_ENABLE_ONEDNN_OPTS': '0',
         # Inline figures (display_data image/png), even where the caller set another backend.
         'MPLBACKEND': 'module://matplotlib_inline.backend_inline'}
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)  # the kernel inherits the environment
  start = time.perf_counter()
  try:
    client.execute()
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    nbformat.write(nb, tmp_path / f'executed_{name}')  # for a look after a failure
  return nb, time.perf_counter() - start


def stream_text(nb: Any) -> str:
  return ''.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code'
                 for o in c.get('outputs', []) if o.output_type == 'stream')


def num_figures(nb: Any) -> int:
  return sum('image/png' in o.get('data', {}) for c in nb.cells if c.cell_type == 'code'
             for o in c.get('outputs', []) if o.output_type == 'display_data')


def summary(nb: Any) -> dict[str, Any]:
  lines = [line for line in stream_text(nb).splitlines() if line.startswith('NOTEBOOK_SUMMARY ')]
  assert len(lines) == 1, 'the notebook must print one NOTEBOOK_SUMMARY line'
  return json.loads(lines[0][len('NOTEBOOK_SUMMARY '):])


def test_notebooks_are_committed_without_outputs_and_parse():
  for path in sorted(NOTEBOOKS.glob('*.ipynb')):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata['kernelspec']['name'] == 'python3'
    for cell in nb.cells:
      if cell.cell_type == 'code':
        assert not cell.outputs and cell.execution_count is None, f'{path.name}: clear outputs'
  assert {p.name for p in NOTEBOOKS.glob('*.ipynb')} >= {'vit_jax.ipynb', 'finetune.ipynb'}


def test_vit_jax_notebook(tmp_path, compilation_cache):
  nb, seconds = execute('vit_jax.ipynb', tmp_path, compilation_cache,
                        WORKDIR=str(tmp_path / 'work'))
  s = summary(nb)
  print(f'vit_jax.ipynb executed in {seconds:.0f}s')

  # The default is the offline fallback: a tiny model trained on digits by the training loop.
  assert s['checkpoint'] == str(tmp_path / 'work' / 'tiny_digits' / 'testing.npz')
  assert (tmp_path / 'work' / 'tiny_digits' / 'testing.npz').is_file()
  assert s['model'] == 'testing' and s['num_classes'] == 10 and s['image_size'] == [32, 32]
  # 150 steps of training: far above chance (0.10) on the 359 test digits.
  assert s['tiny_accuracy_test'] > 0.6
  # 12 demo digits from the test split, classified with their true labels known.
  assert s['num_images'] == 12 and len(s['top1']) == 12
  assert set(s['top1']) <= {str(d) for d in range(10)}
  assert s['demo_accuracy'] >= 0.5
  np.testing.assert_allclose(s['prob_sums'], 1.0, atol=1e-5)
  # Attention: 2 layers over the 8x8 patch grid of a 32x32 input with 4x4 patches.
  assert s['num_layers'] == 2 and s['grid'] == [8, 8]
  assert s['rollout_shape'] == [12, 8, 8]
  assert s['rollout_max'] == pytest.approx(1.0) and s['rollout_min'] >= 0.0
  distances = np.array(s['distances'])
  assert distances.shape == (2, 2) and s['distances_finite']
  # Mean attention distance lies between 0 and the largest patch distance (7*sqrt(2) patches).
  assert (distances >= 0).all() and (distances <= 4 * 7 * np.sqrt(2)).all()
  # vit_jax.analysis.run_all (jitted attention) reproduces the eager rollout maps, and writes
  # the four figures of the paper's Figs. 6/7 plus their numbers.
  assert s['rollout_max_diff_jit_vs_eager'] < 1e-5
  assert s['analysis_files'] == sorted(ANALYSIS_FILES)
  # Figures: predictions, rollout maps, attention distances, then the four analysis PNGs.
  assert num_figures(nb) == 3 + 4
  text = stream_text(nb)
  assert 'Checkpoints shipped in the repository:' in text
  assert 'Top-1 correct on 12 labelled demo images' in text


@pytest.mark.slow  # a third notebook kernel: ~15 s of CPU
def test_vit_jax_notebook_with_a_local_checkpoint_file(tmp_path, compilation_cache):
  """The branch for official/local files: a checkpoint path, a preset, a label file, photos."""
  from conftest import golden_dir
  tiny = golden_dir() / 'tiny.npz'  # official layout, 'testing' shape, random weights
  labels = tmp_path / 'labels.txt'
  labels.write_text(''.join(f'class_{i}\n' for i in range(10)))
  nb, _ = execute('vit_jax.ipynb', tmp_path, compilation_cache, WORKDIR=str(tmp_path / 'work'),
                  CHECKPOINT=str(tiny), MODEL='testing', LABELS=str(labels))
  s = summary(nb)
  assert s['checkpoint'] == str(tiny) and s['tiny_accuracy_test'] is None
  assert not (tmp_path / 'work' / 'tiny_digits').exists()  # nothing trained
  # Without digits, the demo images are scikit-learn's two photos, resized to the model's 32x32.
  assert s['num_images'] == 2 and s['demo_accuracy'] is None
  assert sorted(p.name for p in (tmp_path / 'work' / 'images').iterdir()) == [
      'china.png', 'flower.png']
  assert all(name.startswith('class_') for name in s['top1'])
  np.testing.assert_allclose(s['prob_sums'], 1.0, atol=1e-5)
  assert s['rollout_shape'] == [2, 8, 8] and s['rollout_max'] == pytest.approx(1.0)
  assert s['rollout_max_diff_jit_vs_eager'] < 1e-5
  assert s['analysis_files'] == sorted(ANALYSIS_FILES)
  assert num_figures(nb) == 3 + 4


def test_finetune_notebook(tmp_path, compilation_cache):
  work = tmp_path / 'work'
  nb, seconds = execute('finetune.ipynb', tmp_path, compilation_cache, WORKDIR=str(work))
  s = summary(nb)
  print(f'finetune.ipynb executed in {seconds:.0f}s')

  # The digits folder it wrote: 1,797 images, every fifth in test, class names from folders.
  assert s['data_dir'] == str(work / 'digits_folder')
  assert len(list((work / 'digits_folder' / 'train').glob('*/*.png'))) == 1438
  assert s['num_test'] == 359 and s['num_test_examples'] == 359.0
  assert s['labels'] == sorted(['zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven',
                                'eight', 'nine'])
  # The training workdir layout that predict/export rely on.
  assert {'config.json', 'labels.txt', 'checkpoints', 'testing.npz'} <= set(s['workdir_files'])
  assert s['steps'] == [75, 150]
  # Training worked: loss fell, accuracy far above chance (0.10).
  assert s['history_loss'][-1] < 0.6 * s['history_loss'][0]
  assert s['train_accuracy_test'] > 0.6
  # Two paths to one number: vit_jax.predict over the test folder == the training eval
  # (a near-tie may flip one image between batchings at most).
  assert abs(s['predict_accuracy'] - s['train_accuracy_test']) <= 1 / 359 + 1e-9
  # Export of the final orbax step == the training's own export, bit for bit, and predicts
  # the same; the step-75 export is a different (earlier, worse) model.
  assert s['export_identical']
  assert s['exported_max_prob_diff'] < 1e-6
  assert s['step_accuracy']['150'] == pytest.approx(s['predict_accuracy'])
  assert s['step_accuracy']['75'] < s['step_accuracy']['150']
  assert num_figures(nb) == 2  # loss curve, predictions
