"""Keeping a training workdir safe: one run at a time, one identity, no
silently damaged checkpoint, no stale temporary exports.

What this module owns in `<workdir>/`:

  workdir.lock               the holder (host, pid, start time); refreshed every
                             HEARTBEAT_S seconds while the run lives
  config.json                the run's identity, written only once a launch is
                             accepted (`write_config`)
  config_changes.jsonl       trajectory changes accepted on resume with
                             --config.resume_changed=True, one JSON line each
  checkpoints/<step>/vit_jax_digest.json
                             sha256 of every file of that orbax step, written
                             right after the save (`write_digest`)
  damaged_checkpoints/       steps that failed verification on resume, moved
                             aside (never deleted) with a note of why

Called from the training loop in a few lines; nothing here imports it. The
`Workdir` type at the end describes the layout for everyone who reads it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging as std_logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from absl import logging

LOCK_NAME = 'workdir.lock'
# A live holder touches the lock every HEARTBEAT_S seconds. A lock from
# another host (a shared filesystem, where its pid cannot be checked) is
# stale once it has not been touched for STALE_AFTER_S seconds (also on this
# host, where a dead pid makes it stale at once).
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0
DIGEST_NAME = 'vit_jax_digest.json'
DAMAGED_DIR = 'damaged_checkpoints'
CHANGES_NAME = 'config_changes.jsonl'
# The layout every reader relies on (`Workdir`).
CONFIG_NAME = 'config.json'
LABELS_NAME = 'labels.txt'
CHECKPOINTS_DIR = 'checkpoints'

# Config keys that change only how often things happen or where output goes,
# not the trajectory of the weights: free to change on resume. Everything
# else (model, data, preprocessing, optimizer, schedule, batch, seed,
# total_steps, keys added later) is trajectory and needs the override.
CADENCE_KEYS = ('log_every', 'eval_every', 'checkpoint_every',
                'keep_checkpoints', 'batch_size_eval', 'prefetch', 'evals',
                'mesh', 'tfds_data_dir', 'tfds_download', 'resume_changed',
                # Derived from the files at every launch, after this check
                # (input_pipeline.checked_config under skip_bad_images).
                'skipped_images')
OVERRIDE_FLAG = '--config.resume_changed=True'


class WorkdirError(ValueError):
  """The workdir cannot be used as asked (held by another run, drifted config)."""


def _is_main() -> bool:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index() == 0


def _broadcast(value: int) -> int:
  """Process 0's integer, on every process (a no-op in one process)."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return int(value)
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def _now() -> str:
  return datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')


# ---------------------------------------------------------------------------
# The lock.
# ---------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # Someone else's live process.
  return True


class WorkdirLock:
  """An exclusive, heartbeating lock file; process 0 holds it for all processes.

  Acquiring writes the holder to a temporary file and hard-links it to
  `workdir.lock`, which fails when the lock exists: no window in which a
  half-written lock is visible. A lock is stale, and taken over with a
  warning, when its pid is dead on this host, or when it has not been
  refreshed for STALE_AFTER_S seconds (the only test for a holder on another
  host of a shared filesystem).
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_NAME)
    self.holder = {'host': socket.gethostname(), 'pid': os.getpid(),
                   'start_time': _now()}
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def _read(self) -> dict[str, Any] | None:
    try:
      with open(self.path) as f:
        return json.load(f)
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}

  def _stale_reason(self, holder: Mapping[str, Any]) -> str | None:
    try:
      age = time.time() - os.path.getmtime(self.path)
    except OSError:
      return 'it disappeared'
    host, pid = holder.get('host'), holder.get('pid')
    if host == self.holder['host'] and isinstance(pid, int):
      if pid == os.getpid():
        return 'it is this process\'s own (an earlier run that did not end)'
      if not _pid_alive(pid):
        return f'process {pid} is no longer running'
    # A live holder refreshes it every HEARTBEAT_S: this also frees a lock
    # whose pid was reused (containers) or that another host left behind.
    if age > STALE_AFTER_S:
      return (f'it was last refreshed {age:.0f} s ago (> {STALE_AFTER_S:.0f} s, '
              'vit_jax.workdir.STALE_AFTER_S)')
    return None

  def _try_create(self) -> bool:
    tmp = f'{self.path}.{os.getpid()}.tmp'
    with open(tmp, 'w') as f:
      json.dump(self.holder, f)
    try:
      os.link(tmp, self.path)
      return True
    except FileExistsError:
      return False
    finally:
      os.remove(tmp)

  def acquire(self) -> WorkdirLock:
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    for _ in range(5):
      if self._try_create():
        break
      holder = self._read()
      if holder is None:
        continue  # Released meanwhile: try again.
      reason = self._stale_reason(holder)
      if reason is None:
        raise WorkdirError(
            f'{os.path.dirname(self.path)} is in use by another run: host '
            f'{holder.get("host")}, pid {holder.get("pid")}, started '
            f'{holder.get("start_time")} ({self.path}). Wait for it to end or '
            'use another --workdir.')
      logging.warning('Taking over the stale workdir lock %s of %s: %s.',
                      self.path, holder, reason)
      aside = f'{self.path}.stale-{os.getpid()}'
      try:
        os.replace(self.path, aside)
      except FileNotFoundError:
        continue
      with open(aside) as f:
        moved = f.read()
      if moved.strip() and json.loads(moved) != holder:
        # Another process took it over between our read and our move: give
        # its lock back and let the next round refuse.
        try:
          os.link(aside, self.path)
        except FileExistsError:
          pass
      os.remove(aside)
    else:
      raise WorkdirError(f'Could not take the workdir lock {self.path}.')
    self._thread = threading.Thread(target=self._heartbeat, daemon=True,
                                    name='workdir-lock-heartbeat')
    self._thread.start()
    return self

  def _heartbeat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      try:
        os.utime(self.path)
      except OSError:
        pass

  def release(self) -> None:
    self._stop.set()
    if self._read() == self.holder:
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass


class hold:  # pylint: disable=invalid-name
  """`with hold(workdir):` the lock for this run; only process 0 touches it.

  Every process learns whether process 0 got it, so all refuse together. A
  remote (gs://) workdir is not locked: there is no atomic create there.
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.lock: WorkdirLock | None = None

  def __enter__(self) -> hold:
    error = None
    if '://' in self.workdir:
      logging.warning('%s is remote: not locked (no atomic create there); make '
                      'sure no other run uses it.', self.workdir)
    elif _is_main():
      try:
        self.lock = WorkdirLock(self.workdir).acquire()
      except WorkdirError as e:
        error = e
    if not _broadcast(error is None):
      raise error or WorkdirError(
          f'{self.workdir} is in use by another run (process 0 could not '
          'take its lock; see its log).')
    return self

  def __exit__(self, *exc) -> None:
    if self.lock is not None:
      self.lock.release()


# ---------------------------------------------------------------------------
# Config identity and drift.
# ---------------------------------------------------------------------------

def _flat(tree: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(tree, Mapping) and tree:
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, f'{prefix}{k}.'))
    return out
  return {prefix[:-1]: tree}


def _is_cadence(key: str) -> bool:
  return any(key == c or key.startswith(c + '.') for c in CADENCE_KEYS)


def config_json(config: Any) -> str:
  return config.to_json_best_effort(indent=2, sort_keys=True) + '\n'


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]
                   ) -> dict[str, tuple[Any, Any]]:
  """{key: (old, new)} for the trajectory keys that differ."""
  fo, fn = _flat(old), _flat(new)
  missing = '<absent>'
  return {k: (fo.get(k, missing), fn.get(k, missing))
          for k in sorted(set(fo) | set(fn))
          if not _is_cadence(k) and fo.get(k, missing) != fn.get(k, missing)}


def has_checkpoint(workdir: str) -> bool:
  d = _epath(workdir) / CHECKPOINTS_DIR
  return d.is_dir() and any(p.name.isdigit() for p in d.iterdir())


def check_config_drift(config: Any, workdir: str) -> dict[str, tuple[Any, Any]]:
  """Refuses a relaunch whose config would change the resumed trajectory.

  Compares with `config.json` when the workdir holds a checkpoint to resume.
  With config.resume_changed=True the changes are accepted and returned
  (`log_accepted_changes` records them). Cadence keys (CADENCE_KEYS) never
  count.
  """
  path = _epath(workdir) / CONFIG_NAME
  if not (path.is_file() and has_checkpoint(workdir)):
    return {}
  old = json.loads(path.read_text())
  changes = config_changes(old, json.loads(config_json(config)))
  if not changes or config.get('resume_changed'):
    return changes
  shown = '; '.join(f'{k}: {o!r} -> {n!r}' for k, (o, n) in changes.items())
  raise WorkdirError(
      f'{workdir} holds a run with another config; resuming it with this one '
      f'would silently mix two runs. Changed: {shown}. Use a fresh --workdir, '
      f'relaunch with the old values, or add {OVERRIDE_FLAG} to continue this '
      'run with the new ones (logged in ' + CHANGES_NAME + ').')


def log_accepted_changes(workdir: str, changes: Mapping[str, tuple[Any, Any]],
                         step: int | None) -> None:
  if not changes or not _is_main():
    return
  logging.warning('config.resume_changed=True: resuming %s at step %s with '
                  'changed %s.', workdir, step,
                  '; '.join(f'{k}: {o!r} -> {n!r}' for k, (o, n) in changes.items()))
  path = _epath(workdir) / CHANGES_NAME
  old = path.read_text() if path.exists() else ''  # gs:// cannot append.
  path.write_text(old + json.dumps({'time': _now(), 'step': step, 'changes': {
      k: list(v) for k, v in changes.items()}}) + '\n')


def write_config(config: Any, workdir: str) -> None:
  """Writes config.json (atomically) once the launch is accepted."""
  if not _is_main():
    return
  path = _epath(workdir) / CONFIG_NAME
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f'{CONFIG_NAME}.tmp-{os.getpid()}'
  tmp.write_text(config_json(config))
  tmp.replace(path)


# ---------------------------------------------------------------------------
# Checkpoint integrity.
# ---------------------------------------------------------------------------

def _epath(path: str):
  from etils import epath  # pylint: disable=g-import-not-at-top
  return epath.Path(path)


def _files(d):
  for p in sorted(d.iterdir()):
    if p.is_dir():
      yield from _files(p)
    else:
      yield p


def _sha256(path) -> str:
  """Hashes in 1 MiB chunks: a ViT-L step's files need not fit in host memory twice."""
  h = hashlib.sha256()
  with path.open('rb') as f:
    while chunk := f.read(1 << 20):
      h.update(chunk)
  return h.hexdigest()


def _file_digests(step_dir) -> dict[str, str]:
  return {str(p.relative_to(step_dir)): _sha256(p)
          for p in _files(step_dir) if p.name != DIGEST_NAME}


# What a failed write says when the storage, not the code, is at fault.
_STORAGE_ERRORS = ('No space left on device', 'Disk quota exceeded', 'File too large',
                   'Read-only file system', 'Permission denied', 'RESOURCE_EXHAUSTED')


def save_step(manager: Any, ckpt_dir: str, step: int, state: Any,
              last_saved: int | None) -> None:
  """Saves `state` as orbax step `step` plus its digest, or raises WorkdirError.

  A full disk (or a quota, a read-only or unwritable directory) is the
  storage's fault: one clear error saying that the steps saved before are
  complete and the same command resumes from the last of them once there is
  room (the half-written step is removed on relaunch). Anything else is a
  bug and propagates as it is.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  quiet = _QuietOrbaxErrors()
  loggers = [std_logging.getLogger(name) for name in ('absl', 'asyncio')]
  for logger in loggers:
    logger.addFilter(quiet)
  storage_failed = False
  try:
    manager.save(step, args=ocp.args.StandardSave(state))
    write_digest(ckpt_dir, step)
  except Exception as e:  # noqa: BLE001 - storage errors become WorkdirError below
    text = str(e)
    reason = (e.strerror if isinstance(e, OSError) and e.strerror else
              next((r for r in _STORAGE_ERRORS if r in text), None))
    if reason is None and not isinstance(e, OSError):
      raise
    resume = (f'checkpoints up to step {last_saved} are complete; make room and re-run the '
              f'same command to resume from step {last_saved}' if last_saved is not None else
              'no earlier checkpoint exists; make room and re-run the same command')
    storage_failed = True
    raise WorkdirError(f'Cannot save the checkpoint of step {step} in {ckpt_dir}: '
                       f'{reason or text[:300]}. Nothing else is lost: {resume} (the '
                       'half-written step is removed then).') from e
  finally:
    if not storage_failed:   # After one the run ends; orbax's leftovers stay quiet too.
      for logger in loggers:
        logger.removeFilter(quiet)


class _QuietOrbaxErrors(std_logging.Filter):
  """Drops the ERROR records of a failed orbax write: orbax's own (with the
  traceback, from its threads) and asyncio's about its abandoned futures. The
  exception reaches save_step, which reports it once (the traceback: the
  CLIs' --verbose)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno < std_logging.ERROR:
      return True
    return (f'{os.sep}orbax{os.sep}' not in record.pathname and
            'orbax' not in str(record.msg) + str(record.args))


def write_digest(ckpt_dir: str, step: int) -> None:
  """Records the sha256 of every file of checkpoints/<step> (process 0)."""
  if not _is_main():
    return
  step_dir = _epath(ckpt_dir) / str(step)
  tmp = step_dir / f'{DIGEST_NAME}.tmp'
  tmp.write_text(json.dumps({'step': step, 'files': _file_digests(step_dir)},
                            indent=1, sort_keys=True))
  tmp.replace(step_dir / DIGEST_NAME)


def check_digest(ckpt_dir: str, step: int) -> tuple[bool, str | None]:
  """(has_digest, problem or None) for checkpoints/<step>."""
  step_dir = _epath(ckpt_dir) / str(step)
  try:
    recorded = json.loads((step_dir / DIGEST_NAME).read_text())
  except FileNotFoundError:
    return False, None
  except (OSError, ValueError) as e:
    return False, f'its digest file is unreadable ({e})'
  if recorded.get('step') != step:
    return True, (f'it was saved as step {recorded.get("step")} (a copied or '
                  'renamed directory)')
  now = _file_digests(step_dir)
  missing = sorted(set(recorded['files']) - set(now))
  changed = sorted(k for k in recorded['files']
                   if k in now and now[k] != recorded['files'][k])
  problems = ([f'missing {", ".join(missing[:5])}'] if missing else []) + \
      ([f'changed {", ".join(changed[:5])}'] if changed else [])
  return True, ('; '.join(problems) + ' since it was saved') if problems else None


def move_aside(workdir: str, ckpt_dir: str, step: int, reason: str) -> str:
  """Moves checkpoints/<step> to damaged_checkpoints/ (process 0); never deletes."""
  dest_root = _epath(workdir) / DAMAGED_DIR
  dest = dest_root / str(step)
  i = 1
  while dest.exists():
    dest, i = dest_root / f'{step}-{i}', i + 1
  logging.warning('Checkpoint step %d in %s is damaged: %s. Moving it to %s '
                  '(kept, not deleted) and falling back to the newest intact '
                  'step.', step, ckpt_dir, reason, dest)
  if _is_main():
    dest_root.mkdir(parents=True, exist_ok=True)
    (_epath(ckpt_dir) / str(step)).rename(dest)
    (dest_root / f'{dest.name}.why.txt').write_text(f'{_now()}: {reason}\n')
  return str(dest)


def restore_newest_intact(make_manager: Callable[[], Any],
                          restore: Callable[[Any, int], Any],
                          workdir: str, ckpt_dir: str,
                          step_of: Callable[[Any], int]) -> tuple[Any, int | None, Any]:
  """(manager, step, state) of the newest step that verifies; step None if none.

  A step verifies when it is a finalized orbax step, its digest (if it has
  one: checkpoints written before digests existed have none) matches, it
  restores, and the step it holds is the step its directory is named after.
  A failing one is moved aside and the next older one tried, with a fresh
  manager (orbax caches what it learnt from the bad directory). A step whose
  digest matches but which does not restore is intact but of another config:
  that is an error, not damage.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  manager = make_manager()

  def aside(step: int, reason: str) -> Any:
    move_aside(workdir, ckpt_dir, step, reason)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'vit_jax_move_aside_{step}')
    manager.close()
    return make_manager()

  while True:
    step = manager.latest_step()
    if step is None:
      return manager, None, None
    if not (_epath(ckpt_dir) / str(step) / '_CHECKPOINT_METADATA').exists():
      manager = aside(step, 'it is not a finalized orbax step (no _CHECKPOINT_METADATA)')
      continue
    has_digest, problem = (check_digest(ckpt_dir, step) if _is_main()
                           else (False, None))
    has_digest = bool(_broadcast(has_digest))
    if _broadcast(problem is not None):
      manager = aside(step, problem or 'process 0 found it damaged')
      continue
    try:
      state = restore(manager, step)
    except Exception as e:  # orbax raises many types.  # pylint: disable=broad-except
      if has_digest:
        from vit_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
        raise ckpt_lib.CheckpointError(
            f'{ckpt_dir} holds an intact checkpoint at step {step} that does '
            f'not fit this config ({type(e).__name__}: {str(e)[:500]}). Use a '
            'fresh --workdir, or the config that wrote it.') from e
      manager = aside(step, f'it does not restore ({type(e).__name__}: {str(e)[:300]})')
      continue
    held = step_of(state)
    if held != step:
      manager = aside(step, f'it holds step {held} (a copied or renamed directory)')
      continue
    if not has_digest:
      logging.warning('Checkpoint step %d has no integrity digest (saved by an '
                      'older vit_jax); it restores, so resuming from it.', step)
    return manager, step, state


# ---------------------------------------------------------------------------
# Exports.
# ---------------------------------------------------------------------------

def remove_stale_exports(workdir: str) -> list[str]:
  """Deletes `<name>.tmp-<pid>` files left by killed runs (we hold the lock).

  `checkpoint.save` writes an export to such a temporary name and renames it;
  a run killed in between, or a full disk, leaves one behind.
  """
  removed = []
  if not _is_main() or '://' in workdir or not os.path.isdir(workdir):
    return removed
  for name in os.listdir(workdir):
    base, sep, pid = name.rpartition('.tmp-')
    if sep and pid.isdigit() and base:
      os.remove(os.path.join(workdir, name))
      removed.append(name)
  if removed:
    logging.warning('Removed temporary files of an interrupted run from %s: %s.',
                    workdir, ', '.join(removed))
  return removed


# ---------------------------------------------------------------------------
# The layout, as readers see it.
# ---------------------------------------------------------------------------

# Subtrees of the training state that exports and readers take.
EXPORTED_KEYS = ('params', 'batch_stats', 'polyak')


class Workdir:
  """The files a training run writes, by name: the one description of the layout.

    config.json          the resolved config (`config()`)
    labels.txt           class names in label order (`labels()`)
    checkpoints/<step>/  orbax steps of the train state (`steps()`, `restore()`)
    <model_name>.npz     the final export (`export_path()`), official layout,
                         with its sidecar <model_name>.json

  vit_jax.train writes through it; vit_jax.hub, export and predict read
  through it.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)

  def __repr__(self) -> str:
    return f'Workdir({self.path!r})'

  def file(self, name: str) -> str:
    return os.path.join(self.path, name)

  @property
  def checkpoints_dir(self) -> str:
    return os.path.join(os.path.abspath(self.path), CHECKPOINTS_DIR)

  def is_run(self) -> bool:
    """Whether this is a training workdir (it has a config.json)."""
    return os.path.isfile(self.file(CONFIG_NAME))

  # -- config and labels ----------------------------------------------------

  def config(self) -> dict[str, Any]:
    """The resolved training config (a dict), or WorkdirError."""
    try:
      with open(self.file(CONFIG_NAME)) as f:
        return json.load(f)
    except OSError:
      raise WorkdirError(
          f'{self.file(CONFIG_NAME)} not found: {self.path} is not a training workdir '
          '(written by `python -m vit_jax.main --workdir=...`).') from None
    except ValueError as e:
      raise WorkdirError(f'{self.file(CONFIG_NAME)} is not valid JSON: {e}.') from None

  def model_name(self) -> str:
    """The name the export goes under: config.model.model_name, else the preset's."""
    config = self.config()
    return ((config.get('model') or {}).get('model_name') or config.get('model_name')
            or 'model')

  def labels(self) -> list[str] | None:
    """labels.txt's class names, or None when the run wrote none."""
    path = self.file(LABELS_NAME)
    return read_labels(path) if os.path.isfile(path) else None

  def write_labels(self, names: Any) -> None:
    if _is_main():
      with open(self.file(LABELS_NAME), 'w') as f:
        f.write(''.join(f'{name}\n' for name in names))

  # -- exports ----------------------------------------------------------------

  def export_path(self, step: int | None = None, model_name: str | None = None) -> str:
    """<model_name>.npz (the final export: where readers look), or
    <model_name>_step<N>.npz for another step, which never overwrites it."""
    name = model_name or self.model_name()
    return self.file(f'{name}.npz' if step is None else f'{name}_step{step}.npz')

  # -- orbax steps --------------------------------------------------------------

  def _ckpt_dir(self) -> str:
    """checkpoints/ (or the path itself when it is the orbax directory)."""
    for d in (self.checkpoints_dir, os.path.abspath(self.path)):
      if os.path.isdir(d) and _orbax_steps(d):
        return d
    raise WorkdirError(
        f'No orbax checkpoints under {self.path} (expected {self.path}/checkpoints/<step>/). '
        'Is this a training workdir, and has training reached a checkpoint_every step?')

  def steps(self) -> list[int]:
    """Steps with a complete checkpoint, ascending."""
    return _orbax_steps(self._ckpt_dir())

  def restore(self, step: int | None = None) -> tuple[int, dict[str, Any]]:
    """(step, {'params', ['batch_stats'], ['polyak']}) as host numpy arrays.

    `step=None` takes the latest. Only those subtrees are read from disk
    (orbax partial restore): no optimizer state, model code or device mesh,
    so a checkpoint written on 8 GPUs restores on a laptop. A step whose
    digest does not verify is refused.
    """
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

    directory = self._ckpt_dir()
    steps = _orbax_steps(directory)
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise WorkdirError(f'No checkpoint for step {step} in {directory}; available steps: '
                         f'{steps}.')
    _, problem = check_digest(directory, step)
    if problem:
      raise WorkdirError(f'Checkpoint step {step} in {directory} is damaged: {problem}. '
                         f'Use another step (available: {steps}).')
    step_dir = _step_dir(directory, step)
    # The state may be the manager's single item ('default') or one item of a
    # composite checkpoint: take the item whose tree holds 'params'.
    for item in sorted(os.listdir(step_dir)):
      item_dir = os.path.join(step_dir, item)
      if not os.path.isdir(item_dir):
        continue
      try:
        md = ocp.PyTreeCheckpointer().metadata(item_dir)
      except (OSError, ValueError):
        continue
      md = getattr(md, 'item_metadata', md)
      tree = getattr(md, 'tree', md)
      if not isinstance(tree, dict) or 'params' not in tree:
        continue
      wanted = {k: tree[k] for k in EXPORTED_KEYS if tree.get(k)}
      restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
      restored = ocp.PyTreeCheckpointer().restore(
          item_dir, args=ocp.args.PyTreeRestore(item=wanted, restore_args=restore_args,
                                                partial_restore=True))
      return step, jax.tree.map(np.asarray, dict(restored))
    raise WorkdirError(f'No item with a `params` subtree in {step_dir}; this is not a '
                       'vit_jax training checkpoint.')


def read_labels(path: str) -> list[str]:
  """One class name per line, in label order (blank trailing lines ignored)."""
  try:
    with open(path) as f:
      lines = f.read().splitlines()
  except OSError as e:
    raise WorkdirError(f'Cannot read label file {path!r}: {e}.') from None
  while lines and not lines[-1].strip():
    lines.pop()
  if not lines:
    raise WorkdirError(f'Label file {path!r} is empty; it needs one class name per line.')
  return [line.strip() for line in lines]


def _orbax_steps(directory: str) -> list[int]:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  try:
    manager = ocp.CheckpointManager(os.path.abspath(directory),
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    return sorted(manager.all_steps())
  except (OSError, ValueError):
    return []


def _step_dir(directory: str, step: int) -> str:
  """The directory of one step (orbax names it `<step>` unless a prefix was set)."""
  candidates = [d for d in os.listdir(directory)
                if os.path.isdir(os.path.join(directory, d)) and
                (d == str(step) or d.rsplit('_', 1)[-1].lstrip('0') == str(step).lstrip('0'))]
  if len(candidates) != 1:
    raise WorkdirError(f'Cannot find the directory of step {step} in {directory} '
                       f'(candidates: {candidates}).')
  return os.path.join(directory, candidates[0])
