"""End to end: teacher → distilled student → evaluate, on a small fake IDX dataset.

The command-line runs are subprocesses (`python -m kd_jax.main`, `python -m kd_jax.evaluate`);
the teacher is trained once per module and shared. The other runs call
`distill.train_and_evaluate` in-process, which is faster.
"""

import glob
import json
import os
import shutil
import stat
import subprocess
import sys

import jax
import jaxlib
import ml_collections
import numpy as np
import pytest

import kd_jax
from kd_jax import checkpoint, data, errors
from kd_jax import workdir as workdir_lib
from kd_jax.train import distill, resume
from kd_jax.train import mesh as mesh_lib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fake_data  # noqa: E402  pylint: disable=g-import-not-at-top
import helpers  # noqa: E402  pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBPROCESS_ENV = dict(
  os.environ,
  JAX_PLATFORMS="cpu",
  TF_CPP_MIN_LOG_LEVEL="3",
  JAX_DISABLE_MOST_OPTIMIZATIONS="1",
  PYTHONPATH=ROOT,
)


def run_module(module: str, *args: str, env=None) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", module, *args],
    cwd=ROOT,
    env=env or SUBPROCESS_ENV,
    capture_output=True,
    text=True,
    timeout=600,
  )


def data_flags(dirs) -> list[str]:
  # download=False: the fake data is all there is; never wait for a network.
  return [
    f"--config.data.manual_dir={dirs['manual']}",
    f"--config.data.data_dir={dirs['tfds']}",
    "--config.data.download=False",
  ]


def experiment_config(name: str, arg: str, dirs, **overrides):
  return helpers.experiment_config(
    name, arg, manual_dir=dirs["manual"], data_dir=dirs["tfds"], **overrides
  )


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  base = tmp_path_factory.mktemp("e2e")
  return {
    "base": str(base),
    "manual": fake_data.write_idx_dataset(str(base / "manual")),
    "tfds": str(base / "tfds"),
  }


@pytest.fixture(scope="module")
def teacher(dirs):
  """The NiN smoke teacher, trained once by the command line (it also prepares the data)."""
  workdir = os.path.join(dirs["base"], "teacher")
  proc = run_module(
    "kd_jax.main",
    "--config=experiments/nin_teacher.py:dataset=fashion_mnist,smoke",
    *data_flags(dirs),
    f"--workdir={workdir}",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


@pytest.fixture(scope="module")
def student(dirs, teacher):
  """A hinton_kd student of the teacher by the command line, then `kd_jax.evaluate` of it."""
  teacher_fingerprint = checkpoint.fingerprint(checkpoint.load(teacher)[1])
  teacher_files = helpers.tree_snapshot(teacher)
  workdir = os.path.join(dirs["base"], "student")
  args = [
    "--config=experiments/lenet_student.py:dataset=fashion_mnist,smoke,method=hinton_kd",
    *data_flags(dirs),
    f"--config.teacher_workdir={teacher}",
    f"--workdir={workdir}",
  ]
  train = run_module("kd_jax.main", *args)
  assert train.returncode == 0, train.stderr[-3000:]
  evaluate = run_module("kd_jax.evaluate", f"--workdir={workdir}")
  assert evaluate.returncode == 0, evaluate.stderr[-3000:]
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  return dict(
    workdir=workdir,
    args=args,
    train=train,
    evaluate=evaluate,
    results=results,
    teacher_fingerprint=teacher_fingerprint,
    teacher_files=teacher_files,
  )


@pytest.fixture(scope="module")
def learned_teacher(dirs, teacher):
  """A teacher that has learned the fake data (a supervised LeNet: the smoke NiN barely moves
  in 16 steps), for checking that distillation transfers something."""
  del teacher  # only for the prepared data
  workdir = os.path.join(dirs["base"], "learned_teacher")
  config = experiment_config(
    "lenet_student",
    "dataset=fashion_mnist,smoke,method=ground_truth",
    dirs,
    num_epochs=4,
    **{"model.width": 0.25},
  )
  results = distill.train_and_evaluate(config, workdir)
  assert results["test_accuracy"] > 0.7, results["history"]
  return workdir


# ------------------------------------------------------------------ command-line smoke


def test_smoke_writes_results_metrics_and_plots(student):
  results, workdir = student["results"], student["workdir"]
  for key in ("test_accuracy", "teacher_test_accuracy", "teacher_agreement", "config"):
    assert key in results, key
  assert results["config"]["method"] == "hinton_kd"
  assert results["steps"] == 16 and [h["epoch"] for h in results["history"]] == [1, 2]
  for key in ("test_accuracy", "teacher_test_accuracy", "teacher_agreement"):
    assert 0.0 <= results[key] <= 1.0
  assert results["test_examples"] == 64

  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert records and all("step" in r for r in records)
  assert any("train/loss" in r for r in records) and any("test/accuracy" in r for r in records)
  assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
  with open(os.path.join(workdir, "curves.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert "test_accuracy=" in student["train"].stdout


def test_evaluate_prints_the_same_accuracy(student):
  printed = json.loads(student["evaluate"].stdout)
  assert printed["test_accuracy"] == pytest.approx(student["results"]["test_accuracy"], abs=1e-9)
  assert printed["test_examples"] == student["results"]["test_examples"]
  assert printed["model"] == "model"


def test_checkpoint_load_reproduces_the_accuracy(student):
  model, variables = checkpoint.load(student["workdir"])
  data_config = ml_collections.ConfigDict(student["results"]["config"]["data"])
  images, labels = data.load_arrays(data_config, "test")
  logits = model.apply(variables, images, train=False)
  accuracy = float(np.mean(np.argmax(logits, -1) == labels))
  assert accuracy == pytest.approx(student["results"]["test_accuracy"], abs=1e-9)


def test_load_for_inference_scores_results_json_on_raw_images(student, dirs, tmp_path):
  """The restored model with the preprocessing saved in its checkpoint, on the raw test images."""
  images = fake_data.read_idx(os.path.join(dirs["manual"], "t10k-images-idx3-ubyte.gz"))[..., None]
  labels = fake_data.read_idx(os.path.join(dirs["manual"], "t10k-labels-idx1-ubyte.gz"))
  model, variables, preprocess = checkpoint.load_for_inference(student["workdir"])
  logits = model.apply(variables, preprocess(images), train=False)
  accuracy = float(np.mean(np.argmax(logits, -1) == labels))
  assert accuracy == pytest.approx(student["results"]["test_accuracy"], abs=1e-9)
  # Exactly the pipeline's input (load_arrays takes results.json's plain dict).
  pipeline_images, pipeline_labels = data.load_arrays(student["results"]["config"]["data"], "test")
  np.testing.assert_array_equal(pipeline_labels, labels)
  np.testing.assert_array_equal(preprocess(images), pipeline_images)
  with pytest.raises(ValueError, match="raw uint8 images"):
    preprocess(images / 255.0)  # the mistake it exists to prevent

  # A checkpoint from before the statistics were saved: recomputed from its run's data ...
  old = str(tmp_path / "old")
  saved = checkpoint.Checkpoints(student["workdir"], read_only=True)
  meta, step = saved.restore_meta(), saved.latest_step()
  stored = saved.restore(step, {"state": None})["state"]
  saved.close()
  assert meta.pop("preprocess")["kind"] == "mean_image"
  writer = checkpoint.Checkpoints(old)
  writer.save(step, {"state": stored}, meta, force=True)
  writer.close()
  _, _, recomputed = checkpoint.load_for_inference(old)
  np.testing.assert_array_equal(recomputed(images), preprocess(images))
  # ... and without the data, one line that says so.
  shutil.rmtree(old)
  meta["config"]["data"].update(data_dir=str(tmp_path / "gone"), manual_dir=str(tmp_path / "none"))
  writer = checkpoint.Checkpoints(old)
  writer.save(step, {"state": stored}, meta, force=True)
  writer.close()
  with pytest.raises(checkpoint.CheckpointError) as error:
    checkpoint.load_for_inference(old)
  assert "predates saved preprocessing statistics" in str(error.value)
  assert "not available" in str(error.value) and "\n" not in str(error.value)


def test_results_record_their_provenance_and_are_readable_by_others(student):
  path = os.path.join(student["workdir"], "results.json")
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
  provenance = student["results"]["provenance"]
  head = subprocess.run(
    ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
  ).stdout.strip()
  assert provenance["git"]["commit"] == head and isinstance(provenance["git"]["dirty"], bool)
  assert provenance["kd_jax_version"] == kd_jax.__version__
  assert provenance["jax_version"] == jax.__version__
  assert provenance["jaxlib_version"] == jaxlib.__version__
  devices = provenance["devices"]
  assert devices["platform"] == "cpu" and devices["process_count"] == 1 and devices["count"] >= 1
  assert devices["kind"] == jax.devices()[0].device_kind
  assert provenance["command"][0].endswith(os.path.join("kd_jax", "main.py"))
  assert provenance["command"][1:] == student["args"]


def test_teacher_is_frozen_and_recorded(student, teacher):
  fingerprint = checkpoint.fingerprint(checkpoint.load(teacher)[1])
  assert fingerprint == student["teacher_fingerprint"]
  assert helpers.tree_snapshot(teacher) == student["teacher_files"]  # not a byte rewritten
  origin = {"workdir": os.path.abspath(teacher), "fingerprint": fingerprint}
  assert checkpoint.read_meta(student["workdir"])["teacher"] == origin
  assert student["results"]["teacher"] == origin


def test_different_config_on_existing_workdir_is_refused(student):
  before = helpers.tree_snapshot(student["workdir"])
  proc = run_module("kd_jax.main", *student["args"], "--config.seed=1")
  assert proc.returncode == 2
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "different config" in errors[0] and "seed" in errors[0], proc.stderr
  assert "Traceback" not in proc.stderr
  assert helpers.tree_snapshot(student["workdir"]) == before


# ------------------------------------------------------------------- in-process runs

# Every method runs: hinton_kd by the command line above, logit_regression, noisy_teacher
# and ground_truth in the tests below; here the seeds' formulas (distill.seed_compat).
METHODS = [("noisy_teacher", True), ("hinton_kd", True)]


@pytest.mark.parametrize("method,seed_compat", METHODS)
def test_seed_compat_methods_run(dirs, learned_teacher, method, seed_compat, tmp_path):
  config = experiment_config(
    "lenet_student",
    f"dataset=fashion_mnist,smoke,method={method}",
    dirs,
    num_epochs=1,
    steps_per_epoch=4,
    teacher_workdir="" if method == "ground_truth" else learned_teacher,
    **{"distill.seed_compat": seed_compat},
  )
  results = distill.train_and_evaluate(config, str(tmp_path / "run"))
  assert results["steps"] == 4 and results["method"] == method
  assert np.isfinite(results["history"][-1]["train_loss"])
  assert 0.0 <= results["test_accuracy"] <= 1.0
  if method == "ground_truth":
    assert "teacher_agreement" not in results
  else:
    assert results["teacher"]["workdir"] == os.path.abspath(learned_teacher)
    assert 0.0 <= results["teacher_agreement"] <= 1.0


def test_logit_regression_transfers_the_teacher(dirs, learned_teacher, tmp_path):
  """A logit-regression student agrees with a trained teacher far above chance (~0.1)."""
  config = experiment_config(
    "lenet_student",
    "dataset=fashion_mnist,smoke,method=logit_regression",
    dirs,
    teacher_workdir=learned_teacher,
    num_epochs=5,
    **{"optim.learning_rate": 3e-3, "model.width": 0.25},
  )
  results = distill.train_and_evaluate(config, str(tmp_path / "run"))
  assert results["steps"] == 40
  assert results["teacher_test_accuracy"] > 0.7
  # Seeds 0, 1, 2 reach 0.92 to 1.0; the untrained student agrees with the teacher ~0.1.
  assert results["teacher_agreement"] > 0.6, results["history"]
  history = results["history"]
  assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]


@pytest.mark.parametrize(
  "method,split",
  [("noisy_teacher", "train"), ("hinton_kd", "train"), ("hinton_kd", "train[64:160]")],
)
def test_cached_teacher_logits_train_the_same_student(
  dirs, learned_teacher, method, split, tmp_path
):
  """Logits computed once (the default) or by the teacher in every step: the same student,
  also when the students train on part of the split (the table is then that part's)."""
  runs = {}
  for cache in (True, False):
    config = experiment_config(
      "lenet_student",
      f"dataset=fashion_mnist,smoke,method={method}",
      dirs,
      num_epochs=2,
      steps_per_epoch=3,
      teacher_workdir=learned_teacher,
      train_split=split,
      **{"distill.cache_teacher_logits": cache},
    )
    assert distill.caches_teacher_logits(config) == cache
    workdir = str(tmp_path / f"cache_{cache}")
    runs[cache] = (distill.train_and_evaluate(config, workdir), helpers.final_params(workdir))
  (cached, cached_params), (live, live_params) = runs[True], runs[False]
  for a, b in zip(jax.tree.leaves(cached_params), jax.tree.leaves(live_params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  assert cached["history"][-1]["train_teacher_agreement"] == pytest.approx(
    live["history"][-1]["train_teacher_agreement"]
  )
  assert cached["teacher_agreement"] == live["teacher_agreement"]


def test_teacher_logits_table_is_the_teachers_output_in_stored_order(dirs, learned_teacher):
  config = experiment_config(
    "lenet_student",
    "dataset=fashion_mnist,smoke,method=hinton_kd",
    dirs,
    teacher_workdir=learned_teacher,
  )
  model, variables = checkpoint.load(learned_teacher)
  teacher = {"model": model, "variables": variables}
  table = distill.teacher_logits_table(config, teacher, mesh_lib.make_mesh(), "train", (2, 5, 6))
  images, _ = data.load_arrays(config.data, "train", classes=(2, 5, 6))
  expected = np.asarray(model.apply(variables, images, train=False))
  assert table.shape == expected.shape == (len(images), 10)
  np.testing.assert_allclose(table, expected, rtol=1e-4, atol=1e-5)


def test_students_can_train_on_part_of_the_train_split(dirs, learned_teacher, tmp_path):
  """train_split='train[64:160]' (the label-scarce study): 96 images a pass, the teacher's
  logits of exactly those images; the test split is untouched."""
  config = experiment_config(
    "lenet_student",
    "dataset=fashion_mnist,smoke,method=hinton_kd",
    dirs,
    num_epochs=2,
    steps_per_epoch=0,
    teacher_workdir=learned_teacher,
    train_split="train[64:160]",
  )
  model, variables = checkpoint.load(learned_teacher)
  teacher, mesh = {"model": model, "variables": variables}, mesh_lib.make_mesh()
  part = distill.teacher_logits_table(config, teacher, mesh, config.train_split, None)
  whole = distill.teacher_logits_table(config, teacher, mesh, "train", None)
  assert part.shape == (96, 10)
  np.testing.assert_allclose(part, whole[64:160], rtol=1e-5, atol=1e-6)
  results = distill.train_and_evaluate(config, str(tmp_path / "run"))
  assert results["steps"] == 2 * 96 // config.batch_size
  assert results["config"]["train_split"] == "train[64:160]"
  assert results["teacher_test_accuracy"] > 0.7  # evaluated on the whole test split, as always


@pytest.mark.parametrize(
  "override",
  [
    {"distill.teacher_dropout": True},
    {"data.augment": True},
    {"distill.cache_teacher_logits": False},
  ],
)
def test_teacher_runs_in_the_step_when_its_logits_vary(dirs, override):
  """Teacher dropout or augmentation: the teacher's logits change from step to step."""
  config = experiment_config("lenet_student", "dataset=fashion_mnist,smoke,method=hinton_kd", dirs)
  assert distill.caches_teacher_logits(config)
  assert not distill.caches_teacher_logits(helpers.override(config, **override))


def test_resume_after_a_kill_matches_an_uninterrupted_run(dirs, learned_teacher, tmp_path):
  """Losing the last checkpoints (a kill) and re-running resumes mid-epoch, bit for bit."""
  workdir = str(tmp_path / "run")
  config = experiment_config(
    # noisy_teacher draws random numbers every step: a resumed run must draw the same.
    "lenet_student",
    "dataset=fashion_mnist,smoke,method=noisy_teacher",
    dirs,
    teacher_workdir=learned_teacher,
    checkpoint_every_steps=3,
  )
  uninterrupted = distill.train_and_evaluate(config, workdir)
  final = helpers.final_params(workdir)
  ckpt_dir = checkpoint.checkpoint_dir(workdir)
  saved = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  assert saved[-3:] == [12, 15, 16], saved
  for step in (15, 16):  # "killed" after the save at step 12 (mid-epoch 2)
    shutil.rmtree(os.path.join(ckpt_dir, str(step)))

  resumed = distill.train_and_evaluate(config, workdir)
  assert resumed["steps"] == 16
  # Epoch 1 restored, not re-run; epoch 2's means include the steps before the resume.
  assert resumed["history"] == uninterrupted["history"]
  helpers.assert_trees_equal(helpers.final_params(workdir), final)
  assert resumed["test_accuracy"] == uninterrupted["test_accuracy"]
  # The rows the first run logged after step 12 were dropped: each step is logged once.
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logged = [json.loads(line)["step"] for line in f if '"train/loss"' in line]
  assert logged == [4, 8, 12, 16], logged


def test_rerun_of_a_finished_run_changes_nothing(dirs, learned_teacher, teacher, tmp_path):
  workdir = str(tmp_path / "run")
  config = experiment_config(
    "lenet_student",
    "dataset=fashion_mnist,smoke,method=logit_regression",
    dirs,
    num_epochs=1,
    steps_per_epoch=3,
    teacher_workdir=learned_teacher,
  )
  first = distill.train_and_evaluate(config, workdir)
  params = helpers.final_params(workdir)
  again = distill.train_and_evaluate(config, workdir)
  assert again["steps"] == first["steps"] == 3
  assert again["test_accuracy"] == first["test_accuracy"]
  helpers.assert_trees_equal(helpers.final_params(workdir), params)

  # teacher_workdir may change on resume (a moved directory), but not the teacher itself.
  before = helpers.tree_snapshot(workdir)
  other_teacher = experiment_config(
    "lenet_student",
    "dataset=fashion_mnist,smoke,method=logit_regression",
    dirs,
    num_epochs=1,
    steps_per_epoch=3,
    teacher_workdir=teacher,
  )
  with pytest.raises(ValueError, match="was distilled from the teacher in .*learned_teacher"):
    distill.train_and_evaluate(other_teacher, workdir)
  assert helpers.tree_snapshot(workdir) == before


def test_run_written_before_train_split_existed_still_resumes(dirs, learned_teacher, tmp_path):
  workdir = str(tmp_path / "run")
  config = experiment_config(
    "lenet_student",
    "dataset=fashion_mnist,smoke,method=hinton_kd",
    dirs,
    teacher_workdir=learned_teacher,
  )
  resume.claim_workdir(workdir, config)
  marker = os.path.join(workdir, workdir_lib.RUN_FILE)
  with open(marker) as f:
    saved = json.load(f)
  del saved["config"]["train_split"]  # as written by earlier versions
  with open(marker, "w") as f:
    json.dump(saved, f)
  resume.claim_workdir(workdir, config)  # "train" was the only split then: the same run
  with pytest.raises(errors.UsageError, match="train_split differ"):
    resume.claim_workdir(workdir, helpers.override(config, train_split="train[:100]"))
