"""Logit losses: reductions and masks, `[..., C]` logits, exactness over the temperature range,
and DKD / logit-standardised KD / DIST against NumPy references (long double)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kd_jax import losses

B, C = 8, 10
LD = np.longdouble
# The references cancel at high temperatures; extended precision keeps them exact there.
EXTENDED = np.finfo(LD).eps < 1e-18


def _logits(seed, shape=(B, C), scale=3.0):
  return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


def _labels(seed, n=B, c=C):
  return np.random.default_rng(seed).integers(0, c, size=n)


def _log_softmax(z, mask=None):
  z = np.asarray(z, LD)
  if mask is not None:
    z = np.where(mask, z, -np.inf)
  z = z - z.max(axis=-1, keepdims=True)
  out = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
  return out if mask is None else np.where(mask, out, 0)


def _ref_kl(s, t, temp, mask=None):
  """Per-row T² KL(softmax(t/T) ‖ softmax(s/T)), in long double."""
  lp, lq = (
    _log_softmax(np.asarray(t, LD) / temp, mask),
    _log_softmax(np.asarray(s, LD) / temp, mask),
  )
  p = np.exp(lp) if mask is None else np.where(mask, np.exp(lp), 0)
  return LD(temp) ** 2 * np.sum(p * (lp - lq), axis=-1)


def _ref_dkd(s, t, y, temp, alpha=1.0, beta=8.0):
  gt = np.arange(s.shape[1])[None, :] == y[:, None]

  def binary(z):
    lz = _log_softmax(np.asarray(z, LD) / temp)
    log_gt = lz[gt]
    rest = np.where(gt, -np.inf, lz)
    peak = rest.max(axis=-1)
    log_rest = peak + np.log(np.sum(np.exp(rest - peak[:, None]), axis=-1))
    return np.stack([log_gt, log_rest], axis=-1)

  lb_t, lb_s = binary(t), binary(s)
  tckd = LD(temp) ** 2 * np.sum(np.exp(lb_t) * (lb_t - lb_s), axis=-1)
  nckd = _ref_kl(s, t, temp, ~gt)
  return np.mean(alpha * tckd + beta * nckd)


def _ref_standardize(z, eps=1e-7):
  z = np.asarray(z, LD)
  return (z - z.mean(-1, keepdims=True)) / (eps + z.std(-1, ddof=1, keepdims=True))


def _ref_dist(s, t, temp, beta=1.0, gamma=1.0, eps=1e-8):
  def softmax(z):
    return np.exp(_log_softmax(np.asarray(z, LD) / temp))

  def pearson(a, b):
    a, b = a - a.mean(-1, keepdims=True), b - b.mean(-1, keepdims=True)
    na = np.maximum(np.sqrt((a * a).sum(-1)), eps)
    nb = np.maximum(np.sqrt((b * b).sum(-1)), eps)
    return (a * b).sum(-1) / (na * nb)

  y_s, y_t = softmax(s), softmax(t)
  inter = 1 - pearson(y_s, y_t).mean()
  intra = 1 - pearson(y_s.T, y_t.T).mean()
  return LD(temp) ** 2 * (beta * inter + gamma * intra)


# --------------------------------------------------------------- reductions and sample weights


REDUCIBLE = {
  "cross_entropy": lambda s, t, y, **kw: losses.cross_entropy(s, y, **kw),
  "distillation_kl": lambda s, t, y, **kw: losses.distillation_kl(s, t, temperature=2.0, **kw),
  "hinton_kd": lambda s, t, y, **kw: losses.hinton_kd(
    s, t, y, temperature=2.0, soft_weight=0.7, **kw
  ),
  "logit_regression": lambda s, t, y, **kw: losses.logit_regression(s, t, **kw),
}


@pytest.mark.parametrize("name", sorted(REDUCIBLE))
def test_reductions_and_mask_semantics(name):
  fn = REDUCIBLE[name]
  s, t, y = _logits(1), _logits(2), _labels(3)
  per_sample = np.asarray(fn(s, t, y, reduction="none"), np.float64)
  assert per_sample.shape == (B,)
  np.testing.assert_allclose(fn(s, t, y), per_sample.mean(), rtol=1e-5)
  np.testing.assert_allclose(fn(s, t, y, reduction="sum"), per_sample.sum(), rtol=1e-5)
  mask = np.array([1, 0, 1, 1, 0, 0, 1, 0], np.float32)
  kept = mask.astype(bool)
  # A 0/1 mask gives the mean over the kept samples: the loss of the kept batch.
  np.testing.assert_allclose(
    fn(s, t, y, sample_weights=mask), fn(s[kept], t[kept], y[kept]), rtol=1e-5
  )
  np.testing.assert_allclose(
    fn(s, t, y, sample_weights=mask, reduction="sum_over_batch_size"),
    per_sample[kept].sum() / B,
    rtol=1e-5,
  )
  np.testing.assert_allclose(
    fn(s, t, y, sample_weights=mask, reduction="none"), per_sample * mask, rtol=1e-5
  )
  w = np.random.default_rng(4).uniform(size=B).astype(np.float32)
  np.testing.assert_allclose(
    fn(s, t, y, sample_weights=w), np.sum(w * per_sample) / np.sum(w), rtol=1e-5
  )
  assert float(fn(s, t, y, sample_weights=np.zeros(B, np.float32))) == 0.0
  with pytest.raises(ValueError, match="reduction"):
    fn(s, t, y, reduction="average")


@pytest.mark.parametrize("name", sorted(REDUCIBLE))
def test_leading_axes_are_samples(name):
  fn = REDUCIBLE[name]
  s, t, y = _logits(5, (2, 4, C)), _logits(6, (2, 4, C)), _labels(7, 8).reshape(2, 4)
  flat = fn(s.reshape(8, C), t.reshape(8, C), y.reshape(8), reduction="none")
  none = fn(s, t, y, reduction="none")
  assert none.shape == (2, 4)
  np.testing.assert_allclose(np.asarray(none).reshape(8), flat, rtol=1e-6)
  np.testing.assert_allclose(fn(s, t, y), jnp.mean(flat), rtol=1e-6)
  w = np.ones((2, 4), np.float32)
  np.testing.assert_allclose(fn(s, t, y, sample_weights=w), jnp.mean(flat), rtol=1e-6)


def test_other_shapes_keep_their_shape():
  z = _logits(8, (2, 3, C))
  assert losses.tempered_softmax(z, temperature=2.0).shape == (2, 3, C)
  assert losses.prediction_entropy(z).shape == (2, 3)
  noisy = losses.noisy_logits(jax.random.key(0), z, noise_ratio=0.5, noise_std=0.1)
  assert noisy.shape == (2, 3, C)


# ----------------------------------------------------------- exact over the temperature range

TEMPERATURES = [1e-2, 0.3, 1.0, 4.0, 100.0, 1e4, 1e6]
SCALES = [1.0, 100.0, 1e4]


def _grid_inputs(scale, temp):
  seed = int(np.log10(temp) * 10 + 100 + scale % 97)
  return _logits(seed, scale=scale), _logits(seed + 1, scale=scale), _labels(seed)


@pytest.mark.skipif(not EXTENDED, reason="needs an extended-precision long double reference")
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("temp", TEMPERATURES)
def test_tempered_losses_exact_over_the_range(temp, scale):
  s, t, y = _grid_inputs(scale, temp)
  checks = {
    "distillation_kl": (
      losses.distillation_kl(s, t, temperature=temp, reduction="none"),
      _ref_kl(s, t, temp),
    ),
    "hinton_kd": (
      losses.hinton_kd(s, t, y, temperature=temp, soft_weight=0.9),
      0.9 * np.mean(_ref_kl(s, t, temp)) - 0.1 * np.mean(_log_softmax(s)[np.arange(B), y]),
    ),
    "dkd": (losses.dkd(s, t, y, temperature=temp), _ref_dkd(s, t, y, temp)),
    "logit_standardized_kd": (
      losses.logit_standardized_kd(s, t, temperature=temp),
      np.mean(_ref_kl(_ref_standardize(s), _ref_standardize(t), temp)),
    ),
    "dist": (losses.dist(s, t, temperature=temp), _ref_dist(s, t, temp)),
  }
  for name, (got, want) in checks.items():
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.all(np.isfinite(got)), name
    np.testing.assert_allclose(got, want, rtol=1e-4, err_msg=f"{name} T={temp} scale={scale}")


def test_high_temperature_limit_is_half_the_variance():
  # T² KL → (1/2) Var_p0(t − s) with p0 uniform: the T = 1e6 case (today ~4.3).
  s, t = _logits(40), _logits(41)
  got = losses.distillation_kl(s, t, temperature=1e6, reduction="none")
  want = 0.5 * np.var(t.astype(np.float64) - s, axis=-1)
  np.testing.assert_allclose(got, want, rtol=1e-4)
  assert np.all(np.asarray(losses.distillation_kl(s, t, temperature=1e6)) > 0)


def test_temperature_must_be_finite():
  s, t = _logits(42), _logits(43)
  with pytest.raises(ValueError, match="temperature must be finite"):
    losses.distillation_kl(s, t, temperature=float("inf"))


# ---------------------------------------------------------------- the new logit methods


def test_new_logit_methods_match_numpy_at_defaults():
  s, t, y = _logits(50), _logits(51), _labels(52)
  np.testing.assert_allclose(losses.dkd(s, t, y), _ref_dkd(s, t, y, 4.0), rtol=1e-5)
  np.testing.assert_allclose(
    losses.dkd(s, t, y, alpha=0.5, beta=2.0, temperature=3.0),
    _ref_dkd(s, t, y, 3.0, 0.5, 2.0),
    rtol=1e-5,
  )
  np.testing.assert_allclose(
    losses.logit_standardized_kd(s, t),
    np.mean(_ref_kl(_ref_standardize(s), _ref_standardize(t), 2.0)),
    rtol=1e-5,
  )
  np.testing.assert_allclose(losses.dist(s, t), _ref_dist(s, t, 1.0), rtol=1e-5)
  np.testing.assert_allclose(
    losses.dist(s, t, beta=2.0, gamma=0.5, temperature=4.0),
    _ref_dist(s, t, 4.0, 2.0, 0.5),
    rtol=1e-5,
  )


def test_dkd_decomposes_the_kl():
  # Zhao et al. eq. (1): KL = TCKD + (1 − p_t,y) · NCKD with the teacher's target probability.
  s, t, y = _logits(53), _logits(54), _labels(55)
  tckd = losses.dkd(s, t, y, alpha=1.0, beta=0.0, temperature=2.0)
  p_rest = 1 - np.exp(_log_softmax(t / 2.0))[np.arange(B), y]
  nckd_rows = _ref_kl(s, t, 2.0, np.arange(C)[None, :] != y[:, None])
  kl = losses.distillation_kl(s, t, temperature=2.0)
  expected = float(tckd) + float(np.mean(p_rest * nckd_rows))
  np.testing.assert_allclose(kl, expected, rtol=1e-5)


def test_logit_standardized_kd_invariances():
  s, t = _logits(56), _logits(57)
  base = losses.logit_standardized_kd(s, t)
  # Invariant to shifting and (positively) scaling each sample's logits.
  shifted = losses.logit_standardized_kd(3.0 * s + 7.0, 0.5 * t - 2.0)
  np.testing.assert_allclose(shifted, base, rtol=1e-4)
  assert float(losses.logit_standardized_kd(s, 5.0 * s + 1.0)) < 1e-6


def test_dist_invariant_to_logit_shift_and_zero_for_equal():
  s, t = _logits(58), _logits(59)
  np.testing.assert_allclose(losses.dist(s + 5.0, t - 3.0), losses.dist(s, t), rtol=1e-5)
  assert abs(float(losses.dist(s, s))) < 1e-6


LOGIT_METHODS = {
  "distillation_kl": lambda s, t, y: losses.distillation_kl(s, t, temperature=3.0),
  "hinton_kd": lambda s, t, y: losses.hinton_kd(s, t, y, temperature=3.0, soft_weight=0.9),
  "dkd": lambda s, t, y: losses.dkd(s, t, y),
  "logit_standardized_kd": lambda s, t, y: losses.logit_standardized_kd(s, t),
  "dist": lambda s, t, y: losses.dist(s, t),
  "cross_entropy": lambda s, t, y: losses.cross_entropy(s, y),
  "logit_regression": lambda s, t, y: losses.logit_regression(s, t),
}


@pytest.mark.parametrize("name", sorted(LOGIT_METHODS))
def test_gradients_checked_descend_and_skip_teacher(name):
  fn = LOGIT_METHODS[name]
  s, t, y = _logits(60, (4, 5), 1.0), _logits(61, (4, 5), 1.0), _labels(62, 4, 5)
  check_grads(lambda x: fn(x, t, y), (s,), order=1, modes=("rev",), atol=2e-2, rtol=2e-2, eps=1e-2)
  grad = jax.grad(lambda x: fn(x, t, y))(s)
  assert float(fn(s - 0.05 * grad, t, y)) < float(fn(s, t, y))
  assert float(jnp.abs(jax.grad(lambda x: fn(s, x, y))(t)).max()) == 0.0


@pytest.mark.parametrize("name", sorted(LOGIT_METHODS))
def test_finite_for_huge_and_bfloat16_logits_jit_and_vmap(name):
  fn = LOGIT_METHODS[name]
  y = _labels(63)
  for dtype in (jnp.float32, jnp.bfloat16):
    s, t = jnp.asarray(_logits(64, scale=1e4), dtype), jnp.asarray(_logits(65, scale=1e4), dtype)
    value, grad = jax.value_and_grad(lambda x, t=t: fn(x, t, y))(s)
    assert value.dtype == jnp.float32 and np.isfinite(float(value))
    assert np.all(np.isfinite(np.asarray(grad, np.float32)))
  s, t = _logits(66), _logits(67)
  np.testing.assert_allclose(jax.jit(fn)(s, t, y), fn(s, t, y), rtol=1e-5)
  stacked = jax.vmap(lambda a, b: fn(a, b, y))(np.stack([s, t]), np.stack([t, s]))
  np.testing.assert_allclose(stacked, [fn(s, t, y), fn(t, s, y)], rtol=1e-5)


def test_zero_when_student_equals_teacher():
  z, y = _logits(68), _labels(69)
  for name in ("distillation_kl", "dkd", "logit_standardized_kd", "dist", "logit_regression"):
    assert abs(float(LOGIT_METHODS[name](z, z, y))) < 1e-6, name


@pytest.mark.parametrize(
  "call, message",
  [
    (lambda s, t, y: losses.dkd(s, t, y, alpha=-1.0), "alpha"),
    (lambda s, t, y: losses.dkd(s, t, y, beta=-1.0), "beta"),
    (lambda s, t, y: losses.dkd(s, t, y, temperature=0.0), "temperature"),
    (lambda s, t, y: losses.dkd(s, t, y[:3]), "labels"),
    (lambda s, t, y: losses.dkd(s[:, :1], t[:, :1], y), "2 classes"),
    (lambda s, t, y: losses.logit_standardized_kd(s, t, temperature=-2.0), "temperature"),
    (lambda s, t, y: losses.logit_standardized_kd(s, t, eps=-1.0), "eps"),
    (lambda s, t, y: losses.logit_standardized_kd(s, t[:, :4]), "same shape"),
    (lambda s, t, y: losses.dist(s, t, beta=-1.0), "beta"),
    (lambda s, t, y: losses.dist(s, t, gamma=-1.0), "gamma"),
    (lambda s, t, y: losses.dist(s, t, temperature=float("inf")), "temperature"),
    (lambda s, t, y: losses.cross_entropy(s, y, sample_weights=np.ones(3)), "sample_weights"),
    (
      lambda s, t, y: losses.union_targets(
        [s], np.ones((B, 1)), [range(C)], num_classes=C, temperature=0.0
      ),
      "temperature",
    ),
  ],
)
def test_invalid_hyper_parameters_raise_at_trace_time(call, message):
  s, t, y = _logits(70), _logits(71), _labels(72)
  with pytest.raises(ValueError, match=message):
    jax.jit(lambda a, b: call(a, b, y))(s, t)


def test_union_targets_public_and_a_distribution():
  z = [_logits(73, (B, 3)), _logits(74, (B, 2))]
  w = np.random.default_rng(75).dirichlet([1, 1], size=B).astype(np.float32)
  p = np.asarray(losses.union_targets(z, w, [[0, 2, 4], [1, 3]], num_classes=5, temperature=2.0))
  np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)
  soft0 = np.exp(_log_softmax(z[0] / 2.0)).astype(np.float64)
  np.testing.assert_allclose(p[:, [0, 2, 4]], w[:, :1] * soft0, rtol=1e-5)
