"""The method zoo in the trainer: feature taps, plans, CRD's step, every method end to end.

The end-to-end runs share one in-process NiN smoke teacher (module fixture) on the session's
generated IDX dataset, and train each method a few steps through
`distill.train_and_evaluate`; FitNets (trainable regressor with BatchNorm) and CRD (heads
and memories) are also killed and resumed.
"""

import os
import shutil

import helpers
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from amalgamation_fixtures import NUM_TRAIN, point_at

from kd_jax import checkpoint, config_fields, config_schema, errors, losses, models
from kd_jax.choices import ZOO_METHODS
from kd_jax.models import taps
from kd_jax.train import distill, zoo, zoo_cache
from kd_jax.train import mesh as mesh_lib
from kd_jax.train.mesh import AXIS
from kd_jax.train.zoo_defaults import DEFAULTS

IMAGE = (28, 28, 1)

# ----------------------------------------------------------------------------- taps


@pytest.mark.parametrize(
  "model, stages",
  [
    (models.NiN(num_classes=10, width=0.05), ["embedding", "stage1", "stage2", "stage3"]),
    (models.LeNet(num_classes=10, width=0.125), ["block1", "block2", "embedding", "fc"]),
    (models.ConvNet(num_classes=4, block_widths=(8, 16)), ["block_0", "block_1", "embedding"]),
  ],
)
def test_features_leave_the_model_and_its_parameters_unchanged(model, stages):
  x = np.random.default_rng(0).normal(size=(3, *IMAGE)).astype(np.float32)
  variables = jax.jit(lambda k: model.init(k, x[:1], train=False))(jax.random.PRNGKey(0))
  assert set(variables) <= {"params", "batch_stats"}  # sowing adds no variables
  assert taps.stage_names(model, IMAGE) == stages
  out, feats, updates = jax.jit(lambda v: models.features(model, v, x, taps=stages))(variables)
  plain = jax.jit(lambda v: model.apply(v, x, train=False))(variables)
  np.testing.assert_array_equal(models.logits_of(out), models.logits_of(plain))
  assert updates == {} and list(feats) == stages
  assert all(f.shape[0] == 3 for f in feats.values())
  if isinstance(model, models.ConvNet):  # the sown blocks are the returned features
    for i, block in enumerate(plain[1]):
      np.testing.assert_array_equal(feats[f"block_{i}"], block)


def test_module_path_taps_read_any_submodule_without_a_sow():
  model = models.LeNet(num_classes=10, width=0.125)
  x = np.random.default_rng(1).normal(size=(2, *IMAGE)).astype(np.float32)
  variables = model.init(jax.random.PRNGKey(0), x[:1], train=False)
  _, feats, _ = models.features(model, variables, x, taps=["fc", "/fc1", "/conv2"])
  np.testing.assert_allclose(feats["fc"], np.maximum(feats["/fc1"], 0), rtol=1e-6)  # pre-ReLU
  assert feats["/conv2"].shape == (2, 4, 4, 16)
  with pytest.raises(KeyError, match="no feature tap 'stage1'; its stages: block1, block2"):
    models.features(model, variables, x, taps=["stage1"])
  plan = _plan("pkt", student=model, feature_pairs="/fc1:embedding")  # paths in configs too
  assert plan.student_shapes == {"/fc1": (128,)} and plan.student_taps == ("/fc1",)


def _adaptive_pool_reference(x, out_h, out_w):
  """torch.nn.functional.adaptive_avg_pool2d's bins, in NumPy, NHWC."""
  b, h, w, c = x.shape
  out = np.zeros((b, out_h, out_w, c), np.float64)
  for i in range(out_h):
    for j in range(out_w):
      r0, r1 = int(np.floor(i * h / out_h)), int(np.ceil((i + 1) * h / out_h))
      c0, c1 = int(np.floor(j * w / out_w)), int(np.ceil((j + 1) * w / out_w))
      out[:, i, j] = x[:, r0:r1, c0:c1].mean(axis=(1, 2))
  return out


@pytest.mark.parametrize("size", [(12, 12), (4, 4), (5, 3)])
def test_adaptive_avg_pool_matches_torchs_bins(size):
  x = np.random.default_rng(2).normal(size=(2, 14, 14, 3)).astype(np.float32)
  np.testing.assert_allclose(
    taps.adaptive_avg_pool(x, size), _adaptive_pool_reference(x, *size), rtol=1e-5, atol=1e-6
  )
  s, t = taps.match_spatial(jnp.asarray(x), jnp.zeros((2, 7, 7, 5)))
  assert s.shape == (2, 7, 7, 3) and t.shape == (2, 7, 7, 5)


# ------------------------------------------------------------------------- plans


def _config(method, **fields):
  distill_cfg = dict(temperature=4.0, soft_weight=0.9)
  distill_cfg[method] = {**DEFAULTS[method], **fields}
  return ml_collections.ConfigDict(dict(method=method, distill=distill_cfg))


def _plan(method, student=None, teacher=None, **fields):
  return zoo.make_plan(
    _config(method, **fields),
    student or models.LeNet(num_classes=10, width=0.125),
    teacher or models.NiN(num_classes=10, width=0.05),
    IMAGE,
    num_examples=32,
    steps_per_epoch=4,
  )


def test_every_zoo_method_has_defaults_a_schema_and_a_plan():
  assert set(DEFAULTS) == set(ZOO_METHODS)
  for method in ZOO_METHODS:
    assert all(f"distill.{method}.{k}" in config_schema.SCHEMA for k in DEFAULTS[method])
    plan = _plan(method)
    assert (
      plan.pairs
      == tuple(config_fields.parse_feature_pairs(DEFAULTS[method].get("feature_pairs", "x:y")))
      or not plan.pairs
    )


@pytest.mark.parametrize(
  "method, pairs, message",
  [
    ("attention_transfer", "block1:stage9", "the teacher's NiN has no feature tap 'stage9'"),
    (
      "pkt",
      "conv1:embedding",
      "the student's LeNet has no feature tap 'conv1'; its stages: block1",
    ),
    ("fitnet", "block2:stage1", "FitNets' regressor needs a teacher map no larger"),
    ("attention_transfer", "fc:stage1", r"needs \[H, W, C\] feature maps"),
    ("vid", "fc:stage3", "same rank"),
  ],
)
def test_a_plan_names_the_bad_feature_pair(method, pairs, message):
  with pytest.raises(errors.UsageError, match=message) as info:
    _plan(method, feature_pairs=pairs)
  assert str(info.value).startswith(f"--config.distill.{method}.feature_pairs=")


def test_schema_refuses_malformed_pairs_and_a_second_crd_pair():
  for method, text in [("pkt", "embedding"), ("rkd", "a:b+"), ("crd", "a:b+c:d")]:
    problem = config_schema.SCHEMA[f"distill.{method}.feature_pairs"].problem(text)
    assert problem, (method, text)


def test_dkd_weight_ramps_up_over_its_warmup_epochs():
  plan = _plan("dkd", warmup_epochs=4)  # 4 steps an epoch
  s = jax.random.normal(jax.random.PRNGKey(0), (6, 10))
  t = jax.random.normal(jax.random.PRNGKey(1), (6, 10))
  y = jnp.arange(6) % 10
  full = losses.dkd(s, t, y, alpha=1.0, beta=8.0, temperature=4.0)
  for step, factor in [(0, 0.25), (5, 0.5), (12, 1.0), (40, 1.0)]:
    step = jnp.int32(step)
    term, _ = zoo._term(plan, {}, {}, {}, s, t, y, [], key=None, indices=None, step=step)
    np.testing.assert_allclose(term, factor * full, rtol=1e-6)


def test_crd_step_on_one_device_is_crd_loss():
  """The data-parallel CRD (global negatives, Z and memory update) is `losses.crd_loss`."""
  plan = _plan("crd", num_negatives=7, embedding_dim=6)
  mesh = mesh_lib.make_mesh(jax.devices()[:1])
  rng = np.random.default_rng(3)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
  e_s, e_t = (unit(rng.normal(size=(5, 6))).astype(np.float32) for _ in range(2))
  indices = np.array([4, 0, 31, 7, 12], np.int32)
  memory = losses.crd_init(jax.random.PRNGKey(4), num_samples=32, embedding_dim=6)
  key = jax.random.PRNGKey(5)
  ours = jax.jit(
    jax.shard_map(
      lambda m, a, b, i: zoo.crd_step(plan, m, a, b, i, key),
      mesh=mesh,
      in_specs=(jax.sharding.PartitionSpec(), *[jax.sharding.PartitionSpec(AXIS)] * 3),
      out_specs=(jax.sharding.PartitionSpec(), jax.sharding.PartitionSpec()),
      check_vma=False,
    )
  )(memory, e_s, e_t, indices)
  theirs = losses.crd_loss(e_s, e_t, indices, memory, key, num_negatives=7)
  np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-5)
  for a, b in zip(ours[1], theirs[1]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def zoo_teacher(idx_data, tmp_path_factory):
  """The NiN smoke teacher, trained once in-process on the session's generated data."""
  workdir = str(tmp_path_factory.mktemp("zoo") / "teacher")
  config = point_at(helpers.experiment("nin_teacher").get_config("dataset=fashion_mnist,smoke"),
                    idx_data)  # fmt: skip
  distill.train_and_evaluate(config, workdir)
  return workdir


def _student_config(idx_data, teacher, method, **overrides):
  config = helpers.experiment("lenet_student").get_config(
    f"dataset=fashion_mnist,smoke,method={method}"
  )
  config = point_at(config, idx_data)
  return helpers.override(
    config, teacher_workdir=teacher, num_epochs=1, steps_per_epoch=4, **overrides
  )


def _state(workdir):
  """The saved train state of a run's latest checkpoint (student, aux, memories)."""
  ckpts = checkpoint.Checkpoints(workdir, read_only=True)
  try:
    return jax.device_get(ckpts.restore(None, {"state": None})["state"])
  finally:
    ckpts.close()


@pytest.mark.parametrize("method", ZOO_METHODS)
def test_zoo_method_trains_from_its_config(idx_data, zoo_teacher, method, tmp_path):
  """Each method trains from `lenet_student.py:method=M`; its checkpoint loads as the LeNet
  alone. FitNets and CRD resume from a kill bit for bit (aux modules and memories included);
  attention transfer trains the same student from cached teacher features and from the
  teacher in the step."""
  config = _student_config(idx_data, zoo_teacher, method, checkpoint_every_steps=2)
  workdir = str(tmp_path / "run")
  results = distill.train_and_evaluate(config, workdir)
  assert results["steps"] == 4 and results["method"] == method
  for record in results["history"]:
    assert np.isfinite(record["train_loss"]) and np.isfinite(record["train_distill_loss"])
  assert 0.0 <= results["teacher_agreement"] <= 1.0

  model, variables = checkpoint.load(workdir)
  assert isinstance(model, models.LeNet)
  fresh = jax.jit(lambda k: model.init(k, np.zeros((1, *IMAGE)), train=False))(jax.random.key(0))
  assert jax.tree.structure(variables) == jax.tree.structure(fresh)  # the student alone
  final = _state(workdir)
  aux = {"fitnet": {"hint_0"}, "vid": {"vid_0", "vid_1"}, "crd": {"embed_student", "embed_teacher"}}
  assert set(final["params"].get("aux", {})) == aux.get(method, set())
  if method == "crd":
    memory = final["batch_stats"]["crd"]
    assert memory["student"].shape == (NUM_TRAIN, 128) and memory["student_norm"] > 0
  if method in ("fitnet", "crd"):
    ckpt_dir = checkpoint.checkpoint_dir(workdir)
    for step in (3, 4):  # "killed" after the save at step 2
      shutil.rmtree(os.path.join(ckpt_dir, str(step)), ignore_errors=True)
    assert max(int(d) for d in os.listdir(ckpt_dir) if d.isdigit()) == 2
    resumed = distill.train_and_evaluate(config, workdir)
    assert resumed["history"] == results["history"]
    helpers.assert_trees_equal(_state(workdir), final)
  if method == "attention_transfer":
    assert distill.caches_teacher_logits(config)  # and the features fit the budget
    in_step = helpers.override(config, **{"distill.cache_budget_mb": 0})
    distill.train_and_evaluate(in_step, str(tmp_path / "in_step"))
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(_state(str(tmp_path / "in_step")))):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_zoo_teacher_table_is_the_teachers_features(idx_data, zoo_teacher):
  config = _student_config(idx_data, zoo_teacher, "similarity_preserving")
  model, variables = checkpoint.load(zoo_teacher)
  plan = _plan("similarity_preserving", teacher=model)
  assert zoo_cache.fits_budget(config, plan, 10)
  assert not zoo_cache.fits_budget(
    helpers.override(config, **{"distill.cache_budget_mb": 0.01}), plan, 10
  )
  table = zoo_cache.teacher_table(
    config, {"model": model, "variables": variables}, plan, mesh_lib.make_mesh(), "train", None
  )
  from kd_jax import data  # pylint: disable=g-import-not-at-top

  images, _ = data.load_arrays(config.data, "train")
  _, feats, _ = models.features(model, variables, images[:40], taps=["stage3"])
  np.testing.assert_allclose(
    table["features"]["stage3"][:40], feats["stage3"], rtol=1e-4, atol=1e-5
  )
  assert len(table["logits"]) == len(images)


def test_unknown_stage_is_one_usage_error_before_anything_is_written(
  idx_data, zoo_teacher, tmp_path
):
  config = _student_config(
    idx_data, zoo_teacher, "fitnet", **{"distill.fitnet.feature_pairs": "block1:stage7"}
  )
  with pytest.raises(errors.UsageError, match="has no feature tap 'stage7'"):
    distill.train_and_evaluate(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "run.json")
