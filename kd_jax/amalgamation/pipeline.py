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

Stage 2 is `kd_jax.amalgamation.trainer`, its evaluation `kd_jax.amalgamation.evaluation`. A
finished stage is not re-run when the command is repeated; an interrupted one resumes.
`run(config, workdir)` for `experiments/component.py` trains one component net alone.
"""

from __future__ import annotations

import copy
import os

import ml_collections

from kd_jax import checkpoint, config_fields, config_schema, data, distributed, models, reporting
from kd_jax import workdir as workdir_lib
from kd_jax.amalgamation import components, trainer
from kd_jax.amalgamation import step as step_lib
from kd_jax.errors import UsageError
from kd_jax.train import loop, resume, selection


def teacher_specs(config, num_classes: int) -> list[dict]:
  """What stage 1 must produce: per teacher, an external workdir or classes + widths."""
  if config.teacher_workdirs:  # checked by config_schema.validate
    return [
      {"workdir": p, "external": True}
      for p in config_fields.parse_teacher_workdirs(config.teacher_workdirs)
    ]
  class_sets = components.parse_classes(config.teacher_classes)
  config_fields.check_class_sets(class_sets, num_classes)
  widths = components.parse_blocks(config.teacher_blocks, len(class_sets), name="teacher_blocks")
  return [{"classes": c, "widths": w, "external": False} for c, w in zip(class_sets, widths)]


def build_teacher(config, workdir: str, t: int, spec: dict, count: int = 0) -> str:
  """Trains teacher `t` (of `count`; stage 1) unless it is finished; returns its workdir."""
  out = os.path.join(workdir, "teachers", f"teacher_{t}")
  seed = config.seed * 1000 + t + 1
  name = f"component {t + 1}/{count or t + 1} (classes {'+'.join(map(str, spec['classes']))})"
  if config.sources_per_task < 2:
    if not os.path.exists(os.path.join(out, "results.json")):
      components.train_component(
        components.component_config(
          config, classes=spec["classes"], widths=spec["widths"], seed=seed
        ),
        out,
        description=name,
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
        description=f"{name}, source {i + 1}/{n}",
      )
    sources.append(components.load_teacher(src, config=config, external=False))
  if not os.path.exists(os.path.join(out, "results.json")):
    stage1 = copy.deepcopy(config)
    with stage1.unlocked():
      stage1.student_blocks = "-".join(map(str, spec["widths"]))
    component_dir = os.path.join(out, "component")
    trainer.amalgamate(
      stage1, component_dir, sources, section="dual_stage", description=f"{name}, dual stage"
    )
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
        "preprocess": meta.get("preprocess"),
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
    return components.train_component(baseline, workdir, description="supervised baseline")
  # Everything is checked before the workdir is claimed: bad input writes nothing.
  if any(s["external"] for s in specs):
    teachers = [components.load_teacher(s["workdir"], config=config, external=True) for s in specs]
    config_fields.check_class_sets([t["classes"] for t in teachers], info.num_classes)
    try:
      _, union = trainer.build_plan(config, teachers)
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
        build_teacher(config, workdir, t, spec, len(specs)), config=config, external=False
      )
      for t, spec in enumerate(specs)
    ]
  return trainer.amalgamate(config, workdir, teachers, claim=False)


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
    loop.steps_per_epoch_of(net, classes, selection.training_split(net, split))
  except UsageError as e:
    raise UsageError(f"{what} (classes {list(classes)}, split {split}): {e}") from None


def source_split(i: int, n: int, config) -> str:
  """Source `i` of `n` trains on the `i`-th of `n` disjoint shards of `config.train_split`
  (without the held-out validation images)."""
  base = selection.training_split(config)
  if base == "train":
    return f"train[{100 * i // n}%:{100 * (i + 1) // n}%]"
  from tensorflow_datasets.core import splits  # pylint: disable=g-import-not-at-top

  size = data.num_batches(config.data, "train", batch_size=1, train=False)
  train = {"train": splits.SplitInfo(name="train", shard_lengths=[size], num_bytes=0)}
  (bounds,) = splits.ReadInstruction.from_spec(base).to_absolute(train)
  start, stop = bounds.from_ or 0, size if bounds.to is None else bounds.to
  return f"train[{start + (stop - start) * i // n}:{start + (stop - start) * (i + 1) // n}]"
