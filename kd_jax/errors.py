"""The one error base of kd_jax, and the exit status each error ends a command with.

An entry point (`kd_jax.cli.one_line_errors`) turns a `KdJaxError` into one line,
`<label>: <message>`, on stderr and exits with its `exit_status`: no traceback for what
the user can fix. Library users catch `KdJaxError` (or `ValueError`: bad input is both).

| error         | label       | exit status      | meaning                                        |
|---------------|-------------|------------------|------------------------------------------------|
| `UsageError`  | error       | 2                | bad input: nothing was written                 |
| `Diverged`    | error       | 3                | a non-finite step stopped the run              |
| `Interrupted` | interrupted | 128 + signal     | SIGINT (130) / SIGTERM (143): the step was saved |
"""

from __future__ import annotations

import signal


class KdJaxError(Exception):
  """Base of every error kd_jax reports to a user in one line."""

  exit_status = 1
  label = "error"


class UsageError(KdJaxError, ValueError):
  """Bad input from the user (config, flags, paths, data): reported as one line, nothing written."""

  exit_status = 2


class Diverged(KdJaxError, RuntimeError):
  """A step gave a non-finite loss, gradient or state (`on_nonfinite='stop'`)."""

  exit_status = 3


class Interrupted(KdJaxError, RuntimeError):
  """SIGINT or SIGTERM: the step under way was finished and saved."""

  label = "interrupted"

  def __init__(self, signum: int, step: int, total_steps: int):
    self.exit_status = 128 + signum  # the shell's status for a process ended by the signal
    super().__init__(
      f"{signal.Signals(signum).name} after step {step} of {total_steps}; the checkpoint of "
      f"step {step} is saved: run the same command again to resume"
    )
