"""Image preprocessing: train-split statistics, and the host and device preprocessing.

Statistics always come from the whole TRAIN split, whatever split or class subset is read,
so that the same image gets the same input in every model (amalgamation feeds one image to
teachers trained on different class subsets and to the student). The choices
(`data_config.preprocess`):
  'mean_image':     x/255 - mean_image, mean_image the per-pixel mean of x/255: the seed's
                    preprocessing, rescaled to about [-1, 1] so that default initialisers
                    and learning rates behave.
  'mean_image_255': x - 255*mean_image: the seed's exact 0-255 scale, for reproducing its
                    numbers.
  'standardize':    (x/255 - mean_c)/std_c with per-channel train statistics.
  'none':           x/255.
The statistics are computed once and cached in `<prepared dataset dir>/kd_jax_train_stats.npz`
(one file per dataset and version).

The host preprocessing (`preprocess_fn`) is a TensorFlow function for tf.data; the device
preprocessing (`device_preprocess`) is a JAX function of uint8 batches, bit-identical to it.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from kd_jax.choices import PREPROCESS
from kd_jax.data import portable, sources

PREPROCESS_CHOICES = PREPROCESS  # The code below acts on each of them.
_STATS_FILE = "kd_jax_train_stats.npz"


def _compute_stats(builder) -> dict[str, np.ndarray]:
  """One pass over the train split: per-pixel and per-channel statistics of x/255."""
  total = None
  total_sq = None
  n = 0
  ds = sources.read_split(builder, "train", None).map(lambda ex: ex["image"]).batch(2048)
  for images in tfds.as_numpy(ds):
    x = images.astype(np.float64) / 255.0
    s, s2 = x.sum(0), (x * x).sum(0)
    total = s if total is None else total + s
    total_sq = s2 if total_sq is None else total_sq + s2
    n += len(x)
  if not n:
    raise ValueError(f"{builder.name}: the train split is empty.")
  mean_image = total / n
  channel_mean = mean_image.mean(axis=(0, 1))
  channel_var = (total_sq / n).mean(axis=(0, 1)) - channel_mean**2
  return {
    "mean_image": mean_image.astype(np.float32),
    "channel_mean": channel_mean.astype(np.float32),
    "channel_std": np.sqrt(np.maximum(channel_var, 1e-12)).astype(np.float32),
    "num_examples": np.int64(n),
  }


@functools.lru_cache(maxsize=None)
def _load_stats_file(path: str, mtime: float) -> dict[str, np.ndarray]:
  del mtime  # Only part of the cache key: a rewritten file is re-read.
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def train_stats(builder: tfds.core.DatasetBuilder) -> dict[str, np.ndarray]:
  """Returns the train-split statistics, cached beside the prepared dataset.

  Keys: 'mean_image' [H, W, C], 'channel_mean' [C], 'channel_std' [C] (all of x/255,
  float32) and 'num_examples'.
  """
  path = os.path.join(os.fspath(builder.data_dir), _STATS_FILE)
  if os.path.isfile(path):
    return _load_stats_file(path, os.path.getmtime(path))
  stats = _compute_stats(builder)
  # Write only for a real prepared dataset whose example count matches what
  # was read: never into a missing directory, and never stats of mocked data.
  try:
    expected = builder.info.splits["train"].num_examples
  except (KeyError, ValueError):
    expected = None
  if os.path.isdir(os.path.dirname(path)) and expected == stats["num_examples"]:
    try:
      # Atomic: write a temp file in the same directory, then rename.
      fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
      with os.fdopen(fd, "wb") as f:
        np.savez(f, **stats)
      os.replace(tmp, path)
    except OSError as e:  # e.g. a read-only shared data_dir: just recompute.
      logging.warning("Cannot cache dataset statistics in %s: %s", path, e)
  return stats


def _kind(data_config) -> str:
  """The configured preprocessing; ValueError for an unknown one."""
  kind = getattr(data_config, "preprocess", "mean_image")
  if kind not in PREPROCESS_CHOICES:
    raise ValueError(f"unknown preprocess {kind!r}; choose one of {', '.join(PREPROCESS_CHOICES)}.")
  return kind


def preprocess_fn(data_config, builder: tfds.core.DatasetBuilder):
  """The configured host preprocessing, for tf.data: uint8 images [..., H, W, C] -> float32."""
  kind = _kind(data_config)
  if kind == "none":
    return lambda image: tf.cast(image, tf.float32) / 255.0
  stats = train_stats(builder)
  mean_image = tf.constant(stats["mean_image"])
  if kind == "mean_image":
    return lambda image: tf.cast(image, tf.float32) / 255.0 - mean_image
  if kind == "mean_image_255":
    return lambda image: tf.cast(image, tf.float32) - 255.0 * mean_image
  mean, std = tf.constant(stats["channel_mean"]), tf.constant(stats["channel_std"])
  return lambda image: (tf.cast(image, tf.float32) / 255.0 - mean) / std


def device_preprocess(data_config):
  """The configured preprocessing as a JAX function of uint8 images `[..., H, W, C]`, for
  batches made with `raw_images=True`: it runs inside the jitted step, on the device, so
  a quarter of the bytes cross to it.

  Bit-identical to the host preprocessing (tests/test_hot_loop.py). XLA rewrites `x / c`
  as `x * (1/c)` and fuses multiplies into FMAs, which moves results by an ulp; so the
  per-value part is a 256-entry table per channel computed here in float32 exactly as
  TensorFlow computes it, and the device does one lookup and at most one subtraction.
  """
  kind = _kind(data_config)
  stats = None if kind == "none" else train_stats(sources.builder_of(data_config))
  channels = sources.builder_of(data_config).info.features["image"].shape[-1]
  table, offset = portable.tables(kind, stats, channels)
  return functools.partial(preprocess_images, table=table, offset=offset)


def preprocess_record(data_config) -> dict:
  """The configured preprocessing and the statistics it reads, as JSON for a checkpoint's meta
  (`kd_jax.data.portable`: a restored model gets its input without TensorFlow or the data)."""
  kind = _kind(data_config)
  builder = sources.builder_of(data_config)
  stats = None if kind == "none" else train_stats(builder)
  return portable.record(kind, stats, builder.info.features["image"].shape)


def preprocess_images(images, *, table, offset=None):
  """`table[value, channel]` of every uint8 pixel, minus `offset` (see `device_preprocess`)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top  (the data package needs no JAX)

  x = jnp.asarray(table)[images.astype(jnp.int32), jnp.arange(images.shape[-1])]
  return x if offset is None else x - offset
