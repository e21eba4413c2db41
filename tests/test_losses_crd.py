"""CRD's loss and functional memory against a NumPy transcription of its semantics, and the
HintRegressor / VIDRegressor modules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kd_jax import losses
from kd_jax.models.regressors import HintRegressor, VIDRegressor

B, D, N, K = 6, 8, 40, 5


def _unit(seed, shape):
  x = np.random.default_rng(seed).normal(size=shape)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _ref_crd(s, t, idx, contrast, mem_s, mem_t, z_s, z_t, tau=0.07, momentum=0.5, eps=1e-7):
  """torchdistill's CRDLoss.forward in NumPy (float64): loss, banks and normalisers after."""
  s, t = s.astype(np.float64), t.astype(np.float64)
  out_s = np.exp(np.einsum("bkd,bd->bk", mem_t[contrast], s) / tau)
  out_t = np.exp(np.einsum("bkd,bd->bk", mem_s[contrast], t) / tau)
  z_s = out_s.mean() * N if z_s < 0 else z_s
  z_t = out_t.mean() * N if z_t < 0 else z_t

  def nce(x):
    m, pn = x.shape[1] - 1, 1.0 / N
    log_d1 = np.log(x[:, 0] / (x[:, 0] + m * pn + eps))
    log_d0 = np.log(m * pn / (x[:, 1:] + m * pn + eps))
    return -(log_d1.sum() + log_d0.sum()) / x.shape[0]

  loss = nce(out_s / z_s) + nce(out_t / z_t)
  mem_s, mem_t = mem_s.copy(), mem_t.copy()
  for bank, e in ((mem_s, s), (mem_t, t)):
    rows = bank[idx] * momentum + e * (1 - momentum)
    bank[idx] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
  return loss, mem_s, mem_t, z_s, z_t


def test_crd_matches_numpy_over_two_steps():
  memory = losses.crd_init(jax.random.key(0), num_samples=N, embedding_dim=D)
  bound = 1 / np.sqrt(D / 3)
  assert memory.student.shape == (N, D) and float(jnp.abs(memory.student).max()) <= bound
  ref = (np.asarray(memory.student, np.float64), np.asarray(memory.teacher, np.float64), -1.0, -1.0)
  rng = np.random.default_rng(1)
  for step in range(2):
    s, t = _unit(10 + step, (B, D)), _unit(20 + step, (B, D))
    idx = rng.choice(N, size=B, replace=False)
    contrast = np.concatenate([idx[:, None], rng.integers(0, N, size=(B, K))], axis=1)
    loss, memory = losses.crd_loss(s, t, idx, memory, contrast_indices=contrast)
    want, *ref = _ref_crd(s, t, idx, contrast, *ref)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(memory.student, ref[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(memory.teacher, ref[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([memory.student_norm, memory.teacher_norm], ref[2:], rtol=1e-5)


def test_crd_draws_negatives_from_the_key_and_updates_only_positives():
  memory = losses.crd_init(jax.random.key(1), num_samples=N, embedding_dim=D)
  s, t, idx = _unit(30, (B, D)), _unit(31, (B, D)), np.arange(B) * 3
  step = jax.jit(lambda m, k: losses.crd_loss(s, t, idx, m, k, num_negatives=K))
  loss_a, new = step(memory, jax.random.key(2))
  loss_b, _ = step(memory, jax.random.key(2))
  loss_c, _ = step(memory, jax.random.key(3))
  assert float(loss_a) == float(loss_b) and float(loss_a) != float(loss_c)
  untouched = np.setdiff1d(np.arange(N), idx)
  np.testing.assert_array_equal(new.student[untouched], memory.student[untouched])
  np.testing.assert_allclose(np.linalg.norm(new.student[idx], axis=1), 1.0, rtol=1e-5)
  assert float(new.student_norm) > 0 and float(memory.student_norm) == -1.0
  # The normaliser is set once: the next call keeps it.
  _, newer = step(new, jax.random.key(4))
  assert float(newer.student_norm) == float(new.student_norm)


def test_crd_gradients_and_finiteness():
  memory = losses.crd_init(jax.random.key(5), num_samples=N, embedding_dim=D)
  _, memory = losses.crd_loss(
    _unit(40, (B, D)), _unit(41, (B, D)), np.arange(B), memory, jax.random.key(6), num_negatives=K
  )
  s, t = _unit(42, (B, D)), _unit(43, (B, D))
  idx = np.arange(B) + 10

  def loss(a, b):
    return losses.crd_loss(a, b, idx, memory, jax.random.key(7), num_negatives=K)[0]

  check_grads(loss, (s, t), order=1, modes=("rev",), atol=2e-2, rtol=2e-2, eps=1e-2)
  big = jnp.asarray(s * 1e3, jnp.bfloat16)
  value, grad = jax.value_and_grad(loss)(big, t)
  assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad, np.float32)))


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(temperature=0.0), "temperature"),
    (dict(momentum=1.5), "momentum"),
    (dict(eps=-1.0), "eps"),
    (dict(num_negatives=0), "num_negatives"),
  ],
)
def test_crd_invalid_arguments(kwargs, message):
  memory = losses.crd_init(jax.random.key(8), num_samples=N, embedding_dim=D)
  with pytest.raises(ValueError, match=message):
    losses.crd_loss(
      _unit(0, (B, D)), _unit(1, (B, D)), np.arange(B), memory, jax.random.key(0), **kwargs
    )
  with pytest.raises(ValueError, match="key"):
    losses.crd_loss(_unit(0, (B, D)), _unit(1, (B, D)), np.arange(B), memory)
  with pytest.raises(ValueError, match="indices"):
    losses.crd_loss(_unit(0, (B, D)), _unit(1, (B, D)), np.arange(3), memory, jax.random.key(0))


# ----------------------------------------------------------------------------- regressors


@pytest.mark.parametrize(
  "student_hw, teacher_hw",
  [((8, 8), (4, 4)), ((4, 4), (8, 8)), ((7, 7), (5, 5)), ((6, 6), (6, 6))],
)
def test_hint_regressor_resizes_to_the_teacher(student_hw, teacher_hw):
  x = np.random.default_rng(0).normal(size=(2, *student_hw, 3)).astype(np.float32)
  module = HintRegressor(features=5, target_size=teacher_hw)
  variables = module.init(jax.random.key(0), x, train=False)
  y, updates = module.apply(variables, x, train=True, mutable=["batch_stats"])
  assert y.shape == (2, *teacher_hw, 5)
  assert float(jnp.min(y)) >= 0.0  # ReLU
  assert "batch_stats" in updates
  target = np.ones((2, *teacher_hw, 5), np.float32)

  def loss(params):
    out, _ = module.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
    return losses.fitnet(out, target)

  grads = jax.grad(loss)(variables["params"])
  assert float(jnp.abs(grads["conv"]["kernel"]).max()) > 0


def test_hint_regressor_refuses_a_smaller_student():
  x = np.zeros((1, 3, 3, 2), np.float32)
  with pytest.raises(ValueError, match="cannot map"):
    HintRegressor(features=4, target_size=(5, 5)).init(jax.random.key(0), x, train=False)


def test_vid_regressor_owns_a_trainable_variance():
  x = np.random.default_rng(1).normal(size=(2, 4, 4, 3)).astype(np.float32)
  t = np.random.default_rng(2).normal(size=(2, 4, 4, 6)).astype(np.float32)
  module = VIDRegressor(features=6)
  params = module.init(jax.random.key(0), x)["params"]
  mean, variance = module.apply({"params": params}, x)
  assert mean.shape == t.shape and variance.shape == (6,)
  np.testing.assert_allclose(variance, 5.0, rtol=1e-6)

  def loss(p):
    return losses.vid(*module.apply({"params": p}, x), t)

  grads = jax.grad(loss)(params)
  assert float(jnp.abs(grads["variance_param"]).max()) > 0  # the variance trains
  assert np.isfinite(float(loss(params)))
