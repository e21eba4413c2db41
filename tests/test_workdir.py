"""The workdir: bad paths refused without writing, the claim under an exclusive lock, the
lock's holder named to a second run, and the lock gone when its holder exits or is killed."""

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys

import ml_collections
import pytest

from kd_jax import workdir as workdir_lib
from kd_jax.errors import UsageError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import helpers  # noqa: E402  pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)

# Holds `sys.argv[1]`'s lock as a run does (claimed with a config), says so, then waits.
HOLDER = """
import sys, ml_collections
from kd_jax import workdir
workdir.claim(sys.argv[1], ml_collections.ConfigDict({"seed": 0}))
print("locked", flush=True)
sys.stdin.read()
"""


def config(seed=0):
  return ml_collections.ConfigDict({"seed": seed})


def is_locked(workdir) -> bool:
  """Whether another open file description holds the workdir's lock (flock locks are per
  open file description, so this works in the holder's own process too)."""
  fd = os.open(os.path.join(workdir, workdir_lib.LOCK_FILE), os.O_RDWR)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return False
  except BlockingIOError:
    return True
  finally:
    os.close(fd)


def start_holder(workdir) -> subprocess.Popen:
  holder = subprocess.Popen(
    [sys.executable, "-c", HOLDER, str(workdir)],
    cwd=ROOT,
    env=ENV,
    text=True,
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
  )
  assert holder.stdout.readline().strip() == "locked", holder.stderr.read()
  return holder


# ------------------------------------------------------------------------------- paths


def test_a_writable_path_is_accepted(tmp_path):
  assert workdir_lib.check_path(str(tmp_path / "a" / "b")) == str(tmp_path / "a" / "b")
  assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(
  "path, message",
  [
    ("", r"^--workdir is empty: give the directory"),
    ("   ", r"^--workdir is empty"),
    ("{file}", r"^--workdir=.*/a_file is a file, not a directory"),
    (
      "{file}/run",
      r"^--workdir=.*/a_file/run is below the file .*/a_file, which cannot hold directories",
    ),
    (
      "{base}/" + "n" * 300,
      r"^--workdir=.*: the name nnnn.* is 300 bytes long; the file system allows 255 \(NAME_MAX\)",
    ),
    (
      "{base}/" + "/".join(["d" * 200] * 20),
      r"^--workdir=.*: the path is \d+ bytes long; with the files a run writes "
      r"below it \(up to 256 bytes more\) it would exceed the limit of 4096",
    ),
  ],
)
def test_bad_paths_are_refused_writing_nothing(tmp_path, path, message):
  (tmp_path / "a_file").write_text("precious\n")
  before = helpers.tree_contents(tmp_path)
  with pytest.raises(UsageError, match=message):
    workdir_lib.check_path(path.format(file=tmp_path / "a_file", base=tmp_path))
  with pytest.raises(UsageError, match=message):
    workdir_lib.claim(path.format(file=tmp_path / "a_file", base=tmp_path), config())
  assert helpers.tree_contents(tmp_path) == before
  assert sorted(os.listdir(tmp_path)) == ["a_file"]


def readonly_dir(tmp_path):
  """A directory whose permission bits forbid writing in it."""
  (tmp_path / "locked").mkdir()
  os.chmod(tmp_path / "locked", 0o555)
  return tmp_path / "locked"


CHECK = """
import sys
from kd_jax import workdir
from kd_jax.errors import UsageError
try:
  workdir.check_path(sys.argv[1])
except UsageError as e:
  print(e)
"""


@pytest.mark.parametrize("below", [False, True])
def test_an_unwritable_path_is_refused(tmp_path, below):
  locked = readonly_dir(tmp_path)
  path = locked / "new_run" / "deeper" if below else locked
  proc = subprocess.run(
    helpers.obeying_permissions([sys.executable, "-c", CHECK, str(path)]),
    cwd=ROOT,
    env=ENV,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr
  if below:
    assert proc.stdout.strip() == (
      f"--workdir={path} cannot be created: its nearest existing parent {locked} is "
      "not writable by this user; choose a writable directory"
    )
  else:
    assert (
      proc.stdout.strip()
      == f"--workdir={path} is not writable by this user: choose a writable directory"
    )
  assert os.listdir(locked) == []


def test_a_failing_mkdir_is_one_line(tmp_path):
  """What os.access cannot foresee (root below /proc) still fails in one line, at the claim."""
  with pytest.raises(UsageError, match=r"^cannot create the workdir /proc/kd_jax_run: "):
    workdir_lib.lock("/proc/kd_jax_run")


# ------------------------------------------------------------------------------- claim


def test_claim_records_the_config_and_the_holder(tmp_path):
  run = tmp_path / "run"
  workdir_lib.claim(str(run), config())
  try:
    assert json.loads((run / "run.json").read_text()) == {"config": {"seed": 0}}
    assert json.loads((run / "run.lock").read_text()) == {
      "pid": os.getpid(),
      "host": socket.gethostname(),
    }
    assert is_locked(run)
    workdir_lib.claim(str(run), config())  # the same run again (a resume in this process)
  finally:
    workdir_lib.release(str(run))
  assert not is_locked(run)
  assert sorted(os.listdir(run)) == ["run.json", "run.lock"]


def test_a_different_config_is_refused_byte_for_byte(tmp_path):
  run = tmp_path / "run"
  workdir_lib.claim(str(run), config())
  workdir_lib.release(str(run))
  before = helpers.tree_contents(run)
  with pytest.raises(UsageError, match=r"holds a run with a different config \(seed differ\)"):
    workdir_lib.claim(str(run), config(seed=1))
  assert helpers.tree_contents(run) == before
  assert not is_locked(run)
  workdir_lib.claim(
    str(run), config(seed=1), resumable=("seed",)
  )  # a key that may change on resume
  workdir_lib.release(str(run))


def test_a_foreign_directory_is_left_untouched(tmp_path):
  (tmp_path / "notes.txt").write_text("mine\n")
  with pytest.raises(UsageError, match="is not empty and holds no kd_jax run"):
    workdir_lib.claim(str(tmp_path), config())
  assert helpers.tree_contents(tmp_path) == {"notes.txt": b"mine\n"}


def test_an_unreadable_run_file_is_one_line(tmp_path):
  (tmp_path / "run.json").write_text("{not json")
  with pytest.raises(
    UsageError, match=r"has an unreadable run.json \(JSONDecodeError: .*\): use a new --workdir"
  ):
    workdir_lib.claim(str(tmp_path), config())
  assert helpers.tree_contents(tmp_path) == {"run.json": b"{not json"}


def test_a_lock_file_alone_is_an_empty_workdir(tmp_path):
  """A run killed between taking the lock and writing run.json left only the lock file."""
  (tmp_path / "run.lock").write_text("")
  workdir_lib.claim(str(tmp_path), config())
  workdir_lib.release(str(tmp_path))
  assert (tmp_path / "run.json").exists()


@pytest.mark.parametrize("end", ["exit", "SIGKILL"])
def test_a_second_run_is_refused_until_the_holder_ends(tmp_path, end):
  run = tmp_path / "run"
  holder = start_holder(run)
  try:
    before = helpers.tree_contents(run)
    with pytest.raises(UsageError) as e:
      workdir_lib.claim(str(run), config())
    assert str(e.value) == (
      f"workdir {run} is in use by another run (pid {holder.pid} on host {socket.gethostname()}, which holds "
      f"{run}/run.lock): wait for it to end, or use a new --workdir"
    )
    assert helpers.tree_contents(run) == before
  finally:
    if end == "SIGKILL":
      holder.send_signal(signal.SIGKILL)
    else:
      holder.stdin.close()
    holder.wait(timeout=60)
  assert holder.returncode == (-signal.SIGKILL if end == "SIGKILL" else 0), holder.stderr.read()
  assert not is_locked(run)  # the kernel dropped it with the holder's descriptor
  workdir_lib.claim(str(run), config())
  workdir_lib.release(str(run))


def test_released_after_a_run_returns_or_raises(tmp_path):
  @workdir_lib.released_after
  def fake_run(config, workdir, *, fail):
    workdir_lib.claim(workdir, config)
    assert is_locked(workdir)
    if fail:
      raise RuntimeError("the run broke")
    return "done"

  assert fake_run(config(), str(tmp_path / "a"), fail=False) == "done"
  assert not is_locked(tmp_path / "a")
  with pytest.raises(RuntimeError):
    fake_run(config(), workdir=str(tmp_path / "b"), fail=True)
  assert not is_locked(tmp_path / "b")


# ------------------------------------------------------------------------------ teachers


def test_a_teacher_must_be_finished_unless_allowed(tmp_path):
  with pytest.raises(
    UsageError,
    match=r"^teacher_workdir: .* holds an unfinished run \(no results.json: it was "
    r"interrupted or is still training\): finish it .*allow_unfinished_teacher=True",
  ):
    workdir_lib.check_finished(str(tmp_path), allowed=False, field="teacher_workdir")
  workdir_lib.check_finished(str(tmp_path), allowed=True, field="teacher_workdir")
  (tmp_path / "results.json").write_text("{}")
  workdir_lib.check_finished(str(tmp_path), allowed=False, field="teacher_workdir")
