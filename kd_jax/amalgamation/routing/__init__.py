"""Per-sample teacher routing for knowledge amalgamation.

In amalgamation (Shen et al., ICCV 2019) several frozen teachers, each an expert on its own class
subset, supervise one student over the union of their classes, without labels. For each unlabelled
sample the student should learn from the teacher that owns the sample's class. This package
scores every (sample, teacher) pair by one of several rules (:data:`RULES`) and turns the scores
into routing weights.

Shapes: ``B`` batch, ``T`` teachers, ``C_t`` classes of teacher ``t``, ``D_t`` feature width of
teacher ``t``, ``K`` classes of one card. Every score function returns ``[B, T]`` where HIGHER means
a more suitable teacher; :func:`route` turns scores into weights ``[B, T]``.

Modules:
  scores: the logit rules (entropy, max_softmax, energy), the dispatch over every rule
    (:func:`teacher_scores`), :func:`route` and :func:`routing_accuracy`.
  cards: :class:`TeacherCard` (fitting, calibrating) and the ``'teacher_card'`` rule.
  pool_router: :class:`PoolRouter`, the ``'pool_lda'`` rule fitted on the unlabelled pool.
  common: the helpers they share.

Every public name is re-exported here: ``from kd_jax.amalgamation import routing`` and
``routing.fit_teacher_card(...)``.
"""

from kd_jax.amalgamation.routing.cards import (
  CardStats,
  TeacherCard,
  calibrate_card,
  card_from_stats,
  card_stats_init,
  card_stats_update,
  class_mahalanobis,
  fit_teacher_card,
  mahalanobis_scores,
  teacher_card_scores,
)
from kd_jax.amalgamation.routing.pool_router import (
  PoolRouter,
  balanced_assignment,
  card_routed_classes,
  class_shares,
  fit_pool_router,
  pool_router_scores,
)
from kd_jax.amalgamation.routing.scores import (
  RULES,
  energy_scores,
  entropy_scores,
  fit_energy_stats,
  max_softmax_scores,
  route,
  routing_accuracy,
  teacher_scores,
)

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
  "class_shares",
  "balanced_assignment",
]
