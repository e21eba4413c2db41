"""Test-set predictions of one or several models in a single pass over the data."""

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
    self._mesh = mesh
    self._variables = mesh_lib.replicate(variables, mesh)
    self._fn = _eval_fn(model)

  @property
  def mesh(self):
    return self._mesh

  def __call__(self, images) -> np.ndarray:
    return np.asarray(self.on_device(mesh_lib.shard_batch(images, self._mesh)))

  def on_device(self, images: jax.Array) -> jax.Array:
    """Logits of images already on the mesh, left there (dispatched, not waited for)."""
    return self._fn(self._variables, images)


@functools.lru_cache(maxsize=None)
def _jitted_preprocess():
  """The preprocessing of uint8 images on the device, its table and offset arguments
  (made on first use: the data package imports TensorFlow)."""
  return jax.jit(data.preprocess_images)


def predict(
    data_config,
    split: str,
    predictors: Mapping[str, Predictor],
    *,
    batch_size: int,
    classes=None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Labels `[N]` and each predictor's logits `[N, C]` over every example of `split` once.

  Images cross to the device as uint8 and are preprocessed there, once for all predictors
  (which share a mesh); logits stay on the device until the pass is over, so the host
  queues batch after batch without waiting for any.
  """
  ds = data.make_dataset(data_config, split, batch_size=batch_size, train=False, seed=0, classes=classes,
                         raw_images=True)
  preprocess = data.device_preprocess(data_config)
  mesh = next(iter(predictors.values())).mesh
  masks, labels, logits = [], [], {name: [] for name in predictors}
  for batch in data.as_numpy(ds):
    masks.append(batch["mask"].astype(bool))
    labels.append(batch["label"])
    images = _jitted_preprocess()(mesh_lib.shard_batch(batch["image"], mesh), **preprocess.keywords)
    for name, predictor in predictors.items():
      logits[name].append(predictor.on_device(images))
  keep = np.concatenate(masks)
  return np.concatenate(labels)[keep], {name: np.concatenate(jax.device_get(v))[keep] for name, v in logits.items()}


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
