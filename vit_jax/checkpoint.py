"""Official `.npz` checkpoints: load, save, position-embedding resampling.

The files (``gs://vit_models/imagenet21k/ViT-B_16.npz``, ``gs://vit_models/augreg/...``)
are flat ``np.savez`` archives with '/'-joined keys. Since the model's
parameter tree equals that tree, loading is an unflatten plus two fix-ups:
key prefixes (``opt/target/``, ``params/``) and GroupNorm arrays stored as
(1, 1, 1, C). ``python -m vit_jax.checkpoint PATH`` describes a file.

No TensorFlow at import time: official names and URLs download without it
(vit_jax.download); other remote (``gs://``, ...) paths go through
``tf.io.gfile``, imported only when such a path is used, which needs the
``[train]`` extra (`_gfile`).
"""

from __future__ import annotations

import functools
import io
import json
import os
import sys
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import scipy.ndimage

from vit_jax import cli
from vit_jax.models import vit

PREFIXES = ('opt/target/', 'params/')
DOWNLOAD_HINT = (
    'Official checkpoints load by name and are downloaded once into '
    '$VIT_JAX_CACHE_DIR (default ~/.cache/vit_jax): ViT-B_16 (the paper\'s '
    'imagenet21k/ViT-B_16.npz), imagenet21k+imagenet2012/ViT-B_16, or an AugReg '
    'short name such as B_16 (vit_jax.download).')


def unreachable(host: str, port: int = 443, timeout: float = 10.0) -> str | None:
  """Why `host`:`port` cannot be reached within `timeout` seconds, or None.

  Without network, tf.io.gfile and TFDS downloads retry for minutes; one TCP
  connect with a timeout says so in seconds.
  """
  import concurrent.futures  # pylint: disable=g-import-not-at-top
  import socket  # pylint: disable=g-import-not-at-top

  def connect():
    socket.create_connection((host, port), timeout=timeout).close()

  pool = concurrent.futures.ThreadPoolExecutor(1)
  try:
    pool.submit(connect).result(timeout=timeout)
  except (OSError, concurrent.futures.TimeoutError) as e:
    return f'{host} is not reachable ({type(e).__name__}: {e})'
  finally:
    pool.shutdown(wait=False)
  return None


class CheckpointError(ValueError):
  """A checkpoint that is missing, unreadable or does not fit the model."""


# ---------------------------------------------------------------------------
# Tree helpers.
# ---------------------------------------------------------------------------


def flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x}."""
  flat = {}
  for k, v in tree.items():
    key = f'{prefix}{k}'
    if isinstance(v, Mapping):
      flat.update(flatten(v, key + '/'))
    else:
      flat[key] = v
  return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{'a/b': x} -> {'a': {'b': x}}."""
  tree: dict[str, Any] = {}
  for key, v in flat.items():
    node = tree
    *parents, leaf = key.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def _is_groupnorm(key: str) -> bool:
  # Hybrid ResNet GroupNorms: gn_root, gn1..gn3, gn_proj (the official R50+ViT files).
  parts = key.split('/')
  return len(parts) >= 2 and parts[-2].startswith('gn') and parts[-1] in ('scale', 'bias')


# ---------------------------------------------------------------------------
# File I/O.
# ---------------------------------------------------------------------------


def _is_remote(path: str) -> bool:
  return '://' in str(path)


def local_path(path: str) -> str:
  """An official name or URL -> its cached local copy (downloaded once, see
  vit_jax.download); any other path unchanged. Failures are CheckpointErrors."""
  from vit_jax import download  # pylint: disable=g-import-not-at-top
  try:
    return download.resolve(path)
  except download.DownloadError as e:
    raise CheckpointError(str(e)) from None


def _gfile(path: str):
  """tf.io.gfile, for a remote path that is not an official checkpoint.

  Without TensorFlow (a core install): a one-line CheckpointError naming the extra.
  """
  try:
    from tensorflow.io import gfile  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise CheckpointError(
        f"{path}: remote paths other than official checkpoints go through TensorFlow's "
        "tf.io.gfile: pip install 'vit_jax[train]', or copy the file and pass its local path."
    ) from None
  return gfile


def _read_bytes(path: str) -> bytes:
  path = local_path(path)
  if _is_remote(path):
    gfile = _gfile(path)
    try:
      with gfile.GFile(path, 'rb') as f:
        return f.read()
    except Exception as e:  # gfile raises a zoo of types; all mean "cannot read".
      raise CheckpointError(f'Cannot read checkpoint {path}: {e}\n{DOWNLOAD_HINT}') from e
  if not os.path.exists(path):
    raise CheckpointError(f'Checkpoint not found: {path}\n{DOWNLOAD_HINT}')
  if os.path.isdir(path):
    npz = sorted(n for n in os.listdir(path) if n.endswith('.npz'))
    raise CheckpointError(
        f'Checkpoint {path} is a directory, not a .npz file. '
        + (f'It holds {", ".join(npz[:3])}: point at one of them.' if npz else
           'A training workdir\'s orbax checkpoints/ are for resuming; its '
           'export is <workdir>/<model_name>.npz.'))
  with open(path, 'rb') as f:
    return f.read()


def _keys(keys: Sequence[str], limit: int = 8) -> str:
  keys = list(keys)
  return ', '.join(keys[:limit]) + (f' and {len(keys) - limit} more' if len(keys) > limit else '')


def _as_float(key: str, value: np.ndarray) -> np.ndarray | str:
  """float16 / bfloat16 -> float32, float32/64 as they are; else why not."""
  if value.dtype.kind == 'f':
    return value.astype(np.float32) if value.dtype.itemsize < 4 else value
  if value.dtype.kind == 'V' and value.dtype.itemsize == 2 and value.dtype.names is None:
    # np.savez writes bfloat16 (which numpy cannot name) as 2-byte void.
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    return value.view(ml_dtypes.bfloat16).astype(np.float32)
  names = {'i': 'integer', 'u': 'integer', 'b': 'boolean', 'U': 'string',
           'S': 'string', 'O': 'object', 'c': 'complex'}
  return f'{key} ({names.get(value.dtype.kind, "non-float")} {value.dtype})'


def check_values(flat: Mapping[str, Any], path: str) -> dict[str, np.ndarray]:
  """Float arrays only (float16/bfloat16 upcast to float32), all finite.

  Integer, boolean, string or object arrays and NaN/Inf values are refused
  naming the keys: such a file would otherwise fine-tune into nonsense or
  evaluate to NaN without an error.
  """
  out, wrong = {}, []
  for key, value in flat.items():
    v = _as_float(key, np.asarray(value))
    if isinstance(v, str):
      wrong.append(v)
    else:
      out[key] = v
  if wrong:
    raise CheckpointError(
        f'Checkpoint {path} holds arrays that are not floating point: '
        f'{_keys(wrong)}. Parameters must be float32, float16 or bfloat16; '
        'was it written by something else than a model (or cast to int)?')
  bad = [f'{k} ({int(np.sum(np.isnan(v)))} NaN, {int(np.sum(np.isinf(v)))} Inf '
         f'of {v.size})' for k, v in out.items() if not np.all(np.isfinite(v))]
  if bad:
    raise CheckpointError(
        f'Checkpoint {path} has non-finite values in {len(bad)} arrays: '
        f'{_keys(bad)}. A model with NaN/Inf parameters gives no meaningful '
        'output: use the checkpoint of a run that did not diverge.')
  return out


def load_flat(path: str) -> dict[str, np.ndarray]:
  """Reads a `.npz` into {'a/b/c': float array}, prefixes intact (see check_values)."""
  data = _read_bytes(path)

  def unreadable(e: Exception) -> CheckpointError:
    return CheckpointError(
        f'Checkpoint {path} is not a readable .npz archive (truncated or corrupt? '
        f'{len(data)} bytes; {type(e).__name__}: {e}). Download it again.')

  flat, objects = {}, []
  try:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
      for k in npz.files:
        try:
          flat[k] = npz[k]
        except ValueError as e:
          if 'allow_pickle' not in str(e):
            raise
          objects.append(f'{k} (object array)')
  except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
    raise unreadable(e) from e
  if objects:
    raise CheckpointError(
        f'Checkpoint {path} holds arrays that are not floating point: '
        f'{_keys(objects)}. Parameters must be float32, float16 or bfloat16.')
  return check_values(flat, path)


def load_variables(path: str) -> dict[str, Any]:
  """Loads {'params': tree[, 'batch_stats': tree]} from an `.npz`.

  Accepts the official flat layout and the `opt/target/` / `params/` prefixed
  ones; GroupNorm arrays of shape (1, 1, 1, C) become (C,).
  """
  flat = load_flat(path)
  params, batch_stats = {}, {}
  for key, value in flat.items():
    if key.startswith('batch_stats/'):
      batch_stats[key[len('batch_stats/'):]] = value
      continue
    for prefix in PREFIXES:
      if key.startswith(prefix):
        key = key[len(prefix):]
        break
    if _is_groupnorm(key) and value.ndim == 4:
      value = value.reshape(-1)
    params[key] = value
  if not params:
    raise CheckpointError(f'Checkpoint {path} holds no parameters.')
  variables = {'params': unflatten(params)}
  if batch_stats:
    variables['batch_stats'] = unflatten(batch_stats)
  return variables


def load(path: str) -> dict[str, Any]:
  """Loads the parameters of an official-layout `.npz` as a nested dict."""
  return load_variables(path)['params']


def save(params: Mapping[str, Any], path: str,
         batch_stats: Mapping[str, Any] | None = None,
         model_config: Any = None) -> str:
  """Writes `params` in the official layout; ``load(save(p))`` is bit-identical.

  The write is atomic (temp file + rename) for local paths. BatchNorm models
  (ResNet-56) add `batch_stats/...` keys, which `load` ignores. With
  `model_config`, the sidecar ``<path minus .npz>.json`` records the
  architecture, so that `infer_model` (fine-tuning, predict) needs no
  `model_name`.
  """
  flat = {}
  for key, value in flatten(params).items():
    value = np.asarray(value)
    if _is_groupnorm(key) and value.ndim == 1:
      value = value.reshape(1, 1, 1, -1)
    flat[key] = value
  if batch_stats is not None:
    flat.update({f'batch_stats/{k}': np.asarray(v) for k, v in flatten(batch_stats).items()})
  buf = io.BytesIO()
  np.savez(buf, **flat)
  path = os.fspath(path)
  _write(path, buf.getvalue())
  if model_config is not None:
    write_sidecar(path, model_config)
  return path


def _write(path: str, data: bytes) -> None:
  """Atomic for local paths (temp file + rename); gs:// through tf.io.gfile."""
  if _is_remote(path):
    gfile = _gfile(path)
    with gfile.GFile(path, 'wb') as f:
      f.write(data)
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  # Written under a temporary name and renamed: a reader never sees half a
  # file; a run killed in between leaves `<path>.tmp-<pid>`, which the next
  # training launch on the workdir removes (vit_jax.workdir).
  tmp = f'{path}.tmp-{os.getpid()}'
  try:
    with open(tmp, 'wb') as f:
      f.write(data)
    os.replace(tmp, path)
  except OSError as e:
    try:
      os.remove(tmp)
    except OSError:
      pass
    raise CheckpointError(
        f'Cannot write {path} ({len(data) / 2**20:.1f} MiB): '
        f'{e.strerror or e}. Free space (or choose another directory) and run '
        'again; nothing was half-written.') from e


# ---------------------------------------------------------------------------
# Sidecar: the architecture of a file, next to it.
# ---------------------------------------------------------------------------


def sidecar_path(path: str) -> str:
  """'dir/ViT-B_16.npz' -> 'dir/ViT-B_16.json'."""
  path = os.fspath(path)
  return (path[:-4] if path.endswith('.npz') else path) + '.json'


def write_sidecar(path: str, model_config: Any, **fields: Any) -> str:
  """Writes the sidecar `.json` of checkpoint `path`: {"model": model_config, **fields}.

  `fields` are what `vit_jax.export.sidecar_record` adds: num_classes,
  preprocessing, timm (or timm_unsupported).
  """
  cfg = model_config.to_dict() if hasattr(model_config, 'to_dict') else dict(model_config)
  record = {'model': cfg, **fields}
  text = json.dumps(record, indent=2, sort_keys=True, default=list) + '\n'
  out = sidecar_path(path)
  _write(out, text.encode())
  return out


def read_sidecar(path: str) -> dict[str, Any] | None:
  """The whole record next to checkpoint `path` ({"model": ..., ...}), or None.

  Besides "model" (always there) a record may hold "num_classes",
  "preprocessing" ({"image_size": [h, w], "pp_eval", "crop_fraction"}),
  "timm" (the `timm.create_model` arguments) or "timm_unsupported" (why
  not); older sidecars hold "model" only. A `.json` of another kind next to
  the file (no "model" object) is not ours and is ignored.
  """
  side = sidecar_path(path)
  if _is_remote(side):
    gfile = _gfile(side)
    if not gfile.exists(side):
      return None
    with gfile.GFile(side, 'rb') as f:
      text = f.read()
  elif os.path.isfile(side):
    with open(side, 'rb') as f:
      text = f.read()
  else:
    return None
  try:
    record = json.loads(text)
  except ValueError:
    return None
  if not isinstance(record, dict) or not isinstance(record.get('model'), dict):
    return None
  return record


# ---------------------------------------------------------------------------
# Position embeddings.
# ---------------------------------------------------------------------------


def _grid(num: int, grid: Sequence[int] | None, what: str) -> tuple[int, int]:
  if grid is not None:
    gh, gw = grid
    if gh * gw != num:
      raise ValueError(f'{what} grid {tuple(grid)} does not hold {num} tokens.')
    return int(gh), int(gw)
  g = int(round(np.sqrt(num)))
  if g * g != num:
    raise ValueError(f'{what} has {num} patch tokens, not a square grid: pass the grid.')
  return g, g


def interpolate_posembed(posemb: np.ndarray, num_tokens: int, has_class_token: bool | int,
                         *, old_grid: Sequence[int] | None = None,
                         new_grid: Sequence[int] | None = None) -> np.ndarray:
  """Resizes a (1, T, D) position embedding to `num_tokens` tokens.

  As in the original: keep the class-token embedding, reshape the rest to its
  grid and resample with ``scipy.ndimage.zoom(order=1)`` (bilinear with the
  corners aligned). Grids are square unless `old_grid` / `new_grid` say
  otherwise (e.g. (14, 24) for 224x384 inputs), which the original cannot do.
  An int `has_class_token` counts the prefix tokens kept (2 for DeiT).
  """
  posemb = np.asarray(posemb)
  if posemb.ndim != 3 or posemb.shape[0] != 1:
    raise ValueError(f'expected a (1, T, D) position embedding, got {posemb.shape}')
  ntok = int(has_class_token)
  tok, grid = posemb[:, :ntok], posemb[0, ntok:]
  gh, gw = _grid(grid.shape[0], old_grid, 'Checkpoint position embedding')
  nh, nw = _grid(num_tokens - ntok, new_grid, 'Model position embedding')
  grid = grid.reshape(gh, gw, -1)
  grid = scipy.ndimage.zoom(grid, (nh / gh, nw / gw, 1), order=1)
  return np.concatenate([tok, grid.reshape(1, nh * nw, -1)], axis=1).astype(posemb.dtype)


# ---------------------------------------------------------------------------
# Fine-tuning.
# ---------------------------------------------------------------------------

POSEMB_KEY = 'Transformer/posembed_input/pos_embedding'
# posemb='learn2d' (paper App. D.4): one table per grid axis, (1, g, D/2).
POSEMB_2D_KEYS = ('Transformer/posembed_input/row_embedding',
                  'Transformer/posembed_input/col_embedding')


def interpolate_axis_embedding(table: np.ndarray, length: int) -> np.ndarray:
  """Resizes a (1, g, D') per-axis table of posemb='learn2d' to `length` rows.

  The 1-D counterpart of `interpolate_posembed`: `scipy.ndimage.zoom(order=1)`
  along the grid axis (linear with the ends aligned), so a 2-D table built
  from the resized row and column tables equals the bilinear resize of the
  table built from the originals.
  """
  table = np.asarray(table)
  if table.ndim != 3 or table.shape[0] != 1:
    raise ValueError(f'expected a (1, g, D) axis embedding, got {table.shape}')
  return scipy.ndimage.zoom(table, (1, length / table.shape[1], 1), order=1).astype(table.dtype)


def fit_position_embeddings(restored: Mapping[str, Any], expected: Mapping[str, Any],
                            model_config: Any, *, grid: Sequence[int] | None = None
                            ) -> dict[str, Any]:
  """`restored` (flat) with its position embeddings resized to `expected`'s shapes.

  The one posemb resize, for fine-tuning at a new resolution (load_pretrained)
  and for running a checkpoint at one (vit_jax.hub): the prefix tokens
  (`vit.num_prefix_tokens`: class, DeiT distillation) are kept, the grid is
  resampled (`interpolate_posembed`), and posemb='learn2d' resizes its row and
  column tables (`interpolate_axis_embedding`). `grid` is the new (rows,
  columns) for non-square grids. Entries that already fit, or that differ in
  more than the token count, are left for `shape_diff` to report.
  """
  out = dict(restored)
  if POSEMB_KEY in out and POSEMB_KEY in expected:
    old, new = np.asarray(out[POSEMB_KEY]), tuple(np.shape(expected[POSEMB_KEY]))
    if old.shape != new and old.shape[2:] == new[2:]:
      out[POSEMB_KEY] = interpolate_posembed(old, new[1], vit.num_prefix_tokens(model_config),
                                             new_grid=grid)
  for key in POSEMB_2D_KEYS:
    if key in out and key in expected:
      old, new = np.asarray(out[key]), tuple(np.shape(expected[key]))
      if old.shape != new and old.shape[2:] == new[2:]:
        out[key] = interpolate_axis_embedding(old, new[1])
  return out


def shape_diff(restored: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
  lines = []
  missing = sorted(set(expected) - set(restored))
  unexpected = sorted(set(restored) - set(expected))
  mismatched = sorted(k for k in set(expected) & set(restored)
                      if tuple(np.shape(expected[k])) != tuple(np.shape(restored[k])))
  for title, keys in (('missing in checkpoint', missing), ('unexpected in checkpoint', unexpected)):
    if keys:
      lines.append(f'  {title} ({len(keys)}): ' + ', '.join(keys[:12]) +
                   (' ...' if len(keys) > 12 else ''))
  if mismatched:
    lines.append(f'  shape mismatch ({len(mismatched)}):')
    lines += [f'    {k}: checkpoint {tuple(np.shape(restored[k]))} vs model '
              f'{tuple(np.shape(expected[k]))}' for k in mismatched[:12]]
    if len(mismatched) > 12:
      lines.append(f'    ... and {len(mismatched) - 12} more')
  return lines


# The classifier heads a fine-tune replaces (head_dist: DeiT's distillation head).
HEADS = ('head', 'head_dist')


def load_pretrained(pretrained_path: str, init_params: Mapping[str, Any], model_config: Any,
                    *, grid: Sequence[int] | None = None) -> dict[str, Any]:
  """Loads a pre-trained checkpoint into the shape of `init_params` for a
  fine-tune: `fit(..., new_head=True)`, or CheckpointError with a readable diff."""
  return fit(load(pretrained_path), init_params, model_config, grid=grid, new_head=True,
             source=f'Checkpoint {pretrained_path}', path=pretrained_path)


def fit(params: Mapping[str, Any], expected: Mapping[str, Any], model_config: Any, *,
        grid: Sequence[int] | None = None, new_head: bool = False,
        source: str = 'Checkpoint', path: str | None = None) -> dict[str, Any]:
  """`params` (a tree) in the keys, shapes and dtypes of `expected` (a tree of
  arrays or jax.ShapeDtypeStructs, e.g. the `jax.eval_shape` of a model's init).

  The one mechanism for a checkpoint meeting a model, at training's start
  (load_pretrained) and in vit_jax.hub:
  * the position embeddings are resampled to the model's grid
    (`fit_position_embeddings`; pass `grid` for non-square grids);
  * `pre_logits` is dropped when the model has none (representation_size=None);
  * `new_head`: the checkpoint's head is replaced by a zero-initialised one of
    the model's shape (paper App. B.1.1: "we remove the pre-trained prediction
    head and attach a zero-initialized D x K feedforward layer").
  Anything else that differs is a CheckpointError listing the missing,
  unexpected and mis-shaped keys.
  """
  restored = flatten(params)
  expected = flatten(expected)
  is_head = lambda k: k.split('/')[0] in HEADS
  if not any(k.startswith('pre_logits/') for k in expected):
    restored = {k: v for k, v in restored.items() if not k.startswith('pre_logits/')}
  if new_head:
    restored = {k: v for k, v in restored.items() if not is_head(k)}
    restored.update({k: np.zeros(np.shape(v), v.dtype) for k, v in expected.items() if is_head(k)})

  restored = fit_position_embeddings(restored, expected, model_config, grid=grid)

  diff = shape_diff(restored, expected)
  if diff and any(k.endswith('/rel_embedding') for k in restored):
    diff.append('  posemb=rel: relative embeddings have one row per offset of the token '
                'sequence (2T-1) and are not resized; fine-tune at the pre-training '
                'resolution, or pre-train with posemb=learn2d / learn.')
  if diff:
    raise CheckpointError(_misfit(source, path, unflatten(restored), model_config, diff))
  return unflatten({k: np.asarray(v, dtype=expected[k].dtype) for k, v in restored.items()})


# ---------------------------------------------------------------------------
# Inspection: `python -m vit_jax.checkpoint PATH`.
# ---------------------------------------------------------------------------


def describe(params: Mapping[str, Any]) -> dict[str, Any]:
  """Architecture facts readable off a parameter tree."""
  flat = flatten(params)
  t = params.get('Transformer', {})
  blocks = sorted(k for k in t if k.startswith('encoderblock_'))
  info: dict[str, Any] = {'num_params': int(sum(np.size(v) for v in flat.values()))}
  if 'embedding' in params and 'kernel' in params['embedding']:
    kh, kw, _, d = np.shape(params['embedding']['kernel'])
    info.update(patch_size=(kh, kw), hidden_size=d)
  if blocks:
    b0 = t[blocks[0]]
    info.update(num_layers=len(blocks),
                num_heads=np.shape(b0['MultiHeadDotProductAttention_1']['query']['kernel'])[1],
                mlp_dim=np.shape(b0['MlpBlock_3']['Dense_0']['kernel'])[1])
  stages = sorted((k for k in params if k.startswith('block') and k[5:].isdigit()),
                  key=lambda k: int(k[5:]))
  info['resnet_layers'] = tuple(len(params[s]) for s in stages) if stages else None
  info['representation_size'] = (np.shape(params['pre_logits']['kernel'])[-1]
                                 if 'pre_logits' in params else None)
  info['num_classes'] = np.shape(params['head']['kernel'])[-1] if 'head' in params else None
  return info


class _Shape(NamedTuple):
  shape: tuple[int, ...]


def _shapes(params: Mapping[str, Any]) -> dict[str, _Shape]:
  """{'a/b': _Shape(shape)}: `shape_diff` reads `.shape` (np.shape does)."""
  return {k: _Shape(tuple(np.shape(v))) for k, v in flatten(params).items()}


@functools.lru_cache(maxsize=64)
def _model_shapes(model_json: str) -> dict[str, _Shape]:
  """Parameter shapes of a model config (abstract init: no memory, no FLOPs)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from vit_jax import models  # pylint: disable=g-import-not-at-top
  model = models.get_model(json.loads(model_json), num_classes=1)
  variables = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)), train=False))
  return _shapes(variables['params'])


def _config_json(model_config: Any) -> str:
  cfg = model_config.to_dict() if hasattr(model_config, 'to_dict') else dict(model_config)
  return json.dumps(cfg, sort_keys=True, default=list)


def arch_diff(params: Mapping[str, Any], model_config: Any) -> list[str]:
  """Why `params` cannot be fine-tuned as `model_config` ([] if they can).

  Compares what `load_pretrained` keeps: every key and shape, except the
  head (always replaced), `pre_logits` when the model has none (dropped) and
  the number of position-embedding tokens (resampled).
  """
  got, want = _shapes(params), _model_shapes(_config_json(model_config))
  is_head = lambda k: k.split('/')[0] in HEADS
  got = {k: v for k, v in got.items() if not is_head(k)}
  want = {k: v for k, v in want.items() if not is_head(k)}
  if vit.config_value(model_config, 'representation_size') is None:
    got = {k: v for k, v in got.items() if not k.startswith('pre_logits/')}
  for shapes in (got, want):
    for key in (POSEMB_KEY, *POSEMB_2D_KEYS):
      shape = shapes[key].shape if key in shapes else ()
      if len(shape) == 3:  # Any number of tokens: resampled to the model's.
        shapes[key] = _Shape((shape[0], -1, shape[2]))
  return shape_diff(got, want)


def num_backbone_params(model_config: Any) -> int:
  """Parameter count of a model config without the head and the position
  embeddings (they depend on the data and the resolution)."""
  return sum(int(np.prod(v.shape)) for k, v in _model_shapes(_config_json(model_config)).items()
             if k.split('/')[0] not in ('head', 'head_dist') and k != POSEMB_KEY)


def match_preset(params: Mapping[str, Any]) -> list[str]:
  """Presets whose architecture the parameters fit exactly (`arch_diff`)."""
  from vit_jax.models import presets  # pylint: disable=g-import-not-at-top
  info = describe(params)
  names = []
  for name, cfg in presets.MODEL_CONFIGS.items():
    if cfg.get('model_type', 'vit') != 'vit' or info.get('num_layers') is None:
      continue
    resnet = cfg.get('resnet')
    # A cheap filter on the headline numbers, then the exact tree.
    if (tuple(cfg.patches.size) == tuple(info.get('patch_size', ())) and
        cfg.hidden_size == info.get('hidden_size') and
        cfg.transformer.num_layers == info['num_layers'] and
        cfg.transformer.num_heads == info['num_heads'] and
        cfg.transformer.mlp_dim == info['mlp_dim'] and
        (tuple(resnet.num_layers) if resnet else None) == info['resnet_layers'] and
        not arch_diff(params, cfg)):
      names.append(name)
  return names


def _misfit(what: str, path: str | None, params: Mapping[str, Any], model_config: Any,
            diff: list[str]) -> str:
  """The message for a checkpoint that does not fit: what it is instead, then the diff."""
  model = vit.config_value(model_config, 'model_name') or 'model'
  try:
    name = infer_model(path if path else params).get('model_name')
  except CheckpointError:
    name = None
  if name is None:
    hint = '; it is another architecture'
  elif name != model:
    hint = (f'; it is another architecture: a {name}. Drop config.model_name (and '
            'config.model) to take the architecture from the checkpoint')
  else:
    hint = ''   # The same architecture: the entries below say what differs.

  return f'{what} does not fit the model {model}{hint}.\n' + '\n'.join(diff)


def infer_model(params_or_path: Mapping[str, Any] | str | os.PathLike,
                model: Any = None) -> Any:
  """The model config (an ml_collections.ConfigDict) of a checkpoint.

  The one place that decides which architecture a checkpoint is:
  1. `model` (a preset name or a model config) given: it must fit the file
     (`arch_diff`), else CheckpointError saying what the file is instead.
  2. The sidecar ``<file>.json`` that every export writes (and that ships
     next to checkpoints/*.npz) names it.
  3. Otherwise exactly one preset must have the file's parameter tree (keys
     and shapes); none or several is a CheckpointError (several: listed).
  """
  import ml_collections  # pylint: disable=g-import-not-at-top

  from vit_jax.models import presets  # pylint: disable=g-import-not-at-top
  path = os.fspath(params_or_path) if isinstance(params_or_path, (str, os.PathLike)) else None
  if path:
    path = local_path(path)
  params = load(path) if path else params_or_path
  what = f'Checkpoint {path}' if path else 'The parameters'

  def recorded() -> tuple[Any, str] | None:
    side = read_sidecar(path) if path else None
    if side is None:
      return None
    cfg = ml_collections.ConfigDict(side['model'])
    diff = arch_diff(params, cfg)
    if diff:
      raise CheckpointError(
          f'{what} does not fit the model its sidecar {sidecar_path(path)} describes '
          f'({cfg.get("model_name")}); the sidecar is stale: delete it.\n' + '\n'.join(diff))
    return cfg, f'its sidecar {sidecar_path(path)}'

  if model is not None:
    cfg = presets.get_config(model)
    diff = arch_diff(params, cfg)
    if not diff:
      return cfg
    raise CheckpointError(_misfit(what, path, params, cfg, diff))

  found = recorded()
  if found is not None:
    return found[0]
  names = match_preset(params)
  if len(names) == 1:
    return presets.get_config(names[0])
  if names:
    raise CheckpointError(f'{what} fits several presets: {", ".join(names)}. Set '
                          f'config.model_name to the one it is.')
  facts = ', '.join(f'{k} {v}' for k, v in describe(params).items()
                    if k != 'num_classes' and v is not None)
  raise CheckpointError(
      f'{what} matches none of the presets ({facts}) and has no sidecar '
      f'{sidecar_path(path) if path else ""}. Set config.model_name to a preset, or '
      'config.model to its full model config.')


@cli.command(positional='checkpoint', metavar='PATH.npz|NAME', min_args=1,
             max_args=1)
def main(args: cli.Args) -> None:
  """Prints the parameters (name, shape, dtype, size, mean, std), architecture and
  matching preset of a checkpoint.

  A local .npz, or an official name (ViT-B_16, imagenet21k+imagenet2012/ViT-B_16,
  AugReg B_16, ...) downloaded once into $VIT_JAX_CACHE_DIR.
  """
  variables = load_variables(args.checkpoint)
  params = variables['params']
  from clu import parameter_overview  # pylint: disable=g-import-not-at-top
  print(parameter_overview.get_parameter_overview(params, include_stats=True))
  info = describe(params)
  print()
  for k, v in info.items():
    print(f'{k}: {v:,}' if k == 'num_params' else f'{k}: {v}')
  if 'batch_stats' in variables:
    print('batch_stats: yes')
  try:
    print('preset:', infer_model(args.checkpoint).get('model_name'))
  except CheckpointError as e:
    print(f'preset: unknown ({e})')


if __name__ == '__main__':
  sys.exit(main())
