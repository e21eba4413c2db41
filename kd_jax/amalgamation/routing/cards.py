"""Teacher cards: a class-conditional Gaussian summary of one teacher's penultimate features,
and the ``'teacher_card'`` routing rule that scores samples by it.

A :class:`TeacherCard` holds the class means ``μ_k`` and a shared (tied) precision ``P`` of the
teacher's features on its own training data, plus the mean/std of its own in-distribution
scores. With ``M_t(f) = min_k (f − μ_k)ᵀ P (f − μ_k)``, the rule scores
``s_t = −(M_t(f_t) − score_mean_t) / score_std_t``: a sample goes to the teacher in whose
feature space it lies closest, relative to that teacher's own in-distribution distances. Why:
with disjoint class sets it routes far better than the logit rules, which see only each
teacher's confidence.

A card is fitted one-shot (:func:`fit_teacher_card`) or by streaming over batches
(:func:`card_stats_init`, :func:`card_stats_update`, :func:`card_from_stats`, then
:func:`calibrate_card` as a second pass). Checkpoints store a card as plain arrays
(:meth:`TeacherCard.to_dict`), never by class path.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.amalgamation.routing.common import STD_FLOOR, check_teachers


def _is_concrete(x: Any) -> bool:
  """True when ``x`` holds actual values (not a tracer inside jit/vmap)."""
  return not isinstance(x, jax.core.Tracer)


# --------------------------------------------------------------------------------------------------
# Teacher card
# --------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class TeacherCard:
  """Class-conditional Gaussian summary of one teacher's penultimate features (a pytree).

  Attributes:
    means: ``[K, D]`` float32 class means ``μ_k`` on the teacher's own training data.
    precision: ``[D, D]`` float32 ``P = Σ_λ⁻¹``, the inverse of the shrunk shared (tied)
    covariance, see :func:`card_from_stats`.
    score_mean: scalar, mean of ``M(f) = min_k (f − μ_k)ᵀ P (f − μ_k)`` over the teacher's own
    training features (0 until :func:`calibrate_card`).
    score_std: scalar, population std of the same scores (1 until :func:`calibrate_card`).
    counts: ``[K]`` float32 training images per class (the class mix the teacher learned on;
    ``None`` in a card saved before it was recorded).
  """

  means: jax.Array
  precision: jax.Array
  score_mean: jax.Array
  score_std: jax.Array
  counts: jax.Array | None = None

  @property
  def num_classes(self) -> int:
    return self.means.shape[0]

  @property
  def dim(self) -> int:
    return self.means.shape[1]

  def to_dict(self) -> dict[str, np.ndarray]:
    """NumPy arrays keyed by field name (for Orbax / JSON / ``np.savez``; 0-d for scalars)."""
    out = {
      "means": np.asarray(self.means, np.float32),
      "precision": np.asarray(self.precision, np.float32),
      "score_mean": np.asarray(self.score_mean, np.float32),
      "score_std": np.asarray(self.score_std, np.float32),
    }
    if self.counts is not None:
      out["counts"] = np.asarray(self.counts, np.float32)
    return out

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "TeacherCard":
    """Inverse of :meth:`to_dict`; accepts arrays, nested lists or Python floats."""
    missing = [k for k in ("means", "precision", "score_mean", "score_std") if k not in d]
    if missing:
      raise ValueError(f"TeacherCard.from_dict: missing keys {missing}")
    means = np.asarray(d["means"], np.float32)
    precision = np.asarray(d["precision"], np.float32)
    score_mean = np.asarray(d["score_mean"], np.float32)
    score_std = np.asarray(d["score_std"], np.float32)
    if means.ndim != 2:
      raise ValueError(f"TeacherCard.from_dict: means must be [K, D], got {means.shape}")
    dim = means.shape[1]
    if precision.shape != (dim, dim):
      raise ValueError(
        f"TeacherCard.from_dict: precision must be [{dim}, {dim}], got {precision.shape}"
      )
    if score_mean.shape != () or score_std.shape != ():
      raise ValueError("TeacherCard.from_dict: score_mean and score_std must be scalars")
    counts = d.get("counts")
    if counts is not None:
      counts = np.asarray(counts, np.float32)
      if counts.shape != means.shape[:1]:
        raise ValueError(
          f"TeacherCard.from_dict: counts must be [{means.shape[0]}], got {counts.shape}"
        )
      counts = jnp.asarray(counts)
    return cls(
      means=jnp.asarray(means),
      precision=jnp.asarray(precision),
      score_mean=jnp.asarray(score_mean),
      score_std=jnp.asarray(score_std),
      counts=counts,
    )


@flax.struct.dataclass
class CardStats:
  """Streaming sufficient statistics for a :class:`TeacherCard` (a pytree).

  Kept in the numerically stable pairwise form (Chan, Golub, LeVeque 1979) rather than raw
  sums of outer products, so float32 accumulation does not suffer catastrophic cancellation.

  Attributes:
    count: ``[K]`` number of samples seen per class (float, exact up to 2²⁴ in float32).
    mean: ``[K, D]`` running class means (0 for classes not seen yet).
    scatter: ``[D, D]`` pooled within-class scatter ``Σ_i (f_i − μ_{y_i})(f_i − μ_{y_i})ᵀ``.
  """

  count: jax.Array
  mean: jax.Array
  scatter: jax.Array


def card_stats_init(num_classes: int, dim: int, *, dtype: Any = jnp.float32) -> CardStats:
  """Empty statistics for ``num_classes`` classes of ``dim``-wide features."""
  if num_classes < 1 or dim < 1:
    raise ValueError(f"num_classes and dim must be >= 1, got {num_classes}, {dim}")
  return CardStats(
    count=jnp.zeros((num_classes,), dtype),
    mean=jnp.zeros((num_classes, dim), dtype),
    scatter=jnp.zeros((dim, dim), dtype),
  )


def card_stats_update(stats: CardStats, features: jax.Array, labels: jax.Array) -> CardStats:
  """Merge one batch into the statistics (pure, jit-friendly).

  With the batch's per-class counts ``n_b``, means ``μ_b`` and within-class scatter ``S_b``, and
  ``δ_k = μ_{b,k} − μ_{a,k}``::

    n     = n_a + n_b
    μ_k   = μ_{a,k} + δ_k · n_{b,k} / n_k
    S     = S_a + S_b + Σ_k (n_{a,k} n_{b,k} / n_k) δ_k δ_kᵀ

  Args:
    stats: current :class:`CardStats` (arrays ``[K]``, ``[K, D]``, ``[D, D]``).
    features: ``[N, D]`` penultimate features.
    labels: ``[N]`` integer classes in ``0..K−1``. Samples whose label is outside that range
    (e.g. ``−1`` for padding in a last partial batch) are ignored.

  Returns:
    Updated :class:`CardStats`.
  """
  num_classes, dim = stats.mean.shape
  features = jnp.asarray(features)
  labels = jnp.asarray(labels)
  if features.ndim != 2 or features.shape[1] != dim:
    raise ValueError(f"features must be [N, {dim}], got {features.shape}")
  if labels.shape != features.shape[:1]:
    raise ValueError(f"labels must be [{features.shape[0]}], got {labels.shape}")
  dtype = stats.mean.dtype
  f = features.astype(dtype)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=dtype)  # [N, K]; out-of-range → 0
  n_b = onehot.sum(axis=0)  # [K]
  mean_b = (onehot.T @ f) / jnp.maximum(n_b, 1.0)[:, None]  # [K, D]
  valid = onehot.sum(axis=1, keepdims=True)  # [N, 1]
  centered = (f - onehot @ mean_b) * valid  # [N, D]
  scatter_b = centered.T @ centered  # [D, D]

  n = stats.count + n_b
  delta = mean_b - stats.mean  # [K, D]
  safe_n = jnp.maximum(n, 1.0)
  mean = stats.mean + delta * (n_b / safe_n)[:, None]
  w = stats.count * n_b / safe_n  # [K]
  scatter = stats.scatter + scatter_b + (delta * w[:, None]).T @ delta
  return CardStats(count=n, mean=mean, scatter=scatter)


def card_from_stats(stats: CardStats, *, shrinkage: float = 0.1, eps: float = 1e-6) -> TeacherCard:
  """Card (means and precision) from accumulated statistics; score_mean=0, score_std=1.

  Shared covariance (maximum likelihood, divided by the total count ``N``) and its
  Ledoit-Wolf-style shrinkage toward a scaled identity (scale-invariant; ``ν = tr(Σ)/D``)::

    Σ   = S / N
    Σ_λ = (1 − λ) Σ + (λ ν + eps) I          P = Σ_λ⁻¹   (via Cholesky, symmetrised)

  ``eps`` is an absolute jitter guarding against an all-zero covariance; ``shrinkage=0,
  eps=0`` gives the plain inverse. Run :func:`calibrate_card` afterwards so that scores of
  different teachers share one scale.

  Raises:
    ValueError: (outside jit) if a class has no sample or ``shrinkage`` is not in ``[0, 1]``.
  """
  if not 0.0 <= float(shrinkage) <= 1.0:
    raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
  if eps < 0:
    raise ValueError(f"eps must be >= 0, got {eps}")
  if _is_concrete(stats.count):
    empty = np.flatnonzero(np.asarray(stats.count) <= 0)
    if empty.size:
      raise ValueError(f"classes {empty.tolist()} have no sample; every class needs one")
  dim = stats.mean.shape[1]
  total = jnp.maximum(stats.count.sum(), 1.0)
  cov = stats.scatter / total
  cov = 0.5 * (cov + cov.T)
  nu = jnp.trace(cov) / dim
  eye = jnp.eye(dim, dtype=cov.dtype)
  shrunk = (1.0 - shrinkage) * cov + (shrinkage * nu + eps) * eye
  chol = jnp.linalg.cholesky(shrunk)
  precision = jax.scipy.linalg.cho_solve((chol, True), eye)
  precision = 0.5 * (precision + precision.T)
  return TeacherCard(
    means=stats.mean.astype(jnp.float32),
    precision=precision.astype(jnp.float32),
    score_mean=jnp.zeros((), jnp.float32),
    score_std=jnp.ones((), jnp.float32),
    counts=stats.count.astype(jnp.float32),
  )


def calibrate_card(
  card: TeacherCard,
  features: jax.Array | None = None,
  *,
  scores: jax.Array | None = None,
  batch_size: int = 4096,
) -> TeacherCard:
  """Set ``score_mean``/``score_std`` from in-distribution (training) data.

  ``score_mean = mean_i M(f_i)``, ``score_std = max(std_i M(f_i), 1e-6)`` (population std), with
  ``M`` from :func:`mahalanobis_scores`. So that :func:`teacher_card_scores` of the calibration
  data have mean 0 and std 1.

  Args:
    card: a :class:`TeacherCard` (its score fields are replaced).
    features: ``[N, D]`` training features; scored in chunks of ``batch_size`` rows.
    scores: alternatively ``[N]`` precomputed ``mahalanobis_scores`` (e.g. gathered over a
    dataset batch by batch). Give exactly one of ``features`` and ``scores``.
  """
  if (features is None) == (scores is None):
    raise ValueError("calibrate_card needs exactly one of features or scores")
  if scores is None:
    features = jnp.asarray(features)
    if features.ndim != 2:
      raise ValueError(f"features must be [N, D], got {features.shape}")
    n = features.shape[0]
    chunks = [
      mahalanobis_scores(card, features[i : i + batch_size]) for i in range(0, n, batch_size)
    ]
    scores = jnp.concatenate(chunks) if chunks else jnp.zeros((0,), jnp.float32)
  scores = jnp.asarray(scores, jnp.float32)
  if scores.ndim != 1 or scores.shape[0] == 0:
    raise ValueError(f"need a non-empty [N] set of scores, got shape {scores.shape}")
  return card.replace(score_mean=scores.mean(), score_std=jnp.maximum(scores.std(), STD_FLOOR))


def fit_teacher_card(
  features: Any,
  labels: Any,
  *,
  num_classes: int,
  shrinkage: float = 0.1,
  eps: float = 1e-6,
  calibrate: bool = True,
) -> TeacherCard:
  """One-shot card from a teacher's training features (not jittable: validates its inputs).

  Equivalent to ``card_from_stats(card_stats_update(card_stats_init(K, D), features, labels))``
  followed, when ``calibrate``, by ``calibrate_card(card, features)``.

  Args:
    features: ``[N, D]`` float (NumPy or JAX, float32 or float64; computed in float32 unless
    ``jax_enable_x64``).
    labels: ``[N]`` integers in ``0..num_classes−1``.
    num_classes: ``K``.
    shrinkage, eps: see :func:`card_from_stats`.
    calibrate: also set score_mean/score_std from ``features``.

  Raises:
    ValueError: on shape mismatch, non-integer or out-of-range labels, or a class with no sample.
  """
  features = np.asarray(features)
  labels = np.asarray(labels)
  if features.ndim != 2:
    raise ValueError(f"features must be [N, D], got shape {features.shape}")
  if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
    raise ValueError(f"labels must be [{features.shape[0]}], got shape {labels.shape}")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(
      f"labels must be in 0..{num_classes - 1}, got range {labels.min()}..{labels.max()}"
    )
  counts = np.bincount(labels, minlength=num_classes)
  if (counts == 0).any():
    raise ValueError(
      f"classes {np.flatnonzero(counts == 0).tolist()} have no sample; every class needs one"
    )
  dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
  stats = card_stats_init(num_classes, features.shape[1], dtype=dtype)
  stats = card_stats_update(stats, jnp.asarray(features, dtype), jnp.asarray(labels))
  card = card_from_stats(stats, shrinkage=shrinkage, eps=eps)
  if calibrate:
    card = calibrate_card(card, jnp.asarray(features, jnp.float32))
  return card


# --------------------------------------------------------------------------------------------------
# Mahalanobis distances and the 'teacher_card' rule
# --------------------------------------------------------------------------------------------------


def class_mahalanobis(card: TeacherCard, features: jax.Array) -> jax.Array:
  """Squared Mahalanobis distance to every class mean.

  ``d_k(f) = (f − μ_k)ᵀ P (f − μ_k)``; ``features [..., D]`` → ``[..., K]`` (clipped at 0).
  """
  features = jnp.asarray(features, jnp.float32)
  if features.shape[-1] != card.means.shape[-1]:
    raise ValueError(
      f"features have width {features.shape[-1]}, card expects {card.means.shape[-1]}"
    )
  diff = features[..., None, :] - card.means  # [..., K, D]
  d = jnp.einsum("...kd,de,...ke->...k", diff, card.precision, diff)
  return jnp.maximum(d, 0.0)


def mahalanobis_scores(card: TeacherCard, features: jax.Array) -> jax.Array:
  """``M(f) = min_k (f − μ_k)ᵀ P (f − μ_k)``; ``features [B, D]`` → ``[B]`` (lower = closer)."""
  return class_mahalanobis(card, features).min(axis=-1)


def teacher_card_scores(features: Sequence[jax.Array], cards: Sequence[TeacherCard]) -> jax.Array:
  """Feature-density rule: ``s_t = −(M_t(f_t) − score_mean_t) / score_std_t``.

  ``M_t`` is :func:`mahalanobis_scores` with teacher ``t``'s card on that teacher's own
  penultimate features. ``features``: sequence of ``[B, D_t]``; ``cards``: sequence of
  :class:`TeacherCard` of the same length → ``[B, T]``.
  """
  features = check_teachers(features, "features")
  cards = check_teachers(cards, "cards")
  if len(features) != len(cards):
    raise ValueError(f"got features for {len(features)} teachers but {len(cards)} cards")
  return jnp.stack(
    [-(mahalanobis_scores(c, f) - c.score_mean) / c.score_std for f, c in zip(features, cards)],
    axis=-1,
  )
