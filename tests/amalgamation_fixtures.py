"""Shared pieces of the amalgamation tests: one small IDX dataset per test session and
amalgamation configs pointing at it (import the fixture into a test module to use it)."""

import fake_data
import pytest
from helpers import experiment, override, tree_snapshot  # noqa: F401 (re-exported)

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
