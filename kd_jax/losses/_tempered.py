"""`T² · KL` between tempered softmaxes, exact at any temperature.

The textbook form `T² Σ p (log p_t − log p_s)` cancels catastrophically at high `T`: the
log-ratios are `O(1/T)`, their `p`-weighted sum is `O(1/T²)`, and float32 loses it all
(T = 1e6 gave −32,029 for a true value near 4.3). Here, with `d = t − s` (logits, not
tempered), `v = d − E_p[d]` centred under the teacher's `p = softmax(t/T)` and `u = v/T`,

  KL = log E_p[e^{−u}] = log1p(Σ_c p_c φ(u_c)),   φ(u) = e^{−u} − 1 + u ≥ 0,

so every term is non-negative and nothing cancels; `φ(u) = u² h(u)` is taken from its
series for small `|u|`, and `T² · KL = A · log1p(A/T²) / (A/T²)` with `A = Σ_c p_c v_c² h(u_c)`
never forms `T²` times a tiny number. That sum can overflow only when some
`p_c e^{−u_c} > e`, which means `KL > 1 − log p_s,c ≥ 1`: the textbook form has then
nothing to cancel, so it is used there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

# 1/(k+2)! for k = 0..8: h(u) = Σ_k (−u)^k / (k+2)!; the first dropped term is < 1e-10 of h
# for |u| < 0.5.
_H_COEFFICIENTS = (
  1 / 2,
  1 / 6,
  1 / 24,
  1 / 120,
  1 / 720,
  1 / 5040,
  1 / 40320,
  1 / 362880,
  1 / 3628800,
)
_SERIES_RADIUS = 0.5


def _phi_over_square(u: Array) -> Array:
  """`h(u) = (e^{−u} − 1 + u) / u²` for `u ≥ −1`, accurate to a few ulps (h(0) = 1/2)."""
  small = jnp.abs(u) < _SERIES_RADIUS
  u_small = jnp.where(small, u, 0.0)
  series = jnp.zeros_like(u)
  for coefficient in reversed(_H_COEFFICIENTS):
    series = series * (-u_small) + coefficient
  u_large = jnp.where(small, 1.0, u)
  # Outside the series' radius the cancellation in expm1(−u) + u costs < 4 ulps.
  closed = (jnp.expm1(-u_large) + u_large) / (u_large * u_large)
  return jnp.where(small, series, closed)


def _log1p_over(x: Array) -> Array:
  """`log1p(x) / x` for `x ≥ 0` (1 at 0)."""
  small = x < 1e-3
  x_small = jnp.where(small, x, 0.0)
  series = 1.0 - x_small * (1 / 2 - x_small * (1 / 3 - x_small / 4))
  x_large = jnp.where(small, 1.0, x)
  return jnp.where(small, series, jnp.log1p(x_large) / x_large)


def masked_log_softmax(logits: Array, valid: Array | None) -> Array:
  """`log_softmax` over the last axis restricted to `valid` entries (0 elsewhere)."""
  if valid is None:
    return jax.nn.log_softmax(logits, axis=-1)
  masked = jnp.where(valid, logits, -jnp.inf)
  peak = jax.lax.stop_gradient(jnp.max(masked, axis=-1, keepdims=True))
  shifted = masked - peak
  log_norm = jnp.log(jnp.sum(jnp.where(valid, jnp.exp(shifted), 0.0), axis=-1, keepdims=True))
  return jnp.where(valid, shifted - log_norm, 0.0)


def scaled_kl(
  teacher: Array,
  student: Array,
  temperature,
  *,
  valid: Array | None = None,
  difference: Array | None = None,
) -> Array:
  """`T² · KL(softmax(t/T) ‖ softmax(s/T))` per row of `[N, K]` logits.

  Args:
    teacher: `[N, K]` float logits (the caller stops their gradient).
    student: `[N, K]` float logits.
    temperature: `T > 0`.
    valid: optional `[N, K]` boolean mask: both distributions are taken over the valid
      entries only (each row needs one).
    difference: optional `[N, K]` value of `t − s` (up to a per-row constant) to use
      instead of subtracting the arguments, when the caller has it more accurately.

  Returns:
    `[N]`, at the arguments' float dtype.
  """
  temperature = jnp.asarray(temperature, teacher.dtype)
  log_p = masked_log_softmax(teacher / temperature, valid)
  p = jnp.exp(log_p) if valid is None else jnp.where(valid, jnp.exp(log_p), 0.0)
  log_q = masked_log_softmax(student / temperature, valid)
  textbook = temperature**2 * jnp.sum(p * (log_p - log_q), axis=-1)

  d = teacher - student if difference is None else difference
  if valid is not None:
    d = jnp.where(valid, d, 0.0)
  v = d - jnp.sum(p * d, axis=-1, keepdims=True)
  if valid is not None:
    v = jnp.where(valid, v, 0.0)
  u = v / temperature
  exponent = log_p - u
  if valid is not None:
    exponent = jnp.where(valid, exponent, -jnp.inf)
  # Past e^1 the sum may overflow but KL > 1: nothing cancels. (Not 0: rounding of u when
  # p is one-hot can put the maximum on either side of 0 while KL is ~1e-9.)
  overflow = jax.lax.stop_gradient(jnp.max(exponent, axis=-1)) > 1.0

  low = u < -1.0  # where φ(u) ≈ e^{−u}: taken from log p − u, so p · e^{−u} never overflows
  u_low = jnp.where(low, u, -2.0)
  u_high = jnp.where(low, 0.0, u)
  v_high = jnp.where(low, 0.0, v)
  from_exp = temperature**2 * (jnp.exp(jnp.minimum(log_p - u_low, 1.0)) - p * (1.0 - u_low))
  from_series = p * v_high * v_high * _phi_over_square(u_high)
  terms = jnp.where(low, from_exp, from_series)
  if valid is not None:
    terms = jnp.where(valid, terms, 0.0)
  a = jnp.sum(terms, axis=-1)
  exact = a * _log1p_over(a / temperature**2)
  return jnp.where(overflow, textbook, exact)


def centred_softmax(logits: Array, temperature) -> Array:
  """`softmax(z/T) − 1/C` over the last axis, accurate where it is tiny (large `T`).

  With `a = (z − max z)/T ≤ 0`, `e^{a_c} − mean(e^a) = expm1(a_c) − mean(expm1(a))`
  keeps the `O(1/T)` deviations that `softmax(z/T) − 1/C` rounds away in float32.
  """
  a = (logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))) / temperature
  e = jnp.expm1(a)
  norm = jnp.sum(e, axis=-1, keepdims=True) + logits.shape[-1]
  return (e - jnp.mean(e, axis=-1, keepdims=True)) / norm
