"""Training state: one pytree that a checkpoint saves and a train step maps to the next."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


class TrainState(flax.struct.PyTreeNode):
  """Everything that changes during training, and nothing else.

  The model and the optimiser are not stored here: the step factories close over
  them, so the state stays a plain pytree of arrays that Orbax saves as it is.

  Attributes:
    step: number of optimiser updates applied so far (int32 scalar).
    params: trainable parameters.
    batch_stats: BatchNorm running statistics (an empty dict for models without).
    opt_state: the optax optimiser state.
    rng: raw uint32 PRNG key; the step's key is `fold_in(rng, step)`, so a resumed
      run draws exactly the random numbers an uninterrupted one would.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array

  @classmethod
  def create(cls, *, variables, tx: optax.GradientTransformation, rng) -> "TrainState":
    params = variables["params"]
    return cls(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables.get("batch_stats", {}),
      opt_state=tx.init(params),
      rng=jnp.asarray(rng, jnp.uint32),
    )

  @property
  def variables(self) -> dict:
    """The variables `model.apply` takes."""
    if self.batch_stats:
      return {"params": self.params, "batch_stats": self.batch_stats}
    return {"params": self.params}

  def step_rng(self) -> jax.Array:
    return jax.random.fold_in(self.rng, self.step)
