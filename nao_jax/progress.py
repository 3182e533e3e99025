"""Progress lines with rate and ETA, TensorBoard scalars without TensorFlow, and plots."""

from __future__ import annotations

import os
import time

from absl import logging
import numpy as np

from nao_jax import parallel


class Progress:
  """Logs ``done/total``, rate, ETA and extra values every ``every`` units of work."""

  def __init__(self, total: int, what: str = 'steps', every: int = 10):
    self.total, self.what, self.every = total, what, max(1, every)
    self._start, self._start_done, self._last = time.time(), None, -1

  def update(self, done: int, **values) -> None:
    if self._start_done is None:
      self._start_done = done - 1  # first update after a (re)start: measure from here
      self._start = time.time()
    if done // self.every == self._last // self.every and done != self.total:
      return
    self._last = done
    elapsed = time.time() - self._start
    rate = (done - self._start_done) / max(elapsed, 1e-9)
    eta = (self.total - done) / rate if rate > 0 else float('inf')
    extra = ' '.join(f'{k}={_fmt(v)}' for k, v in values.items())
    logging.info('%d/%d %s (%.1f%%) %.2f %s/s ETA %s %s', done, self.total, self.what,
                 100.0 * done / max(self.total, 1), rate, self.what, _duration(eta), extra)


def _fmt(value) -> str:
  return f'{value:.4f}' if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
  if not np.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s'


class ScalarWriter:
  """Writes TensorBoard scalar events with the ``tensorboard`` package only (no TensorFlow).

  In a multi-process run only the primary process (``parallel.is_primary()``) writes; on the
  others the writer is a no-op (no directory, no event file).
  """

  def __init__(self, logdir: str):
    self._writer = None
    if not parallel.is_primary():
      return
    from tensorboard.summary.writer.event_file_writer import EventFileWriter  # pylint: disable=g-import-not-at-top
    os.makedirs(logdir, exist_ok=True)
    self._writer = EventFileWriter(logdir)

  def scalar(self, tag: str, value: float, step: int) -> None:
    if self._writer is None:
      return
    from tensorboard.compat.proto import event_pb2, summary_pb2  # pylint: disable=g-import-not-at-top
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag,
                                                                   simple_value=float(value))])
    self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                           summary=summary))

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


def plot_best_so_far(best: np.ndarray, path: str, score_name: str) -> None:
  """Saves a PNG of the best score found against the number of queries."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
  ax.plot(np.arange(1, len(best) + 1), best, drawstyle='steps-post')
  ax.set_xlabel('queries')
  ax.set_ylabel(f'best {score_name}')
  ax.grid(alpha=0.3)
  fig.tight_layout()
  tmp = path + '.tmp.png'
  fig.savefig(tmp)
  plt.close(fig)
  os.replace(tmp, path)
