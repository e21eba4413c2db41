"""Helpers shared by the test modules: experiment configs as the command line builds them,
and snapshots of directories to prove that a refused run wrote nothing."""

import copy
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def experiment(name: str):
  """The module `experiments/<name>.py`, e.g. "amalgamate" or "studies/routing_study" (the
  directory is not a package)."""
  spec = importlib.util.spec_from_file_location(
    f"experiments_{name.replace('/', '_')}", os.path.join(ROOT, "experiments", f"{name}.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def override(config, **overrides):
  """A copy of a (locked) config with dotted keys set: `**{'distill.temperature': 2.0}`."""
  config = copy.deepcopy(config)
  for key, value in overrides.items():
    *path, name = key.split(".")
    node = config
    for part in path:
      node = node[part]
    node[name] = value  # a locked ConfigDict: existing keys only
  return config


def experiment_config(name: str, arg: str, *, manual_dir: str, data_dir: str, **overrides):
  """`experiments/NAME.py:ARG`, locked as `--config` gives it, reading local data only."""
  config = experiment(name).get_config(arg)
  config.lock()
  config.data.manual_dir, config.data.data_dir, config.data.download = manual_dir, data_dir, False
  return override(config, **overrides)


def tree_snapshot(path):
  """{relative path: (size, mtime_ns)} of every file under `path` (None if it is absent)."""
  if not os.path.exists(path):
    return None
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      full = os.path.join(root, name)
      st = os.stat(full)
      out[os.path.relpath(full, path)] = (st.st_size, st.st_mtime_ns)
  return out


def tree_contents(path):
  """Byte-for-byte state of `path`: a file's bytes, a directory's {relative path: bytes} of
  every file under it, or None if it is absent."""
  if os.path.isfile(path):
    with open(path, "rb") as f:
      return f.read()
  if not os.path.isdir(path):
    return None
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      with open(os.path.join(root, name), "rb") as f:
        out[os.path.relpath(os.path.join(root, name), path)] = f.read()
  return out


# Drops CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH and CAP_FOWNER from the bounding set (prctl
# PR_CAPBSET_DROP), then execs the command: root then obeys permission bits. A non-root user
# cannot drop them (EPERM) and needs not.
_OBEY_PERMISSIONS = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if os.geteuid() == 0:
  for capability in (1, 2, 3):
    if libc.prctl(24, capability, 0, 0, 0) != 0:
      sys.exit(f"cannot drop capability {capability}: errno {ctypes.get_errno()}")
os.execv(sys.argv[1], sys.argv[1:])
"""


def obeying_permissions(command: list[str]) -> list[str]:
  """`command` run so that file permission bits apply, also when the tests run as root
  (root writes anywhere but on read-only file systems, so a chmod alone proves nothing)."""
  return [sys.executable, "-c", _OBEY_PERMISSIONS, *command]


def final_params(workdir: str):
  """The variables of a run's saved main model, on the host."""
  import jax  # pylint: disable=g-import-not-at-top

  from kd_jax import checkpoint  # pylint: disable=g-import-not-at-top

  return jax.device_get(checkpoint.load(workdir)[1])


def assert_trees_equal(a, b):
  """Bit-identical pytrees: the same structure and every leaf equal."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# The preamble of the 4-host-device scripts (tests/test_train_steps.py, tests/test_dropout.py):
# one batch, a distillation config and a small NiN teacher; the script's body follows it.
FOUR_DEVICE_PREAMBLE = """
import json
import jax
import ml_collections
import numpy as np
import optax
jax.config.update("jax_disable_most_optimizations", True)
from kd_jax import models
from kd_jax.train import mesh as mesh_lib, steps
from kd_jax.train.state import TrainState

assert len(jax.devices()) == 4, jax.devices()
rng = np.random.default_rng(0)
batch = {{"image": rng.normal(size=(8, 28, 28, 1)).astype(np.float32),
         "label": (np.arange(8) % 10).astype(np.int32)}}
distill = ml_collections.ConfigDict(dict(temperature=4.0, soft_weight=0.9, noise_ratio=0.5,
                                          noise_std={noise_std}, seed_compat=False))
teacher = models.NiN(num_classes=10, width=0.05, dropout_rate={teacher_dropout_rate})
teacher_vars = jax.jit(lambda k: teacher.init(k, batch["image"][:1], train=False))(jax.random.PRNGKey(1))

def maxdiff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
"""


def run_on_four_devices(body: str, *, noise_std: float, teacher_dropout_rate: float) -> dict:
  """Runs FOUR_DEVICE_PREAMBLE + `body` in a subprocess with 4 forced host CPU devices; returns
  the JSON the script printed after 'RESULT '."""
  script = FOUR_DEVICE_PREAMBLE.format(
    noise_std=noise_std, teacher_dropout_rate=teacher_dropout_rate
  )
  env = dict(
    os.environ,
    XLA_FLAGS="--xla_force_host_platform_device_count=4",
    JAX_PLATFORMS="cpu",
    TF_CPP_MIN_LOG_LEVEL="3",
    PYTHONPATH=ROOT,
  )
  proc = subprocess.run(
    [sys.executable, "-c", script + textwrap.dedent(body)],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT ") :])
