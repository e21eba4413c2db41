"""Config field declarations and the parsers of fields written as strings.

`Field` declares one config field (its type, the values it allows, what it means) for
`kd_jax.config_schema.SCHEMA`; `flag`, `integer`, ... build the common kinds. The parsers turn
the string fields (class sets like '0+1/2+3', block widths like '32-64-128', block and feature
pairs, train splits) into values, raising `UsageError` with what a good value looks like.
Imports neither JAX nor TensorFlow, so a config validates without them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from kd_jax.errors import UsageError

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


def parse_feature_pairs(text: str) -> list[tuple[str, str]]:
  """'block1:stage1+block2:stage2' → [('block1', 'stage1'), ('block2', 'stage2')]: the
  (student tap, teacher tap) pairs of a feature method (`kd_jax.models.features` taps)."""
  pairs = [tuple(part.strip() for part in pair.split(":")) for pair in text.split("+")]
  if not text.strip() or any(len(pair) != 2 or not all(pair) for pair in pairs):
    raise UsageError(
      "not like 'block1:stage1+block2:stage2' (student tap:teacher tap pairs, '+' between)"
    )
  return pairs


def check_one_pair(text: str) -> None:
  if len(parse_feature_pairs(text)) != 1:
    raise UsageError("CRD takes exactly one pair (one memory bank): like 'embedding:embedding'")


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


def check_not_empty(text: str) -> None:
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


def check_sources_per_task(n: int) -> None:
  if n == 1 or n < 0:
    raise UsageError("0 (no dual stage) or >= 2 (source nets per task) are allowed")


# ------------------------------------------------------------------------ the field type


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


def flag(meaning):
  return Field(meaning, bool)


def integer(meaning, low=None, high=None):
  return Field(meaning, int, low=low, high=high)


def positive(meaning):
  return Field(meaning, float, low=0, low_open=True)


def fraction(meaning):
  return Field(meaning, float, low=0, high=1)


def choice(meaning, choices):
  return Field(meaning, str, choices=choices)


def text(meaning, check=None):
  return Field(meaning, str, check=check)
