"""What the routing modules share: the floor on standard deviations and the check on
per-teacher sequences."""

from __future__ import annotations

from typing import Any, Sequence

STD_FLOOR = 1e-6  # lower bound on any standard deviation used to standardise scores


def check_teachers(seq: Sequence[Any] | None, name: str) -> list[Any]:
  """``seq`` as a list of one entry per teacher.

  Raises:
    ValueError: ``seq`` is None or empty.
  """
  if seq is None:
    raise ValueError(f"{name} is required")
  seq = list(seq)
  if not seq:
    raise ValueError(f"{name} must hold at least one teacher")
  return seq
