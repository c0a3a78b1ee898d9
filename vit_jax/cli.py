r"""The one command-line convention of the ``python -m vit_jax.<tool>`` commands
(and of the ``python benchmarks/<name>.py`` scripts).

absl flags, as ``vit_jax.main`` and big_vision. A tool is a function decorated
with `command`, which turns it into ``main(argv=None) -> int``::

  def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string('checkpoint', None, 'Official-layout .npz.', flag_values=fv)

  @cli.command(define_flags, positional='images', metavar='IMAGE [IMAGE ...]', min_args=1)
  def main(args: cli.Args) -> int | None:
    ...  # args.checkpoint, args.images; raise PredictError('...') for user errors

  if __name__ == '__main__':
    sys.exit(main())

* Flags are defined when ``main`` runs, into a fresh `absl.flags.FlagValues`,
  never into the global ``flags.FLAGS``: importing several tools into one
  process (tests, notebooks, tools importing each other) cannot raise
  DuplicateFlagError, and ``main([...])`` runs any number of times in one
  process. absl's syntax: ``--flag=value`` or ``--flag value``; booleans
  ``--json`` / ``--nojson``; ``--flagfile=FILE``.
* ``main(argv)`` takes the arguments without the program name (default
  ``sys.argv[1:]``) and returns the exit status: 0 on success, 1 on an error.
  ``main.command`` is the `Command`: ``main.command.parse(argv)`` gives the
  parsed `Args` without running the tool.
* ``--help`` (or ``-h``, ``--helpshort``, ``--helpfull``) prints the module
  docstring, the usage line and the tool's flags to stdout; exit status 0. The
  usage line says how the module runs: ``python -m vit_jax.<tool>``, or for a
  script run by its path, ``python benchmarks/<name>.py``.
* Errors come out in one format, one line on stderr, exit status 1::

    ERROR (<exception type>): <message>

  for command-line mistakes (``UsageError``: unknown flag, bad value, missing
  flag or argument; a second line points at ``--help``) and for the tool's user
  errors (`USER_ERRORS` unless the tool says otherwise: CheckpointError,
  PredictError, ConfigError, ...). ``--verbose`` prints the traceback too;
  any other exception is a bug and ends in its traceback.
* ``config=HELP`` adds ``--config=file.py[:arg]`` with ``--config.key=value``
  overrides (ml_collections), whose mistakes are one line naming the nearest
  valid keys, and ``--config.key=None`` (vit_jax.config_cli).
* ``log=True`` (the long-running tools) logs through absl as `absl.app.run`
  does: INFO and above to stderr, absl's ``--verbosity`` / ``--log_dir`` /
  ``--alsologtostderr`` flags accepted.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import pathlib
import sys
import textwrap
import traceback
import types
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags

# Command-line mistakes found by a tool itself, e.g. two flags that exclude each
# other: raise UsageError('...').
UsageError = app.UsageError
# What the tools report in one line by default: their own error classes
# (CheckpointError, PredictError, ExportError, ConfigError, WorkdirError, ...)
# are ValueErrors; FloatingPointError is a diverged training run; OSError is
# the machine's (a full disk, a missing or unwritable path), with its path.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FloatingPointError, OSError)
HELP_FLAGS = ('-h', '--help', '--helpshort', '--helpfull')
_PACKAGE = pathlib.Path(__file__).resolve().parent
_REPO = _PACKAGE.parent


class Args(types.SimpleNamespace):
  """A parsed command line: one attribute per flag, plus the positional ones.

  ``args.flags`` is the `absl.flags.FlagValues`, e.g. for ``args.flags['dtype'].present``.
  """


@dataclasses.dataclass(frozen=True)
class Command:
  """What `command` knows about a tool; see the module docstring."""

  body: Callable[[Args], int | None]
  define: Callable[[flags.FlagValues], None] | None
  prog: str  # the module's name, or a script's path ('benchmarks/x.py'): see usage()
  doc: str
  positional: str | None = None
  metavar: str = ''
  min_args: int = 0
  max_args: int | None = None
  errors: tuple[type[BaseException], ...] = USER_ERRORS
  config: str | None = None
  lock_config: bool = True
  log: bool = False

  def usage(self) -> str:
    """The one-line synopsis: ``python -m vit_jax.<tool> [flags] ARGS`` (a script:
    ``python benchmarks/<name>.py [flags] ARGS``)."""
    run = f'python {self.prog}' if self.prog.endswith('.py') else f'python -m {self.prog}'
    return ' '.join(filter(None, [run, '[flags]',
                                  self.metavar if self.positional else '']))

  def help(self, fv: flags.FlagValues) -> str:
    """The module docstring, the usage line and the flags (what --help prints)."""
    lines = [self.doc.strip(), '', f'Usage: {self.usage()}', '']
    if self.body.__doc__:
      lines += [textwrap.indent(inspect.cleandoc(self.body.__doc__), '  '), '']
    lines.append('Flags:')
    for name in sorted(_own_flags(fv)):
      lines.append(_flag_help(fv[name]))
    return '\n'.join(lines) + '\n'

  def parse(self, argv: Sequence[str]) -> tuple[Args | None, flags.FlagValues]:
    """Parses `argv` (no program name); (None, flags) when it asks for --help."""
    argv = [self.prog, *argv]
    nones: list[str] = []
    model_overrides: list[tuple[str, str]] = []
    if self.config is not None:
      from vit_jax import config_cli  # pylint: disable=g-import-not-at-top
      argv, model_overrides = config_cli.split_model_overrides(argv)
      argv, nones = config_cli.split_none_overrides(argv)
    fv = flags.FlagValues()
    if self.config is not None:
      from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
      config_flags.DEFINE_config_file('config', None, self.config, flag_values=fv,
                                      lock_config=self.lock_config, sys_argv=argv)
    if self.define is not None:
      self.define(fv)
    if 'verbose' not in fv:
      flags.DEFINE_bool('verbose', False, 'Print the traceback of an error too.', flag_values=fv)
    head = argv[:argv.index('--')] if '--' in argv else argv
    if any(a in HELP_FLAGS for a in head):
      return None, fv
    if self.log:
      for flag in flags.FLAGS.flags_by_module_dict().get('absl.logging', []):
        fv[flag.name] = flag  # shared: parsing sets absl's own --verbosity etc.
    if self.config is not None:
      if str(_REPO) not in sys.path and (_REPO / 'configs').is_dir():
        sys.path.insert(0, str(_REPO))  # configs/*.py import configs.common
      try:
        rest = fv(argv)
        if fv['config'].value is not None:
          fv['config'].value.keys()  # ml_collections defers a load error to first use
          for key in nones:
            config_cli.set_none(fv['config'].value, key)
      except Exception as e:  # pylint: disable=broad-except
        # A config file that does not load fails in any way; all are usage errors.
        raise UsageError(config_cli.command_line_error(argv, e)) from e
      if fv['config'].value is not None:
        try:
          config_cli.set_model_overrides(fv['config'].value, model_overrides)
        except ValueError as e:
          raise UsageError(str(e)) from e
    else:
      try:
        rest = fv(argv)
      except flags.Error as e:
        raise UsageError(str(e)) from e
    args = Args(**{name: fv[name].value for name in _own_flags(fv)}, flags=fv)
    positional = rest[1:]
    if self.positional is None:
      if positional:
        raise UsageError(f'unexpected arguments: {" ".join(positional)}')
      return args, fv
    if len(positional) < self.min_args or (self.max_args is not None and
                                            len(positional) > self.max_args):
      want = (f'{self.min_args}' if self.max_args == self.min_args else
              f'at least {self.min_args}' if self.max_args is None else
              f'{self.min_args} to {self.max_args}')
      raise UsageError(f'expected {want} argument(s) {self.metavar}, got '
                       + (f'{len(positional)}: {" ".join(positional)}' if positional else 'none'))
    setattr(args, self.positional,
            (positional[0] if positional else None) if self.max_args == 1 else positional)
    return args, fv

  def __call__(self, argv: Sequence[str] | None = None) -> int:
    """Runs the tool on `argv` (default sys.argv[1:]); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = '--verbose' in argv
    try:
      args, fv = self.parse(argv)
      if args is None:
        sys.stdout.write(self.help(fv))
        return 0
      verbose = bool(args.verbose)
      if self.log:
        _use_absl_logging(fv)
      status = self.body(args)
    except UsageError as e:
      report(e, verbose)
      print(f'Usage: {self.usage()}; --help lists the flags.', file=sys.stderr)
      return 1
    except self.errors as e:
      report(e, verbose)
      return 1
    return 0 if status is None else int(status)


def report(error: BaseException, verbose: bool = False) -> None:
  """Prints `error` in the one format, ``ERROR (Type): message``, to stderr."""
  if verbose:
    traceback.print_exception(error, file=sys.stderr)
  message = str(error).strip() or repr(error)
  print(f'ERROR ({type(error).__name__}): {message}', file=sys.stderr)


def command(define: Callable[[flags.FlagValues], None] | None = None, *,
            positional: str | None = None, metavar: str = '', min_args: int = 0,
            max_args: int | None = None, errors: tuple[type[BaseException], ...] = USER_ERRORS,
            config: str | None = None, lock_config: bool = True, log: bool = False,
            ) -> Callable[[Callable[[Args], int | None]], Callable[..., int]]:
  """Decorator: ``body(args)`` -> ``main(argv: Sequence[str] | None = None) -> int``.

  Args:
    define: defines the tool's flags into the `flags.FlagValues` it is given
      (``flag_values=fv``); `--verbose` is added unless it defines one. The
      body's docstring goes into --help, below the usage line.
    positional: attribute of `Args` for the positional arguments (a list, or a
      string or None if ``max_args == 1``); None: the tool takes none.
    metavar: how the usage line shows them, e.g. ``'IMAGE [IMAGE ...]'``.
    min_args: fewest positional arguments.
    max_args: most positional arguments (None: any number).
    errors: exception types reported as one ERROR line (exit status 1).
    config: help of a ``--config`` config-file flag; None: no such flag.
    lock_config: whether ``--config`` overrides may only set existing keys'
      values (ml_collections' lock).
    log: log through absl (INFO to stderr) as under `absl.app.run`.
  """

  def wrap(body: Callable[[Args], int | None]) -> Callable[..., int]:
    home = body.__globals__  # its module's namespace, even one not in sys.modules
    tool = Command(body, define, prog=_prog(home), doc=home.get('__doc__') or '',
                   positional=positional, metavar=metavar, min_args=min_args,
                   max_args=max_args, errors=errors, config=config, lock_config=lock_config,
                   log=log)

    @functools.wraps(body)
    def main(argv: Sequence[str] | None = None) -> int:
      return tool(argv)

    main.command = tool  # type: ignore[attr-defined]
    main.__doc__ = (f'``{tool.usage()}``: {body.__doc__ or ""}\n\nargv: without the program '
                    'name, default sys.argv[1:]. Returns the exit status.')
    return main

  return wrap


def _prog(home: dict[str, Any]) -> str:
  """How the module of namespace `home` runs: a vit_jax module by its name
  (``python -m vit_jax.<tool>``), any other file as a script by its path from
  the repository (``python benchmarks/<name>.py``)."""
  file = home.get('__file__')
  if not file or _PACKAGE in pathlib.Path(file).resolve().parents:
    spec = home.get('__spec__')
    return spec.name if spec else home['__name__']
  path = pathlib.Path(file).resolve()
  return str(path.relative_to(_REPO)) if _REPO in path.parents else str(path)


def _own_flags(fv: flags.FlagValues) -> list[str]:
  """The flags defined into `fv`: not absl's shared ones, not --config.key overrides."""
  return [f.name for fs in fv.flags_by_module_dict().values() for f in fs if '.' not in f.name]


def _flag_help(flag: Any) -> str:
  """absl's rendering of one flag: name, help, default, syntax."""
  name = f'--[no]{flag.name}' if flag.boolean else f'--{flag.name}'
  text = f'{name}: {flag.help}'
  lines = [flags.text_wrap(text, indent='    ', firstline_indent='  ')]
  if flag.default is not None and flag.default_as_str:
    lines.append(flags.text_wrap(f'(default: {flag.default_as_str})', indent='    '))
  syntax = flag.parser.syntactic_help if hasattr(flag.parser, 'syntactic_help') else ''
  if syntax and not flag.boolean:
    lines.append(flags.text_wrap(f'({syntax})', indent='    '))
  return '\n'.join(lines)


def _use_absl_logging(fv: flags.FlagValues) -> None:
  """What `absl.app.run` does for logging: absl's handler, INFO by default."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()  # absl's logging flags are parsed (shared with `fv`)
  logging.use_absl_handler()
  if fv['verbosity'].using_default_value:
    logging.set_verbosity(logging.INFO)
