"""Resume policy: when a workdir's run may go on, and on what.

A re-run of the same command resumes from the newest intact checkpoint. It is refused, in
one line and before anything is written, when the config changed in a way that changes the
run's numbers (`RESUMABLE_CHANGES` lists the keys that may change), when the data, the device
count or the teacher differ from what the run started with. `ADDED_KEYS` migrates configs
saved before a key existed, so older runs still resume.
"""

from __future__ import annotations

import os

import jax

from kd_jax import checkpoint, data
from kd_jax import workdir as workdir_lib
from kd_jax.errors import UsageError

# Config keys that may change when a run is resumed: they do not change its numbers.
RESUMABLE_CHANGES = (
  "data.data_dir",
  "data.manual_dir",
  "log_every_steps",
  "checkpoint_every_steps",
  "keep_checkpoints",
  "teacher_workdir",
  "distill.cache_teacher_logits",  # the same teacher logits, computed once or every step
  "distill.cache_budget_mb",  # the same teacher features, cached or computed every step
  "allow_unfinished_teacher",  # the teacher's parameters are checked by their fingerprint
  "on_nonfinite",  # the same numbers while every step is finite; 'skip' lets a stopped run go on
)
# Keys added to the configs after runs were written without them: a saved config that lacks
# one had the value given here, so its run still resumes.
ADDED_KEYS = {
  "train_split": "train",
  "on_nonfinite": "stop",
  "allow_unfinished_teacher": False,
  "component.min_steps": 0,
  "amalgamation.min_steps": 0,
  "dual_stage.min_steps": 0,
  "matmul_precision": "default",
  "model.dtype": "float32",
  "distill.teacher_dtype": "float32",
  "data.validation_split": 0,  # nothing was held out before the key existed
  "early_stopping_patience": 0,
  **{
    f"{stage}.{key}": value
    for stage in ("amalgamation", "dual_stage")
    for key, value in (
      ("dtype", "float32"),
      ("teacher_dtype", "float32"),
      ("self_training", 0.0),
      ("self_training_start", 0.3),
      ("self_training_end", 0.6),
      ("pool_grid", 1),
    )
  },
}


# Keys an experiment's configs held once but no longer hold, because they did nothing there:
# a saved config that has one still resumes.
REMOVED_KEYS = {
  "amalgamate": (
    "num_epochs",
    "batch_size",
    "optim.learning_rate",
    "optim.decay_at",
    "optim.decay_factor",
    "optim.weight_decay",
  ),
}


def claim_workdir(workdir: str, config) -> None:
  """Locks `workdir` and makes it this run's, or checks that it already is (the run then
  resumes); only `RESUMABLE_CHANGES` may differ (see `kd_jax.workdir.claim`)."""
  removed = REMOVED_KEYS.get(config.get("experiment", ""), ())
  workdir_lib.claim(workdir, config, resumable=RESUMABLE_CHANGES + removed, added=ADDED_KEYS)


def data_identity(data_config, split: str, classes=None) -> dict:
  """What identifies the data a run trains on, recorded in its checkpoints: the TFDS
  builder and version, the example counts of its training split and of the test split,
  and a fingerprint of the preprocessing statistics (which depend on every train image).
  `data_dir` and `manual_dir` are not part of it: a moved copy of the same data is the same."""
  builder = data.get_builder(
    data_config.name,
    data_dir=data_config.get("data_dir"),
    manual_dir=data_config.get("manual_dir"),
    download=bool(data_config.get("download", True)),
  )
  stats = data.train_stats(builder)

  def count(split, train):
    return data.num_batches(data_config, split, batch_size=1, train=train, classes=classes)

  return {
    "builder": builder.name,
    "version": str(builder.version),
    "train_examples": count(split, True),
    "test_examples": count("test", False),
    "train_stats": checkpoint.fingerprint(
      {k: stats[k] for k in ("mean_image", "channel_mean", "channel_std")}
    ),
  }


def check_resumable(workdir: str, data_config, split: str, classes=None) -> None:
  """Refuses, reading only, a resume that `fit` would refuse: a workdir whose checkpoints
  are all damaged, or that was trained on other data or devices."""
  if not os.path.isdir(checkpoint.checkpoint_dir(workdir)):
    return
  ckpts = checkpoint.Checkpoints(workdir, read_only=True)
  try:
    step = ckpts.latest_step()  # CheckpointError if none is intact
    if step is not None:
      saved = ckpts.restore_meta(step)
      check_same_data(workdir, saved.get("data"), data_identity(data_config, split, classes))
      check_same_devices(workdir, saved.get("devices"))
  finally:
    ckpts.close()


def check_same_devices(workdir: str, saved: int | None) -> None:
  """Refuses to resume on another number of devices: each device's share of the batch,
  hence BatchNorm's batch statistics, would change. The processes they are spread over
  may change (the data order does not depend on them, `kd_jax.data.make_dataset`)."""
  if saved is not None and saved != jax.device_count():
    raise UsageError(
      f"workdir {workdir} was trained on {saved} devices, this run has {jax.device_count()}: "
      f"resume it on {saved} devices (in any number of processes), or use a new --workdir"
    )


def check_same_data(workdir: str, saved: dict | None, current: dict) -> None:
  """Refuses to resume on other data than the run started with (runs that predate the
  record resume unchecked)."""
  if not saved:
    return
  differences = [
    f"{k} {saved.get(k)} → {current.get(k)}"
    for k in sorted(saved.keys() | current.keys())
    if saved.get(k) != current.get(k)
  ]
  if differences:
    raise UsageError(
      f"workdir {workdir} was trained on other data than data.data_dir/data.manual_dir now "
      f"hold ({'; '.join(differences)}): point them at the data the run started with, or use "
      "a new --workdir"
    )


def check_same_teacher(workdir: str, origin: dict) -> None:
  """Refuses to resume a distillation with another teacher than the one it started with.

  `teacher_workdir` may change on resume (a moved directory), so the check is on the
  teacher's parameters: the fingerprint recorded in the run's latest checkpoint.
  """
  if not os.path.isdir(checkpoint.checkpoint_dir(workdir)):
    return
  try:
    saved = checkpoint.read_meta(workdir).get("teacher")
  except checkpoint.CheckpointError:
    return  # no finished checkpoint yet: the run starts afresh
  if saved and saved.get("fingerprint") != origin["fingerprint"]:
    raise UsageError(
      f"workdir {workdir} was distilled from the teacher in {saved.get('workdir')} (fingerprint "
      f"{saved.get('fingerprint')}), but {origin['workdir']} holds another (fingerprint "
      f"{origin['fingerprint']}): resume with the same teacher, or use a new --workdir"
    )
