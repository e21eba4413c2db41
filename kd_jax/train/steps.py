"""One pure train step per method: supervised, logit regression, noisy teacher, Hinton KD.

A step is `step(state, batch, frozen) -> (state, metrics)`, run data-parallel by
`mesh.data_parallel_step`: `batch` is this device's shard of
`{'image': [b, H, W, C], 'label': [b]}`, `frozen` the teacher's variables (an empty
dict for supervised training). The teacher is a frozen input: it runs inside the
step (batched with the student), gets no gradient and is never updated. A batch that
carries `'teacher_logits': [b, C]` (the loop's cache of a deterministic teacher's
outputs) is distilled from those instead, and the step needs no teacher.

Random numbers (dropout masks, the noisy teacher's noise) are a function of the seed, the
step and each example's position in the global batch, never of the device that holds it:
1, 2 or 4 devices train the same run (`kd_jax.models.dropout`).

Mixed precision: a model built with `dtype='bfloat16'` computes in it; parameters and the
optimizer state stay float32, and logits are cast to float32 before every loss.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

from kd_jax import losses, models, seed_compat
from kd_jax.choices import METHODS, ZOO_METHODS
from kd_jax.models.dropout import example_keys
from kd_jax.train.mesh import AXIS
from kd_jax.train.state import TrainState

# What a step checks for finiteness, one bit each in its `metrics['nonfinite']` mask: the
# loss terms (the amalgamation step has several), the averaged gradient, the updated state.
NONFINITE_TERMS = ("loss", "feature_loss", "logit_loss", "unit_norm_penalty", "gradient", "state")

# objective(student_logits, teacher_logits, labels, keys) -> scalar loss; `keys` holds one
# PRNG key per example (`[B]`), so that an example's noise does not depend on its device.
Objective = Callable[[jax.Array, jax.Array | None, jax.Array, jax.Array], jax.Array]


def make_objective(method: str, distill) -> Objective:
  """The loss of `method`, its hyper-parameters read from the `distill` config."""
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
  if method in ZOO_METHODS:
    raise ValueError(f"{method!r} is a zoo method: its step is kd_jax.train.zoo.make_step")
  seed = bool(distill.get("seed_compat", False))
  if method == "ground_truth":
    return lambda s, t, y, keys: losses.cross_entropy(s, y)
  if method == "logit_regression":
    return lambda s, t, y, keys: losses.logit_regression(s, t)
  if method == "noisy_teacher":
    noise = seed_compat.seed_noisy_logits if seed else losses.noisy_logits
    kw = dict(noise_ratio=distill.noise_ratio, noise_std=distill.noise_std)
    # Each example's noise from its own key: a one-row batch each.
    per_example = jax.vmap(lambda key, row: noise(key, row[None], **kw)[0])
    return lambda s, t, y, keys: losses.logit_regression(s, per_example(keys, t))
  if seed:
    return lambda s, t, y, keys: seed_compat.seed_kd_loss(
      s, t, y, temperature=distill.temperature, hard_weight=1.0 - distill.soft_weight
    )
  return lambda s, t, y, keys: losses.hinton_kd(
    s, t, y, temperature=distill.temperature, soft_weight=distill.soft_weight
  )


def for_data_parallel(model: nn.Module) -> nn.Module:
  """The same model with BatchNorm statistics averaged over the 'data' axis and dropout
  masks drawn by each example's global position (see the module docstring)."""
  fields = getattr(model, "__dataclass_fields__", {})
  return model.clone(
    **{name: AXIS for name in ("bn_axis_name", "dropout_axis_name") if name in fields}
  )


def apply_model(model: nn.Module, variables, images, *, train: bool, rng=None) -> jax.Array:
  """Logits of `model`, discarding BatchNorm updates (for frozen and evaluated models)."""
  rngs = {"dropout": rng} if rng is not None else {}
  if train:
    out, _ = model.apply(variables, images, train=True, rngs=rngs, mutable=["batch_stats"])
  else:
    out = model.apply(variables, images, train=False)
  return models.logits_of(out).astype(jnp.float32)


def make_train_step(
  *,
  student: nn.Module,
  tx: optax.GradientTransformation,
  objective: Objective,
  teacher: nn.Module | None = None,
  teacher_dropout: bool = False,
) -> Callable:
  """Builds the pure step for one method (see the module docstring)."""
  student = for_data_parallel(student)
  teacher = None if teacher is None else for_data_parallel(teacher)

  def step(state: TrainState, batch, frozen):
    # The same key on every device: the models and the noise fold in each example's position.
    dropout_rng, loss_rng, teacher_rng = jax.random.split(state.step_rng(), 3)
    images, labels = batch["image"], batch["label"]
    loss_keys = example_keys(loss_rng, images.shape[0], AXIS)

    teacher_logits = batch.get("teacher_logits")  # cached by the loop, or computed here
    if teacher_logits is None and teacher is not None:
      teacher_logits = lax.stop_gradient(
        apply_model(teacher, frozen, images, train=teacher_dropout, rng=teacher_rng)
      )

    def loss_fn(params):
      variables = {"params": params}
      if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
      out, updates = student.apply(
        variables, images, train=True, rngs={"dropout": dropout_rng}, mutable=["batch_stats"]
      )
      logits = models.logits_of(out).astype(jnp.float32)
      return objective(logits, teacher_logits, labels, loss_keys), (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      local(state.params)
    )
    new_state, nonfinite = apply_gradients(
      state,
      tx,
      grads,
      batch_stats=updates.get("batch_stats", state.batch_stats),
      terms={"loss": loss},
    )
    prediction = jnp.argmax(logits, -1)
    metrics = {"loss": loss, "accuracy": jnp.mean(prediction == labels)}
    if teacher_logits is not None:
      metrics["teacher_agreement"] = jnp.mean(prediction == jnp.argmax(teacher_logits, -1))
    return new_state, {**lax.pmean(metrics, AXIS), "nonfinite": nonfinite}

  return step


def local(params):
  """This device's copy of replicated `params`, to differentiate inside the step's shard_map.

  The replicated state's parameters are 'invariant' over the 'data' axis: differentiated as
  they are, shard_map would sum the shards' gradients itself (n × the global gradient) before
  `apply_gradients` averages them. Marked 'varying', each device gets its own shard's gradient.
  """
  return lax.pcast(params, AXIS, to="varying")


def apply_gradients(state: TrainState, tx, grads, *, batch_stats, terms: dict):
  """The update every step ends with; returns `(state, nonfinite mask)`.

  Averages this shard's `grads` over the 'data' axis (equal shards: the mean of the shard
  gradients is the global one), applies the optimizer, installs the new BatchNorm
  `batch_stats`, and keeps the old state if a loss term in `terms`, the gradient or the new
  state is not finite (`keep_if_finite`).
  """
  grads = lax.pmean(grads, AXIS)
  param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(
    step=state.step + 1,
    params=optax.apply_updates(state.params, param_updates),
    batch_stats=batch_stats,
    opt_state=opt_state,
  )
  return keep_if_finite(state, new_state, {**terms, "gradient": grads})


def all_finite(tree) -> jax.Array:
  """Whether every floating-point value in `tree` is finite (a bool scalar)."""
  leaves = [
    jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def keep_if_finite(state, new_state, terms):
  """The divergence guard of every step (inside a `shard_map` over the 'data' axis).

  Returns `(state, mask)`: `new_state` when the `terms` (loss terms, the gradient) and
  `new_state` itself are finite on every device, else the old state with only its step
  counter advanced (optax.apply_if_finite's rule, by selection rather than `lax.cond`);
  `mask` is an int32 with bit `NONFINITE_TERMS.index(name)` set for each non-finite term.
  The loop reads the mask to stop the run ('stop') or to count the skipped step ('skip'):
  either way no non-finite value ever enters the state, so none is ever saved.
  """
  flags = {name: ~all_finite(value) for name, value in {**terms, "state": new_state}.items()}
  # A loss is this device's own: any device's non-finite value counts.
  bits = lax.pmax(jnp.stack([flags[name].astype(jnp.int32) for name in flags]), AXIS)
  mask = sum(bits[i] << NONFINITE_TERMS.index(name) for i, name in enumerate(flags))
  finite = mask == 0
  kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
  return kept.replace(step=new_state.step), mask


def nonfinite_terms(mask: int) -> list[str]:
  """The names of the terms whose bits are set in a step's `nonfinite` mask."""
  return [name for i, name in enumerate(NONFINITE_TERMS) if int(mask) >> i & 1]


def make_optimizer(optim, *, total_steps: int) -> optax.GradientTransformation:
  """Adam with a step decay: lr × `decay_factor` from `decay_at` (a fraction) of training.

  The default (1e-3, ×0.1 at 80 %) is the distillation seed's schedule.
  """
  boundary = max(1, int(round(optim.decay_at * total_steps)))
  schedule = optax.piecewise_constant_schedule(optim.learning_rate, {boundary: optim.decay_factor})
  if optim.get("weight_decay", 0.0):
    return optax.adamw(schedule, weight_decay=optim.weight_decay)
  return optax.adam(schedule)
