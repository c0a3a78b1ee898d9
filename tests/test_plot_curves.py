"""benchmarks/plot_curves.py: metrics.jsonl -> curves (the reproduction report's figures)."""

import importlib.util
import json

from conftest import REPO

spec = importlib.util.spec_from_file_location('plot_curves', REPO / 'benchmarks' / 'plot_curves.py')
plot_curves = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plot_curves)


def _workdir(tmp_path, name, lines):
  d = tmp_path / name
  d.mkdir()
  (d / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in lines))
  return d


def test_later_line_of_a_step_wins_as_after_a_resume(tmp_path):
  d = _workdir(tmp_path, 'run', [
      {'step': 10, 'train_loss': 2.0}, {'step': 20, 'train_loss': 1.5},
      {'step': 20, 'accuracy_test': 0.3, 'loss_test': 1.9},
      {'step': 20, 'train_loss': 1.4},  # re-logged after a resume
      {'step': 1, 'compile_sec': 3.0}])
  m = plot_curves.read_metrics(str(d))
  assert m['train_loss'] == {10: 2.0, 20: 1.4}
  assert m['accuracy_test'] == {20: 0.3}
  assert m['compile_sec'] == {1: 3.0}


def test_cli_writes_a_png_and_rejects_a_non_workdir(tmp_path, capsys):
  a = _workdir(tmp_path, 'a', [{'step': s, 'train_loss': 1.0 / s} for s in (1, 2, 3)])
  out = tmp_path / 'figs' / 'c.png'
  assert plot_curves.main(['--out', str(out), f'A={a}']) == 0
  assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert plot_curves.main(['--out', str(out), f'B={tmp_path / "nope"}']) == 1
  assert 'metrics.jsonl not found' in capsys.readouterr().err
