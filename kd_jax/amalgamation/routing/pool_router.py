"""The ``'pool_lda'`` routing rule: a linear discriminant fitted on the unlabelled pool.

Every teacher's features side by side (the pipeline gives every block's, average-pooled), one
Gaussian per union class with a shared covariance (linear discriminant analysis), fitted to the
classes that teacher-card routing and the routed teacher's prediction give the pool images (no
labels; optionally refitted on its own or on class-balanced predictions). The score
``s_t = logsumexp_{c ∈ classes_t} g_c(f)`` is the log posterior of teacher ``t``'s task up to a
constant. Why: the cards judge each teacher alone; this rule judges all teachers' features
together, where the tasks separate better.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.amalgamation.routing.cards import TeacherCard, teacher_card_scores
from kd_jax.amalgamation.routing.common import STD_FLOOR, check_teachers


@flax.struct.dataclass
class PoolRouter:
  """A linear discriminant over the union's classes on all teachers' features (a pytree).

  Attributes:
    weight: ``[D, C]``, ``D = Σ_t D_t`` (the teachers' features concatenated).
    bias: ``[C]``; class discriminants ``g(f) = f W + b`` (log posteriors up to a constant).
    task: ``[C, T]`` one-hot: which teacher owns each union class.
  """

  weight: jax.Array
  bias: jax.Array
  task: jax.Array


def _lda(
  x: np.ndarray, y: np.ndarray, num_classes: int, shrinkage: float
) -> tuple[np.ndarray, np.ndarray]:
  """Linear discriminant (shared, shrunk covariance; class priors from ``y``): ``(W [D, C], b [C])``."""
  counts = np.bincount(y, minlength=num_classes).astype(np.float64)
  present = counts > 0
  means = np.stack(
    [x[y == c].mean(0) if present[c] else np.zeros(x.shape[1]) for c in range(num_classes)]
  )
  centered = x - means[y]
  cov = centered.T @ centered / len(x)
  cov = (1.0 - shrinkage) * cov + (shrinkage * np.trace(cov) / cov.shape[0] + 1e-6) * np.eye(
    cov.shape[0]
  )
  weight = np.linalg.solve(cov, means.T)  # [D, C] = Σ⁻¹ μ_c
  bias = -0.5 * np.sum(means.T * weight, axis=0) + np.log(np.maximum(counts, 1.0) / len(x))
  bias[~present] = -np.inf  # a class no pool image was given never wins
  return weight, bias


def fit_pool_router(
  features: Sequence[Any],
  initial: Any,
  class_index: Sequence[Sequence[int]],
  *,
  shrinkage: float = 0.1,
  rounds: int = 0,
  balance_rounds: int = 0,
  class_shares: Any = None,
) -> PoolRouter:
  """Fits :class:`PoolRouter` on unlabelled pool features (NumPy, float64; not jittable).

  Args:
    features: per teacher ``[N, D_t]`` features of the same ``N`` pool images.
    initial: ``[N]`` integer union classes to start from (teacher-card routing and the routed
      teacher's own prediction: no labels).
    class_index: per teacher, the positions of its classes in the union.
    shrinkage: toward a scaled identity, as for the cards.
    rounds: refits on the router's own predictions after the first fit (default 0: on real
      teachers such refits helped on one dataset and hurt on another; docs/amalgamation.md).
    balance_rounds: then this many refits on *balanced* pseudo-classes: the posteriors of the
      last fit rescaled (Sinkhorn) so that the union classes take `class_shares` of the pool,
      then the most probable class of each image. It corrects a start that starves a class
      (teacher cards can send a share of one class to the wrong teacher).
    class_shares: ``[C]`` the pool's expected class mix (normalised here; default equal
      shares). The pipeline passes the teachers' own training counts (their cards).
  """
  x = np.concatenate([np.asarray(f, np.float64) for f in features], axis=1)
  y = np.asarray(initial)
  if x.shape[0] != y.shape[0] or y.ndim != 1:
    raise ValueError(f"initial must be [{x.shape[0]}] classes, got shape {y.shape}")
  num_classes = sum(len(i) for i in class_index)
  if y.size and (y.min() < 0 or y.max() >= num_classes):
    raise ValueError(f"initial classes must be in 0..{num_classes - 1}")
  mean, std = (
    x.mean(0),
    np.maximum(x.std(0), STD_FLOOR),
  )  # standardised: shrinkage treats features alike
  z = (x - mean) / std
  for r in range(rounds + balance_rounds + 1):
    weight, bias = _lda(z, y, num_classes, shrinkage)
    if r < rounds:
      y = np.argmax(z @ weight + bias, axis=1)
    elif r < rounds + balance_rounds:
      y = np.argmax(balanced_assignment(z @ weight + bias, shares=class_shares), axis=1)
  # Fold the standardisation in: g(f) = ((f − m) / s) W + b = f (W / s) + (b − (m / s) W).
  weight, bias = weight / std[:, None], bias - (mean / std) @ weight
  task = np.zeros((num_classes, len(class_index)), np.float32)
  for t, index in enumerate(class_index):
    task[list(index), t] = 1.0
  return PoolRouter(
    weight=jnp.asarray(weight, jnp.float32),
    bias=jnp.asarray(bias, jnp.float32),
    task=jnp.asarray(task),
  )


def class_shares(
  cards: Sequence[TeacherCard], class_index: Sequence[Sequence[int]]
) -> np.ndarray | None:
  """``[C]`` the union's class mix as the teachers saw it (their cards' training counts, in
  union order): what :func:`fit_pool_router`'s balanced refits assume of the pool. None
  (equal shares) when a card predates the counts."""
  if any(card.counts is None for card in cards):
    return None
  shares = np.zeros(sum(len(index) for index in class_index))
  for card, index in zip(cards, class_index):
    shares[list(index)] = np.asarray(card.counts)
  return shares


def balanced_assignment(scores: Any, *, shares: Any = None, iterations: int = 100) -> np.ndarray:
  """Soft assignments ``[N, C]`` from class log-scores ``[N, C]`` (NumPy), rescaled so that
  class ``c`` receives ``N · shares_c`` of the mass (default equal shares) and every row sums
  to 1: the softmax with its rows and columns scaled (Sinkhorn-Knopp, as for balanced
  pseudo-labels in SeLa and SwAV). A class whose score is −inf everywhere gets none."""
  scores = np.asarray(scores, np.float64)
  n, c = scores.shape
  shares = np.full(c, 1.0 / c) if shares is None else np.asarray(shares, np.float64)
  if shares.shape != (c,) or (shares < 0).any() or shares.sum() <= 0:
    raise ValueError(f"shares must be [{c}] non-negative numbers with a positive sum, got {shares}")
  target = n * shares / shares.sum()
  q = np.exp(scores - scores.max(axis=1, keepdims=True))
  q /= q.sum(axis=1, keepdims=True)
  for _ in range(iterations):
    q *= target / np.maximum(q.sum(axis=0), 1e-300)
    q /= q.sum(axis=1, keepdims=True)
  return q


def card_routed_classes(
  logits: Sequence[Any],
  features: Sequence[Any],
  cards: Sequence[TeacherCard],
  class_index: Sequence[Sequence[int]],
) -> np.ndarray:
  """Where :func:`fit_pool_router` starts: per sample, the union class that the teacher chosen
  by teacher-card routing predicts (``[N]`` integers; teachers' outputs only, no labels)."""
  routed = np.asarray(teacher_card_scores(features, cards)).argmax(-1)
  own = np.stack(
    [np.asarray(index)[np.asarray(z).argmax(-1)] for z, index in zip(logits, class_index)], -1
  )
  return own[np.arange(len(routed)), routed]


def pool_router_scores(features: Sequence[jax.Array], router: PoolRouter) -> jax.Array:
  """``s_t = logsumexp_{c ∈ classes_t} g_c(f)``; per teacher ``[B, D_t]`` → ``[B, T]``."""
  g = jnp.concatenate(
    [jnp.asarray(f, jnp.float32) for f in check_teachers(features, "features")], axis=-1
  )
  g = g @ router.weight + router.bias  # [B, C]
  masked = jnp.where(router.task.T[None] > 0, g[:, None, :], -jnp.inf)  # [B, T, C]
  return jax.nn.logsumexp(masked, axis=-1)
