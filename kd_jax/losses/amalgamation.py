"""Knowledge amalgamation terms: entropy routing, block alignment, unit-norm penalty, union target.

Shen et al., "Customizing Student Networks From Heterogeneous Teachers via Adaptive
Knowledge Amalgamation", ICCV 2019. Pure functions, jit/grad/vmap-safe, computed in at
least float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from kd_jax.losses._common import _as_float, _as_logits, _check_finite_positive, _check_same_shape

Array = jax.Array

__all__ = [
  "block_alignment_loss",
  "prediction_entropy",
  "select_by_entropy",
  "union_targets",
  "unit_norm_penalty",
]


def prediction_entropy(logits) -> Array:
  """Per-sample entropy `H(p) = −Σ_c p_c log p_c` of `p = softmax(z)`; the leading shape.

  Computed from log-probabilities, so it is finite (and 0 for a one-hot prediction) even
  for logits of magnitude 1e4.
  """
  z = _as_logits("logits", logits)
  log_p = jax.nn.log_softmax(z, axis=-1)
  return jnp.reshape(-jnp.sum(jnp.exp(log_p) * log_p, axis=-1), jnp.shape(logits)[:-1])


def select_by_entropy(logits_per_teacher: Sequence, *, normalize: bool = False) -> Array:
  """One-hot choice, per sample, of the teacher whose prediction is least ambiguous.

  `t*(x) = argmin_t H(softmax(z_t(x)))` (Shen et al. 2019, eq. 2); ties go to the first
  teacher. With `normalize=True` each entropy is divided by `log C_t`, its maximum, so
  teachers with different numbers of classes are compared on one scale.

  Args:
    logits_per_teacher: a non-empty sequence of `[B, C_t]` logits (the class counts `C_t`
      may differ; the batch size `B` may not).
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

  `ℓ_b = (1/N) Σ_n mean((A_s F_s^n − A_t F_t^n)_b²)`, for `N` blocks whose features were
  already projected to a common width by the alignment modules.

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
    diff = _as_float(s) - _as_float(t)
    per_block.append(jnp.mean(jnp.reshape(diff**2, (diff.shape[0], -1)), axis=-1))
  batch_sizes = {x.shape[0] for x in per_block}
  if len(batch_sizes) != 1:
    raise ValueError(f"all blocks must share one batch size, got {sorted(batch_sizes)}")
  return jnp.mean(jnp.stack(per_block, axis=0), axis=0)


def unit_norm_penalty(kernel) -> Array:
  """`Σ_k (‖w_k‖² − 1)²` over output filters `k` (Shen et al. 2019, eq. 5).

  Keeps a teacher-side alignment projection from collapsing to zero. The squared norm of
  filter `k` is taken over every axis but the last: a Flax 1×1 convolution kernel
  `(1, 1, C_in, C_out)` has `C_out` filters of `C_in` weights.
  """
  kernel = jnp.asarray(kernel)
  if kernel.ndim < 2:
    raise ValueError(
      f"kernel must have rank >= 2 with output filters last, got shape {kernel.shape}"
    )
  kernel = _as_float(kernel)
  squared_norms = jnp.sum(jnp.reshape(kernel**2, (-1, kernel.shape[-1])), axis=0)
  return jnp.sum((squared_norms - 1.0) ** 2)


def union_targets(
  teacher_logits: Sequence,
  weights,
  class_index: Sequence[Sequence[int]],
  *,
  num_classes: int,
  temperature: float,
) -> Array:
  """The union target `p_b = Σ_t w_bt · embed_t(softmax(z_bt / T))`, `[B, C]`, no gradient.

  Each teacher's tempered distribution is placed at its classes' positions in the union
  of `num_classes` classes and weighted by the routing weight `w_bt`; with rows of `w`
  summing to 1, `p_b` is a distribution. It is the target of the amalgamation's 'kl'
  logit term: with disjoint teachers it also tells the student which task a sample
  belongs to, which a per-teacher term cannot.

  Args:
    teacher_logits: a sequence of `[B, C_t]` logits, one per teacher.
    weights: `[B, n_teachers]` routing weights.
    class_index: per teacher, the positions of its `C_t` classes in the union.
    num_classes: the union's class count `C`.
    temperature: `T`, finite and `> 0`.
  """
  _check_finite_positive("temperature", temperature)
  if len(teacher_logits) != len(class_index):
    raise ValueError(
      f"teacher_logits and class_index must have one entry per teacher, got "
      f"{len(teacher_logits)} and {len(class_index)}"
    )
  targets = 0.0
  for t, (z, index) in enumerate(zip(teacher_logits, class_index)):
    z = _as_logits(f"teacher_logits[{t}]", z)
    probs = jax.nn.softmax(z / temperature, axis=-1)
    embedded = jnp.zeros((z.shape[0], num_classes), jnp.float32)
    embedded = embedded.at[:, jnp.asarray(index)].add(probs)
    targets = targets + weights[:, t : t + 1] * embedded
  return jax.lax.stop_gradient(targets)
