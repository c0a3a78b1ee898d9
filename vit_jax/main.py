r"""Command-line entry point: `python -m vit_jax.main --config=... --workdir=...`.

Examples (from the repository root):

  # The embedded quickstart: no network, a few minutes on 2 CPU cores.
  python -m vit_jax.main --config=configs/quickstart.py --workdir=/tmp/quickstart

  # The paper's fine-tuning recipe: ViT-B_16 (ImageNet-21k) -> CIFAR-10 @384.
  python -m vit_jax.main --config=configs/finetune_b16.py --workdir=/tmp/b16_c10 \
      --config.pretrained_path=/path/to/ViT-B_16.npz

  # Original-style selection, and any override on the command line.
  python -m vit_jax.main --config=configs/vit.py:b16,cifar100 --workdir=DIR \
      --config.accum_steps=16 --config.lr.base=0.01

  # Your own images (root/<class>/*.jpg, or root/train/ [+ root/test/ or
  # root/val/]) and any checkpoint: the architecture and recipe come from it.
  python -m vit_jax.main --config=configs/folder.py:/data/my_images --workdir=DIR \
      --config.pretrained_path=checkpoints/SmallViT_8-tiny_imagenet-32px.npz

Re-running the same command with the same --workdir resumes from the last
checkpoint at the exact step and data position. A relaunch that changes the
trajectory (model, data, optimizer, schedule, batch, seed, total_steps) is
refused, listing the changes; add --config.resume_changed=True to continue
with the new values anyway. A second run on a workdir in use is refused.
Config errors (unknown keys, bad values) are one line; `--config.key=None`
works for the keys documented as None-able (configs/common.py).

Multi-host (one process per host, same command everywhere):

  * GPU hosts: every process calls `jax.distributed.initialize`, done here when
    the flags or the environment say so. Under Slurm or Open MPI nothing is
    needed (auto-detected: `srun python -m vit_jax.main ...` or
    `mpirun -n N python -m vit_jax.main ...`, one process per host or per
    GPU). Elsewhere pass, on each host i of N:

      python -m vit_jax.main --config=... --workdir=gs://bucket/dir \
          --coordinator_address=host0:12345 --num_processes=N --process_id=i

    (or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).
  * TPU pods: run the same command on all workers, e.g.
      gcloud compute tpus tpu-vm ssh $TPU --zone=$ZONE --worker=all \
          --command="cd vit_jax && python -m vit_jax.main --config=... \
          --workdir=gs://bucket/dir --multihost"
    `--multihost` calls `jax.distributed.initialize()`, which reads the pod
    topology from the TPU metadata.
  * CPU (tests, debugging): as for GPUs, plus
    `--cpu_collectives=gloo`.

The workdir must be shared by all hosts (e.g. a gs:// bucket) for orbax
checkpoints; each process reads its own share of every batch; the global batch
is config.batch_size.
"""

from __future__ import annotations

import logging as std_logging
import os
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from vit_jax import config_cli

# `configs/*.py` import `configs.common`: make the repository root importable
# when running from elsewhere.
_REPO = pathlib.Path(__file__).resolve().parents[1]
if (_REPO / 'configs').is_dir() and str(_REPO) not in sys.path:
  sys.path.insert(0, str(_REPO))

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Training config file, e.g. configs/finetune_b16.py or '
    'configs/vit.py:b16,cifar10; override fields with --config.key=value.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Output directory: checkpoints, TensorBoard events, '
    'config.json, labels.txt and the exported <model_name>.npz. Re-using it '
    'resumes training.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', os.environ.get('JAX_COORDINATOR_ADDRESS'),
    'host:port of process 0, for multi-process runs.')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', int(os.environ.get('JAX_NUM_PROCESSES', '0')) or None,
    'Number of processes of a multi-process run.')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', (int(os.environ['JAX_PROCESS_ID'])
                   if 'JAX_PROCESS_ID' in os.environ else None),
    'Index of this process in a multi-process run.')
_MULTIHOST = flags.DEFINE_bool(
    'multihost', False, 'Call jax.distributed.initialize() with auto-detected '
    'arguments (TPU pods, Slurm, Open MPI).')
_VERBOSE = flags.DEFINE_bool(
    'verbose', False, 'Keep the start-up notices (JAX probing for a TPU, '
    "TensorFlow's oneDNN and C++ INFO/WARNING lines) and log tracebacks of errors.")
_CPU_COLLECTIVES = flags.DEFINE_enum(
    'cpu_collectives', None, ['gloo', 'mpi'],
    'Cross-process collectives on CPU (multi-process CPU runs only).')


def init_distributed() -> None:
  """Joins a multi-process run when flags or environment ask for one."""
  import jax  # pylint: disable=g-import-not-at-top
  if _CPU_COLLECTIVES.value:
    jax.config.update('jax_cpu_collectives_implementation',
                      _CPU_COLLECTIVES.value)
  if _COORDINATOR.value or _NUM_PROCESSES.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  elif _MULTIHOST.value or _launched_with_several_tasks():
    jax.distributed.initialize()  # Arguments detected from the environment.


def _launched_with_several_tasks() -> bool:
  """Slurm (srun) or Open MPI (mpirun) started more than one process."""
  env = os.environ
  return (int(env.get('SLURM_NTASKS', '1')) > 1 and 'SLURM_JOB_ID' in env) or \
      int(env.get('OMPI_COMM_WORLD_SIZE', '1')) > 1


def quiet_start_up(verbose: bool) -> None:
  """Drops the notices every run would print, unless --verbose.

  JAX logs "Unable to initialize backend 'tpu'" when it probes for a TPU on
  a machine without one; TensorFlow announces oneDNN and logs C++ INFO lines.
  """
  if verbose:
    return
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  std_logging.getLogger('jax._src.xla_bridge').setLevel(std_logging.WARNING)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError('Both --config and --workdir are required, e.g. '
                         '--config=configs/quickstart.py --workdir=/tmp/qs')
  quiet_start_up(_VERBOSE.value)
  init_distributed()
  import jax  # pylint: disable=g-import-not-at-top

  from vit_jax import train  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  logging.info('JAX %s: process %d of %d, %d local / %d global devices (%s).',
               jax.__version__, jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  try:
    metrics = train.train_and_evaluate(config, _WORKDIR.value)
  except (ValueError, FloatingPointError) as e:
    # User errors (bad config, missing checkpoint or data, divergence): a
    # clear message instead of a traceback (--verbose logs it).
    (logging.info if _VERBOSE.value else logging.debug)('Traceback:', exc_info=True)
    logging.error('%s: %s', type(e).__name__, e)
    print(f'\nERROR ({type(e).__name__}): {e}', file=sys.stderr)
    sys.exit(1)
  summary = ', '.join(f'{k}={v:.4f}' if isinstance(v, float) else f'{k}={v}'
                      for k, v in metrics.items())
  print(f'Final: {summary}')
  if 'accuracy_test_scratch' in metrics:  # config.scratch_baseline
    print(f'\nAfter {metrics["step"]} steps, accuracy_test:\n'
          f'  fine-tuned from {config.pretrained_path}: '
          f'{metrics["accuracy_test"]:.4f}\n'
          f'  from scratch:  {metrics["accuracy_test_scratch"]:.4f}')


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  # One-line errors for unknown keys and bad values; `--config.key=None`.
  app.run(main, flags_parser=config_cli.flags_parser(_CONFIG))
