"""Tests of kd_jax.amalgamation: the objective against NumPy, the block pairing and plan
checks, the label-free train step (frozen teachers, every routing rule and logit loss,
the unit-norm penalty, data parallelism) and the pipeline's refusal of bad input."""

import copy
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from amalgamation_fixtures import (
  amalgamate_config,
  experiment,
  tree_snapshot,
)

from kd_jax import checkpoint, errors, models
from kd_jax.amalgamation import components, objective, pipeline, routing, trainer
from kd_jax.amalgamation import step as step_lib
from kd_jax.train import mesh as mesh_lib
from kd_jax.train import steps
from kd_jax.train.state import TrainState

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _softmax(x, axis=-1):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def _routing(rng, batch, teachers, hard):
  if hard:
    return np.eye(teachers, dtype=np.float32)[rng.integers(0, teachers, batch)]
  return _softmax(rng.normal(size=(batch, teachers))).astype(np.float32)


# Disjoint, interleaved (not contiguous) class positions of 3 teachers in a 7-class union.
CLASS_INDEX = ((0, 3), (1, 4, 6), (2, 5))


def _logits(rng, batch=6):
  return [rng.normal(0, 2, size=(batch, len(i))).astype(np.float32) for i in CLASS_INDEX]


# ----------------------------------------------------------------------------- objective


@pytest.mark.parametrize("hard", [True, False])
def test_union_targets_matches_numpy(hard):
  rng = np.random.default_rng(0)
  z, w, temperature = _logits(rng), _routing(rng, 6, 3, hard), 2.0
  got = np.asarray(
    objective.union_targets(z, w, CLASS_INDEX, num_classes=7, temperature=temperature)
  )

  want = np.zeros((6, 7))
  for t, index in enumerate(CLASS_INDEX):
    want[:, index] += w[:, t : t + 1] * _softmax(z[t] / temperature)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-5)
  if hard:  # the routed teacher's tempered softmax at its classes, 0 elsewhere
    for b in range(6):
      t = int(w[b].argmax())
      row = np.zeros(7)
      row[list(CLASS_INDEX[t])] = _softmax(z[t][b] / temperature)
      np.testing.assert_allclose(got[b], row, rtol=1e-5, atol=1e-7)


def test_soft_target_kl_matches_numpy():
  rng = np.random.default_rng(1)
  s = rng.normal(0, 2, size=(5, 7)).astype(np.float32)
  p = _softmax(rng.normal(size=(5, 7))).astype(np.float32)
  p[0, 2] = 0.0  # 0 · log 0 = 0
  p[0] /= p[0].sum()
  temperature = 3.0
  q = _softmax(s / temperature)
  with np.errstate(divide="ignore", invalid="ignore"):
    kl = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0).sum(-1)
  want = temperature**2 * kl.mean()
  got = float(objective.soft_target_kl(s, p, temperature=temperature))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  own = float(objective.soft_target_kl(s, q.astype(np.float32), temperature=temperature))
  assert abs(own) < 1e-5


def test_routed_logit_regression_matches_numpy():
  rng = np.random.default_rng(2)
  z, w = _logits(rng), _routing(rng, 6, 3, hard=False)
  s = rng.normal(size=(6, 7)).astype(np.float32)
  want = sum(
    (w[:, t] * ((s[:, list(index)] - z[t]) ** 2).sum(-1)).sum()
    for t, index in enumerate(CLASS_INDEX)
  ) / (2 * 6)
  got = float(objective.routed_logit_regression(s, z, w, CLASS_INDEX))
  np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("hard", [True, False])
def test_seed_logit_loss_matches_numpy(hard):
  rng = np.random.default_rng(3)
  z, w = _logits(rng), _routing(rng, 6, 3, hard)
  s = rng.normal(size=(6, 7)).astype(np.float32)
  padded = np.zeros((6, 7))
  for t, index in enumerate(CLASS_INDEX):
    padded[:, index] += w[:, t : t + 1] * z[t]
  want = 200.0 * np.mean((s - padded) ** 2)
  got = float(objective.seed_logit_loss(s, z, w, CLASS_INDEX, num_classes=7))
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_student_task_probs_matches_numpy():
  s = np.random.default_rng(3).normal(0, 3, size=(6, 7)).astype(np.float32)
  got = np.asarray(objective.student_task_probs(s, CLASS_INDEX))
  want = np.stack([_softmax(s.astype(np.float64))[:, list(i)].sum(-1) for i in CLASS_INDEX], -1)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-5)
  # A target: no gradient flows back into the student's logits.
  grad = jax.grad(lambda x: jnp.sum(objective.student_task_probs(x, CLASS_INDEX) ** 2))(
    jnp.asarray(s)
  )
  np.testing.assert_array_equal(np.asarray(grad), 0.0)


@pytest.mark.parametrize("ramp", [(0.2, 0.6), (0.5, 0.5), (0.0, 1.0)])
def test_self_training_mix_ramps_linearly(ramp):
  total, weight = 50, 0.7
  for step in range(0, 60, 5):
    got = float(objective.self_training_mix(step, total_steps=total, weight=weight, ramp=ramp))
    start, end = ramp[0] * total, ramp[1] * total
    want = (
      weight * (step >= start)
      if end == start
      else weight * np.interp(step, [start, end], [0.0, 1.0])
    )
    assert got == pytest.approx(want, abs=1e-6), step


def test_self_trained_weights_matches_numpy():
  rng = np.random.default_rng(4)
  s = rng.normal(0, 2, size=(6, 7)).astype(np.float32)
  w = _routing(rng, 6, 3, hard=True)
  q = np.stack([_softmax(s.astype(np.float64))[:, list(i)].sum(-1) for i in CLASS_INDEX], -1)
  for mix in (0.0, 0.3, 1.0):
    got = np.asarray(objective.self_trained_weights(w, s, CLASS_INDEX, mix=mix))
    np.testing.assert_allclose(got, (1 - mix) * w + mix * q, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-5)


def test_seed_regularizer_is_mean_squared_distance_to_one():
  rng = np.random.default_rng(4)
  kernels = [rng.normal(size=(1, 1, 3, 4)), rng.normal(size=(1, 1, 5, 2))]
  want = np.mean(np.concatenate([((k - 1.0) ** 2).ravel() for k in kernels]))
  np.testing.assert_allclose(float(objective.seed_regularizer(kernels)), want, rtol=1e-5)


def test_resize_like_shapes():
  x = jnp.ones((2, 8, 8, 3))
  assert objective.resize_like(x, jnp.zeros((2, 4, 4, 5))).shape == (2, 4, 4, 3)
  assert objective.resize_like(x, jnp.zeros((2, 14, 14, 1))).shape == (2, 14, 14, 3)
  assert objective.resize_like(x, jnp.zeros((2, 8, 8, 7))) is x
  np.testing.assert_allclose(objective.resize_like(x, jnp.zeros((2, 3, 5, 1))), 1.0, rtol=1e-6)


# ------------------------------------------------------------------------- pairs, plan


@pytest.mark.parametrize(
  "blocks, want",
  [
    ((3, 3), ((0, 0), (1, 1), (2, 2))),
    ((3, 2), ((0, 0), (2, 1))),
    ((2, 4), ((0, 0), (1, 3))),
    ((1, 3), ((0, 2),)),
    ((3, 1), ((2, 0),)),
  ],
)
def test_auto_pairs(blocks, want):
  assert step_lib.auto_pairs(*blocks) == want


STUDENT = models.ConvNet(num_classes=4, block_widths=(8, 16), convs_per_block=1, norm="batch")
TEACHERS = (
  models.ConvNet(num_classes=2, block_widths=(8, 16), convs_per_block=1, norm="batch"),
  models.ConvNet(num_classes=2, block_widths=(4, 8, 8), convs_per_block=1, norm="batch"),
)
IMAGE_SHAPE = (16, 16, 1)


def make_plan(**kw):
  fields = dict(
    student=STUDENT,
    teachers=TEACHERS,
    class_index=((0, 1), (2, 3)),
    pairs=(step_lib.auto_pairs(2, 2), step_lib.auto_pairs(2, 3)),
  )
  fields.update(kw)
  return step_lib.Plan(**fields)


def test_plan_of_heterogeneous_teachers():
  plan = make_plan()
  assert plan.pairs == (((0, 0), (1, 1)), ((0, 0), (1, 2)))
  assert plan.align_widths(0) == (8, 16)
  assert plan.align_widths(1) == (4, 8)
  assert plan.num_classes == 4


def test_plan_refuses_missing_student_block():
  with pytest.raises(ValueError, match=r"student block 5 .*2 blocks"):
    make_plan(pairs=(((0, 0), (5, 1)), ((0, 0),)))


def test_plan_refuses_missing_teacher_block():
  with pytest.raises(ValueError, match=r"block 3 of teacher 1 .*3 blocks"):
    make_plan(pairs=(((0, 0),), ((1, 3),)))
  with pytest.raises(ValueError, match=r"block -1 of teacher 0"):
    make_plan(pairs=(((0, -1),), ((0, 0),)))


def test_plan_refuses_one_teacher():
  with pytest.raises(ValueError, match="at least 2 teachers, got 1"):
    make_plan(teachers=TEACHERS[:1], class_index=((0, 1),), pairs=(((0, 0),),))


def test_plan_refuses_mismatched_lengths():
  with pytest.raises(
    ValueError, match="2 teachers need as many class_index and pairs entries, got 3 and 2"
  ):
    make_plan(class_index=((0,), (1,), (2, 3)))


def test_plan_refuses_non_convnet():
  with pytest.raises(ValueError, match="ConvNet"):
    make_plan(teachers=(TEACHERS[0], models.LeNet(num_classes=2)))
  with pytest.raises(ValueError, match="ConvNet"):
    make_plan(student=models.NiN(num_classes=4))


# -------------------------------------------------------------------------------- step


def amalgamation_cfg(**kw):
  """The `amalgamation` section of experiments/amalgamate.py's smoke config, unlocked."""
  cfg = copy.deepcopy(experiment("amalgamate").get_config("smoke").amalgamation)
  cfg.update(kw)
  return cfg


def random_teacher_variables(seed=0):
  out = []
  for t, teacher in enumerate(TEACHERS):
    variables = teacher.init(
      jax.random.key(seed * 10 + t), jnp.zeros((1, *IMAGE_SHAPE)), train=False
    )
    # Non-trivial BatchNorm statistics, as a trained teacher has.
    variables = jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.1 if "var" in jax.tree_util.keystr(path) else x, variables
    )
    out.append(variables)
  return out


def make_state(plan, tx, seed=0):
  """A fresh TrainState, as `trainer.amalgamate` builds it."""
  rng_init, rng_train = jax.random.split(jax.random.PRNGKey(seed))
  variables = step_lib.init_params(plan, rng_init, IMAGE_SHAPE)
  return TrainState(
    step=np.zeros((), np.int32),
    params=variables["params"],
    batch_stats=variables["batch_stats"],
    opt_state=tx.init(variables["params"]),
    rng=np.asarray(rng_train, np.uint32),
  )


def test_init_params_compiled_equals_the_eager_initialisation():
  """`init_params` runs as one compiled program (start-up time); its values are those of the
  same initialisers run op by op (the 1×1 projections' up to float rounding)."""
  plan = make_plan()
  rng = jax.random.PRNGKey(3)
  eager = step_lib._init_params(plan, rng, IMAGE_SHAPE)
  compiled = step_lib.init_params(plan, rng, IMAGE_SHAPE)
  assert jax.tree.structure(compiled) == jax.tree.structure(eager)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), compiled, eager)
  # The student's own variables are drawn as `student.init` draws them.
  student = plan.student.init(jax.random.split(rng)[0], jnp.zeros((1, *IMAGE_SHAPE)), train=False)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
    compiled["params"]["student"],
    student["params"],
  )


def make_tx(learning_rate=1e-2):
  optim = ml_collections.ConfigDict(
    dict(learning_rate=learning_rate, decay_at=0.8, decay_factor=0.1)
  )
  return steps.make_optimizer(optim, total_steps=100)


def images(n=16, seed=0):
  return np.random.default_rng(seed).normal(size=(n, *IMAGE_SHAPE)).astype(np.float32)


@pytest.mark.parametrize("grid", [1, 2, 3])
def test_pooled_blocks_average_each_cell_of_the_grid(grid):
  """pool_lda's features against a NumPy loop over cells: rows and columns split as evenly as
  possible (7 → 4 + 3), a map shorter than the grid pooled into one cell per row/column."""
  rng = np.random.default_rng(0)
  features = [
    rng.normal(size=(3, 7, 7, 4)).astype(np.float32),
    rng.normal(size=(3, 2, 2, 5)).astype(np.float32),
  ]
  expected = []
  for f in features:

    def bounds(n):  # the first n % cells cells one longer
      cells = min(grid, n)
      sizes = [n // cells + (i < n % cells) for i in range(cells)]
      ends = np.cumsum(sizes)
      return list(zip(ends - sizes, ends))

    for r0, r1 in bounds(f.shape[1]):
      for c0, c1 in bounds(f.shape[2]):
        expected.append(f[:, r0:r1, c0:c1].mean(axis=(1, 2)))
  expected = np.concatenate(expected, axis=-1)
  got = np.asarray(step_lib.pooled_blocks([jnp.asarray(f) for f in features], grid))
  assert got.shape == (3, 4 * min(grid, 7) ** 2 + 5 * min(grid, 2) ** 2)
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
  if grid == 1:  # global average pooling, as before the grid existed
    np.testing.assert_allclose(
      got, np.concatenate([f.mean(axis=(1, 2)) for f in features], -1), rtol=1e-6, atol=1e-6
    )


def frozen_for(cfg, plan, teacher_vars):
  frozen = {"teachers": teacher_vars}
  if cfg.selection == "teacher_card":
    rng = np.random.default_rng(5)
    frozen["cards"] = [
      routing.fit_teacher_card(
        rng.normal(size=(40, t.block_widths[-1])), np.arange(40) % 2, num_classes=2
      )
      for t in plan.teachers
    ]
  if cfg.selection == "energy":
    logits, _, _ = step_lib.teacher_outputs(plan, teacher_vars, images(32, seed=7))
    frozen["energy_stats"] = routing.fit_energy_stats(logits)
  if cfg.selection == "pool_lda":
    _, feats, _ = step_lib.teacher_outputs(plan, teacher_vars, images(64, seed=7))
    initial = np.random.default_rng(6).integers(0, plan.num_classes, 64)
    frozen["pool_router"] = routing.fit_pool_router(
      [step_lib.pooled_blocks(f, cfg.get("pool_grid", 1)) for f in feats], initial, plan.class_index
    )
  return frozen


def one_device_mesh():
  return mesh_lib.make_mesh(jax.devices()[:1])


class Runner:
  """The step compiled data-parallel on a mesh, with its plan, frozen inputs and state."""

  def __init__(self, cfg, *, plan=None, mesh=None, tx=None, total_steps=None):
    self.plan = plan or make_plan()
    self.cfg, self.mesh = cfg, mesh or one_device_mesh()
    self.tx = tx or make_tx()
    self.teacher_vars = random_teacher_variables()
    self.frozen = mesh_lib.replicate(frozen_for(cfg, self.plan, self.teacher_vars), self.mesh)
    self.compiled = mesh_lib.data_parallel_step(
      step_lib.make_step(self.plan, cfg, self.tx, total_steps=total_steps),
      self.mesh,
      donate_state=False,
    )

  def state(self):
    return mesh_lib.replicate(make_state(self.plan, self.tx), self.mesh)

  def __call__(self, state, batch):
    return self.compiled(state, mesh_lib.shard_batch(batch, self.mesh), self.frozen)


def assert_trees_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture(scope="module")
def entropy_runner():
  return Runner(amalgamation_cfg(selection="entropy"))


def test_step_never_sees_labels(entropy_runner):
  run = entropy_runner
  x = images()
  y = np.arange(16) % 4
  scrambled = np.random.default_rng(0).permutation(y)[::-1].copy()
  outputs = [
    run(run.state(), batch)
    for batch in ({"image": x}, {"image": x, "label": y}, {"image": x, "label": scrambled})
  ]
  for state, metrics in outputs[1:]:
    assert_trees_equal(state, outputs[0][0])
    assert_trees_equal(metrics, outputs[0][1])
  assert int(outputs[0][0].step) == 1


def test_teachers_stay_frozen(entropy_runner):
  run = entropy_runner
  before = jax.tree.map(np.array, run.frozen)
  state, _ = run(run.state(), {"image": images()})
  assert_trees_equal(run.frozen, before)  # the frozen inputs are untouched
  # Teachers are not part of the trained state: only the student and the projections.
  assert set(state.params) == {"student", "align"}
  assert set(state.batch_stats) == {"student"}
  assert checkpoint.fingerprint(state.params["student"]) != checkpoint.fingerprint(
    run.state().params["student"]
  )

  # No gradient reaches a teacher: the step reads the teachers only through
  # `teacher_outputs` (logits, block and penultimate features) and the routing weights
  # made from them, and all of those are constants to the student's loss.
  x = jnp.asarray(images())
  weights = jnp.arange(1.0, 3.0)

  def through_teachers(teacher_vars):
    logits, feats, penultimate = step_lib.teacher_outputs(run.plan, teacher_vars, x)
    routed = step_lib.routing_weights(run.cfg, logits, penultimate, {})
    return (
      sum(jnp.sum(z**2) for z in logits)
      + sum(jnp.sum(f**2) for fs in feats for f in fs)
      + sum(jnp.sum(p**2) for p in penultimate)
      + jnp.sum(routed * weights)
    )

  grads = jax.jit(jax.grad(through_teachers))(run.teacher_vars)
  for leaf in jax.tree.leaves(grads):
    np.testing.assert_array_equal(np.asarray(leaf), 0.0)
  assert float(through_teachers(run.teacher_vars)) > 0


VARIANTS = {
  "entropy": dict(selection="entropy"),
  "max_softmax": dict(selection="max_softmax"),
  "energy": dict(selection="energy"),
  "teacher_card": dict(selection="teacher_card"),
  "pool_lda": dict(selection="pool_lda"),
  "soft_routing": dict(selection="entropy", routing="soft", routing_temperature=0.5),
  "l2": dict(selection="max_softmax", logit_loss="l2"),
  "seed_compat": dict(selection="entropy", logit_loss="l2", seed_compat=True, unit_norm_weight=1.0),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_step_variants_learn_on_a_fixed_batch(variant, entropy_runner):
  cfg = amalgamation_cfg(**VARIANTS[variant])
  run = entropy_runner if variant == "entropy" else Runner(cfg)
  state, batch = run.state(), {"image": images(seed=1)}
  losses = []
  for _ in range(10):
    state, metrics = run(state, batch)
    for name, value in metrics.items():
      assert np.isfinite(float(value)), (name, float(value))
    losses.append(float(metrics["loss"]))
  assert int(state.step) == 10
  assert losses[-1] < losses[0], losses
  routed = sum(float(metrics[f"routed_to/teacher_{t}"]) for t in range(2))
  np.testing.assert_allclose(routed, 1.0, rtol=1e-5)
  if cfg.routing == "hard":
    for t in range(2):
      share = float(metrics[f"routed_to/teacher_{t}"]) * 16
      assert abs(share - round(share)) < 1e-4  # a whole number of samples per teacher
  assert {"align/teacher_0/block_0", "align/teacher_0/block_1", "align/teacher_1/block_1"} <= set(
    metrics
  )


def assert_trees_close(a, b):
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6),
    a,
    b,
  )


def at_step(state, step):
  return state.replace(step=jnp.asarray(step, state.step.dtype))


def test_self_training_replaces_routing_by_the_students_view():
  """After the ramp, `self_training=1` routes by the student's own task probabilities
  alone: two routings that weigh the batch differently give the same step. Before the
  ramp it is the plain step. Labels never matter."""
  x = images(seed=2)
  routings = {
    "hard": dict(selection="entropy"),
    "soft": dict(selection="entropy", routing="soft", routing_temperature=0.5),
  }
  full = dict(self_training=1.0, self_training_start=0.5, self_training_end=0.5)
  # Plain SGD: Adam's first step is about sign(gradient), which float noise in a zero gradient flips.
  tx = optax.sgd(0.1)
  runners = {
    name: Runner(amalgamation_cfg(**kw, **full), tx=tx, total_steps=4)
    for name, kw in routings.items()
  }
  logits, _, penultimate = step_lib.teacher_outputs(
    runners["hard"].plan, runners["hard"].teacher_vars, x
  )
  weights = {
    name: np.asarray(step_lib.routing_weights(run.cfg, logits, penultimate, {}))
    for name, run in runners.items()
  }
  assert np.abs(weights["hard"] - weights["soft"]).max() > 0.1  # the two routings differ

  after = {name: run(at_step(run.state(), 2), {"image": x}) for name, run in runners.items()}
  assert_trees_close(after["hard"][0].params, after["soft"][0].params)
  assert float(after["hard"][1]["loss"]) == pytest.approx(float(after["soft"][1]["loss"]), rel=1e-6)
  for name, (_, metrics) in after.items():
    assert 0.0 <= float(metrics["self_training/overruled"]) <= 1.0
    assert float(metrics["routed_to/teacher_0"]) == pytest.approx(
      weights[name][:, 0].mean(), rel=1e-5
    )

  plain = Runner(amalgamation_cfg(**routings["hard"]), tx=tx)
  routed = plain(plain.state(), {"image": x})
  before_state, before = runners["hard"](runners["hard"].state(), {"image": x})
  assert float(before["self_training/overruled"]) == 0.0
  assert float(before["loss"]) == pytest.approx(float(routed[1]["loss"]), rel=1e-6)
  assert_trees_close(before_state.params, routed[0].params)

  y = np.arange(16) % 4
  run = runners["hard"]
  with_labels = run(
    at_step(run.state(), 2), {"image": x, "label": np.random.default_rng(0).permutation(y)}
  )
  assert_trees_equal(with_labels, after["hard"])


def test_self_training_needs_total_steps_and_disjoint_teachers():
  cfg = amalgamation_cfg(self_training=0.5)
  with pytest.raises(ValueError, match="needs total_steps"):
    step_lib.make_step(make_plan(), cfg, make_tx())
  shared = make_plan(class_index=((0, 1), (0, 1)))
  with pytest.raises(ValueError, match="disjoint classes"):
    step_lib.make_step(shared, cfg, make_tx(), total_steps=10)


def test_a_nonfinite_term_is_named_and_the_state_kept(entropy_runner):
  """Teacher-side projections scaled by 1e10: their unit-norm penalty (‖w‖² − 1)² ≈ 1e40
  overflows float32 while the feature and logit terms stay finite."""
  run = entropy_runner
  state = make_state(run.plan, run.tx)
  align = {
    name: {**sides, "teacher": jax.tree.map(lambda k: k * 1e10, sides["teacher"])}
    for name, sides in state.params["align"].items()
  }
  state = mesh_lib.replicate(state.replace(params={**state.params, "align": align}), run.mesh)
  new_state, metrics = run(state, {"image": images()})
  terms = steps.nonfinite_terms(int(metrics["nonfinite"]))
  assert {"unit_norm_penalty", "loss"} <= set(terms) and not {"feature_loss", "logit_loss"} & set(
    terms
  ), terms
  assert np.isinf(float(metrics["unit_norm_penalty"])) and np.isfinite(float(metrics["logit_loss"]))
  assert int(new_state.step) == 1
  assert_trees_equal((new_state.params, new_state.opt_state), (state.params, state.opt_state))
  _, clean = run(run.state(), {"image": images()})
  assert int(clean["nonfinite"]) == 0


def test_unknown_logit_loss():
  with pytest.raises(ValueError, match="unknown logit_loss 'l1'"):
    step_lib.make_step(make_plan(), amalgamation_cfg(logit_loss="l1"), make_tx())


def test_unit_norm_penalty_zero_at_init_and_grows(entropy_runner):
  run = entropy_runner
  batch = {"image": images()}
  _, metrics = run(run.state(), batch)
  assert float(metrics["unit_norm_penalty"]) < 1e-8

  def scaled(side, factor):
    state = make_state(run.plan, run.tx)
    align = {
      name: {**sides, side: jax.tree.map(lambda k: k * factor, sides[side])}
      for name, sides in state.params["align"].items()
    }
    return mesh_lib.replicate(state.replace(params={**state.params, "align": align}), run.mesh)

  # Student-side projections are not penalised.
  _, metrics = run(scaled("student", 2.0), batch)
  assert float(metrics["unit_norm_penalty"]) < 1e-8
  # Teacher-side filters of norm 2: Σ_k (4 − 1)² over the 8 + 16 + 4 + 8 filters.
  _, metrics = run(scaled("teacher", 2.0), batch)
  np.testing.assert_allclose(float(metrics["unit_norm_penalty"]), 9.0 * 36, rtol=1e-4)
  _, bigger = run(scaled("teacher", 3.0), batch)
  assert float(bigger["unit_norm_penalty"]) > float(metrics["unit_norm_penalty"])
  assert float(bigger["loss"]) > float(metrics["loss"])


DATA_PARALLEL_SCRIPT = textwrap.dedent(
  """
    import os, sys
    sys.path.insert(0, {tests!r})
    import jax
    jax.config.update("jax_disable_most_optimizations", True)
    import numpy as np
    import optax
    import test_amalgamation as T
    from kd_jax.train import mesh as mesh_lib

    assert len(jax.devices()) == 2, jax.devices()
    cfg = T.amalgamation_cfg(selection="entropy", routing="hard")
    batches = [{{"image": T.images(16, seed=s)}} for s in (1, 2)]
    out = {{}}
    for n in (1, 2):
      # Plain SGD: Adam would hide a gradient off by a constant factor (n × the mean).
      run = T.Runner(cfg, mesh=mesh_lib.make_mesh(jax.devices()[:n]), tx=optax.sgd(0.1))
      state = run.state()
      for batch in batches:
        state, metrics = run(state, batch)
      out[n] = jax.tree.map(np.asarray, (state.params, state.batch_stats, metrics))
    flat1, flat2 = jax.tree.leaves(out[1]), jax.tree.leaves(out[2])
    assert len(flat1) == len(flat2)
    worst = max(float(np.max(np.abs(a - b))) for a, b in zip(flat1, flat2))
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(
        jax.tree.leaves(out[1][0]), jax.tree.leaves(jax.tree.map(np.asarray, T.make_state(run.plan, run.tx).params))))
    print("WORST", worst, "MOVED", moved)
    """
)


def test_data_parallel_matches_one_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [sys.executable, "-c", DATA_PARALLEL_SCRIPT.format(tests=os.path.join(REPO, "tests"))],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("WORST")][-1]
  worst, moved = float(line.split()[1]), float(line.split()[3])
  assert moved > 1e-2  # the two steps did train
  assert worst < 1e-5, line


# ----------------------------------------------------------------------------- bad input


def _refused(config, workdir, match):
  before = tree_snapshot(workdir)
  with pytest.raises(errors.UsageError, match=match):
    pipeline.run(config, workdir)
  assert tree_snapshot(workdir) == before, "a refused run wrote into its workdir"


@pytest.mark.parametrize(
  "teacher_classes, match",
  [
    ("0+1/1+2", r"overlap on \[1\]"),
    ("0+1/", "teacher 1 has an empty class set"),
    ("0+1", "at least 2 teachers, got 1"),
    ("0+1/2+99", r"teacher 1's classes \[99\] are outside the dataset's 0..9"),
    ("0+1/2+2", "lists a class twice"),
    ("0/1+2", "teacher 0 has the single class 0: each teacher needs at least 2 classes"),
    ("0+a/2+3", "teacher_classes='0\\+a/2\\+3': not like '0\\+1/2\\+3'"),
  ],
)
def test_bad_class_sets_are_refused(idx_data, tmp_path, teacher_classes, match):
  config = amalgamate_config(idx_data, teacher_classes=teacher_classes)
  _refused(config, str(tmp_path / "w"), match)


@pytest.mark.parametrize(
  "overrides, match",
  [
    ({"block_pairs": "0:5"}, "tapped block 5 of teacher 0 does not exist: it has 2 blocks"),
    ({"block_pairs": "3:0"}, "tapped student block 3 does not exist"),
    ({"block_pairs": "0"}, "block_pairs='0': not 'auto'"),
    ({"block_pairs": "0:0/1:1/1:1"}, "pairs for 3 of 2 teachers"),
    ({"teacher_blocks": "8-16/8-16/8"}, "3 nets' widths for 2 nets"),
    (
      {"amalgamation.selection": "oracle"},
      "amalgamation.selection='oracle': .* must be one of entropy",
    ),
    ({"component.batch_size": 512}, r"teacher 0 \(classes \[0, 1\].*batch_size=512 exceeds"),
    ({"amalgamation.batch_size": 512}, "the amalgamation .*batch_size=512 exceeds"),
    (
      {"amalgamation.self_training": 1.5},
      r"amalgamation.self_training=1.5: .* must be a finite number in \[0, 1\]",
    ),
    (
      {"amalgamation.self_training_start": 0.7, "amalgamation.self_training_end": 0.4},
      "self_training_start=0.7 is after .*self_training_end=0.4",
    ),
  ],
)
def test_bad_plans_are_refused(idx_data, tmp_path, overrides, match):
  config = amalgamate_config(idx_data, **overrides)
  _refused(config, str(tmp_path / "w"), match)


def test_bad_dual_stage_is_refused(idx_data, tmp_path):
  config = amalgamate_config(
    idx_data,
    "smoke,dual_stage",
    source_blocks="8-16/8-16-32",
    block_pairs="2:2",
    teacher_blocks="8-16-32",
    student_blocks="8-16-32",
  )
  _refused(
    config,
    str(tmp_path / "w"),
    r"dual stage of teacher 0 \(.*\): tapped block 2 of teacher 0 does not exist",
  )
  config = amalgamate_config(idx_data, "smoke,dual_stage", **{"dual_stage.self_training": 0.5})
  _refused(
    config,
    str(tmp_path / "w"),
    "dual_stage.self_training must be 0: the dual stage's sources share",
  )
  config = amalgamate_config(idx_data, "smoke,dual_stage", **{"component.batch_size": 64})
  _refused(
    config,
    str(tmp_path / "w"),
    r"source 0 of teacher 0 \(classes \[0, 1\], split train\[0%:50%\]\)",
  )


def save_fake_teacher(workdir, model, *, classes, dataset="mnist"):
  """A checkpoint like a trained net's (untrained variables), without training."""
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(
    jnp.zeros((1, 28, 28, 1))
  )
  ckpts = checkpoint.Checkpoints(workdir)
  ckpts.save(
    1,
    {"state": {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}},
    {
      "kind": "component",
      "main": "model",
      "models": {
        "model": checkpoint.model_entry(model, num_classes=model.num_classes, classes=classes)
      },
      "config": {"data": {"name": dataset}},
      "history": [],
    },
    force=True,
  )
  ckpts.close()
  with open(os.path.join(workdir, "results.json"), "w") as f:  # a finished run's mark
    f.write("{}\n")
  return workdir


@pytest.fixture(scope="module")
def fake_teachers(tmp_path_factory):
  root = tmp_path_factory.mktemp("fake_teachers")
  convnet = lambda k: models.ConvNet(num_classes=k, block_widths=(8, 16), convs_per_block=1)  # noqa: E731
  return {
    "good": save_fake_teacher(str(root / "good"), convnet(2), classes=[2, 3]),
    "good_overlapping": save_fake_teacher(
      str(root / "good_overlapping"), convnet(2), classes=[0, 2]
    ),
    "lenet": save_fake_teacher(str(root / "lenet"), models.LeNet(num_classes=2), classes=[0, 1]),
    "nin": save_fake_teacher(
      str(root / "nin"), models.NiN(num_classes=10, width=0.25, fc_width=16), classes=None
    ),
    "no_classes": save_fake_teacher(str(root / "no_classes"), convnet(10), classes=None),
    "fashion": save_fake_teacher(
      str(root / "fashion"), convnet(2), classes=[0, 1], dataset="fashion_mnist"
    ),
    "unfinished": _unfinished(
      save_fake_teacher(str(root / "unfinished"), convnet(2), classes=[0, 1])
    ),
  }


def _unfinished(workdir):
  os.remove(os.path.join(workdir, "results.json"))  # killed before its end
  return workdir


@pytest.mark.parametrize(
  "first, match",
  [
    ("missing", "teacher: .*holds no checkpoints"),
    ("lenet", "is a LeNet; amalgamation needs ConvNet teachers"),
    ("nin", "is a NiN; amalgamation needs ConvNet teachers"),
    ("no_classes", "records no class subset"),
    ("fashion", "trained on fashion_mnist, not mnist"),
    ("good_overlapping", r"overlap on \[2\]"),
    (
      "unfinished",
      r"^teacher_workdirs: .*unfinished holds an unfinished run \(no results.json.*"
      r"set --config.allow_unfinished_teacher=True",
    ),
  ],
)
def test_bad_external_teachers_are_refused(idx_data, tmp_path, fake_teachers, first, match):
  path = fake_teachers.get(first, str(tmp_path / "missing"))
  config = amalgamate_config(
    idx_data,
    teacher_workdirs=f"{path}:{fake_teachers['good']}",
    **{"amalgamation.selection": "entropy"},
  )
  _refused(config, str(tmp_path / "w"), match)
  assert not os.path.exists(tmp_path / "missing")


def test_external_teachers_bad_pairs_and_count(idx_data, tmp_path, fake_teachers):
  config = amalgamate_config(idx_data, teacher_workdirs=fake_teachers["good"])
  _refused(config, str(tmp_path / "w"), "at least 2 teachers")
  config = amalgamate_config(idx_data, teacher_workdirs=fake_teachers["good"] + ":")
  _refused(config, str(tmp_path / "w"), "has an empty path")
  config = amalgamate_config(
    idx_data,
    teacher_workdirs=f"{fake_teachers['good']}:{fake_teachers['good']}",
    **{"amalgamation.selection": "entropy"},
  )
  _refused(config, str(tmp_path / "w"), r"overlap on \[2, 3\]")


def test_main_reports_one_error_line_and_writes_nothing(idx_data, tmp_path):
  manual, data_dir = idx_data
  workdir = tmp_path / "w"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "kd_jax.main",
      "--config=experiments/amalgamate.py:smoke,teacher_classes=0+1/1+2",
      f"--config.data.manual_dir={manual}",
      f"--config.data.data_dir={data_dir}",
      "--config.data.download=False",
      f"--workdir={workdir}",
    ],
    cwd=REPO,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode != 0
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert errors == [
    "error: --config.teacher_classes='0+1/1+2': teachers' class sets overlap on [1]: they must be "
    "disjoint"
  ], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert not workdir.exists()


def test_card_shrinkage_reaches_the_nets(idx_data):
  config = amalgamate_config(idx_data, card_shrinkage=0.3)
  component = components.component_config(config, classes=[0, 1], widths=[8, 16], seed=1)
  assert component.card_shrinkage == 0.3
  assert components.net_config(config, "dual_stage").card_shrinkage == 0.3
  assert json.loads(json.dumps(component.to_dict()))["card_shrinkage"] == 0.3


def test_shared_classes_union():
  """The dual stage's sources share their task's classes: the union lists each once."""
  teachers = [{"classes": [3, 5], "model": TEACHERS[0]}, {"classes": [3, 5], "model": TEACHERS[1]}]
  config = ml_collections.ConfigDict(
    dict(student_blocks="8-16", convs_per_block=1, block_pairs="auto")
  )
  plan, union = trainer.build_plan(config, teachers)
  assert union == [3, 5]
  assert plan.class_index == ((0, 1), (0, 1))
  assert plan.student.num_classes == 2
  teachers = [{"classes": [3, 5], "model": TEACHERS[0]}, {"classes": [1, 7], "model": TEACHERS[1]}]
  plan, union = trainer.build_plan(config, teachers)
  assert union == [3, 5, 1, 7]
  assert plan.class_index == ((0, 1), (2, 3))
