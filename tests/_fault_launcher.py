"""Runs `python -m vit_jax.main` with a SIGKILL injected at a chosen point.

Usage (the tests' fault-injection suite):

  python tests/_fault_launcher.py POINT SEED -- <vit_jax.main flags>

POINT is where the process kills itself with SIGKILL:

  save    inside an orbax save: at the N-th finalization (two per save: the
          item, then the step), after the files are written and before the
          rename (orbax's temporary directory is left behind)
  digest  after the N-th orbax save is finalized, before its integrity
          digest is written
  export  inside the export, with the `.npz.tmp-<pid>` file fully written
          and not yet renamed
  time    after a uniformly random delay, anywhere in the run

N and the delay come from `random.Random(SEED)` and are printed first
(`fault: ...`), so a failure can be replayed. Nothing of vit_jax is changed:
the patches wrap orbax's finalization, `vit_jax.workdir.write_digest` and
`os.replace`, then the real entry point runs.
"""

import os
import pathlib
import random
import runpy
import signal
import sys
import threading
import time


def _kill(what: str) -> None:
  print(f'fault: SIGKILL {what}', file=sys.stderr, flush=True)
  os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
  # This repository's vit_jax (and configs), not an installed copy.
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  point, seed = sys.argv[1], int(sys.argv[2])
  args = sys.argv[sys.argv.index('--') + 1:]
  rng = random.Random(seed)
  nth = rng.randint(1, 3)        # which save / finalization / digest
  delay = rng.uniform(2.0, 25.0)  # seconds, for POINT=time
  print(f'fault: point={point} seed={seed} nth={nth} delay={delay:.3f}s',
        file=sys.stderr, flush=True)
  if point in ('save', 'digest'):
    from vit_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
    calls = {'n': 0}
    if point == 'save':
      from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top
      cls = atomicity.AtomicRenameTemporaryPath
      original = cls.finalize

      def finalize(self, *a, **k):
        calls['n'] += 1
        if calls['n'] == nth:
          _kill(f'inside orbax save #{nth}, before finalizing {self}')
        return original(self, *a, **k)
      cls.finalize = finalize
    else:
      original_digest = workdir_lib.write_digest

      def write_digest(ckpt_dir, step):
        calls['n'] += 1
        if calls['n'] == nth:
          _kill(f'after saving step {step}, before its digest')
        return original_digest(ckpt_dir, step)
      workdir_lib.write_digest = write_digest
  elif point == 'export':
    original_replace = os.replace

    def replace(src, dst, *a, **k):
      if str(dst).endswith('.npz') and '.tmp-' in str(src):
        _kill(f'inside the export, {src} written, not renamed')
      return original_replace(src, dst, *a, **k)
    os.replace = replace
  elif point == 'time':
    threading.Thread(target=lambda: (time.sleep(delay), _kill(f'at {delay:.3f}s')),
                     daemon=True).start()
  else:
    raise SystemExit(f'unknown fault point {point!r}')
  sys.argv = ['vit_jax.main', *args]
  runpy.run_module('vit_jax.main', run_name='__main__', alter_sys=True)


if __name__ == '__main__':
  main()
