"""Relational distillation losses: probabilistic knowledge transfer (PKT) and RKD.

Embeddings are `[B, D]` (any `[B, ...]` is flattened). The losses couple the samples of a
batch, so they are batch-level scalars. Pure, jit/grad/vmap-safe, computed in at least
float32; the teacher's gradient is stopped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kd_jax.losses._common import _as_float, _check_non_negative
from kd_jax.losses.features import l2_normalize

Array = jax.Array

__all__ = ["pkt", "rkd"]


def _embeddings(student, teacher) -> tuple[Array, Array]:
  s, t = _as_float(student), jax.lax.stop_gradient(_as_float(teacher))
  if s.ndim < 1 or t.ndim < 1 or s.shape[0] != t.shape[0]:
    raise ValueError(
      "student_embeddings and teacher_embeddings need one batch axis of the same size, got "
      f"shapes {s.shape} and {t.shape}"
    )
  return jnp.reshape(s, (s.shape[0], -1)), jnp.reshape(t, (t.shape[0], -1))


def pkt(student_embeddings, teacher_embeddings, *, eps: float = 1e-7) -> Array:
  """Probabilistic knowledge transfer (Passalis & Tefas, "Learning Deep Representations with
  Probabilistic Knowledge Transfer", ECCV 2018), as torchdistill 1.1.5's `PKTLoss`.

  With rows normalised `x̂ = x / (‖x‖ + eps)`, cosine affinities `K = (X̂ X̂ᵀ + 1) / 2`
  turned into conditional distributions `P_ij = K_ij / Σ_j K_ij`,

  `L = (1/B²) Σ_ij P^t_ij log((P^t_ij + eps) / (P^s_ij + eps))`,

  the mean of the KL terms over the `B²` pairs (the authors' code; the paper's sum over
  `j` differs by the constant `B`).

  Args:
    student_embeddings: `[B, D_s]`.
    teacher_embeddings: `[B, D_t]`, gradient stopped.
    eps: `≥ 0`.
  """
  _check_non_negative("eps", eps)
  s, t = _embeddings(student_embeddings, teacher_embeddings)

  def conditional(x):
    sq = jnp.sum(x * x, axis=-1, keepdims=True)
    positive = sq > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
    x = x / (norm + eps)
    k = (x @ x.T + 1.0) / 2.0
    return k / jnp.sum(k, axis=-1, keepdims=True)

  p_s, p_t = conditional(s), conditional(t)
  return jnp.mean(p_t * jnp.log((p_t + eps) / (p_s + eps)))


def _smooth_l1(x: Array, y: Array) -> Array:
  """torch's `SmoothL1Loss` (β = 1), mean over the elements."""
  diff = jnp.abs(x - y)
  return jnp.mean(jnp.where(diff < 1.0, 0.5 * diff * diff, diff - 0.5))


def _pairwise_distance(e: Array) -> Array:
  """`sqrt(max(‖e_i‖² + ‖e_j‖² − 2 e_i·e_j, 1e-12))`, 0 on the diagonal (RKD's `pdist`)."""
  sq = jnp.sum(e * e, axis=-1)
  d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * (e @ e.T), 1e-12)
  return jnp.where(jnp.eye(e.shape[0], dtype=bool), 0.0, jnp.sqrt(d2))


def _angles(e: Array) -> Array:
  """`cos ∠(e_j − e_i, e_k − e_i)` for all `i, j, k`, `[B, B, B]` (0 where `j = i` or `k = i`)."""
  unit = l2_normalize(e[None, :, :] - e[:, None, :])
  return unit @ jnp.swapaxes(unit, 1, 2)


def rkd(
  student_embeddings,
  teacher_embeddings,
  *,
  distance_weight: float = 25.0,
  angle_weight: float = 50.0,
) -> Array:
  """Relational KD (Park et al., "Relational Knowledge Distillation", CVPR 2019).

  `L = λ_D · mean_ij smoothL1(d^s_ij / μ_s, d^t_ij / μ_t)
     + λ_A · mean_ijk smoothL1(cos ∠^s_ijk, cos ∠^t_ijk)`,

  with `d_ij = ‖e_i − e_j‖` (0 on the diagonal, at least `1e-6` elsewhere), `μ` the mean
  distance over the `B(B − 1)` distinct pairs, and `∠_ijk` the angle at `e_i` between
  `e_j` and `e_k`; the means run over all `B²` and `B³` entries. As torchdistill 1.1.5's
  `RKDLoss` with `reduction='mean'` (and the authors' code): smooth-L1 with `β = 1`,
  distances from the Gram expansion, teacher without gradient. A weight of 0 skips its
  term (the angle term costs `O(B³)`).

  Args:
    student_embeddings: `[B, D_s]`, `B ≥ 2`.
    teacher_embeddings: `[B, D_t]`, gradient stopped.
    distance_weight: `λ_D ≥ 0` (the paper's 25).
    angle_weight: `λ_A ≥ 0` (the paper's 50).
  """
  _check_non_negative("distance_weight", distance_weight)
  _check_non_negative("angle_weight", angle_weight)
  s, t = _embeddings(student_embeddings, teacher_embeddings)
  batch = s.shape[0]
  if batch < 2:
    raise ValueError(f"student_embeddings needs a batch of >= 2 samples, got {batch}")
  total = 0.0
  if not (isinstance(distance_weight, (int, float)) and distance_weight == 0):
    d_s, d_t = _pairwise_distance(s), _pairwise_distance(t)
    pairs = batch * (batch - 1)
    d_s = d_s / (jnp.sum(d_s) / pairs)
    d_t = d_t / (jnp.sum(d_t) / pairs)
    total = total + distance_weight * _smooth_l1(d_s, d_t)
  if not (isinstance(angle_weight, (int, float)) and angle_weight == 0):
    total = total + angle_weight * _smooth_l1(_angles(s), _angles(t))
  return jnp.asarray(total, s.dtype)
