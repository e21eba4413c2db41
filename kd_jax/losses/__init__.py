"""Loss terms for knowledge distillation and knowledge amalgamation.

Every public loss is re-exported here whatever module it lives in, so
`from kd_jax import losses; losses.hinton_kd(...)` is the one way to reach them. Each is a
pure function (jit/grad/vmap-safe), with keyword-only hyper-parameters checked at trace
time (`ValueError` naming the argument), computed in at least float32.

Modules by job:
  * `logits`: cross-entropy, tempered softmax, `distillation_kl`, `hinton_kd`, logit
    regression, the noisy teacher;
  * `logit_methods`: `dkd`, `logit_standardized_kd`, `dist`;
  * `features`: `fitnet`, `attention_transfer`, `similarity_preserving`;
  * `relational`: `pkt`, `rkd`;
  * `vid`: `vid`;  `crd`: `crd_init`, `crd_loss`, `CRDMemory`;
  * `amalgamation`: entropy routing, block alignment, unit-norm penalty, `union_targets`.
"""

from kd_jax.losses import amalgamation as _amalgamation
from kd_jax.losses import crd as _crd
from kd_jax.losses import features as _features
from kd_jax.losses import logit_methods as _logit_methods
from kd_jax.losses import logits as _logits
from kd_jax.losses import relational as _relational
from kd_jax.losses import vid as _vid

# Private helpers that kd_jax.seed_compat shares (same checks, same messages).
from kd_jax.losses._common import (  # noqa: F401
  _as_logits,
  _check_non_negative,
  _check_positive,
  _check_unit_interval,
)
from kd_jax.losses.amalgamation import *  # noqa: F401,F403
from kd_jax.losses.crd import *  # noqa: F401,F403
from kd_jax.losses.features import *  # noqa: F401,F403
from kd_jax.losses.logit_methods import *  # noqa: F401,F403
from kd_jax.losses.logits import *  # noqa: F401,F403
from kd_jax.losses.relational import *  # noqa: F401,F403
from kd_jax.losses.vid import *  # noqa: F401,F403

__all__ = sorted(
  _amalgamation.__all__
  + _crd.__all__
  + _features.__all__
  + _logit_methods.__all__
  + _logits.__all__
  + _relational.__all__
  + _vid.__all__
)
