"""Input pipeline: CIFAR-10, MNIST and Fashion-MNIST as tf.data batches for JAX.

TensorFlow is imported when a pipeline name is first used, not with the package: a config
(`kd_jax.configs` calls `default_data_config`) loads and is validated without it.
"""

import importlib

from kd_jax.data.defaults import default_data_config

_PIPELINE = (
    "DATASET_NAMES",
    "DataNotFoundError",
    "DatasetInfo",
    "device_preprocess",
    "PREPROCESS_CHOICES",
    "as_numpy",
    "get_builder",
    "get_info",
    "load_arrays",
    "make_dataset",
    "num_batches",
    "preprocess_images",
    "train_stats",
)

__all__ = sorted([*_PIPELINE, "default_data_config"])


def __getattr__(name: str):
  if name in _PIPELINE:
    return getattr(importlib.import_module("kd_jax.data.pipeline"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
