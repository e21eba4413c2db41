"""Orbax checkpoints of teachers, students and amalgamated students.

A run's checkpoints live in `WORKDIR/checkpoints/<step>/`, one composite Orbax
checkpoint per step with named items:

  * `state`: the `TrainState` (params, optimiser state, BatchNorm statistics, step, RNG);
  * `teacher_0`, `teacher_1`, ...: frozen teachers' variables (amalgamation runs hold their
    teachers, so one directory restores everything);
  * `meta`: JSON: which models the checkpoint holds, how to rebuild each (`models.spec_of`),
    where each teacher came from (its workdir and parameter fingerprint), and the config.

`load(workdir)` returns `(model, variables)` of the run's main model, ready for
`model.apply(variables, x, train=False)`; `load(workdir, item='teacher_0')` a teacher.
`load_for_inference(workdir)` adds `preprocess`, raw uint8 images → the model's input, from
the preprocessing statistics the run saved in its meta (`meta['preprocess']`).

With several processes, every process takes part in each save and restore (Orbax
coordinates them; process 0 writes the meta and commits the step). Restores land where
the caller says: a training state on the mesh's devices (`restore(..., sharding=)`), a
model to evaluate or a frozen teacher on the host as NumPy (`load`), never on one
device of one process.

Damaged checkpoints (a truncated array file, a missing item, an empty step directory,
unreadable meta) are skipped with a logged warning naming the step and why: readers
(`load`, `read_meta`) use the newest intact step; a resumed run also moves the damaged
newer steps aside to `<step>.damaged` (kept for the user to inspect or delete: Orbax
ignores them, and would otherwise take the damaged step for the latest and never save
below it).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy

from kd_jax import models
from kd_jax.errors import UsageError

CHECKPOINT_SUBDIR = "checkpoints"
META = "meta"


class CheckpointError(UsageError):
  """A checkpoint is missing, incomplete, or not what the caller expects."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_SUBDIR)


def fingerprint(tree) -> str:
  """A short SHA-256 of a pytree's arrays (paths, dtypes, shapes and bytes)."""
  digest = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    array = np.asarray(leaf)
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(f"{array.dtype}{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()[:16]


def model_entry(model, *, item: str = "state", subtree: str | None = None, **extra) -> dict:
  """The `meta['models']` record of one model: how to rebuild it and where its variables are."""
  return {"spec": models.spec_of(model), "item": item, "subtree": subtree, **extra}


class _ReadOnlyNotice(logging.Filter):
  """Drops Orbax's warning that a manager opened read-only is read-only: kd_jax opens one so
  on purpose, to read a run (`load`, `read_meta`), and the warning misleads users."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Given directory is read only")


logging.getLogger("absl").addFilter(_ReadOnlyNotice())  # Orbax logs through absl's logger


class Checkpoints:
  """The run's `ocp.CheckpointManager`: periodic asynchronous saves, the last few kept."""

  def __init__(
    self, workdir: str, *, save_every_steps: int = 1, keep: int = 3, read_only: bool = False
  ):
    if read_only:
      # save_interval_steps=0: else Orbax warns that it resets its default of 1 for a reader.
      options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    else:
      options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(1, save_every_steps),
        preservation_policy=preservation_policy.LatestN(keep),
        enable_async_checkpointing=True,
        cleanup_tmp_directories=True,  # a killed save leaves a tmp dir, never a step
      )
    self.directory = checkpoint_dir(workdir)
    if not read_only:
      # Made before the manager, seen by every process: Orbax makes it only where it is missing,
      # with a barrier, which a process that finds it made already would skip.
      from kd_jax import distributed  # pylint: disable=g-import-not-at-top

      if distributed.is_primary():
        os.makedirs(self.directory, exist_ok=True)
      distributed.barrier("checkpoint directory")
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self._intact = None  # (newest intact step or None, {damaged newer step: why})

  def latest_step(self) -> int | None:
    """The newest intact step (damaged newer ones are skipped with a warning), or None."""
    return self._find_intact()[0]

  def damaged_steps(self) -> dict[int, str]:
    """The steps newer than the newest intact one, and why each cannot be restored."""
    return dict(self._find_intact()[1])

  def set_aside_damaged(self) -> None:
    """Renames the damaged steps to `<step>.damaged`, so that saving goes on from the intact one
    (process 0 renames; every process then sees the same steps)."""
    from kd_jax import distributed  # pylint: disable=g-import-not-at-top

    for step in self.damaged_steps() if distributed.is_primary() else ():
      path = os.path.join(self.directory, str(step))
      target = path + ".damaged"
      n = 1
      while os.path.exists(target):
        target, n = f"{path}.damaged.{n}", n + 1
      os.rename(path, target)
      logging.warning("Moved the damaged checkpoint %s aside to %s.", path, target)
    distributed.barrier("set_aside_damaged")
    self.manager.reload()
    self._intact = None

  def save(
    self, step: int, items: Mapping[str, Any], meta: Mapping, *, force: bool = False
  ) -> bool:
    """Saves `items` (pytrees) and `meta` (JSON) at `step`, in the background.

    `meta` is deep-copied: the caller may change it (e.g. append to its history) while the
    background save is still writing.
    """
    args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
    args[META] = ocp.args.JsonSave(copy.deepcopy(dict(meta)))
    self._intact = None
    return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

  def restore_meta(self, step: int | None = None) -> dict:
    step = self._step(step)
    return dict(
      self.manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
    )

  def restore(self, step: int | None, targets: Mapping[str, Any], *, sharding=None) -> dict:
    """Restores named items. A target is a pytree whose structure, shapes and dtypes are
    kept, its arrays placed with `sharding` (e.g. replicated on the mesh); None restores the
    item as saved, as NumPy arrays on the host."""
    step = self._step(step)
    args = {
      name: ocp.args.StandardRestore(
        self._host_target(step, name) if target is None else _abstract(target, sharding)
      )
      for name, target in targets.items()
    }
    return dict(self.manager.restore(step, args=ocp.args.Composite(**args)))

  def _host_target(self, step: int, name: str):
    """NumPy arrays of the saved shapes and dtypes: Orbax restores into NumPy what it is
    given NumPy for (host memory is the same on any number of processes and devices)."""
    saved = (
      ocp.StandardCheckpointHandler().metadata(epath.Path(self.directory) / str(step) / name).tree
    )
    return jax.tree.map(lambda m: np.zeros(m.shape, m.dtype) if hasattr(m, "dtype") else m, saved)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  def _step(self, step: int | None) -> int:
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}: train this run first")
    return step

  def _find_intact(self):
    if self._intact is None:
      damaged = {}
      for step in sorted(self.manager.all_steps(), reverse=True):
        why = self._damage(step)
        if why is None:
          self._intact = (step, damaged)
          break
        logging.warning(
          "Skipping the damaged checkpoint at step %d in %s: %s.", step, self.directory, why
        )
        damaged[step] = why
      else:
        if damaged:
          listed = "; ".join(f"step {s}: {why}" for s, why in damaged.items())
          raise CheckpointError(
            f"no intact checkpoint in {self.directory} ({listed}): move it aside to start afresh"
          )
        self._intact = (None, {})
    return self._intact

  def _damage(self, step: int) -> str | None:
    """Why the checkpoint at `step` cannot be restored (None: every item restores)."""
    path = os.path.join(self.directory, str(step))
    present = sorted(n for n in os.listdir(path) if os.path.isdir(os.path.join(path, n)))
    if not present:
      return "the step directory is empty"
    if META not in present:
      return "its meta item is missing"
    try:
      meta = self.restore_meta(step)
    except Exception as e:  # pylint: disable=broad-except
      return f"its meta item is unreadable ({_gist(e)})"
    expected = {entry.get("item", "state") for entry in meta.get("models", {}).values()}
    missing = sorted(expected - set(present))
    if missing:
      return f"its item {', '.join(missing)} is missing"
    for name in present:
      if name != META:
        try:
          self.restore(step, {name: None})
        except Exception as e:  # pylint: disable=broad-except
          return f"its item {name} is unreadable ({_gist(e)})"
    return None


def _gist(error: Exception) -> str:
  """The first line of an error, short enough for a log line."""
  line = (str(error).strip().splitlines() or [""])[0]
  return f"{type(error).__name__}: {line[:240]}"


def _abstract(tree, sharding=None):
  def abstract(x):
    return jax.ShapeDtypeStruct(
      np.shape(x), x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype, sharding=sharding
    )

  return jax.tree.map(abstract, tree)


def _open(workdir: str) -> Checkpoints:
  """A read-only view of `workdir`'s checkpoints, with a clear error if it has none."""
  if not os.path.isdir(checkpoint_dir(workdir)):
    raise CheckpointError(
      f"{workdir} holds no checkpoints ({checkpoint_dir(workdir)} is missing): train it first"
    )
  return Checkpoints(workdir, read_only=True)


def read_meta(workdir: str) -> dict:
  """The `meta` record of the latest checkpoint in `workdir`, with a clear error if none."""
  checkpoints = _open(workdir)
  try:
    return checkpoints.restore_meta()
  finally:
    checkpoints.close()


def load(workdir: str, item: str | None = None):
  """Returns `(model, variables)` of the latest checkpoint's main model, or of `item`.

  The variables are NumPy arrays on the host. The model expects preprocessed images:
  `load_for_inference` also returns the preprocessing.

  Args:
    workdir: a run's workdir (the directory given to `--workdir`).
    item: a model name from the checkpoint's `meta['models']` (e.g. 'student',
      'teacher_0'); default: the run's main model (`meta['main']`).
  """
  model, variables, _ = _load(workdir, item)
  return model, variables


def load_for_inference(
  workdir: str, item: str | None = None, *, data_dir: str | None = None, manual_dir=None
):
  """Returns `(model, variables, preprocess)` of the latest checkpoint's main model, or `item`.

  `preprocess` takes raw uint8 images `[N, H, W, C]` (0-255, as stored) and returns what
  `model.apply(variables, x, train=False)` expects: the run's own preprocessing and training
  statistics, read from the checkpoint, so no TensorFlow and no data are needed.

    model, variables, preprocess = checkpoint.load_for_inference("runs/teacher")
    logits = model.apply(variables, preprocess(images_uint8), train=False)

  A checkpoint written before the statistics were saved gets them recomputed from its run's
  data (TensorFlow then loads): found where its config says, or in `data_dir`/`manual_dir`.
  """
  model, variables, meta = _load(workdir, item)
  saved = meta.get("preprocess")
  if saved is None:
    saved = _recomputed_preprocessing(workdir, meta, data_dir=data_dir, manual_dir=manual_dir)
  from kd_jax.data import portable  # pylint: disable=g-import-not-at-top

  return model, variables, portable.from_record(saved)


def _recomputed_preprocessing(workdir: str, meta: dict, *, data_dir, manual_dir) -> dict:
  """The preprocessing record of a checkpoint that has none, from its run's data config."""
  from kd_jax.data import defaults  # pylint: disable=g-import-not-at-top

  data_config = dict(meta.get("config", {}).get("data") or {})
  if not data_config.get("name"):
    raise CheckpointError(f"{workdir}: its checkpoint records neither its preprocessing nor data")
  data_config.update(download=False)  # never a download for inference
  for key, value in (("data_dir", data_dir), ("manual_dir", manual_dir)):
    if value:
      data_config[key] = value
  logging.info(
    "%s: the checkpoint predates saved preprocessing statistics; recomputing them from its %s data",
    workdir,
    data_config["name"],
  )
  try:
    from kd_jax import data  # pylint: disable=g-import-not-at-top

    return data.preprocess_record(defaults.as_data_config(data_config))
  except Exception as e:  # pylint: disable=broad-except  (any reason the data is not there)
    where = ", ".join(f"{k}={data_config.get(k)!r}" for k in ("data_dir", "manual_dir"))
    raise CheckpointError(
      f"{workdir}: its checkpoint predates saved preprocessing statistics and its "
      f"{data_config['name']} training data is not available to recompute them ({where}: "
      f"{_gist(e)}); pass data_dir= or manual_dir= where the data is"
    ) from None


def _load(workdir: str, item: str | None):
  """`(model, variables, meta)` of `item` (default: the main model) of the latest checkpoint."""
  checkpoints = _open(workdir)
  try:
    meta = checkpoints.restore_meta()
    name = item or meta["main"]
    if name not in meta["models"]:
      raise CheckpointError(f"{workdir} has no model {name!r}; it has {', '.join(meta['models'])}")
    entry = meta["models"][name]
    stored = checkpoints.restore(None, {entry["item"]: None})[entry["item"]]
  finally:
    checkpoints.close()
  return models.build(entry["spec"]), variables_of(stored, entry.get("subtree")), meta


def variables_of(stored: Mapping, subtree: str | None = None) -> dict:
  """`{'params', 'batch_stats'?}` of a stored state or teacher item (optionally one sub-model)."""
  params = stored["params"]
  batch_stats = stored.get("batch_stats") or {}
  if subtree is not None:
    params, batch_stats = params[subtree], (batch_stats or {}).get(subtree, {})
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  return variables
