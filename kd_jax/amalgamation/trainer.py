"""Stage 2 of amalgamation: the student learns from frozen teachers, without labels.

`amalgamate(config, workdir, teachers)` builds the plan (which blocks pair up, where each
teacher's classes sit in the union), fits what routing needs on the unlabelled pool (energy
statistics, the pool router), and trains the student and the alignment projections with the
shared loop (`kd_jax.train.loop.fit`) into one composite checkpoint: the state and every
teacher. The dual stage of `kd_jax.amalgamation.pipeline` runs it too, per task.
"""

from __future__ import annotations

import copy
import os

import jax
import numpy as np

from kd_jax import checkpoint, data, distributed, models, reporting
from kd_jax import workdir as workdir_lib
from kd_jax.amalgamation import components, routing
from kd_jax.amalgamation import evaluation as evaluation_lib
from kd_jax.amalgamation import step as step_lib
from kd_jax.errors import UsageError
from kd_jax.train import evaluation, loop, resume, selection, steps
from kd_jax.train import mesh as mesh_lib
from kd_jax.train.state import TrainState


def build_plan(config, teachers: list[dict]) -> tuple[step_lib.Plan, list[int]]:
  """The plan and the union's class order (teacher by teacher, each class once: the
  dual stage's sources share their task's classes)."""
  union = list(dict.fromkeys(c for t in teachers for c in t["classes"]))
  class_index = [tuple(union.index(c) for c in t["classes"]) for t in teachers]
  widths = components.parse_blocks(config.student_blocks, 1, name="student_blocks")[0]
  student = models.ConvNet(
    num_classes=len(union),
    block_widths=tuple(widths),
    convs_per_block=config.convs_per_block,
    norm="batch",
  )
  pairs = components.parse_pairs(
    config.block_pairs, [(len(widths), len(t["model"].block_widths)) for t in teachers]
  )
  plan = step_lib.Plan(
    student=student,
    teachers=tuple(t["model"] for t in teachers),
    class_index=tuple(class_index),
    pairs=tuple(tuple(p) for p in pairs),
  )
  return plan, union


@workdir_lib.released_after
def amalgamate(
  config,
  workdir: str,
  teachers: list[dict],
  *,
  section: str = "amalgamation",
  claim: bool = True,
  description: str = "",
) -> dict:
  """Stage 2 (or stage 1 of the dual stage): trains the student into `workdir`.

  `claim=False` when the caller already claimed `workdir` for the whole pipeline;
  `description` names the stage in its progress lines (default: `section`).
  """
  cfg = config[section]
  stage = description or section
  try:
    plan, union = build_plan(config, teachers)
  except ValueError as e:
    raise UsageError(str(e)) from None
  run_config = components.net_config(config, section, classes=union)
  run_config.amalgamation = copy.deepcopy(cfg)
  run_config.teachers = [t["origin"] for t in teachers]
  split = selection.training_split(run_config)  # the unlabelled pool, without held-out images
  if claim:
    resume.check_resumable(workdir, run_config.data, split, union)
    resume.claim_workdir(workdir, run_config)

  mesh = mesh_lib.make_mesh()
  mesh_lib.check_batch_size(run_config.batch_size, mesh)
  steps_per_epoch = loop.steps_per_epoch_of(run_config, union, split)
  tx = steps.make_optimizer(run_config.optim, total_steps=steps_per_epoch * run_config.num_epochs)
  info = data.get_info(config.data, classes=union)
  rng_init, rng_train = jax.random.split(jax.random.PRNGKey(config.seed))
  variables = step_lib.init_params(plan, rng_init, info.image_shape)
  state = TrainState.create(variables=variables, tx=tx, rng=rng_train)
  frozen = {"teachers": [t["variables"] for t in teachers]}
  if cfg.selection in ("teacher_card", "pool_lda"):
    frozen["cards"] = [t["card"] for t in teachers]
  if cfg.selection == "energy":
    reporting.announce(f"{stage}: energy statistics of the teachers on the unlabelled pool")
    frozen["energy_stats"] = energy_stats(run_config, plan, frozen, union, mesh)
  if cfg.selection == "pool_lda":
    reporting.announce(
      f"{stage}: fitting the pool router to the teachers' features on the unlabelled pool"
    )
    frozen["pool_router"] = pool_router(
      run_config,
      plan,
      frozen,
      union,
      mesh,
      grid=cfg.get("pool_grid", 1),
      balance_rounds=cfg.get("pool_balance_rounds", 0),
    )

  meta = {
    "kind": "amalgamation",
    "main": "student",
    "models": {
      "student": checkpoint.model_entry(
        plan.student, subtree="student", num_classes=len(union), classes=union
      ),
      **{
        f"teacher_{i}": checkpoint.model_entry(
          t["model"],
          item=f"teacher_{i}",
          num_classes=len(t["classes"]),
          classes=t["classes"],
          origin=t["origin"],
        )
        for i, t in enumerate(teachers)
      },
    },
    "class_index": [list(c) for c in plan.class_index],
    "config": run_config.to_dict(),
    "history": [],
    # The preprocessing and its statistics: a restored model's input without the data.
    "preprocess": data.preprocess_record(run_config.data),
  }
  evaluator = evaluation_lib.Evaluator(plan, cfg, frozen, mesh)

  validation = selection.validation_split(run_config)

  def evaluate(state):
    student_vars = checkpoint.variables_of(
      {"params": state.params, "batch_stats": state.batch_stats}, "student"
    )
    metrics = evaluator(student_vars, run_config, union)
    metrics.pop("test_examples")
    if validation is not None:  # labels of held-out images: only to choose and stop
      scores = evaluator(student_vars, run_config, union, split=validation)
      metrics["validation_accuracy"] = scores["test_accuracy"]
      metrics["validation_loss"] = scores["test_loss"]
    return metrics

  task = loop.Task(
    state=state,
    train_step=step_lib.make_step(
      plan, cfg, tx, total_steps=steps_per_epoch * run_config.num_epochs
    ),
    evaluate=evaluate,
    steps_per_epoch=steps_per_epoch,
    meta=meta,
    frozen=frozen,
    items={f"teacher_{i}": t["variables"] for i, t in enumerate(teachers)},
    prepare_batch=lambda batch: {"image": batch["image"]},  # labels never reach the step
    split=split,
    classes=union,
    description=stage,
  )
  state, meta = loop.fit(run_config, workdir, task, mesh=mesh)
  results = amalgamation_results(run_config, state, meta["history"], evaluator, union, teachers)
  loop.finish(
    workdir,
    results,
    meta["history"],
    title=f"amalgamation ({config.data.name})",
    panels={
      "training objective": ["train_loss", "train_feature_loss", "train_logit_loss"],
      "test and validation loss (cross-entropy)": ["test_loss", "validation_loss"],
      "accuracy": ["test_accuracy", "validation_accuracy", "routing_accuracy"]
      + [f"student_task_{i}_accuracy" for i in range(len(teachers))],
    },
    references={
      "accuracy": {
        f"teacher {i} on its classes (test)": results.get(f"teacher_{i}_accuracy")
        for i in range(len(teachers))
      }
    },
  )
  plot_block_losses(workdir)
  return results


def amalgamation_results(run_config, state, history, evaluator, union, teachers) -> dict:
  """results.json of an amalgamation: the core every run has (`selection.core_results`),
  then its own: the final evaluation's routing and per-teacher metrics, the union's classes
  and the teachers. The last epoch always evaluates the final state: its metrics are used."""
  last = history[-1] if history else {}
  if last.get("step") == int(state.step) and "test_accuracy" in last:  # the final state's
    final = {k: v for k, v in last.items() if k.startswith(("test_", "routing_", "teacher_"))}
    final.update({k: v for k, v in last.items() if k.startswith("student_task_")})
    final["test_examples"] = data.num_batches(
      run_config.data, "test", batch_size=1, train=False, classes=union
    )
  else:
    reporting.announce(f"{run_config.experiment}: evaluation of the final student")
    student_vars = checkpoint.variables_of(
      {"params": state.params, "batch_stats": state.batch_stats}, "student"
    )
    final = evaluator(student_vars, run_config, union)
  results = selection.core_results(
    run_config,
    steps=int(state.step),
    test_accuracy=final.pop("test_accuracy"),
    test_examples=final.pop("test_examples"),
    history=history,
    classes=union,
  )
  results.update(final)  # test_loss, routing_accuracy, teacher_<t>_accuracy, ...
  results["union_classes"] = union
  results["teachers"] = [{"classes": t["classes"], **t["origin"]} for t in teachers]
  if run_config.on_nonfinite == "skip":
    results["skipped_steps"] = loop.skipped_steps(history)
  return results


def pool_outputs(
  run_config, plan, frozen, union, mesh, max_batches: int | None = None, grid: int = 1
):
  """Every teacher's logits, penultimate and pooled block features (`step.pooled_blocks` over
  a `grid × grid`) over (the first batches of) the unlabelled pool (`train_split`, images
  only): three lists of `[N, ·]` arrays."""

  def outputs(teacher_vars, images):
    logits, feats, penultimate = step_lib.teacher_outputs(plan, teacher_vars, images)
    return logits, penultimate, [step_lib.pooled_blocks(f, grid) for f in feats]

  fn = jax.jit(outputs)
  teacher_vars = mesh_lib.replicate(frozen["teachers"], mesh)
  _, outs = evaluation.map_split(
    lambda images: fn(teacher_vars, images),
    run_config.data,
    selection.training_split(run_config),  # never the held-out images
    batch_size=run_config.batch_size,
    mesh=mesh,
    classes=union,
    max_batches=max_batches,
  )
  return outs  # (logits, penultimate, pooled blocks), each a list over teachers of the pool's rows


def energy_stats(run_config, plan, frozen, union, mesh, max_batches: int = 50):
  """Per-teacher mean/std of logsumexp logits over (part of) the unlabelled pool."""
  return routing.fit_energy_stats(
    pool_outputs(run_config, plan, frozen, union, mesh, max_batches)[0]
  )


def pool_router(
  run_config, plan, frozen, union, mesh, *, grid: int = 1, balance_rounds: int = 0
) -> routing.PoolRouter:
  """`selection=pool_lda`: the discriminant of the union's classes on all teachers'
  features, fitted on the whole unlabelled pool, started from teacher-card routing and
  the routed teacher's prediction, refitted `balance_rounds` times on class-balanced
  pseudo-classes (`routing.fit_pool_router`)."""
  logits, penultimate, blocks = pool_outputs(run_config, plan, frozen, union, mesh, grid=grid)
  start = routing.card_routed_classes(logits, penultimate, frozen["cards"], plan.class_index)
  return routing.fit_pool_router(
    blocks,
    start,
    plan.class_index,
    balance_rounds=balance_rounds,
    class_shares=routing.class_shares(frozen["cards"], plan.class_index),
  )


def plot_block_losses(workdir: str) -> None:
  """`block_losses.png`: per-block alignment loss over training (the seed's figure)."""
  if not distributed.is_primary():
    return
  import json  # pylint: disable=g-import-not-at-top

  records = []
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f if '"train/align/' in line]
  if not records:
    return
  names = sorted({k for r in records for k in r if k.startswith("train/align/")})
  reporting.plot_series(
    os.path.join(workdir, "block_losses.png"),
    steps=[r["step"] for r in records],
    series={n.removeprefix("train/align/"): [r.get(n, np.nan) for r in records] for n in names},
    title="per-block feature alignment loss",
    ylabel="routed MSE",
  )
