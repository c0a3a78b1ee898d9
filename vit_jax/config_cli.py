"""Command-line config overrides that fail in one line and accept `None`.

`ml_collections.config_flags` parses `--config.key=value` with the type of
the key's current value, so `--config.optim.grad_clip_norm=None` (documented
as turning clipping off) was a parsing error, and an unknown key ended in a
55-line traceback. `vit_jax.cli` parses the command line of the tools that
take `--config` with these helpers:

  * `--config.<key>=None` sets an existing key to None (validation then says
    whether that key may be None);
  * an unknown key, or a value of the wrong type, prints one line naming the
    key (and the nearest valid keys) and exits with status 1.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from typing import Any

_OVERRIDE = re.compile(r'--config\.([A-Za-z_][\w.]*)=(.*)$', re.S)


def _keys(config: Any, prefix: str = '') -> list[str]:
  out = []
  for k in config.keys():
    v = config[k]
    out.append(prefix + k)
    if hasattr(v, 'keys') and callable(v.keys):
      out += _keys(v, f'{prefix}{k}.')
  return out


_MISSING = object()


def _get(tree: Any, key: str, default: Any = None) -> Any:
  """tree[a][b]... for the path 'a.b...', or `default` where the path ends."""
  for part in key.split('.'):
    if not hasattr(tree, 'keys') or part not in tree.keys():
      return default
    tree = tree[part]
  return tree


def _has(config: Any, key: str) -> bool:
  return _get(config, key, _MISSING) is not _MISSING


def nearest_keys(config: Any, key: str, n: int = 3) -> list[str]:
  """Close spellings first, then the keys beside it (its deepest valid parent's)."""
  parts = key.split('.')
  ancestors = {'.'.join(parts[:i]) for i in range(1, len(parts))}
  keys = [k for k in _keys(config) if k not in ancestors]
  near = difflib.get_close_matches(key, keys, n=n, cutoff=0.6)
  parent = max((a for a in ancestors if _has(config, a)), key=len, default='')
  siblings = [k for k in keys if k.rpartition('.')[0] == parent and k not in near]
  return near + siblings[:max(0, n + 2 - len(near))]


def set_none(config: Any, key: str) -> None:
  *parents, leaf = key.split('.')
  node = config
  for part in parents:
    node = node[part]
  if leaf not in node.keys():
    raise KeyError(key)
  setattr(node, leaf, None)


def describe_error(config: Any, args: Sequence[str], error: Exception) -> str:
  """One line: what is wrong with which --config override, and what is valid."""
  if config is not None:
    for arg in args:
      m = _OVERRIDE.match(arg)
      if m and not _has(config, m.group(1)):
        near = nearest_keys(config, m.group(1))
        return (f'unknown config key {m.group(1)!r} in {arg}' +
                (f'; nearest valid keys: {", ".join(near)}' if near else '') + '.')
  m = re.search(r'flag --config\.([\w.]+)=(.*?): (.*)', str(error), re.S)
  if m and config is not None and _has(config, m.group(1)):
    key, value, why = m.groups()
    node = config
    for part in key.split('.'):
      node = node[part]
    return (f'bad value {value!r} for config.{key} ({why.strip().splitlines()[0]}): '
            f'it takes {type(node).__name__} values like its current one, {node!r}'
            + (' (or None)' if node is None else '') + '.')
  return ' '.join(str(error).split())


def split_none_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """`argv` without its `--config.key=None` overrides, and those keys.

  ml_collections would parse 'None' with the type of the key's value; the
  caller sets the keys to None after parsing (`set_none`).
  """
  nones = [m.group(1) for a in argv[1:] if (m := _OVERRIDE.match(a)) and m.group(2) == 'None']
  rest = [a for a in argv if not ((m := _OVERRIDE.match(a)) and m.group(2) == 'None')]
  return rest, nones


_MODEL_OVERRIDE = re.compile(r'--config\.model\.([A-Za-z_][\w.]*)=(.*)$', re.S)
# Model fields the loop sets from the training config itself.
_MODEL_FIELDS_FROM_CONFIG = {'num_classes': 'config.num_classes', 'dtype': 'config.dtype'}


def split_model_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
  """`argv` without its `--config.model.<field>=<value>` overrides, and those.

  config.model lists only what a config changes in its preset, so a model
  field it does not mention (remat, attention, posemb, ...) is no key of it
  and ml_collections would refuse the override; the caller adds them after
  loading (`set_model_overrides`).
  """
  found = [(m.group(1), m.group(2)) for a in argv[1:] if (m := _MODEL_OVERRIDE.match(a))]
  return [a for a in argv if not _MODEL_OVERRIDE.match(a)], found


def _literal(raw: str, current: Any) -> Any:
  """A command-line value: a Python literal (12, 0.1, (16, 16), None, True), else a string."""
  import ast  # pylint: disable=g-import-not-at-top
  if isinstance(current, bool) and raw.lower() in ('true', 'false'):
    return raw.lower() == 'true'
  try:
    return ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    return raw


def _kind(value: Any) -> str:
  if isinstance(value, bool):
    return 'a bool'
  if isinstance(value, (int, float)):
    return 'a number'
  if isinstance(value, (tuple, list)):
    return 'a tuple'
  if isinstance(value, str):
    return 'a string'
  return 'a mapping' if hasattr(value, 'keys') else type(value).__name__


def set_model_overrides(config: Any, overrides: Sequence[tuple[str, str]]) -> None:
  """Sets each (field path, raw value) of `split_model_overrides` in
  config.model. The path's first part must be a model field (of any model
  class: `presets.model_fields`); a value must be of the kind of the one it
  replaces (in config.model, else in the preset). ValueError names the key."""
  if not overrides:
    return
  import ml_collections  # pylint: disable=g-import-not-at-top
  from vit_jax.models import presets  # pylint: disable=g-import-not-at-top
  fields = presets.model_fields()
  preset = presets.get_config(config.model_name) if config.get('model_name') else {}
  for key, raw in overrides:
    *parents, leaf = key.split('.')
    field = key.partition('.')[0]   # The model field the path starts at.
    arg = f'--config.model.{key}={raw}'
    if field in _MODEL_FIELDS_FROM_CONFIG:
      raise ValueError(f'{arg}: the model\'s {key} comes from '
                       f'{_MODEL_FIELDS_FROM_CONFIG[field]}; set that instead.')
    if field not in fields:
      near = difflib.get_close_matches(field, sorted(fields), n=3, cutoff=0.5)
      raise ValueError(f'unknown model field {field!r} in {arg}; '
                       f'{"nearest: " + ", ".join(near) if near else "fields: " + ", ".join(sorted(fields))}.')
    current = _get(config.get('model') or {}, key)
    if current is None:
      current = _get(preset, key)
    value = _literal(raw, current)
    if current is not None and value is not None and _kind(value) != _kind(current):
      raise ValueError(f'{arg}: model.{key} is {_kind(current)} ({current!r}), '
                       f'got {_kind(value)}.')
    with config.unlocked():
      if config.get('model') is None:
        config.model = ml_collections.ConfigDict()
      node = config.model
      for part in parents:
        if part not in node.keys() or node[part] is None:
          node[part] = ml_collections.ConfigDict()
        node = node[part]
      node[leaf] = value


def command_line_error(argv: Sequence[str], error: Exception) -> str:
  """One line for an error parsing `argv` (program name first) with `--config`."""
  return describe_error(_base_config(argv), argv[1:], error)


def _base_config(argv: Sequence[str]) -> Any:
  """The config file's config without overrides, or None if it does not load."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if spec is None:
    return None
  path, _, arg = spec.partition(':')
  try:
    module_spec = importlib.util.spec_from_file_location('_vit_jax_config', path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
  except Exception:  # pylint: disable=broad-except
    return None
