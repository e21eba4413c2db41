"""Readers for the raw files users download by hand: MNIST IDX and CIFAR-10 pickles.

Both readers check the format up front and raise a `ValueError` that names the
file and says what is wrong, so a truncated download or a wrong file is caught
before anything is written to `data_dir`.

IDX (http://yann.lecun.com/exdb/mnist/ format, also used by Fashion-MNIST):
a big-endian header, then raw uint8 data. Images: magic 2051, count, rows,
cols. Labels: magic 2049, count.

CIFAR-10 python version: `cifar-10-python.tar.gz` holds `cifar-10-batches-py/`
with `data_batch_1..5`, `test_batch` and `batches.meta`, each a Python-2
pickle. A batch is a dict with `data` (uint8 [N, 3072]: the red, green and
blue 32x32 planes of each image, row-major) and `labels` (N ints).
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
from collections.abc import Mapping, Sequence

import numpy as np

IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
MNIST_SHAPE = (28, 28)

# Base names of the four IDX files; each may be gzipped (`.gz`) or not.
IDX_FILES = {
  "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
  "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCHES = ("test_batch",)
CIFAR10_ROW_BYTES = 32 * 32 * 3


# ----------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)
# ----------------------------------------------------------------------------


def find_idx_file(directory: str | os.PathLike, base: str) -> str | None:
  """Returns the path of `base` or `base.gz` in `directory`, or None."""
  for name in (base + ".gz", base):
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      return path
  return None


def idx_files_status(directory: str | os.PathLike) -> tuple[list[str], list[str]]:
  """Returns (found paths, missing base names) of the four IDX files."""
  found, missing = [], []
  for bases in IDX_FILES.values():
    for base in bases:
      path = find_idx_file(directory, base)
      if path is None:
        missing.append(base + "[.gz]")
      else:
        found.append(path)
  return found, missing


def _read_bytes(path: str) -> bytes:
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      return f.read()
  except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError.
    raise ValueError(f"{path}: cannot be read ({e}).") from e


def _header(path: str, data: bytes, n_ints: int) -> tuple[int, ...]:
  if len(data) < 4 * n_ints:
    raise ValueError(
      f"{path}: only {len(data)} bytes, too short for an IDX header ({4 * n_ints} bytes)."
    )
  return tuple(int(x) for x in np.frombuffer(data, ">u4", count=n_ints))


def read_idx_images(path: str) -> np.ndarray:
  """Reads an IDX image file into uint8 [N, 28, 28, 1], checking the format."""
  data = _read_bytes(path)
  magic = _header(path, data, 1)[0]
  if magic != IDX_IMAGES_MAGIC:
    raise ValueError(
      f"{path}: bad magic number {magic}, an IDX image file starts with "
      f"{IDX_IMAGES_MAGIC} (is it a label file, or not IDX at all?)."
    )
  _, n, rows, cols = _header(path, data, 4)
  if (rows, cols) != MNIST_SHAPE:
    raise ValueError(
      f"{path}: images are {rows}x{cols}, expected {MNIST_SHAPE[0]}x{MNIST_SHAPE[1]}."
    )
  expected = 16 + n * rows * cols
  if len(data) != expected:
    raise ValueError(
      f"{path}: header says {n} images of {rows}x{cols} ({expected} bytes) "
      f"but the file has {len(data)} bytes (truncated or corrupt?)."
    )
  images = np.frombuffer(data, np.uint8, offset=16).reshape(n, rows, cols, 1)
  return images


def read_idx_labels(path: str, num_classes: int = 10) -> np.ndarray:
  """Reads an IDX label file into int64 [N], checking the format."""
  data = _read_bytes(path)
  magic = _header(path, data, 1)[0]
  if magic != IDX_LABELS_MAGIC:
    raise ValueError(
      f"{path}: bad magic number {magic}, an IDX label file starts with "
      f"{IDX_LABELS_MAGIC} (is it an image file, or not IDX at all?)."
    )
  _, n = _header(path, data, 2)
  if len(data) != 8 + n:
    raise ValueError(
      f"{path}: header says {n} labels ({8 + n} bytes) but the file has "
      f"{len(data)} bytes (truncated or corrupt?)."
    )
  labels = np.frombuffer(data, np.uint8, offset=8).astype(np.int64)
  if n and labels.max() >= num_classes:
    raise ValueError(f"{path}: label {labels.max()} out of range [0, {num_classes}).")
  return labels


def read_idx_split(
  directory: str | os.PathLike, split: str, num_classes: int = 10
) -> tuple[np.ndarray, np.ndarray]:
  """Reads and cross-checks one split's image and label files."""
  image_base, label_base = IDX_FILES[split]
  paths = []
  for base in (image_base, label_base):
    path = find_idx_file(directory, base)
    if path is None:
      raise ValueError(f"missing file: neither {base}.gz nor {base} is in {directory}.")
    paths.append(path)
  images = read_idx_images(paths[0])
  labels = read_idx_labels(paths[1], num_classes)
  if len(images) != len(labels):
    raise ValueError(
      f"{paths[0]} has {len(images)} images but {paths[1]} has "
      f"{len(labels)} labels: the counts must match."
    )
  return images, labels


# ----------------------------------------------------------------------------
# CIFAR-10 (python pickles)
# ----------------------------------------------------------------------------


class _SafeUnpickler(pickle.Unpickler):
  """Unpickles only plain containers and numpy arrays.

  The archive comes from the user's disk: a plain `pickle.load` would run any
  code a tampered file names, so only the globals numpy arrays need are allowed.
  """

  _ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    # Protocol-2 pickles written by Python 3 store bytes this way.
    ("_codecs", "encode"),
  }

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
    return super().find_class(module, name)


def _unpickle(data: bytes, where: str) -> dict:
  try:
    obj = _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
  except Exception as e:  # Any unpickling failure means a bad file.
    raise ValueError(f"{where}: not a readable CIFAR pickle ({e}).") from e
  if not isinstance(obj, dict):
    raise ValueError(f"{where}: expected a pickled dict, got {type(obj)}.")
  # Python-2 pickles have bytes keys; pickles written by Python 3 have str keys.
  return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def cifar10_source(directory: str | os.PathLike) -> str | None:
  """Returns the CIFAR-10 archive or extracted folder in `directory`, or None."""
  for name in (CIFAR10_ARCHIVE, CIFAR10_DIR):
    path = os.path.join(directory, name)
    if os.path.exists(path):
      return path
  return None


def _read_cifar_members(source: str, names: Sequence[str]) -> Mapping[str, bytes]:
  """Returns the bytes of `cifar-10-batches-py/<name>` for each name."""
  out = {}
  if os.path.isdir(source):
    for name in names:
      path = os.path.join(source, name)
      if os.path.isfile(path):
        with open(path, "rb") as f:
          out[name] = f.read()
    return out
  try:
    with tarfile.open(source, "r:*") as tar:
      for member in tar:
        # Members are `cifar-10-batches-py/<name>`; match on the base name.
        name = os.path.basename(member.name)
        if member.isfile() and name in names:
          out[name] = tar.extractfile(member).read()
  except (tarfile.TarError, OSError, EOFError) as e:
    raise ValueError(f"{source}: not a readable tar.gz archive ({e}).") from e
  return out


def read_cifar10(
  source: str,
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
  """Reads CIFAR-10 from the python archive (or its extracted folder).

  Returns ({'train': (images, labels), 'test': (...)}, label_names), images
  uint8 [N, 32, 32, 3] and labels int64 [N]. Every batch must be present, with
  3072 bytes per row and one label per row; the real archive has 10000 rows per
  batch, but the row count is read from each pickle so that tests can use tiny
  archives.
  """
  wanted = CIFAR10_TRAIN_BATCHES + CIFAR10_TEST_BATCHES + ("batches.meta",)
  members = _read_cifar_members(source, wanted)
  missing = [n for n in wanted if n not in members]
  if missing:
    raise ValueError(
      f"{source}: missing {', '.join(missing)} (expected {CIFAR10_DIR}/{{{', '.join(wanted)}}})."
    )
  meta = _unpickle(members["batches.meta"], f"{source}:batches.meta")
  label_names = [
    n.decode() if isinstance(n, bytes) else str(n) for n in meta.get("label_names", [])
  ]
  if len(label_names) != 10:
    raise ValueError(f"{source}:batches.meta: expected 10 label_names, got {len(label_names)}.")

  def read_batches(batch_names):
    images, labels = [], []
    for name in batch_names:
      where = f"{source}:{name}"
      batch = _unpickle(members[name], where)
      if "data" not in batch or "labels" not in batch:
        raise ValueError(f"{where}: no 'data' or 'labels' entry.")
      data = np.asarray(batch["data"])
      lab = np.asarray(batch["labels"], dtype=np.int64)
      if data.dtype != np.uint8 or data.ndim != 2:
        raise ValueError(
          f"{where}: 'data' is {data.dtype} {data.shape}, expected uint8 "
          f"[rows, {CIFAR10_ROW_BYTES}]."
        )
      if data.shape[1] != CIFAR10_ROW_BYTES:
        raise ValueError(
          f"{where}: rows have {data.shape[1]} bytes, expected {CIFAR10_ROW_BYTES} (32x32x3)."
        )
      if lab.shape != (data.shape[0],):
        raise ValueError(f"{where}: {data.shape[0]} rows of data but {lab.size} labels.")
      if lab.size and (lab.min() < 0 or lab.max() > 9):
        raise ValueError(f"{where}: labels out of range [0, 10).")
      # Rows are channel-planar (RRR..GGG..BBB); TFDS images are HWC.
      images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
      labels.append(lab)
    return np.concatenate(images), np.concatenate(labels)

  splits = {
    "train": read_batches(CIFAR10_TRAIN_BATCHES),
    "test": read_batches(CIFAR10_TEST_BATCHES),
  }
  return splits, label_names
