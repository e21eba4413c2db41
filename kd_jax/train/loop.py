"""`train_and_evaluate(config, workdir)`: teachers and students, supervised or distilled.

Order of work, so that bad input fails before anything is written:
  1. check the config against its schema (`kd_jax.config_schema`) and the workdir's path,
     then what needs the devices and the data (batch size), and find the data;
  2. load the teacher from `config.teacher_workdir` (distillation: a finished run) and
     check it fits;
  3. lock the workdir and check it holds a run of this same config (`kd_jax.workdir`),
     then resume from its newest intact checkpoint (state, step, RNG, the epoch history and
     running sums) if it was trained on the same data, else start fresh;
  4. train, with periodic asynchronous checkpoints, metrics and test evaluations (a
     deterministic teacher's logits computed once beforehand, see `caches_teacher_logits`);
  5. write `results.json` and `curves.png`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kd_jax import checkpoint, config_schema, data, distributed, models, reporting
from kd_jax import workdir as workdir_lib
from kd_jax.config_schema import UsageError
from kd_jax.train import evaluation
from kd_jax.train import mesh as mesh_lib
from kd_jax.train import steps
from kd_jax.train.state import TrainState

# Config keys that may change when a run is resumed: they do not change its numbers.
RESUMABLE_CHANGES = (
    "data.data_dir",
    "data.manual_dir",
    "log_every_steps",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "teacher_workdir",
    "distill.cache_teacher_logits",  # the same teacher logits, computed once or every step
    "allow_unfinished_teacher",  # the teacher's parameters are checked by their fingerprint
    "on_nonfinite",  # the same numbers while every step is finite; 'skip' lets a stopped run go on
)
# Keys added to the configs after runs were written without them: a saved config that lacks
# one had the value given here, so its run still resumes.
ADDED_KEYS = {"train_split": "train", "on_nonfinite": "stop", "allow_unfinished_teacher": False,
              "component.min_steps": 0, "amalgamation.min_steps": 0, "dual_stage.min_steps": 0,
              "matmul_precision": "default", "model.dtype": "float32", "distill.teacher_dtype": "float32",
              **{f"{stage}.{key}": value for stage in ("amalgamation", "dual_stage")
                 for key, value in (("dtype", "float32"), ("teacher_dtype", "float32"), ("self_training", 0.0),
                                    ("self_training_start", 0.3), ("self_training_end", 0.6),
                                    ("pool_grid", 1))}}


@workdir_lib.released_after
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, finalize=None) -> dict:
  """Trains `config.model` by `config.method` into `workdir`; returns the results dict.

  `config.classes` (optional) trains on a class subset, its labels remapped to 0..k-1,
  and `config.train_split` on part of the training split (amalgamation's component and
  source nets). `finalize(model, state) -> {name: pytree}` adds
  items to the final checkpoint.
  """
  config_schema.validate(config)
  workdir_lib.check_path(workdir)
  with matmul_precision(config):
    return _train_and_evaluate(config, workdir, finalize)


def _train_and_evaluate(config, workdir, finalize):
  mesh = mesh_lib.make_mesh()
  mesh_lib.check_batch_size(config.batch_size, mesh, name="batch_size")
  classes = config.get("classes") or None
  info = data.get_info(config.data, classes=classes)
  teacher = load_teacher(config, info) if config.teacher_workdir or config.method != "ground_truth" else None

  model = models.build({**config.model.to_dict(), "num_classes": info.num_classes})
  split = config.train_split
  steps_per_epoch = steps_per_epoch_of(config, classes, split)
  tx = steps.make_optimizer(config.optim, total_steps=steps_per_epoch * config.num_epochs)
  state = init_state(model, tx, config.seed, info.image_shape)
  meta = {
      "kind": config.experiment,
      "main": "model",
      "models": {"model": checkpoint.model_entry(model, num_classes=info.num_classes, classes=classes)},
      "config": config.to_dict(),
      "history": [],
  }
  if teacher is not None:
    meta["teacher"] = teacher["origin"]

  # Read-only checks of a run to resume: before the claim, so a refusal leaves the lock file alone too.
  if teacher is not None:
    check_same_teacher(workdir, teacher["origin"])
  check_resumable(workdir, config.data, split, classes)
  claim_workdir(workdir, config)
  uses_teacher = config.method != "ground_truth"
  distill = config.get("distill", ml_collections.ConfigDict())
  if teacher is not None and distill.get("teacher_dtype"):
    teacher["model"] = teacher["model"].clone(dtype=distill.teacher_dtype)
  prepare_batch = None
  if uses_teacher and caches_teacher_logits(config):
    prepare_batch = with_teacher_logits(teacher_logits_table(config, teacher, mesh, split, classes))
  in_step_teacher = uses_teacher and prepare_batch is None
  train_step = steps.make_train_step(
      student=model,
      tx=tx,
      objective=steps.make_objective(config.method, distill),
      teacher=teacher["model"] if in_step_teacher else None,
      teacher_dropout=bool(distill.get("teacher_dropout", False)),
  )

  def evaluate(state) -> dict:
    predictors = {"student": evaluation.Predictor(model, state.variables, mesh)}
    labels, logits = evaluation.predict(
        config.data, "test", predictors, batch_size=config.batch_size, classes=classes
    )
    return {
        "test_accuracy": evaluation.accuracy(logits["student"], labels),
        "test_loss": evaluation.cross_entropy(logits["student"], labels),
    }

  state, meta = fit(
      config,
      workdir,
      state=state,
      train_step=train_step,
      frozen=teacher["variables"] if in_step_teacher else {},
      evaluate=evaluate,
      meta=meta,
      mesh=mesh,
      steps_per_epoch=steps_per_epoch,
      classes=classes,
      split=split,
      prepare_batch=prepare_batch,
      finalize=None if finalize is None else lambda state: finalize(model, state),
  )
  results = final_results(config, model, state, teacher, meta["history"], mesh, classes=classes)
  finish(workdir, results, meta["history"], title=f"{config.experiment} {config.method} ({config.data.name})")
  return results


def fit(config, workdir, *, state, train_step, frozen, evaluate, meta, mesh, steps_per_epoch,
        classes=None, split="train", items=None, finalize=None, prepare_batch=None):
  """The training loop shared by every method: resume, train, evaluate, checkpoint.

  Resumes from the newest intact checkpoint in `workdir` (state, step, RNG, epoch history
  and the running sums of the epoch under way), refusing other data than the run started
  with; saves every `config.checkpoint_every_steps` steps and at each epoch's end, in the
  background, with `items` (e.g. frozen teachers) beside the state in each checkpoint.
  `finalize(state) -> {name: pytree}` adds items (e.g. a teacher card) to the last
  checkpoint. `split` is the TFDS training split (e.g. 'train[:50%]').
  `prepare_batch(batch) -> batch` makes what the step sees of a host batch (amalgamation:
  no labels; cached teacher logits: looked up by the batch's 'index', which the input
  pipeline adds for it).

  Faults: a non-finite step (see `steps.keep_if_finite`) raises `Diverged` at that step
  (`config.on_nonfinite='stop'`) or is skipped and counted ('skip'); SIGINT or SIGTERM
  saves the step under way and raises `Interrupted` (a second one exits at once).
  Returns the final `(state, meta)`.
  """
  # Signals first: from here on, an interrupt saves what there is to save.
  with _graceful_interrupts() as interrupt, matmul_precision(config):
    on_nonfinite = config.get("on_nonfinite", "stop")  # checked by config_schema
    items = dict(items or {})
    meta["data"] = data_identity(config.data, split, classes)
    meta["devices"] = jax.device_count()
    ckpts = checkpoint.Checkpoints(
        workdir, save_every_steps=config.checkpoint_every_steps, keep=config.keep_checkpoints
    )
    epoch_sums = None  # the running sums of a resumed mid-epoch checkpoint
    start = ckpts.latest_step()
    if start is not None:
      saved = ckpts.restore_meta(start)
      check_same_data(workdir, saved.get("data"), meta["data"])
      check_same_devices(workdir, saved.get("devices"))
      ckpts.set_aside_damaged()
      state = ckpts.restore(start, {"state": state}, sharding=NamedSharding(mesh, P()))["state"]
      meta["history"] = saved.get("history", [])
      epoch_sums = saved.get("epoch_sums")
      logging.info("Resumed %s from step %d.", workdir, start)

    total_steps = steps_per_epoch * config.num_epochs
    step = int(state.step)
    compiled = _step_with_sums(train_step, mesh, data.device_preprocess(config.data))
    state = mesh_lib.replicate(state, mesh)
    frozen = mesh_lib.replicate(frozen, mesh)
    if distributed.is_primary():  # the steps after `step` are logged again below
      reporting.truncate_jsonl(os.path.join(workdir, "metrics.jsonl"), max_step=step)
    writer = reporting.create_writer(workdir)
    progress = reporting.progress_bar(total=total_steps, initial=step, description=config.get("experiment", "train"))
    first_epoch = step // steps_per_epoch
    if first_epoch < config.num_epochs:
      batches = mesh_lib.prefetch(
          _host_batches(config, split, classes, steps_per_epoch, step, prepare_batch), mesh
      )
    # Checkpoints every `checkpoint_every_steps`, and after the first step of a run that
    # has none yet (Orbax's initial save): decided here, without asking the manager each step.
    save_first = start is None
    guard = _NonfiniteGuard(on_nonfinite)
    try:
      for epoch in range(first_epoch, config.num_epochs):
        guard.skipped = 0
        sums = None  # zeros of the metrics' shapes, made at the first step
        if epoch_sums and epoch_sums.get("step") == step:
          sums = {k: mesh_lib.replicate(np.float32(v), mesh) for k, v in epoch_sums["sums"].items()}
          guard.skipped = epoch_sums.get("skipped", 0)
        epoch_end = (epoch + 1) * steps_per_epoch
        for _ in range(step - epoch * steps_per_epoch, steps_per_epoch):
          batch = next(batches)
          if sums is None:
            sums = mesh_lib.replicate(_zero_sums(compiled, state, batch, frozen), mesh)
          state, metrics, nonfinite, sums = compiled(state, batch, frozen, sums)
          step += 1
          guard.check()  # the previous step's mask: read a step late, so the device keeps busy
          guard.pending = (step, nonfinite)
          if step % config.log_every_steps == 0:
            guard.check()
            writer.write_scalars(step, {f"train/{k}": float(v) for k, v in metrics.items()})
          if step < epoch_end:  # the epoch's last step is saved below
            if step % config.checkpoint_every_steps == 0 or save_first or interrupt.signal:
              guard.check()  # never save the state of a step that failed
              meta["epoch_sums"] = guard.epoch_sums(step, sums)
              ckpts.save(step, {"state": state, **items}, meta, force=bool(interrupt.signal))
              save_first = False
            if interrupt.signal:
              raise Interrupted(interrupt.signal, step, total_steps)
          progress.update(1)
        guard.check()
        count = steps_per_epoch - guard.skipped
        record = {"epoch": epoch + 1, "step": step}
        record.update({f"train_{k}": float(v) / max(count, 1) for k, v in sums.items()})
        if on_nonfinite == "skip":
          record["skipped_steps"] = guard.skipped
        if (epoch + 1) % config.eval_every_epochs == 0 or epoch + 1 == config.num_epochs:
          record.update(evaluate(state))
        writer.write_scalars(step, epoch_summary(record))
        meta["history"].append(record)
        meta.pop("epoch_sums", None)
        progress.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k.startswith("test_")})
        last = epoch + 1 == config.num_epochs and finalize is not None
        ckpts.save(step, {"state": state, **items, **(finalize(state) if last else {})}, meta, force=True)
        if interrupt.signal and epoch + 1 < config.num_epochs:
          raise Interrupted(interrupt.signal, step, total_steps)
    finally:
      progress.close()
      writer.close()
      ckpts.close()  # waits for the saves under way: the newest good checkpoint is complete
    return state, meta


def matmul_precision(config):
  """`jax.default_matmul_precision` of `config.matmul_precision` ('default': JAX's own, as set
  by the user, e.g. JAX_DEFAULT_MATMUL_PRECISION)."""
  precision = config.get("matmul_precision", "default")
  return contextlib.nullcontext() if precision == "default" else jax.default_matmul_precision(precision)


class Diverged(RuntimeError):
  """A step gave a non-finite loss, gradient or state (`on_nonfinite='stop'`)."""

  exit_status = 3
  label = "error"


class Interrupted(RuntimeError):
  """SIGINT or SIGTERM: the step under way was finished and saved."""

  label = "interrupted"

  def __init__(self, signum: int, step: int, total_steps: int):
    self.exit_status = 128 + signum  # the shell's status for a process ended by the signal
    super().__init__(
        f"{signal.Signals(signum).name} after step {step} of {total_steps}; the checkpoint of step {step} "
        "is saved: run the same command again to resume"
    )


class _NonfiniteGuard:
  """Reads the steps' `nonfinite` masks, one step late, and stops or counts."""

  def __init__(self, mode: str):
    self.mode, self.pending, self.skipped = mode, None, 0

  def check(self) -> None:
    """Acts on the mask of the latest step not checked yet (waits for that step)."""
    if self.pending is None:
      return
    step, mask = self.pending
    self.pending = None
    mask = int(mask)
    if not mask:
      return
    terms = steps.nonfinite_terms(mask)
    if self.mode == "stop":
      raise Diverged(
          f"non-finite {', '.join(terms)} at step {step}: the run stopped; its checkpoints hold only "
          "the finite states before it. Lower optim.learning_rate, or set --config.on_nonfinite=skip "
          "to skip such steps"
      )
    self.skipped += 1
    logging.warning("Skipped step %d: non-finite %s.", step, ", ".join(terms))

  def epoch_sums(self, step: int, sums) -> dict:
    """What a mid-epoch checkpoint records so that a resumed epoch's means are exact."""
    return {"step": step, "skipped": self.skipped, "sums": {k: float(v) for k, v in sums.items()}}


def _step_with_sums(train_step, mesh, preprocess):
  """`train_step` compiled data-parallel with what the loop needs around it, in one program:
  the images' preprocessing (uint8 in, `preprocess` on the device), and the epoch's running
  sums of the metrics (a skipped, non-finite step adds nothing), so that no per-step work is
  left on the host. `(state, batch, frozen, sums) -> (state, metrics, nonfinite, sums)`."""
  sharded = mesh_lib.sharded_step(train_step, mesh)

  def step(state, batch, frozen, sums):
    state, metrics = sharded(state, {**batch, "image": preprocess(batch["image"])}, frozen)
    nonfinite = metrics.pop("nonfinite")
    if sums is None:  # only traced, by `_zero_sums`
      sums = jax.tree.map(jnp.zeros_like, metrics)
    sums = jax.tree.map(lambda total, value: total + jnp.where(nonfinite == 0, value, 0), sums, metrics)
    return state, metrics, nonfinite, sums

  return jax.jit(step, donate_argnums=(0, 3))


def _zero_sums(compiled, state, batch, frozen) -> dict:
  """Zeros shaped like the metrics of `compiled` (traced, not run)."""
  metrics = jax.eval_shape(compiled, state, batch, frozen, None)[1]
  return {k: np.zeros(v.shape, v.dtype) for k, v in metrics.items()}


def _host_batches(config, split, classes, steps_per_epoch: int, step: int, prepare_batch):
  """The training batches from `step` on, as the step takes them: uint8 images (normalised
  on the device), `prepare_batch` applied, and only the first `steps_per_epoch` batches
  of each epoch."""
  first_epoch = step // steps_per_epoch
  full_epoch = data.num_batches(config.data, split, batch_size=config.batch_size, train=True, classes=classes)
  batches = data.as_numpy(
      data.make_dataset(
          config.data, split, batch_size=config.batch_size, train=True, seed=config.seed,
          epoch=first_epoch, num_epochs=config.num_epochs - first_epoch, classes=classes,
          with_index=prepare_batch is not None, raw_images=True,
      ).skip(step - first_epoch * steps_per_epoch)
  )
  for epoch in range(first_epoch, config.num_epochs):
    for _ in range(max(step - epoch * steps_per_epoch, 0), steps_per_epoch):
      batch = next(batches)
      yield batch if prepare_batch is None else prepare_batch(batch)
    for _ in range(steps_per_epoch, full_epoch):  # the rest of a shortened epoch
      next(batches)


class _Signal:
  signal = None


@contextlib.contextmanager
def _graceful_interrupts():
  """SIGINT/SIGTERM set `.signal` (the loop saves and stops); a second one exits at once.

  A cluster's preemption sends SIGTERM; Ctrl-C sends SIGINT. Outside the main thread
  (where Python cannot install handlers) signals keep their default behaviour.
  """
  flag = _Signal()
  if threading.current_thread() is not threading.main_thread():
    yield flag
    return

  def handle(signum, frame):
    del frame
    if flag.signal is not None:
      # On a line of its own: the progress bar may be drawn without a newline.
      print(f"\ninterrupted: second {signal.Signals(signum).name}: aborted at once; the newest finished "
            "checkpoint is kept: run the same command again to resume", file=sys.stderr, flush=True)
      os._exit(128 + signum)  # pylint: disable=protected-access
    flag.signal = signum
    logging.warning("%s: finishing the step under way and saving a checkpoint (again to abort at once).",
                    signal.Signals(signum).name)

  previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    yield flag
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


def data_identity(data_config, split: str, classes=None) -> dict:
  """What identifies the data a run trains on, recorded in its checkpoints: the TFDS
  builder and version, the example counts of its training split and of the test split,
  and a fingerprint of the preprocessing statistics (which depend on every train image).
  `data_dir` and `manual_dir` are not part of it: a moved copy of the same data is the same."""
  builder = data.get_builder(
      data_config.name, data_dir=data_config.get("data_dir"), manual_dir=data_config.get("manual_dir"),
      download=bool(data_config.get("download", True)),
  )
  stats = data.train_stats(builder)
  return {
      "builder": builder.name,
      "version": str(builder.version),
      "train_examples": data.num_batches(data_config, split, batch_size=1, train=True, classes=classes),
      "test_examples": data.num_batches(data_config, "test", batch_size=1, train=False, classes=classes),
      "train_stats": checkpoint.fingerprint({k: stats[k] for k in ("mean_image", "channel_mean", "channel_std")}),
  }


def check_resumable(workdir: str, data_config, split: str, classes=None) -> None:
  """Refuses, reading only, a resume that `fit` would refuse: a workdir whose checkpoints
  are all damaged, or that was trained on other data."""
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
        f"workdir {workdir} was trained on {saved} devices, this run has {jax.device_count()}: resume it on "
        f"{saved} devices (in any number of processes), or use a new --workdir"
    )


def check_same_data(workdir: str, saved: dict | None, current: dict) -> None:
  """Refuses to resume on other data than the run started with (runs that predate the
  record resume unchecked)."""
  if not saved:
    return
  differences = [f"{k} {saved.get(k)} → {current.get(k)}" for k in sorted(saved.keys() | current.keys())
                 if saved.get(k) != current.get(k)]
  if differences:
    raise UsageError(
        f"workdir {workdir} was trained on other data than data.data_dir/data.manual_dir now hold "
        f"({'; '.join(differences)}): point them at the data the run started with, or use a new --workdir"
    )


def caches_teacher_logits(config) -> bool:
  """Whether the frozen teacher's logits are computed once instead of in every step.

  They can be when the teacher's output depends on the image alone: no augmentation
  (the image changes every epoch) and no teacher dropout (the teacher changes every
  step). The teacher forward is then out of the step: for the NiN teacher and a small
  LeNet that is most of a distillation step's cost (BENCHMARKS.md).
  """
  distill = config.get("distill", ml_collections.ConfigDict())
  return (bool(distill.get("cache_teacher_logits", False))
          and not distill.get("teacher_dropout", False) and not config.data.get("augment", False))


def teacher_logits_table(config, teacher, mesh, split, classes) -> np.ndarray:
  """The eval-mode teacher's logits `[N, C]` of every training example, in stored order,
  on every process: row i belongs to the example whose 'index' is i."""
  start = time.time()
  predictor = evaluation.Predictor(teacher["model"], teacher["variables"], mesh)
  _, logits = evaluation.predict(
      config.data, split, {"teacher": predictor}, batch_size=config.batch_size, classes=classes
  )
  logging.info("Cached the teacher's logits of %d training examples in %.1f s.",
               len(logits["teacher"]), time.time() - start)
  return logits["teacher"]


def with_teacher_logits(table: np.ndarray):
  """`prepare_batch` for cached logits: a batch's 'index' becomes its 'teacher_logits'."""
  def prepare(batch):
    batch = dict(batch)
    batch["teacher_logits"] = table[batch.pop("index")]
    return batch
  return prepare


def epoch_summary(record: dict) -> dict:
  """An epoch's record as scalars: `train_x` (epoch means) → `train_epoch_mean/x`, so they
  do not mix with the per-step `train/x`; `test_x` → `test/x`; other metrics as they are."""
  summary = {}
  for key, value in record.items():
    if key.startswith("train_"):
      summary["train_epoch_mean/" + key.removeprefix("train_")] = value
    elif key.startswith("test_"):
      summary["test/" + key.removeprefix("test_")] = value
    elif key not in ("epoch", "step"):
      summary[key] = value
  return summary


def finish(workdir: str, results: dict, history, *, title: str, panels=None) -> None:
  """Writes `results.json` and `curves.png` (process 0; the others wait for them: a finished
  run is one whose results.json exists)."""
  if distributed.is_primary():
    reporting.write_json_atomic(os.path.join(workdir, "results.json"), results)
    reporting.plot_curves(
        os.path.join(workdir, "curves.png"),
        history,
        panels=panels or {"loss": ["train_loss", "test_loss"], "accuracy": ["train_accuracy", "test_accuracy"]},
        title=title,
    )
  distributed.barrier("results written")


def steps_per_epoch_of(config, classes=None, split="train") -> int:
  """Full batches per epoch, or `config.steps_per_epoch` if that is set and smaller."""
  full = data.num_batches(config.data, split, batch_size=config.batch_size, train=True, classes=classes)
  if full < 1:
    raise UsageError(f"batch_size={config.batch_size} exceeds the training examples of {config.data.name}")
  return min(full, config.steps_per_epoch) if config.steps_per_epoch else full


def init_state(model, tx, seed: int, image_shape) -> TrainState:
  """A fresh state: parameters from `fold(seed, 0)`, the training key from `fold(seed, 1)`."""
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(seed))
  dummy = np.zeros((1, *image_shape), np.float32)
  # Jitted: one compiled program instead of a hundred eagerly dispatched ops (seconds less
  # start-up per run; the same parameters).
  variables = jax.jit(functools.partial(model.init, train=False))(init_rng, dummy)
  return TrainState.create(variables=variables, tx=tx, rng=train_rng)


def final_results(config, model, state, teacher, history, mesh, *, classes=None) -> dict:
  """Test metrics of the final model (and of its teacher, and how often they agree)."""
  predictors = {"student": evaluation.Predictor(model, state.variables, mesh)}
  if teacher is not None:
    predictors["teacher"] = evaluation.Predictor(teacher["model"], teacher["variables"], mesh)
  labels, logits = evaluation.predict(
      config.data, "test", predictors, batch_size=config.batch_size, classes=classes
  )
  results = {
      "method": config.method,
      "dataset": config.data.name,
      "seed": config.seed,
      "steps": int(state.step),
      "test_accuracy": evaluation.accuracy(logits["student"], labels),
      "test_examples": int(len(labels)),
      "history": history,
      "config": config.to_dict(),
  }
  if config.get("on_nonfinite") == "skip":
    results["skipped_steps"] = sum(h.get("skipped_steps", 0) for h in history)
  evaluated = [h for h in history if "test_accuracy" in h]
  if evaluated:
    best = max(evaluated, key=lambda h: h["test_accuracy"])
    results["best_epoch"] = {"epoch": best["epoch"], "test_accuracy": best["test_accuracy"]}
    results["last_epoch"] = {"epoch": evaluated[-1]["epoch"], "test_accuracy": evaluated[-1]["test_accuracy"]}
  if teacher is not None:
    results["teacher_test_accuracy"] = evaluation.accuracy(logits["teacher"], labels)
    results["teacher_agreement"] = evaluation.agreement(logits["student"], logits["teacher"])
    results["teacher"] = teacher["origin"]
  return results


def load_teacher(config, info) -> dict:
  """The frozen teacher of `config.teacher_workdir` (a finished run), checked against this run."""
  workdir = config.teacher_workdir
  try:
    meta = checkpoint.read_meta(workdir)
    model, variables = checkpoint.load(workdir)
  except checkpoint.CheckpointError as e:
    raise UsageError(f"teacher_workdir: {e}") from None
  teacher_classes = meta["models"][meta["main"]].get("num_classes")
  if teacher_classes != info.num_classes:
    raise UsageError(
        f"the teacher in {workdir} has {teacher_classes} classes but {config.data.name} has "
        f"{info.num_classes}: train a teacher on {config.data.name}"
    )
  teacher_data = meta.get("config", {}).get("data", {}).get("name")
  if teacher_data and teacher_data != config.data.name:
    raise UsageError(f"the teacher in {workdir} was trained on {teacher_data}, not {config.data.name}")
  workdir_lib.check_finished(workdir, allowed=config.get("allow_unfinished_teacher", False), field="teacher_workdir")
  origin = {"workdir": os.path.abspath(workdir), "fingerprint": checkpoint.fingerprint(variables)}
  return {"model": model, "variables": variables, "origin": origin}


RUN_FILE = workdir_lib.RUN_FILE


def claim_workdir(workdir: str, config) -> None:
  """Locks `workdir` and makes it this run's, or checks that it already is (the run then
  resumes); only `RESUMABLE_CHANGES` may differ (see `kd_jax.workdir.claim`)."""
  workdir_lib.claim(workdir, config, resumable=RESUMABLE_CHANGES, added=ADDED_KEYS)


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
