"""Faults during training: non-finite steps and SIGINT/SIGTERM.

`NonfiniteGuard` reads each step's `nonfinite` mask (`kd_jax.train.steps.keep_if_finite`)
one step late, so the host never waits on the device, and stops the run (`Diverged`) or
counts the skipped step. `graceful_interrupts` turns the first SIGINT/SIGTERM into a flag
the loop polls: it finishes the step under way, saves it and raises `Interrupted`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading

from kd_jax.errors import Diverged
from kd_jax.train import steps


class NonfiniteGuard:
  """Acts on the steps' non-finite masks: `mode='stop'` raises `Diverged`, `'skip'` counts.

  Per epoch: `start_epoch()`, then `record(step, mask)` after each step and `check()`
  wherever the latest step must be known good (before a save, at the epoch's end).
  """

  def __init__(self, mode: str):
    self.mode = mode
    self.skipped = 0  # steps skipped in the epoch under way
    self._pending = None  # (step, mask) not checked yet

  def start_epoch(self, skipped: int = 0) -> None:
    """A new epoch, or a resumed one that had already skipped `skipped` steps."""
    self.skipped = skipped

  def record(self, step: int, mask) -> None:
    """Checks the previous step's mask (waiting for it), then holds this one's."""
    self.check()
    self._pending = (step, mask)

  def check(self) -> None:
    """Acts on the mask of the latest step not checked yet (waits for that step)."""
    if self._pending is None:
      return
    step, mask = self._pending
    self._pending = None
    mask = int(mask)
    if not mask:
      return
    terms = steps.nonfinite_terms(mask)
    if self.mode == "stop":
      raise Diverged(
        f"non-finite {', '.join(terms)} at step {step}: the run stopped; its checkpoints hold "
        "only the finite states before it. Lower optim.learning_rate, or set "
        "--config.on_nonfinite=skip to skip such steps"
      )
    self.skipped += 1
    logging.warning("Skipped step %d: non-finite %s.", step, ", ".join(terms))

  def epoch_sums(self, step: int, sums) -> dict:
    """What a mid-epoch checkpoint records so that a resumed epoch's means are exact."""
    return {"step": step, "skipped": self.skipped, "sums": {k: float(v) for k, v in sums.items()}}


class _Signal:
  signal = None  # the number of the first SIGINT/SIGTERM received, if any


@contextlib.contextmanager
def graceful_interrupts():
  """SIGINT/SIGTERM set `.signal` (the loop saves and stops); a second one exits at once.

  A cluster's preemption sends SIGTERM; Ctrl-C sends SIGINT. Outside the main thread
  (where Python cannot install handlers) signals keep their default behaviour.
  """
  flag = _Signal()
  if threading.current_thread() is not threading.main_thread():
    yield flag
    return

  def handle(signum, frame):
    del frame
    if flag.signal is not None:
      # On a line of its own: the progress bar may be drawn without a newline.
      print(
        f"\ninterrupted: second {signal.Signals(signum).name}: aborted at once; the newest "
        "finished checkpoint is kept: run the same command again to resume",
        file=sys.stderr,
        flush=True,
      )
      os._exit(128 + signum)
    flag.signal = signum
    logging.warning(
      "%s: finishing the step under way and saving a checkpoint (again to abort at once).",
      signal.Signals(signum).name,
    )

  previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    yield flag
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
