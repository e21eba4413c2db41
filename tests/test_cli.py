"""The command line's front door: the experiments listed without --config, packaged configs
named by NAME, --describe's fields from the declared schema, --help's pointers.

In-process where the code allows it; two subprocesses check what absl adds (--help, and
--describe exiting before any training).
"""

import os
import subprocess
import sys

import pytest

from kd_jax import catalog, cli, config_schema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = ["amalgamate", "component", "lenet_student", "nin_teacher"]
ENV = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)


def _config(name: str, arg: str):
  """The experiment's config as `--config=NAME:ARG` loads it (from the resolved file)."""
  import importlib.util  # pylint: disable=g-import-not-at-top

  path = catalog.resolve(name).partition(":")[0]
  spec = importlib.util.spec_from_file_location(f"catalog_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_the_experiments_are_listed_with_their_docstrings():
  assert catalog.names() == EXPERIMENTS
  lines = catalog.listing().splitlines()
  assert [line.split()[0] for line in lines] == EXPERIMENTS
  assert "LeNet student: on labels, or distilled from a trained teacher." in lines[2]


def test_without_config_the_command_lists_them_and_says_how_to_choose(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli._parse_flags(["kd-jax-train", "--workdir=runs/x"], experiment=True)
  assert exit_info.value.code == 2
  stderr = capsys.readouterr().err.strip().splitlines()
  for name in EXPERIMENTS:
    assert any(line.split()[:1] == [name] for line in stderr), name
  assert stderr[-1].startswith("error: no --config: choose an experiment, e.g. kd-jax-train ")
  assert "--config=nin_teacher:" in stderr[-1] and "--describe" in stderr[-1]


def test_a_packaged_experiment_is_found_by_name_from_anywhere(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  packaged = catalog.path_of("lenet_student")
  assert os.path.isfile(packaged)
  for spec in ("lenet_student", "lenet_student.py", "experiments/lenet_student.py"):
    assert catalog.resolve(spec + ":smoke,method=ground_truth") == (
      packaged + ":smoke,method=ground_truth"
    )
  assert catalog.resolve("nin_teacher") == catalog.path_of("nin_teacher")
  # Unknown names and other directories stay as given (the file check reports them).
  for spec in ("no_such:smoke", "other/lenet_student.py", ""):
    assert catalog.resolve(spec) == spec
  problem = cli.config_file_problem("no_such")
  assert problem.startswith("--config=no_such: no such file; the packaged experiments are ")
  # A file that exists always wins: a user's own lenet_student.py is never shadowed.
  (tmp_path / "lenet_student.py").write_text("def get_config(arg=None):\n  return None\n")
  assert catalog.resolve("lenet_student.py:smoke") == "lenet_student.py:smoke"
  argv = cli._with_packaged_config(["kd-jax-train", "--config", "nin_teacher:smoke", "--x=1"])
  assert argv == ["kd-jax-train", "--config", catalog.path_of("nin_teacher") + ":smoke", "--x=1"]


@pytest.mark.parametrize(
  "name,arg",
  [
    ("nin_teacher", "smoke"),
    ("lenet_student", "smoke"),
    ("component", "smoke"),
    ("amalgamate", "smoke"),
  ],
)
def test_describe_shows_every_field_with_its_type_default_and_meaning(name, arg):
  config = _config(name, arg)
  text = catalog.describe(config, name)
  lines = text.splitlines()
  assert lines[0] == f"{name}: {catalog.summary(name)}"
  rows = {line.split()[0]: line for line in lines[4:]}
  flat = config_schema.flatten(config)
  assert set(rows) == set(flat)
  for key, value in flat.items():
    field = config_schema.SCHEMA[key]  # every field is declared (tests/test_config_schema.py)
    cells = rows[key].split(None, 2)
    assert cells[1] == field.kind.__name__, rows[key]
    assert cells[2].startswith(repr(value)), rows[key]
    assert rows[key].rstrip().find(field.meaning) > 0, rows[key]
    if field.choices:
      assert rows[key].endswith("one of " + ", ".join(field.choices)), rows[key]


def test_describe_prints_the_fields_and_trains_nothing(tmp_path):
  proc = subprocess.run(
    [sys.executable, "-m", "kd_jax.main", "--config=lenet_student:smoke", "--describe"],
    cwd=tmp_path,
    env=ENV,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.splitlines()
  assert lines[0].startswith("lenet_student: LeNet student")
  assert any(line.split()[:3] == ["distill.temperature", "float", "4.0"] for line in lines)
  assert any(line.split()[:3] == ["model.width", "float", "0.125"] for line in lines)  # smoke
  assert os.listdir(tmp_path) == []  # no workdir, no data: nothing written


def test_help_points_to_the_experiments_and_the_config_keys():
  proc = subprocess.run(
    [sys.executable, "-m", "kd_jax.main", "--help"],
    cwd=ROOT,
    env=ENV,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  text = " ".join(proc.stdout.split())
  assert "--config.KEY=VALUE" in text and "--describe" in text
  assert "nin_teacher, lenet_student, component, amalgamate" in text
