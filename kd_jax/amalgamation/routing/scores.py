"""Per-sample routing scores for knowledge amalgamation, and routing weights from them.

Every score function returns ``[B, T]`` where HIGHER means a more suitable teacher;
:func:`route` turns scores into weights ``[B, T]``. Rules (:data:`RULES`):

* ``'entropy'`` — the paper's rule, normalised so teachers with different class counts compare:
  ``s_t = −H(softmax(z_t)) / log C_t`` in ``[−1, 0]`` (−1: uniform prediction, 0: one-hot).
* ``'max_softmax'`` — ``s_t = max_c softmax(z_t)_c``.
* ``'energy'`` — ``s_t = (logsumexp(z_t) − m_t) / σ_t`` with per-teacher pool statistics
  ``(m_t, σ_t)`` (see :func:`fit_energy_stats`), or within-batch statistics when none are given.
* ``'teacher_card'`` — feature density under each teacher's card
  (:mod:`kd_jax.amalgamation.routing.cards`).
* ``'pool_lda'`` — a linear discriminant over all teachers' features, fitted on the unlabelled
  pool (:mod:`kd_jax.amalgamation.routing.pool_router`).

All score and routing functions are pure ``jax.numpy`` code (jit/vmap friendly; the rule name and
the number of teachers are static).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.amalgamation.routing.cards import TeacherCard, teacher_card_scores
from kd_jax.amalgamation.routing.common import STD_FLOOR, check_teachers
from kd_jax.amalgamation.routing.pool_router import PoolRouter, pool_router_scores
from kd_jax.choices import SELECTIONS

RULES = SELECTIONS  # the rules a config may select


# --------------------------------------------------------------------------------------------------
# Logit rules, each [B, T], higher = more suitable teacher
# --------------------------------------------------------------------------------------------------


def entropy_scores(logits: Sequence[jax.Array]) -> jax.Array:
  """Normalised negative entropy, the paper's ambiguity rule.

  ``s_t = −H(softmax(z_t)) / log C_t = Σ_c p_c log p_c / log C_t`` in ``[−1, 0]``.
  ``logits``: sequence of ``[B, C_t]`` (``C_t ≥ 2``) → ``[B, T]``.
  """
  cols = []
  for t, z in enumerate(check_teachers(logits, "logits")):
    z = jnp.asarray(z, jnp.float32)
    c = z.shape[-1]
    if c < 2:
      raise ValueError(f"teacher {t} has {c} class(es); entropy needs at least 2")
    logp = jax.nn.log_softmax(z, axis=-1)
    neg_h = jnp.sum(jnp.exp(logp) * logp, axis=-1)
    cols.append(neg_h / np.log(c))
  return jnp.stack(cols, axis=-1)


def max_softmax_scores(logits: Sequence[jax.Array]) -> jax.Array:
  """``s_t = max_c softmax(z_t)_c``; sequence of ``[B, C_t]`` → ``[B, T]``."""
  return jnp.stack(
    [
      jax.nn.softmax(jnp.asarray(z, jnp.float32), axis=-1).max(axis=-1)
      for z in check_teachers(logits, "logits")
    ],
    axis=-1,
  )


def fit_energy_stats(logits: Sequence[jax.Array]) -> jax.Array:
  """Per-teacher ``(mean, std)`` of ``logsumexp(z_t)`` over an (unlabelled) pool → ``[T, 2]``.

  Population std, floored at 1e-6. Pass the result as ``energy_stats``.
  """
  e = jnp.stack(
    [
      jax.nn.logsumexp(jnp.asarray(z, jnp.float32), axis=-1)
      for z in check_teachers(logits, "logits")
    ],
    axis=-1,
  )  # [N, T]
  return jnp.stack([e.mean(axis=0), jnp.maximum(e.std(axis=0), STD_FLOOR)], axis=-1)


def energy_scores(logits: Sequence[jax.Array], *, stats: Any = None) -> jax.Array:
  """Standardised negative free energy.

  ``e_t = logsumexp_c z_{t,c}`` and ``s_t = (e_t − m_t) / σ_t``. Raw energies of different
  teachers live on unrelated scales, hence the per-teacher standardisation:

  * ``stats`` given (``[T, 2]`` array or sequence of ``(mean, std)`` pairs, e.g. from
    :func:`fit_energy_stats` on the unlabelled pool): ``m_t, σ_t`` are those.
  * ``stats`` None: ``m_t, σ_t`` are the mean and population std of ``e_t`` over the batch
    (axis 0; σ floored at 1e-6, so a batch of one scores 0). Batch-dependent; prefer pool stats.

  ``logits``: sequence of ``[B, C_t]`` → ``[B, T]``.
  """
  logits = check_teachers(logits, "logits")
  e = jnp.stack(
    [jax.nn.logsumexp(jnp.asarray(z, jnp.float32), axis=-1) for z in logits], axis=-1
  )  # [B, T]
  if stats is None:
    m, s = e.mean(axis=0), e.std(axis=0)
  else:
    stats = jnp.asarray(stats, jnp.float32)
    if stats.shape != (len(logits), 2):
      raise ValueError(
        f"energy stats must be [{len(logits)}, 2] (mean, std per teacher), got {stats.shape}"
      )
    m, s = stats[:, 0], stats[:, 1]
  return (e - m) / jnp.maximum(s, STD_FLOOR)


def teacher_scores(
  rule: str,
  *,
  logits: Sequence[jax.Array] | None = None,
  features: Sequence[jax.Array] | None = None,
  cards: Sequence[TeacherCard] | None = None,
  energy_stats: Any = None,
  pool_router: PoolRouter | None = None,
) -> jax.Array:
  """Dispatch to the scorer of ``rule`` (one of :data:`RULES`) → ``[B, T]``, higher = better.

  ``'entropy'``, ``'max_softmax'``, ``'energy'`` need ``logits`` (sequence of ``[B, C_t]``);
  ``'energy'`` optionally takes ``energy_stats`` (see :func:`energy_scores`); ``'teacher_card'``
  needs ``features`` (sequence of ``[B, D_t]``) and ``cards``. Inputs a rule does not use are
  ignored, so one call site can switch rules. ``rule`` must be static under jit.

  Raises:
    ValueError: unknown rule, or an input the rule needs is missing.
  """
  if rule not in RULES:
    raise ValueError(f"unknown routing rule {rule!r}; choose one of {RULES}")
  needs = {"teacher_card": ("features", "cards"), "pool_lda": ("features", "pool_router")}.get(
    rule, ("logits",)
  )
  given = {"logits": logits, "features": features, "cards": cards, "pool_router": pool_router}
  missing = [k for k in needs if given[k] is None]
  if missing:
    raise ValueError(f"rule {rule!r} needs {', '.join(needs)}; missing: {', '.join(missing)}")
  if rule == "entropy":
    return entropy_scores(logits)
  if rule == "max_softmax":
    return max_softmax_scores(logits)
  if rule == "energy":
    return energy_scores(logits, stats=energy_stats)
  if rule == "pool_lda":
    return pool_router_scores(features, pool_router)
  return teacher_card_scores(features, cards)


# --------------------------------------------------------------------------------------------------
# Routing
# --------------------------------------------------------------------------------------------------


def route(scores: jax.Array, *, mode: str = "hard", temperature: float = 1.0) -> jax.Array:
  """Routing weights from scores ``[..., T]`` → ``[..., T]`` (each row sums to 1).

  * ``'hard'``: ``w = one_hot(argmax_t s_t)``; ties go to the first teacher.
  * ``'soft'``: ``w = softmax(s / temperature)``.
  """
  scores = jnp.asarray(scores)
  if mode == "hard":
    return jax.nn.one_hot(jnp.argmax(scores, axis=-1), scores.shape[-1], dtype=jnp.float32)
  if mode == "soft":
    if isinstance(temperature, (int, float)) and temperature <= 0:
      raise ValueError(f"temperature must be > 0, got {temperature}")
    return jax.nn.softmax(scores.astype(jnp.float32) / temperature, axis=-1)
  raise ValueError(f"unknown routing mode {mode!r}; choose 'hard' or 'soft'")


def routing_accuracy(weights: jax.Array, true_teacher: jax.Array) -> jax.Array:
  """Fraction of samples whose largest weight is on the owning teacher (ties → first).

  ``weights [B, T]``, ``true_teacher [B]`` integers → float32 scalar.
  """
  weights = jnp.asarray(weights)
  true_teacher = jnp.asarray(true_teacher)
  if true_teacher.shape != weights.shape[:-1]:
    raise ValueError(f"true_teacher must have shape {weights.shape[:-1]}, got {true_teacher.shape}")
  return jnp.mean((jnp.argmax(weights, axis=-1) == true_teacher).astype(jnp.float32))
