"""Shared pieces of the amalgamation tests: one small IDX dataset per test session and
amalgamation configs pointing at it (import the fixture into a test module to use it)."""

import copy
import importlib.util
import os

import pytest

import fake_data

# 512 training images: each class pair has ~100 (3 batches of 32 per epoch) and each half
# of it ~50, enough for the dual stage's source nets.
NUM_TRAIN = 512
NUM_TEST = 64


@pytest.fixture(scope="session")
def idx_data(tmp_path_factory):
  """`(manual_dir, data_dir)` of a learnable 10-class 28×28 MNIST-format dataset."""
  root = tmp_path_factory.mktemp("amalgamation_data")
  manual = fake_data.write_idx_dataset(str(root / "manual"), num_train=NUM_TRAIN, num_test=NUM_TEST)
  return manual, str(root / "tfds")


def point_at(config, idx_data):
  """`config` (locked; changed in place and returned) reading the fake dataset, no network."""
  manual, data_dir = idx_data
  config.data.manual_dir = manual
  config.data.data_dir = data_dir
  config.data.download = False
  return config


EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")


def experiment(name):
  """The module `experiments/<name>.py` (the directory is not a package)."""
  spec = importlib.util.spec_from_file_location(f"experiments_{name}", os.path.join(EXPERIMENTS, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def locked(config):
  config.lock()  # as `--config` gives it: only existing keys may be set
  return config


def amalgamate_config(idx_data, arg="smoke", **overrides):
  """`experiments/amalgamate.py`'s config for `arg`, on the fake data, with `overrides`
  (dotted keys allowed: `**{'amalgamation.epochs': 1}`)."""
  config = point_at(locked(experiment("amalgamate").get_config(arg)), idx_data)
  return override(config, **overrides)


def component_config(idx_data, arg="smoke", **overrides):
  config = point_at(locked(experiment("component").get_config(arg)), idx_data)
  return override(config, **overrides)


def override(config, **overrides):
  config = copy.deepcopy(config)
  for key, value in overrides.items():
    *path, name = key.split(".")
    node = config
    for part in path:
      node = node[part]
    node[name] = value  # a locked ConfigDict: existing keys only
  return config


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
