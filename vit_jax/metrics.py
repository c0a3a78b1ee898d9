"""Where training's numbers go: TensorBoard events, metrics.jsonl, the console.

`MetricLog` writes every logged scalar to ``<workdir>/metrics.jsonl`` (one
JSON object per line: ``{"step": N, "train_loss": ..., ...}``) and, where the
`tensorboard` package is installed, to TensorBoard event files in the workdir
(``tensorboard --logdir=WORKDIR``). The events hold plain scalars
(``simple_value``), which TensorBoard, ``EventAccumulator(...).Scalars(tag)``
and pandas exporters all read. Without tensorboard one warning says so and
metrics.jsonl plus the console line per log step still work. `Throughput`
and `fmt_time` make that line's img/s and ETA.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from typing import Any

from absl import logging


class Throughput:
  """Images/sec of training only: compilation, eval and checkpoints excluded."""

  def __init__(self):
    self.steps = self.total_steps = 0
    self.time = self.total_time = 0.0
    self._t = None

  def start(self):
    self._t = time.perf_counter()

  def pause(self):
    if self._t is not None:
      dt = time.perf_counter() - self._t
      self.time += dt
      self.total_time += dt
      self._t = None

  def tick(self):
    self.steps += 1
    self.total_steps += 1

  def window(self) -> tuple[float, float]:
    """(steps/sec since the last call, steps/sec over the whole run)."""
    self.pause()
    rate = (self.steps / self.time if self.time > 0 and self.steps
            else float('nan'))
    total = (self.total_steps / self.total_time
             if self.total_time > 0 and self.total_steps else float('nan'))
    self.steps, self.time = 0, 0.0
    self.start()
    return rate, total


def fmt_time(seconds: float) -> str:
  """'H:MM:SS', or '?' for an unknown (non-finite) duration."""
  if not math.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


class TensorBoardWriter:
  """Scalars as TensorBoard `simple_value` events, with tensorboard's own writer.

  No TensorFlow needed (tensorboard's event writer and protos stand alone).
  """

  def __init__(self, logdir: str):
    from tensorboard.compat.proto import event_pb2, summary_pb2  # pylint: disable=g-import-not-at-top
    from tensorboard.summary.writer.event_file_writer import EventFileWriter  # pylint: disable=g-import-not-at-top
    self._event, self._summary = event_pb2.Event, summary_pb2.Summary
    self._writer = EventFileWriter(logdir)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    summary = self._summary(value=[self._summary.Value(tag=k, simple_value=float(v))
                                   for k, v in scalars.items()])
    self._writer.add_event(self._event(wall_time=time.time(), step=int(step), summary=summary))

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def metric_writer(workdir: str, is_main: bool) -> TensorBoardWriter | None:
  """The TensorBoard writer (process 0), or None (other processes, or no tensorboard)."""
  if not is_main:
    return None
  try:
    return TensorBoardWriter(workdir)
  except ImportError:
    logging.warning('tensorboard is not installed: no TensorBoard events; metrics go to '
                    'metrics.jsonl and the console (pip install tensorboard for them).')
    return None


class MetricLog:
  """TensorBoard events (when a writer is given) plus `metrics.jsonl`.

  After a resume the steps between the last checkpoint and the crash appear
  twice in metrics.jsonl; the later line is the one that counts.
  """

  def __init__(self, writer: Any, jsonl_path: str | None):
    self._writer = writer
    self._path = jsonl_path

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if self._writer is not None:
      self._writer.write_scalars(step, scalars)
    if self._path:
      with open(self._path, 'a') as f:
        f.write(json.dumps({'step': int(step),
                            **{k: float(v) for k, v in scalars.items()}}) + '\n')

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
