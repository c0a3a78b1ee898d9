"""The one command-line convention (vit_jax/cli.py) across every tool."""

import importlib
import re
import subprocess
import sys

import pytest
from absl import flags

from conftest import REPO, SUBPROCESS_ENV
from vit_jax import cli

# Every `python -m vit_jax.<tool>`, with a flag (or argument) only its --help shows.
TOOLS = {
    'main': '--coordinator_address',
    'evaluate': '--checkpoint',
    'predict': '--top_k',
    'export': '--step',
    'fewshot': '--shots',
    'analysis': '--max_rollout_images',
    'checkpoint': 'PATH.npz|NAME',
    'benchmark': '--resolution',
    'sweep': '--grid',
    'config_schema': 'Prints every training-config key',  # no flags of its own
}
ERROR_LINE = re.compile(r'^ERROR \((\w+)\): (.+)$', re.M)


def _module(tool):
  return importlib.import_module(f'vit_jax.{tool}')


def _doc_line(tool) -> str:
  """A line of the tool's module docstring, as --help must print it."""
  return next(ln.strip() for ln in _module(tool).__doc__.strip().splitlines()[1:] if ln.strip())


def test_every_cli_answers_help():
  # All at once: each start imports absl (+ jax, flax for --dtype) on slow cores.
  procs = {t: subprocess.Popen([sys.executable, '-m', f'vit_jax.{t}', '--help'], cwd=REPO,
                               env=SUBPROCESS_ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
           for t in TOOLS}
  for tool, proc in procs.items():
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, (tool, err[-2000:])
    assert 'Traceback' not in err and 'ERROR' not in err, (tool, err[-2000:])
    assert f'Usage: python -m vit_jax.{tool} [flags]' in out, (tool, out[-3000:])
    assert _doc_line(tool) in out, (tool, out[:3000])
    assert TOOLS[tool] in out and '--[no]verbose' in out, (tool, out[-3000:])


def test_benchmark_scripts_answer_help_and_reject_unknown_flags():
  """benchmarks/*.py follow the same convention; their usage line is the script's path."""
  scripts = sorted(p.name for p in (REPO / 'benchmarks').glob('*.py'))
  assert {'gpu_vs_timm.py', 'input_pipeline.py', 'plot_curves.py', 'table1.py',
          'train_step.py'} <= set(scripts)
  procs = {(name, arg): subprocess.Popen([sys.executable, f'benchmarks/{name}', arg], cwd=REPO,
                                         env=SUBPROCESS_ENV, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True)
           for name in scripts for arg in ('--help', '--no_such_flag')}
  for (name, arg), proc in procs.items():
    out, err = proc.communicate(timeout=300)
    assert 'argparse' not in (REPO / 'benchmarks' / name).read_text(), name
    usage = f'Usage: python benchmarks/{name} [flags]'
    if arg == '--help':
      assert proc.returncode == 0 and 'Traceback' not in err, (name, err[-2000:])
      assert usage in out and '--[no]verbose' in out, (name, out[-3000:])
    else:
      assert proc.returncode == 1, (name, out[-2000:], err[-2000:])
      assert ERROR_LINE.findall(err) == [('UsageError', "Unknown command line flag "
                                                        "'no_such_flag'")], (name, err)
      assert err.startswith('ERROR (') and usage in err, (name, err)


def _flag_names(tool) -> set[str]:
  _, fv = _module(tool).main.command.parse(['--help'])
  return {fv[name].name for name in fv}


def test_importing_every_tool_defines_no_global_flags():
  names = set().union(*(_flag_names(tool) for tool in TOOLS))
  assert {'config', 'workdir', 'checkpoint', 'json', 'dtype', 'model', 'top_k'} <= names
  assert not names & set(flags.FLAGS), sorted(names & set(flags.FLAGS))
  # Flags with the same names in several tools, parsed in one process, twice.
  for tool in ('predict', 'fewshot', 'evaluate', 'predict'):
    assert _module(tool).main(['--help']) == 0


def test_dtype_choices_come_from_models(monkeypatch):
  from vit_jax import models
  monkeypatch.setattr(models, 'DTYPES', (*models.DTYPES, 'float16'))
  for tool in ('predict', 'fewshot', 'analysis', 'evaluate', 'benchmark'):
    _, fv = _module(tool).main.command.parse(['--help'])
    assert fv['dtype'].parser.enum_values == list(models.DTYPES), tool


def test_config_overrides_and_none():
  argv = ['--config=tests/_tiny_config.py', '--checkpoint=x.npz', '--config.lr.base=0.5',
          '--config.num_classes=None', '--json']
  args, _ = _module('evaluate').main.command.parse(argv)
  assert args.config.lr.base == 0.5 and args.config.num_classes is None
  assert args.json is True and args.checkpoint == 'x.npz' and args.dtype is None


def test_model_fields_the_config_does_not_list_can_be_overridden():
  """config.model holds only a config's changes to its preset: any model field
  (remat, attention, a nested transformer.* key) can still be set from the
  command line, parsed as a Python literal, next to ordinary overrides."""
  argv = ['--config=configs/quickstart.py', '--checkpoint=x.npz',
          '--config.model.remat=dots_with_no_batch_dims_saveable',
          '--config.model.attention=einsum', '--config.model.transformer.num_layers=2',
          '--config.model.patches.size=(4, 4)', '--config.model.representation_size=None',
          '--config.lr.base=0.5']
  args, _ = _module('evaluate').main.command.parse(argv)
  model = args.config.model
  assert model.remat == 'dots_with_no_batch_dims_saveable' and model.attention == 'einsum'
  assert model.transformer.num_layers == 2 and tuple(model.patches.size) == (4, 4)
  assert model.representation_size is None and args.config.lr.base == 0.5
  from vit_jax import config_schema
  merged = config_schema.model_config(args.config)   # Merged over the preset SmallViT_8.
  assert merged.transformer.num_layers == 2 and merged.transformer.num_heads == 12
  assert merged.remat == 'dots_with_no_batch_dims_saveable' and merged.hidden_size == 192


def _error(capsys) -> tuple[str, str, str]:
  """(type, message, the whole stderr) of the one ERROR line a failed run printed."""
  err = capsys.readouterr().err
  lines = ERROR_LINE.findall(err)
  assert len(lines) == 1 and err.startswith('ERROR ('), err
  assert 'Traceback' not in err, err
  return (*lines[0], err)


@pytest.mark.parametrize('tool, argv, kind, message', [
    ('checkpoint', ['/nonexistent/x.npz'], 'CheckpointError', 'Checkpoint not found: /nonexistent'),
    ('checkpoint', [], 'UsageError', 'expected 1 argument(s) PATH.npz|NAME, got none'),
    ('checkpoint', ['me', 'x.npz'], 'UsageError', 'got 2: me x.npz'),
    ('predict', ['--checkpoint=/nonexistent.npz', '--model=ViT-B_16', 'x.jpg'], 'HubError',
     'Checkpoint not found: /nonexistent.npz'),
    ('predict', ['x.jpg'], 'PredictError', 'Pass --workdir=DIR, or --checkpoint=PATH.npz'),
    ('predict', ['--top_k=many', 'x.jpg'], 'UsageError', "flag --top_k=many: invalid literal"),
    ('predict', ['--dtype=float64', 'x.jpg'], 'UsageError', 'flag --dtype=float64: value should be'),
    ('export', ['--step=3'], 'UsageError', 'Flag --workdir must have a value other than None'),
    ('export', ['--workdir=/nonexistent', '--nolist', '--bogus'], 'UsageError',
     "Unknown command line flag 'bogus'"),
    ('export', ['--workdir=/nonexistent'], 'ExportError', 'No orbax checkpoints under'),
    ('fewshot', ['--dataset=digits', '--pool=max'], 'UsageError', 'flag --pool=max'),
    ('analysis', ['--checkpoint=/nonexistent.npz', 'x.jpg'], 'HubError', 'Checkpoint not found'),
    ('evaluate', ['--config=tests/_tiny_config.py', '--checkpoint=x.npz', '--config.bogus=1'],
     'UsageError', "unknown config key 'bogus' in --config.bogus=1; nearest valid keys:"),
    ('evaluate', ['--config=configs/quickstart.py', '--checkpoint=x.npz',
                  '--config.model.remta=full'], 'UsageError',
     "unknown model field 'remta' in --config.model.remta=full; nearest: remat"),
    ('evaluate', ['--config=configs/quickstart.py', '--checkpoint=x.npz',
                  '--config.model.hidden_size=wide'], 'UsageError',
     'model.hidden_size is a number (192), got a string'),
    ('evaluate', ['--config=configs/quickstart.py', '--checkpoint=x.npz',
                  '--config.model.dtype=bfloat16'], 'UsageError', 'comes from config.dtype'),
    ('sweep', ['--config=tests/_tiny_config.py'], 'UsageError', 'Flag --workdir must have a value'),
    ('benchmark', ['--batch=two'], 'UsageError', 'flag --batch=two'),
])
def test_errors_come_out_in_one_format(tool, argv, kind, message, capsys):
  assert _module(tool).main(argv) == 1
  got_kind, got_message, err = _error(capsys)
  assert (got_kind, message in got_message) == (kind, True), err
  if kind == 'UsageError':  # and where to look
    assert f'Usage: python -m vit_jax.{tool} [flags]' in err, err


def test_verbose_adds_the_traceback(capsys):
  from vit_jax import checkpoint
  assert checkpoint.main(['--verbose', '/nonexistent/x.npz']) == 1
  err = capsys.readouterr().err
  assert 'Traceback (most recent call last)' in err
  assert ERROR_LINE.findall(err)[-1][0] == 'CheckpointError'


def test_bugs_are_not_reported_as_user_errors():
  def body(args):
    del args
    raise KeyError('a bug')
  main = cli.command()(body)
  with pytest.raises(KeyError, match='a bug'):
    main([])
  assert cli.command()(lambda args: 3)([]) == 3


def test_help_wins_and_positional_arguments_after_flags(capsys):
  from vit_jax import predict
  assert predict.main(['--top_k=not-a-number', '-h']) == 0
  out = capsys.readouterr().out
  assert out.startswith(predict.__doc__.strip()[:60]) and '--top_k' in out
  seen = {}
  main = cli.command(lambda fv: flags.DEFINE_integer('n', 1, 'n', flag_values=fv),
                     positional='paths', metavar='PATH...', min_args=1)(
                         lambda args: seen.update(vars(args)))
  assert main(['a', '--n', '3', 'b', '--', '--help']) == 0
  assert seen['paths'] == ['a', 'b', '--help'] and seen['n'] == 3
