"""The amalgamation train step: frozen teachers → one student, block by block, no labels.

`Plan` fixes the structure (which nets, which classes where, which blocks pair up);
`init_params` makes the trainable parameters (student and alignment projections);
`make_step` returns the pure `step(state, batch, frozen) -> (state, metrics)` that
`kd_jax.train.mesh.data_parallel_step` compiles. The step reads `batch['image']`
only: labels never reach it.

Mixed precision: `cfg.dtype` is the compute dtype of the student and the alignment
projections, `cfg.teacher_dtype` the frozen teachers'; parameters, optimizer state and
every loss stay float32 (logits and projected features are cast before the losses).
Evaluation runs the float32 plan (`Evaluator` in the pipeline).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from kd_jax import losses, models
from kd_jax.amalgamation import objective, routing
from kd_jax.train.mesh import AXIS
from kd_jax.train.steps import apply_gradients, for_data_parallel, local


@dataclasses.dataclass(frozen=True)
class Plan:
  """The static structure of one amalgamation.

  Attributes:
    student: a `ConvNet` over the union of the teachers' classes.
    teachers: frozen `ConvNet`s.
    class_index: per teacher, the positions of its classes in the student's output.
    pairs: per teacher, the tapped `(student_block, teacher_block)` pairs.
  """

  student: models.ConvNet
  teachers: tuple[models.ConvNet, ...]
  class_index: tuple[tuple[int, ...], ...]
  pairs: tuple[tuple[tuple[int, int], ...], ...]

  def __post_init__(self):
    nets = (self.student, *self.teachers)
    if not all(isinstance(net, models.ConvNet) for net in nets):
      raise ValueError(
        "amalgamation needs ConvNet student and teachers (they expose block features)"
      )
    if len(self.teachers) < 2:
      raise ValueError(f"amalgamation needs at least 2 teachers, got {len(self.teachers)}")
    if not len(self.class_index) == len(self.pairs) == len(self.teachers):
      raise ValueError(
        f"{len(self.teachers)} teachers need as many class_index and pairs entries, got "
        f"{len(self.class_index)} and {len(self.pairs)}"
      )
    for t, (teacher, pairs) in enumerate(zip(self.teachers, self.pairs)):
      if not pairs:
        raise ValueError(f"teacher {t} has no tapped block pairs")
      for s_block, t_block in pairs:
        if not 0 <= s_block < len(self.student.block_widths):
          raise ValueError(
            f"tapped student block {s_block} does not exist: the student has "
            f"{len(self.student.block_widths)} blocks (0..{len(self.student.block_widths) - 1})"
          )
        if not 0 <= t_block < len(teacher.block_widths):
          raise ValueError(
            f"tapped block {t_block} of teacher {t} does not exist: it has "
            f"{len(teacher.block_widths)} blocks (0..{len(teacher.block_widths) - 1})"
          )

  @property
  def num_classes(self) -> int:
    return self.student.num_classes

  def align_widths(self, t: int) -> tuple[int, ...]:
    """Common width of each pair: the narrower of the two blocks."""
    return tuple(
      min(self.student.block_widths[s], self.teachers[t].block_widths[b]) for s, b in self.pairs[t]
    )

  def aligners(self, t: int) -> tuple[models.BlockAlignment, models.BlockAlignment]:
    """(student-side, teacher-side) projections of teacher `t`'s block pairs."""
    widths = self.align_widths(t)
    return models.BlockAlignment(widths), models.BlockAlignment(widths)


def auto_pairs(student_blocks: int, teacher_blocks: int) -> tuple[tuple[int, int], ...]:
  """Pairs every block of the shallower net with the block at the same relative depth
  of the deeper one (first with first, last with last)."""
  n = min(student_blocks, teacher_blocks)
  if n == 1:
    return ((student_blocks - 1, teacher_blocks - 1),)
  return tuple(
    (round(i * (student_blocks - 1) / (n - 1)), round(i * (teacher_blocks - 1) / (n - 1)))
    for i in range(n)
  )


def init_params(plan: Plan, rng, image_shape: Sequence[int]) -> dict:
  """`{'params': {'student', 'align'}, 'batch_stats': {'student'}}` for a fresh run."""
  # Jitted: one compiled program instead of hundreds of eagerly dispatched ops.
  return jax.jit(lambda rng: _init_params(plan, rng, image_shape))(rng)


def _init_params(plan: Plan, rng, image_shape: Sequence[int]) -> dict:
  dummy = jnp.zeros((1, *image_shape), jnp.float32)
  student_rng, align_rng = jax.random.split(rng)
  student_vars = plan.student.init(student_rng, dummy, train=False)
  _, student_feats = plan.student.apply(student_vars, dummy, train=False)
  align = {}
  for t, teacher in enumerate(plan.teachers):
    _, teacher_feats = jax.eval_shape(
      lambda x, teacher=teacher: teacher.init_with_output(jax.random.key(0), x, train=False)[0],
      dummy,
    )
    s_side, t_side = plan.aligners(t)
    s_rng, t_rng = jax.random.split(jax.random.fold_in(align_rng, t))
    align[f"teacher_{t}"] = {
      "student": s_side.init(s_rng, [student_feats[s] for s, _ in plan.pairs[t]])["params"],
      "teacher": t_side.init(
        t_rng, [jnp.zeros(teacher_feats[b].shape, jnp.float32) for _, b in plan.pairs[t]]
      )["params"],
    }
  return {
    "params": {"student": student_vars["params"], "align": align},
    "batch_stats": {"student": student_vars.get("batch_stats", {})},
  }


def with_dtypes(plan: Plan, *, dtype: str = "float32", teacher_dtype: str = "float32") -> Plan:
  """The same plan computing in `dtype` (student) and `teacher_dtype` (teachers)."""
  return dataclasses.replace(
    plan,
    student=plan.student.clone(dtype=dtype),
    teachers=tuple(t.clone(dtype=teacher_dtype) for t in plan.teachers),
  )


def teacher_outputs(plan: Plan, teacher_variables: Sequence, images):
  """Logits (float32), block features and penultimate features of every frozen teacher."""
  logits, features = [], []
  for teacher, variables in zip(plan.teachers, teacher_variables):
    z, feats = teacher.apply(variables, images, train=False)
    logits.append(lax.stop_gradient(z.astype(jnp.float32)))
    features.append(tuple(lax.stop_gradient(f) for f in feats))
  return logits, features, [models.penultimate(f).astype(jnp.float32) for f in features]


def pooled_blocks(features, grid: int = 1) -> jax.Array:
  """What `selection=pool_lda` reads of a teacher: every block's output average-pooled over
  a `grid × grid` of near-equal cells (fewer along a side shorter than `grid`; 1 is global
  average pooling), concatenated block by block, cell by cell in row-major order:
  `[B, Σ_k cells_k · C_k]`. All blocks, not the last alone, and a grid rather than a
  global average: where on the image a feature fires tells apart classes such as T-shirts
  and pullovers (docs/results.md)."""
  pooled = []
  for f in features:
    f = f.astype(jnp.float32)
    rows = np.array_split(np.arange(f.shape[1]), min(grid, f.shape[1]))
    cols = np.array_split(np.arange(f.shape[2]), min(grid, f.shape[2]))
    pooled += [
      jnp.mean(f[:, r[0] : r[-1] + 1, c[0] : c[-1] + 1], axis=(1, 2)) for r in rows for c in cols
    ]
  return jnp.concatenate(pooled, axis=-1)


def routing_weights(cfg, logits, penultimate, frozen, *, blocks=None) -> jax.Array:
  """`[B, T]` routing weights of the configured selection rule (no gradient).

  `blocks`: per teacher, its block features (needed by `pool_lda`)."""
  if cfg.selection == "pool_lda":
    penultimate = [pooled_blocks(f, cfg.get("pool_grid", 1)) for f in blocks]
  scores = routing.teacher_scores(
    cfg.selection,
    logits=logits,
    features=penultimate,
    cards=frozen.get("cards"),
    energy_stats=frozen.get("energy_stats"),
    pool_router=frozen.get("pool_router"),
  )
  return lax.stop_gradient(
    routing.route(scores, mode=cfg.routing, temperature=cfg.routing_temperature)
  )


def make_step(plan: Plan, cfg, tx: optax.GradientTransformation, *, total_steps: int | None = None):
  """The pure amalgamation step (see the module docstring and `objective`).

  `frozen` holds `teachers` (a list of variables), optional `cards` (a list of
  `routing.TeacherCard`) and optional `energy_stats`. `total_steps` places the
  self-training ramp (needed when `cfg.self_training > 0`).
  """
  if cfg.logit_loss not in objective.LOGIT_LOSSES:
    raise ValueError(
      f"unknown logit_loss {cfg.logit_loss!r}; choose one of {objective.LOGIT_LOSSES}"
    )
  dtype = cfg.get("dtype", "float32")
  plan = with_dtypes(plan, dtype=dtype, teacher_dtype=cfg.get("teacher_dtype", "float32"))
  self_training = cfg.get("self_training", 0.0)
  if self_training:
    if total_steps is None:
      raise ValueError("self_training needs total_steps (where its ramp lies)")
    classes = [c for index in plan.class_index for c in index]
    if len(set(classes)) != len(classes):  # the dual stage's sources share their task's classes
      raise ValueError(
        "self_training needs teachers with disjoint classes: their tasks must differ"
      )
  student = for_data_parallel(plan.student)
  aligners = [
    tuple(a.clone(dtype=dtype) for a in plan.aligners(t)) for t in range(len(plan.teachers))
  ]

  def step(state, batch, frozen):
    images = batch["image"]
    t_logits, t_feats, t_penultimate = teacher_outputs(plan, frozen["teachers"], images)
    routed = routing_weights(cfg, t_logits, t_penultimate, frozen, blocks=t_feats)

    def loss_fn(params):
      (s_logits, s_feats), updates = student.apply(
        {"params": params["student"], "batch_stats": state.batch_stats["student"]},
        images,
        train=True,
        mutable=["batch_stats"],
      )
      s_logits = s_logits.astype(jnp.float32)
      weights = routed
      if self_training:  # the student's own task probabilities join the routing
        mix = objective.self_training_mix(
          state.step,
          total_steps=total_steps,
          weight=self_training,
          ramp=(cfg.self_training_start, cfg.self_training_end),
        )
        weights = objective.self_trained_weights(routed, s_logits, plan.class_index, mix=mix)
      metrics, feature_loss, kernels = {}, 0.0, []
      for t, (s_side, t_side) in enumerate(aligners):
        p = params["align"][f"teacher_{t}"]
        s_proj = s_side.apply({"params": p["student"]}, [s_feats[s] for s, _ in plan.pairs[t]])
        t_proj = t_side.apply({"params": p["teacher"]}, [t_feats[t][b] for _, b in plan.pairs[t]])
        s_proj, t_proj = ([f.astype(jnp.float32) for f in proj] for proj in (s_proj, t_proj))
        per_block = [
          losses.block_alignment_loss([objective.resize_like(s, r)], [r])
          for s, r in zip(s_proj, t_proj)
        ]
        for n, per_sample in enumerate(per_block):
          metrics[f"align/teacher_{t}/block_{n}"] = jnp.mean(weights[:, t] * per_sample)
        feature_loss += jnp.mean(weights[:, t] * jnp.mean(jnp.stack(per_block), axis=0))
        kernels += jax.tree.leaves(p["teacher"]) if not cfg.seed_compat else jax.tree.leaves(p)

      if cfg.seed_compat:
        logit_loss = objective.seed_logit_loss(
          s_logits, t_logits, weights, plan.class_index, num_classes=plan.num_classes
        )
        penalty = objective.seed_regularizer(kernels)
      else:
        if cfg.logit_loss == "kl":
          targets = objective.union_targets(
            t_logits,
            weights,
            plan.class_index,
            num_classes=plan.num_classes,
            temperature=cfg.temperature,
          )
          logit_loss = objective.soft_target_kl(s_logits, targets, temperature=cfg.temperature)
        else:
          logit_loss = objective.routed_logit_regression(
            s_logits, t_logits, weights, plan.class_index
          )
        penalty = sum(losses.unit_norm_penalty(k) for k in kernels)

      loss = (
        cfg.feature_weight * feature_loss
        + cfg.logit_weight * logit_loss
        + cfg.unit_norm_weight * penalty
      )
      metrics.update(
        loss=loss, feature_loss=feature_loss, logit_loss=logit_loss, unit_norm_penalty=penalty
      )
      if self_training:  # how often the student's own view changes the routed teacher
        metrics["self_training/overruled"] = jnp.mean(
          jnp.argmax(weights, -1) != jnp.argmax(routed, -1)
        )
      return loss, (metrics, updates)

    (_, (metrics, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(local(state.params))
    batch_stats = (
      {"student": updates["batch_stats"]} if "batch_stats" in updates else state.batch_stats
    )
    terms = {
      name: metrics[name] for name in ("feature_loss", "logit_loss", "unit_norm_penalty", "loss")
    }
    new_state, nonfinite = apply_gradients(state, tx, grads, batch_stats=batch_stats, terms=terms)
    for t in range(len(plan.teachers)):
      metrics[f"routed_to/teacher_{t}"] = jnp.mean(routed[:, t])
    return new_state, {**lax.pmean(metrics, AXIS), "nonfinite": nonfinite}

  return step
