r"""Input pipeline throughput: training images/sec per host core.

  python benchmarks/input_pipeline.py [--resolutions 224,384] [--batches 20]

Times `input_pipeline.make_train_iter` (decode, the paper's fine-tuning
augmentation `inception_crop` + flip, resize, batching, conversion to numpy)
on the real JPEG folders of ../shared/data: CIFAR-10 (32x32 JPEGs) and
Tiny-ImageNet (64x64 JPEGs, its val split). Archives are extracted once into
--cache. The figure per host core is images/sec over the cores tf.data may
use (os.cpu_count()), then compared with the rates one H100 trains ViT-B/16
at (benchmarks/results/h100-2026-11-26-gpu_vs_timm.txt): how many host
cores keep that GPU busy. Small source JPEGs decode fast; ImageNet-sized
JPEGs (~500x375) cost several times more per image, so treat the core counts
as a floor for such data.
"""

from __future__ import annotations

import os
import pathlib
import sys
import tarfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this clone's vit_jax

from absl import flags  # noqa: E402

from vit_jax import cli  # noqa: E402

# ViT-B/16 bf16 training images/sec on one H100 (gpu_vs_timm.py, 2026-11-26).
H100_TRAIN_IMG_S = {224: 2859.5, 384: 917.9}
ARCHIVES = {  # name -> (archive, member prefix to extract, folder root, split)
    'cifar10': ('cifar10_jpeg.tar.gz', ('train/',), '', 'train'),
    'tiny_imagenet': ('tiny-imagenet-200.tar.gz',
                      ('tiny-imagenet-200/val/', 'tiny-imagenet-200/wnids.txt'),
                      'tiny-imagenet-200', 'val'),
}


def extract(shared: pathlib.Path, cache: pathlib.Path, name: str) -> pathlib.Path:
  archive, prefixes, root, _ = ARCHIVES[name]
  out = cache / f'bench_{name}'
  if not (out / '.extracted').exists():
    path = shared / 'data' / archive
    if not path.is_file():
      raise FileNotFoundError(f"{path} not found: this benchmark reads the team's "
                              '../shared/data (pass --shared DIR).')
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path) as tar:
      tar.extractall(out, members=[m for m in tar if m.name.startswith(prefixes)],
                     filter='data')
    (out / '.extracted').touch()
  return out / root if root else out


def measure(root: pathlib.Path, split: str, resolution: int, batch: int, batches: int) -> float:
  from configs import common
  from vit_jax import input_pipeline
  config = common.get_config()
  config.dataset = f'folder:{root}'
  config.train_split = split
  config.num_classes = None
  config.image_size = resolution
  config.batch_size = batch
  config.pp.train = 'inception_crop'
  it = input_pipeline.make_train_iter(config)
  for _ in range(3):   # Warm-up: tf.data's threads, file listing, first decode.
    next(it)
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * batch / (time.perf_counter() - start)


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('shared', str(REPO.parent / 'shared'), "The team's shared folder (data/).",
                      flag_values=fv)
  flags.DEFINE_string('cache', str(pathlib.Path.home() / '.cache' / 'vit_jax_test'),
                      'Where the archives are extracted, once.', flag_values=fv)
  flags.DEFINE_string('resolutions', '224,384', 'Comma list of training resolutions.',
                      flag_values=fv)
  flags.DEFINE_integer('batch', 64, 'Batch size.', flag_values=fv)
  flags.DEFINE_integer('batches', 20, 'Timed batches (after 3 warm-up).', flag_values=fv)


@cli.command(define_flags, errors=(*cli.USER_ERRORS, FileNotFoundError))
def main(args: cli.Args) -> None:
  """Prints images/sec per dataset and resolution, and the host cores one H100 needs."""
  cores = os.cpu_count() or 1
  load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
  print(f'{cores} host cores, load average {load:.1f} at start; batch {args.batch}, '
        f'{args.batches} timed batches after 3 warm-up')
  rows = []
  for name in ARCHIVES:
    root = extract(pathlib.Path(args.shared), pathlib.Path(args.cache), name)
    for res in (int(r) for r in args.resolutions.split(',')):
      img_s = measure(root, ARCHIVES[name][3], res, args.batch, args.batches)
      rows.append((name, res, img_s))
      print(f'{name} @{res}: {img_s:.0f} img/s', flush=True)
  print(f'\n{"dataset":14s} {"res":>4s} {"img/s":>8s} {"img/s/core":>10s} '
        f'{"H100 B/16 img/s":>15s} {"cores needed":>12s}')
  for name, res, img_s in rows:
    gpu = H100_TRAIN_IMG_S.get(res)
    need = f'{gpu / (img_s / cores):12.1f}' if gpu else f'{"-":>12s}'
    print(f'{name:14s} {res:4d} {img_s:8.0f} {img_s / cores:10.0f} '
          f'{gpu or float("nan"):15.0f} {need}')
  print(f'load average at end {os.getloadavg()[0]:.1f}')


if __name__ == '__main__':
  sys.exit(main())
