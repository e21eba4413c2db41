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

  def __call__(self, images) -> np.ndarray:
    return np.asarray(self._fn(self._variables, mesh_lib.shard_batch(images, self._mesh)))


def predict(
    data_config,
    split: str,
    predictors: Mapping[str, Predictor],
    *,
    batch_size: int,
    classes=None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Labels `[N]` and each predictor's logits `[N, C]` over every example of `split` once."""
  ds = data.make_dataset(data_config, split, batch_size=batch_size, train=False, seed=0, classes=classes)
  labels, logits = [], {name: [] for name in predictors}
  for batch in data.as_numpy(ds):
    keep = batch["mask"].astype(bool)
    labels.append(batch["label"][keep])
    for name, predictor in predictors.items():
      logits[name].append(predictor(batch["image"])[keep])
  return np.concatenate(labels), {name: np.concatenate(v) for name, v in logits.items()}


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
