"""Command-line plumbing shared by `kd_jax.main` and `kd_jax.evaluate`.

Bad input (a `ValueError` raised by our checks: unknown method, missing teacher,
wrong data directory, ...) is reported as one line on stderr with exit status 2,
not as a traceback.
"""

import contextlib
import logging
import sys

from absl import app
from absl import logging as absl_logging


@contextlib.contextmanager
def one_line_errors():
  try:
    yield
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


class _QuietLibraries(logging.Filter):
  """Drops the chatter of Orbax and TFDS (every save and read); keeps their errors."""

  NOISY = ("/orbax/", "/tensorflow_datasets/", "/jax/_src/")

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR or not any(p in record.pathname for p in self.NOISY)


def run(main) -> None:
  """`app.run(main)` with quiet libraries and one-line errors for bad config arguments."""
  absl_logging.get_absl_handler().addFilter(_QuietLibraries())
  try:
    app.run(main)
  except ValueError as e:  # raised while parsing --config (e.g. a bad config argument)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
