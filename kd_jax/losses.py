"""Loss terms for knowledge distillation and knowledge amalgamation.

Every function here is pure and works under `jax.jit`, `jax.vmap` and `jax.grad`.
Hyper-parameters are keyword-only. Inputs of any float dtype are accepted; the
arithmetic runs in at least float32 (bfloat16 logits are upcast) and in log space,
so logits of magnitude 1e4 give finite losses and gradients.

Shapes: `B` is the batch, `C` the number of classes. Logits are `[B, C]`, integer
labels `[B]`. Invalid hyper-parameters or shapes raise `ValueError` at trace time,
naming the argument and its value. (A hyper-parameter passed as a traced array
cannot be checked at trace time and is used as given.)

Papers:
  * Ba & Caruana, "Do Deep Nets Really Need to be Deep?", NIPS 2014.
  * Sau & Balasubramanian, "Deep Model Compression: Distilling Knowledge from
    Noisy Teachers", arXiv 1610.09650, 2016.
  * Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network",
    arXiv 1503.02531, 2015.
  * Shen et al., "Customizing Student Networks From Heterogeneous Teachers via
    Adaptive Knowledge Amalgamation", ICCV 2019.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = [
    "block_alignment_loss",
    "cross_entropy",
    "distillation_kl",
    "hinton_kd",
    "logit_regression",
    "noisy_logits",
    "prediction_entropy",
    "select_by_entropy",
    "tempered_softmax",
    "unit_norm_penalty",
]


# --------------------------------------------------------------------------- checks


def _is_concrete(value) -> bool:
  return not isinstance(value, jax.core.Tracer)


def _check_positive(name: str, value) -> None:
  if _is_concrete(value) and not float(value) > 0:
    raise ValueError(f"{name} must be > 0, got {value!r}")


def _check_unit_interval(name: str, value) -> None:
  if _is_concrete(value) and not 0.0 <= float(value) <= 1.0:
    raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def _check_non_negative(name: str, value) -> None:
  if _is_concrete(value) and not float(value) >= 0:
    raise ValueError(f"{name} must be >= 0, got {value!r}")


def _as_logits(name: str, logits) -> Array:
  """Returns `logits` as a float array of rank 2, at least float32."""
  logits = jnp.asarray(logits)
  if logits.ndim != 2:
    raise ValueError(f"{name} must have shape [batch, classes], got shape {logits.shape}")
  return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


def _check_same_shape(name_a: str, a: Array, name_b: str, b: Array) -> None:
  if a.shape != b.shape:
    raise ValueError(f"{name_a} and {name_b} must have the same shape, got {a.shape} and {b.shape}")


def _check_sample_weights(sample_weights, batch: int):
  if sample_weights is None:
    return None
  sample_weights = jnp.asarray(sample_weights)
  if sample_weights.shape != (batch,):
    raise ValueError(f"sample_weights must have shape ({batch},), got {sample_weights.shape}")
  return sample_weights.astype(jnp.float32)


def _batch_mean(per_sample: Array, sample_weights: Array | None) -> Array:
  """(1/B) Σ_b w_b ℓ_b, with w_b = 1 when no weights are given.

  Dividing by B (not Σ w) keeps a per-sample routing mask a partition of the batch:
  summing the weighted terms of all teachers gives the plain batch mean.
  """
  if sample_weights is not None:
    per_sample = per_sample * sample_weights
  return jnp.mean(per_sample)


# ------------------------------------------------------------------ classification


def cross_entropy(logits, labels) -> Array:
  """Softmax cross-entropy with integer labels, averaged over the batch.

  `CE = −(1/B) Σ_b log softmax(z_b)[y_b]`.

  Args:
    logits: `[B, C]`.
    labels: `[B]` integers in `[0, C)`.
  """
  logits = _as_logits("logits", logits)
  labels = jnp.asarray(labels)
  if labels.shape != logits.shape[:1]:
    raise ValueError(f"labels must have shape ({logits.shape[0]},), got {labels.shape}")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
  return -jnp.mean(picked)


def tempered_softmax(logits, *, temperature: float) -> Array:
  """`softmax(z / T)` over the last axis (Hinton et al. 2015, eq. 1). Shape `[B, C]`."""
  _check_positive("temperature", temperature)
  logits = _as_logits("logits", logits)
  return jax.nn.softmax(logits / temperature, axis=-1)


def prediction_entropy(logits) -> Array:
  """Per-sample entropy `H(p) = −Σ_c p_c log p_c` of `p = softmax(z)`; shape `[B]`.

  Computed from log-probabilities, so it is finite (and 0 for a one-hot prediction)
  even for logits of magnitude 1e4.
  """
  logits = _as_logits("logits", logits)
  log_p = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


# --------------------------------------------------------------------- distillation


def distillation_kl(
    student_logits, teacher_logits, *, temperature: float, sample_weights=None
) -> Array:
  """Tempered KL divergence from the teacher to the student, scaled by `T²`.

  `L = T² · (1/B) Σ_b KL(softmax(t_b/T) ‖ softmax(s_b/T))` (Hinton et al. 2015).
  The soft targets' gradients scale as `1/T²`; the `T²` factor keeps their
  magnitude comparable across temperatures and to a hard-label term.

  Args:
    student_logits: `[B, C]`; gradients flow into it.
    teacher_logits: `[B, C]`; treated as a constant (gradient stopped).
    temperature: `T > 0`.
    sample_weights: optional `[B]` weights `w`: the loss is `(1/B) Σ_b w_b KL_b · T²`.
  """
  _check_positive("temperature", temperature)
  s = _as_logits("student_logits", student_logits)
  t = jax.lax.stop_gradient(_as_logits("teacher_logits", teacher_logits))
  _check_same_shape("student_logits", s, "teacher_logits", t)
  weights = _check_sample_weights(sample_weights, s.shape[0])
  log_p_t = jax.nn.log_softmax(t / temperature, axis=-1)
  log_p_s = jax.nn.log_softmax(s / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
  return temperature**2 * _batch_mean(kl, weights)


def hinton_kd(
    student_logits, teacher_logits, labels, *, temperature: float, soft_weight: float
) -> Array:
  """Knowledge distillation loss of Hinton, Vinyals & Dean (2015).

  `L = α · T² · KL(softmax(t/T) ‖ softmax(s/T)) + (1 − α) · CE(softmax(s), y)`,
  with `α = soft_weight`, both terms averaged over the batch; the hard term uses
  the student at `T = 1`. The paper gives the hard term "a considerably lower
  weight", i.e. `α` close to 1.

  Args:
    student_logits: `[B, C]`.
    teacher_logits: `[B, C]`, gradient stopped.
    labels: `[B]` integers.
    temperature: `T > 0`.
    soft_weight: `α ∈ [0, 1]`.
  """
  _check_unit_interval("soft_weight", soft_weight)
  soft = distillation_kl(student_logits, teacher_logits, temperature=temperature)
  hard = cross_entropy(student_logits, labels)
  return soft_weight * soft + (1.0 - soft_weight) * hard


def logit_regression(student_logits, teacher_logits, *, sample_weights=None) -> Array:
  """Logit regression of Ba & Caruana (2014): `L = 1/(2B) Σ_b ‖s_b − t_b‖²`.

  Args:
    student_logits: `[B, C]`.
    teacher_logits: `[B, C]`, gradient stopped.
    sample_weights: optional `[B]` weights `w`: `L = 1/(2B) Σ_b w_b ‖s_b − t_b‖²`.
  """
  s = _as_logits("student_logits", student_logits)
  t = jax.lax.stop_gradient(_as_logits("teacher_logits", teacher_logits))
  _check_same_shape("student_logits", s, "teacher_logits", t)
  weights = _check_sample_weights(sample_weights, s.shape[0])
  return 0.5 * _batch_mean(jnp.sum((s - t) ** 2, axis=-1), weights)


def noisy_logits(key, teacher_logits, *, noise_ratio: float, noise_std: float) -> Array:
  """Noisy teacher of Sau & Balasubramanian (2016).

  For each sample b, with probability `α = noise_ratio`, `t'_b = (1 + ξ_b) ⊙ t_b`
  with `ξ_b ~ N(0, σ²)` drawn independently per logit (`σ = noise_std`); the other
  samples keep `t'_b = t_b`. The result is a target: its gradient is stopped. Use it
  with `logit_regression(student, noisy_logits(...))`.

  Args:
    key: a PRNG key.
    teacher_logits: `[B, C]`.
    noise_ratio: `α ∈ [0, 1]`, the probability that a sample is perturbed.
    noise_std: `σ ≥ 0`.

  Returns:
    `[B, C]` perturbed logits (dtype at least float32).
  """
  _check_unit_interval("noise_ratio", noise_ratio)
  _check_non_negative("noise_std", noise_std)
  t = _as_logits("teacher_logits", teacher_logits)
  select_key, noise_key = jax.random.split(key)
  selected = jax.random.bernoulli(select_key, noise_ratio, shape=t.shape[:1])
  xi = noise_std * jax.random.normal(noise_key, t.shape, dtype=t.dtype)
  return jax.lax.stop_gradient(jnp.where(selected[:, None], (1.0 + xi) * t, t))


# --------------------------------------------------------------------- amalgamation


def select_by_entropy(logits_per_teacher: Sequence, *, normalize: bool = False) -> Array:
  """One-hot choice, per sample, of the teacher whose prediction is least ambiguous.

  `t*(x) = argmin_t H(softmax(z_t(x)))` (Shen et al. 2019, eq. 2); ties go to the
  first teacher. With `normalize=True` each entropy is divided by `log C_t`, its
  maximum, so teachers with different numbers of classes are compared on one scale.

  Args:
    logits_per_teacher: a non-empty sequence of `[B, C_t]` logits (the class counts
      `C_t` may differ; the batch size `B` may not).
    normalize: divide each teacher's entropy by `log C_t` (needs every `C_t ≥ 2`).

  Returns:
    `[B, n_teachers]` float32 one-hot mask.
  """
  if not logits_per_teacher:
    raise ValueError("logits_per_teacher must be a non-empty sequence, got an empty one")
  logits = [_as_logits(f"logits_per_teacher[{i}]", z) for i, z in enumerate(logits_per_teacher)]
  batch_sizes = [z.shape[0] for z in logits]
  if len(set(batch_sizes)) != 1:
    raise ValueError(f"logits_per_teacher must share one batch size, got {batch_sizes}")
  entropies = []
  for i, z in enumerate(logits):
    h = prediction_entropy(z)
    if normalize:
      if z.shape[1] < 2:
        raise ValueError(
            f"normalize=True needs >= 2 classes per teacher, logits_per_teacher[{i}] has {z.shape[1]}"
        )
      h = h / jnp.log(z.shape[1])
    entropies.append(h)
  choice = jnp.argmin(jnp.stack(entropies, axis=-1), axis=-1)  # argmin: first of ties.
  return jax.nn.one_hot(choice, len(logits), dtype=jnp.float32)


def block_alignment_loss(student_blocks: Sequence, teacher_blocks: Sequence) -> Array:
  """Per-sample block-wise feature alignment loss (Shen et al. 2019, eq. 4).

  `ℓ_b = (1/N) Σ_n mean((A_s F_s^n − A_t F_t^n)_b²)`, for `N` blocks whose features
  were already projected to a common width by the alignment modules.

  Args:
    student_blocks: sequence of `N` arrays `[B, ...]`.
    teacher_blocks: sequence of `N` arrays, each of its student block's shape.

  Returns:
    `[B]`, so that a per-sample selection mask can weight it.
  """
  if not student_blocks or not teacher_blocks:
    raise ValueError(
        "student_blocks and teacher_blocks must be non-empty sequences, got "
        f"{len(student_blocks)} and {len(teacher_blocks)} blocks"
    )
  if len(student_blocks) != len(teacher_blocks):
    raise ValueError(
        f"student_blocks and teacher_blocks must have as many blocks, got "
        f"{len(student_blocks)} and {len(teacher_blocks)}"
    )
  per_block = []
  for n, (s, t) in enumerate(zip(student_blocks, teacher_blocks)):
    s, t = jnp.asarray(s), jnp.asarray(t)
    _check_same_shape(f"student_blocks[{n}]", s, f"teacher_blocks[{n}]", t)
    if s.ndim < 1:
      raise ValueError(f"student_blocks[{n}] needs a batch axis, got a scalar")
    diff = s.astype(jnp.promote_types(s.dtype, jnp.float32)) - t.astype(
        jnp.promote_types(t.dtype, jnp.float32)
    )
    per_block.append(jnp.mean(jnp.reshape(diff**2, (diff.shape[0], -1)), axis=-1))
  batch_sizes = {x.shape[0] for x in per_block}
  if len(batch_sizes) != 1:
    raise ValueError(f"all blocks must share one batch size, got {sorted(batch_sizes)}")
  return jnp.mean(jnp.stack(per_block, axis=0), axis=0)


def unit_norm_penalty(kernel) -> Array:
  """`Σ_k (‖w_k‖² − 1)²` over output filters `k` (Shen et al. 2019, eq. 5).

  Keeps a teacher-side alignment projection from collapsing to zero. The squared
  norm of filter `k` is taken over every axis but the last: a Flax 1×1 convolution
  kernel `(1, 1, C_in, C_out)` has `C_out` filters of `C_in` weights.
  """
  kernel = jnp.asarray(kernel)
  if kernel.ndim < 2:
    raise ValueError(f"kernel must have rank >= 2 with output filters last, got shape {kernel.shape}")
  kernel = kernel.astype(jnp.promote_types(kernel.dtype, jnp.float32))
  squared_norms = jnp.sum(jnp.reshape(kernel**2, (-1, kernel.shape[-1])), axis=0)
  return jnp.sum((squared_norms - 1.0) ** 2)
