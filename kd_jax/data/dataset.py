"""The tf.data pipeline: batches of a split, for training and evaluation, on every process.

Batches are dicts of numpy/tf arrays: 'image' float32 [B, H, W, C] and 'label' int32 [B],
plus 'mask' bool [B] when the last partial batch is padded (evaluation's default): padded
rows have mask False, label 0, image 0. With `raw_images=True` (the training loop and
evaluation) 'image' stays uint8 and `device_preprocess(data_config)` preprocesses it on the
device, bit-identically.

Training epochs are seeded permutations of the split (`data_config.shuffle_buffer`: 0 or
absent, a uniform permutation; N > 0, of each block of N examples, only to bound memory on
larger data), augmented when `data_config.augment` is set: pad-4 + random crop (+ a
horizontal flip for cifar10 only: a flipped digit is another glyph).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from kd_jax.data import defaults, preprocessing, sources

_FULL_SHUFFLE = 100_000  # More than any split here: a uniform permutation.
_AUG_PAD = 4


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
  builder = sources.builder_of(data_config)
  classes = sources.class_subset(builder, classes)
  drop = train if drop_remainder is None else drop_remainder
  count = sources.count_examples(builder, split, classes)
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
  batches_per_epoch: int | None = None,
) -> tf.data.Dataset:
  """Returns this process's rows of the global batches of `split`, for `num_epochs` epochs.

  The order is one permutation of the whole split per epoch (or stored order), cut into
  global batches of `batch_size`; process p of P takes rows [p*b, (p+1)*b) of each, b =
  batch_size/P. Every process reads the whole split (the datasets here are small), so P
  processes feed their devices exactly the rows one process would: the numbers do not
  depend on how the devices are spread over processes.

  Args:
    data_config: see `kd_jax.data`.
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
    batches_per_epoch: only the first this many batches of each epoch (a shortened
      epoch: its order is the full epoch's, and the rest is never made).

  Returns:
    A tf.data.Dataset of {'image': float32 [b, H, W, C] (uint8 with
    raw_images), 'label': int32 [b]}
    (+ 'mask': bool [b] when not drop_remainder, + 'index': int64 [b] when
    with_index), b = batch_size/process_count.
  """
  process_index, process_count = _processes(process_index, process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count}).")
  builder = sources.builder_of(data_config)
  source = sources.source_of(data_config.name)
  classes = sources.class_subset(builder, classes)
  local = _local_batch_size(batch_size, process_count)
  drop = train if drop_remainder is None else drop_remainder
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}.")

  preprocess = preprocessing.preprocess_fn(data_config, builder)
  if raw_images:
    preprocess = lambda image: image  # the device's work (device_preprocess)
  augment = train and bool(getattr(data_config, "augment", False))
  block = int(getattr(data_config, "shuffle_buffer", 0) or _FULL_SHUFFLE)

  # Decoded uint8 images are small (<= 150 MB for CIFAR-10): cache them, then
  # shuffle, augment and convert per epoch. The index numbers examples within
  # the split: it keys each example's augmentation randomness.
  base = sources.read_split(builder, split, classes).enumerate()
  base = base.map(lambda i, ex: {**ex, "index": i}).cache()
  # With several processes each takes its rows of every global batch; all must make the
  # same number of steps, which the whole split's count gives.
  steps = None
  if process_count > 1:
    steps = num_batches(
      data_config, split, batch_size=batch_size, train=train, classes=classes, drop_remainder=drop
    )

  def local_rows(ds):
    if process_count == 1:
      return ds
    ds = ds.enumerate().filter(lambda i, ex: (i % batch_size) // local == process_index)
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
    ds = ds.map(lambda ex: example_fn(ex, aug_rng), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(local, drop_remainder=drop)
    if not drop:
      ds = ds.map(functools.partial(_pad_batch, batch_size=local))
      if steps is not None:
        # A whole padding batch for a process with no rows in the last batch.
        ds = ds.concatenate(_padding_batches(ds.element_spec)).take(steps)
    elif steps is not None:
      ds = ds.take(steps)
    if batches_per_epoch is not None:
      ds = ds.take(batches_per_epoch)
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
  (remapped when `classes` is given). Stored order. `data_config` may be a plain dict
  (e.g. a results.json's `config['data']`): missing fields take their defaults.
  """
  data_config = defaults.as_data_config(data_config)
  builder = sources.builder_of(data_config)
  classes = sources.class_subset(builder, classes)
  preprocess = preprocessing.preprocess_fn(data_config, builder)
  ds = sources.read_split(builder, split, classes).batch(1024)
  ds = ds.map(lambda b: (preprocess(b["image"]), b["label"]))
  images, labels = [], []
  for x, y in tfds.as_numpy(ds):
    images.append(x)
    labels.append(y)
  if not images:
    shape = tuple(builder.info.features["image"].shape)
    return np.zeros((0,) + shape, np.float32), np.zeros((0,), np.int32)
  return np.concatenate(images), np.concatenate(labels)
