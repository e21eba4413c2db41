"""Helpers shared by the test modules: experiment configs as the command line builds them,
and snapshots of directories to prove that a refused run wrote nothing."""

import copy
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def experiment(name: str):
  """The module `experiments/<name>.py` (the directory is not a package)."""
  spec = importlib.util.spec_from_file_location(f"experiments_{name}", os.path.join(ROOT, "experiments", f"{name}.py"))
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
