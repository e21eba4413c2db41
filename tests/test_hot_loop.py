"""The training loop's hot path: uint8 images preprocessed on the device, on-device
prefetch, metric sums inside the step, checkpoints decided without asking the manager,
evaluation without a wait per batch."""

import json
import os
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from kd_jax import checkpoint, data, models
from kd_jax.train import distill, evaluation
from kd_jax.train import mesh as mesh_lib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fake_data  # noqa: E402  pylint: disable=g-import-not-at-top
import helpers  # noqa: E402  pylint: disable=g-import-not-at-top


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  base = tmp_path_factory.mktemp("hot_loop")
  # Random pixels over the whole 0..255 range (templates plus noise).
  return {
    "base": str(base),
    "manual": fake_data.write_idx_dataset(str(base / "manual"), num_train=96, num_test=40),
    "tfds": str(base / "tfds"),
  }


def data_config(dirs, preprocess, augment=False):
  cfg = data.default_data_config("fashion_mnist")
  cfg.manual_dir, cfg.data_dir, cfg.download = dirs["manual"], dirs["tfds"], False
  cfg.preprocess, cfg.augment = preprocess, augment
  return cfg


@pytest.mark.parametrize("optimized", [False, True])
@pytest.mark.parametrize("preprocess", data.PREPROCESS_CHOICES)
def test_device_preprocessing_equals_the_host_pipeline(dirs, preprocess, optimized):
  """uint8 batches (augmented on the host) + `device_preprocess` in a jitted function are
  bit-identical to the host pipeline's float32 batches, with XLA's optimisations on (runs)
  and off (tests)."""
  cfg = data_config(dirs, preprocess, augment=True)
  kw = dict(batch_size=32, train=True, seed=3, num_epochs=2)
  host = list(data.as_numpy(data.make_dataset(cfg, "train", **kw)))
  raw = list(data.as_numpy(data.make_dataset(cfg, "train", raw_images=True, **kw)))
  assert raw[0]["image"].dtype == np.uint8 and host[0]["image"].dtype == np.float32
  assert len(raw) == len(host) == 6
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", not optimized)
  try:
    fn = jax.jit(data.device_preprocess(cfg))
    for h, r in zip(host, raw):
      np.testing.assert_array_equal(r["label"], h["label"])
      np.testing.assert_array_equal(np.asarray(fn(r["image"])), h["image"])
  finally:
    jax.config.update("jax_disable_most_optimizations", previous)
  assert len(np.unique(raw[0]["image"])) > 200  # random data: nearly every pixel value occurs


def test_prefetch_places_batches_two_ahead():
  mesh = mesh_lib.make_mesh(jax.devices()[:1])
  pulled = []

  def batches():
    for i in range(5):
      pulled.append(i)
      yield {"image": np.full((2, 3), i, np.uint8)}

  out = mesh_lib.prefetch(batches(), mesh, depth=2)
  first = next(out)
  assert pulled == [0, 1]  # the next batch is already on its way
  assert isinstance(first["image"], jax.Array) and first["image"].sharding.mesh.shape == mesh.shape
  rest = list(out)
  assert [int(b["image"][0, 0]) for b in [first, *rest]] == [0, 1, 2, 3, 4]
  assert all(b["image"].dtype == np.uint8 for b in rest)


def test_evaluation_on_uint8_equals_the_host_floats(dirs):
  """`predict` (uint8 to the device, one pull at the end) gives the logits of the host's
  float32 images, every test example once, in stored order."""
  cfg = data_config(dirs, "mean_image")
  model = models.LeNet(num_classes=10, width=0.125)
  variables = jax.jit(lambda k: model.init(k, np.zeros((1, 28, 28, 1), np.float32), train=False))(
    jax.random.PRNGKey(0)
  )
  predictor = evaluation.Predictor(model, variables, mesh_lib.make_mesh())
  labels, logits = evaluation.predict(cfg, "test", {"m": predictor}, batch_size=16)
  images, want_labels = data.load_arrays(cfg, "test")
  assert len(labels) == 40  # 2 full batches and a padded one, the padding dropped
  np.testing.assert_array_equal(labels, want_labels)
  # Batches of 16 on the device, of 8 here: XLA's CPU kernels may round the two shapes
  # differently (a few ulps, seen on AMD EPYC); a wrong order or preprocessing is far larger.
  np.testing.assert_allclose(
    logits["m"],
    np.concatenate([predictor(images[i : i + 8]) for i in range(0, 40, 8)]),
    rtol=1e-5,
    atol=1e-6,
  )


def test_loop_sums_in_the_step_and_saves_on_its_interval(dirs, tmp_path, monkeypatch):
  """The epoch means (summed inside the compiled step) are the means of the logged per-step
  metrics; checkpoints are saved at step 1 (the first of a fresh run), every
  `checkpoint_every_steps` and at each epoch's end, and the loop never asks Orbax's manager
  whether to save."""
  saved = []
  original = checkpoint.Checkpoints.save

  def record(self, step, items, meta, *, force=False):
    saved.append(step)
    return original(self, step, items, meta, force=force)

  checked = []
  should_save = ocp.CheckpointManager.should_save

  def record_check(self, step):
    checked.append(step)
    return should_save(self, step)

  monkeypatch.setattr(checkpoint.Checkpoints, "save", record)
  config = helpers.experiment_config(
    "lenet_student",
    "dataset=fashion_mnist,smoke,method=ground_truth",
    manual_dir=dirs["manual"],
    data_dir=dirs["tfds"],
    num_epochs=2,
    steps_per_epoch=0,
    batch_size=16,
    log_every_steps=1,
    checkpoint_every_steps=4,
  )
  workdir = str(tmp_path / "run")
  monkeypatch.setattr(ocp.CheckpointManager, "should_save", record_check)
  results = distill.train_and_evaluate(config, workdir)
  assert results["steps"] == 12  # 96 examples, 16 a batch, 2 epochs
  assert saved == [1, 4, 6, 8, 12]
  assert set(checked) <= set(saved)  # only by the manager's own save, never once per step
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  per_step = {r["step"]: r for r in rows if "train/loss" in r}
  assert sorted(per_step) == list(range(1, 13))
  for record in results["history"]:
    steps = range(record["step"] - 5, record["step"] + 1)
    for name in ("loss", "accuracy"):
      want = np.mean([per_step[s][f"train/{name}"] for s in steps], dtype=np.float64)
      np.testing.assert_allclose(record[f"train_{name}"], want, rtol=1e-6)
