"""The method zoo in the trainer: `dkd`, `logit_standardized_kd`, `dist`, `fitnet`,
`attention_transfer`, `pkt`, `similarity_preserving`, `rkd`, `vid`, `crd`.

Each method is `ce_weight · cross_entropy + weight · term`, `term` its loss from
`kd_jax.losses` on the logits or on the feature pairs of `distill.<method>.feature_pairs`
(`'student tap:teacher tap+...'`, taps of `kd_jax.models.features`). A `Plan` holds the
method, its hyper-parameters and the taps' shapes, checked against both models before
anything is written.

The train state of a zoo run: `params = {'student': …, 'aux': …}` (`aux`: FitNets' hint
regressors `hint_<i>`, VID's regressors `vid_<i>`, CRD's heads `embed_student` and
`embed_teacher`, trained with the student) and `batch_stats` = `{'student': …}` (when the
student has BatchNorm), `{'aux': …}` (the hint regressors' BatchNorm) and `{'crd': …}`
(CRD's memory banks, `kd_jax.losses.CRDMemory` as a dict). Everything is checkpointed with the
state; `kd_jax.checkpoint.load` returns the student alone (its entry's `subtree='student'`).

Data parallelism: what couples the examples of a batch sees the whole global batch, so that
1, 2 or 4 devices train the same run: the batch-relational terms (DIST, PKT, similarity
preserving, RKD) are computed on the gathered global batch, and CRD's memories are updated
with the indices and embeddings of the whole global batch (every replica's memory stays the
same), its normaliser `Z` from the global batch's scores and each example's negatives from
its global position. The teacher's outputs are cached where they fit (`kd_jax.train.zoo_cache`).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kd_jax import losses, models
from kd_jax.choices import ZOO_METHODS
from kd_jax.config_fields import parse_feature_pairs
from kd_jax.errors import UsageError
from kd_jax.models import taps as taps_lib
from kd_jax.train import steps
from kd_jax.train.mesh import AXIS
from kd_jax.train.state import TrainState
from kd_jax.train.zoo_defaults import DEFAULT_CACHE_BUDGET_MB, DEFAULTS

__all__ = ["DEFAULTS", "DEFAULT_CACHE_BUDGET_MB", "Plan", "make_plan", "make_step"]

# Losses that relate the examples of a batch to each other: computed on the global batch.
RELATIONAL = ("dist", "pkt", "similarity_preserving", "rkd")


def is_zoo(method: str) -> bool:
  return method in ZOO_METHODS


@dataclasses.dataclass(frozen=True)
class Plan:
  """One zoo method between a student and a teacher, checked (`make_plan`)."""

  method: str
  hparams: dict
  student: nn.Module
  pairs: tuple[tuple[str, str], ...]
  student_shapes: dict
  teacher_shapes: dict
  num_examples: int  # CRD's memory rows: the examples of the training split
  steps_per_epoch: int
  hinton: dict  # FitNets' KD stage: `distill.temperature`, `distill.soft_weight`

  @property
  def student_taps(self) -> tuple[str, ...]:
    return tuple(dict.fromkeys(s for s, _ in self.pairs))

  @property
  def teacher_taps(self) -> tuple[str, ...]:
    return tuple(dict.fromkeys(t for _, t in self.pairs))

  def aux_modules(self) -> dict[str, nn.Module]:
    """The method's trainable modules besides the student, by name."""
    h, shapes = self.hparams, self.teacher_shapes
    if self.method == "fitnet":
      return {
        f"hint_{i}": models.HintRegressor(shapes[t][-1], tuple(shapes[t][:2]))
        for i, (_, t) in enumerate(self.pairs)
      }
    if self.method == "vid":
      return {
        f"vid_{i}": models.VIDRegressor(shapes[t][-1], init_variance=h["init_variance"])
        for i, (_, t) in enumerate(self.pairs)
      }
    if self.method == "crd":
      width = h["embedding_dim"]
      return {"embed_student": models.CRDEmbed(width), "embed_teacher": models.CRDEmbed(width)}
    return {}


def make_plan(config, student, teacher, image_shape, *, num_examples, steps_per_epoch) -> Plan:
  """Checks `config.distill.<method>` against the two models; `UsageError` names the field."""
  method = config.method
  hparams = {**DEFAULTS[method], **config.distill.get(method, {})}
  field = f"--config.distill.{method}.feature_pairs"
  pairs = ()
  if "feature_pairs" in hparams:
    text = hparams["feature_pairs"]
    pairs = tuple(parse_feature_pairs(text))
    shapes = {}
    for side, model, names in (
      ("student", student, [s for s, _ in pairs]),
      ("teacher", teacher, [t for _, t in pairs]),
    ):
      try:  # sown stages and module paths alike
        shapes[side] = taps_lib.tap_shapes(model, image_shape, names)
      except KeyError as e:
        raise UsageError(f"{field}={text!r}: the {side}'s {e.args[0]}") from None
    student_shapes, teacher_shapes = shapes["student"], shapes["teacher"]
    for s, t in pairs:
      problem = _pair_problem(method, student_shapes[s], teacher_shapes[t])
      if problem:
        raise UsageError(
          f"{field}={text!r}: {s} {list(student_shapes[s])} → {t} {list(teacher_shapes[t])}: "
          f"{problem}"
        )
  else:
    student_shapes, teacher_shapes = {}, {}
  distill = config.distill
  return Plan(
    method=method,
    hparams=hparams,
    student=student,
    pairs=pairs,
    student_shapes={s: student_shapes[s] for s, _ in pairs},
    teacher_shapes={t: teacher_shapes[t] for _, t in pairs},
    num_examples=int(num_examples),
    steps_per_epoch=int(steps_per_epoch),
    hinton={"temperature": distill.temperature, "soft_weight": distill.soft_weight},
  )


def _pair_problem(method: str, s: tuple, t: tuple) -> str | None:
  """Why a student map of shape `s` cannot be distilled into a teacher map `t` (per example)."""
  if method in ("attention_transfer", "fitnet") and (len(s) != 3 or len(t) != 3):
    return f"{method} needs [H, W, C] feature maps on both sides"
  if method == "vid" and (len(s) != len(t) or len(s) not in (1, 3)):
    return "vid needs maps of the same rank ([H, W, C] or vectors) on both sides"
  if method == "fitnet":
    (sh, sw), (th, tw) = s[:2], t[:2]
    if not (sh == 2 * th or 2 * sh == th or (sh >= th and sw >= tw)):
      return (
        "FitNets' regressor needs a teacher map no larger than the student's, or half or twice it"
      )
  return None


def init_variables(plan: Plan, key, student_variables, image_shape) -> dict:
  """The state's variables of a fresh zoo run (see the module docstring); the student's are
  `student_variables` as `loop.init_state` draws them."""
  params = {"student": student_variables["params"]}
  batch_stats = {}
  if student_variables.get("batch_stats"):
    batch_stats["student"] = student_variables["batch_stats"]
  modules = plan.aux_modules()
  aux_params, aux_stats = {}, {}
  for i, (name, module) in enumerate(modules.items()):
    k = jax.random.fold_in(key, i)
    s_tap, t_tap = plan.pairs[min(i, len(plan.pairs) - 1)]
    shape = plan.teacher_shapes[t_tap] if name == "embed_teacher" else plan.student_shapes[s_tap]
    dummy = jnp.zeros((1, *_as_map(plan, shape)), jnp.float32)
    variables = jax.jit(lambda k, x, m=module: _init(m, k, x))(k, dummy)
    aux_params[name] = variables["params"]
    if variables.get("batch_stats"):
      aux_stats[name] = variables["batch_stats"]
  if aux_params:
    params["aux"] = aux_params
  if aux_stats:
    batch_stats["aux"] = aux_stats
  if plan.method == "crd":
    memory = losses.crd_init(
      jax.random.fold_in(key, len(modules)),
      num_samples=plan.num_examples,
      embedding_dim=plan.hparams["embedding_dim"],
    )
    # Separate host copies: the two unset norms are one array, and a state must not hold a
    # buffer twice (the step donates it).
    batch_stats["crd"] = {k: np.array(v) for k, v in memory._asdict().items()}
  return {"params": params, "batch_stats": batch_stats}


def _init(module, key, x):
  if isinstance(module, models.HintRegressor):
    return module.init(key, x, train=False)
  return module.init(key, x)


def _as_map(plan: Plan, shape) -> tuple:
  """VID treats a vector `[D]` as a 1×1 map."""
  return (1, 1, *shape) if plan.method == "vid" and len(shape) == 1 else tuple(shape)


# ------------------------------------------------------------------------ the step


def global_batch(x: jax.Array, *, differentiable: bool = False) -> jax.Array:
  """This shard's `x` `[b, ...]` → the global batch `[n·b, ...]`, the same on every device.

  A `psum` of each shard placed at its offset: an invariant value (`all_gather`'s is
  'varying'), with no gradient. With `differentiable`, this shard's own rows are the live
  `x`: the gradient of a loss of the result reaches this shard's rows only, with no
  collective in the backward pass; `_scaled_for_gradient` then makes the devices' mean
  gradient the global loss's.
  """
  n, b = lax.axis_size(AXIS), x.shape[0]
  offset = lax.axis_index(AXIS) * b
  placed = jnp.zeros((n * b, *x.shape[1:]), x.dtype)
  placed = lax.dynamic_update_slice_in_dim(placed, lax.stop_gradient(x), offset, 0)
  whole = lax.psum(placed, AXIS)
  if differentiable:
    whole = lax.dynamic_update_slice_in_dim(whole, x, offset, 0)
  return whole


def _scaled_for_gradient(loss: jax.Array) -> jax.Array:
  """`loss`'s value with `n ×` its gradient (`n` devices; see `global_batch`)."""
  n = lax.axis_size(AXIS)
  return loss + (n - 1) * (loss - lax.stop_gradient(loss))


def _flat(x):
  return x.reshape((x.shape[0], -1))


def make_step(plan: Plan, *, tx, teacher: nn.Module | None, teacher_dropout: bool = False):
  """The pure step `step(state, batch, frozen) -> (state, metrics)` of a zoo method.

  `batch` holds `'image'`, `'label'` and, for CRD, `'index'`; with the teacher cached,
  `'teacher_logits'` and `'teacher_features'` (`{tap: [b, ...]}`), else `teacher` runs here
  on `frozen` (its variables).
  """
  student = steps.for_data_parallel(plan.student)
  teacher = None if teacher is None else steps.for_data_parallel(teacher)
  modules = {k: steps.for_data_parallel(m) for k, m in plan.aux_modules().items()}
  h = plan.hparams
  hint_steps = h.get("hint_epochs", 0) * plan.steps_per_epoch

  def step(state, batch, frozen):
    dropout_rng, loss_rng, teacher_rng = jax.random.split(state.step_rng(), 3)
    images, labels = batch["image"], batch["label"]
    t_logits, t_feats = batch.get("teacher_logits"), batch.get("teacher_features")
    if t_logits is None:
      rngs = {"dropout": teacher_rng} if teacher_dropout else None
      out, t_feats, _ = taps_lib.features(
        teacher, frozen, images, taps=plan.teacher_taps, train=teacher_dropout, rngs=rngs
      )
      t_logits, t_feats = lax.stop_gradient((models.logits_of(out), t_feats))
    t_logits = t_logits.astype(jnp.float32)
    t_feats = {k: v.astype(jnp.float32) for k, v in (t_feats or {}).items()}
    stats = state.batch_stats

    def loss_fn(params):
      variables = {"params": params["student"]}
      if "student" in stats:
        variables["batch_stats"] = stats["student"]
      out, s_feats, updates = taps_lib.features(
        student,
        variables,
        images,
        taps=plan.student_taps,
        train=True,
        rngs={"dropout": dropout_rng},
        mutable=["batch_stats"],
      )
      logits = models.logits_of(out).astype(jnp.float32)
      s_feats = {k: v.astype(jnp.float32) for k, v in s_feats.items()}
      pairs = [(s_feats[s], t_feats[t]) for s, t in plan.pairs]
      term, new_stats = _term(
        plan, modules, params.get("aux", {}), stats, logits, t_logits, labels, pairs,
        key=loss_rng, indices=batch.get("index"), step=state.step,
      )  # fmt: skip
      ce = losses.cross_entropy(logits, labels)
      loss = h["ce_weight"] * ce + h["weight"] * term
      if hint_steps:  # FitNets' two stages: the hint alone, then Hinton KD
        kd = losses.hinton_kd(logits, t_logits, labels, **plan.hinton)
        loss = jnp.where(state.step < hint_steps, h["weight"] * term, kd)
      if updates.get("batch_stats"):
        new_stats["student"] = updates["batch_stats"]
      return loss, (logits, new_stats, term)

    (loss, (logits, new_stats, term)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      steps.local(state.params)
    )
    new_state, nonfinite = steps.apply_gradients(
      state, tx, grads, batch_stats=new_stats, terms={"loss": loss}
    )
    prediction = jnp.argmax(logits, -1)
    metrics = {
      "loss": loss,
      "distill_loss": term,
      "accuracy": jnp.mean(prediction == labels),
      "teacher_agreement": jnp.mean(prediction == jnp.argmax(t_logits, -1)),
    }
    return new_state, {**lax.pmean(metrics, AXIS), "nonfinite": nonfinite}

  return step


def _term(plan, modules, aux, stats, logits, t_logits, labels, pairs, *, key, indices, step):
  """The method's distillation term (unweighted) and the new `batch_stats`."""
  method, h = plan.method, plan.hparams
  new_stats = {k: v for k, v in stats.items() if k != "student"}
  if method == "dkd":
    epoch = (step // plan.steps_per_epoch + 1).astype(jnp.float32)  # mdistiller counts from 1
    ramp = jnp.minimum(epoch / h["warmup_epochs"], 1.0) if h["warmup_epochs"] else 1.0
    kw = {k: h[k] for k in ("alpha", "beta", "temperature")}
    return ramp * losses.dkd(logits, t_logits, labels, **kw), new_stats
  if method == "logit_standardized_kd":
    return losses.logit_standardized_kd(logits, t_logits, temperature=h["temperature"]), new_stats
  if method in RELATIONAL:
    return _relational(plan, logits, t_logits, pairs), new_stats
  if method == "attention_transfer":
    matched = [taps_lib.match_spatial(s, t) for s, t in pairs]
    term = losses.attention_transfer(
      [s for s, _ in matched], [t for _, t in matched], p=h["p"], mode=h["mode"]
    )
    return term, new_stats
  if method == "fitnet":
    term, aux_stats = 0.0, dict(stats.get("aux", {}))
    for i, (s, t) in enumerate(pairs):
      name = f"hint_{i}"
      hint, updates = modules[name].apply(
        {"params": aux[name], "batch_stats": aux_stats[name]}, s, train=True,
        mutable=["batch_stats"],
      )  # fmt: skip
      aux_stats[name] = updates["batch_stats"]
      term = term + losses.fitnet(hint.astype(jnp.float32), t)
    new_stats["aux"] = aux_stats
    return term, new_stats
  if method == "vid":
    term = 0.0
    for i, (s, t) in enumerate(pairs):
      if s.ndim == 2:
        s, t = s[:, None, None, :], t[:, None, None, :]
      s, t = taps_lib.match_spatial(s, t)
      mean, variance = modules[f"vid_{i}"].apply({"params": aux[f"vid_{i}"]}, s)
      term = term + losses.vid(mean.astype(jnp.float32), variance, t)
    return term, new_stats
  if method == "crd":
    [(s, t)] = pairs
    e_s = modules["embed_student"].apply({"params": aux["embed_student"]}, s)
    e_t = modules["embed_teacher"].apply({"params": aux["embed_teacher"]}, t)
    term, memory = crd_step(plan, losses.CRDMemory(**stats["crd"]), e_s, e_t, indices, key)
    new_stats["crd"] = memory._asdict()
    return term, new_stats
  raise ValueError(f"unknown zoo method {method!r}")


def _relational(plan, logits, t_logits, pairs):
  """A batch-relational term on the global batch (see the module docstring)."""
  method, h = plan.method, plan.hparams
  if method == "dist":
    s, t = global_batch(logits, differentiable=True), global_batch(t_logits)
    kw = {k: h[k] for k in ("beta", "gamma", "temperature")}
    return _scaled_for_gradient(losses.dist(s, t, **kw))
  gathered = [(global_batch(s, differentiable=True), global_batch(t)) for s, t in pairs]
  if method == "similarity_preserving":
    term = losses.similarity_preserving([s for s, _ in gathered], [t for _, t in gathered])
  elif method == "pkt":
    term = sum(losses.pkt(_flat(s), _flat(t)) for s, t in gathered)
  else:
    kw = {k: h[k] for k in ("distance_weight", "angle_weight")}
    term = sum(losses.rkd(_flat(s), _flat(t), **kw) for s, t in gathered)
  return _scaled_for_gradient(term)


def crd_step(plan, memory, e_s, e_t, indices, key):
  """CRD on this shard with the global batch's memory update (see the module docstring).

  The loss is a mean over examples of terms that depend on the example, the memory and `Z`
  alone, so each shard computes its own; negatives are drawn for the global batch from `key`
  and sliced, `Z` (set once) comes from the global batch's scores, and the banks are
  updated with the whole global batch, as `kd_jax.losses.crd_loss` on one device does.
  """
  h = plan.hparams
  b = e_s.shape[0]
  all_indices = global_batch(indices.astype(jnp.int32))
  negatives = jax.random.randint(
    key, (all_indices.shape[0], h["num_negatives"]), 0, plan.num_examples
  ).astype(jnp.int32)
  mine = lax.dynamic_slice_in_dim(negatives, lax.axis_index(AXIS) * b, b, 0)
  contrast = jnp.concatenate([indices.astype(jnp.int32)[:, None], mine], axis=1)

  def global_norm(bank, e, stored):
    raw = jnp.einsum("bkd,bd->bk", lax.stop_gradient(bank)[contrast], lax.stop_gradient(e))
    raw = raw / h["temperature"]
    top = lax.pmax(jnp.max(raw), AXIS)
    total = lax.psum(jnp.sum(jnp.exp(raw - top)), AXIS)
    size = lax.psum(raw.size, AXIS)
    first = jnp.exp(top + jnp.log(total) - jnp.log(size) + jnp.log(plan.num_examples))
    return jnp.where(stored < 0, first, stored).astype(jnp.float32)

  memory = memory._replace(
    student_norm=global_norm(memory.teacher, e_s, memory.student_norm),
    teacher_norm=global_norm(memory.student, e_t, memory.teacher_norm),
  )
  loss, _ = losses.crd_loss(
    e_s, e_t, indices, memory, temperature=h["temperature"], momentum=h["momentum"],
    contrast_indices=contrast,
  )  # fmt: skip

  def update(bank, e):
    rows = bank[all_indices] * h["momentum"] + global_batch(e) * (1.0 - h["momentum"])
    rows = rows / jnp.sqrt(jnp.sum(rows * rows, axis=-1, keepdims=True))
    return bank.at[all_indices].set(rows)

  new_memory = memory._replace(
    student=update(memory.student, e_s), teacher=update(memory.teacher, e_t)
  )
  return loss, new_memory


def init_state(plan: Plan, tx, seed: int, image_shape) -> TrainState:
  """A fresh zoo state: the student drawn as `loop.init_state` draws it (the same student as
  a supervised run of the seed), the auxiliary modules and memories from a key folded off it."""
  from kd_jax.train import loop  # pylint: disable=g-import-not-at-top  (loop imports data)

  student = loop.init_state(plan.student, tx, seed, image_shape)
  init_rng = jax.random.split(jax.random.PRNGKey(seed))[0]
  variables = init_variables(plan, jax.random.fold_in(init_rng, 1), student.variables, image_shape)
  return TrainState.create(variables=variables, tx=tx, rng=student.rng)


def student_state(state):
  """The student's part of a zoo run's state (`params['student']`, its BatchNorm
  statistics), for evaluation and results."""
  return state.replace(
    params=state.params["student"], batch_stats=state.batch_stats.get("student", {})
  )
