"""The training loop every trainer shares: `fit(config, workdir, task, mesh=...)`.

A trainer (`kd_jax.train.distill`, `kd_jax.amalgamation.pipeline`) describes its run as a
`Task`: the initial state, the pure step, how to evaluate, what the step reads besides the
batch. `fit` resumes the run from its newest intact checkpoint, trains with periodic
asynchronous checkpoints, metrics and evaluations, and returns the final state and meta.

The hot loop keeps the device busy: the step, the images' preprocessing and the epoch's
running sums are one compiled program (`compile_step`), batches are prefetched to the
devices, and a step's non-finite mask is read one step late (`faults.NonfiniteGuard`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kd_jax import checkpoint, data, distributed, provenance, reporting
from kd_jax.errors import Interrupted, UsageError
from kd_jax.train import faults, resume, selection
from kd_jax.train import mesh as mesh_lib
from kd_jax.train.state import TrainState


@dataclasses.dataclass
class Task:
  """One training run as `fit` sees it.

  Attributes:
    state: the fresh `TrainState` (replaced by the checkpoint's when the run resumes).
    train_step: the pure `step(state, batch, frozen) -> (state, metrics)`.
    evaluate: `evaluate(state) -> {name: float}`, run every `config.eval_every_epochs`.
    steps_per_epoch: the steps of one epoch (`steps_per_epoch_of`).
    meta: what every checkpoint records beside the state (models, config, history).
    frozen: what the step reads and never trains (e.g. teachers' variables).
    items: pytrees saved beside the state in every checkpoint (e.g. frozen teachers).
    finalize: `finalize(state) -> {name: pytree}`, items added to the last checkpoint.
    prepare_batch: `prepare_batch(batch) -> batch`, what the step sees of a host batch
      (amalgamation: no labels; cached teacher logits looked up by the batch's 'index').
    split: the TFDS training split (e.g. 'train[:50%]').
    classes: the class subset trained on (None: all).
    description: the progress line's name of this stage (default: the experiment's).
  """

  state: TrainState
  train_step: Callable
  evaluate: Callable[[TrainState], dict]
  steps_per_epoch: int
  meta: dict
  frozen: Any = dataclasses.field(default_factory=dict)
  items: dict = dataclasses.field(default_factory=dict)
  finalize: Callable[[TrainState], dict] | None = None
  prepare_batch: Callable[[dict], dict] | None = None
  split: str = "train"
  classes: Sequence[int] | None = None
  description: str = ""


def fit(config, workdir: str, task: Task, *, mesh) -> tuple[TrainState, dict]:
  """Resumes, trains, evaluates and checkpoints `task`; returns the final `(state, meta)`.

  Resumes from the newest intact checkpoint in `workdir` (state, step, RNG, epoch history
  and the running sums of the epoch under way), refusing other data or devices than the run
  started with; saves every `config.checkpoint_every_steps` steps and at each epoch's end,
  in the background.

  Faults: a non-finite step raises `Diverged` at that step (`config.on_nonfinite='stop'`) or
  is skipped and counted ('skip'); SIGINT or SIGTERM saves the step under way and raises
  `Interrupted` (a second one exits at once).

  Early stopping: after `config.early_stopping_patience` evaluations without a better
  validation accuracy (`selection.plateaued`) the run ends there, `finalize` included; a
  re-run of a stopped run trains nothing more.
  """
  # Signals first: from here on, an interrupt saves what there is to save.
  with faults.graceful_interrupts() as interrupt, matmul_precision(config):
    on_nonfinite = config.get("on_nonfinite", "stop")  # checked by config_schema
    state, meta, steps_per_epoch = task.state, task.meta, task.steps_per_epoch
    meta["data"] = resume.data_identity(config.data, task.split, task.classes)
    meta["devices"] = jax.device_count()
    ckpts = checkpoint.Checkpoints(
      workdir, save_every_steps=config.checkpoint_every_steps, keep=config.keep_checkpoints
    )
    epoch_sums = None  # the running sums of a resumed mid-epoch checkpoint
    start = ckpts.latest_step()
    if start is not None:
      saved = ckpts.restore_meta(start)
      resume.check_same_data(workdir, saved.get("data"), meta["data"])
      resume.check_same_devices(workdir, saved.get("devices"))
      ckpts.set_aside_damaged()
      state = ckpts.restore(start, {"state": state}, sharding=NamedSharding(mesh, P()))["state"]
      meta["history"] = saved.get("history", [])
      epoch_sums = saved.get("epoch_sums")
      reporting.announce(
        f"{config.get('experiment', 'train')}: resumed {workdir} from step {start}"
      )

    total_steps = steps_per_epoch * config.num_epochs
    step = int(state.step)
    patience = config.get("early_stopping_patience", 0)
    # A run that stopped early stays stopped: the decision is a function of its history.
    stopped = selection.plateaued(meta["history"], patience)
    end_epoch = step // steps_per_epoch if stopped else config.num_epochs
    compiled = compile_step(task.train_step, mesh, data.device_preprocess(config.data))
    state = mesh_lib.replicate(state, mesh)
    frozen = mesh_lib.replicate(task.frozen, mesh)
    if distributed.is_primary():  # the steps after `step` are logged again below
      reporting.truncate_jsonl(os.path.join(workdir, "metrics.jsonl"), max_step=step)
    writer = reporting.create_writer(workdir)
    progress = reporting.progress_bar(
      total=total_steps, initial=step, description=task.description or config.get("experiment")
    )
    first_epoch = step // steps_per_epoch
    if first_epoch < end_epoch:
      batches = mesh_lib.prefetch(
        host_batches(config, task.split, task.classes, steps_per_epoch, step, task.prepare_batch),
        mesh,
      )
    # Checkpoints every `checkpoint_every_steps`, and after the first step of a run that
    # has none yet (Orbax's initial save): decided here, without asking the manager each step.
    save_first = start is None
    guard = faults.NonfiniteGuard(on_nonfinite)
    warm_up = True
    try:
      for epoch in range(first_epoch, end_epoch):
        guard.start_epoch()
        sums = None  # zeros of the metrics' shapes, made at the first step
        if epoch_sums and epoch_sums.get("step") == step:
          sums = {k: mesh_lib.replicate(np.float32(v), mesh) for k, v in epoch_sums["sums"].items()}
          guard.start_epoch(skipped=epoch_sums.get("skipped", 0))
        epoch_end = (epoch + 1) * steps_per_epoch
        for _ in range(step - epoch * steps_per_epoch, steps_per_epoch):
          # The first step compiles and fills the data pipeline: not a step time.
          with reporting.paused(progress, "compiling") if warm_up else contextlib.nullcontext():
            batch = next(batches)
            if sums is None:
              sums = mesh_lib.replicate(zero_sums(compiled, state, batch, frozen), mesh)
            state, metrics, nonfinite, sums = compiled(state, batch, frozen, sums)
          warm_up = False
          step += 1
          guard.record(step, nonfinite)  # checks the previous step: the device keeps busy
          if step % config.log_every_steps == 0:
            guard.check()
            writer.write_scalars(step, {f"train/{k}": float(v) for k, v in metrics.items()})
          if step < epoch_end:  # the epoch's last step is saved below
            if step % config.checkpoint_every_steps == 0 or save_first or interrupt.signal:
              guard.check()  # never save the state of a step that failed
              meta["epoch_sums"] = guard.epoch_sums(step, sums)
              ckpts.save(step, {"state": state, **task.items}, meta, force=bool(interrupt.signal))
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
          with reporting.paused(progress, "evaluating"):  # not counted in the step rate
            record.update(task.evaluate(state))
        writer.write_scalars(step, epoch_summary(record))
        meta["history"].append(record)
        meta.pop("epoch_sums", None)
        shown = {
          k: f"{record[k]:.3f}" for k in ("test_accuracy", "validation_accuracy") if k in record
        }
        if shown:  # an epoch without evaluation keeps the last one's
          progress.set_postfix(shown)
        stop = selection.plateaued(meta["history"], patience)
        last = epoch + 1 == config.num_epochs or stop
        final_items = task.finalize(state) if last and task.finalize is not None else {}
        ckpts.save(step, {"state": state, **task.items, **final_items}, meta, force=True)
        if stop:
          reporting.announce(
            f"{task.description or config.get('experiment')}: stopped early at epoch {epoch + 1}: "
            f"no better validation accuracy in {patience} evaluations"
          )
          break
        if interrupt.signal and not last:
          raise Interrupted(interrupt.signal, step, total_steps)
    finally:
      progress.close()
      writer.close()
      ckpts.close()  # waits for the saves under way: the newest good checkpoint is complete
    return state, meta


def compile_step(train_step, mesh, preprocess):
  """`train_step` compiled data-parallel with what the loop needs around it, in one program.

  The images' preprocessing (uint8 in, `preprocess` on the device) and the epoch's running
  sums of the metrics (a skipped, non-finite step adds nothing) run inside it, so that no
  per-step work is left on the host. Returns
  `compiled(state, batch, frozen, sums) -> (state, metrics, nonfinite, sums)`.
  """
  sharded = mesh_lib.sharded_step(train_step, mesh)

  def step(state, batch, frozen, sums):
    state, metrics = sharded(state, {**batch, "image": preprocess(batch["image"])}, frozen)
    nonfinite = metrics.pop("nonfinite")
    if sums is None:  # only traced, by `zero_sums`
      sums = jax.tree.map(jnp.zeros_like, metrics)
    sums = jax.tree.map(
      lambda total, value: total + jnp.where(nonfinite == 0, value, 0), sums, metrics
    )
    return state, metrics, nonfinite, sums

  return jax.jit(step, donate_argnums=(0, 3))


def zero_sums(compiled, state, batch, frozen) -> dict:
  """Zeros shaped like the metrics of a `compile_step` program (traced, not run)."""
  metrics = jax.eval_shape(compiled, state, batch, frozen, None)[1]
  return {k: np.zeros(v.shape, v.dtype) for k, v in metrics.items()}


def host_batches(config, split, classes, steps_per_epoch: int, step: int, prepare_batch):
  """The training batches from `step` on, as the step takes them.

  uint8 images (normalised on the device), `prepare_batch` applied, and only the first
  `steps_per_epoch` batches of each epoch (the rest of a shortened epoch is never made, and
  the data order does not depend on `steps_per_epoch`).
  """
  first_epoch = step // steps_per_epoch
  batches = data.as_numpy(
    data.make_dataset(
      config.data,
      split,
      batch_size=config.batch_size,
      train=True,
      seed=config.seed,
      epoch=first_epoch,
      num_epochs=config.num_epochs - first_epoch,
      classes=classes,
      with_index=prepare_batch is not None,
      raw_images=True,
      batches_per_epoch=steps_per_epoch,
    ).skip(step - first_epoch * steps_per_epoch)
  )
  for batch in batches:
    yield batch if prepare_batch is None else prepare_batch(batch)


def steps_per_epoch_of(config, classes=None, split="train") -> int:
  """Full batches per epoch, or `config.steps_per_epoch` if that is set and smaller."""
  full = data.num_batches(
    config.data, split, batch_size=config.batch_size, train=True, classes=classes
  )
  if full < 1:
    raise UsageError(
      f"batch_size={config.batch_size} exceeds the training examples of {config.data.name}"
    )
  return min(full, config.steps_per_epoch) if config.steps_per_epoch else full


def init_state(model, tx, seed: int, image_shape) -> TrainState:
  """A fresh state: parameters from `fold(seed, 0)`, the training key from `fold(seed, 1)`."""
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(seed))
  dummy = np.zeros((1, *image_shape), np.float32)
  # Jitted: one compiled program instead of a hundred eagerly dispatched ops.
  variables = jax.jit(functools.partial(model.init, train=False))(init_rng, dummy)
  return TrainState.create(variables=variables, tx=tx, rng=train_rng)


def matmul_precision(config):
  """`jax.default_matmul_precision` of `config.matmul_precision` ('default': JAX's own, as
  set by the user, e.g. JAX_DEFAULT_MATMUL_PRECISION)."""
  precision = config.get("matmul_precision", "default")
  if precision == "default":
    return contextlib.nullcontext()
  return jax.default_matmul_precision(precision)


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


# The panels of `curves.png`: the training objective and the test cross-entropy are not on
# one scale (a distillation objective is no cross-entropy), so each has its own.
CURVES = {
  "training objective": ["train_loss"],
  "test and validation loss (cross-entropy)": ["test_loss", "validation_loss"],
  "accuracy": ["train_accuracy", "test_accuracy", "validation_accuracy"],
}


def finish(
  workdir: str, results: dict, history, *, title: str, panels=None, references=None
) -> None:
  """Writes `results.json` and `curves.png` (process 0; the others wait for them: a finished
  run is one whose results.json exists). `panels` and `references` (dashed reference lines
  per panel, e.g. the teacher's accuracy) as in `reporting.curves_figure`."""
  if distributed.is_primary():
    results["provenance"] = provenance.collect()  # the code, versions, devices, command line
    reporting.write_json_atomic(os.path.join(workdir, "results.json"), results)
    reporting.plot_curves(
      os.path.join(workdir, "curves.png"),
      history,
      panels=panels or CURVES,
      title=title,
      step_rows=reporting.read_jsonl(os.path.join(workdir, "metrics.jsonl")),
      references=references,
    )
  distributed.barrier("results written")


def skipped_steps(history) -> int:
  """The non-finite steps skipped over a run (`on_nonfinite='skip'`)."""
  return sum(h.get("skipped_steps", 0) for h in history)
