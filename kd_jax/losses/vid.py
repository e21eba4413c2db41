"""Variational information distillation (VID): a Gaussian likelihood of the teacher's features."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kd_jax.losses._common import _as_float

Array = jax.Array

__all__ = ["vid"]


def vid(pred_mean, pred_variance, teacher_features) -> Array:
  """VID (Ahn et al., "Variational Information Distillation for Knowledge Transfer", CVPR 2019).

  The negative log-likelihood of the teacher's features `t` under a Gaussian whose mean
  `μ` the student predicts (through a regressor) and whose variance `σ²` is learnt per
  channel, up to its constant, averaged over every element:

  `L = mean(½ ((μ − t)² / σ² + log σ²))`.

  This maximises a variational lower bound on the mutual information between the
  teacher's and the student's features (the paper's eq. 4–6). As torchdistill 1.1.5's
  `VIDLoss` for one pair (and mdistiller's `vid_loss`, without its pooling of unequal
  spatial sizes: resize before). `kd_jax.models.regressors.VIDRegressor` gives `μ` and a
  softplus-parametrised `σ²` it owns.

  Args:
    pred_mean: `μ`, `[B, H, W, C]` (or any shape of the teacher's features).
    pred_variance: `σ² > 0`, broadcastable to `pred_mean` (e.g. `[C]` per channel).
    teacher_features: `t`, of `pred_mean`'s shape; gradient stopped.
  """
  mu = _as_float(pred_mean)
  var = _as_float(pred_variance)
  t = jax.lax.stop_gradient(_as_float(teacher_features))
  if mu.shape != t.shape:
    raise ValueError(
      f"pred_mean and teacher_features must have the same shape, got {mu.shape} and {t.shape}"
    )
  try:
    full = jnp.broadcast_shapes(var.shape, mu.shape)
  except ValueError:
    full = None
  if full != mu.shape:
    raise ValueError(
      f"pred_variance must broadcast to pred_mean's shape {mu.shape}, got {var.shape}"
    )
  return jnp.mean(0.5 * ((mu - t) ** 2 / var + jnp.log(var)))
