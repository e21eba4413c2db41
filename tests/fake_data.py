"""Small, learnable MNIST-format datasets written as IDX files, for end-to-end tests."""

import gzip
import os
import struct

import numpy as np


def _write_idx(path: str, array: np.ndarray, magic: int) -> None:
  header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def write_idx_dataset(
  directory: str, *, num_train: int = 256, num_test: int = 64, seed: int = 0
) -> str:
  """Writes the four gzipped IDX files of a 10-class 28×28 dataset into `directory`.

  Each class is a fixed random template plus noise, so a small net learns it in a
  few dozen steps and distillation has something to transfer.
  """
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  templates = rng.uniform(0, 255, size=(10, 28, 28))

  def split(n):
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = np.clip(templates[labels] * 0.6 + rng.uniform(0, 100, size=(n, 28, 28)), 0, 255)
    return images, labels

  for prefix, n in (("train", num_train), ("t10k", num_test)):
    images, labels = split(n)
    _write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"), images, 2051)
    _write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"), labels, 2049)
  return directory


def read_idx(path: str) -> np.ndarray:
  """The array of a (gzipped) IDX file, as stored: uint8 images [N, H, W] or labels [N]."""
  with gzip.open(path, "rb") as f:
    raw = f.read()
  ndim = raw[3]
  shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
  return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)
