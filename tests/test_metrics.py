"""What a run leaves to read: one console line per log step, TensorBoard scalars,
metrics.jsonl, curves.png (vit_jax.metrics, vit_jax.curves)."""

import json
import logging
import math
import re
import subprocess
import sys

import pytest
from conftest import REPO, SUBPROCESS_ENV

from vit_jax import curves, metrics


def _jsonl(workdir):
  """{metric: {step: value}}, the later line of a step winning."""
  return curves.read_metrics(str(workdir))


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  """The tiny config for 6 steps, evaluating at step 3 and at the end."""
  workdir = tmp_path_factory.mktemp('run')
  out = subprocess.run(
      [sys.executable, '-m', 'vit_jax.main', '--config=tests/_tiny_config.py',
       f'--workdir={workdir}', '--config.eval_every=3'],
      cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-4000:]
  return workdir, out.stdout + out.stderr


def test_one_console_line_per_log_step(tiny_run):
  _, log = tiny_run
  steps = [int(s) for s in re.findall(r'\] step (\d+)/6 \| train_loss', log)]
  assert steps == [1, 2, 3, 4, 5, 6], log[-3000:]
  line = next(ln for ln in log.splitlines() if '] step 4/6 |' in ln)
  assert re.search(r'train_loss \d\.\d{4} \| lr [\d.e+-]+ \| [\d.]+ img/s .* \| ETA \d:\d\d:\d\d',
                   line), line


def test_tensorboard_scalars_read_back_with_event_accumulator(tiny_run):
  pytest.importorskip('tensorboard', reason='tensorboard is not installed: no events to read')
  from tensorboard.backend.event_processing import event_accumulator
  workdir, _ = tiny_run
  acc = event_accumulator.EventAccumulator(str(workdir)).Reload()
  logged = _jsonl(workdir)
  for tag in ('train_loss', 'lr', 'accuracy_test'):
    events = {e.step: e.value for e in acc.Scalars(tag)}  # KeyError if not a scalar
    assert events.keys() == logged[tag].keys(), tag
    for step, value in events.items():
      assert math.isclose(value, logged[tag][step], rel_tol=1e-6, abs_tol=1e-7), (tag, step)
  assert sorted(logged['accuracy_test']) == [3, 6]
  assert sorted(logged['train_loss']) == [1, 2, 3, 4, 5, 6]


def test_run_writes_curves_and_a_sidecar_with_preprocessing(tiny_run):
  workdir, _ = tiny_run
  assert (workdir / 'curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  side = json.loads((workdir / 'tiny-test.json').read_text())
  assert side['num_classes'] == 10
  assert side['preprocessing'] == {'image_size': [8, 8], 'pp_eval': 'resize',
                                   'crop_fraction': 0.875}
  assert side['timm']['img_size'] == [8, 8] and side['timm']['num_classes'] == 10
  assert side['timm']['pretrained_cfg_overlay']['file'] == 'tiny-test.npz'
  final = json.loads((workdir / 'final_metrics.json').read_text())
  assert final['step'] == 6 and 0 <= final['accuracy_test'] <= 1


def test_tensorboard_writer_simple_values(tmp_path):
  pytest.importorskip('tensorboard', reason='tensorboard is not installed')
  from tensorboard.backend.event_processing import event_accumulator
  log = metrics.MetricLog(metrics.metric_writer(str(tmp_path), True),
                          str(tmp_path / 'metrics.jsonl'))
  log.write_scalars(10, {'train_loss': 1.5, 'lr': 0.25})
  log.write_scalars(20, {'train_loss': 1.25})
  log.close()
  acc = event_accumulator.EventAccumulator(str(tmp_path)).Reload()
  assert [(e.step, e.value) for e in acc.Scalars('train_loss')] == [(10, 1.5), (20, 1.25)]
  assert [(e.step, e.value) for e in acc.Scalars('lr')] == [(10, 0.25)]
  assert _jsonl(tmp_path) == {'train_loss': {10: 1.5, 20: 1.25}, 'lr': {10: 0.25}}
  assert metrics.metric_writer(str(tmp_path), is_main=False) is None


def test_without_tensorboard_jsonl_and_one_warning(tmp_path, monkeypatch, caplog):
  for name in ('tensorboard', 'tensorboard.compat.proto',
               'tensorboard.summary.writer.event_file_writer'):
    monkeypatch.setitem(sys.modules, name, None)  # import -> ImportError
  with caplog.at_level(logging.WARNING, logger='absl'):  # whatever verbosity earlier tests left
    writer = metrics.metric_writer(str(tmp_path), True)
  assert writer is None
  warnings = [r for r in caplog.records if 'tensorboard is not installed' in r.getMessage()]
  assert len(warnings) == 1
  log = metrics.MetricLog(writer, str(tmp_path / 'metrics.jsonl'))
  log.write_scalars(1, {'train_loss': 2.0})
  log.flush()
  log.close()
  assert _jsonl(tmp_path) == {'train_loss': {1: 2.0}}
  assert not list(tmp_path.glob('events.out.tfevents*'))


def test_curves_without_matplotlib_skip_with_one_line(tmp_path, monkeypatch, caplog):
  (tmp_path / 'metrics.jsonl').write_text('{"step": 1, "train_loss": 2.0}\n')
  monkeypatch.setitem(sys.modules, 'matplotlib', None)
  with caplog.at_level(logging.WARNING, logger='absl'):  # whatever verbosity earlier tests left
    assert curves.write_curves(str(tmp_path)) is None
  assert [r.getMessage() for r in caplog.records if 'matplotlib' in r.getMessage()] == [
      'matplotlib is not installed: no curves.png (metrics.jsonl has the numbers).']
  assert not (tmp_path / 'curves.png').exists()


def test_read_metrics_skips_a_cut_line(tmp_path):
  (tmp_path / 'metrics.jsonl').write_text(
      '{"step": 1, "train_loss": 2.0}\n{"step": 2, "lr": 0.1}\n{"step": 3, "train_lo')
  assert _jsonl(tmp_path) == {'train_loss': {1: 2.0}, 'lr': {2: 0.1}}


def test_fmt_time_and_throughput():
  assert metrics.fmt_time(3725.9) == '1:02:05'
  assert metrics.fmt_time(float('nan')) == '?'
  meter = metrics.Throughput()
  rate, total = meter.window()  # nothing timed yet
  assert math.isnan(rate) and math.isnan(total)


def test_write_curves_leaves_matplotlib_backend_alone(tmp_path):
  """A notebook that trains keeps its inline figures (finetune.ipynb)."""
  import matplotlib
  (tmp_path / 'metrics.jsonl').write_text(
      '{"step": 1, "train_loss": 2.0, "lr": 0.1}\n{"step": 2, "accuracy_test": 0.5}\n')
  before = matplotlib.get_backend()
  matplotlib.use('svg')
  try:
    assert curves.write_curves(str(tmp_path)) == str(tmp_path / 'curves.png')
    assert matplotlib.get_backend() == 'svg'
  finally:
    matplotlib.use(before)
  assert (tmp_path / 'curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
