"""Component (teacher) nets of amalgamation: config parsing, training with labels on their
own classes, teacher cards, and loading frozen teachers with their origin."""

from __future__ import annotations

import copy
import logging
import os

import jax
import ml_collections

from kd_jax import checkpoint, config_fields, models, reporting
from kd_jax import workdir as workdir_lib
from kd_jax.amalgamation import routing
from kd_jax.amalgamation import step as step_lib
from kd_jax.errors import UsageError
from kd_jax.train import distill, evaluation, loop, selection
from kd_jax.train import mesh as mesh_lib

CARD = "card"


# ----------------------------------------------------------------------------- config


def parse_classes(text: str) -> list[list[int]]:
  """'0+1/2+3' → [[0, 1], [2, 3]]: one class set per teacher."""
  return _parsed(config_fields.parse_class_sets, text, name="teacher_classes")


def parse_blocks(text: str, count: int, *, name: str) -> list[list[int]]:
  """'32-64-128' (shared) or '32-64/16-32-64' (per net) → block widths per net."""
  specs = _parsed(config_fields.parse_widths, text, name=name)
  if len(specs) == 1:
    specs = specs * count
  if len(specs) != count:
    raise UsageError(f"{name}={text!r} gives {len(specs)} nets' widths for {count} nets")
  return specs


def parse_pairs(text: str, plan_blocks: list[tuple[int, int]]) -> list[tuple[tuple[int, int], ...]]:
  """'auto', or 's:t+s:t' (all teachers) or per teacher separated by '/'."""
  groups = _parsed(config_fields.parse_block_pairs, text, name="block_pairs")
  if groups is None:
    return [step_lib.auto_pairs(s, t) for s, t in plan_blocks]
  if len(groups) == 1:
    groups = groups * len(plan_blocks)
  if len(groups) != len(plan_blocks):
    raise UsageError(
      f"block_pairs={text!r} gives pairs for {len(groups)} of {len(plan_blocks)} teachers"
    )
  return groups


def _parsed(parse, text: str, *, name: str):
  try:
    return parse(text)
  except UsageError as e:
    raise UsageError(f"{name}={text!r}: {e}") from None


def net_config(
  config, section: str, *, classes=None, split: str | None = None, announce: bool = True
) -> ml_collections.ConfigDict:
  """A training config for one net or stage, from the shared fields and `config[section]`.

  The net trains on `split` (default: the experiment's `train_split`) restricted to
  `classes`. Its epochs are `config[section].epochs`, raised when needed so that it makes
  at least `config[section].min_steps` optimizer steps: a schedule in epochs alone
  under-trains every net on a small pool (3 epochs of 3,300 images are 75 steps); with
  `announce`, a raise is logged.
  """
  sub = config[section]
  out = ml_collections.ConfigDict()
  out.experiment = f"{config.experiment}/{section}"
  out.seed = config.seed
  out.data = copy.deepcopy(config.data)
  out.batch_size = sub.batch_size
  out.train_split = split or config.get("train_split", "train")
  out.steps_per_epoch = config.steps_per_epoch
  out.num_epochs = sub.epochs
  if sub.get("min_steps", 0) > sub.epochs:  # a floor of fewer steps than epochs never binds
    per_epoch = loop.steps_per_epoch_of(out, classes, selection.training_split(out))
    out.num_epochs = max(sub.epochs, -(-sub.min_steps // per_epoch))
    if announce and out.num_epochs > sub.epochs:  # the run takes longer than its epochs suggest
      logging.info(
        "%s: %s (classes %s) gives %d steps per epoch; %d epochs instead of %d, to make %s.min_steps=%d "
        "steps.",
        out.experiment,
        out.train_split,
        classes,
        per_epoch,
        out.num_epochs,
        sub.epochs,
        section,
        sub.min_steps,
      )
  out.optim = ml_collections.ConfigDict(
    dict(
      learning_rate=sub.learning_rate,
      decay_at=sub.decay_at,
      decay_factor=sub.decay_factor,
      weight_decay=0.0,
    )
  )
  for key in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints", "eval_every_epochs"):
    out[key] = config[key]
  out.early_stopping_patience = config.get("early_stopping_patience", 0)
  out.card_shrinkage = config.get("card_shrinkage", 0.1)  # for the cards computed from this net
  out.on_nonfinite = config.get("on_nonfinite", "stop")
  out.matmul_precision = config.get("matmul_precision", "default")
  return out


def component_config(
  config, *, classes, widths, seed, split=None, section="component"
) -> ml_collections.ConfigDict:
  """The config of one component (or source) net trained with labels on `classes` of
  `split` (default: the experiment's `train_split`), on the schedule of `config[section]`."""
  out = net_config(config, section, classes=classes, split=split)
  out.seed = seed
  out.method = "ground_truth"
  out.teacher_workdir = ""
  out.classes = list(classes)
  out.model = ml_collections.ConfigDict(
    dict(
      name="convnet",
      block_widths=list(widths),
      convs_per_block=config.convs_per_block,
      norm="batch",
    )
  )
  return out


# ------------------------------------------------------------------------ components


def compute_card(config, model, variables, *, classes, split="train") -> routing.TeacherCard:
  """A teacher card from the net's penultimate features on its own (labelled) training data."""
  mesh = mesh_lib.make_mesh()
  fn = jax.jit(lambda v, x: models.penultimate(model.apply(v, x, train=False)[1]))
  variables = mesh_lib.replicate(variables, mesh)
  labels, features = evaluation.map_split(
    lambda images: fn(variables, images),
    config.data,
    split,
    batch_size=config.batch_size,
    mesh=mesh,
    classes=classes,
  )
  return routing.fit_teacher_card(
    features,
    labels,
    num_classes=len(classes),
    shrinkage=config.get("card_shrinkage", 0.1),
  )


def train_component(config, workdir: str, *, description: str = "") -> dict:
  """Trains one net with labels on `config.classes`; its final checkpoint holds its card
  (fitted on the images it trained on, never the held-out ones). `description` names it in
  the progress line, e.g. 'component 1/2 (classes 0+1)'."""

  def card_item(model, state):
    reporting.announce(f"{description or config.experiment}: teacher card")
    card = compute_card(
      config, model, state.variables, classes=config.classes, split=selection.training_split(config)
    )
    return {CARD: card.to_dict()}

  return distill.train_and_evaluate(config, workdir, finalize=card_item, description=description)


def load_card(workdir: str) -> routing.TeacherCard | None:
  checkpoints = checkpoint.Checkpoints(workdir, read_only=True)
  try:
    if CARD not in checkpoint_items(checkpoints):
      return None
    return routing.TeacherCard.from_dict(checkpoints.restore(None, {CARD: None})[CARD])
  finally:
    checkpoints.close()


def checkpoint_items(checkpoints: checkpoint.Checkpoints) -> list[str]:
  step = checkpoints.latest_step()
  return (
    sorted(os.listdir(os.path.join(checkpoints.directory, str(step)))) if step is not None else []
  )


def load_teacher(workdir: str, *, config, external: bool) -> dict:
  """A frozen teacher: model, variables, classes, card (computed if missing), origin."""
  try:
    meta = checkpoint.read_meta(workdir)
    model, variables = checkpoint.load(workdir)
  except checkpoint.CheckpointError as e:
    raise UsageError(f"teacher: {e}") from None
  if not isinstance(model, models.ConvNet):
    raise UsageError(
      f"the teacher in {workdir} is a {type(model).__name__}; amalgamation needs ConvNet teachers"
    )
  teacher_data = meta.get("config", {}).get("data", {}).get("name")
  if teacher_data and teacher_data != config.data.name:
    raise UsageError(
      f"the teacher in {workdir} was trained on {teacher_data}, not {config.data.name}"
    )
  entry = meta["models"][meta["main"]]
  classes = entry.get("classes")
  if not classes:
    raise UsageError(
      f"the teacher in {workdir} records no class subset: train it with experiments/component.py"
    )
  if external:  # stage 1's own teachers are finished by construction
    workdir_lib.check_finished(
      workdir, allowed=config.get("allow_unfinished_teacher", False), field="teacher_workdirs"
    )
  card = load_card(workdir)
  if card is None and config.amalgamation.selection in ("teacher_card", "pool_lda"):
    reporting.announce(f"teacher cards: {workdir} has none; computing it from its classes' images")
    card = compute_card(
      config_for_data(config),
      model,
      variables,
      classes=classes,
      split=selection.training_split(config, "train"),  # never the held-out images
    )
  return {
    "model": model,
    "variables": variables,
    "classes": list(classes),
    "card": card,
    "origin": {
      "workdir": os.path.abspath(workdir),
      "fingerprint": checkpoint.fingerprint(variables),
      "external": external,
    },
  }


def config_for_data(config):
  out = ml_collections.ConfigDict(
    {
      "data": copy.deepcopy(config.data),
      "batch_size": config.component.batch_size,
      "card_shrinkage": config.get("card_shrinkage", 0.1),
    }
  )
  return out


def verify_teacher_origins(meta: dict) -> None:
  """Refuses an amalgamation whose external teachers changed since it learned from them."""
  for name, entry in meta["models"].items():
    origin = entry.get("origin") or {}
    if not origin.get("external"):
      continue
    workdir = origin["workdir"]
    if not os.path.isdir(checkpoint.checkpoint_dir(workdir)):
      logging.warning(
        "External teacher %s (%s) is gone; using the copy in this checkpoint.", name, workdir
      )
      continue
    _, variables = checkpoint.load(workdir)
    if checkpoint.fingerprint(variables) != origin["fingerprint"]:
      raise ValueError(
        f"{name} was learned from {workdir} with fingerprint {origin['fingerprint']}, but that "
        f"teacher now has fingerprint {checkpoint.fingerprint(variables)}: it was retrained or "
        "overwritten; re-run the amalgamation into a new workdir"
      )
