"""Mixed precision: bfloat16 compute, float32 parameters, optimizer state and losses.

This CPU has no bfloat16 hardware (XLA emulates it, slowly), so the runs are tiny.
"""

import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from kd_jax import models
from kd_jax.amalgamation import pipeline
from kd_jax.train import distill, steps
from kd_jax.train import mesh as mesh_lib
from kd_jax.train.state import TrainState

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import helpers  # noqa: E402  pylint: disable=g-import-not-at-top
from amalgamation_fixtures import amalgamate_config, idx_data  # noqa: E402,F401  pylint: disable=g-import-not-at-top

# Test accuracy of a bfloat16 smoke run against the same run in float32, on 40–64 test
# images: bfloat16 keeps 8 bits of mantissa, so a few borderline images may flip.
ACCURACY_TOLERANCE = 0.1
# The amalgamation's final epoch-mean training loss, bfloat16 against float32 (relative).
LOSS_TOLERANCE = 0.1


def _float32_leaves(tree):
  return all(
    x.dtype == jnp.float32 for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)
  )


@pytest.mark.parametrize(
  "model",
  [
    models.LeNet(num_classes=10, width=0.125, dropout_rate=0.5),
    models.NiN(num_classes=10, width=0.05),
    models.ConvNet(num_classes=10, block_widths=(8, 16)),
  ],
)
def test_bfloat16_models_keep_float32_parameters(model):
  x = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
  variables = jax.jit(lambda k: model.init(k, x, train=False))(jax.random.key(1))
  low = model.clone(dtype="bfloat16")
  low_variables = jax.jit(lambda k: low.init(k, x, train=False))(jax.random.key(1))
  assert _float32_leaves(low_variables)
  jax.tree.map(np.testing.assert_array_equal, low_variables, variables)  # the same initial values
  full = models.logits_of(model.apply(variables, x, train=False))
  half = models.logits_of(low.apply(variables, x, train=False))
  assert half.dtype == jnp.bfloat16 and full.dtype == jnp.float32
  # bfloat16's relative precision is 2^-8: a few layers keep logits within a few percent.
  scale = float(jnp.max(jnp.abs(full)))
  assert float(jnp.max(jnp.abs(half.astype(jnp.float32) - full))) < 0.05 * scale + 1e-3


def test_a_bfloat16_step_keeps_float32_state_and_losses():
  rng = np.random.default_rng(0)
  batch = {
    "image": rng.normal(size=(8, 28, 28, 1)).astype(np.float32),
    "label": np.arange(8, dtype=np.int32),
  }
  student = models.LeNet(num_classes=10, width=0.125, dtype="bfloat16")
  teacher = models.LeNet(num_classes=10, width=0.25, dtype="bfloat16")
  init = lambda m, k: jax.jit(lambda k: m.init(k, batch["image"][:1], train=False))(
    jax.random.key(k)
  )
  tx = optax.adam(1e-3)
  state = TrainState.create(variables=init(student, 0), tx=tx, rng=jax.random.PRNGKey(2))
  distill = ml_collections.ConfigDict(dict(temperature=4.0, soft_weight=0.9))
  step = steps.make_train_step(
    student=student, tx=tx, objective=steps.make_objective("hinton_kd", distill), teacher=teacher
  )
  mesh = mesh_lib.make_mesh(jax.devices()[:1])
  compiled = mesh_lib.data_parallel_step(step, mesh, donate_state=False)
  new_state, metrics = compiled(
    state, mesh_lib.shard_batch(batch, mesh), mesh_lib.replicate(init(teacher, 1), mesh)
  )
  assert int(metrics["nonfinite"]) == 0
  assert _float32_leaves((new_state.params, new_state.opt_state))
  assert all(v.dtype == jnp.float32 for k, v in metrics.items() if k != "nonfinite")
  assert any(
    not np.array_equal(a, b)
    for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(state.params))
  )
  # Every loss sees float32 logits: the student's and the teacher's are cast first.
  seen = []
  objective = lambda s, t, y, keys: (seen.append((s.dtype, t.dtype)), jnp.mean(s - t))[1]
  steps_ = steps.make_train_step(student=student, tx=tx, objective=objective, teacher=teacher)
  jax.eval_shape(
    mesh_lib.data_parallel_step(steps_, mesh, donate_state=False),
    state,
    mesh_lib.shard_batch(batch, mesh),
    init(teacher, 1),
  )
  assert seen and all(d == (jnp.float32, jnp.float32) for d in seen)


@pytest.fixture(scope="module")
def data_dirs(idx_data):  # noqa: F811
  return idx_data


def _student_config(data_dirs, method, **overrides):
  manual, data_dir = data_dirs
  return helpers.experiment_config(
    "lenet_student",
    f"dataset=fashion_mnist,smoke,method={method}",
    manual_dir=manual,
    data_dir=data_dir,
    **{"steps_per_epoch": 12, **overrides},  # this test's own length, whatever smoke's is
  )


def test_bfloat16_distillation_is_finite_and_near_float32(data_dirs, tmp_path):
  """A LeNet teacher (float32), then Hinton KD into a student in float32 and in bfloat16
  (the teacher in bfloat16 too, in the step): finite, within ACCURACY_TOLERANCE."""
  teacher = str(tmp_path / "teacher")
  distill.train_and_evaluate(
    _student_config(data_dirs, "ground_truth", num_epochs=3, **{"model.width": 0.25}), teacher
  )
  runs = {}
  for dtype in ("float32", "bfloat16"):
    config = _student_config(
      data_dirs,
      "hinton_kd",
      teacher_workdir=teacher,
      num_epochs=3,
      **{
        "model.dtype": dtype,
        "distill.teacher_dtype": dtype,
        "distill.cache_teacher_logits": False,
      },
    )
    runs[dtype] = distill.train_and_evaluate(config, str(tmp_path / dtype))
    assert _float32_leaves(helpers.final_params(str(tmp_path / dtype)))
  for record in runs["bfloat16"]["history"]:
    assert all(np.isfinite(v) for k, v in record.items() if k.startswith(("train_", "test_")))
  assert runs["float32"]["test_accuracy"] > 0.5  # it learned: the comparison means something
  assert (
    abs(runs["bfloat16"]["test_accuracy"] - runs["float32"]["test_accuracy"]) <= ACCURACY_TOLERANCE
  ), runs
  assert runs["bfloat16"]["teacher_agreement"] > 0.5


def test_bfloat16_amalgamation_is_finite_and_near_float32(idx_data, tmp_path):  # noqa: F811
  """The smoke amalgamation in float32, then again from its trained components with the
  student and the teachers in bfloat16: finite, the same test accuracy within
  ACCURACY_TOLERANCE, and the label-free loss falling alike (within LOSS_TOLERANCE of
  float32's at the end). The smoke nets' test accuracy says little here (they overfit the
  tiny pool: components reach train accuracy 1.0 with test accuracy at chance), so the
  loss is compared too."""
  base = str(tmp_path / "float32")
  # Enough steps for the smoke nets to learn (the smoke run makes 6 per component).
  steps = {
    "component.min_steps": 30,
    "component.learning_rate": 3e-3,
    "amalgamation.min_steps": 30,
    "amalgamation.learning_rate": 3e-3,
  }
  full = pipeline.run(amalgamate_config(idx_data, **steps), base)
  teachers = ":".join(os.path.join(base, "teachers", f"teacher_{t}") for t in range(2))
  half = pipeline.run(
    amalgamate_config(
      idx_data,
      teacher_workdirs=teachers,
      **steps,
      **{"amalgamation.dtype": "bfloat16", "amalgamation.teacher_dtype": "bfloat16"},
    ),
    str(tmp_path / "bfloat16"),
  )
  for record in half["history"]:
    assert all(np.isfinite(v) for k, v in record.items() if k.startswith(("train_", "test_")))
  assert _float32_leaves(helpers.final_params(str(tmp_path / "bfloat16")))
  assert abs(half["test_accuracy"] - full["test_accuracy"]) <= ACCURACY_TOLERANCE, (full, half)
  losses = {
    name: [h["train_loss"] for h in run["history"]]
    for name, run in (("float32", full), ("bfloat16", half))
  }
  assert losses["float32"][-1] < 0.8 * losses["float32"][0], losses  # it learned something
  np.testing.assert_allclose(losses["bfloat16"][-1], losses["float32"][-1], rtol=LOSS_TOLERANCE)
