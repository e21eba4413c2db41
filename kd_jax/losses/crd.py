"""Contrastive representation distillation (CRD) with an explicit, functional memory state."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kd_jax.losses._common import (
  _as_float,
  _check_finite_positive,
  _check_non_negative,
  _check_unit_interval,
)

Array = jax.Array

__all__ = ["CRDMemory", "crd_init", "crd_loss"]


class CRDMemory(NamedTuple):
  """CRD's memory banks, one row per training example (a pytree: checkpoint it with the state).

  Attributes:
    student: `[N, D]` momentum average of each example's student embedding; the teacher's
      embeddings are scored against it (torchdistill's `memory_v1`).
    teacher: `[N, D]` the same for the teacher's embeddings; scores the student's
      (`memory_v2`).
    student_norm: scalar normaliser `Z` of the student's scores, `−1` until the first call
      sets it (`z_v1`).
    teacher_norm: the same for the teacher's scores (`z_v2`).
  """

  student: Array
  teacher: Array
  student_norm: Array
  teacher_norm: Array


def crd_init(key, *, num_samples: int, embedding_dim: int) -> CRDMemory:
  """Memory banks drawn uniformly in `±1/sqrt(D/3)` (unit-norm rows on average), as CRD's code.

  Args:
    key: a PRNG key.
    num_samples: `N`, the number of training examples (each has a row).
    embedding_dim: `D`, the width of the projected embeddings.
  """
  if int(num_samples) < 1 or int(embedding_dim) < 1:
    raise ValueError(
      f"num_samples and embedding_dim must be >= 1, got {num_samples} and {embedding_dim}"
    )
  bound = 1.0 / (embedding_dim / 3.0) ** 0.5
  k_s, k_t = jax.random.split(key)
  shape = (num_samples, embedding_dim)
  draw = lambda k: jax.random.uniform(k, shape, jnp.float32, -bound, bound)
  unset = jnp.asarray(-1.0, jnp.float32)
  return CRDMemory(draw(k_s), draw(k_t), unset, unset)


def _nce(log_scores: Array, num_samples: int, eps: float) -> Array:
  """`−(1/B) Σ_b [log(P_b0 / (P_b0 + K/N + ε)) + Σ_k log((K/N) / (P_bk + K/N + ε))]`, in logs."""
  batch, k = log_scores.shape[0], log_scores.shape[1] - 1
  log_noise = jnp.log(k / num_samples)
  log_offset = jnp.log(k / num_samples + eps)
  positive = -jax.nn.softplus(log_offset - log_scores[:, 0])
  negative = log_noise - jnp.logaddexp(log_scores[:, 1:], log_offset)
  return -(jnp.sum(positive) + jnp.sum(negative)) / batch


def _updated_rows(bank: Array, indices: Array, embeddings: Array, momentum) -> Array:
  rows = bank[indices] * momentum + embeddings * (1.0 - momentum)
  rows = rows / jnp.sqrt(jnp.sum(rows * rows, axis=-1, keepdims=True))
  return bank.at[indices].set(rows)


def crd_loss(
  student_embeddings,
  teacher_embeddings,
  indices,
  memory: CRDMemory,
  key=None,
  *,
  num_negatives: int = 16384,
  temperature: float = 0.07,
  momentum: float = 0.5,
  eps: float = 1e-7,
  contrast_indices=None,
) -> tuple[Array, CRDMemory]:
  """Contrastive representation distillation (Tian et al., "Contrastive Representation
  Distillation", ICLR 2020): NCE over two momentum memory banks.

  For example `b` (dataset index `i_b`) and `K` negatives `j` drawn uniformly from the `N`
  examples, the student's scores against the teacher bank `P^s_bj = exp(m^t_j · s_b / τ) / Z_s`
  and the teacher's against the student bank `P^t_bj = exp(m^s_j · t_b / τ) / Z_t` (`j = i_b`
  the positive) enter the NCE loss with noise `K/N`:

  `L = ℓ(P^s) + ℓ(P^t)`, `ℓ(P) = −(1/B) Σ_b [log(P_b0 / (P_b0 + K/N + ε))
                                        + Σ_k log((K/N) / (P_bk + K/N + ε))]`.

  `Z` is set once, on the first call, to `N ·` the mean score of that batch (constant
  thereafter, without gradient). After scoring, the positives' rows become
  `normalise(momentum · m_i + (1 − momentum) · e_b)` in both banks. Semantics as
  torchdistill 1.1.5's `CRDLoss` (RepDistiller's `CRDLoss`/`ContrastMemory`), computed
  in log space (the same values, finite for any score). torchdistill's negative sampler
  (`draw`) refers to `self.prob`, which does not exist: its loss runs only with
  `contrast_idx` given, as `contrast_indices` here.

  The embeddings are the heads' outputs, already projected and L2-normalised (CRD's
  `Embed`); the indices within a batch must be distinct (one row update each).

  Args:
    student_embeddings: `[B, D]`; gradients flow into it.
    teacher_embeddings: `[B, D]`; gradients flow into it too (CRD trains the teacher's
      projection head); pass it through `jax.lax.stop_gradient` for a frozen head.
    indices: `[B]` dataset indices of the examples (the data pipeline supplies them).
    memory: the `CRDMemory` from `crd_init` or the previous step.
    key: PRNG key for the negatives (the step's key); unused with `contrast_indices`.
    num_negatives: `K ≥ 1` (the paper's 16384).
    temperature: `τ > 0` (the paper's 0.07).
    momentum: memory momentum in `[0, 1]` (0.5).
    eps: `ε ≥ 0` (1e-7).
    contrast_indices: optional `[B, K + 1]` indices, column 0 the positives, used as given
      instead of drawing.

  Returns:
    `(loss, new_memory)`.
  """
  _check_finite_positive("temperature", temperature)
  _check_unit_interval("momentum", momentum)
  _check_non_negative("eps", eps)
  s, t = _as_float(student_embeddings), _as_float(teacher_embeddings)
  num_samples, dim = memory.student.shape
  if s.ndim != 2 or s.shape != t.shape or s.shape[1] != dim:
    raise ValueError(
      f"student_embeddings and teacher_embeddings must both be [batch, {dim}], got "
      f"{s.shape} and {t.shape}"
    )
  indices = jnp.asarray(indices).astype(jnp.int32)
  if indices.shape != s.shape[:1]:
    raise ValueError(f"indices must have shape ({s.shape[0]},), got {indices.shape}")
  if contrast_indices is None:
    if int(num_negatives) < 1:
      raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
    if key is None:
      raise ValueError("key is needed to draw the negatives (or pass contrast_indices)")
    negatives = jax.random.randint(key, (s.shape[0], int(num_negatives)), 0, num_samples)
    contrast = jnp.concatenate([indices[:, None], negatives.astype(jnp.int32)], axis=1)
  else:
    contrast = jnp.asarray(contrast_indices).astype(jnp.int32)
    if contrast.ndim != 2 or contrast.shape[0] != s.shape[0] or contrast.shape[1] < 2:
      raise ValueError(f"contrast_indices must be [{s.shape[0]}, K + 1 >= 2], got {contrast.shape}")

  bank_s = jax.lax.stop_gradient(memory.student)
  bank_t = jax.lax.stop_gradient(memory.teacher)
  raw_s = jnp.einsum("bkd,bd->bk", bank_t[contrast], s) / temperature  # student vs teacher bank
  raw_t = jnp.einsum("bkd,bd->bk", bank_s[contrast], t) / temperature

  def log_norm(raw, stored):
    first = jax.lax.stop_gradient(jax.nn.logsumexp(raw) - jnp.log(raw.size) + jnp.log(num_samples))
    return jnp.where(stored < 0, first, jnp.log(jnp.where(stored < 0, 1.0, stored)))

  log_z_s, log_z_t = log_norm(raw_s, memory.student_norm), log_norm(raw_t, memory.teacher_norm)
  loss = _nce(raw_s - log_z_s, num_samples, eps) + _nce(raw_t - log_z_t, num_samples, eps)

  new_memory = CRDMemory(
    student=_updated_rows(bank_s, indices, jax.lax.stop_gradient(s), momentum),
    teacher=_updated_rows(bank_t, indices, jax.lax.stop_gradient(t), momentum),
    student_norm=jnp.exp(log_z_s).astype(jnp.float32),
    teacher_norm=jnp.exp(log_z_t).astype(jnp.float32),
  )
  return loss, new_memory
