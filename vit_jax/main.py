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
import sys

from absl import flags, logging

from vit_jax import cli


def define_flags(fv: flags.FlagValues) -> None:
  """The flags of ``python -m vit_jax.main`` besides --config (`cli.command`)."""
  flags.DEFINE_string(
      'workdir', None, 'Output directory: checkpoints, TensorBoard events, '
      'config.json, labels.txt and the exported <model_name>.npz. Re-using it '
      'resumes training.', flag_values=fv)
  flags.DEFINE_string(
      'coordinator_address', os.environ.get('JAX_COORDINATOR_ADDRESS'),
      'host:port of process 0, for multi-process runs.', flag_values=fv)
  flags.DEFINE_integer(
      'num_processes', int(os.environ.get('JAX_NUM_PROCESSES', '0')) or None,
      'Number of processes of a multi-process run.', flag_values=fv)
  flags.DEFINE_integer(
      'process_id', (int(os.environ['JAX_PROCESS_ID'])
                     if 'JAX_PROCESS_ID' in os.environ else None),
      'Index of this process in a multi-process run.', flag_values=fv)
  flags.DEFINE_bool(
      'multihost', False, 'Call jax.distributed.initialize() with auto-detected '
      'arguments (TPU pods, Slurm, Open MPI).', flag_values=fv)
  flags.DEFINE_bool(
      'verbose', False, 'Keep the start-up notices (JAX probing for a TPU, '
      "TensorFlow's oneDNN and C++ INFO/WARNING lines) and log tracebacks of errors.",
      flag_values=fv)
  flags.DEFINE_enum(
      'cpu_collectives', None, ['gloo', 'mpi'],
      'Cross-process collectives on CPU (multi-process CPU runs only).', flag_values=fv)


def init_distributed(args: cli.Args) -> None:
  """Joins a multi-process run when flags or environment ask for one."""
  import jax  # pylint: disable=g-import-not-at-top
  if args.cpu_collectives:
    jax.config.update('jax_cpu_collectives_implementation', args.cpu_collectives)
  if args.coordinator_address or args.num_processes:
    jax.distributed.initialize(coordinator_address=args.coordinator_address,
                               num_processes=args.num_processes,
                               process_id=args.process_id)
  elif args.multihost or _launched_with_several_tasks():
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


@cli.command(define_flags, config='Training config file, e.g. configs/finetune_b16.py or '
             'configs/vit.py:b16,cifar10; override fields with --config.key=value.', log=True)
def main(args: cli.Args) -> None:
  """Trains and evaluates --config into --workdir; prints the final metrics."""
  if args.config is None or args.workdir is None:
    raise cli.UsageError('Both --config and --workdir are required, e.g. '
                         '--config=configs/quickstart.py --workdir=/tmp/qs')
  quiet_start_up(args.verbose)
  init_distributed(args)
  import jax  # pylint: disable=g-import-not-at-top

  from vit_jax import train  # pylint: disable=g-import-not-at-top

  config = args.config
  logging.info('JAX %s: process %d of %d, %d local / %d global devices (%s).',
               jax.__version__, jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  try:
    metrics = train.train_and_evaluate(config, args.workdir)
  except cli.USER_ERRORS as e:
    # User errors (bad config, missing checkpoint or data, divergence): one
    # ERROR line (cli) instead of a traceback (--verbose prints it), and in the log.
    logging.error('%s: %s', type(e).__name__, e)
    raise
  summary = ', '.join(f'{k}={v:.4f}' if isinstance(v, float) else f'{k}={v}'
                      for k, v in metrics.items())
  print(f'Final: {summary}')
  if 'accuracy_test_scratch' in metrics:  # config.scratch_baseline
    print(f'\nAfter {metrics["step"]} steps, accuracy_test:\n'
          f'  fine-tuned from {config.pretrained_path}: '
          f'{metrics["accuracy_test"]:.4f}\n'
          f'  from scratch:  {metrics["accuracy_test_scratch"]:.4f}')


if __name__ == '__main__':
  sys.exit(main())
