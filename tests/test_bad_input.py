"""Bad input to `python -m kd_jax.main`: one `error: ...` line, exit status 2, nothing written.

The command-line cases run as subprocesses, two at a time, in one module fixture (each costs
seconds of imports); each test then checks its own case: exit status, one line naming what
is wrong, no traceback, and the workdir untouched (not created, or byte-for-byte as it was).
Bad config values, checked by the same `kd_jax.config_schema.validate`, are tested
in-process in tests/test_config_schema.py, the workdir's lock in tests/test_workdir.py.
"""

import concurrent.futures
import os
import re
import socket
import subprocess
import sys

import jax
import ml_collections
import optax
import pytest

from kd_jax import checkpoint, data, models
from kd_jax.train import distill
from kd_jax.train.state import TrainState

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fake_data  # noqa: E402  pylint: disable=g-import-not-at-top
import helpers  # noqa: E402  pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(
  os.environ,
  JAX_PLATFORMS="cpu",
  TF_CPP_MIN_LOG_LEVEL="3",
  JAX_DISABLE_MOST_OPTIMIZATIONS="1",
  PYTHONPATH=ROOT,
)
STUDENT = "--config=experiments/lenet_student.py:dataset=fashion_mnist,smoke"

# Lines that native libraries (TensorFlow's C++ start-up) and loggers may write before our
# error; everything else on stderr must be the single error line.
_LOG_LINE = re.compile(
  r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
  r"|[IWEF]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ \S+:\d+\] .*"
  r"|To enable the following instructions: .*)$"
)


def _case_args(d) -> dict[str, tuple[list[str], dict | None, str | None]]:
  """{name: (arguments, extra environment, workdir)}; workdir None: a fresh path."""
  data_flags = [
    f"--config.data.manual_dir={d['manual']}",
    f"--config.data.data_dir={d['tfds']}",
    "--config.data.download=False",
  ]
  distill = [f"{STUDENT},method=hinton_kd", *data_flags]
  supervised = [f"{STUDENT},method=ground_truth", *data_flags]
  return {
    "unknown_key": ([STUDENT, *data_flags, "--config.no_such_key=1"], None, None),
    "unknown_nested_key": ([STUDENT, *data_flags, "--config.model.no_such_key=1"], None, None),
    "unknown_method": ([f"{STUDENT},method=foo", *data_flags], None, None),
    "unknown_dataset": (["--config=experiments/lenet_student.py:dataset=foo,smoke"], None, None),
    "missing_teacher": (
      [*distill, f"--config.teacher_workdir={d['base']}/no_such_teacher"],
      None,
      None,
    ),
    "empty_teacher": ([*distill, f"--config.teacher_workdir={d['empty_teacher']}"], None, None),
    "classes_mismatch": (
      [*distill, f"--config.teacher_workdir={d['five_class_teacher']}"],
      None,
      None,
    ),
    "unfinished_teacher": (
      [*distill, f"--config.teacher_workdir={d['unfinished_teacher']}"],
      None,
      None,
    ),
    "batch_not_divisible": (
      [*supervised, "--config.batch_size=30"],
      {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
      None,
    ),
    "no_data": (
      [
        f"{STUDENT},method=ground_truth",
        f"--config.data.manual_dir={d['empty_manual']}",
        f"--config.data.data_dir={d['empty_tfds']}",
        "--config.data.download=False",
      ],
      None,
      None,
    ),
    "manual_dir_without_files_never_downloads": (
      [
        f"{STUDENT},method=ground_truth",
        f"--config.data.manual_dir={d['empty_manual']}",
        f"--config.data.data_dir={d['empty_tfds']}",
        "--config.data.download=True",
      ],
      None,
      None,
    ),
    "zero_epochs": ([*supervised, "--config.num_epochs=0"], None, None),
    "train_on_test": ([*supervised, "--config.train_split=test"], None, None),
    "amalgamation_temperature": (
      [
        "--config=experiments/amalgamate.py:smoke",
        *data_flags,
        "--config.amalgamation.temperature=0",
      ],
      None,
      None,
    ),
    "missing_config_file": (
      ["--config=experiments/no_such.py:smoke", "--config.seed=1"],
      None,
      None,
    ),
    "config_syntax_error": ([f"--config={d['syntax_error']}"], None, None),
    "config_without_get_config": ([f"--config={d['no_get_config']}:smoke"], None, None),
    "config_raises": ([f"--config={d['raising_config']}"], None, None),
    "config_returns_none": ([f"--config={d['none_config']}", "--config.seed=1"], None, None),
    "empty_workdir": (supervised, None, ""),
    "workdir_is_a_file": (supervised, None, d["a_file"]),
    "workdir_below_a_file": (supervised, None, os.path.join(d["a_file"], "run")),
    "workdir_too_long": (supervised, None, os.path.join(d["base"], "w" * 300)),
    "workdir_unwritable": (supervised, None, d["read_only"]),
    "workdir_locked": (supervised, None, d["locked"]),
  }


EXPECTED = {
  "unknown_key": r"--config\.no_such_key: the config has no field 'no_such_key'",
  "unknown_nested_key": r"--config\.model\.no_such_key: the config has no field 'no_such_key'",
  "unknown_method": r"--config\.method='foo': the training method must be one of ground_truth, logit_regression",
  "unknown_dataset": r"unknown dataset 'foo'; choose one of cifar10, mnist, fashion_mnist",
  "missing_teacher": r"teacher_workdir: .*no_such_teacher holds no checkpoints",
  "empty_teacher": r"teacher_workdir: .*empty_teacher holds no checkpoints",
  "classes_mismatch": r"has 5 classes but fashion_mnist has 10",
  "unfinished_teacher": r"teacher_workdir: .*unfinished_teacher holds an unfinished run \(no results\.json.*"
  r"--config\.allow_unfinished_teacher=True",
  "batch_not_divisible": r"batch_size=30 is not divisible by the 4 devices",
  "no_data": r"no fashion_mnist data: put train-images-idx3-ubyte\.gz.*empty_manual, which has none of them.*"
  r"Nothing was downloaded",
  # The branch that never downloads: TFDS's retries would take minutes and say so.
  "manual_dir_without_files_never_downloads": r"empty_manual, which has none of them.*Nothing was downloaded: "
  r"--config\.data\.manual_dir is set",
  "zero_epochs": r"--config\.num_epochs=0: the number of training epochs must be an integer >= 1",
  "train_on_test": r"--config\.train_split='test': names the test split, which evaluation reports on",
  "amalgamation_temperature": r"--config\.amalgamation\.temperature=0\.0: amalgamation's softmax temperature .* "
  r"must be a finite number > 0",
  "missing_config_file": r"--config=experiments/no_such\.py: no such file",
  "config_syntax_error": r"--config=.*syntax_error\.py is not valid Python: .*\(line 2\)",
  "config_without_get_config": r"--config=.*no_get_config\.py defines no get_config\(arg=None\)",
  "config_raises": r"--config=.*raising_config\.py: loading it raised RuntimeError: no GPU here",
  "config_returns_none": r"--config=.*none_config\.py: get_config\(\) returned None, not an ml_collections",
  "empty_workdir": r"--workdir is empty: give the directory",
  "workdir_is_a_file": r"--workdir=.*a_file is a file, not a directory",
  "workdir_below_a_file": r"--workdir=.*a_file/run is below the file .*a_file, which cannot hold directories",
  "workdir_too_long": r"--workdir=.*: the name wwww.* is 300 bytes long; the file system allows 255",
  "workdir_unwritable": r"--workdir=.*read_only is not writable by this user",
  "workdir_locked": r"workdir .*locked is in use by another run \(pid \d+ on host \S+, which holds .*run\.lock\)",
}
# Run so that permission bits apply (as root too).
OBEYING_PERMISSIONS = {"workdir_unwritable"}

HOLD_LOCK = """
import sys
from kd_jax import workdir
workdir.lock(sys.argv[1])
print("locked", flush=True)
sys.stdin.read()
"""


def _fake_teacher(workdir: str, *, num_classes: int, finished: bool) -> str:
  """A teacher checkpoint, as the loop writes it, of a model on fashion_mnist (untrained)."""
  model = models.LeNet(num_classes=num_classes, width=0.125)
  variables = jax.jit(lambda k: model.init(k, jax.numpy.zeros((1, 28, 28, 1)), train=False))(
    jax.random.PRNGKey(0)
  )
  state = TrainState.create(variables=variables, tx=optax.adam(1e-3), rng=jax.random.PRNGKey(1))
  meta = {
    "kind": "nin_teacher",
    "main": "model",
    "models": {"model": checkpoint.model_entry(model, num_classes=num_classes, classes=None)},
    "config": {"data": {"name": "fashion_mnist"}},
    "history": [],
  }
  ckpts = checkpoint.Checkpoints(workdir)
  ckpts.save(1, {"state": state}, meta, force=True)
  ckpts.close()
  if finished:
    with open(os.path.join(workdir, "results.json"), "w", encoding="utf-8") as f:
      f.write("{}\n")
  return workdir


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  base = tmp_path_factory.mktemp("bad_input")
  d = {
    "base": str(base),
    "manual": fake_data.write_idx_dataset(str(base / "manual")),
    "tfds": str(base / "tfds"),
    "empty_teacher": str(base / "empty_teacher"),
    "empty_manual": str(base / "empty_manual"),
    "empty_tfds": str(base / "empty_tfds"),
    "read_only": str(base / "read_only"),
    "locked": str(base / "locked"),
    "a_file": str(base / "a_file"),
    "syntax_error": str(base / "syntax_error.py"),
    "no_get_config": str(base / "no_get_config.py"),
    "raising_config": str(base / "raising_config.py"),
    "none_config": str(base / "none_config.py"),
  }
  for key in ("empty_teacher", "empty_manual", "empty_tfds", "read_only", "locked"):
    os.makedirs(d[key])
  os.chmod(d["read_only"], 0o555)
  for key, text in (
    ("a_file", "not a workdir\n"),
    ("syntax_error", "def get_config(arg=None):\n  return (\n"),
    ("no_get_config", "import ml_collections\nCONFIG = ml_collections.ConfigDict()\n"),
    ("raising_config", "def get_config(arg=None):\n  raise RuntimeError('no GPU here')\n"),
    ("none_config", "def get_config(arg=None):\n  pass\n"),
  ):
    with open(d[key], "w", encoding="utf-8") as f:
      f.write(text)
  config = data.default_data_config("fashion_mnist")
  config.manual_dir, config.data_dir, config.download = d["manual"], d["tfds"], False
  data.get_info(config)  # prepares the fake dataset once for every case
  d["five_class_teacher"] = _fake_teacher(
    str(base / "five_class_teacher"), num_classes=5, finished=True
  )
  d["unfinished_teacher"] = _fake_teacher(
    str(base / "unfinished_teacher"), num_classes=10, finished=False
  )
  return d


@pytest.fixture(scope="module")
def cases(dirs):
  """Runs every command-line case (two at a time), `locked` locked by another process.

  Returns {'runs': {name: (process, workdir, its contents before)}, ...}."""
  teachers = (dirs["empty_teacher"], dirs["five_class_teacher"], dirs["unfinished_teacher"])
  before = {t: helpers.tree_contents(t) for t in teachers}
  root_before = sorted(os.listdir(ROOT))
  holder = subprocess.Popen(
    [sys.executable, "-c", HOLD_LOCK, dirs["locked"]],
    cwd=ROOT,
    env=ENV,
    text=True,
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
  )
  assert holder.stdout.readline().strip() == "locked"

  def run(name, args, extra_env, workdir):
    workdir = os.path.join(dirs["base"], f"workdir_{name}") if workdir is None else workdir
    workdir_before = helpers.tree_contents(workdir) if workdir else None
    command = [sys.executable, "-m", "kd_jax.main", *args, f"--workdir={workdir}"]
    if name in OBEYING_PERMISSIONS:
      command = helpers.obeying_permissions(command)
    proc = subprocess.run(
      command,
      cwd=ROOT,
      env={**ENV, **(extra_env or {})},
      capture_output=True,
      text=True,
      timeout=300,
    )
    return name, (
      proc,
      workdir,
      workdir_before,
      helpers.tree_contents(workdir) if workdir else None,
    )

  try:
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
      runs = dict(pool.map(lambda item: run(item[0], *item[1]), _case_args(dirs).items()))
  finally:
    holder.stdin.close()
    holder.wait(timeout=60)
  return {
    "runs": runs,
    "holder_pid": holder.pid,
    "root_before": root_before,
    "root_after": sorted(os.listdir(ROOT)),
    "teachers_before": before,
    "teachers_after": {t: helpers.tree_contents(t) for t in teachers},
  }


def _error_line(proc: subprocess.CompletedProcess) -> str:
  assert "Traceback" not in proc.stderr, proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.strip() and not _LOG_LINE.match(l)]
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  return lines[0]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_input_fails_cleanly(cases, name):
  proc, workdir, before, after = cases["runs"][name]
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  assert re.search(EXPECTED[name], _error_line(proc)), proc.stderr
  assert after == before  # nothing written: no workdir made, an existing one byte-for-byte the same
  assert proc.stdout.strip() == ""


def test_the_locks_holder_is_named(cases):
  proc, *_ = cases["runs"]["workdir_locked"]
  assert f"(pid {cases['holder_pid']} on host {socket.gethostname()}, " in _error_line(proc)


def test_nothing_is_written_beside(cases, dirs):
  assert cases["teachers_after"] == cases["teachers_before"]
  assert os.listdir(dirs["empty_teacher"]) == []
  assert os.listdir(dirs["empty_tfds"]) == []  # no download started, nothing prepared
  assert (
    cases["root_after"] == cases["root_before"]
  )  # the empty --workdir= wrote nothing into the cwd


# ------------------------------------------------------------------- in-process checks


def _student_config(dirs, **overrides) -> ml_collections.ConfigDict:
  return helpers.experiment_config(
    "lenet_student",
    "dataset=fashion_mnist,smoke,method=hinton_kd",
    manual_dir=dirs["manual"],
    data_dir=dirs["tfds"],
    **overrides,
  )


def test_distillation_without_a_teacher_is_refused(dirs, tmp_path):
  with pytest.raises(ValueError, match=r"needs a trained teacher: set --config.teacher_workdir"):
    distill.train_and_evaluate(_student_config(dirs), str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("manual_dir", ["", "empty"])
def test_download_only_without_a_manual_dir(dirs, tmp_path, monkeypatch, manual_dir):
  """With downloading on (the default) and no data: a manual_dir without the files fails at
  once, no download attempted; without a manual_dir TFDS downloads, and its failure is the
  same clear error (here at once instead of after minutes of retries)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  attempts = []

  def no_network(self, *args, **kwargs):
    attempts.append(self.name)
    raise ConnectionError("no network")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_network)
  if manual_dir:
    (tmp_path / manual_dir).mkdir()
  config = _student_config(
    dirs,
    method="ground_truth",
    **{
      "data.manual_dir": manual_dir and str(tmp_path / manual_dir),
      "data.data_dir": str(tmp_path / "tfds"),
      "data.download": True,
    },
  )
  expected = (
    "Nothing was downloaded: --config.data.manual_dir is set"
    if manual_dir
    else (
      r"manual_dir \(now: unset\).*Downloading it with TFDS failed: ConnectionError: no network"
    )
  )
  with pytest.raises(data.DataNotFoundError, match=expected):
    distill.train_and_evaluate(config, str(tmp_path / "run"))
  assert attempts == ([] if manual_dir else ["fashion_mnist"])
  assert not os.path.exists(tmp_path / "run")


def test_evaluating_an_empty_workdir_is_one_line():
  from kd_jax.evaluate import evaluate_workdir  # pylint: disable=g-import-not-at-top

  with pytest.raises(
    ValueError, match="^--workdir is empty: give the workdir of the run to evaluate$"
  ):
    evaluate_workdir("")
