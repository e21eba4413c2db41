"""Logit distillation methods: Decoupled KD, logit-standardised KD, DIST.

Pure functions of `[..., C]` logits (leading axes flattened into the batch), batch-averaged,
jit/grad/vmap-safe, computed in at least float32; the teacher's gradient is stopped.
Hyper-parameters are keyword-only and checked at trace time (`ValueError` naming them).
Every tempered term is exact from `T = 1e-2` to `1e6` (see `kd_jax.losses._tempered`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kd_jax.losses._common import (
  _as_labels,
  _as_logits,
  _check_finite_positive,
  _check_non_negative,
  _check_same_shape,
  _leading_shape,
)
from kd_jax.losses._tempered import centred_softmax, masked_log_softmax, scaled_kl

Array = jax.Array

__all__ = ["dist", "dkd", "logit_standardized_kd"]


def _student_teacher(student_logits, teacher_logits, *, min_classes: int = 1):
  _check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
  leading = _leading_shape("student_logits", student_logits)
  s = _as_logits("student_logits", student_logits)
  t = jax.lax.stop_gradient(_as_logits("teacher_logits", teacher_logits))
  if s.shape[-1] < min_classes:
    raise ValueError(f"student_logits needs >= {min_classes} classes, got {s.shape[-1]}")
  dtype = jnp.promote_types(s.dtype, t.dtype)
  return s.astype(dtype), t.astype(dtype), leading


def dkd(
  student_logits,
  teacher_logits,
  labels,
  *,
  alpha: float = 1.0,
  beta: float = 8.0,
  temperature: float = 4.0,
) -> Array:
  """Decoupled Knowledge Distillation (Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022).

  `L = α · TCKD + β · NCKD`, each `T²`-scaled and averaged over the batch:

  * `TCKD = T² · KL(b_t ‖ b_s)`, `b = [p_y, 1 − p_y]` the binary target/non-target split of
    `p = softmax(z/T)`;
  * `NCKD = T² · KL(p̂_t ‖ p̂_s)`, `p̂ = softmax(z/T)` over the non-target classes only.

  As mdistiller's `dkd_loss` (the paper's code), with two differences that only show at
  extreme inputs: mdistiller drops the target class by subtracting 1000 from its tempered
  logit (a target logit more than `1000 T` above the others leaks into `p̂`; here it is
  excluded exactly) and takes `log b_s` as the log of a probability (−inf for confident
  students; here it is a log-sum-exp). Both KLs use the exact tempered form of
  `distillation_kl`. DKD's warm-up factor belongs to the trainer, not to the loss.

  Args:
    student_logits: `[..., C]`, `C ≥ 2`.
    teacher_logits: `[..., C]`, gradient stopped.
    labels: integers of the leading shape.
    alpha: weight `α ≥ 0` of TCKD.
    beta: weight `β ≥ 0` of NCKD.
    temperature: `T`, finite and `> 0`.
  """
  _check_non_negative("alpha", alpha)
  _check_non_negative("beta", beta)
  _check_finite_positive("temperature", temperature)
  s, t, leading = _student_teacher(student_logits, teacher_logits, min_classes=2)
  y = _as_labels(labels, leading)
  other = jnp.arange(s.shape[-1])[None, :] != y[:, None]
  nckd = scaled_kl(t, s, temperature, valid=other)

  def target_and_rest(z):
    """`[z_y, T · lse_{c≠y}(z_c / T)]`: the binary split's logits at temperature `T`."""
    target = jnp.take_along_axis(z, y[:, None], axis=-1)
    rest = jnp.where(other, z / temperature, -jnp.inf)
    return jnp.concatenate(
      [target, temperature * jax.nn.logsumexp(rest, axis=-1, keepdims=True)], axis=-1
    )

  # T · (lse_o(t/T) − lse_o(s/T)) = E_p̂t[t − s] − NCKD / T: without the cancellation of
  # two O(T) log-sum-exps at high temperatures.
  p_other = jnp.exp(masked_log_softmax(t / temperature, other)) * other
  rest_difference = jnp.sum(p_other * jnp.where(other, t - s, 0.0), axis=-1) - nckd / temperature
  target_difference = jnp.take_along_axis(t - s, y[:, None], axis=-1)[:, 0]
  difference = jnp.stack([target_difference, rest_difference], axis=-1)
  tckd = scaled_kl(target_and_rest(t), target_and_rest(s), temperature, difference=difference)
  return jnp.mean(alpha * tckd + beta * nckd)


def _standardize(z: Array, eps: float) -> Array:
  """`(z − mean z) / (eps + std z)` over the last axis, the sample std (`N − 1`) as torch's."""
  centred = z - jnp.mean(z, axis=-1, keepdims=True)
  var = jnp.sum(centred * centred, axis=-1, keepdims=True) / (z.shape[-1] - 1)
  positive = var > 0
  std = jnp.where(positive, jnp.sqrt(jnp.where(positive, var, 1.0)), 0.0)  # finite grad at 0
  return centred / (eps + std)


def logit_standardized_kd(
  student_logits, teacher_logits, *, temperature: float = 2.0, eps: float = 1e-7
) -> Array:
  """Logit-standardised KD (Sun et al., "Logit Standardization in Knowledge Distillation",
  CVPR 2024).

  `L = T² · (1/B) Σ_b KL(softmax(Z(t_b)/T) ‖ softmax(Z(s_b)/T))`,
  `Z(z) = (z − mean(z)) / (eps + std(z))` per sample over the classes.

  Standardised as torchdistill 1.1.5's `LogitStdKDLoss` (its mean, its sample standard
  deviation with `N − 1`, its `eps = 1e-7`), which returns this KL without `T²` when used
  alone (`alpha=None`) and with `T²` beside cross-entropy; the paper's code scales by `T²`,
  as here. A student or teacher with constant logits standardises to zeros (finite
  gradient).

  Args:
    student_logits: `[..., C]`, `C ≥ 2`.
    teacher_logits: `[..., C]`, gradient stopped.
    temperature: `T`, finite and `> 0` (the paper's base temperature 2).
    eps: added to the standard deviation, `≥ 0`.
  """
  _check_finite_positive("temperature", temperature)
  _check_non_negative("eps", eps)
  s, t, _ = _student_teacher(student_logits, teacher_logits, min_classes=2)
  return jnp.mean(scaled_kl(_standardize(t, eps), _standardize(s, eps), temperature))


def _pearson(a: Array, b: Array, eps: float) -> Array:
  """Pearson correlation of the rows: torch's `cosine_similarity` of centred rows (its eps)."""
  a = a - jnp.mean(a, axis=-1, keepdims=True)
  b = b - jnp.mean(b, axis=-1, keepdims=True)

  def clamped_norm(x):
    sq = jnp.sum(x * x, axis=-1)
    big = sq > eps * eps
    return jnp.where(big, jnp.sqrt(jnp.where(big, sq, 1.0)), eps)  # max(‖x‖, eps), finite grad

  return jnp.sum(a * b, axis=-1) / (clamped_norm(a) * clamped_norm(b))


def dist(
  student_logits, teacher_logits, *, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0
) -> Array:
  """DIST (Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022).

  With `Y = softmax(z/T)` row-wise (`[B, C]`) and `ρ` the Pearson correlation,

  `L = β T² (1 − (1/B) Σ_b ρ(Y_s[b,:], Y_t[b,:])) + γ T² (1 − (1/C) Σ_c ρ(Y_s[:,c], Y_t[:,c]))`,

  the inter-class (per sample) and intra-class (per class, over the batch) relations. As
  torchdistill 1.1.5's `DISTLoss`, whose `ρ` is `cosine_similarity` of centred vectors with
  `eps = 1e-8` clamping each norm. Where `T` is large and `Y` nearly uniform, `Y − 1/C` is
  computed from `expm1` of the tempered logits, so the correlations stay exact (float32
  `softmax` would round those deviations away).

  Args:
    student_logits: `[..., C]`, flattened to `[B, C]` (the intra-class relation couples
      the samples).
    teacher_logits: `[..., C]`, gradient stopped.
    beta: weight `β ≥ 0` of the inter-class relation.
    gamma: weight `γ ≥ 0` of the intra-class relation.
    temperature: `T`, finite and `> 0`.
  """
  _check_non_negative("beta", beta)
  _check_non_negative("gamma", gamma)
  _check_finite_positive("temperature", temperature)
  s, t, _ = _student_teacher(student_logits, teacher_logits)
  eps = 1e-8
  rows_s, columns_s = _relation_inputs(s, temperature)
  rows_t, columns_t = _relation_inputs(t, temperature)
  inter = 1.0 - jnp.mean(_pearson(rows_s, rows_t, eps))
  intra = 1.0 - jnp.mean(_pearson(columns_s.T, columns_t.T, eps))
  return temperature**2 * (beta * inter + gamma * intra)


def _relation_inputs(z: Array, temperature) -> tuple[Array, Array]:
  """`softmax(z/T)` up to constant shifts that Pearson's centring removes, for rows and columns.

  Where a row's tempered range `(max z − min z)/T` is small, `Y ≈ 1/C` and float32 keeps
  its deviations only as `Y − 1/C` from `expm1` (`centred_softmax`); elsewhere `Y` itself
  keeps the small probabilities that `Y − 1/C` would round away. Rows pick per row; the
  columns (centred over the batch) need one choice for the whole batch.
  """
  centred = centred_softmax(z, temperature)
  probs = jax.nn.softmax(z / temperature, axis=-1)
  flat = (jnp.max(z, axis=-1, keepdims=True) - jnp.min(z, axis=-1, keepdims=True)) / temperature < 1
  rows = jnp.where(flat, centred, probs)
  columns = jnp.where(jnp.all(flat), centred, probs)
  return rows, columns
