"""The amalgamation objective: block-wise feature alignment plus routed logit supervision.

Teachers `t = 1..T` are experts on disjoint (stage 2) or shared (stage 1) class sets;
the student predicts the union of their classes. `class_index[t]` lists the positions
of teacher `t`'s classes in the union. For each unlabelled sample `b` a routing rule
gives weights `w_bt` (one-hot for hard routing, Σ_t w_bt = 1). The loss is

  L = λ_f · (1/B) Σ_b Σ_t w_bt · ℓ^feat_bt + λ_z · L^logit + λ_u · Σ_t Σ_k (‖a_tk‖² − 1)²

with `ℓ^feat_bt = block_alignment_loss(A_s^t F_s, A_t^t F_t)_b` over the tapped block
pairs (Shen et al. 2019, eq. 4), the unit-norm penalty on the teacher-side projections
`A_t^t` (eq. 5), and for the logit term either

  * 'kl' (default): `T² · KL(p_b ‖ softmax(s_b / T))` against the union target
    `p_b = Σ_t w_bt · embed_t(softmax(z_bt / T))`, each teacher's distribution placed at
    its classes' positions. With disjoint teachers this target also tells the student
    which task a sample belongs to, which a per-teacher term cannot;
  * 'l2': the paper's `‖s_b[class_index_t] − z_bt‖²` on the routed teacher's positions
    (`1/(2B) Σ_b Σ_t w_bt ‖·‖²`).

Self-training (`self_training = α_max > 0`): once the student has learnt from the routed
teachers, its own task probabilities `q_bt = Σ_{c ∈ classes_t} softmax(s_b)_c` join the
routing, `w'_bt = (1 − α) w_bt + α q_bt`, with `α` ramped from 0 to `α_max` between two
fractions of training (`self_training_start`, `self_training_end`). The student generalises past routing errors
(it ends above its routing accuracy); the mixture lets it overrule a router it disagrees
with confidently on the images of the pool. No labels: only the student's outputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from kd_jax import losses
from kd_jax.choices import LOGIT_LOSSES  # noqa: F401  (re-exported: the step checks against it)
from kd_jax.losses import union_targets  # noqa: F401  (public in kd_jax.losses; callers use it here)


def student_task_probs(student_logits, class_index: Sequence[Sequence[int]]) -> jax.Array:
  """`q_bt = Σ_{c ∈ classes_t} softmax(s_b)_c`: the student's probability of each teacher's
  task, `[B, T]`, without gradient (a target, not a path for the loss to move)."""
  probs = jax.nn.softmax(jax.lax.stop_gradient(student_logits).astype(jnp.float32), axis=-1)
  return jnp.stack([probs[:, jnp.asarray(index)].sum(axis=-1) for index in class_index], axis=-1)


def self_training_mix(step, *, total_steps: int, weight: float, ramp: Sequence[float]) -> jax.Array:
  """`α(step)`: 0 until `ramp[0] · total_steps`, then linear up to `weight` at `ramp[1] · total_steps`
  (a step up to `weight` there when the two coincide)."""
  start, end = ramp[0] * total_steps, ramp[1] * total_steps
  step = jnp.asarray(step, jnp.float32)
  progress = jnp.clip((step - start) / (end - start), 0.0, 1.0) if end > start else (step >= start)
  return weight * progress.astype(jnp.float32)


def self_trained_weights(
  weights, student_logits, class_index: Sequence[Sequence[int]], *, mix
) -> jax.Array:
  """`w' = (1 − α) · w + α · q` (see the module docstring); rows still sum to 1."""
  return (1.0 - mix) * weights + mix * student_task_probs(student_logits, class_index)


def soft_target_kl(student_logits, target_probs, *, temperature: float) -> jax.Array:
  """`T² · (1/B) Σ_b KL(p_b ‖ softmax(s_b / T))` for a given target distribution `p`."""
  log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  p = jax.lax.stop_gradient(target_probs)
  kl = jnp.sum(jax.scipy.special.xlogy(p, p) - p * log_q, axis=-1)
  return temperature**2 * jnp.mean(kl)


def routed_logit_regression(
  student_logits, teacher_logits: Sequence, weights, class_index: Sequence[Sequence[int]]
) -> jax.Array:
  """`1/(2B) Σ_b Σ_t w_bt ‖s_b[class_index_t] − z_bt‖²` (the paper's logit term, routed)."""
  total = 0.0
  for t, (z, index) in enumerate(zip(teacher_logits, class_index)):
    total = total + losses.logit_regression(
      student_logits[:, jnp.asarray(index)],
      z,
      sample_weights=weights[:, t],
      reduction="sum_over_batch_size",  # (1/B) Σ w ℓ: the routing weights partition the batch
    )
  return total


def seed_logit_loss(
  student_logits,
  teacher_logits: Sequence,
  weights,
  class_index: Sequence[Sequence[int]],
  *,
  num_classes: int,
) -> jax.Array:
  """The amalgamation seed's logit term: MSE to zero-padded routed logits, ×200.

  The routed teacher's logits are placed at its classes' positions and every other
  position gets the target 0 (e.g. `[z1, 0, 0]`); not the paper's loss.
  """
  padded = 0.0
  for t, (z, index) in enumerate(zip(teacher_logits, class_index)):
    embedded = jnp.zeros((z.shape[0], num_classes), jnp.float32).at[:, jnp.asarray(index)].set(z)
    padded = padded + weights[:, t : t + 1] * embedded
  return 200.0 * jnp.mean((student_logits - jax.lax.stop_gradient(padded)) ** 2)


def seed_regularizer(kernels: Sequence) -> jax.Array:
  """The amalgamation seed's regulariser `mean((W − 1)²)` over every alignment weight.

  It pulls each weight toward 1 rather than each filter toward unit norm (a seed flaw).
  """
  return jnp.mean(jnp.concatenate([jnp.ravel((k - 1.0) ** 2) for k in kernels]))


def resize_like(x, reference) -> jax.Array:
  """Bilinearly resizes `[B, h, w, C]` to `reference`'s spatial size (paired blocks of
  nets with different depths or pooling can differ in resolution)."""
  if x.shape[1:3] == reference.shape[1:3]:
    return x
  return jax.image.resize(x, (x.shape[0], *reference.shape[1:3], x.shape[3]), method="linear")
