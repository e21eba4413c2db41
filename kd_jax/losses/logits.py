"""Classification and logit-distillation losses: cross-entropy, Hinton KD, logit regression.

Every function is pure and works under `jax.jit`, `jax.vmap` and `jax.grad`. Inputs of any
float dtype are accepted; the arithmetic runs in at least float32 (bfloat16 is upcast) and
in log space, so logits of magnitude 1e4 give finite losses and gradients.

Shapes: logits are `[..., C]` (the leading axes are the samples: `[B, C]`, or `[B, T, C]`
for per-token logits), labels and `sample_weights` have the leading shape. Per-sample
losses take `reduction` ('mean' | 'sum' | 'none' | 'sum_over_batch_size') and optional
`sample_weights` `w`: 'mean' is `Σ w ℓ / Σ w` (a 0/1 mask gives the mean over the kept
samples), 'sum' is `Σ w ℓ`, 'none' returns `w ℓ` in the leading shape, and
'sum_over_batch_size' is `Σ w ℓ / N` (masks that partition the batch between several
terms then add up to the plain mean). Invalid hyper-parameters or shapes raise
`ValueError` at trace time, naming the argument.

Papers:
  * Ba & Caruana, "Do Deep Nets Really Need to be Deep?", NIPS 2014.
  * Sau & Balasubramanian, "Deep Model Compression: Distilling Knowledge from Noisy
    Teachers", arXiv 1610.09650, 2016.
  * Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", arXiv
    1503.02531, 2015.
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
  _check_sample_weights,
  _check_unit_interval,
  _leading_shape,
  _reduce,
)
from kd_jax.losses._tempered import scaled_kl

Array = jax.Array

__all__ = [
  "cross_entropy",
  "distillation_kl",
  "hinton_kd",
  "logit_regression",
  "noisy_logits",
  "tempered_softmax",
]


def _per_sample_cross_entropy(logits: Array, labels: Array) -> Array:
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]


def cross_entropy(logits, labels, *, sample_weights=None, reduction: str = "mean") -> Array:
  """Softmax cross-entropy with integer labels.

  `ℓ_b = −log softmax(z_b)[y_b]`, reduced over the samples (default: the mean).

  Args:
    logits: `[..., C]`.
    labels: integers in `[0, C)`, of the logits' leading shape.
    sample_weights: optional weights of the leading shape (see the module docstring).
    reduction: 'mean' | 'sum' | 'none' | 'sum_over_batch_size'.
  """
  leading = _leading_shape("logits", logits)
  z = _as_logits("logits", logits)
  y = _as_labels(labels, leading)
  weights = _check_sample_weights(sample_weights, leading)
  return _reduce(_per_sample_cross_entropy(z, y), weights, reduction, leading)


def tempered_softmax(logits, *, temperature: float) -> Array:
  """`softmax(z / T)` over the last axis (Hinton et al. 2015, eq. 1), in `z`'s shape."""
  _check_finite_positive("temperature", temperature)
  shape = jnp.shape(logits)
  z = _as_logits("logits", logits)
  return jnp.reshape(jax.nn.softmax(z / temperature, axis=-1), shape)


def _per_sample_kl(name_s: str, student_logits, name_t: str, teacher_logits, temperature):
  _check_finite_positive("temperature", temperature)
  leading = _leading_shape(name_s, student_logits)
  s = _as_logits(name_s, student_logits)
  t = jax.lax.stop_gradient(_as_logits(name_t, teacher_logits))
  _check_same_shape(name_s, student_logits, name_t, teacher_logits)
  dtype = jnp.promote_types(s.dtype, t.dtype)
  return scaled_kl(t.astype(dtype), s.astype(dtype), temperature), leading


def distillation_kl(
  student_logits,
  teacher_logits,
  *,
  temperature: float,
  sample_weights=None,
  reduction: str = "mean",
) -> Array:
  """Tempered KL divergence from the teacher to the student, scaled by `T²`.

  `ℓ_b = T² · KL(softmax(t_b/T) ‖ softmax(s_b/T))` (Hinton et al. 2015), reduced over the
  samples (default: the mean). The soft targets' gradients scale as `1/T²`; the `T²`
  factor keeps their magnitude comparable across temperatures and to a hard-label term.

  Exact at any temperature: computed as `T² log1p(Σ_c p_c φ(u_c))` with `u` the centred
  tempered log-ratio and `φ(u) = e^{−u} − 1 + u ≥ 0` (no cancellation; see
  `kd_jax.losses._tempered`), so `T → ∞` tends to `(1/2) Var_p(t − s)` instead of the
  rounding noise of `T² (Σ p log p − Σ p log q)`. Checked against float64 for
  `T ∈ [1e-2, 1e6]` and logits up to 1e4 (relative error < 1e-4).

  Args:
    student_logits: `[..., C]`; gradients flow into it.
    teacher_logits: `[..., C]`; treated as a constant (gradient stopped).
    temperature: `T`, finite and `> 0`.
    sample_weights: optional weights `w` of the leading shape: 'mean' gives
      `Σ w ℓ / Σ w` (see the module docstring).
    reduction: 'mean' | 'sum' | 'none' | 'sum_over_batch_size'.
  """
  kl, leading = _per_sample_kl(
    "student_logits", student_logits, "teacher_logits", teacher_logits, temperature
  )
  weights = _check_sample_weights(sample_weights, leading)
  return _reduce(kl, weights, reduction, leading)


def hinton_kd(
  student_logits,
  teacher_logits,
  labels,
  *,
  temperature: float,
  soft_weight: float,
  sample_weights=None,
  reduction: str = "mean",
) -> Array:
  """Knowledge distillation loss of Hinton, Vinyals & Dean (2015).

  `ℓ_b = α · T² · KL(softmax(t_b/T) ‖ softmax(s_b/T)) + (1 − α) · CE(softmax(s_b), y_b)`,
  with `α = soft_weight`; the hard term uses the student at `T = 1`. The paper gives the
  hard term "a considerably lower weight", i.e. `α` close to 1. The soft term is
  `distillation_kl`'s, exact at any temperature.

  Args:
    student_logits: `[..., C]`.
    teacher_logits: `[..., C]`, gradient stopped.
    labels: integers of the leading shape.
    temperature: `T`, finite and `> 0`.
    soft_weight: `α ∈ [0, 1]`.
    sample_weights: optional weights of the leading shape (see the module docstring).
    reduction: 'mean' | 'sum' | 'none' | 'sum_over_batch_size'.
  """
  _check_unit_interval("soft_weight", soft_weight)
  kl, leading = _per_sample_kl(
    "student_logits", student_logits, "teacher_logits", teacher_logits, temperature
  )
  y = _as_labels(labels, leading)
  weights = _check_sample_weights(sample_weights, leading)
  ce = _per_sample_cross_entropy(_as_logits("student_logits", student_logits), y)
  soft = _reduce(kl, weights, reduction, leading)
  hard = _reduce(ce, weights, reduction, leading)
  return soft_weight * soft + (1.0 - soft_weight) * hard


def logit_regression(
  student_logits, teacher_logits, *, sample_weights=None, reduction: str = "mean"
) -> Array:
  """Logit regression of Ba & Caruana (2014): `ℓ_b = (1/2) ‖s_b − t_b‖²`.

  With the default reduction, `L = 1/(2B) Σ_b ‖s_b − t_b‖²`.

  Args:
    student_logits: `[..., C]`.
    teacher_logits: `[..., C]`, gradient stopped.
    sample_weights: optional weights of the leading shape (see the module docstring).
    reduction: 'mean' | 'sum' | 'none' | 'sum_over_batch_size'.
  """
  leading = _leading_shape("student_logits", student_logits)
  s = _as_logits("student_logits", student_logits)
  t = jax.lax.stop_gradient(_as_logits("teacher_logits", teacher_logits))
  _check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
  weights = _check_sample_weights(sample_weights, leading)
  return 0.5 * _reduce(jnp.sum((s - t) ** 2, axis=-1), weights, reduction, leading)


def noisy_logits(key, teacher_logits, *, noise_ratio: float, noise_std: float) -> Array:
  """Noisy teacher of Sau & Balasubramanian (2016).

  For each sample b, with probability `α = noise_ratio`, `t'_b = (1 + ξ_b) ⊙ t_b` with
  `ξ_b ~ N(0, σ²)` drawn independently per logit (`σ = noise_std`); the other samples
  keep `t'_b = t_b`. The result is a target: its gradient is stopped. Use it with
  `logit_regression(student, noisy_logits(...))`.

  Args:
    key: a PRNG key.
    teacher_logits: `[..., C]`.
    noise_ratio: `α ∈ [0, 1]`, the probability that a sample is perturbed.
    noise_std: `σ ≥ 0`.

  Returns:
    Perturbed logits of the input's shape (dtype at least float32).
  """
  _check_unit_interval("noise_ratio", noise_ratio)
  _check_non_negative("noise_std", noise_std)
  shape = jnp.shape(teacher_logits)
  t = _as_logits("teacher_logits", teacher_logits)
  select_key, noise_key = jax.random.split(key)
  selected = jax.random.bernoulli(select_key, noise_ratio, shape=t.shape[:1])
  xi = noise_std * jax.random.normal(noise_key, t.shape, dtype=t.dtype)
  return jnp.reshape(jax.lax.stop_gradient(jnp.where(selected[:, None], (1.0 + xi) * t, t)), shape)
