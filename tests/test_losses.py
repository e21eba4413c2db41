"""kd_jax.losses against independent NumPy formulas and their known properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import losses

B, C = 16, 10


def _logits(seed, shape=(B, C), scale=3.0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale


def _np_log_softmax(z):
  z = z.astype(np.float64)
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _np_kl(s, t, temp):
  log_pt, log_ps = _np_log_softmax(t / temp), _np_log_softmax(s / temp)
  return temp**2 * np.mean(np.sum(np.exp(log_pt) * (log_pt - log_ps), axis=-1))


def _np_cross_entropy(z, y):
  return -np.mean(_np_log_softmax(z)[np.arange(len(y)), y])


LABELS = np.random.default_rng(7).integers(0, C, size=B)


# ------------------------------------------------------------ against NumPy formulas


def test_cross_entropy_matches_numpy():
  z = _logits(0)
  np.testing.assert_allclose(
    losses.cross_entropy(z, LABELS), _np_cross_entropy(z, LABELS), rtol=1e-5
  )


def test_tempered_softmax_matches_numpy():
  z = _logits(1)
  for temp in (0.5, 1.0, 4.0):
    np.testing.assert_allclose(
      losses.tempered_softmax(z, temperature=temp),
      np.exp(_np_log_softmax(z / temp)),
      rtol=1e-5,
      atol=1e-7,
    )


@pytest.mark.parametrize("temp", [1.0, 3.0, 20.0])
def test_distillation_kl_matches_numpy(temp):
  s, t = _logits(2), _logits(3)
  np.testing.assert_allclose(
    losses.distillation_kl(s, t, temperature=temp), _np_kl(s, t, temp), rtol=1e-4
  )


def test_hinton_kd_matches_numpy():
  s, t = _logits(4), _logits(5)
  expected = 0.9 * _np_kl(s, t, 4.0) + 0.1 * _np_cross_entropy(s, LABELS)
  got = losses.hinton_kd(s, t, LABELS, temperature=4.0, soft_weight=0.9)
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_logit_regression_matches_numpy():
  s, t = _logits(6), _logits(7)
  expected = np.sum((s.astype(np.float64) - t) ** 2) / (2 * B)
  np.testing.assert_allclose(losses.logit_regression(s, t), expected, rtol=1e-5)


def test_sample_weights_weight_each_sample():
  # (1/B) Σ w ℓ: the amalgamation's routing masks partition the batch with it.
  s, t = _logits(8), _logits(9)
  w = np.random.default_rng(0).uniform(size=B).astype(np.float32)
  per_sample_lr = 0.5 * np.sum((s.astype(np.float64) - t) ** 2, axis=-1)
  np.testing.assert_allclose(
    losses.logit_regression(s, t, sample_weights=w, reduction="sum_over_batch_size"),
    np.mean(w * per_sample_lr),
    rtol=1e-5,
  )
  log_pt, log_ps = _np_log_softmax(t / 2.0), _np_log_softmax(s / 2.0)
  per_sample_kl = 4.0 * np.sum(np.exp(log_pt) * (log_pt - log_ps), axis=-1)
  np.testing.assert_allclose(
    losses.distillation_kl(
      s, t, temperature=2.0, sample_weights=w, reduction="sum_over_batch_size"
    ),
    np.mean(w * per_sample_kl),
    rtol=1e-4,
  )


def test_prediction_entropy_matches_numpy():
  z = _logits(10)
  log_p = _np_log_softmax(z)
  np.testing.assert_allclose(
    losses.prediction_entropy(z), -np.sum(np.exp(log_p) * log_p, -1), rtol=1e-5
  )


def test_block_alignment_loss_matches_numpy():
  rng = np.random.default_rng(11)
  s = [rng.normal(size=(4, 6, 6, 8)), rng.normal(size=(4, 3, 3, 16))]
  t = [rng.normal(size=(4, 6, 6, 8)), rng.normal(size=(4, 3, 3, 16))]
  expected = np.mean([np.mean((a - b) ** 2, axis=(1, 2, 3)) for a, b in zip(s, t)], axis=0)
  got = losses.block_alignment_loss(
    [x.astype(np.float32) for x in s], [x.astype(np.float32) for x in t]
  )
  assert got.shape == (4,)
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_unit_norm_penalty_matches_numpy():
  w = np.random.default_rng(12).normal(size=(1, 1, 5, 7)).astype(np.float32)
  expected = sum((np.sum(w[..., k].astype(np.float64) ** 2) - 1) ** 2 for k in range(7))
  np.testing.assert_allclose(losses.unit_norm_penalty(w), expected, rtol=1e-5)


# ----------------------------------------------------------------------- properties


def test_distillation_kl_zero_for_identical_and_nonnegative():
  z = _logits(13)
  assert abs(float(losses.distillation_kl(z, z, temperature=3.0))) < 1e-6
  for seed in range(20):
    s, t = _logits(100 + seed), _logits(200 + seed)
    assert float(losses.distillation_kl(s, t, temperature=0.5 + seed)) >= 0.0


def test_t_squared_keeps_soft_gradient_magnitude_across_temperatures():
  s, t = _logits(14), _logits(15)
  grad = jax.grad(lambda x, temp: losses.distillation_kl(x, t, temperature=temp))
  norms = [float(jnp.linalg.norm(grad(s, temp))) for temp in (1.0, 2.0, 5.0, 10.0, 20.0)]
  # Without the T² factor the norm would fall ~400x from T=1 to T=20.
  assert max(norms) / min(norms) < 5.0, norms


def test_high_temperature_gradient_approaches_logit_matching():
  # Hinton et al. 2015 §2.1: for T ≫ |z| and zero-mean logits, ∂KL/∂s ≈ (s − t)/(C·T²)
  # per sample; our loss carries T² and a 1/B batch mean, so its gradient → (s − t)/(C·B).
  s, t = _logits(16, scale=1.0), _logits(17, scale=1.0)
  s, t = s - s.mean(-1, keepdims=True), t - t.mean(-1, keepdims=True)
  limit = (s - t) / (C * B)

  def relative_error(temp):
    grad = jax.grad(lambda x: losses.distillation_kl(x, t, temperature=temp))(s)
    return float(np.abs(grad - limit).max() / np.abs(limit).max())

  assert relative_error(50.0) < 0.03
  assert relative_error(1.0) > 0.3  # ...and the limit really is a high-temperature one.


def test_teacher_receives_no_gradient():
  s, t = _logits(18), _logits(19)
  for fn in (
    lambda tt: losses.distillation_kl(s, tt, temperature=2.0),
    lambda tt: losses.logit_regression(s, tt),
    lambda tt: losses.hinton_kd(s, tt, LABELS, temperature=2.0, soft_weight=0.5),
    lambda tt: jnp.sum(losses.noisy_logits(jax.random.key(0), tt, noise_ratio=0.5, noise_std=0.5)),
  ):
    assert float(jnp.abs(jax.grad(fn)(t)).max()) == 0.0


def test_hinton_kd_weight_endpoints():
  s, t = _logits(20), _logits(21)
  np.testing.assert_allclose(
    losses.hinton_kd(s, t, LABELS, temperature=3.0, soft_weight=0.0),
    _np_cross_entropy(s, LABELS),
    rtol=1e-5,
  )
  np.testing.assert_allclose(
    losses.hinton_kd(s, t, LABELS, temperature=3.0, soft_weight=1.0), _np_kl(s, t, 3.0), rtol=1e-4
  )


def test_noisy_logits_statistics():
  t = _logits(22, shape=(20000, 10)) + 5.0  # away from 0 so that ξ = t'/t − 1 is well defined
  out = np.asarray(losses.noisy_logits(jax.random.key(3), t, noise_ratio=0.3, noise_std=0.2))
  changed = np.any(out != t, axis=-1)
  np.testing.assert_array_equal(out[~changed], t[~changed])  # unselected samples untouched
  assert abs(changed.mean() - 0.3) < 0.02
  xi = out[changed] / t[changed] - 1.0
  assert abs(xi.mean()) < 0.01
  assert abs(xi.std() - 0.2) < 0.01
  # ξ is drawn per logit, not one scalar per sample (the seed's bug).
  assert np.mean(np.std(xi, axis=-1)) > 0.1


def test_noisy_logits_edge_ratios_and_determinism():
  t = _logits(23)
  key = jax.random.key(4)
  np.testing.assert_array_equal(losses.noisy_logits(key, t, noise_ratio=0.0, noise_std=1.0), t)
  np.testing.assert_array_equal(losses.noisy_logits(key, t, noise_ratio=1.0, noise_std=0.0), t)
  a = losses.noisy_logits(key, t, noise_ratio=1.0, noise_std=0.5)
  np.testing.assert_array_equal(a, losses.noisy_logits(key, t, noise_ratio=1.0, noise_std=0.5))
  assert np.all(np.asarray(a) != t)


def test_select_by_entropy_picks_confident_teacher_ties_to_first():
  confident = np.array([[9.0, -9.0], [0.0, 0.0], [1.0, 1.0]], np.float32)
  vague = np.array([[0.0, 0.0, 0.0], [9.0, -9.0, -9.0], [1.0, 1.0, 1.0]], np.float32)
  mask = np.asarray(losses.select_by_entropy([confident, vague]))
  np.testing.assert_array_equal(mask, [[1, 0], [0, 1], [1, 0]])
  # Two identical teachers: a tie everywhere, which goes to the first.
  tie = np.asarray(losses.select_by_entropy([confident, confident]))
  np.testing.assert_array_equal(tie[:, 0], 1)


def test_select_by_entropy_normalized_compares_class_counts():
  # Both uniform: raw entropies log 2 < log 4 pick teacher 0; normalised they tie (→ 0),
  # and a slightly peaked 4-class teacher then wins over a uniform 2-class one.
  two = np.zeros((1, 2), np.float32)
  four = np.array([[0.3, 0.0, 0.0, 0.0]], np.float32)
  assert np.asarray(losses.select_by_entropy([two, four]))[0].tolist() == [1, 0]
  assert np.asarray(losses.select_by_entropy([two, four], normalize=True))[0].tolist() == [0, 1]


def test_unit_norm_penalty_zero_for_unit_filters():
  w = np.random.default_rng(24).normal(size=(1, 1, 6, 4))
  w /= np.sqrt(np.sum(w**2, axis=(0, 1, 2), keepdims=True))
  assert float(losses.unit_norm_penalty(w.astype(np.float32))) < 1e-10
  assert float(losses.unit_norm_penalty(2 * w.astype(np.float32))) > 1.0


def test_block_alignment_loss_zero_for_identical():
  x = [_logits(25, (3, 4, 4, 2)), _logits(26, (3, 2, 2, 5))]
  np.testing.assert_array_equal(losses.block_alignment_loss(x, x), np.zeros(3))


# ------------------------------------------------------- numerics and transformations


def test_finite_for_huge_logits_and_bfloat16():
  s = _logits(27, scale=1e4)
  t = _logits(28, scale=1e4)
  for z_s, z_t in ((s, t), (jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16))):
    values = [
      losses.cross_entropy(z_s, LABELS),
      losses.distillation_kl(z_s, z_t, temperature=1.0),
      losses.hinton_kd(z_s, z_t, LABELS, temperature=2.0, soft_weight=0.7),
      losses.logit_regression(z_s, z_t),
      losses.prediction_entropy(z_s),
      losses.tempered_softmax(z_s, temperature=1.0),
    ]
    for v in values:
      assert v.dtype == jnp.float32
      assert np.all(np.isfinite(np.asarray(v)))
    g = jax.grad(
      lambda x, z_t=z_t: losses.hinton_kd(x, z_t, LABELS, temperature=2.0, soft_weight=0.7)
    )(z_s)
    assert np.all(np.isfinite(np.asarray(g, np.float32)))
  # bfloat16 inputs are upcast before the reductions: same result as float32 inputs.
  s_small, t_small = _logits(29), _logits(30)
  bf = losses.distillation_kl(
    jnp.asarray(s_small, jnp.bfloat16), jnp.asarray(t_small, jnp.bfloat16), temperature=2.0
  )
  ref = _np_kl(
    np.asarray(jnp.asarray(s_small, jnp.bfloat16), np.float32),
    np.asarray(jnp.asarray(t_small, jnp.bfloat16), np.float32),
    2.0,
  )
  np.testing.assert_allclose(bf, ref, rtol=1e-4)


def test_jit_and_vmap():
  s, t = _logits(31), _logits(32)
  jitted = jax.jit(losses.hinton_kd, static_argnames=("temperature", "soft_weight"))
  np.testing.assert_allclose(
    jitted(s, t, LABELS, temperature=2.0, soft_weight=0.5),
    losses.hinton_kd(s, t, LABELS, temperature=2.0, soft_weight=0.5),
    rtol=1e-6,
  )
  # vmap over a leading "teacher" axis of stacked logits.
  stacked = np.stack([t, s])
  per_teacher = jax.vmap(lambda z: losses.logit_regression(s, z))(stacked)
  np.testing.assert_allclose(
    per_teacher, [losses.logit_regression(s, t), 0.0], rtol=1e-6, atol=1e-7
  )
  # Traced hyper-parameters are accepted (checked only when concrete).
  f = jax.jit(lambda temp: losses.distillation_kl(s, t, temperature=temp))
  np.testing.assert_allclose(f(2.0), _np_kl(s, t, 2.0), rtol=1e-4)


# ---------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
  "call, message",
  [
    (lambda s, t: losses.tempered_softmax(s, temperature=0.0), "temperature"),
    (lambda s, t: losses.distillation_kl(s, t, temperature=-1.0), "temperature"),
    (lambda s, t: losses.hinton_kd(s, t, LABELS, temperature=0.0, soft_weight=0.5), "temperature"),
    (lambda s, t: losses.hinton_kd(s, t, LABELS, temperature=2.0, soft_weight=1.5), "soft_weight"),
    (
      lambda s, t: losses.noisy_logits(jax.random.key(0), t, noise_ratio=-0.1, noise_std=0.1),
      "noise_ratio",
    ),
    (
      lambda s, t: losses.noisy_logits(jax.random.key(0), t, noise_ratio=0.5, noise_std=-1.0),
      "noise_std",
    ),
    (lambda s, t: losses.distillation_kl(s, t[:, :5], temperature=1.0), "same shape"),
    (lambda s, t: losses.logit_regression(s, t[:4]), "same shape"),
    (lambda s, t: losses.logit_regression(s[0], t[0]), "student_logits"),
    (lambda s, t: losses.logit_regression(s, t, sample_weights=np.ones(3)), "sample_weights"),
    (lambda s, t: losses.cross_entropy(s, LABELS[:3]), "labels"),
    (lambda s, t: losses.cross_entropy(s, LABELS.astype(np.float32)), "labels"),
    (lambda s, t: losses.select_by_entropy([]), "logits_per_teacher"),
    (lambda s, t: losses.select_by_entropy([s, t[:4]]), "batch size"),
    (lambda s, t: losses.select_by_entropy([s, t[:, :1]], normalize=True), "2 classes"),
    (lambda s, t: losses.block_alignment_loss([], []), "non-empty"),
    (lambda s, t: losses.block_alignment_loss([s], [s, t]), "as many blocks"),
    (lambda s, t: losses.block_alignment_loss([s], [t[:, :3]]), "same shape"),
    (lambda s, t: losses.unit_norm_penalty(np.ones(3)), "kernel"),
  ],
)
def test_invalid_arguments_raise_value_error(call, message):
  s, t = _logits(33), _logits(34)
  with pytest.raises(ValueError, match=message):
    call(s, t)


def test_invalid_arguments_raise_at_trace_time():
  s, t = _logits(35), _logits(36)
  with pytest.raises(ValueError, match=r"temperature must be > 0, got 0\.0"):
    jax.jit(lambda a, b: losses.distillation_kl(a, b, temperature=0.0))(s, t)
