"""Input pipeline: CIFAR-10, MNIST and Fashion-MNIST as tf.data batches for JAX.

A data config (an `ml_collections.ConfigDict` from `default_data_config`, or any object
with these attributes):

  name:        'cifar10', 'mnist' or 'fashion_mnist'.
  data_dir:    TFDS data directory, where datasets are (or get) prepared. '~' is expanded;
               '' or None means TFDS's default.
  manual_dir:  optional folder with raw files (see `sources`); '' or None: none.
  preprocess:  'mean_image' | 'mean_image_255' | 'standardize' | 'none' (see `preprocessing`).
  augment:     bool; training batches get pad-4 + random-crop (+ horizontal flip for cifar10
               only: a flipped digit is another glyph).
  download (optional): False skips the TFDS download, e.g. offline, where it fails only
               after minutes of retries.
  shuffle_buffer (optional): 0 or absent: each training epoch is a uniform permutation of
               the split; N > 0: of each block of N examples (only to bound memory on larger
               data).

Modules: `sources` (finding and preparing the data, its facts and counts), `preprocessing`
(train statistics, host and device preprocessing), `portable` (the preprocessing as a record a
checkpoint keeps, applied without TensorFlow), `dataset` (the tf.data pipeline),
`builders` and `formats` (our TFDS builders and the raw file formats they read).

TensorFlow is imported when a pipeline name is first used, not with the package: a config
(`kd_jax.configs` calls `default_data_config`) loads and is validated without it.
"""

import importlib

from kd_jax.data.defaults import default_data_config as default_data_config  # re-exported

# Public name -> the module that defines it, imported on first use.
_LAZY = {
  "DATASET_NAMES": "sources",
  "DataNotFoundError": "sources",
  "DatasetInfo": "sources",
  "get_builder": "sources",
  "get_info": "sources",
  "PREPROCESS_CHOICES": "preprocessing",
  "device_preprocess": "preprocessing",
  "preprocess_images": "preprocessing",
  "preprocess_record": "preprocessing",
  "train_stats": "preprocessing",
  "as_numpy": "dataset",
  "load_arrays": "dataset",
  "make_dataset": "dataset",
  "num_batches": "dataset",
}

__all__ = sorted([*_LAZY, "default_data_config"])


def __getattr__(name: str):
  if name in _LAZY:
    return getattr(importlib.import_module(f"kd_jax.data.{_LAZY[name]}"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
