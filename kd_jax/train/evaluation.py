"""Test-set predictions of one or several models in a single pass over the data.

With several processes, each feeds its rows of every global batch and gets back every
row (`mesh.to_host`): every process scores the whole split, in stored order.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import flax.linen as nn
import jax
import numpy as np

from kd_jax import data
from kd_jax.train import mesh as mesh_lib
from kd_jax.train.steps import apply_model


def _make_eval_fn(model: nn.Module):
  return jax.jit(lambda v, x: apply_model(model, v, x, train=False))


_cached_eval_fn = functools.lru_cache(maxsize=64)(_make_eval_fn)


def _eval_fn(model: nn.Module):
  """One jitted eval-mode apply per model (modules hash by their fields), so that the
  evaluation after every epoch reuses its compilation instead of compiling anew."""
  try:
    return _cached_eval_fn(model)
  except TypeError:  # a module with an unhashable field
    return _make_eval_fn(model)


class Predictor:
  """Jitted `logits = model(x)` in eval mode, its variables placed once on the mesh."""

  def __init__(self, model: nn.Module, variables, mesh):
    self.mesh = mesh
    self._variables = mesh_lib.replicate(variables, mesh)
    self._fn = _eval_fn(model)

  def __call__(self, images: jax.Array) -> jax.Array:
    """Logits of a global batch already on the mesh (`mesh.shard_batch`), sharded like it and
    left there (dispatched, not waited for)."""
    return self._fn(self._variables, images)


@functools.lru_cache(maxsize=None)
def _jitted_preprocess():
  """The preprocessing of uint8 images on the device, its table and offset arguments
  (made on first use: the data package imports TensorFlow)."""
  return jax.jit(data.preprocess_images)


def map_split(
  fn, data_config, split: str, *, batch_size: int, mesh, classes=None, max_batches=None
):
  """Labels `[N]` and `fn(images)` (a pytree of arrays with a leading batch axis) over every
  example of `split` once (or its first `max_batches` global batches), in stored order, on
  every process; `images` is a global batch on `mesh`, preprocessed there.

  Images cross to the device as uint8; the outputs stay on the device until the pass is
  over, so the host queues batch after batch without waiting for any.
  """
  ds = data.make_dataset(
    data_config, split, batch_size=batch_size, train=False, seed=0, classes=classes, raw_images=True
  )
  preprocess = data.device_preprocess(data_config)
  labels, masks, outputs = [], [], []
  for i, batch in enumerate(data.as_numpy(ds)):
    if i == max_batches:
      break
    images = _jitted_preprocess()(mesh_lib.shard_batch(batch["image"], mesh), **preprocess.keywords)
    outputs.append(fn(images))
    labels.append(batch["label"])
    masks.append(batch["mask"])
  # Per batch: a host array's rows are gathered in process order within its global batch.
  whole = mesh_lib.to_host({"label": labels, "mask": masks, "out": outputs})
  keep = np.concatenate(whole["mask"]).astype(bool)
  return np.concatenate(whole["label"])[keep], jax.tree.map(
    lambda *z: np.concatenate(z)[keep], *whole["out"]
  )


def predict(
  data_config,
  split: str,
  predictors: Mapping[str, Predictor],
  *,
  batch_size: int,
  classes=None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Labels `[N]` and each predictor's logits `[N, C]` over every example of `split` once."""
  mesh = next(iter(predictors.values())).mesh
  return map_split(
    lambda images: {name: p(images) for name, p in predictors.items()},
    data_config,
    split,
    batch_size=batch_size,
    mesh=mesh,
    classes=classes,
  )


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
  return float(np.mean(np.argmax(logits, -1) == labels))


def agreement(logits_a: np.ndarray, logits_b: np.ndarray) -> float:
  """Fraction of examples where two models' argmax predictions agree."""
  return float(np.mean(np.argmax(logits_a, -1) == np.argmax(logits_b, -1)))


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
  z = logits.astype(np.float64)
  z = z - z.max(-1, keepdims=True)
  log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return float(-np.mean(log_p[np.arange(len(labels)), labels]))
