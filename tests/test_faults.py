"""Faults: kills and interrupts, divergence, damaged checkpoints, other data on resume.

The command-line scenarios are real subprocesses of `python -m kd_jax.main` on generated
data, signalled when the run's own outputs (metrics.jsonl, checkpoints/) show it has
reached a given point; each interrupted run is then re-run to completion and compared
with an uninterrupted one. They run two at a time (`SCENARIOS`, one module fixture).
"""

import concurrent.futures
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from kd_jax import checkpoint, data, errors, reporting
from kd_jax.evaluate import evaluate_workdir
from kd_jax.train import distill, resume

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fake_data  # noqa: E402  pylint: disable=g-import-not-at-top
import helpers  # noqa: E402  pylint: disable=g-import-not-at-top

ROOT = helpers.ROOT
ENV = dict(
  os.environ,
  JAX_PLATFORMS="cpu",
  TF_CPP_MIN_LOG_LEVEL="3",
  JAX_DISABLE_MOST_OPTIMIZATIONS="1",
  PYTHONPATH=ROOT,
)
TIMEOUT = 300  # seconds, for any one subprocess
EXPERIMENT = "experiments/lenet_student.py:dataset=fashion_mnist,smoke,method=ground_truth"


def strict_json_load(text: str):
  def refuse(token):
    raise ValueError(f"not JSON: {token}")

  return json.loads(text, parse_constant=refuse)


def read_jsonl(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [strict_json_load(line) for line in f]


def error_lines(stderr: str, prefix: str = "error:") -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith(prefix)]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  base = tmp_path_factory.mktemp("faults")
  dirs = {
    "base": str(base),
    "manual": fake_data.write_idx_dataset(str(base / "manual")),
    "tfds": str(base / "tfds"),
  }
  config = helpers.experiment_config(
    "lenet_student",
    "dataset=fashion_mnist,smoke,method=ground_truth",
    manual_dir=dirs["manual"],
    data_dir=dirs["tfds"],
  )
  data.get_info(config.data)  # prepared once, before runs in parallel read it
  return dirs


# ------------------------------------------------------------- command-line scenarios

# 3 epochs of 32 steps (batch 8), every step logged, a checkpoint every 5 steps.
RUN_FLAGS = [
  "--config.batch_size=8",
  "--config.steps_per_epoch=0",
  "--config.num_epochs=3",
  "--config.log_every_steps=1",
  "--config.checkpoint_every_steps=5",
  "--config.keep_checkpoints=3",
]
TOTAL_STEPS = 96


def command(dirs, workdir, *extra):
  return [
    sys.executable,
    "-m",
    "kd_jax.main",
    f"--config={EXPERIMENT}",
    f"--workdir={workdir}",
    f"--config.data.manual_dir={dirs['manual']}",
    f"--config.data.data_dir={dirs['tfds']}",
    "--config.data.download=False",
    *RUN_FLAGS,
    *extra,
  ]


def logged_steps(workdir) -> int:
  """The last step with a train row in metrics.jsonl (0 before any)."""
  try:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
      steps = [
        json.loads(line)["step"] for line in f if '"train/loss"' in line and line.endswith("\n")
      ]
  except FileNotFoundError:
    return 0
  return max(steps, default=0)


def saving(workdir, min_step) -> bool:
  """A save at or after `min_step` is being written or has just been committed."""
  ckpt_dir = checkpoint.checkpoint_dir(workdir)
  names = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
  return any(
    ("tmp" in n and int(n.split(".")[0]) >= min_step) or (n.isdigit() and int(n) >= min_step)
    for n in names
    if n.split(".")[0].isdigit()
  )


def run_interrupted(cmd, *, when, signals, gap=0.0) -> subprocess.CompletedProcess:
  """Starts `cmd`, waits until `when()` holds, sends `signals` (`gap` seconds apart)."""
  proc = subprocess.Popen(
    cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  try:
    deadline = time.time() + TIMEOUT
    while not when() and proc.poll() is None:
      if time.time() > deadline:
        raise TimeoutError(f"the run never reached the signal point: {cmd}")
      time.sleep(0.005)
    for i, sig in enumerate(signals):
      if proc.poll() is None:
        if i:
          time.sleep(gap)
        proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=TIMEOUT)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()
  return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def run_to_end(cmd) -> subprocess.CompletedProcess:
  return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)


def scenario(dirs, name):
  workdir = os.path.join(dirs["base"], name)
  cmd = command(dirs, workdir)
  jsonl = os.path.join(workdir, "metrics.jsonl")
  out = {"workdir": workdir}
  if name == "uninterrupted":
    out["final"] = run_to_end(cmd)
    return out
  if name == "kill_mid_epoch":  # epoch 2, three steps after the save at step 40
    out["first"] = run_interrupted(
      cmd, when=lambda: logged_steps(workdir) >= 43, signals=[signal.SIGKILL]
    )
  elif name == "kill_at_save":  # while the save of step 55 is written or just committed
    out["first"] = run_interrupted(cmd, when=lambda: saving(workdir, 55), signals=[signal.SIGKILL])
  elif name == "sigterm":  # cluster preemption
    out["first"] = run_interrupted(
      cmd, when=lambda: logged_steps(workdir) >= 22, signals=[signal.SIGTERM]
    )
  elif name == "sigint":
    out["first"] = run_interrupted(
      cmd, when=lambda: logged_steps(workdir) >= 70, signals=[signal.SIGINT]
    )
  elif name == "double_sigint":  # both during the first step's compilation
    out["first"] = run_interrupted(
      cmd, when=lambda: os.path.exists(jsonl), signals=[signal.SIGINT] * 2, gap=0.2
    )
  elif name in ("diverge_stop", "diverge_skip"):
    mode = name.split("_")[1]
    out["final"] = run_to_end(
      cmd + ["--config.optim.learning_rate=1e30", f"--config.on_nonfinite={mode}"]
    )
    return out
  ckpt_dir = checkpoint.checkpoint_dir(workdir)
  out["checkpoints_after_first"] = sorted(os.listdir(ckpt_dir)) if os.path.isdir(ckpt_dir) else []
  out["final"] = run_to_end(cmd)
  return out


SCENARIOS = (
  "uninterrupted",
  "kill_mid_epoch",
  "kill_at_save",
  "sigterm",
  "sigint",
  "double_sigint",
  "diverge_stop",
  "diverge_skip",
)


@pytest.fixture(scope="module")
def scenarios(dirs):
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    futures = {name: pool.submit(scenario, dirs, name) for name in SCENARIOS}
    return {name: future.result() for name, future in futures.items()}


@pytest.fixture(scope="module")
def reference(scenarios):
  run = scenarios["uninterrupted"]
  assert run["final"].returncode == 0, run["final"].stderr[-3000:]
  results = strict_json_load(open(os.path.join(run["workdir"], "results.json")).read())
  assert results["steps"] == TOTAL_STEPS and len(results["history"]) == 3
  return {
    "params": helpers.final_params(run["workdir"]),
    "results": results,
    "metrics": read_jsonl(os.path.join(run["workdir"], "metrics.jsonl")),
  }


@pytest.mark.parametrize(
  "name", ["kill_mid_epoch", "kill_at_save", "sigterm", "sigint", "double_sigint"]
)
def test_interrupted_run_resumes_to_the_uninterrupted_result(scenarios, reference, name):
  run = scenarios[name]
  first, final = run["first"], run["final"]
  assert "Traceback" not in first.stderr, first.stderr[-3000:]
  if name.startswith("kill"):
    assert first.returncode == -signal.SIGKILL
  elif name == "double_sigint":
    assert first.returncode == 130, first.stderr[-3000:]
    lines = error_lines(first.stderr, "interrupted:")
    assert len(lines) == 1 and "second SIGINT: aborted at once" in lines[0], first.stderr[-3000:]
  else:
    signum = signal.SIGTERM if name == "sigterm" else signal.SIGINT
    assert first.returncode == 128 + signum, first.stderr[-3000:]
    lines = error_lines(first.stderr, "interrupted:")
    assert len(lines) == 1, first.stderr[-3000:]
    step = int(lines[0].split(" after step ")[1].split()[0])
    assert (
      f"{signum.name} after step {step} of {TOTAL_STEPS}" in lines[0]
      and "run the same command" in lines[0]
    )
    assert (
      0 < step < TOTAL_STEPS and str(step) in run["checkpoints_after_first"]
    )  # saved where it stopped

  assert final.returncode == 0, final.stderr[-3000:]
  results = strict_json_load(open(os.path.join(run["workdir"], "results.json")).read())
  helpers.assert_trees_equal(helpers.final_params(run["workdir"]), reference["params"])
  # Per-epoch train metrics of the resumed epoch are those of the uninterrupted run.
  assert results["history"] == reference["results"]["history"]
  metrics = read_jsonl(os.path.join(run["workdir"], "metrics.jsonl"))
  assert metrics == reference["metrics"]  # every step once, with the same values
  for kind in ("train/loss", "train_epoch_mean/loss"):
    steps = [m["step"] for m in metrics if kind in m]
    assert len(steps) == len(set(steps)), kind


def test_kills_landed_where_intended(scenarios):
  """The SIGKILLs left the run mid-epoch: the re-run had something to resume."""
  for name in ("kill_mid_epoch", "kill_at_save"):
    steps = [int(n) for n in scenarios[name]["checkpoints_after_first"] if n.isdigit()]
    assert steps and 0 < max(steps) < TOTAL_STEPS, (name, steps)
    assert ": resumed " in scenarios[name]["final"].stderr


def test_divergence_stops_the_run_at_that_step(scenarios):
  run = scenarios["diverge_stop"]
  proc = run["final"]
  assert proc.returncode == 3, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  lines = error_lines(proc.stderr)
  # Adam's first step moves every weight by about 1e30; the next forward overflows.
  assert len(lines) == 1 and "non-finite loss, gradient" in lines[0] and "at step 2:" in lines[0], (
    lines
  )
  assert not os.path.exists(os.path.join(run["workdir"], "results.json"))
  ckpts = checkpoint.Checkpoints(run["workdir"], read_only=True)
  try:
    assert ckpts.latest_step() == 1  # the last good state, never the failed step's
  finally:
    ckpts.close()
  params = helpers.final_params(run["workdir"])
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))
  for row in read_jsonl(os.path.join(run["workdir"], "metrics.jsonl")):
    assert row["step"] < 2


def test_divergence_skip_mode_finishes_and_counts(scenarios):
  run = scenarios["diverge_skip"]
  proc = run["final"]
  assert proc.returncode == 0, proc.stderr[-3000:]
  text = open(os.path.join(run["workdir"], "results.json")).read()
  results = strict_json_load(text)  # strict JSON: a non-finite number is null
  assert results["steps"] == TOTAL_STEPS
  assert results["skipped_steps"] == sum(h["skipped_steps"] for h in results["history"])
  assert results["skipped_steps"] == TOTAL_STEPS - 1  # every step after the first overflows
  assert results["history"][0]["skipped_steps"] == 31
  assert "Skipped step 2: non-finite loss" in proc.stderr
  params = helpers.final_params(run["workdir"])
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))
  read_jsonl(os.path.join(run["workdir"], "metrics.jsonl"))  # strict JSON too


# ------------------------------------------------------------------ damaged checkpoints


def small_config(dirs, **overrides):
  return helpers.experiment_config(
    "lenet_student",
    "dataset=fashion_mnist,smoke,method=ground_truth",
    manual_dir=dirs["manual"],
    data_dir=dirs["tfds"],
    checkpoint_every_steps=4,
    keep_checkpoints=10,
    **overrides,
  )


@pytest.fixture(scope="module")
def finished(dirs):
  """A finished in-process run with checkpoints at steps 1, 4, 8, 12 and 16."""
  workdir = os.path.join(dirs["base"], "finished")
  results = distill.train_and_evaluate(small_config(dirs), workdir)
  ckpts = checkpoint.Checkpoints(workdir, read_only=True)
  try:
    assert ckpts.latest_step() == 16
    step12 = jax.device_get(ckpts.restore(12, {"state": None})["state"]["params"])
  finally:
    ckpts.close()
  return {
    "workdir": workdir,
    "results": results,
    "params": helpers.final_params(workdir),
    "step12": step12,
  }


def damage(step_dir: str, kind: str) -> None:
  if kind == "truncated_array":
    files = [
      os.path.join(root, f)
      for root, _, names in os.walk(os.path.join(step_dir, "state"))
      for f in names
      if os.sep + "d" + os.sep in os.path.join(root, f)
    ]
    assert files
    for path in files:
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
  elif kind == "missing_item":
    shutil.rmtree(os.path.join(step_dir, "state"))
  elif kind == "empty_step":
    shutil.rmtree(step_dir)
    os.makedirs(step_dir)
  elif kind == "garbage_meta":
    with open(os.path.join(step_dir, "meta", "metadata"), "w") as f:
      f.write("{not json")


KINDS = {
  "truncated_array": "its item state is unreadable",
  "missing_item": "its item state is missing",
  "empty_step": "the step directory is empty",
  "garbage_meta": "its meta item is unreadable",
}


# Orbax's other parallel reads of a truncated file finish after the failed restore closed
# their event loop (the command line drops that noise: kd_jax.cli._quiet_abandoned_reads).
ABANDONED_READS = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@ABANDONED_READS
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_damaged_latest_checkpoint_falls_back(dirs, finished, kind, tmp_path, caplog):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished["workdir"], workdir)
  damage(os.path.join(checkpoint.checkpoint_dir(workdir), "16"), kind)

  caplog.set_level(logging.WARNING)
  _, variables = checkpoint.load(workdir)  # the newest intact checkpoint: step 12
  helpers.assert_trees_equal(jax.device_get(variables["params"]), finished["step12"])
  assert checkpoint.read_meta(workdir)["history"] == finished["results"]["history"][:1]
  warnings = [
    r.getMessage() for r in caplog.records if "damaged checkpoint at step 16" in r.getMessage()
  ]
  assert warnings and KINDS[kind] in warnings[0], caplog.text
  assert evaluate_workdir(workdir)["test_examples"] == 64

  # Resuming moves the damaged step aside and trains steps 13..16 again: the same run.
  results = distill.train_and_evaluate(small_config(dirs), workdir)
  assert os.path.isdir(os.path.join(checkpoint.checkpoint_dir(workdir), "16.damaged"))
  assert results["history"] == finished["results"]["history"]
  helpers.assert_trees_equal(helpers.final_params(workdir), finished["params"])
  steps = [
    m["step"] for m in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "train/loss" in m
  ]
  assert steps == [4, 8, 12, 16]


@ABANDONED_READS
def test_no_intact_checkpoint_is_one_line(dirs, finished, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished["workdir"], workdir)
  ckpt_dir = checkpoint.checkpoint_dir(workdir)
  for step, kind in zip(sorted(int(n) for n in os.listdir(ckpt_dir)), list(KINDS) * 2):
    damage(os.path.join(ckpt_dir, str(step)), kind)
  before = helpers.tree_snapshot(workdir)
  with pytest.raises(checkpoint.CheckpointError, match="no intact checkpoint") as error:
    checkpoint.load(workdir)
  assert (
    "\n" not in str(error.value)
    and "step 16:" in str(error.value)
    and "step 1:" in str(error.value)
  )
  with pytest.raises(checkpoint.CheckpointError, match="no intact checkpoint"):
    distill.train_and_evaluate(small_config(dirs), workdir)
  assert helpers.tree_snapshot(workdir) == before  # nothing moved, nothing written
  proc = subprocess.run(
    [sys.executable, "-m", "kd_jax.evaluate", f"--workdir={workdir}"],
    cwd=ROOT,
    env=ENV,
    capture_output=True,
    text=True,
    timeout=TIMEOUT,
  )
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  lines = error_lines(proc.stderr)
  assert len(lines) == 1 and "no intact checkpoint" in lines[0], proc.stderr[-2000:]


# --------------------------------------------------------------------- data identity


def test_resume_on_other_data_is_refused(dirs, finished, tmp_path):
  other = {
    "manual": fake_data.write_idx_dataset(str(tmp_path / "manual"), num_train=320, seed=1),
    "tfds": str(tmp_path / "tfds"),
  }
  workdir = finished["workdir"]
  before = helpers.tree_snapshot(workdir)
  with pytest.raises(errors.UsageError, match="trained on other data") as error:
    distill.train_and_evaluate(small_config(other), workdir)
  message = str(error.value)
  assert "train_examples 256 → 320" in message and "train_stats" in message and "\n" not in message
  assert helpers.tree_snapshot(workdir) == before

  # The same data moved elsewhere (data_dir and manual_dir may change on resume).
  moved = {
    "manual": shutil.copytree(dirs["manual"], str(tmp_path / "moved_manual")),
    "tfds": shutil.copytree(dirs["tfds"], str(tmp_path / "moved_tfds")),
  }
  again = distill.train_and_evaluate(small_config(moved), workdir)
  assert again["history"] == finished["results"]["history"]


def test_checkpoint_records_the_data_identity(finished):
  identity = checkpoint.read_meta(finished["workdir"])["data"]
  assert identity["builder"] == "idx_fashion_mnist" and identity["train_examples"] == 256
  assert identity["test_examples"] == 64 and len(identity["train_stats"]) == 16


# --------------------------------------------------------------------- units


def test_save_hands_a_deep_copy_of_meta_to_the_background_writer(tmp_path, monkeypatch):
  """The loop appends to meta['history'] while an asynchronous save may still be writing."""
  handed = []
  json_save = ocp.args.JsonSave
  monkeypatch.setattr(ocp.args, "JsonSave", lambda item: handed.append(item) or json_save(item))
  ckpts = checkpoint.Checkpoints(str(tmp_path), save_every_steps=1)
  meta = {"history": [{"epoch": 1}]}
  ckpts.save(8, {"state": {"w": np.ones(3, np.float32)}}, meta, force=True)
  meta["history"].append({"epoch": 2})  # the next epoch, before the save is written
  ckpts.wait()
  assert handed[0]["history"] == [{"epoch": 1}]
  assert ckpts.restore_meta(8)["history"] == [{"epoch": 1}]
  ckpts.close()


def test_results_and_metrics_are_strict_json(tmp_path):
  path = str(tmp_path / "results.json")
  reporting.write_json_atomic(
    path,
    {
      "a": float("nan"),
      "b": [np.float32("inf"), 1.5],
      "c": np.array([np.nan, 2.0]),
      "d": np.int64(3),
    },
  )
  assert strict_json_load(open(path).read()) == {
    "a": None,
    "b": [None, 1.5],
    "c": [None, 2.0],
    "d": 3,
  }
  writer = reporting.JsonlWriter(str(tmp_path / "metrics.jsonl"))
  writer.write_scalars(3, {"loss": np.float32("nan"), "accuracy": 0.5})
  writer.close()
  assert read_jsonl(str(tmp_path / "metrics.jsonl")) == [{"step": 3, "loss": None, "accuracy": 0.5}]


def test_truncate_jsonl_drops_later_steps_and_a_cut_line(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  with open(path, "w") as f:
    f.write(
      '{"step": 4, "x": 1}\n{"step": 8, "x": 2}\n{"step": 8, "y": 3}\n{"step": 12, "x": 4}\n{"step": 1'
    )
  reporting.truncate_jsonl(path, max_step=8)
  assert read_jsonl(path) == [{"step": 4, "x": 1}, {"step": 8, "x": 2}, {"step": 8, "y": 3}]
  reporting.truncate_jsonl(path, max_step=0)
  assert read_jsonl(path) == []


def test_check_same_data_names_what_differs():
  saved = {
    "builder": "idx_mnist",
    "version": "1.0.0",
    "train_examples": 10,
    "test_examples": 5,
    "train_stats": "a",
  }
  resume.check_same_data("w", saved, dict(saved))
  resume.check_same_data("w", None, saved)  # a run from before the record: unchecked
  with pytest.raises(errors.UsageError, match=r"train_stats a → b\)"):
    resume.check_same_data("w", saved, {**saved, "train_stats": "b"})
