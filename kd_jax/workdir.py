"""A run's workdir: checked before anything is written, then locked and claimed.

`check_path(workdir)` refuses, writing nothing, a path that cannot hold a run: empty, a
file, below a file, too long for the file system, or in a directory this user cannot
write. `claim(workdir, config)` comes after every other check of the run has passed: it
creates the workdir, takes its lock, and under the lock records the config in `run.json`,
or checks that the run recorded there has this same config (the run then resumes).

The lock is `fcntl.flock` on `WORKDIR/run.lock`, held through an open descriptor until the
run ends or its process exits, however it exits: the kernel drops the lock with the
descriptor, also after SIGKILL. The file names the holder's pid and host, for the one-line
refusal of a second run. flock is reliable on local file systems; on NFS it depends on the
server (Linux emulates it with POSIX byte-range locks).

In a multi-process run, process 0 locks and claims; the others wait for its verdict, then
check that they see its claim (all processes need the workdir on one shared file system).
"""

from __future__ import annotations

import fcntl
import functools
import inspect
import json
import os
import socket
import time

from kd_jax.config_schema import flatten
from kd_jax.errors import UsageError

RUN_FILE = "run.json"
LOCK_FILE = "run.lock"
RESULTS_FILE = "results.json"  # written by `kd_jax.train.loop.finish` when a run has finished
# Room left under PATH_MAX for what a run writes below its workdir (e.g. teachers/teacher_0/
# sources/source_1/component/checkpoints/<step>/<item>/<Orbax's files>).
DEEPEST_FILE = 256

_held: dict[str, int] = {}  # real path of a workdir → the descriptor holding its lock


def check_path(workdir: str) -> str:
  """Refuses, in one line, a workdir path that cannot hold a run; returns it absolute.

  Writes nothing. As root, permission bits do not stop writes and `os.access` says a
  directory is writable unless its file system is read-only; creating the workdir can
  then still fail (e.g. below /proc), which `claim` reports in one line.
  """
  if not workdir or not workdir.strip():
    raise UsageError(
      "--workdir is empty: give the directory for the run's checkpoints and results, "
      "e.g. --workdir=runs/teacher"
    )
  path = os.path.abspath(os.path.expanduser(workdir))
  existing = _nearest_existing(path)
  name_max = _pathconf(existing, "PC_NAME_MAX", 255)
  path_max = _pathconf(existing, "PC_PATH_MAX", 4096)
  for part in path.split(os.sep):
    if len(os.fsencode(part)) > name_max:
      raise UsageError(
        f"--workdir={workdir}: the name {part[:24]}… is {len(os.fsencode(part))} bytes long; "
        f"the file system allows {name_max} (NAME_MAX): choose a shorter name"
      )
  if len(os.fsencode(path)) + DEEPEST_FILE > path_max:
    raise UsageError(
      f"--workdir={path[:24]}…: the path is {len(os.fsencode(path))} bytes long; with the files a run "
      f"writes below it (up to {DEEPEST_FILE} bytes more) it would exceed the limit of {path_max} "
      "(PATH_MAX): choose a shorter path"
    )
  if not os.path.isdir(existing):
    if existing == path:
      raise UsageError(f"--workdir={workdir} is a file, not a directory: choose a new --workdir")
    raise UsageError(
      f"--workdir={workdir} is below the file {existing}, which cannot hold directories: "
      "choose a new --workdir"
    )
  if not os.access(existing, os.W_OK | os.X_OK):
    if existing == path:
      raise UsageError(
        f"--workdir={workdir} is not writable by this user: choose a writable directory"
      )
    raise UsageError(
      f"--workdir={workdir} cannot be created: its nearest existing parent {existing} is not "
      "writable by this user; choose a writable directory"
    )
  return path


def claim(workdir: str, config, *, resumable=(), added=None) -> None:
  """Makes `workdir` this run's, or checks that it already is (the run then resumes).

  Refused in one line, the workdir left as it was: a path `check_path` refuses, a
  non-empty directory that holds no kd_jax run, a run of a different config (only the
  keys in `resumable` may differ; `added` gives keys added to the configs later the value
  that runs written without them had), and a workdir locked by a run still going.
  """
  from kd_jax import distributed  # pylint: disable=g-import-not-at-top  (JAX: only once checks passed)

  check_path(workdir)
  current, added = flatten(config), added or {}
  if not distributed.is_primary():
    if not distributed.agree(True):
      raise UsageError(f"process 0 refused the workdir {workdir} (its error line says why)")
    if not _claimed(workdir, current, resumable, added):
      raise UsageError(
        f"workdir {workdir}: this process does not see the {RUN_FILE} process 0 wrote there: give "
        "every process the same workdir on a file system they share"
      )
    return
  try:
    _claimed(workdir, current, resumable, added)  # refused before the lock: nothing written
    lock(workdir)
    # Check again under the lock: another run may have claimed the workdir in the meantime.
    if not _claimed(workdir, current, resumable, added):
      from kd_jax import reporting  # pylint: disable=g-import-not-at-top

      reporting.write_json_atomic(os.path.join(workdir, RUN_FILE), {"config": config.to_dict()})
  except UsageError:
    distributed.agree(False)
    raise
  distributed.agree(True)


def lock(workdir: str) -> None:
  """Creates `workdir` if needed and locks it for this process (a no-op if it holds it)."""
  real = os.path.realpath(workdir)
  if real in _held:
    return
  try:
    os.makedirs(workdir, exist_ok=True)
    fd = os.open(os.path.join(workdir, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
  except OSError as e:
    raise UsageError(f"cannot create the workdir {workdir}: {e.strerror or e}") from None
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = _holder(fd)
    os.close(fd)
    raise UsageError(
      f"workdir {workdir} is in use by another run ({holder}, which holds {os.path.join(workdir, LOCK_FILE)}): "
      "wait for it to end, or use a new --workdir"
    ) from None
  os.ftruncate(fd, 0)
  os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
  _held[real] = fd


def release(workdir: str) -> None:
  """Drops this process's lock on `workdir` (the file stays: deleting it would race)."""
  fd = _held.pop(os.path.realpath(workdir), None)
  if fd is not None:
    os.close(fd)


def released_after(run):
  """Decorates `run(config, workdir, ...)` to release the workdir's lock when it returns
  or raises: the run is over, and another (e.g. a re-run by the command line) may start."""
  signature = inspect.signature(run)

  @functools.wraps(run)
  def wrapper(*args, **kwargs):
    try:
      return run(*args, **kwargs)
    finally:
      release(signature.bind(*args, **kwargs).arguments["workdir"])

  return wrapper


def check_finished(teacher_workdir: str, *, allowed: bool, field: str) -> None:
  """Refuses a teacher whose run has not finished (no `results.json`), unless `allowed`."""
  if allowed or os.path.exists(os.path.join(teacher_workdir, RESULTS_FILE)):
    return
  raise UsageError(
    f"{field}: {teacher_workdir} holds an unfinished run (no {RESULTS_FILE}: it was interrupted or is "
    "still training): finish it by re-running its command, or set --config.allow_unfinished_teacher=True "
    "to use its latest checkpoint"
  )


def _claimed(workdir: str, current: dict, resumable, added: dict) -> bool:
  """Whether `workdir` holds a run of this config; refuses any other non-empty directory."""
  marker = os.path.join(workdir, RUN_FILE)
  if os.path.exists(marker):
    try:
      with open(marker, encoding="utf-8") as f:
        # An added key counts only for configs that have it (e.g. amalgamation stages' keys).
        saved = {
          **{k: v for k, v in added.items() if k in current},
          **flatten(json.load(f)["config"]),
        }
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise UsageError(
        f"workdir {workdir} has an unreadable {RUN_FILE} ({type(e).__name__}: {e}): "
        "use a new --workdir"
      ) from None
    differences = sorted(
      k
      for k in saved.keys() | current.keys()
      if k not in resumable and saved.get(k) != current.get(k)
    )
    if differences:
      raise UsageError(
        f"workdir {workdir} holds a run with a different config ({', '.join(differences)} differ): "
        "use a new --workdir, or the same config to resume"
      )
    return True
  if os.path.isdir(workdir) and set(os.listdir(workdir)) - {LOCK_FILE}:
    raise UsageError(
      f"workdir {workdir} is not empty and holds no kd_jax run: choose a new --workdir"
    )
  return False


def _holder(fd: int) -> str:
  """'pid P on host H' from a lock file (waiting a moment for a holder that just took it)."""
  for _ in range(20):
    try:
      record = json.loads(os.pread(fd, 4096, 0) or b"null")
      return f"pid {record['pid']} on host {record['host']}"
    except (ValueError, TypeError, KeyError):
      time.sleep(0.05)
  return "a process that has not written its pid yet"


def _nearest_existing(path: str) -> str:
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  return path


def _pathconf(path: str, name: str, default: int) -> int:
  try:
    return os.pathconf(path, name)
  except (OSError, ValueError):
    return default
