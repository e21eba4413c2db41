"""Honest selection: held-out validation images, best-on-validation results, early stopping.

One tiny distillation run on fake data (256 training images, 64 held out) serves most tests:
it stops early by construction (a learning rate too small to change any prediction, so the
validation accuracy never improves after the first evaluation).
"""

import json
import logging
import os
import sys

import pytest

from kd_jax import checkpoint, config_schema, reporting
from kd_jax import workdir as workdir_lib
from kd_jax.data import sources
from kd_jax.errors import UsageError
from kd_jax.train import distill, resume, selection

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fake_data  # noqa: E402  pylint: disable=g-import-not-at-top
import helpers  # noqa: E402  pylint: disable=g-import-not-at-top

NUM_TRAIN, HELD_OUT = 256, 64
CORE_KEYS = {
  "experiment",
  "dataset",
  "seed",
  "steps",
  "test_accuracy",
  "test_examples",
  "validation_examples",
  "last_epoch",
  "best_on_validation",
  "stopped_early",
  "history",
  "config",
}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  base = tmp_path_factory.mktemp("selection")
  manual = fake_data.write_idx_dataset(str(base / "manual"), num_train=NUM_TRAIN, num_test=64)
  return {"manual": manual, "tfds": str(base / "tfds"), "base": str(base)}


def student_config(dirs, **overrides):
  return helpers.experiment_config(
    "lenet_student",
    "dataset=fashion_mnist,smoke,method=ground_truth",
    manual_dir=dirs["manual"],
    data_dir=dirs["tfds"],
    **{"data.validation_split": HELD_OUT, **overrides},
  )


def bounds(split: str) -> tuple[int, int]:
  return selection._bounds(split, NUM_TRAIN)  # pylint: disable=protected-access


@pytest.fixture(scope="module")
def stopped(dirs):
  """A run that stops early at epoch 2 of 4, with every split it read recorded."""
  reads = []
  original = sources.read_split

  def recording(builder, split, classes=None):
    reads.append(split)
    return original(builder, split, classes)

  config = student_config(
    dirs,
    num_epochs=4,
    early_stopping_patience=1,
    **{"optim.learning_rate": 1e-12, "model.width": 0.0625},
  )
  workdir = os.path.join(dirs["base"], "stopped")
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(sources, "read_split", recording)
    results = distill.train_and_evaluate(config, workdir)
  return config, workdir, results, reads


def test_the_split_arithmetic(dirs):
  config = student_config(dirs)
  assert selection.training_split(config) == "train[0:192]"
  assert selection.validation_split(config) == "train[192:]"
  assert selection.training_split(config, "train[100:250]") == "train[100:192]"
  assert selection.training_split(config, "train[:50%]") == "train[0:128]"
  assert selection.training_split(config, "train[0:192]") == "train[0:192]"  # idempotent
  with pytest.raises(UsageError, match="inside the 64 held-out"):
    selection.training_split(config, "train[200:]")
  with pytest.raises(UsageError, match="holds out all 256"):
    selection.training_split(student_config(dirs, **{"data.validation_split": NUM_TRAIN}))
  off = student_config(dirs, **{"data.validation_split": 0})
  assert selection.training_split(off) == "train" and selection.validation_split(off) is None


def test_patience_needs_held_out_images(dirs):
  config = student_config(dirs, early_stopping_patience=2, **{"data.validation_split": 0})
  with pytest.raises(UsageError, match="needs held-out images"):
    config_schema.validate(config)


def test_plateau_and_epoch_summary():
  history = [
    {"epoch": 1, "step": 4, "train_loss": 2.0, "test_accuracy": 0.5, "validation_accuracy": 0.4},
    {"epoch": 2, "step": 8, "test_accuracy": 0.9, "validation_accuracy": 0.6},
    {"epoch": 3, "step": 12},  # not evaluated
    {"epoch": 4, "step": 16, "test_accuracy": 0.95, "validation_accuracy": 0.6},  # a tie
  ]
  assert not selection.plateaued(history[:2], 1)
  assert selection.plateaued(history, 1) and not selection.plateaued(history, 2)
  assert not selection.plateaued(history, 0)
  summary = selection.epoch_summary(history, patience=1)
  # The best is chosen on validation (first of ties), never on the test set (epoch 4).
  assert summary["best_on_validation"] == {
    "epoch": 2,
    "step": 8,
    "test_accuracy": 0.9,
    "validation_accuracy": 0.6,
  }
  assert summary["last_epoch"]["epoch"] == 4 and summary["stopped_early"]
  assert selection.epoch_summary(history[:1])["best_on_validation"]["epoch"] == 1
  no_validation = [{k: v for k, v in h.items() if k != "validation_accuracy"} for h in history]
  assert selection.epoch_summary(no_validation)["best_on_validation"] is None


def test_held_out_images_are_never_trained_on(stopped):
  _, _, results, reads = stopped
  assert results["validation_examples"] == HELD_OUT
  # "train": the label-free preprocessing statistics and the split's size, read whole.
  trained = [s for s in reads if s not in ("test", "train[192:]", "train")]
  assert trained and "train[192:]" in reads  # trained on something, validated on the rest
  assert all(bounds(s)[1] <= NUM_TRAIN - HELD_OUT for s in trained), trained
  assert results["config"]["data"]["validation_split"] == HELD_OUT


def test_results_report_last_and_best_on_validation_never_best_on_test(stopped):
  _, _, results, _ = stopped
  assert CORE_KEYS <= set(results) and "best_epoch" not in results
  assert results["method"] == "ground_truth"
  evaluated = [h for h in results["history"] if "test_accuracy" in h]
  assert all("validation_accuracy" in h and "validation_loss" in h for h in evaluated)
  last = evaluated[-1]
  assert results["last_epoch"] == {
    k: last[k]
    for k in (
      "epoch",
      "step",
      "test_accuracy",
      "test_loss",
      "validation_accuracy",
      "validation_loss",
    )
  }
  assert results["best_on_validation"]["epoch"] == 1  # ties: the first


def test_early_stopping_stops_and_stays_stopped(stopped, dirs):
  config, workdir, results, _ = stopped
  steps_per_epoch = results["steps"] // 2
  assert results["stopped_early"] and [h["epoch"] for h in results["history"]] == [1, 2]
  assert results["last_epoch"]["epoch"] == 2 and results["steps"] == 2 * steps_per_epoch
  # Re-running the finished run trains nothing; nor does one whose results.json was lost.
  latest = checkpoint.Checkpoints(workdir, read_only=True)
  step = latest.latest_step()
  latest.close()
  os.remove(os.path.join(workdir, "results.json"))
  again = distill.train_and_evaluate(config, workdir)
  assert again["steps"] == results["steps"] and again["history"] == results["history"]
  latest = checkpoint.Checkpoints(workdir, read_only=True)
  assert latest.latest_step() == step
  latest.close()


def test_loading_a_checkpoint_warns_nothing(stopped, caplog):
  _, workdir, _, _ = stopped
  with caplog.at_level(logging.INFO):
    checkpoint.load(workdir)
    checkpoint.read_meta(workdir)
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_curves_of_the_run(stopped):
  _, workdir, _, _ = stopped
  assert os.path.getsize(os.path.join(workdir, "curves.png")) > 0
  rows = reporting.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert any("train/loss" in r for r in rows)


def test_amalgamate_refuses_fields_that_do_nothing_and_old_runs_resume(tmp_path):
  config = helpers.experiment("amalgamate").get_config("smoke")
  for key in ("num_epochs", "batch_size", "optim"):
    assert key not in config  # --config.num_epochs=... is then an unknown-field error
  config.lock()
  workdir = str(tmp_path / "old")
  os.makedirs(workdir)
  old = config.to_dict()  # a run.json written when the shared fields were still there
  old.update(num_epochs=100, batch_size=32, optim={"learning_rate": 1e-3})
  del old["early_stopping_patience"]
  del old["data"]["validation_split"]
  with open(os.path.join(workdir, workdir_lib.RUN_FILE), "w", encoding="utf-8") as f:
    json.dump({"config": old}, f)
  resume.claim_workdir(workdir, config)  # the same run: resumes
  workdir_lib.release(workdir)
