"""Argument checks and reductions shared by the loss modules.

Hyper-parameters are checked at trace time when they are concrete Python or NumPy values;
a traced hyper-parameter cannot be checked and is used as given.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

REDUCTIONS = ("mean", "sum", "none", "sum_over_batch_size")


def _is_concrete(value) -> bool:
  return not isinstance(value, jax.core.Tracer)


def _check_positive(name: str, value) -> None:
  if _is_concrete(value) and not float(value) > 0:
    raise ValueError(f"{name} must be > 0, got {value!r}")


def _check_finite_positive(name: str, value) -> None:
  _check_positive(name, value)
  if _is_concrete(value) and not float(value) < float("inf"):
    raise ValueError(f"{name} must be finite, got {value!r}")


def _check_unit_interval(name: str, value) -> None:
  if _is_concrete(value) and not 0.0 <= float(value) <= 1.0:
    raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def _check_non_negative(name: str, value) -> None:
  if _is_concrete(value) and not float(value) >= 0:
    raise ValueError(f"{name} must be >= 0, got {value!r}")


def _check_choice(name: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _as_float(x) -> Array:
  """`x` as an array of at least float32 (bfloat16 and float16 are upcast)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _as_logits(name: str, logits) -> Array:
  """`[..., C]` logits as a float array `[N, C]` (leading axes flattened), at least float32."""
  logits = jnp.asarray(logits)
  if logits.ndim < 2:
    raise ValueError(
      f"{name} must have shape [..., classes] with a batch axis, got shape {logits.shape}"
    )
  return _as_float(jnp.reshape(logits, (-1, logits.shape[-1])))


def _leading_shape(name: str, logits) -> tuple[int, ...]:
  shape = jnp.shape(logits)
  if len(shape) < 2:
    raise ValueError(f"{name} must have shape [..., classes] with a batch axis, got shape {shape}")
  return tuple(shape[:-1])


def _check_same_shape(name_a: str, a, name_b: str, b) -> None:
  if jnp.shape(a) != jnp.shape(b):
    raise ValueError(
      f"{name_a} and {name_b} must have the same shape, got {jnp.shape(a)} and {jnp.shape(b)}"
    )


def _as_labels(labels, leading: tuple[int, ...]) -> Array:
  """Integer labels of shape `leading`, flattened to `[N]` int32."""
  labels = jnp.asarray(labels)
  if labels.shape != leading:
    raise ValueError(f"labels must have shape {leading}, got {labels.shape}")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
  return jnp.reshape(labels, (-1,)).astype(jnp.int32)


def _check_sample_weights(sample_weights, leading: tuple[int, ...]):
  """`[...]` weights of the samples' leading shape, flattened to `[N]` float32 (or None)."""
  if sample_weights is None:
    return None
  sample_weights = jnp.asarray(sample_weights)
  if sample_weights.shape != leading:
    raise ValueError(f"sample_weights must have shape {leading}, got {sample_weights.shape}")
  return jnp.reshape(sample_weights, (-1,)).astype(jnp.float32)


def _reduce(
  per_sample: Array, sample_weights: Array | None, reduction: str, leading: tuple[int, ...]
) -> Array:
  """Reduces per-sample losses `ℓ` (`[N]`) with optional weights `w` (`[N]`, default 1).

  * 'mean': `Σ w ℓ / Σ w` — with a 0/1 mask, the mean over the kept samples (0 when no
    sample is kept); without weights, the plain mean.
  * 'sum': `Σ w ℓ`.
  * 'none': `w ℓ` in the samples' leading shape.
  * 'sum_over_batch_size': `Σ w ℓ / N` (Keras' name): masks that partition the batch
    between several terms then sum to the plain batch mean.
  """
  _check_choice("reduction", reduction, REDUCTIONS)
  weighted = per_sample if sample_weights is None else per_sample * sample_weights
  if reduction == "none":
    return jnp.reshape(weighted, leading)
  if reduction == "sum":
    return jnp.sum(weighted)
  if reduction == "sum_over_batch_size" or sample_weights is None:
    return jnp.mean(weighted)
  total = jnp.sum(sample_weights)
  safe_total = jnp.where(total == 0, 1.0, total)
  return jnp.where(total == 0, 0.0, jnp.sum(weighted) / safe_total)
