"""Export a training checkpoint (any step) to an official-layout ``.npz``.

The original code could not do this, and it was its most asked question::

  python -m vit_jax.export --workdir=/tmp/vit_cifar10 --out=model.npz           # latest step
  python -m vit_jax.export --workdir=/tmp/vit_cifar10 --step=500 --out=s500.npz

The export rule, the same for training's final export and for this command
(`write`): with Polyak averaging (config.polyak_decay) the file holds the
averaged params and ``<name>_raw.npz`` beside it the raw ones; masked patch
prediction's ``mask_embedding`` is left out (vit_jax/models/mpp.py).

Training keeps orbax checkpoints of its whole state (step, params, optimizer
state, BatchNorm statistics) in ``workdir/checkpoints``. We read ONLY the
parameters (and ``batch_stats`` if any) with orbax's partial restore, as host
numpy arrays: no optimizer, no model code and no device mesh are needed, so a
checkpoint written on 8 GPUs exports on a laptop. The result is written by
``vit_jax.checkpoint.save``, i.e. the layout of ``gs://vit_models/*.npz``, and
read back to check that it is bit-identical; the sidecar ``<out minus .npz>.json``
records the architecture (from the workdir's config.json), so that
``--config.pretrained_path=<out>`` needs no model name.

The file is also what timm's ViT loader reads, so it moves to PyTorch as is
(``timm.create_model('vit_base_patch16_224', pretrained=True, num_classes=N,
pretrained_cfg_overlay=dict(file='model.npz'))``, see the README).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np
from absl import flags

from vit_jax import cli
from vit_jax.workdir import Workdir, WorkdirError

class ExportError(ValueError):
  """The checkpoint cannot be exported, and why."""


def raw_path(path: str) -> str:
  """Where the raw params go when `path` holds the Polyak average."""
  base, ext = os.path.splitext(path)
  return f'{base}_raw{ext or ".npz"}'


def write(path: str, params: Any, polyak: Any | None = None,
          batch_stats: Any | None = None, model_config: Any = None) -> list[str]:
  """Writes trained params in the official layout; returns the files written.

  `path` gets the Polyak average when there is one (what the paper reports),
  the raw params then going to `raw_path(path)`. `model_config` goes to the
  sidecar `checkpoint.save` writes.
  """
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from vit_jax.models import mpp  # pylint: disable=g-import-not-at-top
  kw = dict(batch_stats=batch_stats, model_config=model_config)
  if polyak is None:
    return [checkpoint.save(mpp.export_params(params), path, **kw)]
  return [checkpoint.save(mpp.export_params(polyak), path, **kw),
          checkpoint.save(mpp.export_params(params), raw_path(path), **kw)]


def _flat(tree: Any) -> dict[str, np.ndarray]:
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  return checkpoint.flatten(tree)


def export(workdir: str, out: str, step: int | None = None) -> tuple[int, str]:
  """Writes step ``step`` (default latest) of ``workdir`` to ``out``; returns (step, out).

  Raises ExportError unless the written file loads back bit-identically.
  """
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from vit_jax.models import mpp  # pylint: disable=g-import-not-at-top
  wd = Workdir(workdir)
  try:
    step, variables = wd.restore(step)
  except WorkdirError as e:
    raise ExportError(str(e)) from None
  write(out, variables['params'], variables.get('polyak'), variables.get('batch_stats'))
  back = checkpoint.load_variables(out)
  written = {'params': mpp.export_params(variables.get('polyak') or variables['params'])}
  if 'batch_stats' in variables:
    written['batch_stats'] = variables['batch_stats']
  for name in written:
    want, got = _flat(written[name]), _flat(back.get(name, {}))
    bad = sorted(k for k in want if k not in got or want[k].dtype != got[k].dtype or
                 not np.array_equal(want[k], got[k]))
    if bad or set(got) != set(want):
      raise ExportError(f'{out} does not load back identically ({name}: {bad[:5]}...).')
  # The sidecar: fine-tuning and predict take the architecture from it.
  if wd.is_run():
    import ml_collections  # pylint: disable=g-import-not-at-top

    from vit_jax import config_schema  # pylint: disable=g-import-not-at-top
    checkpoint.write_sidecar(out, config_schema.model_config(
        ml_collections.ConfigDict(wd.config())))
  return step, out


def default_out(workdir: str, step: int | None = None) -> str:
  """``workdir/<model_name>.npz`` (where predict/analysis look), or
  ``workdir/<model_name>_step<N>.npz`` for a step other than the latest
  (`Workdir.export_path`)."""
  wd = Workdir(workdir)
  return wd.export_path(step, None if wd.is_run() else 'model')


def define_flags(fv: flags.FlagValues) -> None:
  """The flags of ``python -m vit_jax.export``."""
  flags.DEFINE_string('workdir', None, 'Training workdir (or its checkpoints/).', flag_values=fv)
  flags.DEFINE_integer('step', None, 'Step to export (default: latest).', flag_values=fv)
  flags.DEFINE_string('out', None, 'Output .npz (default: WORKDIR/<model_name>.npz for the '
                      'latest step, WORKDIR/<model_name>_step<N>.npz otherwise).', flag_values=fv)
  flags.DEFINE_bool('list', False, 'List the available steps and exit.', flag_values=fv)
  flags.mark_flag_as_required('workdir', flag_values=fv)


@cli.command(define_flags)
def main(args: cli.Args) -> None:
  """Exports a step of a workdir (or lists the steps)."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.ERROR)  # orbax warns about read-only mode at INFO/WARNING
  if args.list:
    print(' '.join(map(str, Workdir(args.workdir).steps())))
    return
  step = args.step
  if step is not None and step == Workdir(args.workdir).steps()[-1]:
    step = None  # the latest step goes where predict looks
  out = args.out or default_out(args.workdir, step)
  step, out = export(args.workdir, out, args.step)
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  n = sum(np.size(v) for v in _flat(checkpoint.load(out)).values())
  print(f'exported step {step} of {args.workdir}: {n:,} parameters -> {out} '
        f'({os.path.getsize(out) / 2**20:.1f} MiB), verified bit-identical on reload')


if __name__ == '__main__':
  sys.exit(main())
