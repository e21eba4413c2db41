"""What produced a result: kd_jax's version and commit, the JAX versions, devices, command line.

Recorded in every `results.json` (`kd_jax.train.loop.finish`), so that a number can be traced
to the code and the machine that gave it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import kd_jax

_PACKAGE_DIR = os.path.dirname(os.path.abspath(kd_jax.__file__))


def _git(*args: str) -> str | None:
  """`git -C <package dir> ARGS`'s output, or None (no git, not a repository, an error)."""
  try:
    proc = subprocess.run(
      ["git", "-C", _PACKAGE_DIR, *args],
      capture_output=True,
      text=True,
      timeout=10,
      check=False,
    )
  except (OSError, subprocess.SubprocessError):
    return None
  return proc.stdout.strip() if proc.returncode == 0 else None


def git_commit() -> dict | None:
  """`{'commit': HEAD, 'dirty': uncommitted changes to tracked files}` of the checkout kd_jax
  runs from, or None when it is not a git checkout (e.g. an installed package)."""
  # A package installed below an ignored directory of some checkout (a .venv) is not that
  # checkout's code: only a tracked kd_jax/__init__.py says it is.
  if _git("ls-files", "--error-unmatch", "__init__.py") is None:
    return None
  commit = _git("rev-parse", "HEAD")
  if not commit:
    return None
  changes = _git("status", "--porcelain", "--untracked-files=no")
  return {"commit": commit, "dirty": bool(changes)}


def collect() -> dict:
  """The provenance record of this process's run (JSON-ready)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top

  devices = jax.devices()
  return {
    "kd_jax_version": kd_jax.__version__,
    "git": git_commit(),
    "jax_version": jax.__version__,
    "jaxlib_version": jaxlib.__version__,
    "python_version": sys.version.split()[0],
    "devices": {
      "platform": devices[0].platform,
      "kind": devices[0].device_kind,
      "count": jax.device_count(),
      "process_count": jax.process_count(),
    },
    "command": list(sys.argv),
  }
