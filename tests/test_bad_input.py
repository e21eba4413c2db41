"""Bad input to `python -m kd_jax.main`: one `error: ...` line, a non-zero exit, nothing written.

The command-line cases run as subprocesses, two at a time, in one module fixture (each costs
seconds of imports); each test then checks its own case.
"""

import concurrent.futures
import os
import re
import subprocess
import sys

import jax
import ml_collections
import optax
import pytest

from kd_jax import checkpoint, data, models
from kd_jax.train import loop
from kd_jax.train.state import TrainState

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fake_data  # noqa: E402  pylint: disable=g-import-not-at-top
import helpers  # noqa: E402  pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
           PYTHONPATH=ROOT)
STUDENT = "--config=experiments/lenet_student.py:dataset=fashion_mnist,smoke"

# Lines that native libraries (TensorFlow's C++ start-up) and loggers may write before our
# error; everything else on stderr must be the single error line.
_LOG_LINE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[IWEF]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ \S+:\d+\] .*"
    r"|To enable the following instructions: .*)$"
)


def _case_args(d) -> dict[str, tuple[list[str], dict | None]]:
  data_flags = [f"--config.data.manual_dir={d['manual']}", f"--config.data.data_dir={d['tfds']}",
                "--config.data.download=False"]
  distill = [f"{STUDENT},method=hinton_kd", *data_flags]
  return {
      "unknown_key": ([STUDENT, *data_flags, "--config.no_such_key=1"], None),
      "unknown_nested_key": ([STUDENT, *data_flags, "--config.model.no_such_key=1"], None),
      "unknown_method": ([f"{STUDENT},method=foo", *data_flags], None),
      "unknown_dataset": (["--config=experiments/lenet_student.py:dataset=foo,smoke"], None),
      "missing_teacher": ([*distill, f"--config.teacher_workdir={d['base']}/no_such_teacher"], None),
      "empty_teacher": ([*distill, f"--config.teacher_workdir={d['empty_teacher']}"], None),
      "classes_mismatch": ([*distill, f"--config.teacher_workdir={d['five_class_teacher']}"], None),
      "batch_not_divisible": (
          [f"{STUDENT},method=ground_truth", *data_flags, "--config.batch_size=30"],
          {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
      ),
      "no_data": (
          [f"{STUDENT},method=ground_truth", f"--config.data.manual_dir={d['empty_manual']}",
           f"--config.data.data_dir={d['empty_tfds']}", "--config.data.download=False"],
          None,
      ),
  }


def _five_class_teacher(workdir: str) -> str:
  """A teacher checkpoint, as the loop writes it, of a 5-class model on fashion_mnist."""
  model = models.LeNet(num_classes=5, width=0.125)
  variables = jax.jit(lambda k: model.init(k, jax.numpy.zeros((1, 28, 28, 1)), train=False))(jax.random.PRNGKey(0))
  state = TrainState.create(variables=variables, tx=optax.adam(1e-3), rng=jax.random.PRNGKey(1))
  meta = {
      "kind": "nin_teacher",
      "main": "model",
      "models": {"model": checkpoint.model_entry(model, num_classes=5, classes=None)},
      "config": {"data": {"name": "fashion_mnist"}},
      "history": [],
  }
  ckpts = checkpoint.Checkpoints(workdir)
  ckpts.save(1, {"state": state}, meta, force=True)
  ckpts.close()
  return workdir


def _snapshot(directory: str) -> dict:
  out = {}
  for base, _, files in os.walk(directory):
    for f in files:
      st = os.stat(os.path.join(base, f))
      out[os.path.relpath(os.path.join(base, f), directory)] = (st.st_size, st.st_mtime_ns)
  return out


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
  }
  for key in ("empty_teacher", "empty_manual", "empty_tfds"):
    os.makedirs(d[key])
  config = data.default_data_config("fashion_mnist")
  config.manual_dir, config.data_dir, config.download = d["manual"], d["tfds"], False
  data.get_info(config)  # prepares the fake dataset once for every case
  d["five_class_teacher"] = _five_class_teacher(str(base / "five_class_teacher"))
  return d


@pytest.fixture(scope="module")
def cases(dirs):
  """Runs every command-line case (two at a time); returns {name: (process, workdir, teachers' files)}."""
  teachers = (dirs["empty_teacher"], dirs["five_class_teacher"])
  before = {t: _snapshot(t) for t in teachers}

  def run(name, args, extra_env):
    workdir = os.path.join(dirs["base"], f"workdir_{name}")
    proc = subprocess.run(
        [sys.executable, "-m", "kd_jax.main", *args, f"--workdir={workdir}"],
        cwd=ROOT, env={**ENV, **(extra_env or {})}, capture_output=True, text=True, timeout=300,
    )
    return name, proc, workdir

  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    results = list(pool.map(lambda item: run(item[0], *item[1]), _case_args(dirs).items()))
  return {"runs": {name: (proc, workdir) for name, proc, workdir in results},
          "teachers_before": before, "teachers_after": {t: _snapshot(t) for t in teachers}}


def _error_line(proc: subprocess.CompletedProcess) -> str:
  assert "Traceback" not in proc.stderr, proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.strip() and not _LOG_LINE.match(l)]
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  return lines[0]


EXPECTED = {
    "unknown_key": r"--config\.no_such_key: the config has no field 'no_such_key'",
    "unknown_nested_key": r"--config\.model\.no_such_key: the config has no field 'no_such_key'",
    "unknown_method": r"unknown method 'foo'; choose one of ground_truth, logit_regression",
    "unknown_dataset": r"unknown dataset 'foo'; choose one of cifar10, mnist, fashion_mnist",
    "missing_teacher": r"teacher_workdir: .*no_such_teacher holds no checkpoints",
    "empty_teacher": r"teacher_workdir: .*empty_teacher holds no checkpoints",
    "classes_mismatch": r"has 5 classes but fashion_mnist has 10",
    "batch_not_divisible": r"batch_size=30 is not divisible by the 4 devices",
    "no_data": r"no fashion_mnist data: put train-images-idx3-ubyte\.gz.*empty_manual, which has none of them.*"
               r"Downloading is off",
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_input_fails_cleanly(cases, name):
  proc, workdir = cases["runs"][name]
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  assert re.search(EXPECTED[name], _error_line(proc)), proc.stderr
  assert not os.path.exists(workdir)  # nothing written
  assert proc.stdout.strip() == ""


def test_teachers_are_left_alone(cases, dirs):
  assert cases["teachers_after"] == cases["teachers_before"]
  assert os.listdir(dirs["empty_teacher"]) == []
  assert os.listdir(dirs["empty_tfds"]) == []  # no download started, nothing prepared


# ------------------------------------------------------------------- in-process checks


def _student_config(dirs, **overrides) -> ml_collections.ConfigDict:
  return helpers.experiment_config(
      "lenet_student", "dataset=fashion_mnist,smoke,method=hinton_kd",
      manual_dir=dirs["manual"], data_dir=dirs["tfds"], **overrides,
  )


def test_distillation_without_a_teacher_is_refused(dirs, tmp_path):
  with pytest.raises(ValueError, match=r"needs a trained teacher: set --config.teacher_workdir"):
    loop.train_and_evaluate(_student_config(dirs), str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def test_failed_download_is_one_clear_error(dirs, tmp_path, monkeypatch):
  """With downloading on (the default) and no data, a failing download ends in the same
  clear error (here the download fails at once instead of after minutes of retries)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  attempts = []

  def no_network(self, *args, **kwargs):
    attempts.append(self.name)
    raise ConnectionError("no network")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_network)
  empty_manual, empty_tfds = tmp_path / "manual", tmp_path / "tfds"
  empty_manual.mkdir()
  config = _student_config(
      dirs, method="ground_truth", **{"data.manual_dir": str(empty_manual), "data.data_dir": str(empty_tfds),
                                      "data.download": True}
  )
  with pytest.raises(data.DataNotFoundError, match=r"Downloading it with TFDS failed: ConnectionError: no network"):
    loop.train_and_evaluate(config, str(tmp_path / "run"))
  assert attempts == ["fashion_mnist"]
  assert not os.path.exists(tmp_path / "run")
