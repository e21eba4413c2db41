"""The package: a wheel built from this checkout, installed into a fresh virtual environment,
trains a smoke config from outside the checkout with the packaged configs and the console
scripts, and its restored model scores its results.json without TensorFlow.

Installing JAX and TensorFlow into the new environment would take minutes and a network: it
sees this environment's site-packages through a .pth file instead, and the wheel goes in with
--no-deps; a separate test checks the wheel's declared dependencies against requirements.txt.
"""

import email.parser
import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import kd_jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fake_data  # noqa: E402  pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = ("amalgamate", "component", "lenet_student", "nin_teacher")

# Scores the installed package's restored model on the raw test images; prints the accuracy.
INFERENCE = """
import json, sys
import numpy as np
import kd_jax
from kd_jax import checkpoint
sys.path.insert(0, sys.argv[3])
import fake_data
model, variables, preprocess = checkpoint.load_for_inference(sys.argv[1])
images = fake_data.read_idx(sys.argv[2] + "/t10k-images-idx3-ubyte.gz")[..., None]
labels = fake_data.read_idx(sys.argv[2] + "/t10k-labels-idx1-ubyte.gz")
logits = model.apply(variables, preprocess(images), train=False)
print(json.dumps({
  "accuracy": float(np.mean(np.argmax(logits, -1) == labels)),
  "kd_jax": kd_jax.__file__,
  "tensorflow_imported": "tensorflow" in sys.modules,
}))
"""


def _copy_sources(target: str) -> str:
  """What a wheel is built from (never built in the shared checkout: build/, *.egg-info)."""
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
  for name in ("kd_jax", "experiments"):
    shutil.copytree(os.path.join(ROOT, name), os.path.join(target, name), ignore=ignore)
  for name in ("pyproject.toml", "setup.py", "README.md"):
    shutil.copy(os.path.join(ROOT, name), target)
  return target


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  base = tmp_path_factory.mktemp("package")
  source = _copy_sources(str(base / "source"))
  built = subprocess.run(
    [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation"]
    + ["--wheel-dir", str(base / "dist"), source],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert built.returncode == 0, built.stderr[-3000:]
  (path,) = glob.glob(str(base / "dist" / "kd_jax-*.whl"))
  return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
  """A fresh virtual environment with the wheel installed (this one's packages visible)."""
  venv = str(tmp_path_factory.mktemp("venv"))
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
  python = os.path.join(venv, "bin", "python")
  site_packages = subprocess.run(
    [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
    capture_output=True,
    text=True,
    check=True,
  ).stdout.strip()
  ours = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
  with open(os.path.join(site_packages, "ci_site_packages.pth"), "w", encoding="utf-8") as f:
    f.write("\n".join(ours) + "\n")
  install = subprocess.run(
    [sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps"]
    + ["--no-index", wheel],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert install.returncode == 0, install.stderr[-3000:]
  return venv


def _metadata(wheel: str):
  with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    return email.parser.Parser().parsestr(z.read(name).decode())


def _pins() -> dict[str, str]:
  """{package: pinned version} of requirements.txt."""
  pins = {}
  with open(os.path.join(ROOT, "requirements.txt"), encoding="utf-8") as f:
    for line in f:
      line = line.split("#", 1)[0].strip()
      if line:
        name, version = line.split("==")
        pins[canonicalize_name(name)] = version
  return pins


def test_the_wheel_holds_the_package_the_configs_and_the_scripts(wheel):
  with zipfile.ZipFile(wheel) as z:
    names = set(z.namelist())
    entry_points = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
  checkout = {
    os.path.relpath(p, ROOT)
    for p in glob.glob(os.path.join(ROOT, "kd_jax", "**", "*.py"), recursive=True)
  }
  assert checkout and checkout <= names, sorted(checkout - names)
  assert {f"kd_jax/experiments/{e}.py" for e in EXPERIMENTS} <= names
  assert not [n for n in names if n.startswith(("experiments/", "tests/", "kd_jax/experiments/s"))]
  assert "kd-jax-train = kd_jax.main:run" in entry_points
  assert "kd-jax-evaluate = kd_jax.evaluate:run" in entry_points
  assert _metadata(wheel)["Version"] == kd_jax.__version__


def test_requirements_txt_satisfies_the_declared_dependencies(wheel):
  pins = _pins()
  declared = [Requirement(r) for r in _metadata(wheel).get_all("Requires-Dist")]
  names = {canonicalize_name(r.name) for r in declared}
  for needed in ("jax", "flax", "optax", "orbax-checkpoint", "tensorflow-datasets", "clu"):
    assert needed in names, needed
  checked = set()
  for requirement in declared:
    for extra in ("", "test"):
      environment = {**default_environment(), "extra": extra}
      if requirement.marker is None or requirement.marker.evaluate(environment):
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not pinned in requirements.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
          requirement,
          pins[name],
        )
        checked.add(name)
        break
  # Every pin but the build tool is a dependency (the test tools: of the `test` extra).
  assert checked == set(pins) - {"setuptools"}, sorted(set(pins) - checked)


def test_installed_wheel_trains_and_restores_outside_the_checkout(installed, tmp_path):
  bin_dir = os.path.join(installed, "bin")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  manual = fake_data.write_idx_dataset(str(tmp_path / "manual"), num_train=64, num_test=32)
  workdir = str(tmp_path / "teacher")

  def run(*command):
    return subprocess.run(
      command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )

  listed = run(os.path.join(bin_dir, "kd-jax-train"))
  assert listed.returncode == 2, listed.stderr[-2000:]
  for name in EXPERIMENTS:
    assert f"  {name} " in listed.stderr
  helped = run(os.path.join(bin_dir, "kd-jax-train"), "--help")  # the module's doc and flags
  assert helped.returncode == 0 and "--config.KEY=VALUE" in " ".join(helped.stdout.split())
  assert "--describe" in helped.stdout and "--workdir" in helped.stdout
  train = run(
    os.path.join(bin_dir, "kd-jax-train"),
    "--config=nin_teacher:dataset=mnist,smoke",
    f"--config.data.manual_dir={manual}",
    f"--config.data.data_dir={tmp_path / 'tfds'}",
    "--config.data.download=False",
    "--config.num_epochs=1",
    "--config.steps_per_epoch=2",
    f"--workdir={workdir}",
  )
  assert train.returncode == 0, train.stderr[-3000:]
  with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
    results = json.load(f)
  assert results["steps"] == 2
  assert results["provenance"]["kd_jax_version"] == kd_jax.__version__
  assert results["provenance"]["git"] is None  # an installed package is no checkout

  restored = run(
    os.path.join(bin_dir, "python"),
    "-c",
    textwrap.dedent(INFERENCE),
    workdir,
    manual,
    os.path.dirname(os.path.abspath(__file__)),
  )
  assert restored.returncode == 0, restored.stderr[-3000:]
  printed = json.loads(restored.stdout.strip().splitlines()[-1])
  assert printed["kd_jax"].startswith(installed), printed  # the wheel's, not the checkout's
  assert not printed["tensorflow_imported"]
  assert printed["accuracy"] == pytest.approx(results["test_accuracy"], abs=1e-9)
