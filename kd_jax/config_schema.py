"""The declared schema of every experiment config, checked in one pass by `validate(config)`.

`SCHEMA` declares each field that a config of `experiments/` can hold, by its dotted name:
its type, the values it allows and what it means. `validate` checks a config against it
before anything is written: `kd_jax.main` calls it as soon as the config is loaded, and
`kd_jax.train.distill.train_and_evaluate` and `kd_jax.amalgamation.pipeline.run` call it again
for library users. The first bad field raises `UsageError`, one line naming the field, its
value and what is allowed. What needs the data, the devices or a teacher (a batch larger
than the training split or not divisible over the devices, a class outside the dataset, a
block pair beyond a net's depth) is checked where those are known, still before the
workdir is claimed.

A field that a config does not hold is not checked (experiments differ); a config field
that is not declared here fails tests/test_config_schema.py, so a new field needs an entry.
The loss functions keep their own trace-time checks for users of the library.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# The allowed values live in `kd_jax.choices`, read by the code that acts on them too.
from kd_jax.choices import (
  CONVNET_NORMS,
  DATASETS,
  DTYPES,
  LOGIT_LOSSES,
  MATMUL_PRECISIONS,
  METHODS,
  MODELS,
  NIN_HEADS,
  ON_NONFINITE,
  PREPROCESS,
  ROUTINGS,
  SELECTIONS,
)
from kd_jax.errors import UsageError

MAX_SEED = 2**31 - 1  # the pipeline derives teachers' seeds as seed * 1000 + t: keep them in int64


# ------------------------------------------------------------------- string fields


def parse_class_sets(text: str) -> list[list[int]]:
  """'0+1/2+3' → [[0, 1], [2, 3]]: one class set per teacher ('' between slashes: empty)."""
  try:
    return [
      [int(c) for c in group.split("+")] if group.strip() else [] for group in text.split("/")
    ]
  except ValueError:
    raise UsageError(
      "not like '0+1/2+3' ('+' between a teacher's classes, '/' between teachers)"
    ) from None


def check_class_sets(
  class_sets: Sequence[Sequence[int]], num_classes: int | None = None, *, shared: bool = False
) -> None:
  """At least 2 teachers, each with at least 2 distinct classes, disjoint unless `shared`
  (and inside 0..num_classes-1 when the dataset's class count is given)."""
  if len(class_sets) < 2:
    raise UsageError(f"amalgamation needs at least 2 teachers, got {len(class_sets)}")
  seen = set()
  for t, classes in enumerate(class_sets):
    if not classes:
      raise UsageError(f"teacher {t} has an empty class set")
    if len(classes) < 2:  # a 1-class net learns nothing from labels and routes by nothing
      raise UsageError(
        f"teacher {t} has the single class {classes[0]}: each teacher needs at least 2 classes"
      )
    upper = num_classes if num_classes is not None else math.inf
    outside = [c for c in classes if not 0 <= c < upper]
    if outside:
      allowed = f"the dataset's 0..{num_classes - 1}" if num_classes is not None else "0 and up"
      raise UsageError(f"teacher {t}'s classes {outside} are outside {allowed}")
    if len(set(classes)) != len(classes):
      raise UsageError(f"teacher {t} lists a class twice: {list(classes)}")
    overlap = seen & set(classes)
    if overlap and not shared:
      raise UsageError(f"teachers' class sets overlap on {sorted(overlap)}: they must be disjoint")
    seen |= set(classes)


def parse_widths(text: str) -> list[list[int]]:
  """'32-64-128' (one net, or shared) or '32-64/16-32-64' (per net) → block widths per net."""
  try:
    widths = [[int(w) for w in group.split("-")] for group in text.split("/")]
  except ValueError:
    raise UsageError(
      "not like '32-64-128' or '32-64/16-32-64' (block widths, '/' between nets)"
    ) from None
  if any(w < 1 for net in widths for w in net):
    raise UsageError("every block width must be >= 1")
  return widths


def parse_block_pairs(text: str) -> list[tuple[tuple[int, ...], ...]] | None:
  """'auto' → None; 's:t+s:t' (every teacher) or per teacher with '/' → the pairs."""
  if text == "auto":
    return None
  try:
    groups = [
      tuple(tuple(int(i) for i in pair.split(":")) for pair in g.split("+"))
      for g in text.split("/")
    ]
  except ValueError:
    groups = None
  if groups is None or any(len(pair) != 2 for g in groups for pair in g):
    raise UsageError(
      "not 'auto' or like '0:0+2:1' (student block:teacher block pairs, '/' per teacher)"
    )
  return groups


def parse_teacher_workdirs(text: str) -> list[str]:
  """'dir0:dir1' → the external teachers' workdirs ('' → none: stage 1 trains them)."""
  if not text:
    return []
  paths = text.split(":")
  if len(paths) < 2:
    raise UsageError("amalgamation needs at least 2 teachers: use 'dir0:dir1'")
  if not all(p.strip() for p in paths):
    raise UsageError("has an empty path: use 'dir0:dir1'")
  return paths


def check_train_split(split: str) -> None:
  """The split trained on must be the TFDS train split or one slice of it.

  The test split is refused: evaluation reports on it, so training on it would make every
  reported number a training score.
  """
  name = re.match(r"\s*([\w-]*)", split).group(1)
  example = "use 'train' or a slice of it, such as 'train[:6000]' or 'train[10%:60%]'"
  if name == "test":
    raise UsageError(
      f"names the test split, which evaluation reports on, so training on it is refused: {example}"
    )
  if name != "train" or "+" in split:
    raise UsageError(f"is not the train split or one slice of it: {example}")
  from tensorflow_datasets.core import splits  # pylint: disable=g-import-not-at-top  (no TensorFlow)

  try:
    splits.AbstractSplit.from_spec(split)
  except (ValueError, AssertionError) as e:
    reason = (str(e).strip().splitlines() or ["bad slice"])[-1]
    raise UsageError(f"is not a TFDS split ({reason}): {example}") from None


def _check_not_empty(text: str) -> None:
  if not text:
    raise UsageError("must not be empty")


def check_classes(
  classes: Sequence[int], num_classes: int | None = None, *, fewest: int = 2
) -> tuple[int, ...]:
  """Checks a class subset; returns it as a tuple of ints.

  The one check of a subset, for a config's `classes` (a net needs `fewest=2`) and for the
  data pipeline (`fewest=1`, and the dataset's `num_classes`): here, free of TensorFlow, so
  that a config validates without it.

  Raises:
    UsageError: an empty subset, fewer than `fewest` distinct classes, a class outside
      [0, num_classes) (given `num_classes`), or a class listed twice.
  """
  classes = tuple(int(c) for c in classes)
  if not classes:
    raise UsageError("classes must not be empty: leave them out for all classes")
  if len(set(classes)) < fewest:
    raise UsageError(f"a net needs at least {fewest} distinct classes")
  outside = [c for c in classes if num_classes is not None and not 0 <= c < num_classes]
  if outside:
    raise UsageError(f"classes {outside} out of range [0, {num_classes})")
  twice = sorted({c for c in classes if classes.count(c) > 1})
  if twice:
    raise UsageError(f"lists a class twice (duplicates: {twice})")
  return classes


def _check_sources_per_task(n: int) -> None:
  if n == 1 or n < 0:
    raise UsageError("0 (no dual stage) or >= 2 (source nets per task) are allowed")


# ------------------------------------------------------------------------ the schema


@dataclasses.dataclass(frozen=True)
class Field:
  """One config field: its type, the values it allows, what it means.

  `low`/`high` bound numbers (inclusive; exclusive when `low_open`/`high_open`); `check`
  raises `UsageError` for a value of the right type that is still wrong (a string that
  does not parse, a list with duplicates).
  """

  meaning: str
  kind: type  # bool, int, float, str or list (of ints)
  low: float | None = None
  low_open: bool = False
  high: float | None = None
  high_open: bool = False
  choices: tuple[str, ...] = ()
  check: Callable[[Any], Any] | None = None

  def allowed(self) -> str:
    if self.choices:
      return "one of " + ", ".join(self.choices)
    noun = {
      bool: "True or False",
      int: "an integer",
      float: "a finite number",
      str: "a string",
      list: "a list of integers",
    }[self.kind]
    if self.low is not None and self.high is not None:
      return (
        f"{noun} in {'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}"
        + (")" if self.high_open else "]")
      )
    if self.low is not None:
      return f"{noun} {'>' if self.low_open else '>='} {_number(self.low)}"
    return noun

  def problem(self, value) -> str | None:
    """Why `value` is not allowed, or None."""
    if not _has_kind(value, self.kind):
      return f"{self.meaning} must be {self.allowed()}"
    numbers = [value] if self.kind in (int, float) else value if self.kind is list else []
    for x in numbers:
      if (self.low is not None and (x < self.low or (self.low_open and x == self.low))) or (
        self.high is not None and (x > self.high or (self.high_open and x == self.high))
      ):
        return f"{self.meaning} must be {self.allowed()}"
    if self.choices and value not in self.choices:
      return f"{self.meaning} must be {self.allowed()}"
    if self.check is not None:
      try:
        self.check(value)
      except UsageError as e:
        return str(e)
    return None


def _number(x: float) -> str:
  return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _has_kind(value, kind: type) -> bool:
  if kind is bool:
    return isinstance(value, bool)
  if kind is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if kind is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  if kind is list:
    return isinstance(value, (list, tuple)) and all(_has_kind(v, int) for v in value)
  return isinstance(value, kind)


def _flag(meaning):
  return Field(meaning, bool)


def _int(meaning, low=None, high=None):
  return Field(meaning, int, low=low, high=high)


def _positive(meaning):
  return Field(meaning, float, low=0, low_open=True)


def _fraction(meaning):
  return Field(meaning, float, low=0, high=1)


def _choice(meaning, choices):
  return Field(meaning, str, choices=choices)


def _text(meaning, check=None):
  return Field(meaning, str, check=check)


def _stage(name: str) -> dict[str, Field]:
  """The fields every training stage of `experiments/amalgamate.py` has."""
  return {
    f"{name}.epochs": _int(f"the {name} stage's number of epochs", low=1),
    f"{name}.min_steps": _int(
      f"the fewest optimizer steps of the {name} stage (its epochs are raised "
      "to reach them; 0: epochs alone)",
      low=0,
    ),
    f"{name}.learning_rate": _positive(f"the {name} stage's learning rate"),
    f"{name}.batch_size": _int(f"the {name} stage's global batch size", low=1),
    f"{name}.decay_at": _fraction(
      f"the fraction of the {name} stage after which its learning rate decays"
    ),
    f"{name}.decay_factor": _positive(f"the {name} stage's learning-rate decay factor"),
  }


def _amalgamation(name: str) -> dict[str, Field]:
  """The fields of an amalgamation stage (`amalgamation`, and `dual_stage`'s stage 1)."""
  return {
    **_stage(name),
    f"{name}.selection": _choice(f"{name}'s per-sample teacher rule", SELECTIONS),
    f"{name}.routing": _choice(
      f"{name}'s routing (one teacher per sample, or weights over them)", ROUTINGS
    ),
    f"{name}.routing_temperature": _positive(f"{name}'s soft-routing temperature"),
    f"{name}.logit_loss": _choice(
      f"{name}'s logit term (KL to the union target, or the paper's L2)", LOGIT_LOSSES
    ),
    f"{name}.temperature": _positive(f"{name}'s softmax temperature of the KL logit term"),
    f"{name}.feature_weight": Field(f"{name}'s weight of the feature-alignment term", float, low=0),
    f"{name}.logit_weight": Field(f"{name}'s weight of the logit term", float, low=0),
    f"{name}.unit_norm_weight": Field(f"{name}'s weight of the unit-norm penalty", float, low=0),
    f"{name}.seed_compat": _flag(f"whether {name} uses the seed's recipe instead of the paper's"),
    f"{name}.dtype": _choice(
      f"{name}'s compute dtype of the student and alignment projections", DTYPES
    ),
    f"{name}.teacher_dtype": _choice(f"{name}'s compute dtype of the frozen teachers", DTYPES),
    f"{name}.self_training": _fraction(
      f"{name}'s weight of the student's own task probabilities in the routing (0: off)"
    ),
    f"{name}.self_training_start": _fraction(
      f"the fraction of {name} where the self-training ramp starts"
    ),
    f"{name}.self_training_end": _fraction(
      f"the fraction of {name} where the self-training ramp ends"
    ),
    f"{name}.pool_grid": _int(
      f"{name}'s pool_lda grid: each teacher block averaged over pool_grid × pool_grid "
      "cells (1: global average)",
      low=1,
      high=16,
    ),
    f"{name}.pool_balance_rounds": _int(
      f"{name}'s pool_lda refits on class-balanced pseudo-classes (0: off)", low=0, high=20
    ),
  }


SCHEMA: dict[str, Field] = {
  # Every experiment (kd_jax/configs.py: base_config).
  "experiment": _text("the experiment's name", check=_check_not_empty),
  "seed": _int("the random seed", low=0, high=MAX_SEED),
  "batch_size": _int("the global batch size", low=1),
  "num_epochs": _int("the number of training epochs", low=1),
  "steps_per_epoch": _int("the steps per epoch (0: a full pass over the training split)", low=0),
  "train_split": _text("the TFDS split trained on", check=check_train_split),
  "optim.learning_rate": _positive("the learning rate"),
  "optim.decay_at": _fraction("the fraction of training after which the learning rate decays"),
  "optim.decay_factor": _positive("the learning-rate decay factor"),
  "optim.weight_decay": Field("the AdamW weight decay (0: plain Adam)", float, low=0),
  "log_every_steps": _int("the steps between logged training metrics", low=1),
  "checkpoint_every_steps": _int("the steps between periodic checkpoints", low=1),
  "keep_checkpoints": _int("the number of checkpoints kept (the newest)", low=1),
  "eval_every_epochs": _int("the epochs between test evaluations", low=1),
  "on_nonfinite": _choice(
    "what a non-finite loss or gradient does (stop the run, or skip the update)", ON_NONFINITE
  ),
  "allow_unfinished_teacher": _flag(
    "whether a teacher without results.json (an unfinished run) is used"
  ),
  "matmul_precision": _choice(
    "the float32 matmul precision ('default': JAX's; 'highest': no TF32 on GPUs)", MATMUL_PRECISIONS
  ),
  # Data (kd_jax/data/defaults.py: default_data_config, kd_jax/configs.py: data_config).
  "data.name": _choice("the dataset", DATASETS),
  "data.data_dir": _text("the TFDS data directory ('' for TFDS's default)"),
  "data.manual_dir": _text("the directory of raw data files ('' for none: download)"),
  "data.preprocess": _choice("the preprocessing", PREPROCESS),
  "data.augment": _flag("whether training images get pad-and-crop augmentation"),
  "data.download": _flag("whether TFDS may download the dataset when no manual_dir is set"),
  "data.shuffle_buffer": _int(
    "the shuffle block size (0: a uniform permutation of the split)", low=0
  ),
  # Teachers and students (experiments/nin_teacher.py, lenet_student.py, component.py).
  "method": _choice("the training method", METHODS),
  "teacher_workdir": _text("the distillation teacher's workdir ('' for none)"),
  "model.name": _choice("the model", MODELS),
  "model.width": _positive("the width multiplier"),
  "model.head": _choice(
    "the NiN head (Caffe's global-average-pool head, or the seed's fc head)", NIN_HEADS
  ),
  "model.dropout_rate": Field("the dropout rate", float, low=0, high=1, high_open=True),
  "model.relu_after_conv": _flag("whether the LeNet has a ReLU after each convolution"),
  "model.block_widths": Field("the ConvNet's block widths", list, low=1),
  "model.convs_per_block": _int("the ConvNet's convolutions per block", low=1),
  "model.norm": _choice("the ConvNet's normalisation", CONVNET_NORMS),
  "model.dtype": _choice("the model's compute dtype (parameters stay float32)", DTYPES),
  "distill.temperature": _positive("Hinton KD's softmax temperature"),
  "distill.soft_weight": _fraction("Hinton KD's weight of the soft (teacher) term"),
  "distill.noise_ratio": _fraction("the noisy teacher's fraction of perturbed samples"),
  "distill.noise_std": Field("the noisy teacher's noise standard deviation", float, low=0),
  "distill.teacher_dropout": _flag("whether the teacher's dropout stays on while distilling"),
  "distill.cache_teacher_logits": _flag(
    "whether a deterministic teacher's logits are computed once"
  ),
  "distill.teacher_dtype": _choice("the frozen teacher's compute dtype", DTYPES),
  "distill.seed_compat": _flag(
    "whether distillation uses the seed's formulas instead of the papers'"
  ),
  "classes": Field("the classes a component net is trained on", list, low=0, check=check_classes),
  "card_shrinkage": _fraction("the teacher cards' covariance shrinkage"),
  # Amalgamation (experiments/amalgamate.py).
  "teacher_classes": _text(
    "the teachers' class sets", check=lambda v: check_class_sets(parse_class_sets(v))
  ),
  "teacher_workdirs": _text("the external teachers' workdirs", check=parse_teacher_workdirs),
  "teacher_blocks": _text("the teachers' block widths", check=parse_widths),
  "student_blocks": _text("the student's block widths", check=parse_widths),
  "source_blocks": _text(
    "the dual stage's source nets' block widths", check=lambda v: v and parse_widths(v)
  ),
  "convs_per_block": _int("the convolutions per block of every amalgamation net", low=1),
  "block_pairs": _text("the tapped (student block, teacher block) pairs", check=parse_block_pairs),
  "sources_per_task": Field(
    "the source nets per task of the dual stage", int, check=_check_sources_per_task
  ),
  "supervised": _flag("whether the student is the supervised baseline (labels on the union)"),
  **_stage("component"),
  **_amalgamation("amalgamation"),
  **_amalgamation("dual_stage"),
}


def flatten(config) -> dict[str, Any]:
  """`{dotted name: value}` of a config's leaves (ConfigDicts and dicts are descended)."""
  tree = config.to_dict() if hasattr(config, "to_dict") else config
  flat = {}

  def walk(node: Mapping, prefix: str):
    for key, value in node.items():
      if isinstance(value, Mapping):
        walk(value, f"{prefix}{key}.")
      else:
        flat[f"{prefix}{key}"] = (
          list(value) if isinstance(value, tuple) else value
        )  # as JSON has it

  walk(tree, "")
  return flat


def undeclared(config) -> list[str]:
  """The config's fields that `SCHEMA` does not declare."""
  return sorted(set(flatten(config)) - set(SCHEMA))


def validate(config) -> None:
  """Checks every declared field of `config`; raises `UsageError` on the first bad one."""
  values = flatten(config)
  for key, field in SCHEMA.items():
    if key in values:
      problem = field.problem(values[key])
      if problem is not None:
        raise UsageError(f"--config.{key}={values[key]!r}: {problem}")
  method, teacher = values.get("method"), values.get("teacher_workdir")
  if method not in (None, "ground_truth") and not teacher:
    raise UsageError(
      f"--config.method={method!r} needs a trained teacher: set --config.teacher_workdir=DIR "
      "to the workdir of an experiments/nin_teacher.py run"
    )
  for stage in ("amalgamation", "dual_stage"):
    start, end = (
      values.get(f"{stage}.self_training_start"),
      values.get(f"{stage}.self_training_end"),
    )
    if start is not None and end is not None and start > end:
      raise UsageError(
        f"--config.{stage}.self_training_start={start!r} is after --config.{stage}.self_training_end="
        f"{end!r}: the ramp must start before it ends"
      )
  if values.get("sources_per_task", 0) >= 2 and values.get("dual_stage.self_training"):
    raise UsageError(
      "--config.dual_stage.self_training must be 0: the dual stage's sources share their task's "
      "classes, so the student has no task of its own to prefer"
    )
