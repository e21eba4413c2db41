"""Per-example dropout and noise: the same run on 1, 2 and 4 devices."""

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kd_jax.models import Dropout
from kd_jax.models.dropout import example_keys


def _apply(module, x, key, **kw):
  return module.apply({}, x, rngs={"dropout": key}, **kw)


def test_an_examples_mask_depends_on_its_position_only():
  x = jnp.ones((6, 50))
  key = jax.random.key(3)
  out = _apply(Dropout(0.5, deterministic=False), x, key)
  # Inverted dropout: kept units are scaled by 1/keep_prob, dropped ones are 0.
  assert set(np.unique(np.asarray(out))) == {0.0, 2.0}
  assert 0.35 < float(jnp.mean(out == 0)) < 0.65
  # Row i is drawn from fold_in(key, i): a batch of the first 3 rows gets the same masks,
  # and each row's mask is the one a 1-row draw from its own key gives.
  np.testing.assert_array_equal(_apply(Dropout(0.5, deterministic=False), x[:3], key), out[:3])
  rows = np.asarray(out) != 0
  assert not all(np.array_equal(rows[0], r) for r in rows[1:])  # not one mask for every example
  np.testing.assert_array_equal(_apply(Dropout(0.5), x, key, deterministic=True), x)
  np.testing.assert_array_equal(_apply(Dropout(1.0, deterministic=False), x, key), 0.0)


def test_example_keys_fold_in_positions_and_shard_map_keeps_the_masks():
  """`example_keys` is `fold_in(key, i)` per row; under `shard_map` with `axis_name` the
  layer draws the masks it draws unsharded (one device here; 2 and 4 in the test below)."""
  key = jax.random.key(5)
  keys = example_keys(key, 4, None)
  for i in range(4):
    np.testing.assert_array_equal(
      jax.random.key_data(keys[i]), jax.random.key_data(jax.random.fold_in(key, i))
    )
  mesh = jax.make_mesh((1,), ("data",))
  x = jax.device_put(jnp.ones((4, 20)), NamedSharding(mesh, P("data")))
  layer = Dropout(0.5, deterministic=False, axis_name="data")
  sharded = jax.jit(
    jax.shard_map(
      lambda x: _apply(layer, x, key), mesh=mesh, in_specs=P("data"), out_specs=P("data")
    )
  )
  np.testing.assert_array_equal(sharded(x), _apply(Dropout(0.5, deterministic=False), x, key))


# Runs after helpers.FOUR_DEVICE_PREAMBLE (batch, distill, teacher, maxdiff).
_SCRIPT = """
    def run(student, method, devices, teacher_dropout=False, num_steps=3):
      mesh = mesh_lib.make_mesh(devices)
      tx = optax.sgd(0.05)
      variables = jax.jit(lambda k: student.init(k, batch["image"][:1], train=False))(jax.random.PRNGKey(0))
      state = TrainState.create(variables=variables, tx=tx, rng=jax.random.PRNGKey(2))
      uses_teacher = method != "ground_truth"
      step = steps.make_train_step(student=student, tx=tx, objective=steps.make_objective(method, distill),
                                   teacher=teacher if uses_teacher else None, teacher_dropout=teacher_dropout)
      compiled = mesh_lib.data_parallel_step(step, mesh)
      state = mesh_lib.replicate(state, mesh)
      frozen = mesh_lib.replicate(teacher_vars if uses_teacher else {}, mesh)
      for _ in range(num_steps):
        state, metrics = compiled(state, mesh_lib.shard_batch(batch, mesh), frozen)
      return jax.device_get(state.params)

    lenet = models.LeNet(num_classes=10, width=0.125, dropout_rate=0.5)
    convnet = models.ConvNet(num_classes=10, block_widths=(8, 16), norm="batch", dropout_rate=0.5)
    cases = {"lenet_dropout/ground_truth": (lenet, "ground_truth", False),
             "convnet_dropout_bn/ground_truth": (convnet, "ground_truth", False),
             "lenet/noisy_teacher": (models.LeNet(num_classes=10, width=0.125), "noisy_teacher", False),
             "lenet/hinton_kd_teacher_dropout": (models.LeNet(num_classes=10, width=0.125), "hinton_kd", True)}
    out = {}
    for name, (model, method, teacher_dropout) in cases.items():
      runs = {n: run(model, method, jax.devices()[:n], teacher_dropout) for n in (1, 2, 4)}
      # What the randomness changes: the same run without it (no dropout, no noise).
      plain = run(model.clone(dropout_rate=0.0), "logit_regression" if method == "noisy_teacher" else method,
                  jax.devices()[:1])
      out[name] = {"2": maxdiff(runs[2], runs[1]), "4": maxdiff(runs[4], runs[1]),
                   "random_effect": maxdiff(plain, runs[1])}
    print("RESULT " + json.dumps(out))
    """


def test_one_two_and_four_devices_train_the_same_run():
  """Dropout (student and teacher) and the noisy teacher's noise draw the same numbers for
  the same global batch on 1, 2 and 4 forced host devices."""
  result = helpers.run_on_four_devices(_SCRIPT, noise_std=0.5, teacher_dropout_rate=0.5)
  assert len(result) == 4
  for name, r in result.items():
    # The random numbers matter (without them the parameters move by this much)...
    assert r["random_effect"] > 1e-4, (name, r)
    # ...and are the same on every device count: what is left is float summation order (SGD).
    # A draw per device changes the parameters by about `random_effect`.
    assert max(r["2"], r["4"]) < min(1e-5, r["random_effect"] / 100), (name, r)


@pytest.mark.parametrize("rate", [0.25, 0.5])
def test_keep_rate(rate):
  out = _apply(Dropout(rate, deterministic=False), jnp.ones((64, 64)), jax.random.key(0))
  assert abs(float(jnp.mean(out == 0)) - rate) < 0.03
