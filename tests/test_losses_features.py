"""Feature, relational, VID and CRD losses against NumPy references, with their properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kd_jax import losses


def _x(seed, shape, scale=1.0):
  return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


def _normalize(x, eps=1e-12):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def _ref_at(s, t, mode="code", p=2):
  reduce = np.mean if mode == "code" else np.sum
  a_s = _normalize(reduce(np.abs(s.astype(np.float64)) ** p, axis=-1).reshape(len(s), -1))
  a_t = _normalize(reduce(np.abs(t.astype(np.float64)) ** p, axis=-1).reshape(len(t), -1))
  if mode == "code":
    return np.mean((a_s - a_t) ** 2)
  return np.mean(np.linalg.norm(a_s - a_t, axis=-1))


def _ref_sp(s, t):
  q_s, q_t = s.reshape(len(s), -1).astype(np.float64), t.reshape(len(t), -1).astype(np.float64)
  g_s, g_t = _normalize(q_s @ q_s.T), _normalize(q_t @ q_t.T)
  return np.sum((g_t - g_s) ** 2) / len(s) ** 2


def _ref_pkt(s, t, eps=1e-7):
  def cond(x):
    x = x.astype(np.float64)
    x = x / (np.linalg.norm(x, axis=1, keepdims=True) + eps)
    k = (x @ x.T + 1) / 2
    return k / k.sum(1, keepdims=True)

  p_s, p_t = cond(s), cond(t)
  return np.mean(p_t * np.log((p_t + eps) / (p_s + eps)))


def _ref_rkd(s, t, wd=25.0, wa=50.0):
  def smooth_l1(a, b):
    d = np.abs(a - b)
    return np.mean(np.where(d < 1, 0.5 * d * d, d - 0.5))

  def dist(e):
    e = e.astype(np.float64)
    d = np.sqrt(np.maximum(((e[:, None] - e[None]) ** 2).sum(-1), 1e-12))
    np.fill_diagonal(d, 0)
    return d / d[d > 0].mean()

  def angle(e):
    e = e.astype(np.float64)
    u = _normalize(e[None, :, :] - e[:, None, :])
    return np.einsum("ijd,ikd->ijk", u, u)

  return wd * smooth_l1(dist(s), dist(t)) + wa * smooth_l1(angle(s), angle(t))


MAP_S, MAP_T = (4, 5, 5, 3), (4, 5, 5, 6)


def test_feature_losses_match_numpy():
  s, t = _x(0, MAP_S), _x(1, MAP_T)
  for mode in ("code", "paper"):
    np.testing.assert_allclose(
      losses.attention_transfer(s, t, mode=mode), _ref_at(s, t, mode), rtol=1e-5
    )
  np.testing.assert_allclose(
    losses.attention_transfer(s, t, p=3.0), _ref_at(s, t, p=3.0), rtol=1e-5
  )
  np.testing.assert_allclose(losses.similarity_preserving(s, t), _ref_sp(s, t), rtol=1e-5)
  t_same = _x(2, MAP_S)
  np.testing.assert_allclose(
    losses.fitnet(s, t_same), np.mean((s.astype(np.float64) - t_same) ** 2), rtol=1e-5
  )
  # A sequence of pairs sums the pairs' terms.
  pairs = losses.attention_transfer([s, t_same], [t, s])
  np.testing.assert_allclose(pairs, _ref_at(s, t) + _ref_at(t_same, s), rtol=1e-5)


def test_relational_losses_match_numpy():
  s, t = _x(3, (6, 8)), _x(4, (6, 12))
  np.testing.assert_allclose(losses.pkt(s, t), _ref_pkt(s, t), rtol=1e-4)
  np.testing.assert_allclose(losses.rkd(s, t), _ref_rkd(s, t), rtol=1e-4)
  np.testing.assert_allclose(losses.rkd(s, t, angle_weight=0.0), _ref_rkd(s, t, wa=0.0), rtol=1e-4)
  np.testing.assert_allclose(
    losses.rkd(s, t, distance_weight=0.0), _ref_rkd(s, t, wd=0.0), rtol=1e-4
  )


def test_vid_matches_numpy_and_broadcasts_per_channel_variance():
  mu, t = _x(5, MAP_S), _x(6, MAP_S)
  var = np.abs(_x(7, (3,))) + 0.5
  want = np.mean(0.5 * ((mu.astype(np.float64) - t) ** 2 / var + np.log(var)))
  np.testing.assert_allclose(losses.vid(mu, var, t), want, rtol=1e-5)
  with pytest.raises(ValueError, match="pred_variance"):
    losses.vid(mu, np.ones(4), t)


def test_invariances():
  s, t = _x(8, MAP_S), _x(9, MAP_T)
  # Attention maps and similarity rows are normalised: scaling a feature map changes nothing.
  np.testing.assert_allclose(
    losses.attention_transfer(3 * s, 0.5 * t), losses.attention_transfer(s, t), rtol=1e-4
  )
  np.testing.assert_allclose(
    losses.similarity_preserving(3 * s, 0.5 * t), losses.similarity_preserving(s, t), rtol=1e-4
  )
  e_s, e_t = _x(10, (6, 8)), _x(11, (6, 5))
  # RKD's distances are normalised by their mean, and angles ignore scale and translation.
  np.testing.assert_allclose(losses.rkd(2 * e_s + 1, e_t - 3), losses.rkd(e_s, e_t), rtol=1e-3)


FEATURE_LOSSES = {
  "fitnet": (lambda s, t: losses.fitnet(s, t), MAP_S, MAP_S),
  "attention_transfer": (lambda s, t: losses.attention_transfer(s, t), MAP_S, MAP_T),
  "attention_transfer[paper]": (
    lambda s, t: losses.attention_transfer(s, t, mode="paper"),
    MAP_S,
    MAP_T,
  ),
  "similarity_preserving": (lambda s, t: losses.similarity_preserving(s, t), MAP_S, MAP_T),
  "pkt": (lambda s, t: losses.pkt(s, t), (5, 6), (5, 7)),
  "rkd": (lambda s, t: losses.rkd(s, t), (5, 6), (5, 7)),
  "vid": (lambda s, t: losses.vid(s, jnp.full((3,), 2.0), t), MAP_S, MAP_S),
}


@pytest.mark.parametrize("name", sorted(FEATURE_LOSSES))
def test_gradients_checked_descend_and_skip_teacher(name):
  fn, s_shape, t_shape = FEATURE_LOSSES[name]
  s, t = _x(12, s_shape), _x(13, t_shape)
  check_grads(lambda x: fn(x, t), (s,), order=1, modes=("rev",), atol=2e-2, rtol=2e-2, eps=1e-2)
  grad = jax.grad(lambda x: fn(x, t))(s)
  step = 0.1 / float(jnp.max(jnp.abs(grad)))
  assert float(fn(s - step * grad, t)) < float(fn(s, t))
  assert float(jnp.abs(jax.grad(lambda x: fn(s, x))(t)).max()) == 0.0


@pytest.mark.parametrize("name", sorted(FEATURE_LOSSES))
def test_finite_for_large_and_bfloat16_inputs_jit_and_vmap(name):
  fn, s_shape, t_shape = FEATURE_LOSSES[name]
  for dtype in (jnp.float32, jnp.bfloat16):
    s, t = jnp.asarray(_x(14, s_shape, 1e3), dtype), jnp.asarray(_x(15, t_shape, 1e3), dtype)
    value, grad = jax.value_and_grad(lambda x, t=t: fn(x, t))(s)
    assert value.dtype == jnp.float32 and np.isfinite(float(value))
    assert np.all(np.isfinite(np.asarray(grad, np.float32)))
  s, t = _x(16, s_shape), _x(17, t_shape)
  np.testing.assert_allclose(jax.jit(fn)(s, t), fn(s, t), rtol=1e-5)
  stacked = jax.vmap(fn)(np.stack([s, s]), np.stack([t, t]))
  np.testing.assert_allclose(stacked, [fn(s, t)] * 2, rtol=1e-5)


def test_zero_when_student_equals_teacher():
  x = _x(18, MAP_S)
  e = _x(19, (5, 6))
  for value in (
    losses.fitnet(x, x),
    losses.attention_transfer(x, x),
    losses.similarity_preserving(x, x),
    losses.pkt(e, e),
    losses.rkd(e, e),
  ):
    assert abs(float(value)) < 1e-6
  # Equal features with a zero-gradient point: a constant student map stays finite.
  g = jax.grad(lambda a: losses.attention_transfer(a, x, mode="paper"))(x)
  assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize(
  "call, message",
  [
    (lambda: losses.attention_transfer(_x(0, MAP_S), _x(1, (4, 4, 4, 3))), "spatial"),
    (lambda: losses.attention_transfer(_x(0, MAP_S), _x(1, MAP_S), p=0.0), "p must"),
    (lambda: losses.attention_transfer(_x(0, MAP_S), _x(1, MAP_S), mode="eq2"), "mode"),
    (lambda: losses.fitnet(_x(0, MAP_S), _x(1, MAP_T)), "same shape"),
    (lambda: losses.fitnet([_x(0, MAP_S)], _x(1, MAP_S)), "both"),
    (lambda: losses.similarity_preserving(_x(0, (4, 3)), _x(1, (5, 3))), "batch"),
    (lambda: losses.pkt(_x(0, (4, 3)), _x(1, (4, 3)), eps=-1.0), "eps"),
    (lambda: losses.rkd(_x(0, (4, 3)), _x(1, (4, 3)), angle_weight=-1.0), "angle_weight"),
    (lambda: losses.rkd(_x(0, (1, 3)), _x(1, (1, 3))), ">= 2"),
  ],
)
def test_invalid_arguments_raise_value_error(call, message):
  with pytest.raises(ValueError, match=message):
    call()
