"""Tests for kd_jax.amalgamation.routing against independent NumPy references and properties."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.amalgamation import routing as R


def _data(seed=0, n=300, d=5, k=3, dtype=np.float64):
  rng = np.random.default_rng(seed)
  labels = np.concatenate([np.arange(k), rng.integers(0, k, n - k)])
  means = rng.normal(0, 3, (k, d))
  a = rng.normal(size=(d, d))
  feats = means[labels] + rng.normal(size=(n, d)) @ a + 2.0  # correlated, off-centre
  return feats.astype(dtype), labels


def _np_card(feats, labels, k, shrinkage, eps):
  means = np.stack([feats[labels == c].mean(0) for c in range(k)])
  centred = feats - means[labels]
  cov = centred.T @ centred / len(feats)
  d = feats.shape[1]
  shrunk = (1 - shrinkage) * cov + (shrinkage * np.trace(cov) / d + eps) * np.eye(d)
  return means, cov, np.linalg.inv(shrunk)


def _np_min_maha(feats, means, prec):
  out = np.empty(len(feats))
  for i, f in enumerate(feats):
    out[i] = min((f - m) @ prec @ (f - m) for m in means)
  return out


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shrinkage", [0.0, 0.3])
def test_fit_matches_numpy(dtype, shrinkage):
  feats, labels = _data(dtype=dtype)
  card = R.fit_teacher_card(feats, labels, num_classes=3, shrinkage=shrinkage, eps=0.0)
  means, _, prec = _np_card(feats.astype(np.float64), labels, 3, shrinkage, 0.0)
  assert card.means.dtype == jnp.float32 and card.means.shape == (3, 5)
  np.testing.assert_allclose(card.means, means, rtol=1e-5, atol=1e-5)
  # A float32 inverse is accurate to about cond · eps in norm (entry by entry it can be far
  # worse on small entries, and differs between AVX-512 and AVX2 machines): compare in norm.
  bound = 10 * np.linalg.cond(prec) * np.finfo(np.float32).eps
  assert _rel_err(card.precision, prec) < bound
  # plain covariance, cross-checked against np.cov of the class-centred features
  _, cov, _ = _np_card(feats.astype(np.float64), labels, 3, 0.0, 0.0)
  np.testing.assert_allclose(cov, np.cov((feats - means[labels]).T, bias=True), rtol=1e-6)
  if shrinkage == 0.0:
    assert _rel_err(np.linalg.inv(np.asarray(card.precision, np.float64)), cov) < bound


def _rel_err(actual, expected) -> float:
  expected = np.asarray(expected, np.float64)
  return float(np.linalg.norm(np.asarray(actual, np.float64) - expected) / np.linalg.norm(expected))


def test_streaming_equals_one_shot():
  feats, labels = _data(seed=1)
  one = R.fit_teacher_card(feats, labels, num_classes=3, calibrate=False)
  stats = R.card_stats_init(3, 5)
  update = jax.jit(R.card_stats_update)
  for idx in np.array_split(np.arange(len(feats)), 3):
    stats = update(stats, feats[idx], labels[idx])
  # padded rows (label -1) are ignored
  stats = update(stats, np.full((4, 5), 1e3), np.full((4,), -1))
  card = R.card_from_stats(stats)
  np.testing.assert_allclose(stats.count, np.bincount(labels, minlength=3))
  np.testing.assert_allclose(card.means, one.means, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(card.precision, one.precision, rtol=1e-4, atol=1e-6)
  assert float(card.score_mean) == 0.0 and float(card.score_std) == 1.0


def test_mahalanobis_matches_numpy_and_euclidean():
  feats, labels = _data(seed=2)
  card = R.fit_teacher_card(feats, labels, num_classes=3)
  q = np.random.default_rng(3).normal(0, 4, (17, 5))
  ref = _np_min_maha(q, np.asarray(card.means, np.float64), np.asarray(card.precision, np.float64))
  np.testing.assert_allclose(R.mahalanobis_scores(card, q), ref, rtol=1e-4, atol=1e-4)
  eye = card.replace(precision=jnp.eye(5))
  eucl = ((q[:, None, :] - np.asarray(card.means)[None]) ** 2).sum(-1).min(-1)
  np.testing.assert_allclose(R.mahalanobis_scores(eye, q), eucl, rtol=1e-5, atol=1e-4)


def test_calibration_standardises_training_scores():
  feats, labels = _data(seed=4)
  card = R.fit_teacher_card(feats, labels, num_classes=3)
  s = np.asarray(R.teacher_card_scores([feats], [card]))[:, 0]
  assert abs(s.mean()) < 1e-4 and abs(s.std() - 1) < 1e-4
  # chunked calibration and calibration from precomputed scores agree
  raw = R.mahalanobis_scores(card, feats)
  c2 = R.calibrate_card(card, feats, batch_size=64)
  c3 = R.calibrate_card(card, scores=raw)
  for c in (c2, c3):
    np.testing.assert_allclose(c.score_mean, card.score_mean, rtol=1e-5)
    np.testing.assert_allclose(c.score_std, card.score_std, rtol=1e-5)


def test_card_dict_roundtrip():
  feats, labels = _data(seed=5)
  card = R.fit_teacher_card(feats, labels, num_classes=3)
  d = card.to_dict()
  assert all(isinstance(v, np.ndarray) for v in d.values())
  back = R.TeacherCard.from_dict({k: v.tolist() for k, v in d.items()})  # JSON-like
  for k in d:
    np.testing.assert_array_equal(np.asarray(getattr(back, k)), d[k])
  assert back.num_classes == 3 and back.dim == 5
  np.testing.assert_array_equal(d["counts"], np.bincount(labels, minlength=3))
  with pytest.raises(ValueError, match="missing"):
    R.TeacherCard.from_dict({"means": d["means"]})
  older = R.TeacherCard.from_dict(
    {k: v for k, v in d.items() if k != "counts"}
  )  # saved before counts
  assert older.counts is None and "counts" not in older.to_dict()
  with pytest.raises(ValueError, match="counts must be"):
    R.TeacherCard.from_dict({**d, "counts": [1.0, 2.0]})


def test_teacher_card_routes_synthetic_problem():
  rng = np.random.default_rng(6)
  dims, ks = (8, 6), (3, 2)
  centres = [rng.normal(0, 4, (k, d)) for k, d in zip(ks, dims)]
  scales = [rng.normal(size=(d, d)) * 0.5 + np.eye(d) for d in dims]

  def in_dist(t, labels):
    return centres[t][labels] + rng.normal(size=(len(labels), dims[t])) @ scales[t]

  def out_dist(t, n):  # features of a foreign sample: far from all of teacher t's clusters
    return rng.normal(size=(n, dims[t])) * 2.0 + 8.0

  cards = []
  for t in range(2):
    lab = rng.integers(0, ks[t], 400)
    cards.append(R.fit_teacher_card(in_dist(t, lab), lab, num_classes=ks[t]))
  n = 200
  owner = np.repeat([0, 1], n)
  fa = np.concatenate([in_dist(0, rng.integers(0, 3, n)), out_dist(0, n)])
  fb = np.concatenate([out_dist(1, n), in_dist(1, rng.integers(0, 2, n))])
  scores = R.teacher_scores("teacher_card", features=[fa, fb], cards=cards)
  assert scores.shape == (2 * n, 2)
  acc = float(R.routing_accuracy(R.route(scores), owner))
  assert acc > 0.95, acc


def test_entropy_and_max_softmax():
  uniform = [jnp.zeros((3, 2)), jnp.zeros((3, 5))]
  np.testing.assert_allclose(R.entropy_scores(uniform), -np.ones((3, 2)), atol=1e-6)
  np.testing.assert_allclose(R.max_softmax_scores(uniform), [[0.5, 0.2]] * 3, atol=1e-6)
  rng = np.random.default_rng(7)
  z = [rng.normal(size=(4, 3)) * 3, rng.normal(size=(4, 7))]

  def ref(z):
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p * np.log(p)).sum(-1) / np.log(z.shape[-1]), p.max(-1)

  np.testing.assert_allclose(
    R.entropy_scores(z), np.stack([ref(x)[0] for x in z], -1), rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(
    R.max_softmax_scores(z), np.stack([ref(x)[1] for x in z], -1), rtol=1e-5
  )
  # a confident teacher beats an uncertain one
  s = R.entropy_scores([jnp.array([[20.0, 0.0]]), jnp.zeros((1, 5))])
  assert s[0, 0] > s[0, 1]


def test_energy():
  rng = np.random.default_rng(8)
  z = [rng.normal(size=(6, 3)), rng.normal(size=(6, 4)) + 5]
  e = np.stack([np.log(np.exp(x).sum(-1)) for x in z], -1)
  np.testing.assert_allclose(R.energy_scores(z), (e - e.mean(0)) / e.std(0), rtol=1e-4, atol=1e-5)
  stats = [(1.0, 2.0), (3.0, 0.5)]
  np.testing.assert_allclose(
    R.teacher_scores("energy", logits=z, energy_stats=stats),
    (e - [1.0, 3.0]) / [2.0, 0.5],
    rtol=1e-5,
  )
  fitted = R.fit_energy_stats(z)
  np.testing.assert_allclose(fitted, np.stack([e.mean(0), e.std(0)], -1), rtol=1e-5)
  np.testing.assert_allclose(R.energy_scores(z, stats=fitted), R.energy_scores(z), atol=1e-5)


def test_route():
  s = jnp.array([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [0.0, 0.0, 3.0]])
  np.testing.assert_array_equal(R.route(s, mode="hard"), np.eye(3)[[0, 1, 2]])
  w = R.route(s, mode="soft", temperature=0.5)
  np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(w, jax.nn.softmax(s / 0.5, axis=-1), rtol=1e-6)
  assert float(R.routing_accuracy(w, jnp.array([0, 1, 2]))) == 1.0
  assert float(R.routing_accuracy(w, jnp.array([1, 1, 1]))) == pytest.approx(1 / 3)


def test_jit():
  feats, labels = _data(seed=9)
  card = R.fit_teacher_card(feats, labels, num_classes=3)
  router = R.fit_pool_router([feats, feats], labels, ((0, 1), (2,)))
  z = [jnp.ones((4, 2)), jnp.arange(12.0).reshape(4, 3)]
  f = [jnp.asarray(feats[:4], jnp.float32)] * 2
  for rule in R.RULES:
    fn = jax.jit(functools.partial(R.teacher_scores, rule))
    out = fn(logits=z, features=f, cards=[card, card], pool_router=router)
    ref = R.teacher_scores(rule, logits=z, features=f, cards=[card, card], pool_router=router)
    assert out.shape == (4, 2)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  hard = jax.jit(functools.partial(R.route, mode="hard"))(out)
  assert hard.shape == (4, 2)
  # the card itself is a pytree: it can be an argument of a jitted function and be vmapped
  m = jax.jit(R.mahalanobis_scores)(card, f[0])
  mv = jax.vmap(R.mahalanobis_scores, in_axes=(None, 0))(card, f[0][:, None, :])
  np.testing.assert_allclose(mv[:, 0], m, rtol=1e-5)


def _np_lda_scores(x, y, num_classes, shrinkage, queries):
  """Independent reference: standardise x, class means, shared shrunk covariance,
  Gaussian log posteriors (up to a constant) of `queries`."""
  mean, std = x.mean(0), x.std(0)
  z, q = (x - mean) / std, (queries - mean) / std
  means = np.stack([z[y == c].mean(0) for c in range(num_classes)])
  cov = (z - means[y]).T @ (z - means[y]) / len(z)
  d = z.shape[1]
  prec = np.linalg.inv((1 - shrinkage) * cov + (shrinkage * np.trace(cov) / d + 1e-6) * np.eye(d))
  prior = np.log(np.bincount(y, minlength=num_classes) / len(y))
  return np.stack([-0.5 * np.einsum("nd,de,ne->n", q - m, prec, q - m) for m in means], -1) + prior


def _two_teacher_pool(seed=0, n=2000):
  """Pool features of 2 teachers (widths 3 and 4) over 4 union classes, teacher 0 owning {0, 2}."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 4, n)
  centres = rng.normal(0, 1.5, (4, 7))
  x = centres[labels] + rng.normal(size=(n, 7)) @ rng.normal(size=(7, 7)) * 0.5 + 3.0
  return [x[:, :3], x[:, 3:]], labels, ((0, 2), (1, 3))


def test_pool_router_matches_numpy_lda():
  features, labels, class_index = _two_teacher_pool()
  router = R.fit_pool_router(features, labels, class_index, shrinkage=0.2, rounds=0)
  x = np.concatenate(features, 1)
  g = _np_lda_scores(x, labels, 4, 0.2, x[:50])
  want = np.stack([np.logaddexp(g[:, 0], g[:, 2]), np.logaddexp(g[:, 1], g[:, 3])], -1)
  got = np.asarray(R.pool_router_scores([f[:50] for f in features], router))
  # Log posteriors are compared up to one constant per sample (the discriminants drop the
  # quadratic term shared by all classes): the differences between teachers must match.
  np.testing.assert_allclose(got[:, 0] - got[:, 1], want[:, 0] - want[:, 1], rtol=1e-4, atol=1e-3)


def test_pool_router_self_training_corrects_noisy_starts():
  """Started from pseudo-classes with 25 % of samples on a wrong class, the refits on the
  router's own predictions route better than the start (labels only score the result)."""
  features, labels, class_index = _two_teacher_pool(seed=1, n=4000)
  rng = np.random.default_rng(2)
  noisy = np.where(rng.random(len(labels)) < 0.25, rng.integers(0, 4, len(labels)), labels)
  owner = np.array([0, 1, 0, 1])
  start = float(np.mean(owner[noisy] == owner[labels]))
  for rounds in (0, 3):
    router = R.fit_pool_router(features, noisy, class_index, rounds=rounds)
    routed = np.asarray(R.pool_router_scores(features, router)).argmax(-1)
    assert float(np.mean(routed == owner[labels])) > start + 0.05, rounds


def test_balanced_assignment_is_a_diagonal_rescaling_with_equal_class_shares():
  rng = np.random.default_rng(3)
  scores = rng.normal(size=(300, 4)) + np.array([2.0, 0.0, -1.0, 0.5])  # class 0 over-predicted
  q = R.balanced_assignment(scores)
  np.testing.assert_allclose(q.sum(1), 1.0, rtol=1e-9)
  np.testing.assert_allclose(q.sum(0), 300 / 4, rtol=1e-6)
  # Sinkhorn only rescales rows and columns of the softmax: log(q / p) = a_i + b_j.
  p = np.exp(scores - scores.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  r = np.log(q / p)
  np.testing.assert_allclose(
    r - r.mean(1, keepdims=True) - r.mean(0, keepdims=True) + r.mean(), 0.0, atol=1e-9
  )


def test_balanced_assignment_meets_given_shares():
  rng = np.random.default_rng(4)
  scores = rng.normal(size=(400, 3))
  q = R.balanced_assignment(scores, shares=[2, 1, 1])  # normalised: 1/2, 1/4, 1/4
  np.testing.assert_allclose(q.sum(0), [200, 100, 100], rtol=1e-6)
  np.testing.assert_allclose(q.sum(1), 1.0, rtol=1e-9)
  with pytest.raises(ValueError, match="shares must be"):
    R.balanced_assignment(scores, shares=[1, -1, 1])


def test_balanced_refits_keep_an_imbalanced_pool_given_its_shares():
  """A pool of overlapping classes in the mix 40/30/20/10 %, started from its true classes:
  refits balanced to that mix keep the routing; forced equal shares would move images of
  the big classes to the small ones (labels only score the result)."""
  rng = np.random.default_rng(5)
  labels = rng.choice(4, size=4000, p=[0.4, 0.3, 0.2, 0.1])
  x = np.eye(4)[labels] @ rng.normal(0, 1.5, (4, 6)) + rng.normal(size=(4000, 6))
  features, class_index, owner = [x[:, :3], x[:, 3:]], ((0, 1), (2, 3)), np.array([0, 0, 1, 1])

  def routed(**kw):
    router = R.fit_pool_router(features, labels, class_index, balance_rounds=1, **kw)
    return np.asarray(R.pool_router_scores(features, router)).argmax(-1)

  plain = R.fit_pool_router(features, labels, class_index)
  plain_acc = np.mean(np.asarray(R.pool_router_scores(features, plain)).argmax(-1) == owner[labels])
  mixed = np.mean(routed(class_shares=np.bincount(labels)) == owner[labels])
  equal = np.mean(routed() == owner[labels])
  assert mixed >= plain_acc - 0.002 and equal < mixed - 0.05, (plain_acc, mixed, equal)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balanced_refits_correct_a_start_that_starves_a_class(seed):
  """A start that gives the 40 % of class 0 nearest class 1 to class 1 (another teacher's),
  as teacher cards send T-shirts to the pullover/dress teacher: the plain fit keeps much of
  the bias, the class-balanced refits undo it (labels only score the result)."""
  features, labels, class_index = _two_teacher_pool(seed=seed, n=4000)
  x = np.concatenate(features, 1)
  toward = x[labels == 1].mean(0) - x[labels == 0].mean(0)
  zeros = np.flatnonzero(labels == 0)
  along = x[zeros] @ toward
  start = labels.copy()
  start[zeros[along > np.quantile(along, 0.6)]] = 1
  owner = np.array([0, 1, 0, 1])

  def routing_accuracy(**kw):
    router = R.fit_pool_router(features, start, class_index, **kw)
    return float(
      np.mean(np.asarray(R.pool_router_scores(features, router)).argmax(-1) == owner[labels])
    )

  plain, balanced = routing_accuracy(), routing_accuracy(balance_rounds=1)
  assert balanced > 0.98 and balanced > plain + 0.01, (plain, balanced)


def test_class_shares_are_the_teachers_training_counts_in_union_order():
  def card(counts, k=2):
    k = k if counts is None else len(counts)
    return R.TeacherCard(
      means=np.zeros((k, 2)),
      precision=np.eye(2),
      score_mean=np.zeros(()),
      score_std=np.ones(()),
      counts=None if counts is None else np.asarray(counts, float),
    )

  shares = R.class_shares([card([30, 10]), card([5, 7, 9])], [(3, 0), (1, 4, 2)])
  np.testing.assert_array_equal(shares, [10, 5, 9, 30, 7])
  assert (
    R.class_shares([card([30, 10]), card(None)], [(0, 1), (2, 3)]) is None
  )  # a card from before counts


def test_card_routed_classes_take_the_card_routed_teachers_prediction():
  feats, labels = _data(seed=11, n=200)
  cards = [
    R.fit_teacher_card(feats[labels == c], np.zeros(int(np.sum(labels == c)), int), num_classes=1)
    for c in (0, 1)
  ]
  logits = [np.random.default_rng(t).normal(size=(200, 2)) for t in range(2)]
  class_index = ((3, 0), (1, 2))
  got = R.card_routed_classes(logits, [feats, feats], cards, class_index)
  routed = np.asarray(R.teacher_card_scores([feats, feats], cards)).argmax(-1)
  want = [class_index[t][int(np.argmax(logits[t][i]))] for i, t in enumerate(routed)]
  np.testing.assert_array_equal(got, want)
  assert set(routed) == {0, 1}


def test_value_errors():
  feats, labels = _data(seed=10)
  with pytest.raises(ValueError, match="unknown routing rule.*entropy.*teacher_card"):
    R.teacher_scores("nope", logits=[jnp.zeros((1, 2))])
  with pytest.raises(ValueError, match="missing: logits"):
    R.teacher_scores("entropy")
  with pytest.raises(ValueError, match="missing: cards"):
    R.teacher_scores("teacher_card", features=[feats])
  with pytest.raises(ValueError, match="missing: features, cards"):
    R.teacher_scores("teacher_card", logits=[jnp.zeros((1, 2))])
  card = R.fit_teacher_card(feats, labels, num_classes=3)
  with pytest.raises(ValueError, match="2 cards"):
    R.teacher_scores("teacher_card", features=[feats], cards=[card, card])
  with pytest.raises(ValueError, match="width"):
    R.mahalanobis_scores(card, np.zeros((2, 4)))
  with pytest.raises(ValueError, match="no sample"):
    R.fit_teacher_card(feats, labels, num_classes=4)
  with pytest.raises(ValueError, match="no sample"):
    R.card_from_stats(R.card_stats_init(2, 3))
  with pytest.raises(ValueError, match="labels must be"):
    R.fit_teacher_card(feats, labels[:-1], num_classes=3)
  with pytest.raises(ValueError, match="features must be"):
    R.fit_teacher_card(feats[:, 0], labels, num_classes=3)
  with pytest.raises(ValueError, match="0..1"):
    R.fit_teacher_card(feats, labels, num_classes=2)
  with pytest.raises(ValueError, match="shrinkage"):
    R.fit_teacher_card(feats, labels, num_classes=3, shrinkage=1.5)
  with pytest.raises(ValueError, match="mode"):
    R.route(jnp.zeros((2, 2)), mode="argmax")
  with pytest.raises(ValueError, match="temperature"):
    R.route(jnp.zeros((2, 2)), mode="soft", temperature=0.0)
  with pytest.raises(ValueError, match="energy stats"):
    R.energy_scores([jnp.zeros((2, 2))], stats=[(0.0, 1.0), (0.0, 1.0)])
  with pytest.raises(ValueError, match="at least 2"):
    R.entropy_scores([jnp.zeros((2, 1))])
  with pytest.raises(ValueError, match="at least one teacher"):
    R.teacher_scores("max_softmax", logits=[])
  with pytest.raises(ValueError, match="missing: pool_router"):
    R.teacher_scores("pool_lda", features=[feats])
  with pytest.raises(ValueError, match="initial classes must be in 0..2"):
    R.fit_pool_router([feats], labels + 1, ((0, 1, 2),))
