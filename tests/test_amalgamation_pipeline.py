"""End-to-end tests of the amalgamation pipeline (`experiments/amalgamate.py`,
`experiments/component.py`) on a small fake dataset, run in-process.

Each pipeline runs once per module (fixtures); the tests inspect its outputs."""

import json
import os
import sys

import fake_data
import helpers
import jax
import numpy as np
import pytest
from amalgamation_fixtures import (
  amalgamate_config,
  component_config,
  tree_snapshot,
)

from kd_jax import checkpoint, data, errors, models, reporting
from kd_jax.amalgamation import components, pipeline, routing, trainer
from kd_jax.evaluate import evaluate_workdir
from kd_jax.train import mesh as mesh_lib

UNION = [0, 1, 2, 3]


# What the smoke pipeline showed its user: progress-bar names and announced phases, in order.
SHOWN = []


@pytest.fixture(scope="module")
def smoke(idx_data, tmp_path_factory):
  """The smoke pipeline: two component teachers (0+1, 2+3) → a student over 0..3."""
  workdir = str(tmp_path_factory.mktemp("smoke") / "run")
  config = amalgamate_config(idx_data)
  progress_bar, announce = reporting.progress_bar, reporting.announce

  def named_bar(**kw):
    SHOWN.append(("bar", kw["description"]))
    return progress_bar(**kw)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(reporting, "progress_bar", named_bar)
    patch.setattr(reporting, "announce", lambda m: SHOWN.append(("line", m)) or announce(m))
    results = pipeline.run(config, workdir)
  return config, workdir, results


def test_smoke_writes_results_and_figures(smoke):
  _, workdir, results = smoke
  saved = reporting.load_json(os.path.join(workdir, "results.json"))
  for key in [
    "test_accuracy",
    "routing_accuracy",
    "teacher_0_accuracy",
    "teacher_1_accuracy",
    "student_task_0_accuracy",
    "student_task_1_accuracy",
  ]:
    assert 0.0 <= saved[key] <= 1.0, key
    assert saved[key] == results[key]
  assert saved["union_classes"] == UNION
  assert [t["classes"] for t in saved["teachers"]] == [[0, 1], [2, 3]]
  assert len(saved["history"]) == 2
  assert saved["history"][-1]["train_logit_loss"] > 0
  for name in ("block_losses.png", "curves.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 1000, name


def test_smoke_names_each_stage_and_shares_the_results_layout(smoke):
  config, workdir, results = smoke
  bars = [name for kind, name in SHOWN if kind == "bar"]
  assert bars == ["component 1/2 (classes 0+1)", "component 2/2 (classes 2+3)", "amalgamation"]
  lines = [name for kind, name in SHOWN if kind == "line"]
  assert "component 1/2 (classes 0+1): teacher card" in lines
  assert any(m.startswith("amalgamation: fitting the pool router") for m in lines), lines
  # The core keys of every results.json (tests/test_selection.py: distillation's), then its own.
  core = {
    "experiment", "dataset", "seed", "steps", "test_accuracy", "test_examples",
    "validation_examples", "last_epoch", "best_on_validation", "stopped_early", "history",
    "config",
  }  # fmt: skip
  assert core <= set(results) and "step" not in results and "best_epoch" not in results
  assert results["last_epoch"]["test_accuracy"] == results["history"][-1]["test_accuracy"]
  assert results["best_on_validation"] is None  # smoke holds nothing out
  test_images = data.num_batches(config.data, "test", batch_size=1, train=False, classes=UNION)
  assert results["test_examples"] == test_images
  teacher = reporting.load_json(os.path.join(workdir, "teachers", "teacher_0", "results.json"))
  assert core <= set(teacher)


def test_one_composite_checkpoint_holds_everything(smoke):
  _, workdir, _ = smoke
  ckpts = checkpoint.Checkpoints(workdir, read_only=True)
  try:
    step = ckpts.latest_step()
    assert {"state", "teacher_0", "teacher_1", "meta"} <= set(components.checkpoint_items(ckpts))
    meta = ckpts.restore_meta()
  finally:
    ckpts.close()
  assert step == 12  # 2 epochs × 6 batches of 32 of the ~200 training images of classes 0..3
  assert meta["kind"] == "amalgamation" and meta["main"] == "student"
  assert set(meta["models"]) == {"student", "teacher_0", "teacher_1"}
  assert meta["models"]["student"]["classes"] == UNION
  assert meta["class_index"] == [[0, 1], [2, 3]]


def test_student_reproduces_test_accuracy(smoke):
  config, workdir, results = smoke
  model, variables = checkpoint.load(workdir)
  assert isinstance(model, models.ConvNet) and model.num_classes == 4
  assert set(variables) == {"params", "batch_stats"}
  apply = jax.jit(lambda x: model.apply(variables, x, train=False)[0])
  correct = total = 0
  ds = data.make_dataset(config.data, "test", batch_size=32, train=False, classes=UNION)
  for batch in data.as_numpy(ds):
    keep = batch["mask"].astype(bool)
    prediction = np.asarray(apply(batch["image"])).argmax(-1)
    correct += int(np.sum((prediction == batch["label"])[keep]))
    total += int(keep.sum())
  assert total > 0
  assert correct / total == pytest.approx(results["test_accuracy"], abs=1e-6)
  evaluated = evaluate_workdir(workdir)
  assert evaluated["model"] == "student" and evaluated["classes"] == UNION
  assert evaluated["test_accuracy"] == pytest.approx(results["test_accuracy"], abs=1e-6)


def test_load_for_inference_scores_the_student_on_raw_images(smoke, idx_data):
  """The amalgamated student and a teacher item, restored with the run's preprocessing."""
  _, workdir, results = smoke
  images = fake_data.read_idx(os.path.join(idx_data[0], "t10k-images-idx3-ubyte.gz"))[..., None]
  labels = fake_data.read_idx(os.path.join(idx_data[0], "t10k-labels-idx1-ubyte.gz"))
  keep = np.isin(labels, UNION)  # the union's classes, whose labels are already 0..3
  model, variables, preprocess = checkpoint.load_for_inference(workdir)
  logits = model.apply(variables, preprocess(images[keep]), train=False)[0]
  accuracy = float(np.mean(np.argmax(logits, -1) == labels[keep]))
  assert accuracy == pytest.approx(results["test_accuracy"], abs=1e-6)
  _, _, teacher_preprocess = checkpoint.load_for_inference(workdir, item="teacher_0")
  np.testing.assert_array_equal(teacher_preprocess(images[:8]), preprocess(images[:8]))


@pytest.mark.parametrize("t", [0, 1])
def test_teacher_items_are_the_trained_teachers(smoke, t):
  _, workdir, results = smoke
  meta = checkpoint.read_meta(workdir)
  origin = meta["models"][f"teacher_{t}"]["origin"]
  model, variables = checkpoint.load(workdir, item=f"teacher_{t}")
  assert isinstance(model, models.ConvNet) and model.num_classes == 2
  assert checkpoint.fingerprint(variables) == origin["fingerprint"]
  assert origin["workdir"] == os.path.join(os.path.abspath(workdir), "teachers", f"teacher_{t}")
  assert origin["external"] is False
  _, own = checkpoint.load(origin["workdir"])
  assert checkpoint.fingerprint(own) == origin["fingerprint"]
  evaluated = evaluate_workdir(workdir, item=f"teacher_{t}")
  assert evaluated["classes"] == [[0, 1], [2, 3]][t]
  assert evaluated["test_accuracy"] == pytest.approx(results[f"teacher_{t}_accuracy"], abs=1e-6)


@pytest.mark.parametrize("t", [0, 1])
def test_component_checkpoint_holds_its_card(smoke, t):
  _, workdir, _ = smoke
  teacher_dir = os.path.join(workdir, "teachers", f"teacher_{t}")
  ckpts = checkpoint.Checkpoints(teacher_dir, read_only=True)
  try:
    assert components.CARD in components.checkpoint_items(ckpts)
    raw = ckpts.restore(None, {components.CARD: None})[components.CARD]
  finally:
    ckpts.close()
  card = routing.TeacherCard.from_dict(raw)
  assert card.means.shape == (2, 16)  # 2 classes, the 16-wide last block
  assert card.precision.shape == (16, 16)
  assert np.all(np.isfinite(card.precision)) and float(card.score_std) > 0
  loaded = components.load_card(teacher_dir)
  np.testing.assert_array_equal(loaded.means, card.means)


def test_rerun_with_other_teacher_blocks_is_refused(smoke):
  config, workdir, _ = smoke
  before = tree_snapshot(workdir)
  with config.unlocked():
    other = config.copy_and_resolve_references()
  other.teacher_blocks = "8-8-16"
  with pytest.raises(errors.UsageError, match="different config .*teacher_blocks"):
    pipeline.run(other, workdir)
  assert tree_snapshot(workdir) == before


def test_rerun_does_not_retrain(smoke):
  config, workdir, results = smoke
  teachers = tree_snapshot(os.path.join(workdir, "teachers"))
  checkpoints = tree_snapshot(checkpoint.checkpoint_dir(workdir))
  again = pipeline.run(config, workdir)
  assert again == results
  assert tree_snapshot(os.path.join(workdir, "teachers")) == teachers
  assert tree_snapshot(checkpoint.checkpoint_dir(workdir)) == checkpoints


# ------------------------------------------------------------------- external teachers


@pytest.fixture(scope="module")
def external(idx_data, smoke, tmp_path_factory):
  """Teacher a (0+1) trained by experiments/component.py, teacher b the smoke run's
  teacher_1 (2+3), amalgamated with `teacher_workdirs='a:b'`."""
  root = tmp_path_factory.mktemp("external")
  teacher_a = str(root / "teacher_a")
  component = pipeline.run(component_config(idx_data, "smoke,classes=0+1", num_epochs=1), teacher_a)
  teacher_b = os.path.join(smoke[1], "teachers", "teacher_1")
  workdir = str(root / "amalgamated")
  config = amalgamate_config(
    idx_data, teacher_workdirs=f"{teacher_a}:{teacher_b}", **{"amalgamation.epochs": 1}
  )
  results = pipeline.run(config, workdir)
  return config, workdir, results, teacher_a, component


def test_component_experiment_saves_a_card(external):
  _, _, _, teacher_a, component = external
  assert component["test_accuracy"] >= 0
  meta = checkpoint.read_meta(teacher_a)
  assert meta["models"]["model"]["classes"] == [0, 1]
  card = components.load_card(teacher_a)
  assert card is not None and card.means.shape == (2, 16)


def test_external_teachers_then_changed_teacher_is_refused(external):
  config, workdir, results, teacher_a, _ = external
  assert [t["external"] for t in results["teachers"]] == [True, True]
  assert results["union_classes"] == UNION
  assert evaluate_workdir(workdir)["test_accuracy"] == pytest.approx(
    results["test_accuracy"], abs=1e-6
  )

  # Overwrite teacher a with different parameters, at a later step of its checkpoints.
  ckpts = checkpoint.Checkpoints(teacher_a)
  try:
    step = ckpts.latest_step()
    meta = ckpts.restore_meta(step)
    stored = ckpts.restore(step, {"state": None, components.CARD: None})
    state = stored["state"]
    state["params"] = jax.tree.map(lambda p: np.asarray(p) * 1.5, state["params"])
    ckpts.save(
      step + 1, {"state": state, components.CARD: stored[components.CARD]}, meta, force=True
    )
  finally:
    ckpts.close()

  with pytest.raises(
    ValueError,
    match="teacher_0 was learned from .*teacher_a with fingerprint .*retrained or overwritten",
  ):
    evaluate_workdir(workdir)
  before = tree_snapshot(workdir)
  with pytest.raises(ValueError, match="fingerprint"):  # nor is the run resumed with it
    pipeline.run(config, workdir)
  assert tree_snapshot(workdir) == before


# -------------------------------------------------------------------------- dual stage


def test_dual_stage(idx_data, tmp_path):
  workdir = str(tmp_path / "dual")
  config = amalgamate_config(
    idx_data,
    "smoke,dual_stage",
    **{"component.epochs": 1, "dual_stage.epochs": 1, "amalgamation.epochs": 1},
  )
  results = pipeline.run(config, workdir)
  for t, classes in enumerate([[0, 1], [2, 3]]):
    teacher = os.path.join(workdir, "teachers", f"teacher_{t}")
    for i, widths in enumerate([[8, 16], [8, 8, 16]]):  # heterogeneous sources
      source = os.path.join(teacher, "sources", f"source_{i}")
      meta = checkpoint.read_meta(source)
      assert meta["models"]["model"]["classes"] == classes
      assert meta["models"]["model"]["spec"]["block_widths"] == widths
      assert meta["config"]["train_split"] == ["train[0%:50%]", "train[50%:100%]"][i]
    stage1 = reporting.load_json(os.path.join(teacher, "component", "results.json"))
    assert stage1["union_classes"] == classes  # the sources share their task's classes
    assert stage1["routing_accuracy"] == 1.0  # either source owns every class of the task
    model, _ = checkpoint.load(teacher)  # the exported component
    assert isinstance(model, models.ConvNet) and model.num_classes == 2
    assert model.block_widths == (8, 16)
    assert components.load_card(teacher) is not None
    # Exporting again (as a resumed run does after an interruption) keeps the export.
    exported = tree_snapshot(checkpoint.checkpoint_dir(teacher))
    pipeline.export_component(os.path.join(teacher, "component"), teacher, classes)
    assert tree_snapshot(checkpoint.checkpoint_dir(teacher)) == exported
  assert results["union_classes"] == UNION
  assert 0.0 <= results["test_accuracy"] <= 1.0
  assert os.path.exists(os.path.join(workdir, "results.json"))


def _examples(idx_data, split, classes):
  config = amalgamate_config(idx_data)
  return data.num_batches(config.data, split, batch_size=1, train=True, classes=classes)


def test_a_small_pool_trains_every_stage_on_it_for_min_steps(idx_data, tmp_path, caplog):
  """`train_split` reaches the components and the label-free stage, and `min_steps` raises a
  small pool's epochs until each stage makes that many optimizer steps, and says so."""
  split, batch = "train[:192]", 32
  config = amalgamate_config(
    idx_data,
    train_split=split,
    steps_per_epoch=0,
    **{
      "component.epochs": 1,
      "component.min_steps": 5,
      "amalgamation.epochs": 1,
      "amalgamation.min_steps": 7,
    },
  )
  with caplog.at_level("INFO"):
    results = pipeline.run(config, str(tmp_path / "run"))
  raised = [r.getMessage() for r in caplog.records if "min_steps" in r.getMessage()]
  assert any("instead of 1, to make component.min_steps=5 steps" in m for m in raised), raised
  assert any("instead of 1, to make amalgamation.min_steps=7 steps" in m for m in raised), raised

  def expected_steps(classes, min_steps):
    per_epoch = _examples(idx_data, split, classes) // batch
    assert 1 <= per_epoch < min_steps  # the floor binds: one epoch of this pool is too short
    return per_epoch * -(-min_steps // per_epoch)

  for t, classes in enumerate([[0, 1], [2, 3]]):
    teacher = reporting.load_json(
      str(tmp_path / "run" / "teachers" / f"teacher_{t}" / "results.json")
    )
    assert teacher["config"]["train_split"] == split
    assert teacher["steps"] == expected_steps(classes, 5)
  assert results["steps"] == expected_steps(UNION, 7)
  assert results["config"]["train_split"] == split


def test_source_shards_split_a_sliced_pool(idx_data):
  config = amalgamate_config(idx_data, train_split="train[10%:60%]")
  shards = [pipeline.source_split(i, 2, config) for i in range(2)]
  start, stop = round(0.1 * 512), round(0.6 * 512)  # the fixture's 512 training images
  middle = start + (stop - start) // 2
  assert shards == [f"train[{start}:{middle}]", f"train[{middle}:{stop}]"]
  whole = _examples(idx_data, "train[10%:60%]", None)
  assert sum(_examples(idx_data, s, None) for s in shards) == whole
  assert _examples(idx_data, f"{shards[0]}+{shards[1]}", None) == whole  # disjoint, and no gap


# ------------------------------------------------------------- pool router, self-training


def test_pool_lda_and_self_training_end_to_end_without_labels(
  idx_data, smoke, tmp_path, monkeypatch
):
  """`selection=pool_lda` with self-training and a class-balanced refit amalgamates the smoke
  run's teachers; the pool router is fitted from the pool's images alone: scrambled labels
  give the same router."""
  teachers = ":".join(os.path.join(smoke[1], "teachers", f"teacher_{t}") for t in range(2))
  config = amalgamate_config(
    idx_data,
    teacher_workdirs=teachers,
    **{
      "amalgamation.epochs": 1,
      "amalgamation.selection": "pool_lda",
      "amalgamation.self_training": 0.5,
      "amalgamation.self_training_start": 0.0,
      "amalgamation.self_training_end": 0.5,
      "amalgamation.pool_balance_rounds": 1,
    },
  )
  workdir = str(tmp_path / "run")
  results = pipeline.run(config, workdir)
  assert 0.0 <= results["routing_accuracy"] <= 1.0
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    logged = [r for r in map(json.loads, f) if "train/self_training/overruled" in r]
  assert logged and all(0.0 <= r["train/self_training/overruled"] <= 1.0 for r in logged)

  loaded = [components.load_teacher(d, config=config, external=True) for d in teachers.split(":")]
  plan, union = trainer.build_plan(config, loaded)
  frozen = {"teachers": [t["variables"] for t in loaded], "cards": [t["card"] for t in loaded]}
  run_config = components.net_config(config, "amalgamation", classes=union)
  mesh = mesh_lib.make_mesh()

  def router():
    return jax.tree.map(
      np.asarray,
      trainer.pool_router(
        run_config,
        plan,
        frozen,
        union,
        mesh,
        grid=config.amalgamation.pool_grid,
        balance_rounds=config.amalgamation.pool_balance_rounds,
      ),
    )

  plain = router()
  as_numpy, rng = data.as_numpy, np.random.default_rng(0)
  monkeypatch.setattr(
    data, "as_numpy", lambda ds: ({**b, "label": rng.permutation(b["label"])} for b in as_numpy(ds))
  )
  scrambled = router()
  jax.tree.map(np.testing.assert_array_equal, plain, scrambled)
  cells = config.amalgamation.pool_grid**2  # the smoke teachers' maps (14², 7²) hold the whole grid
  assert np.isfinite(plain.weight).all() and plain.weight.shape == (2 * cells * (8 + 16), 4)


def test_routing_study_reproduces_the_runs_routing(smoke, monkeypatch, capsys):
  """`experiments/studies/routing_study.py` re-derives routing from a run's checkpoints by its own
  path (its own teacher passes, its own router fit); for the run's rule it must find the
  run's routing accuracy, up to an image whose score ties within float rounding."""
  config, workdir, results = smoke
  monkeypatch.setenv(
    "XLA_FLAGS", os.environ.get("XLA_FLAGS", "")
  )  # the script's import adds CPU flags
  study = helpers.experiment("studies/routing_study")
  found = study.routing_accuracies(workdir)
  assert set(found) == set(routing.RULES)
  assert all(0.0 <= v <= 1.0 for v in found.values())
  test_split = data.make_dataset(config.data, "test", batch_size=64, train=False, classes=UNION)
  images = int(sum(b["mask"].sum() for b in data.as_numpy(test_split)))
  assert config.amalgamation.selection == "pool_lda"
  assert abs(found["pool_lda"] - results["routing_accuracy"]) <= 1.0 / images + 1e-9
  monkeypatch.setattr(
    sys, "argv", ["routing_study.py", f"--workdir={workdir}", f"--workdir={workdir}"]
  )
  study.main()
  table = capsys.readouterr().out
  for rule in routing.RULES:
    assert f"| {rule} | {found[rule]:.3f} ± 0.000 (n=2) |" in table
