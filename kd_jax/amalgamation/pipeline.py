"""The amalgamation pipeline (the seed's step=1/2/3, in one command).

`run(config, workdir)` for `experiments/amalgamate.py`:

  1. teachers: each component net is trained with labels on its own classes into
     `workdir/teachers/teacher_<t>` (or taken from `config.teacher_workdirs`); with
     `config.sources_per_task >= 2` (the paper's dual stage) each component is itself
     amalgamated, by per-sample entropy selection, from source nets trained on
     disjoint shards of its task's data;
  2. amalgamation: the student over the union of the teachers' classes learns from the
     frozen teachers, without labels, into `workdir/checkpoints` (one composite
     checkpoint: the state, with student and alignment projections, and every teacher);
  3. evaluation into `workdir/results.json`.

A finished stage is not re-run when the command is repeated; an interrupted one resumes.
`run(config, workdir)` for `experiments/component.py` trains one component net alone.
"""

from __future__ import annotations

import copy
import os

import jax
import ml_collections
import numpy as np

from kd_jax import checkpoint, config_schema, data, distributed, models, reporting
from kd_jax import workdir as workdir_lib
from kd_jax.amalgamation import components, routing
from kd_jax.amalgamation import step as step_lib
from kd_jax.errors import UsageError
from kd_jax.train import evaluation, loop, resume, steps
from kd_jax.train import mesh as mesh_lib
from kd_jax.train.state import TrainState

# ---------------------------------------------------------------------- amalgamation


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
  config, workdir: str, teachers: list[dict], *, section: str = "amalgamation", claim: bool = True
) -> dict:
  """Stage 2 (or stage 1 of the dual stage): trains the student into `workdir`.

  `claim=False` when the caller already claimed `workdir` for the whole pipeline.
  """
  cfg = config[section]
  try:
    plan, union = build_plan(config, teachers)
  except ValueError as e:
    raise UsageError(str(e)) from None
  run_config = components.net_config(config, section, classes=union)
  run_config.amalgamation = copy.deepcopy(cfg)
  run_config.teachers = [t["origin"] for t in teachers]
  if claim:
    resume.check_resumable(workdir, run_config.data, run_config.train_split, union)
    resume.claim_workdir(workdir, run_config)

  mesh = mesh_lib.make_mesh()
  mesh_lib.check_batch_size(run_config.batch_size, mesh)
  steps_per_epoch = loop.steps_per_epoch_of(run_config, union, run_config.train_split)
  tx = steps.make_optimizer(run_config.optim, total_steps=steps_per_epoch * run_config.num_epochs)
  info = data.get_info(config.data, classes=union)
  rng_init, rng_train = jax.random.split(jax.random.PRNGKey(config.seed))
  variables = step_lib.init_params(plan, rng_init, info.image_shape)
  state = TrainState.create(variables=variables, tx=tx, rng=rng_train)
  frozen = {"teachers": [t["variables"] for t in teachers]}
  if cfg.selection in ("teacher_card", "pool_lda"):
    frozen["cards"] = [t["card"] for t in teachers]
  if cfg.selection == "energy":
    frozen["energy_stats"] = energy_stats(run_config, plan, frozen, union, mesh)
  if cfg.selection == "pool_lda":
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
  }
  evaluator = Evaluator(plan, cfg, frozen, mesh)

  def evaluate(state):
    student_vars = checkpoint.variables_of(
      {"params": state.params, "batch_stats": state.batch_stats}, "student"
    )
    return evaluator(student_vars, run_config, union)

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
    split=run_config.train_split,
    classes=union,
  )
  state, meta = loop.fit(run_config, workdir, task, mesh=mesh)
  results = {
    **meta["history"][-1],
    "union_classes": union,
    "teachers": [{"classes": t["classes"], **t["origin"]} for t in teachers],
    "history": meta["history"],
    "config": run_config.to_dict(),
  }
  if run_config.on_nonfinite == "skip":
    results["skipped_steps"] = loop.skipped_steps(meta["history"])
  loop.finish(
    workdir,
    results,
    meta["history"],
    title=f"amalgamation ({config.data.name})",
    panels={
      "loss": ["train_loss", "train_feature_loss", "train_logit_loss"],
      "test accuracy": ["test_accuracy", "routing_accuracy"]
      + [f"student_task_{i}_accuracy" for i in range(len(teachers))],
    },
  )
  plot_block_losses(workdir)
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
    run_config.train_split,
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


class Evaluator:
  """Test metrics of an amalgamation: the student over the union, each teacher on its
  own classes, the student per teacher task, and how often routing picks the owner."""

  def __init__(self, plan: step_lib.Plan, cfg, frozen, mesh):
    self.plan, self.mesh = plan, mesh
    self.frozen = mesh_lib.replicate(frozen, mesh)

    def predict(student_vars, frozen, images):
      s_logits, _ = plan.student.apply(student_vars, images, train=False)
      t_logits, t_feats, t_pen = step_lib.teacher_outputs(plan, frozen["teachers"], images)
      return (
        s_logits,
        t_logits,
        step_lib.routing_weights(cfg, t_logits, t_pen, frozen, blocks=t_feats),
      )

    self._predict = jax.jit(predict)

  def __call__(self, student_vars, run_config, union) -> dict:
    plan = self.plan
    student_vars = mesh_lib.replicate(student_vars, self.mesh)
    # owns[t, c]: teacher t knows union class c (several teachers may, in the dual stage).
    owns = np.zeros((len(plan.teachers), len(union)), bool)
    for t, index in enumerate(plan.class_index):
      owns[t, list(index)] = True
    labels, (student, teachers, weights) = evaluation.map_split(
      lambda images: self._predict(student_vars, self.frozen, images),
      run_config.data,
      "test",
      batch_size=run_config.batch_size,
      mesh=self.mesh,
      classes=union,
    )
    prediction = student.argmax(-1)
    metrics = {
      "test_accuracy": float(np.mean(prediction == labels)),
      "routing_accuracy": float(np.mean(owns[weights.argmax(-1), labels])),
    }
    for t, index in enumerate(plan.class_index):
      mine = owns[t, labels]
      own_logits = teachers[t][mine]
      metrics[f"teacher_{t}_accuracy"] = float(
        np.mean(np.asarray(index)[own_logits.argmax(-1)] == labels[mine])
      )
      metrics[f"student_task_{t}_accuracy"] = float(np.mean(prediction[mine] == labels[mine]))
    return metrics


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


# ---------------------------------------------------------------------------- driver


def teacher_specs(config, num_classes: int) -> list[dict]:
  """What stage 1 must produce: per teacher, an external workdir or classes + widths."""
  if config.teacher_workdirs:  # checked by config_schema.validate
    return [
      {"workdir": p, "external": True}
      for p in config_schema.parse_teacher_workdirs(config.teacher_workdirs)
    ]
  class_sets = components.parse_classes(config.teacher_classes)
  config_schema.check_class_sets(class_sets, num_classes)
  widths = components.parse_blocks(config.teacher_blocks, len(class_sets), name="teacher_blocks")
  return [{"classes": c, "widths": w, "external": False} for c, w in zip(class_sets, widths)]


def build_teacher(config, workdir: str, t: int, spec: dict) -> str:
  """Trains teacher `t` (stage 1) unless it is finished; returns its workdir."""
  out = os.path.join(workdir, "teachers", f"teacher_{t}")
  seed = config.seed * 1000 + t + 1
  if config.sources_per_task < 2:
    if not os.path.exists(os.path.join(out, "results.json")):
      components.train_component(
        components.component_config(
          config, classes=spec["classes"], widths=spec["widths"], seed=seed
        ),
        out,
      )
    return out
  # Dual stage: source nets on disjoint shards of the task's data, amalgamated by entropy.
  n = config.sources_per_task
  source_widths = components.parse_blocks(
    config.source_blocks or config.teacher_blocks, n, name="source_blocks"
  )
  sources = []
  for i in range(n):
    src = os.path.join(out, "sources", f"source_{i}")
    split = source_split(i, n, config)
    if not os.path.exists(os.path.join(src, "results.json")):
      components.train_component(
        components.component_config(
          config, classes=spec["classes"], widths=source_widths[i], seed=seed * 100 + i, split=split
        ),
        src,
      )
    sources.append(components.load_teacher(src, config=config, external=False))
  if not os.path.exists(os.path.join(out, "results.json")):
    stage1 = copy.deepcopy(config)
    with stage1.unlocked():
      stage1.student_blocks = "-".join(map(str, spec["widths"]))
    component_dir = os.path.join(out, "component")
    amalgamate(stage1, component_dir, sources, section="dual_stage")
    export_component(component_dir, out, spec["classes"])
  return out


def export_component(amalgamation_dir: str, out: str, classes) -> None:
  """Turns a stage-1 amalgamated student into a component teacher checkpoint (with card):
  every process computes the card and saves; process 0 writes results.json."""
  ckpts = checkpoint.Checkpoints(out)
  if ckpts.latest_step() is None:  # else it was exported before an interruption
    model, variables = checkpoint.load(amalgamation_dir)
    meta = checkpoint.read_meta(amalgamation_dir)
    config = ml_collections.ConfigDict(meta["config"])
    card = components.compute_card(
      config, model, variables, classes=meta["models"]["student"]["classes"]
    )
    ckpts.save(
      0,
      {
        "state": {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})},
        components.CARD: card.to_dict(),
      },
      {
        "kind": "component",
        "main": "model",
        "models": {
          "model": checkpoint.model_entry(model, num_classes=len(classes), classes=list(classes))
        },
        "config": meta["config"],
        "history": [],
      },
      force=True,
    )
  ckpts.close()
  if distributed.is_primary():
    results = reporting.load_json(os.path.join(amalgamation_dir, "results.json"))
    reporting.write_json_atomic(os.path.join(out, "results.json"), {"stage_1": results})
  distributed.barrier("component exported")


@workdir_lib.released_after
def run(config, workdir: str) -> dict:
  """Runs `experiments/component.py` or the whole `experiments/amalgamate.py` pipeline."""
  config_schema.validate(config)
  workdir_lib.check_path(workdir)
  if config.experiment == "component":
    return components.train_component(config, workdir)
  info = data.get_info(config.data)
  specs = teacher_specs(config, info.num_classes)  # validates before anything is written
  if config.supervised:  # the baseline: the same student, trained with labels on the union
    if any(s["external"] for s in specs):
      raise UsageError(
        "supervised=True trains the student on teacher_classes; unset teacher_workdirs"
      )
    union = [c for s in specs for c in s["classes"]]
    widths = components.parse_blocks(config.student_blocks, 1, name="student_blocks")[0]
    # The amalgamation's schedule: the same student, the same number of steps.
    baseline = components.component_config(
      config, classes=union, widths=widths, seed=config.seed, section="amalgamation"
    )
    return components.train_component(baseline, workdir)
  # Everything is checked before the workdir is claimed: bad input writes nothing.
  if any(s["external"] for s in specs):
    teachers = [components.load_teacher(s["workdir"], config=config, external=True) for s in specs]
    config_schema.check_class_sets([t["classes"] for t in teachers], info.num_classes)
    try:
      _, union = build_plan(config, teachers)
    except ValueError as e:
      raise UsageError(str(e)) from None
    if os.path.isdir(checkpoint.checkpoint_dir(workdir)):  # resuming: the same teachers only
      components.verify_teacher_origins(checkpoint.read_meta(workdir))
  else:
    teachers = None
    validate_plan(config, specs)
    union = [c for s in specs for c in s["classes"]]
  check_batches(config, "amalgamation", union, what="the amalgamation")
  resume.claim_workdir(workdir, config)
  if teachers is None:
    teachers = [
      components.load_teacher(
        build_teacher(config, workdir, t, spec), config=config, external=False
      )
      for t, spec in enumerate(specs)
    ]
  return amalgamate(config, workdir, teachers, claim=False)


def validate_plan(config, specs) -> None:
  """Checks the student/teacher blocks and tapped pairs before any training."""
  widths = components.parse_blocks(config.student_blocks, 1, name="student_blocks")[0]
  plans = [
    ("", widths, [s["widths"] for s in specs])
  ]  # (context, student widths, teachers' widths)
  if config.sources_per_task >= 2:  # the dual stage: each component from its sources
    n = config.sources_per_task
    source_widths = components.parse_blocks(
      config.source_blocks or config.teacher_blocks, n, name="source_blocks"
    )
    plans += [
      (
        f"the dual stage of teacher {t} (teacher {t} is the student, its sources the teachers): ",
        s["widths"],
        source_widths,
      )
      for t, s in enumerate(specs)
    ]
  for context, student_widths, teacher_widths in plans:
    pairs = components.parse_pairs(
      config.block_pairs, [(len(student_widths), len(w)) for w in teacher_widths]
    )
    try:
      step_lib.Plan(
        student=models.ConvNet(num_classes=1, block_widths=tuple(student_widths)),
        teachers=tuple(
          models.ConvNet(num_classes=1, block_widths=tuple(w)) for w in teacher_widths
        ),
        class_index=tuple(() for _ in teacher_widths),
        pairs=tuple(pairs),
      )
    except ValueError as e:
      raise UsageError(f"{context}{e}") from None
  for t, spec in enumerate(specs):  # enough training data for one batch of each net
    if config.sources_per_task >= 2:
      for i in range(config.sources_per_task):
        check_batches(
          config,
          "component",
          spec["classes"],
          source_split(i, config.sources_per_task, config),
          what=f"source {i} of teacher {t}",
        )
      check_batches(config, "dual_stage", spec["classes"], what=f"the dual stage of teacher {t}")
    else:
      check_batches(config, "component", spec["classes"], what=f"teacher {t}")


def check_batches(config, section: str, classes, split: str | None = None, *, what: str) -> None:
  """Refuses a net whose training data (classes, split) cannot fill one batch."""
  split = split or config.train_split
  try:
    net = components.net_config(config, section, classes=classes, split=split, announce=False)
    loop.steps_per_epoch_of(net, classes, split)
  except UsageError as e:
    raise UsageError(f"{what} (classes {list(classes)}, split {split}): {e}") from None


def source_split(i: int, n: int, config) -> str:
  """Source `i` of `n` trains on the `i`-th of `n` disjoint shards of `config.train_split`."""
  if config.train_split == "train":
    return f"train[{100 * i // n}%:{100 * (i + 1) // n}%]"
  from tensorflow_datasets.core import splits  # pylint: disable=g-import-not-at-top

  size = data.num_batches(config.data, "train", batch_size=1, train=False)
  train = {"train": splits.SplitInfo(name="train", shard_lengths=[size], num_bytes=0)}
  (bounds,) = splits.ReadInstruction.from_spec(config.train_split).to_absolute(train)
  start, stop = bounds.from_ or 0, size if bounds.to is None else bounds.to
  return f"train[{start + (stop - start) * i // n}:{start + (stop - start) * (i + 1) // n}]"
