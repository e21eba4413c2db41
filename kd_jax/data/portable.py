"""The preprocessing as lookup tables, and as a record a checkpoint keeps: no TensorFlow.

A model expects what its run fed it (e.g. `x/255 - mean_image` of the training split), not
`x/255`. Training writes the preprocessing and its statistics into the checkpoint's meta
(`record`); `kd_jax.checkpoint.load_for_inference` turns the record back into a function
(`from_record`), on a machine without the data or TensorFlow.

Per value and channel the preprocessing is `table[value, channel]`, computed in float32
exactly as TensorFlow computes the host pipeline, then at most one subtraction: so the NumPy
function here, the device preprocessing and the tf.data pipeline agree bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

# The statistics each preprocessing reads (`kd_jax.data.preprocessing.train_stats`' keys).
_USES = {
  "mean_image": ("mean_image",),
  "mean_image_255": ("mean_image",),
  "standardize": ("channel_mean", "channel_std"),
  "none": (),
}


def tables(
  kind: str, stats: Mapping[str, np.ndarray] | None, channels: int
) -> tuple[np.ndarray, np.ndarray | None]:
  """`(table [256, channels], offset or None)`: preprocessed = table[value, channel] - offset."""
  if kind not in _USES:
    raise ValueError(f"unknown preprocess {kind!r}; choose one of {', '.join(_USES)}")
  values = np.arange(256, dtype=np.float32)[:, None] * np.ones(channels, np.float32)
  if kind == "mean_image_255":
    return values, np.float32(255.0) * np.asarray(stats["mean_image"], np.float32)
  if kind == "standardize":
    mean = np.asarray(stats["channel_mean"], np.float32)
    std = np.asarray(stats["channel_std"], np.float32)
    return (values / np.float32(255.0) - mean) / std, None
  offset = np.asarray(stats["mean_image"], np.float32) if kind == "mean_image" else None
  return values / np.float32(255.0), offset


def record(kind: str, stats: Mapping[str, np.ndarray] | None, image_shape: Sequence[int]) -> dict:
  """The JSON record of a preprocessing: its kind, the image shape and the statistics it reads
  (float32 values survive JSON exactly)."""
  if kind not in _USES:
    raise ValueError(f"unknown preprocess {kind!r}; choose one of {', '.join(_USES)}")
  saved = {"kind": kind, "image_shape": [int(d) for d in image_shape]}
  for key in _USES[kind]:
    saved[key] = np.asarray(stats[key], np.float32).tolist()
  return saved


def from_record(saved: Mapping) -> Callable[[np.ndarray], np.ndarray]:
  """The preprocessing of a `record`: uint8 images `[N, H, W, C]` → float32, as in training."""
  kind, image_shape = saved["kind"], tuple(saved["image_shape"])
  stats = {key: np.asarray(saved[key], np.float32) for key in _USES.get(kind, ())}
  table, offset = tables(kind, stats, image_shape[-1])
  channel = np.arange(image_shape[-1])

  def preprocess(images) -> np.ndarray:
    """Raw uint8 images `[N, H, W, C]` (0-255, as stored) → the model's float32 input."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
      raise ValueError(
        f"preprocess takes the raw uint8 images (0-255), not {images.dtype}: "
        "it applies the run's own scaling and statistics"
      )
    if images.ndim < 3 or images.shape[-3:] != image_shape:
      raise ValueError(
        f"preprocess takes images [N, {', '.join(map(str, image_shape))}], not {images.shape}"
      )
    x = table[images.astype(np.intp), channel]
    return x if offset is None else x - offset

  return preprocess
