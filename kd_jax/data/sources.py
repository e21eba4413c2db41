"""Where the data comes from: finding or preparing a dataset, its facts and its counts.

Datasets: 'cifar10', 'mnist', 'fashion_mnist'. Where data comes from (`get_builder`), first
match wins:
  1. A prepared TFDS dataset in `data_dir`: the standard one ('cifar10', 'mnist',
     'fashion_mnist') or one of ours ('cifar10_python', 'idx_mnist', 'idx_fashion_mnist',
     see builders.py).
  2. Raw files in `manual_dir`, prepared into `data_dir` by our builder: the four MNIST IDX
     files (`train-images-idx3-ubyte.gz`, ...) for mnist and fashion_mnist,
     `cifar-10-python.tar.gz` for cifar10.
  3. TFDS's own archive in `manual_dir` (`cifar-10-binary.tar.gz`), prepared by TFDS's
     builder, which checks it against its registered checksum. A `manual_dir` that is set
     but holds none of these files fails at once: the user said where the data is, so
     nothing is downloaded behind their back.
  4. Only when no `manual_dir` is set (and `download` is not False): a normal TFDS download.
  No data: `DataNotFoundError`, which says what to put where.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import sys
from collections.abc import Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from kd_jax.config_fields import check_classes
from kd_jax.data import builders, formats
from kd_jax.errors import UsageError


def _hide_gpus_from_tf() -> None:
  """TF only feeds data here; a GPU, if any, belongs to JAX."""
  try:
    tf.config.set_visible_devices([], "GPU")
  except (RuntimeError, ValueError):
    # RuntimeError: TF's devices were already initialised by someone else.
    pass


_hide_gpus_from_tf()


class DataNotFoundError(UsageError):
  """No prepared dataset, no usable manual files, and downloading failed."""


@dataclasses.dataclass(frozen=True)
class Source:
  """How one dataset is found and prepared, and what augmentation suits it."""

  tfds_name: str
  builder_cls: type[tfds.core.GeneratorBasedBuilder]
  manual_files: str  # For error messages: what to put in manual_dir.
  flip: bool  # Whether horizontal flips are a valid augmentation (a flipped digit is not).
  # Files of TFDS's own builder that it takes from manual_dir instead of downloading
  # (those it shares with ours, the IDX files, are read by ours).
  tfds_manual_files: tuple[str, ...] = ()


_IDX_FILES_TEXT = (
  "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
  "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz (gzipped or not)"
)
_SOURCES = {
  "cifar10": Source(
    "cifar10",
    builders.Cifar10Python,
    formats.CIFAR10_ARCHIVE,
    flip=True,
    tfds_manual_files=("cifar-10-binary.tar.gz",),
  ),
  "mnist": Source("mnist", builders.IdxMnist, _IDX_FILES_TEXT, flip=False),
  "fashion_mnist": Source("fashion_mnist", builders.IdxFashionMnist, _IDX_FILES_TEXT, flip=False),
}
# The datasets with a source; tests/test_config_schema.py checks it is `kd_jax.choices.DATASETS`.
DATASET_NAMES = tuple(_SOURCES)


def source_of(name: str) -> Source:
  """The source record of dataset `name`; ValueError for an unknown name."""
  if name not in _SOURCES:
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}.")
  return _SOURCES[name]


def _expand(path: str | os.PathLike | None) -> str | None:
  return os.path.expanduser(os.fspath(path)) if path else None


def _has_manual_files(source: Source, manual_dir: str) -> bool:
  """Whether manual_dir holds (some of) this dataset's raw files.

  Some but not all IDX files counts as present: the builder then raises a ValueError naming
  the missing one, which is more useful than falling through to a download.
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
  source = source_of(name)
  data_dir, manual_dir = _expand(data_dir), _expand(manual_dir)

  # 1. Already prepared. The standard dataset wins: its files were checksummed.
  standard = tfds.builder(source.tfds_name, data_dir=data_dir)
  if _is_prepared(standard):
    return standard
  ours = source.builder_cls(data_dir=data_dir)
  if _is_prepared(ours):
    return ours

  # 2. Raw files in manual_dir. Format errors propagate as ValueError.
  if manual_dir and os.path.isdir(manual_dir) and _has_manual_files(source, manual_dir):
    # One line for the user who waits (TFDS's own notes, on stdout, are dropped).
    print(f"data: preparing {ours.name} from {manual_dir} into {ours.data_dir}", file=sys.stderr)
    with contextlib.redirect_stdout(io.StringIO()):
      ours.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
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
    os.path.isfile(os.path.join(manual_dir, f)) for f in source.tfds_manual_files
  ):
    raise not_found(
      "Nothing was downloaded: --config.data.manual_dir is set "
      "(leave it empty to let TFDS download)."
    )
  # 4. TFDS's own download.
  if not manual_dir and not download:
    raise not_found("Downloading is off (--config.data.download=False).")
  try:
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    standard.download_and_prepare(download_config=download_config)
  except Exception as e:  # Network, checksum, disk, ...: all mean "no data".
    first_line = (str(e).strip().splitlines() or [""])[0][:300]
    action = "Preparing it" if manual_dir else "Downloading it"
    raise not_found(f"{action} with TFDS failed: {type(e).__name__}: {first_line}") from e
  return standard


def builder_of(data_config) -> tfds.core.DatasetBuilder:
  """`get_builder` for a data config (`kd_jax.data`'s fields)."""
  return get_builder(
    data_config.name,
    data_dir=getattr(data_config, "data_dir", None),
    manual_dir=getattr(data_config, "manual_dir", None),
    download=bool(getattr(data_config, "download", True)),
  )


# ----------------------------------------------------------------------------
# Class subsets, reading and counting
# ----------------------------------------------------------------------------


def class_subset(
  builder: tfds.core.DatasetBuilder, classes: Sequence[int] | None
) -> tuple[int, ...] | None:
  """Validates a class subset of the builder's dataset; returns it as a tuple (None: all).

  Raises:
    UsageError (a ValueError): see `kd_jax.config_fields.check_classes`.
  """
  if classes is None:
    return None
  return check_classes(classes, builder.info.features["label"].num_classes, fewest=1)


def read_split(
  builder: tfds.core.DatasetBuilder,
  split: str,
  classes: tuple[int, ...] | None,
  decoders=None,
) -> tf.data.Dataset:
  """Reads a split in stored order as {'image' uint8, 'label' int32}.

  With `classes`, keeps only those labels and maps classes[i] to i.
  """
  ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)
  ds = ds.map(lambda ex: {"image": ex["image"], "label": tf.cast(ex["label"], tf.int32)})
  if classes is not None:
    num_classes = builder.info.features["label"].num_classes
    remap = np.full([num_classes], -1, np.int32)
    remap[list(classes)] = np.arange(len(classes), dtype=np.int32)
    remap = tf.constant(remap)
    ds = ds.filter(lambda ex: tf.gather(remap, ex["label"]) >= 0)
    ds = ds.map(lambda ex: {**ex, "label": tf.gather(remap, ex["label"])})
  return ds


class ExampleCounts:
  """A cache of counted examples, keyed by (prepared dataset path, split, class subset).

  Why: a run asks for the same counts many times (dataset facts, batches per epoch), and a
  labels-only pass reads the whole split. A prepared dataset is never rewritten, so a count
  stays right for the life of the process.
  """

  def __init__(self):
    self._counts: dict[tuple[str, str, tuple[int, ...] | None], int] = {}

  def get(self, builder, split: str, classes: tuple[int, ...] | None) -> int:
    """The number of examples of `split` (restricted to `classes`), counted once."""
    key = (str(builder.data_path), split, classes)
    if key not in self._counts:
      ds = read_split(builder, split, classes, decoders={"image": tfds.decode.SkipDecoding()})
      self._counts[key] = int(ds.reduce(np.int64(0), lambda n, _: n + 1))
    return self._counts[key]

  def clear(self) -> None:
    self._counts.clear()


_COUNTS = ExampleCounts()


def count_examples(builder, split: str, classes: tuple[int, ...] | None) -> int:
  """Examples of a split (or class subset): TFDS's split statistics, else a counted pass."""
  if classes is None:
    try:
      n = builder.info.splits[split].num_examples
      if n:
        return n
    except (KeyError, ValueError):
      pass  # Unknown split statistics (e.g. mocked data): count.
  return _COUNTS.get(builder, split, classes)


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


def get_info(data_config, classes: Sequence[int] | None = None) -> DatasetInfo:
  """Returns the facts of the configured dataset (prepared on first use)."""
  builder = builder_of(data_config)
  classes = class_subset(builder, classes)
  names = tuple(builder.info.features["label"].names)
  if classes is not None:
    names = tuple(names[c] for c in classes)
  return DatasetInfo(
    num_classes=len(names),
    image_shape=tuple(builder.info.features["image"].shape),
    num_train=count_examples(builder, "train", classes),
    num_test=count_examples(builder, "test", classes),
    class_names=names,
  )
