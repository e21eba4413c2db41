"""The experiments: the config files of `experiments/`, in a checkout or an installed package.

A checkout keeps them in `experiments/` beside the package; a wheel ships the same files as
`kd_jax/experiments/` (setup.py). `--config=NAME[:ARGS]` (or `NAME.py`, or
`experiments/NAME.py`) names one of them wherever the command runs; a path to a file that
exists always wins, so a user's own config is never shadowed.

Nothing here imports a config: the listing reads each file's docstring, so it is quick and
works even when a config would fail to load.
"""

from __future__ import annotations

import ast
import os

import kd_jax
from kd_jax import config_schema

_PACKAGE_DIR = os.path.dirname(os.path.abspath(kd_jax.__file__))


def directory() -> str | None:
  """Where the experiment configs are: the installed package's, else the checkout's."""
  for candidate in (
    os.path.join(_PACKAGE_DIR, "experiments"),  # an installed wheel
    os.path.join(os.path.dirname(_PACKAGE_DIR), "experiments"),  # a checkout
  ):
    if os.path.isfile(os.path.join(candidate, "nin_teacher.py")):
      return candidate
  return None


def names() -> list[str]:
  """The experiments' names (`nin_teacher`, `lenet_student`, ...), sorted."""
  found = directory()
  if found is None:
    return []
  return sorted(
    f[: -len(".py")] for f in os.listdir(found) if f.endswith(".py") and not f.startswith("_")
  )


def path_of(name: str) -> str:
  """The config file of the experiment `name`."""
  return os.path.join(directory() or "", f"{name}.py")


def summary(name: str) -> str:
  """The first line of the experiment's docstring ('' when it has none)."""
  try:
    with open(path_of(name), encoding="utf-8") as f:
      doc = ast.get_docstring(ast.parse(f.read())) or ""
  except (OSError, SyntaxError, ValueError):
    return ""
  return doc.strip().splitlines()[0].strip() if doc.strip() else ""


def listing() -> str:
  """One line per experiment: its name and what it trains."""
  known = names()
  width = max(map(len, known), default=0)
  return "\n".join(f"  {name.ljust(width)}  {summary(name)}" for name in known)


def resolve(spec: str) -> str:
  """`--config`'s value with a packaged experiment's name replaced by its file.

  `PATH[:ARGS]` is kept when PATH exists (or names no packaged experiment); `NAME`,
  `NAME.py` or `experiments/NAME.py` otherwise become the packaged `NAME.py`, ARGS kept.
  """
  path, sep, args = spec.partition(":")
  if not path or os.path.exists(path):
    return spec
  head, base = os.path.split(path)
  name = base.removesuffix(".py")
  if head not in ("", "experiments") or name not in names():
    return spec
  return path_of(name) + sep + args


def describe(config, name: str) -> str:
  """The experiment's fields: dotted key, type, the config's value and meaning (from
  `config_schema.SCHEMA`), for `kd-jax-train --config=NAME --describe`."""
  rows = []
  for key, value in sorted(config_schema.flatten(config).items()):
    field = config_schema.SCHEMA.get(key)
    if field is None:
      kind, meaning = type(value).__name__, "(not declared in kd_jax/config_schema.py)"
    else:
      kind, meaning = field.kind.__name__, field.meaning
      allowed = field.allowed()
      if field.choices or any(c in allowed for c in "[(<>"):  # values beyond the bare type
        meaning += f"; {allowed}"
    rows.append((key, kind, repr(value), meaning))
  widths = [max(len(row[i]) for row in rows + [("field", "type", "default")]) for i in range(3)]
  lines = [
    f"{name}: {summary(name) if name in names() else ''}".rstrip(),
    "Set a field with --config.KEY=VALUE; the default is this config's value.",
    "",
  ]
  for row in [("field", "type", "default", "meaning"), *rows]:
    lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])
  return "\n".join(line.rstrip() for line in lines)
