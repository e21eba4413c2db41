"""`train_and_evaluate(config, workdir)`: teachers and students, supervised or distilled.

Order of work, so that bad input fails before anything is written:
  1. check the config against its schema (`kd_jax.config_schema`) and the workdir's path,
     then what needs the devices and the data (batch size), and find the data;
  2. load the teacher from `config.teacher_workdir` (distillation: a finished run) and
     check it fits;
  3. lock the workdir and check it holds a run of this same config (`kd_jax.train.resume`);
  4. train with the shared loop (`kd_jax.train.loop.fit`), a deterministic teacher's logits
     computed once beforehand (see `caches_teacher_logits`);
  5. write `results.json` and `curves.png`.
"""

from __future__ import annotations

import logging
import os
import time

import ml_collections
import numpy as np

from kd_jax import checkpoint, config_schema, data, models, reporting
from kd_jax import workdir as workdir_lib
from kd_jax.errors import UsageError
from kd_jax.train import evaluation, loop, resume, selection, steps, zoo, zoo_cache
from kd_jax.train import mesh as mesh_lib


@workdir_lib.released_after
def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, finalize=None, description: str = ""
) -> dict:
  """Trains `config.model` by `config.method` into `workdir`; returns the results dict.

  `config.classes` (optional) trains on a class subset, its labels remapped to 0..k-1,
  and `config.train_split` on part of the training split (amalgamation's component and
  source nets). `finalize(model, state) -> {name: pytree}` adds items to the final
  checkpoint. `description` names the run in its progress line (default: the experiment).
  With `config.data.validation_split`, the held-out images are never trained on
  (`kd_jax.train.selection`).
  """
  config_schema.validate(config)
  workdir_lib.check_path(workdir)
  with loop.matmul_precision(config):
    return _train_and_evaluate(config, workdir, finalize, description)


def _train_and_evaluate(config, workdir, finalize, description=""):
  mesh = mesh_lib.make_mesh()
  mesh_lib.check_batch_size(config.batch_size, mesh, name="batch_size")
  classes = config.get("classes") or None
  info = data.get_info(config.data, classes=classes)
  uses_teacher = config.method != "ground_truth"
  teacher = load_teacher(config, info) if config.teacher_workdir or uses_teacher else None

  model = models.build({**config.model.to_dict(), "num_classes": info.num_classes})
  split = selection.training_split(config)  # without the held-out validation images
  validation = selection.validation_split(config)
  steps_per_epoch = loop.steps_per_epoch_of(config, classes, split)
  tx = steps.make_optimizer(config.optim, total_steps=steps_per_epoch * config.num_epochs)
  plan = None
  if zoo.is_zoo(config.method):  # its taps checked against both models before any write
    examples = data.num_batches(config.data, split, batch_size=1, train=True, classes=classes)
    plan = zoo.make_plan(
      config,
      model,
      teacher["model"],
      info.image_shape,
      num_examples=examples,
      steps_per_epoch=steps_per_epoch,
    )
  # A zoo run's state holds its auxiliary modules beside the student ('student' subtree).
  student_of = (lambda state: state) if plan is None else zoo.student_state
  meta = {
    "kind": config.experiment,
    "main": "model",
    "models": {
      "model": checkpoint.model_entry(
        model,
        num_classes=info.num_classes,
        classes=classes,
        subtree=None if plan is None else "student",
      )
    },
    "config": config.to_dict(),
    "history": [],
    # The preprocessing and its statistics: a restored model's input without the data.
    "preprocess": data.preprocess_record(config.data),
  }
  if teacher is not None:
    meta["teacher"] = teacher["origin"]

  # Read-only checks of a run to resume: before the claim, so a refusal leaves the lock alone.
  if teacher is not None:
    resume.check_same_teacher(workdir, teacher["origin"])
  resume.check_resumable(workdir, config.data, split, classes)
  resume.claim_workdir(workdir, config)
  distill = config.get("distill", ml_collections.ConfigDict())
  if teacher is not None and distill.get("teacher_dtype"):
    teacher["model"] = teacher["model"].clone(dtype=distill.teacher_dtype)
  if plan is not None:
    initial = zoo.init_state(plan, tx, config.seed, info.image_shape)
    cached = caches_teacher_logits(config) and zoo_cache.fits_budget(config, plan, info.num_classes)
    table = zoo_cache.teacher_table(config, teacher, plan, mesh, split, classes) if cached else None
    prepare_batch = zoo_cache.prepare_batch(plan, table)
    in_step_teacher = table is None
    train_step = zoo.make_step(
      plan,
      tx=tx,
      teacher=teacher["model"] if in_step_teacher else None,
      teacher_dropout=bool(distill.get("teacher_dropout", False)),
    )
  else:
    initial = loop.init_state(model, tx, config.seed, info.image_shape)
    prepare_batch = None
    if uses_teacher and caches_teacher_logits(config):
      table = teacher_logits_table(config, teacher, mesh, split, classes)
      prepare_batch = with_teacher_logits(table)
    in_step_teacher = uses_teacher and prepare_batch is None
    train_step = steps.make_train_step(
      student=model,
      tx=tx,
      objective=steps.make_objective(config.method, distill),
      teacher=teacher["model"] if in_step_teacher else None,
      teacher_dropout=bool(distill.get("teacher_dropout", False)),
    )

  def evaluate(state) -> dict:
    variables = student_of(state).variables
    predictors = {"student": evaluation.Predictor(model, variables, mesh)}
    metrics = {}
    for name, split_name in (("test", "test"), ("validation", validation)):
      if split_name is None:
        continue
      labels, logits = evaluation.predict(
        config.data, split_name, predictors, batch_size=config.batch_size, classes=classes
      )
      metrics[f"{name}_accuracy"] = evaluation.accuracy(logits["student"], labels)
      metrics[f"{name}_loss"] = evaluation.cross_entropy(logits["student"], labels)
    return metrics

  task = loop.Task(
    state=initial,
    train_step=train_step,
    evaluate=evaluate,
    steps_per_epoch=steps_per_epoch,
    meta=meta,
    frozen=teacher["variables"] if in_step_teacher else {},
    finalize=None if finalize is None else lambda state: finalize(model, state),
    prepare_batch=prepare_batch,
    split=split,
    classes=classes,
    description=description,
  )
  state, meta = loop.fit(config, workdir, task, mesh=mesh)
  results = final_results(
    config, model, student_of(state), teacher, meta["history"], mesh, classes=classes
  )
  title = f"{config.experiment} {config.method} ({config.data.name})"
  teacher_line = {"teacher (test)": results.get("teacher_test_accuracy")} if teacher else {}
  loop.finish(workdir, results, meta["history"], title=title, references={"accuracy": teacher_line})
  return results


def caches_teacher_logits(config) -> bool:
  """Whether the frozen teacher's logits are computed once instead of in every step.

  They can be when the teacher's output depends on the image alone: no augmentation
  (the image changes every epoch) and no teacher dropout (the teacher changes every
  step). The teacher forward is then out of the step, where it is most of the cost of
  distilling a large teacher into a small student.
  """
  distill = config.get("distill", ml_collections.ConfigDict())
  return (
    bool(distill.get("cache_teacher_logits", False))
    and not distill.get("teacher_dropout", False)
    and not config.data.get("augment", False)
  )


def teacher_logits_table(config, teacher, mesh, split, classes) -> np.ndarray:
  """The eval-mode teacher's logits `[N, C]` of every training example, in stored order,
  on every process: row i belongs to the example whose 'index' is i."""
  start = time.time()
  reporting.announce(f"{config.experiment}: the teacher's logits of the training images, once")
  predictor = evaluation.Predictor(teacher["model"], teacher["variables"], mesh)
  _, logits = evaluation.predict(
    config.data, split, {"teacher": predictor}, batch_size=config.batch_size, classes=classes
  )
  logging.info(
    "Cached the teacher's logits of %d training examples in %.1f s.",
    len(logits["teacher"]),
    time.time() - start,
  )
  return logits["teacher"]


def with_teacher_logits(table: np.ndarray):
  """`prepare_batch` for cached logits: a batch's 'index' becomes its 'teacher_logits'."""

  def prepare(batch):
    batch = dict(batch)
    batch["teacher_logits"] = table[batch.pop("index")]
    return batch

  return prepare


def final_results(config, model, state, teacher, history, mesh, *, classes=None) -> dict:
  """results.json: the core of every run (`selection.core_results`: the final model's test
  accuracy, the last and the best-on-validation epoch, the history, the config), the
  method, and for a distilled student its teacher's test accuracy and their agreement."""
  reporting.announce(f"{config.experiment}: evaluation of the final model on the test split")
  predictors = {"student": evaluation.Predictor(model, state.variables, mesh)}
  if teacher is not None:
    predictors["teacher"] = evaluation.Predictor(teacher["model"], teacher["variables"], mesh)
  labels, logits = evaluation.predict(
    config.data, "test", predictors, batch_size=config.batch_size, classes=classes
  )
  results = selection.core_results(
    config,
    steps=int(state.step),
    test_accuracy=evaluation.accuracy(logits["student"], labels),
    test_examples=len(labels),
    history=history,
    classes=classes,
  )
  results["method"] = config.method
  if config.get("on_nonfinite") == "skip":
    results["skipped_steps"] = loop.skipped_steps(history)
  if teacher is not None:
    results["teacher_test_accuracy"] = evaluation.accuracy(logits["teacher"], labels)
    results["teacher_agreement"] = evaluation.agreement(logits["student"], logits["teacher"])
    results["teacher"] = teacher["origin"]
  return results


def load_teacher(config, info) -> dict:
  """The frozen teacher of `config.teacher_workdir` (a finished run), checked against this run."""
  workdir = config.teacher_workdir
  try:
    meta = checkpoint.read_meta(workdir)
    model, variables = checkpoint.load(workdir)
  except checkpoint.CheckpointError as e:
    raise UsageError(f"teacher_workdir: {e}") from None
  teacher_classes = meta["models"][meta["main"]].get("num_classes")
  if teacher_classes != info.num_classes:
    raise UsageError(
      f"the teacher in {workdir} has {teacher_classes} classes but {config.data.name} has "
      f"{info.num_classes}: train a teacher on {config.data.name}"
    )
  teacher_data = meta.get("config", {}).get("data", {}).get("name")
  if teacher_data and teacher_data != config.data.name:
    raise UsageError(
      f"the teacher in {workdir} was trained on {teacher_data}, not {config.data.name}"
    )
  workdir_lib.check_finished(
    workdir, allowed=config.get("allow_unfinished_teacher", False), field="teacher_workdir"
  )
  origin = {"workdir": os.path.abspath(workdir), "fingerprint": checkpoint.fingerprint(variables)}
  return {"model": model, "variables": variables, "origin": origin}
