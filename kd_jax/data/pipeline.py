"""Input pipeline: finds the data, prepares it once, and serves tf.data batches.

Datasets: 'cifar10', 'mnist', 'fashion_mnist'.

Data config fields (an `ml_collections.ConfigDict` from
`kd_jax.data.default_data_config`, or any object with these attributes):

  name:        one of the dataset names above.
  data_dir:    TFDS data directory, where datasets are (or get) prepared.
               '~' is expanded; '' or None means TFDS's default.
  manual_dir:  optional folder with raw files (see below); '' or None: none.
  preprocess:  'mean_image' | 'mean_image_255' | 'standardize' | 'none'.
  augment:     bool; training batches get pad-4 + random-crop (+ horizontal
               flip for cifar10 only: a flipped digit is another glyph).
  download (optional): False skips step 4 below (TFDS download), e.g.
               offline, where it fails only after ~3.5 minutes of retries.
  shuffle_buffer (optional): 0 or absent: each training epoch is a uniform
               permutation of the split; N > 0: of each block of N examples
               (only to bound memory on larger data).

Where data comes from (`get_builder`), first match wins:
  1. A prepared TFDS dataset in `data_dir`: the standard one ('cifar10',
     'mnist', 'fashion_mnist') or one of ours ('cifar10_python', 'idx_mnist',
     'idx_fashion_mnist', see builders.py).
  2. Raw files in `manual_dir`, prepared into `data_dir` by our builder:
     the four MNIST IDX files (`train-images-idx3-ubyte.gz`, ...) for mnist and
     fashion_mnist, `cifar-10-python.tar.gz` for cifar10.
  3. TFDS's own archive in `manual_dir` (`cifar-10-binary.tar.gz`), prepared by
     TFDS's builder, which checks it against its registered checksum.
     A `manual_dir` that is set but holds none of these files fails at once:
     the user said where the data is, so nothing is downloaded behind their back.
  4. Only when no `manual_dir` is set: a normal TFDS download.
  No data: `DataNotFoundError`, which says what to put where.

Preprocessing (statistics always come from the whole TRAIN split, whatever
split or class subset is read, so that the same image gets the same input in
every model; amalgamation feeds one image to teachers trained on different
class subsets and to the student):
  'mean_image':     x/255 - mean_image, mean_image the per-pixel mean of x/255.
                    The seed's preprocessing, rescaled to about [-1, 1] so that
                    default initialisers and learning rates behave.
  'mean_image_255': x - 255*mean_image: the seed's exact 0-255 scale, for
                    reproducing its numbers.
  'standardize':    (x/255 - mean_c)/std_c with per-channel train statistics.
  'none':           x/255.
The statistics are computed once and cached in `<prepared dataset dir>/
kd_jax_train_stats.npz` (one file per dataset and version).

Batches are dicts of numpy/tf arrays: 'image' float32 [B, H, W, C] and
'label' int32 [B], plus 'mask' bool [B] when the last partial batch is padded
(evaluation's default): padded rows have mask False, label 0, image 0. With
`raw_images=True` (the training loop and evaluation) 'image' stays uint8 and
`device_preprocess(data_config)` preprocesses it on the device, bit-identically.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from kd_jax.data import builders
from kd_jax.data import formats


def _hide_gpus_from_tf() -> None:
  """TF only feeds data here; a GPU, if any, belongs to JAX."""
  try:
    tf.config.set_visible_devices([], "GPU")
  except (RuntimeError, ValueError):
    # RuntimeError: TF's devices were already initialised by someone else.
    pass


_hide_gpus_from_tf()

PREPROCESS_CHOICES = ("mean_image", "mean_image_255", "standardize", "none")
_STATS_FILE = "kd_jax_train_stats.npz"
_FULL_SHUFFLE = 100_000  # More than any split here: a uniform permutation.
_AUG_PAD = 4


class DataNotFoundError(ValueError):
  """No prepared dataset, no usable manual files, and downloading failed."""


@dataclasses.dataclass(frozen=True)
class _Source:
  tfds_name: str
  builder_cls: type[tfds.core.GeneratorBasedBuilder]
  manual_files: str  # For error messages: what to put in manual_dir.
  flip: bool  # Whether horizontal flips are a valid augmentation.
  # Files of TFDS's own builder that it takes from manual_dir instead of downloading
  # (those it shares with ours, the IDX files, are read by ours).
  tfds_manual_files: tuple[str, ...] = ()


_IDX_FILES_TEXT = (
    "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz (gzipped or not)"
)
_SOURCES = {
    "cifar10": _Source("cifar10", builders.Cifar10Python,
                       formats.CIFAR10_ARCHIVE, flip=True,
                       tfds_manual_files=("cifar-10-binary.tar.gz",)),
    "mnist": _Source("mnist", builders.IdxMnist, _IDX_FILES_TEXT, flip=False),
    "fashion_mnist": _Source("fashion_mnist", builders.IdxFashionMnist,
                             _IDX_FILES_TEXT, flip=False),
}
DATASET_NAMES = tuple(_SOURCES)


def _expand(path: str | os.PathLike | None) -> str | None:
  return os.path.expanduser(os.fspath(path)) if path else None


def _source(name: str) -> _Source:
  if name not in _SOURCES:
    raise ValueError(
        f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}."
    )
  return _SOURCES[name]


def _has_manual_files(source: _Source, manual_dir: str) -> bool:
  """Whether manual_dir holds (some of) this dataset's raw files.

  Some but not all IDX files counts as present: the builder then raises a
  ValueError naming the missing one, which is more useful than falling through
  to a download.
  """
  if source.builder_cls is builders.Cifar10Python:
    return formats.cifar10_source(manual_dir) is not None
  found, _ = formats.idx_files_status(manual_dir)
  return bool(found)


def _is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
  # The existence check first spares a TFDS warning for every absent dataset.
  return os.path.isdir(os.fspath(builder.data_dir)) and builder.is_prepared()


def get_builder(
    name: str,
    *,
    data_dir: str | os.PathLike | None,
    manual_dir: str | os.PathLike | None = None,
    download: bool = True,
) -> tfds.core.DatasetBuilder:
  """Returns a prepared TFDS builder for `name` (see the module docstring).

  `download=False` skips the TFDS download attempt; so does a `manual_dir`.

  Raises:
    ValueError: unknown name, or malformed files in manual_dir.
    DataNotFoundError: no data anywhere and the TFDS download failed.
  """
  source = _source(name)
  data_dir, manual_dir = _expand(data_dir), _expand(manual_dir)

  # 1. Already prepared. The standard dataset wins: its files were checksummed.
  standard = tfds.builder(source.tfds_name, data_dir=data_dir)
  if _is_prepared(standard):
    return standard
  ours = source.builder_cls(data_dir=data_dir)
  if _is_prepared(ours):
    return ours

  # 2. Raw files in manual_dir. Format errors propagate as ValueError.
  if manual_dir and os.path.isdir(manual_dir) and _has_manual_files(
      source, manual_dir
  ):
    logging.info("Preparing %s from %s into %s", ours.name, manual_dir,
                 ours.data_dir)
    ours.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
    )
    return ours

  def not_found(why: str) -> DataNotFoundError:
    if not manual_dir:
      manual_state = "unset"
    elif not os.path.isdir(manual_dir):
      manual_state = f"{manual_dir}, which does not exist"
    else:
      manual_state = f"{manual_dir}, which has none of them"
    return DataNotFoundError(
        f"no {name} data: put {source.manual_files} in "
        f"--config.data.manual_dir (now: {manual_state}), or a prepared TFDS "
        f"dataset ({source.tfds_name!r} or {source.builder_cls.name!r}) in "
        f"--config.data.data_dir (now: {data_dir or 'the TFDS default'}). "
        f"{why}"
    )

  # 3. TFDS's own files in manual_dir, else nothing: never a download when the
  # user named the directory that holds the data.
  if manual_dir and not any(
      os.path.isfile(os.path.join(manual_dir, f))
      for f in source.tfds_manual_files):
    raise not_found("Nothing was downloaded: --config.data.manual_dir is set "
                    "(leave it empty to let TFDS download).")
  # 4. TFDS's own download.
  if not manual_dir and not download:
    raise not_found("Downloading is off (--config.data.download=False).")
  try:
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    standard.download_and_prepare(download_config=download_config)
  except Exception as e:  # Network, checksum, disk, ...: all mean "no data".
    first_line = (str(e).strip().splitlines() or [""])[0][:300]
    action = "Preparing it" if manual_dir else "Downloading it"
    raise not_found(
        f"{action} with TFDS failed: {type(e).__name__}: {first_line}"
    ) from e
  return standard


def _builder(data_config) -> tfds.core.DatasetBuilder:
  return get_builder(
      data_config.name,
      data_dir=getattr(data_config, "data_dir", None),
      manual_dir=getattr(data_config, "manual_dir", None),
      download=bool(getattr(data_config, "download", True)),
  )


# ----------------------------------------------------------------------------
# Dataset facts and class subsets
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What models and training loops need to know about a dataset.

  With a class subset, classes, names and counts are those of the subset.
  """

  num_classes: int
  image_shape: tuple[int, int, int]  # (H, W, C)
  num_train: int
  num_test: int
  class_names: tuple[str, ...]


def _check_classes(
    classes: Sequence[int] | None, num_classes: int
) -> tuple[int, ...] | None:
  """Validates a class subset; returns it as a tuple (None: all classes)."""
  if classes is None:
    return None
  classes = tuple(int(c) for c in classes)
  if not classes:
    raise ValueError("classes must not be empty (use None for all classes).")
  bad = [c for c in classes if not 0 <= c < num_classes]
  if bad:
    raise ValueError(f"classes {bad} out of range [0, {num_classes}).")
  if len(set(classes)) != len(classes):
    raise ValueError(f"classes {list(classes)} has duplicates.")
  return classes


def _read(
    builder: tfds.core.DatasetBuilder,
    split: str,
    classes: tuple[int, ...] | None,
    decoders=None,
) -> tf.data.Dataset:
  """Reads a split in stored order as {'image' uint8, 'label' int32}.

  With `classes`, keeps only those labels and maps classes[i] to i.
  """
  ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)
  ds = ds.map(lambda ex: {"image": ex["image"],
                          "label": tf.cast(ex["label"], tf.int32)})
  if classes is not None:
    num_classes = builder.info.features["label"].num_classes
    remap = np.full([num_classes], -1, np.int32)
    remap[list(classes)] = np.arange(len(classes), dtype=np.int32)
    remap = tf.constant(remap)
    ds = ds.filter(lambda ex: tf.gather(remap, ex["label"]) >= 0)
    ds = ds.map(lambda ex: {**ex, "label": tf.gather(remap, ex["label"])})
  return ds


def _count(builder, split: str, classes: tuple[int, ...] | None) -> int:
  """Counts the examples of a split (or class subset) with a labels-only pass."""
  if classes is None:
    try:
      n = builder.info.splits[split].num_examples
      if n:
        return n
    except (KeyError, ValueError):
      pass  # Unknown split statistics (e.g. mocked data): count.
  # A labels-only pass, once per prepared dataset (never rewritten once prepared), split and
  # class subset in a process: a run asks for the same counts many times.
  key = (str(builder.data_path), split, classes)
  if key not in _COUNTS:
    ds = _read(builder, split, classes, decoders={"image": tfds.decode.SkipDecoding()})
    _COUNTS[key] = int(ds.reduce(np.int64(0), lambda n, _: n + 1))
  return _COUNTS[key]


_COUNTS: dict[tuple[str, str, tuple[int, ...] | None], int] = {}


def get_info(data_config, classes: Sequence[int] | None = None) -> DatasetInfo:
  """Returns the facts of the configured dataset (prepared on first use)."""
  builder = _builder(data_config)
  features = builder.info.features
  classes = _check_classes(classes, features["label"].num_classes)
  names = tuple(features["label"].names)
  if classes is not None:
    names = tuple(names[c] for c in classes)
  return DatasetInfo(
      num_classes=len(names),
      image_shape=tuple(features["image"].shape),
      num_train=_count(builder, "train", classes),
      num_test=_count(builder, "test", classes),
      class_names=names,
  )


# ----------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------


def _compute_stats(builder) -> dict[str, np.ndarray]:
  """One pass over the train split: per-pixel and per-channel statistics of x/255."""
  total = None
  total_sq = None
  n = 0
  ds = _read(builder, "train", None).map(lambda ex: ex["image"]).batch(2048)
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

  Keys: 'mean_image' [H, W, C], 'channel_mean' [C], 'channel_std' [C] (all of
  x/255, float32) and 'num_examples'.
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


def _check_preprocess(kind: str) -> str:
  if kind not in PREPROCESS_CHOICES:
    raise ValueError(
        f"unknown preprocess {kind!r}; choose one of "
        f"{', '.join(PREPROCESS_CHOICES)}."
    )
  return kind


def _preprocess_fn(kind: str, builder):
  """Returns image uint8 [..., H, W, C] -> float32, per `kind`."""
  if _check_preprocess(kind) == "none":
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
  kind = _check_preprocess(getattr(data_config, "preprocess", "mean_image"))
  stats = None if kind == "none" else train_stats(_builder(data_config))
  channels = _builder(data_config).info.features["image"].shape[-1]
  values = np.arange(256, dtype=np.float32)[:, None] * np.ones(channels, np.float32)
  offset = None
  if kind == "mean_image_255":
    table, offset = values, np.float32(255.0) * stats["mean_image"]
  elif kind == "standardize":
    table = (values / np.float32(255.0) - stats["channel_mean"]) / stats["channel_std"]
  else:
    table = values / np.float32(255.0)
    offset = stats["mean_image"] if kind == "mean_image" else None
  return functools.partial(preprocess_images, table=table, offset=offset)


def preprocess_images(images, *, table, offset=None):
  """`table[value, channel]` of every uint8 pixel, minus `offset` (see `device_preprocess`)."""
  import jax.numpy as jnp  # Deferred: the data package itself needs no JAX.

  x = jnp.asarray(table)[images.astype(jnp.int32), jnp.arange(images.shape[-1])]
  return x if offset is None else x - offset


def _augment(image: tf.Tensor, rng: tf.Tensor, flip: bool) -> tf.Tensor:
  """Pad-4 (black) + random crop back to size (+ random horizontal flip)."""
  crop_rng, flip_rng = tf.unstack(tf.random.experimental.stateless_split(rng, 2))
  shape = image.shape
  p = _AUG_PAD
  padded = tf.pad(image, [[p, p], [p, p], [0, 0]])
  image = tf.image.stateless_random_crop(padded, shape, seed=crop_rng)
  if flip:
    image = tf.image.stateless_random_flip_left_right(image, seed=flip_rng)
  return image


# ----------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------


def _processes(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # Deferred: the data package itself needs no JAX.

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return process_index, process_count


def _local_batch_size(batch_size: int, process_count: int) -> int:
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(
        f"batch_size {batch_size} must be positive and divisible by the "
        f"number of processes ({process_count})."
    )
  return batch_size // process_count


def num_batches(
    data_config,
    split: str,
    *,
    batch_size: int,
    train: bool,
    classes: Sequence[int] | None = None,
    drop_remainder: bool | None = None,
) -> int:
  """Global batches per epoch that `make_dataset` yields (on every process).

  With drop_remainder: the full batches; without: every batch, the last one padded.
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size {batch_size} must be positive.")
  builder = _builder(data_config)
  classes = _check_classes(classes, builder.info.features["label"].num_classes)
  drop = train if drop_remainder is None else drop_remainder
  count = _count(builder, split, classes)
  return count // batch_size if drop else -(-count // batch_size)


def make_dataset(
    data_config,
    split: str,
    *,
    batch_size: int,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
    num_epochs: int | None = 1,
    classes: Sequence[int] | None = None,
    drop_remainder: bool | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    with_index: bool = False,
    raw_images: bool = False,
) -> tf.data.Dataset:
  """Returns this process's rows of the global batches of `split`, for `num_epochs` epochs.

  The order is one permutation of the whole split per epoch (or stored order), cut into
  global batches of `batch_size`; process p of P takes rows [p*b, (p+1)*b) of each, b =
  batch_size/P. Every process reads the whole split (the datasets here are small), so P
  processes feed their devices exactly the rows one process would: the numbers do not
  depend on how the devices are spread over processes.

  Args:
    data_config: see the module docstring.
    split: a TFDS split, e.g. 'train', 'test', 'train[:90%]'.
    batch_size: GLOBAL batch size; each process gets batch_size/process_count
      rows of each batch.
    train: shuffle (and augment if data_config.augment); else stored order.
    seed: base seed of shuffling and augmentation.
    epoch: first epoch. Epoch e's order and augmentation depend only on
      (seed, e): resuming with epoch=e replays exactly what an uninterrupted
      run would have produced from epoch e on.
    num_epochs: number of epochs (None: forever). Batches never straddle
      epochs, and every epoch has `num_batches(...)` batches. Prefer one long
      dataset to one dataset per epoch: the decoded split is cached in memory
      by the dataset, so a new dataset re-reads it.
    classes: optional class subset; label classes[i] becomes i.
    drop_remainder: drop the last partial batch (default: `train`). If False,
      the last batch is padded to full size and every batch has a 'mask' key,
      so an epoch covers every example exactly once at a fixed shape.
    process_index, process_count: default to JAX's (overridable for tests).
    with_index: add 'index', each example's position in the split in stored
      order (what `train=False` yields), the same in every epoch and process: it
      keys per-example data such as cached teacher logits.
    raw_images: uint8 images (augmented, not preprocessed), for the device to
      preprocess with `device_preprocess(data_config)`: a quarter of the bytes.

  Returns:
    A tf.data.Dataset of {'image': float32 [b, H, W, C] (uint8 with
    raw_images), 'label': int32 [b]}
    (+ 'mask': bool [b] when not drop_remainder, + 'index': int64 [b] when
    with_index), b = batch_size/process_count.
  """
  process_index, process_count = _processes(process_index, process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count}).")
  builder = _builder(data_config)
  source = _source(data_config.name)
  classes = _check_classes(classes, builder.info.features["label"].num_classes)
  local = _local_batch_size(batch_size, process_count)
  drop = train if drop_remainder is None else drop_remainder
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}.")

  preprocess = _preprocess_fn(getattr(data_config, "preprocess", "mean_image"),
                              builder)
  if raw_images:
    preprocess = lambda image: image  # the device's work (device_preprocess)
  augment = train and bool(getattr(data_config, "augment", False))
  block = int(getattr(data_config, "shuffle_buffer", 0) or _FULL_SHUFFLE)

  # Decoded uint8 images are small (<= 150 MB for CIFAR-10): cache them, then
  # shuffle, augment and convert per epoch. The index numbers examples within
  # the split: it keys each example's augmentation randomness.
  base = _read(builder, split, classes).enumerate()
  base = base.map(lambda i, ex: {**ex, "index": i}).cache()
  # With several processes each takes its rows of every global batch; all must make the
  # same number of steps, which the whole split's count gives.
  steps = None
  if process_count > 1:
    steps = num_batches(data_config, split, batch_size=batch_size, train=train,
                        classes=classes, drop_remainder=drop)

  def local_rows(ds):
    if process_count == 1:
      return ds
    ds = ds.enumerate().filter(
        lambda i, ex: (i % batch_size) // local == process_index)
    return ds.map(lambda i, ex: ex)

  root_rng = tf.constant([0, seed], tf.int64)

  def example_fn(ex, aug_rng):
    image = ex["image"]
    if augment:
      rng = tf.random.experimental.stateless_fold_in(aug_rng, ex["index"])
      image = _augment(image, rng, flip=source.flip)
    out = {"image": preprocess(image), "label": ex["label"]}
    if with_index:
      out["index"] = ex["index"]
    return out

  def one_epoch(e):
    epoch_rng = tf.random.experimental.stateless_fold_in(root_rng, e)
    shuffle_rng = tf.random.experimental.stateless_fold_in(epoch_rng, 0)
    aug_rng = tf.random.experimental.stateless_fold_in(epoch_rng, 1)
    ds = local_rows(_permute(base, shuffle_rng, block) if train else base)
    ds = ds.map(lambda ex: example_fn(ex, aug_rng),
                num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(local, drop_remainder=drop)
    if not drop:
      ds = ds.map(functools.partial(_pad_batch, batch_size=local))
      if steps is not None:
        # A whole padding batch for a process with no rows in the last batch.
        ds = ds.concatenate(_padding_batches(ds.element_spec)).take(steps)
    elif steps is not None:
      ds = ds.take(steps)
    return ds

  if num_epochs is None:
    epochs = tf.data.Dataset.counter(start=epoch)
  else:
    epochs = tf.data.Dataset.range(epoch, epoch + num_epochs)
  ds = epochs.flat_map(one_epoch)
  options = tf.data.Options()
  options.deterministic = True  # Parallel maps must keep the seeded order.
  ds = ds.with_options(options)
  return ds.prefetch(tf.data.AUTOTUNE)


def _permute(ds: tf.data.Dataset, rng: tf.Tensor, block: int) -> tf.data.Dataset:
  """Shuffles `ds` with a permutation that depends only on `rng`.

  tf.data's `shuffle` also mixes in TF's global seed, so any
  `tf.random.set_seed` elsewhere would change the order; stateless ops do not.
  Each block of `block` consecutive examples (by default the whole split, i.e.
  a uniform permutation) is gathered into one tensor and permuted.
  """

  def permute_block(k, batch):
    n = tf.shape(batch["label"])[0]
    seed = tf.random.experimental.stateless_fold_in(rng, k)
    order = tf.random.experimental.stateless_shuffle(tf.range(n), seed=seed)
    return {key: tf.gather(value, order) for key, value in batch.items()}

  return ds.batch(block).enumerate().map(permute_block).unbatch()


def _pad_batch(batch: dict, batch_size: int) -> dict:
  """Pads a (possibly partial) batch to batch_size rows, adding 'mask'."""
  n = tf.shape(batch["label"])[0]
  out = {}
  for key, value in batch.items():
    paddings = [[0, batch_size - n]] + [[0, 0]] * (value.shape.rank - 1)
    padded = tf.pad(value, paddings)
    out[key] = tf.ensure_shape(padded, [batch_size] + value.shape[1:])
  out["mask"] = tf.range(batch_size) < n
  return out


def _padding_batches(spec: dict) -> tf.data.Dataset:
  """An endless stream of all-padding batches (mask False) matching `spec`."""
  zeros = {k: tf.zeros(s.shape, s.dtype) for k, s in spec.items()}
  return tf.data.Dataset.from_tensors(zeros).repeat()


def as_numpy(ds: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
  """Iterates a tf.data.Dataset as numpy dicts (what jitted steps take)."""
  return iter(tfds.as_numpy(ds))


def load_arrays(
    data_config, split: str, classes: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Returns the whole split (all processes' shares) as numpy arrays.

  For small evaluation and statistics jobs. Images are preprocessed per
  data_config (never augmented), float32 [N, H, W, C]; labels int32 [N]
  (remapped when `classes` is given). Stored order.
  """
  builder = _builder(data_config)
  classes = _check_classes(classes, builder.info.features["label"].num_classes)
  preprocess = _preprocess_fn(getattr(data_config, "preprocess", "mean_image"),
                              builder)
  ds = _read(builder, split, classes).batch(1024)
  ds = ds.map(lambda b: (preprocess(b["image"]), b["label"]))
  images, labels = [], []
  for x, y in tfds.as_numpy(ds):
    images.append(x)
    labels.append(y)
  if not images:
    shape = tuple(builder.info.features["image"].shape)
    return np.zeros((0,) + shape, np.float32), np.zeros((0,), np.int32)
  return np.concatenate(images), np.concatenate(labels)
