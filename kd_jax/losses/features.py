"""Feature distillation losses: FitNets hints, attention transfer, similarity preservation.

Features are NHWC maps (`[B, H, W, C]`) or any `[B, ...]` arrays; where a loss takes
"features", a sequence of student/teacher pairs is accepted too and its terms are summed
(each pair weighted 1, as the reference implementations do). Pure, jit/grad/vmap-safe,
computed in at least float32; the teacher's gradient is stopped.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from kd_jax.losses._common import (
  _as_float,
  _check_choice,
  _check_finite_positive,
  _check_same_shape,
)

Array = jax.Array

__all__ = ["attention_transfer", "fitnet", "similarity_preserving"]


def _pairs(name: str, student, teacher, *, min_rank: int = 2) -> list[tuple[Array, Array]]:
  """Student/teacher arrays (or equally long sequences of them) as float pairs."""
  if isinstance(student, Sequence) != isinstance(teacher, Sequence):
    raise ValueError(f"student_{name} and teacher_{name} must both be arrays or both sequences")
  if not isinstance(student, Sequence):
    student, teacher = [student], [teacher]
  if not student or len(student) != len(teacher):
    raise ValueError(
      f"student_{name} and teacher_{name} must be non-empty and as long, got "
      f"{len(student)} and {len(teacher)}"
    )
  pairs = []
  for i, (s, t) in enumerate(zip(student, teacher)):
    s, t = _as_float(s), jax.lax.stop_gradient(_as_float(t))
    if s.ndim < min_rank or t.ndim < min_rank:
      raise ValueError(
        f"student_{name}[{i}] and teacher_{name}[{i}] need rank >= {min_rank}, got shapes "
        f"{s.shape} and {t.shape}"
      )
    pairs.append((s, t))
  return pairs


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
  """`x / max(‖x‖₂, eps)` over the last axis (torch's `F.normalize`), finite gradient at 0."""
  sq = jnp.sum(x * x, axis=-1, keepdims=True)
  big = sq > eps * eps
  return x / jnp.where(big, jnp.sqrt(jnp.where(big, sq, 1.0)), eps)


def fitnet(student_hint, teacher_hint) -> Array:
  """FitNets hint loss (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015).

  `L = mean((r(F_s) − F_t)²)` over every element, with `r` the regressor that maps the
  student's guided layer to the teacher's hint (`kd_jax.models.regressors.HintRegressor`,
  applied by the caller): the paper's `(1/2)‖·‖²` up to its constant, averaged as
  mdistiller's `FitNet` (`F.mse_loss`). A sequence of pairs sums one term per pair.

  Args:
    student_hint: `[B, ...]`, the regressed student features.
    teacher_hint: the teacher's hint, of the same shape; gradient stopped.
  """
  total = 0.0
  for i, (s, t) in enumerate(_pairs("hint", student_hint, teacher_hint, min_rank=1)):
    _check_same_shape(f"student_hint[{i}]", s, f"teacher_hint[{i}]", t)
    total = total + jnp.mean((s - t) ** 2)
  return total


def _attention_map(f: Array, p: float, reduce) -> Array:
  """`flatten(reduce_c |f|^p)`: `[B, H, W, C]` (or `[B, ..., C]`) to `[B, H·W]`."""
  powered = f * f if p == 2 else jnp.abs(f) ** p
  return jnp.reshape(reduce(powered, axis=-1), (f.shape[0], -1))


def attention_transfer(
  student_features, teacher_features, *, p: float = 2, mode: str = "code"
) -> Array:
  """Attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017).

  `a(F) = L2-normalise(flatten(mean_c |F|^p))`, the spatial attention map of an NHWC
  feature map (channels last), and per pair of same-sized maps:

  * `mode='code'` (default): `mean((a_s − a_t)²)` over the batch and positions: the
    authors' code and torchdistill 1.1.5's `ATLoss(mode='code')`;
  * `mode='paper'`: `(1/B) Σ_b ‖a_s,b − a_t,b‖₂` with `a` from `sum_c |F|^p`, the paper's
    eq. (2) without its `β/2`, as `ATLoss(mode='paper')`.

  The terms of a sequence of pairs are summed. torchdistill fixes `p = 2`.

  Args:
    student_features: `[B, H, W, C_s]` or a sequence of such maps.
    teacher_features: `[B, H, W, C_t]` (same `B, H, W` per pair; the channel counts may
      differ), or a sequence; gradient stopped.
    p: the exponent, `> 0` (the paper's 2).
    mode: 'code' | 'paper'.
  """
  _check_finite_positive("p", p)
  _check_choice("mode", mode, ("code", "paper"))
  total = 0.0
  for i, (s, t) in enumerate(_pairs("features", student_features, teacher_features)):
    if s.shape[:-1] != t.shape[:-1]:
      raise ValueError(
        f"student_features[{i}] and teacher_features[{i}] must share batch and spatial "
        f"shape, got {s.shape} and {t.shape}"
      )
    reduce = jnp.mean if mode == "code" else jnp.sum
    a_s = l2_normalize(_attention_map(s, p, reduce))
    a_t = l2_normalize(_attention_map(t, p, reduce))
    if mode == "code":
      total = total + jnp.mean((a_s - a_t) ** 2)
    else:
      diff = a_s - a_t
      sq = jnp.sum(diff * diff, axis=-1)
      positive = sq > 0
      total = total + jnp.mean(jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0))
  return total


def similarity_preserving(student_features, teacher_features) -> Array:
  """Similarity-preserving KD (Tung & Mori, "Similarity-Preserving Knowledge Distillation",
  ICCV 2019).

  With `Q = flatten(F)` (`[B, D]`), `G = Q Qᵀ` (`[B, B]`) and `Ĝ` its rows L2-normalised,
  `L = ‖Ĝ_t − Ĝ_s‖_F² / B²` per pair (the paper's eq. 4 without `γ`), summed over a
  sequence of pairs: the paper's definition and RepDistiller's `Similarity`. torchdistill
  1.1.5's `SPKDLoss` passes `1` as `normalize`'s `p`, normalising the rows of `G` by their
  L1 norm: a different, smaller loss. Where the references disagree this follows the
  paper.

  Args:
    student_features: `[B, ...]` or a sequence of such arrays.
    teacher_features: `[B, ...]` (the same `B`; the other axes may differ), or a
      sequence; gradient stopped.
  """
  total = 0.0
  for i, (s, t) in enumerate(_pairs("features", student_features, teacher_features, min_rank=1)):
    if s.shape[0] != t.shape[0]:
      raise ValueError(
        f"student_features[{i}] and teacher_features[{i}] must share the batch size, got "
        f"{s.shape[0]} and {t.shape[0]}"
      )
    batch = s.shape[0]
    q_s, q_t = jnp.reshape(s, (batch, -1)), jnp.reshape(t, (batch, -1))
    g_s = l2_normalize(q_s @ q_s.T)
    g_t = l2_normalize(q_t @ q_t.T)
    total = total + jnp.sum((g_t - g_s) ** 2) / batch**2
  return total
