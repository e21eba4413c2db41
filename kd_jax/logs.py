"""Quiet libraries: a run prints its own progress, not its libraries' start-up notes.

`configure(verbosity)` is called by the entry points before anything imports TensorFlow.
By default (`verbosity=None`) absl logs warnings and errors only, TensorFlow's C++ start-up
notes (oneDNN, CPU features) are dropped and TFDS shows no progress bars; what a run does is
shown by its progress bars and one line per phase (`kd_jax.reporting.announce`).
`--verbosity=0` (absl's INFO, 1 for debug) shows every library's logs as they come.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile

# Lines TensorFlow's C++ runtime writes on stderr at import, whatever TF_CPP_MIN_LOG_LEVEL
# says (they come before its logging is set up); anything else it writes is kept.
_TF_STARTUP_NOTES = (
  "All log messages before absl::InitializeLog() is called are written to STDERR",
  "oneDNN custom operations are on",
  "cpu_feature_guard.cc",
  "To enable the following instructions:",
)


def configure(verbosity: int | None = None) -> None:
  """Library logs at `verbosity` (absl's levels: 0 info, 1 debug); None: quiet (warnings)."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top

  if verbosity is not None:
    absl_logging.set_verbosity(verbosity)
    return
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("tensorflow").setLevel(logging.ERROR)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  import_tensorflow_quietly()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  tfds.disable_progress_bar()


def import_tensorflow_quietly() -> None:
  """Imports TensorFlow with its start-up notes dropped from stderr (a no-op once imported).

  The notes are written by C++ straight to file descriptor 2, so they are caught there;
  any other line, and everything if the import fails, is written back.
  """
  if "tensorflow" in sys.modules:
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as caught:
    os.dup2(caught.fileno(), 2)
    failed = True
    try:
      import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import

      failed = False
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      caught.seek(0)
      lines = caught.read().decode("utf-8", "replace").splitlines()
      kept = [
        line for line in lines if failed or not any(note in line for note in _TF_STARTUP_NOTES)
      ]
      if kept:
        print("\n".join(kept), file=sys.stderr)
