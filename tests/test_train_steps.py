"""Train steps: objectives, the frozen teacher, the optimiser schedule, data parallelism."""

import helpers
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from kd_jax import checkpoint, losses, models, seed_compat
from kd_jax.train import mesh as mesh_lib
from kd_jax.train import steps
from kd_jax.train.state import TrainState

DISTILL = ml_collections.ConfigDict(
  dict(
    temperature=4.0,
    soft_weight=0.9,
    noise_ratio=0.5,
    noise_std=0.1,
    teacher_dropout=False,
    seed_compat=False,
  )
)


def _distill(seed_compat_on: bool):
  distill = ml_collections.ConfigDict(DISTILL.to_dict())
  distill.seed_compat = seed_compat_on
  return distill


@pytest.fixture(scope="module")
def logits():
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  s = 3.0 * jax.random.normal(k1, (8, 10))
  t = 3.0 * jax.random.normal(k2, (8, 10))
  y = jax.random.randint(k3, (8,), 0, 10)
  return s, t, y, jax.random.split(jax.random.PRNGKey(7), 8)  # one key per example


# ------------------------------------------------------------------------- objectives


def _expected(method, seed, s, t, y, rng):
  d = DISTILL
  if method == "ground_truth":
    return losses.cross_entropy(s, y)
  if method == "logit_regression":
    return losses.logit_regression(s, t)
  if method == "noisy_teacher":
    noise = seed_compat.seed_noisy_logits if seed else losses.noisy_logits
    # Each example's noise from its own key, whatever batch (or device shard) it is in.
    rows = [
      noise(rng[i], t[i : i + 1], noise_ratio=d.noise_ratio, noise_std=d.noise_std)
      for i in range(len(t))
    ]
    return losses.logit_regression(s, jnp.concatenate(rows))
  if seed:
    return seed_compat.seed_kd_loss(
      s, t, y, temperature=d.temperature, hard_weight=1.0 - d.soft_weight
    )
  return losses.hinton_kd(s, t, y, temperature=d.temperature, soft_weight=d.soft_weight)


# The methods with an objective of `make_objective` (the zoo's have their own step: test_train_zoo).
ALL_OBJECTIVES = [(m, False) for m in steps.METHODS if m not in steps.ZOO_METHODS] + [
  ("noisy_teacher", True),
  ("hinton_kd", True),
]


@pytest.mark.parametrize("method,seed", ALL_OBJECTIVES)
def test_objective_is_the_losses_function(method, seed, logits):
  s, t, y, rng = logits
  objective = steps.make_objective(method, _distill(seed))
  got = objective(s, t, y, rng)
  want = _expected(method, seed, s, t, y, rng)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  assert np.isfinite(float(got))


def test_seed_compat_changes_the_formula(logits):
  s, t, y, rng = logits
  for method in ("noisy_teacher", "hinton_kd"):
    paper = steps.make_objective(method, _distill(False))(s, t, y, rng)
    seed = steps.make_objective(method, _distill(True))(s, t, y, rng)
    assert abs(float(paper) - float(seed)) > 1e-3, method


@pytest.mark.parametrize("method,seed", ALL_OBJECTIVES)
def test_objective_gives_no_gradient_to_the_teacher(method, seed, logits):
  s, t, y, rng = logits
  objective = steps.make_objective(method, _distill(seed))
  grad_t = jax.grad(lambda t: objective(s, t, y, rng))(t)
  np.testing.assert_array_equal(np.asarray(grad_t), 0.0)
  grad_s = jax.grad(lambda s: objective(s, t, y, rng))(s)
  assert float(jnp.abs(grad_s).max()) > 0  # the student does learn from it


def test_unknown_method_is_refused():
  with pytest.raises(ValueError, match="unknown method 'foo'"):
    steps.make_objective("foo", DISTILL)


# --------------------------------------------------------------- the step, frozen teacher


@pytest.fixture(scope="module")
def tiny_setup():
  rng = np.random.default_rng(0)
  batch = {
    "image": rng.normal(size=(4, 28, 28, 1)).astype(np.float32),
    "label": (np.arange(4) % 10).astype(np.int32),
  }
  student = models.LeNet(num_classes=10, width=0.125)
  # Any registered model can teach; a small LeNet with dropout keeps this test fast.
  teacher = models.LeNet(num_classes=10, width=0.25, dropout_rate=0.5)
  init = lambda model, key: jax.jit(lambda k: model.init(k, batch["image"][:1], train=False))(key)
  teacher_vars = init(teacher, jax.random.PRNGKey(1))
  tx = optax.adam(1e-3)
  state = TrainState.create(
    variables=init(student, jax.random.PRNGKey(0)), tx=tx, rng=jax.random.PRNGKey(2)
  )
  return dict(
    batch=batch, student=student, teacher=teacher, teacher_vars=teacher_vars, tx=tx, state=state
  )


def test_step_keeps_the_teacher_frozen(tiny_setup):
  s = tiny_setup
  mesh = mesh_lib.make_mesh(jax.devices()[:1])
  step = steps.make_train_step(
    student=s["student"],
    tx=s["tx"],
    objective=steps.make_objective("hinton_kd", DISTILL),
    teacher=s["teacher"],
    teacher_dropout=True,  # the stochastic teacher path
  )
  compiled = mesh_lib.data_parallel_step(step, mesh, donate_state=False)
  frozen = mesh_lib.replicate(s["teacher_vars"], mesh)
  batch = mesh_lib.shard_batch(s["batch"], mesh)
  before = checkpoint.fingerprint(frozen)
  new_state, metrics = compiled(s["state"], batch, frozen)

  # Only the student is trained: the state holds the student's parameters and nothing else,
  # and the teacher's variables are untouched.
  assert jax.tree.structure(new_state.params) == jax.tree.structure(s["state"].params)
  assert int(new_state.step) == 1
  assert checkpoint.fingerprint(frozen) == before
  assert set(metrics) == {"loss", "accuracy", "teacher_agreement", "nonfinite"}
  assert int(metrics["nonfinite"]) == 0
  moved = jax.tree.leaves(
    jax.tree.map(lambda a, b: jnp.abs(a - b).max(), new_state.params, s["state"].params)
  )
  assert max(float(m) for m in moved) > 0

  # The updated student does not depend on the teacher's parameters through any gradient.
  def updated_params_sum(teacher_vars):
    out, _ = compiled(s["state"], batch, teacher_vars)
    return sum(jnp.sum(leaf) for leaf in jax.tree.leaves(out.params))

  grads = jax.grad(updated_params_sum)(frozen)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


def test_supervised_step_runs_without_a_teacher(tiny_setup):
  s = tiny_setup
  mesh = mesh_lib.make_mesh(jax.devices()[:1])
  step = steps.make_train_step(
    student=s["student"], tx=s["tx"], objective=steps.make_objective("ground_truth", DISTILL)
  )
  state, metrics = mesh_lib.data_parallel_step(step, mesh, donate_state=False)(
    s["state"], mesh_lib.shard_batch(s["batch"], mesh), {}
  )
  assert set(metrics) == {"loss", "accuracy", "nonfinite"}
  assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))


# ------------------------------------------------------------------- divergence guard


def _guarded_step(s, tx, batch):
  mesh = mesh_lib.make_mesh(jax.devices()[:1])
  step = steps.make_train_step(
    student=s["student"], tx=tx, objective=steps.make_objective("ground_truth", DISTILL)
  )
  state = TrainState.create(
    variables={"params": s["state"].params}, tx=tx, rng=jax.random.PRNGKey(2)
  )
  new_state, metrics = mesh_lib.data_parallel_step(step, mesh, donate_state=False)(
    state, mesh_lib.shard_batch(batch, mesh), {}
  )
  return state, new_state, metrics


@pytest.mark.parametrize(
  "case,terms",
  [
    (
      "nan_image",
      ["loss", "gradient", "state"],
    ),  # a NaN input: the loss, gradient and update are NaN
    ("nan_learning_rate", ["state"]),  # a finite loss and gradient, a NaN update
  ],
)
def test_a_nonfinite_step_keeps_the_old_state_and_names_what_failed(tiny_setup, case, terms):
  s = tiny_setup
  batch = dict(s["batch"])
  tx = optax.sgd(0.1)
  if case == "nan_image":
    batch["image"] = batch["image"].copy()
    batch["image"][1, 3, 3, 0] = np.nan
  else:
    tx = optax.sgd(float("nan"))
  state, new_state, metrics = _guarded_step(s, tx, batch)
  assert steps.nonfinite_terms(int(metrics["nonfinite"])) == terms
  assert int(new_state.step) == 1  # the step is spent (its RNG too), the update is not applied
  for new, old in zip(
    jax.tree.leaves((new_state.params, new_state.opt_state)),
    jax.tree.leaves((state.params, state.opt_state)),
  ):
    np.testing.assert_array_equal(np.asarray(new), np.asarray(old))
  # The same step on the clean batch with a sane optimizer moves the parameters.
  _, moved, clean = _guarded_step(s, optax.sgd(0.1), s["batch"])
  assert int(clean["nonfinite"]) == 0
  assert any(
    not np.array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(moved.params), jax.tree.leaves(state.params))
  )


def test_nonfinite_terms_decode_the_mask():
  assert steps.nonfinite_terms(0) == []
  mask = (1 << steps.NONFINITE_TERMS.index("logit_loss")) | (
    1 << steps.NONFINITE_TERMS.index("gradient")
  )
  assert steps.nonfinite_terms(mask) == ["logit_loss", "gradient"]


def test_step_rng_is_folded_with_the_step():
  state = TrainState(
    step=jnp.int32(3), params={}, batch_stats={}, opt_state=(), rng=jax.random.PRNGKey(5)
  )
  np.testing.assert_array_equal(state.step_rng(), jax.random.fold_in(jax.random.PRNGKey(5), 3))
  assert not np.array_equal(state.step_rng(), state.replace(step=jnp.int32(4)).step_rng())


# ------------------------------------------------------------------------- optimiser


@pytest.mark.parametrize("weight_decay", [0.0, 1e-4])
def test_learning_rate_drops_tenfold_at_80_percent(weight_decay):
  optim = ml_collections.ConfigDict(
    dict(learning_rate=1e-3, decay_at=0.8, decay_factor=0.1, weight_decay=weight_decay)
  )
  tx = steps.make_optimizer(optim, total_steps=10)
  params = {"w": jnp.zeros(3)}
  opt_state = tx.init(params)
  grads = {"w": jnp.ones(3)}  # constant gradient: each Adam update is -lr (params stay ~0)
  sizes = []
  for _ in range(10):
    updates, opt_state = tx.update(grads, opt_state, params)
    sizes.append(float(-updates["w"][0]))
  # Updates 0..7 (80 % of 10) at 1e-3, then 1e-4.
  np.testing.assert_allclose(sizes[:8], 1e-3, rtol=1e-3)
  np.testing.assert_allclose(sizes[8:], 1e-4, rtol=1e-3)


def test_optimizer_boundary_for_few_steps():
  optim = ml_collections.ConfigDict(
    dict(learning_rate=1e-2, decay_at=0.8, decay_factor=0.1, weight_decay=0.0)
  )
  tx = steps.make_optimizer(optim, total_steps=1)  # boundary at least one step in
  params = {"w": jnp.zeros(())}
  updates, _ = tx.update({"w": jnp.ones(())}, tx.init(params), params)
  np.testing.assert_allclose(float(-updates["w"]), 1e-2, rtol=1e-3)


# -------------------------------------------------------------- data-parallel equivalence

# Runs after helpers.FOUR_DEVICE_PREAMBLE (batch, distill, teacher, maxdiff).
_DP_SCRIPT = """
    def run(student, method, tx, devices, num_steps=3):
      mesh = mesh_lib.make_mesh(devices)
      variables = jax.jit(lambda k: student.init(k, batch["image"][:1], train=False))(jax.random.PRNGKey(0))
      initial = jax.device_get(variables)  # the step donates the state's buffers
      state = TrainState.create(variables=variables, tx=tx, rng=jax.random.PRNGKey(2))
      uses_teacher = method != "ground_truth"
      step = steps.make_train_step(student=student, tx=tx, objective=steps.make_objective(method, distill),
                                   teacher=teacher if uses_teacher else None)
      compiled = mesh_lib.data_parallel_step(step, mesh)
      state = mesh_lib.replicate(state, mesh)
      frozen = mesh_lib.replicate(teacher_vars if uses_teacher else {}, mesh)
      for _ in range(num_steps):
        state, metrics = compiled(state, mesh_lib.shard_batch(batch, mesh), frozen)
      return jax.device_get(state), jax.device_get(metrics), initial

    out = {}
    lenet = models.LeNet(num_classes=10, width=0.125)
    convnet = models.ConvNet(num_classes=10, block_widths=(8, 16), norm="batch")
    cases = [("lenet", lenet, "logit_regression", "adam"), ("lenet", lenet, "ground_truth", "sgd"),
             ("convnet_bn", convnet, "ground_truth", "sgd")]
    for name, model, method, opt in cases:
      tx = optax.adam(1e-3) if opt == "adam" else optax.sgd(0.05)
      s4, m4, init = run(model, method, tx, jax.devices())
      s1, m1, _ = run(model, method, tx, jax.devices()[:1])
      key = f"{name}/{method}/{opt}"
      out[key] = {"params": maxdiff(s4.params, s1.params), "moved": maxdiff(s1.params, init["params"]),
                  "loss": abs(float(m4["loss"]) - float(m1["loss"])), "steps": int(s4.step)}
      if s1.batch_stats:
        out[key]["batch_stats"] = maxdiff(s4.batch_stats, s1.batch_stats)
        out[key]["stats_moved"] = maxdiff(s1.batch_stats, init["batch_stats"])
    from kd_jax.train import zoo
    from kd_jax.train.zoo_defaults import DEFAULTS

    zoo_student = models.LeNet(num_classes=10, width=0.125)
    zoo_batch = {**batch, "index": np.array([3, 17, 0, 9, 25, 4, 30, 12], np.int32)}

    def run_zoo(method, devices, overrides):
      mesh = mesh_lib.make_mesh(devices)
      config = ml_collections.ConfigDict(dict(method=method, distill=dict(
          temperature=4.0, soft_weight=0.9, **{method: {**DEFAULTS[method], **overrides}})))
      plan = zoo.make_plan(config, zoo_student, teacher, (28, 28, 1), num_examples=32,
                           steps_per_epoch=2)
      tx = optax.sgd(1e-3)
      state = zoo.init_state(plan, tx, 0, (28, 28, 1))
      initial = jax.device_get(state)
      compiled = mesh_lib.data_parallel_step(zoo.make_step(plan, tx=tx, teacher=teacher), mesh)
      state, frozen = mesh_lib.replicate(state, mesh), mesh_lib.replicate(teacher_vars, mesh)
      for _ in range(3):
        state, metrics = compiled(state, mesh_lib.shard_batch(zoo_batch, mesh), frozen)
      return jax.device_get(state), jax.device_get(metrics), initial

    # 2 devices against 1: CRD's memories (gathered indices and embeddings), FitNets' hint
    # regressor (BatchNorm over the devices), RKD and DIST (relations over the global batch).
    for method, overrides in [("crd", {"num_negatives": 64}), ("fitnet", {}), ("rkd", {}),
                              ("dist", {})]:
      s2, m2, init = run_zoo(method, jax.devices()[:2], overrides)
      s1, m1, _ = run_zoo(method, jax.devices()[:1], overrides)
      out[f"zoo/{method}"] = {
          "params": maxdiff(s2.params, s1.params), "moved": maxdiff(s1.params, init.params),
          "loss": abs(float(m2["loss"]) - float(m1["loss"])), "loss_value": float(m1["loss"]),
          "steps": int(s2.step),
          "batch_stats": maxdiff(s2.batch_stats, s1.batch_stats) if s1.batch_stats else 0.0,
          "stats_moved": maxdiff(s1.batch_stats, init.batch_stats) if s1.batch_stats else 1.0}
    print("RESULT " + json.dumps(out))
    """


@pytest.fixture(scope="module")
def data_parallel_results():
  """One subprocess for every data-parallel case (the JAX start-up is most of its time)."""
  return helpers.run_on_four_devices(_DP_SCRIPT, noise_std=0.1, teacher_dropout_rate=0.0)


def test_data_parallel_matches_single_device(data_parallel_results):
  """The same global batch on 4 forced host devices and on 1 gives the same training."""
  result = {k: r for k, r in data_parallel_results.items() if not k.startswith("zoo/")}
  for key, r in result.items():
    assert r["steps"] == 3, key
    assert r["moved"] > 1e-3, (key, r)  # training did something
    assert r["loss"] < 1e-5, (key, r)
    # Adam divides by the gradient's own scale (up to eps), so it amplifies float noise in
    # near-zero gradients; plain SGD is compared strictly. A device-count-scaled gradient
    # (the sum instead of the mean over devices) gives differences of 1e-4 (Adam) to >1e-1 (SGD).
    tolerance = 3e-5 if key.endswith("adam") else 1e-5
    assert r["params"] < tolerance, (key, r)
    if "batch_stats" in r:
      assert r["stats_moved"] > 1e-3, (key, r)
      assert r["batch_stats"] < 1e-5, (key, r)


def test_zoo_data_parallel_matches_single_device(data_parallel_results):
  """2 devices train the zoo's methods as 1 does: CRD's memories see the whole global batch
  (gathered indices and embeddings), the hint regressor's BatchNorm averages over devices,
  RKD's and DIST's relations span the global batch."""
  zoo_results = {k: r for k, r in data_parallel_results.items() if k.startswith("zoo/")}
  assert sorted(zoo_results) == ["zoo/crd", "zoo/dist", "zoo/fitnet", "zoo/rkd"]
  for key, r in zoo_results.items():
    assert r["steps"] == 3 and r["moved"] > 1e-3, (key, r)
    assert r["params"] < 1e-5 and r["loss"] < 1e-5 * max(1.0, r["loss_value"]), (key, r)
    # CRD's memory rows are unit vectors and its normaliser ~1e2: relative to what moved.
    assert r["batch_stats"] < 1e-5 * max(1.0, r["stats_moved"]), (key, r)


@pytest.mark.parametrize(
  "model, shape",
  [
    (models.LeNet(num_classes=10, width=0.125), (28, 28, 1)),
    (models.NiN(num_classes=10, width=0.25), (32, 32, 3)),
    (models.ConvNet(num_classes=4, block_widths=(8, 16), convs_per_block=1), (28, 28, 1)),
  ],
)
def test_init_state_compiles_the_initialisation_and_draws_the_same_parameters(model, shape):
  from kd_jax.train import loop  # pylint: disable=g-import-not-at-top

  state = loop.init_state(model, optax.sgd(0.1), 5, shape)
  init_rng = jax.random.split(jax.random.PRNGKey(5))[0]
  eager = model.init(init_rng, np.zeros((1, *shape), np.float32), train=False)  # op by op
  # The same draws; a compiled transcendental may round differently in the last bit.
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), state.variables, eager
  )
