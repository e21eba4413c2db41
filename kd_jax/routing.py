"""Per-sample teacher routing for knowledge amalgamation.

In amalgamation (Shen et al., ICCV 2019) several frozen teachers, each an expert on its own class
subset, supervise one student over the union of their classes, without labels. For each unlabelled
sample the student should learn from the teacher that owns the sample's class. This module scores
every (sample, teacher) pair by one of several rules and turns the scores into routing weights.

Shapes: ``B`` batch, ``T`` teachers, ``C_t`` classes of teacher ``t``, ``D_t`` feature width of
teacher ``t``, ``K`` classes of one card. Every score function returns ``[B, T]`` where HIGHER means
a more suitable teacher; :func:`route` turns scores into weights ``[B, T]``.

Rules (:data:`RULES`):

* ``'entropy'`` — the paper's rule, normalised so teachers with different class counts compare:
  ``s_t = −H(softmax(z_t)) / log C_t`` in ``[−1, 0]`` (−1: uniform prediction, 0: one-hot).
* ``'max_softmax'`` — ``s_t = max_c softmax(z_t)_c``.
* ``'energy'`` — ``s_t = (logsumexp(z_t) − m_t) / σ_t`` with per-teacher pool statistics
  ``(m_t, σ_t)`` (see :func:`fit_energy_stats`), or within-batch statistics when none are given.
* ``'teacher_card'`` — feature-density rule. Each teacher carries a :class:`TeacherCard`: the class
  means ``μ_k`` and a shared (tied) precision ``P`` of its penultimate features fitted on its own
  training data, plus the mean/std of its own in-distribution scores. With
  ``M_t(f) = min_k (f − μ_k)ᵀ P (f − μ_k)``, ``s_t = −(M_t(f_t) − score_mean_t) / score_std_t``:
  a sample goes to the teacher in whose feature space it lies closest, measured relative to that
  teacher's own in-distribution distances. With disjoint class sets this routes far better than
  entropy (measured ~90% vs 52–75% on Fashion-MNIST classes 0–3).
* ``'pool_lda'`` — a router fitted on the unlabelled pool (:func:`fit_pool_router`): every
  teacher's features side by side (the pipeline gives every block's, average-pooled), one
  Gaussian per union class with a shared covariance (linear discriminant analysis), fitted to
  the classes that teacher-card routing and the routed teacher's prediction give the pool
  images (no labels; optionally refitted on its own predictions). ``s_t = logsumexp_{c ∈
  classes_t} g_c(f)``, the log posterior of teacher ``t``'s task up to a constant. The cards
  judge each teacher alone; this rule judges all teachers' features together, where the tasks
  separate better (Fashion-MNIST 0–3: 0.925 against 0.90 for the cards; README).

All score and routing functions are pure ``jax.numpy`` code (jit/vmap friendly; the rule name and
the number of teachers are static). Fitting a card from a dataset either goes one-shot
(:func:`fit_teacher_card`) or streams over batches (:func:`card_stats_init`,
:func:`card_stats_update`, :func:`card_from_stats`, then :func:`calibrate_card` as a second pass).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "RULES",
    "TeacherCard",
    "CardStats",
    "card_stats_init",
    "card_stats_update",
    "card_from_stats",
    "calibrate_card",
    "fit_teacher_card",
    "class_mahalanobis",
    "mahalanobis_scores",
    "entropy_scores",
    "max_softmax_scores",
    "energy_scores",
    "fit_energy_stats",
    "teacher_card_scores",
    "PoolRouter",
    "card_routed_classes",
    "fit_pool_router",
    "pool_router_scores",
    "teacher_scores",
    "route",
    "routing_accuracy",
]

RULES = ("entropy", "max_softmax", "energy", "teacher_card", "pool_lda")

_STD_FLOOR = 1e-6  # lower bound on any standard deviation used to standardise scores


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
          f"TeacherCard.from_dict: precision must be [{dim}, {dim}], got {precision.shape}")
    if score_mean.shape != () or score_std.shape != ():
      raise ValueError("TeacherCard.from_dict: score_mean and score_std must be scalars")
    counts = d.get("counts")
    if counts is not None:
      counts = np.asarray(counts, np.float32)
      if counts.shape != means.shape[:1]:
        raise ValueError(f"TeacherCard.from_dict: counts must be [{means.shape[0]}], got {counts.shape}")
      counts = jnp.asarray(counts)
    return cls(means=jnp.asarray(means),
               precision=jnp.asarray(precision),
               score_mean=jnp.asarray(score_mean),
               score_std=jnp.asarray(score_std),
               counts=counts)


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
  return CardStats(count=jnp.zeros((num_classes,), dtype),
                   mean=jnp.zeros((num_classes, dim), dtype),
                   scatter=jnp.zeros((dim, dim), dtype))


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
  return TeacherCard(means=stats.mean.astype(jnp.float32),
                     precision=precision.astype(jnp.float32),
                     score_mean=jnp.zeros((), jnp.float32),
                     score_std=jnp.ones((), jnp.float32),
                     counts=stats.count.astype(jnp.float32))


def calibrate_card(card: TeacherCard,
                   features: jax.Array | None = None,
                   *,
                   scores: jax.Array | None = None,
                   batch_size: int = 4096) -> TeacherCard:
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
    chunks = [mahalanobis_scores(card, features[i:i + batch_size]) for i in range(0, n, batch_size)]
    scores = jnp.concatenate(chunks) if chunks else jnp.zeros((0,), jnp.float32)
  scores = jnp.asarray(scores, jnp.float32)
  if scores.ndim != 1 or scores.shape[0] == 0:
    raise ValueError(f"need a non-empty [N] set of scores, got shape {scores.shape}")
  return card.replace(score_mean=scores.mean(), score_std=jnp.maximum(scores.std(), _STD_FLOOR))


def fit_teacher_card(features: Any,
                     labels: Any,
                     *,
                     num_classes: int,
                     shrinkage: float = 0.1,
                     eps: float = 1e-6,
                     calibrate: bool = True) -> TeacherCard:
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
    raise ValueError(f"labels must be in 0..{num_classes - 1}, "
                     f"got range {labels.min()}..{labels.max()}")
  counts = np.bincount(labels, minlength=num_classes)
  if (counts == 0).any():
    raise ValueError(f"classes {np.flatnonzero(counts == 0).tolist()} have no sample; "
                     "every class needs one")
  dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
  stats = card_stats_init(num_classes, features.shape[1], dtype=dtype)
  stats = card_stats_update(stats, jnp.asarray(features, dtype), jnp.asarray(labels))
  card = card_from_stats(stats, shrinkage=shrinkage, eps=eps)
  if calibrate:
    card = calibrate_card(card, jnp.asarray(features, jnp.float32))
  return card


# --------------------------------------------------------------------------------------------------
# Mahalanobis
# --------------------------------------------------------------------------------------------------


def class_mahalanobis(card: TeacherCard, features: jax.Array) -> jax.Array:
  """Squared Mahalanobis distance to every class mean.

  ``d_k(f) = (f − μ_k)ᵀ P (f − μ_k)``; ``features [..., D]`` → ``[..., K]`` (clipped at 0).
  """
  features = jnp.asarray(features, jnp.float32)
  if features.shape[-1] != card.means.shape[-1]:
    raise ValueError(f"features have width {features.shape[-1]}, "
                     f"card expects {card.means.shape[-1]}")
  diff = features[..., None, :] - card.means  # [..., K, D]
  d = jnp.einsum("...kd,de,...ke->...k", diff, card.precision, diff)
  return jnp.maximum(d, 0.0)


def mahalanobis_scores(card: TeacherCard, features: jax.Array) -> jax.Array:
  """``M(f) = min_k (f − μ_k)ᵀ P (f − μ_k)``; ``features [B, D]`` → ``[B]`` (lower = closer)."""
  return class_mahalanobis(card, features).min(axis=-1)


# --------------------------------------------------------------------------------------------------
# Per-rule scores, each [B, T], higher = more suitable teacher
# --------------------------------------------------------------------------------------------------


def _check_teachers(seq: Sequence[Any] | None, name: str) -> list[Any]:
  if seq is None:
    raise ValueError(f"{name} is required")
  seq = list(seq)
  if not seq:
    raise ValueError(f"{name} must hold at least one teacher")
  return seq


def entropy_scores(logits: Sequence[jax.Array]) -> jax.Array:
  """Normalised negative entropy, the paper's ambiguity rule.

  ``s_t = −H(softmax(z_t)) / log C_t = Σ_c p_c log p_c / log C_t`` in ``[−1, 0]``.
  ``logits``: sequence of ``[B, C_t]`` (``C_t ≥ 2``) → ``[B, T]``.
  """
  cols = []
  for t, z in enumerate(_check_teachers(logits, "logits")):
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
  return jnp.stack([
      jax.nn.softmax(jnp.asarray(z, jnp.float32), axis=-1).max(axis=-1)
      for z in _check_teachers(logits, "logits")
  ],
                   axis=-1)


def fit_energy_stats(logits: Sequence[jax.Array]) -> jax.Array:
  """Per-teacher ``(mean, std)`` of ``logsumexp(z_t)`` over an (unlabelled) pool → ``[T, 2]``.

  Population std, floored at 1e-6. Pass the result as ``energy_stats``.
  """
  e = jnp.stack([
      jax.nn.logsumexp(jnp.asarray(z, jnp.float32), axis=-1)
      for z in _check_teachers(logits, "logits")
  ],
                axis=-1)  # [N, T]
  return jnp.stack([e.mean(axis=0), jnp.maximum(e.std(axis=0), _STD_FLOOR)], axis=-1)


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
  logits = _check_teachers(logits, "logits")
  e = jnp.stack([jax.nn.logsumexp(jnp.asarray(z, jnp.float32), axis=-1) for z in logits],
                axis=-1)  # [B, T]
  if stats is None:
    m, s = e.mean(axis=0), e.std(axis=0)
  else:
    stats = jnp.asarray(stats, jnp.float32)
    if stats.shape != (len(logits), 2):
      raise ValueError(f"energy stats must be [{len(logits)}, 2] (mean, std per teacher), "
                       f"got {stats.shape}")
    m, s = stats[:, 0], stats[:, 1]
  return (e - m) / jnp.maximum(s, _STD_FLOOR)


def teacher_card_scores(features: Sequence[jax.Array], cards: Sequence[TeacherCard]) -> jax.Array:
  """Feature-density rule: ``s_t = −(M_t(f_t) − score_mean_t) / score_std_t``.

  ``M_t`` is :func:`mahalanobis_scores` with teacher ``t``'s card on that teacher's own
  penultimate features. ``features``: sequence of ``[B, D_t]``; ``cards``: sequence of
  :class:`TeacherCard` of the same length → ``[B, T]``.
  """
  features = _check_teachers(features, "features")
  cards = _check_teachers(cards, "cards")
  if len(features) != len(cards):
    raise ValueError(f"got features for {len(features)} teachers but {len(cards)} cards")
  return jnp.stack(
      [-(mahalanobis_scores(c, f) - c.score_mean) / c.score_std for f, c in zip(features, cards)],
      axis=-1)


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


def _lda(x: np.ndarray, y: np.ndarray, num_classes: int, shrinkage: float) -> tuple[np.ndarray, np.ndarray]:
  """Linear discriminant (shared, shrunk covariance; class priors from ``y``): ``(W [D, C], b [C])``."""
  counts = np.bincount(y, minlength=num_classes).astype(np.float64)
  present = counts > 0
  means = np.stack([x[y == c].mean(0) if present[c] else np.zeros(x.shape[1]) for c in range(num_classes)])
  centered = x - means[y]
  cov = centered.T @ centered / len(x)
  cov = (1.0 - shrinkage) * cov + (shrinkage * np.trace(cov) / cov.shape[0] + 1e-6) * np.eye(cov.shape[0])
  weight = np.linalg.solve(cov, means.T)  # [D, C] = Σ⁻¹ μ_c
  bias = -0.5 * np.sum(means.T * weight, axis=0) + np.log(np.maximum(counts, 1.0) / len(x))
  bias[~present] = -np.inf  # a class no pool image was given never wins
  return weight, bias


def fit_pool_router(features: Sequence[Any], initial: Any, class_index: Sequence[Sequence[int]], *,
                    shrinkage: float = 0.1, rounds: int = 0, balance_rounds: int = 0,
                    class_shares: Any = None) -> PoolRouter:
  """Fits :class:`PoolRouter` on unlabelled pool features (NumPy, float64; not jittable).

  Args:
    features: per teacher ``[N, D_t]`` features of the same ``N`` pool images.
    initial: ``[N]`` integer union classes to start from (teacher-card routing and the routed
      teacher's own prediction: no labels).
    class_index: per teacher, the positions of its classes in the union.
    shrinkage: toward a scaled identity, as for the cards.
    rounds: refits on the router's own predictions after the first fit. Measured on real
      teachers (penultimate features): on Fashion-MNIST 0–3 each refit lowered the routing
      accuracy (0.924 → 0.916 after 3), on MNIST 0–3 it rose by 0.2 points; hence 0.
    balance_rounds: then this many refits on *balanced* pseudo-classes: the posteriors of the
      last fit rescaled (Sinkhorn) so that the union classes take `class_shares` of the pool,
      then the most probable class of each image. It corrects a start that starves a class
      (teacher cards send a fifth of the T-shirts to the pullover/dress teacher; README).
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
  mean, std = x.mean(0), np.maximum(x.std(0), _STD_FLOOR)  # standardised: shrinkage treats features alike
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
  return PoolRouter(weight=jnp.asarray(weight, jnp.float32), bias=jnp.asarray(bias, jnp.float32),
                    task=jnp.asarray(task))


def class_shares(cards: Sequence[TeacherCard], class_index: Sequence[Sequence[int]]) -> np.ndarray | None:
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


def card_routed_classes(logits: Sequence[Any], features: Sequence[Any], cards: Sequence[TeacherCard],
                        class_index: Sequence[Sequence[int]]) -> np.ndarray:
  """Where :func:`fit_pool_router` starts: per sample, the union class that the teacher chosen
  by teacher-card routing predicts (``[N]`` integers; teachers' outputs only, no labels)."""
  routed = np.asarray(teacher_card_scores(features, cards)).argmax(-1)
  own = np.stack([np.asarray(index)[np.asarray(z).argmax(-1)] for z, index in zip(logits, class_index)], -1)
  return own[np.arange(len(routed)), routed]


def pool_router_scores(features: Sequence[jax.Array], router: PoolRouter) -> jax.Array:
  """``s_t = logsumexp_{c ∈ classes_t} g_c(f)``; per teacher ``[B, D_t]`` → ``[B, T]``."""
  g = jnp.concatenate([jnp.asarray(f, jnp.float32) for f in _check_teachers(features, "features")], axis=-1)
  g = g @ router.weight + router.bias  # [B, C]
  masked = jnp.where(router.task.T[None] > 0, g[:, None, :], -jnp.inf)  # [B, T, C]
  return jax.nn.logsumexp(masked, axis=-1)


def teacher_scores(rule: str,
                   *,
                   logits: Sequence[jax.Array] | None = None,
                   features: Sequence[jax.Array] | None = None,
                   cards: Sequence[TeacherCard] | None = None,
                   energy_stats: Any = None,
                   pool_router: PoolRouter | None = None) -> jax.Array:
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
  needs = {"teacher_card": ("features", "cards"), "pool_lda": ("features", "pool_router")}.get(rule, ("logits",))
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
    raise ValueError(f"true_teacher must have shape {weights.shape[:-1]}, "
                     f"got {true_teacher.shape}")
  return jnp.mean((jnp.argmax(weights, axis=-1) == true_teacher).astype(jnp.float32))
