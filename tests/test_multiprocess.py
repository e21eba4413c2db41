"""Multi-process data parallelism on JAX's distributed runtime, on this machine's CPU.

Each scenario starts two processes of `python -m kd_jax.main` (one forced host device
each, CPU collectives over gloo) that join through a coordinator on a free loopback port,
and one process with two forced devices: the same total device count. The data order is
one global permutation sliced per process, so both must end with bit-identical
parameters and the same results. Scenarios run in parallel, in two waves (the
distillation needs the ground-truth run as its teacher): ground truth, amalgamation,
Hinton KD with cached teacher logits, a process SIGKILLed mid-run and the pair re-run
(as 2 processes, and from a copy of the killed workdir as 1 process of 2 devices), a
2-process `kd_jax.evaluate`, and refusals.

Every process costs seconds of imports on a 2-core machine, so each code path runs once:
Hinton KD with the teacher in the step (cache off) is left out, since its frozen teacher
is replicated across processes by the same code as amalgamation's teachers
(`mesh.replicate` of the step's frozen variables), which runs here.
"""

import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from kd_jax import data, distributed
from kd_jax.errors import UsageError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fake_data  # noqa: E402  pylint: disable=g-import-not-at-top
import helpers  # noqa: E402  pylint: disable=g-import-not-at-top

ROOT = helpers.ROOT
TIMEOUT = 900  # seconds, for any one process (generous: the machine is shared and loaded)
STUDENT = "experiments/lenet_student.py:dataset=fashion_mnist,smoke,method={method}"
AMALGAMATE = "experiments/amalgamate.py:dataset=fashion_mnist,smoke"  # one data set, prepared once


def env(devices: int) -> dict:
  return dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    TF_CPP_MIN_LOG_LEVEL="3",
    JAX_DISABLE_MOST_OPTIMIZATIONS="1",
    PYTHONPATH=ROOT,
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
  )


_PORTS = set()


def free_port() -> int:
  """A loopback port free now and not given to another job of this module (a coordinator
  binds its port only once its process has started, seconds later)."""
  while True:
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    if port not in _PORTS:
      _PORTS.add(port)
      return port


class Job:
  """`python -m MODULE ARGS` as `processes` processes of `devices` devices each; killed
  whole on a timeout or when the test ends (no process outlives the test)."""

  def __init__(self, module: str, args, *, processes: int = 2, devices: int = 1):
    joined = []
    if processes > 1:
      address = f"127.0.0.1:{free_port()}"
      joined = [
        [f"--coordinator_address={address}", f"--num_processes={processes}", f"--process_id={i}"]
        for i in range(processes)
      ]
    self.procs = [
      subprocess.Popen(
        [sys.executable, "-m", module, *args, *flags],
        cwd=ROOT,
        env=env(devices),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
      )
      for flags in joined or [[]]
    ]
    self.outputs = None

  def wait(self) -> list[subprocess.CompletedProcess]:
    """Every process's (returncode, stdout, stderr); kills all if one overruns."""
    deadline = time.time() + TIMEOUT
    try:
      outputs = [p.communicate(timeout=max(1, deadline - time.time())) for p in self.procs]
    finally:
      self.kill()
    self.outputs = [
      subprocess.CompletedProcess(p.args, p.returncode, out, err)
      for p, (out, err) in zip(self.procs, outputs)
    ]
    return self.outputs

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()

  def check(self) -> list[subprocess.CompletedProcess]:
    outputs = self.wait()
    assert all(out.returncode == 0 for out in outputs), "\n".join(
      f"process {i} (exit {out.returncode}) of {out.args}:\n{out.stderr[-6000:]}"
      for i, out in enumerate(outputs)
    )
    return outputs


def main_args(dirs, workdir, experiment, *extra):
  return [
    f"--config={experiment}",
    f"--workdir={workdir}",
    f"--config.data.manual_dir={dirs['manual']}",
    f"--config.data.data_dir={dirs['tfds']}",
    "--config.data.download=False",
    "--config.steps_per_epoch=12",  # smoke's 60 would make these runs longer, for nothing
    *extra,
  ]


def read_json(path):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def run_all(jobs: dict) -> dict:
  """Waits for every job in parallel (they run already); {name + '_out': outputs}."""
  with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
    futures = {name: pool.submit(job.check) for name, job in jobs.items()}
    try:
      return {f"{name}_out": f.result() for name, f in futures.items()}
    finally:
      for job in jobs.values():
        job.kill()


def committed_steps(workdir) -> list[int]:
  try:
    return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
  except FileNotFoundError:
    return []


def killed_mid_run(dirs, workdir, copy, experiment, *extra) -> dict:
  """A 2-process run whose process 1 is SIGKILLed once a mid-run checkpoint is committed
  (process 0 is then stopped by its runtime or, at the latest after a grace period, by
  us, as a cluster tears a job down); the killed workdir is copied to `copy`, then both
  are re-run with the same command to the end: `workdir` as 2 processes of 1 device,
  `copy` as 1 process of 2 devices (the process count may change)."""
  job = Job("kd_jax.main", main_args(dirs, workdir, experiment, *extra))
  try:
    deadline = time.time() + TIMEOUT
    while not any(s >= 4 for s in committed_steps(workdir)):
      assert time.time() < deadline and all(p.poll() is None for p in job.procs), (
        "no mid-run checkpoint"
      )
      time.sleep(0.2)
    job.procs[1].send_signal(signal.SIGKILL)
    try:
      job.procs[0].wait(timeout=60)
    except subprocess.TimeoutExpired:
      job.procs[0].kill()
  finally:
    job.kill()
  for p in job.procs:
    p.communicate()
  killed = {
    "steps": committed_steps(workdir),
    "returncodes": [p.returncode for p in job.procs],
    "results": os.path.exists(os.path.join(workdir, "results.json")),
  }
  shutil.copytree(workdir, copy, symlinks=True)
  reruns = {
    "killed_2p": Job("kd_jax.main", main_args(dirs, workdir, experiment, *extra)),
    "killed_to_1p": Job(
      "kd_jax.main", main_args(dirs, copy, experiment, *extra), processes=1, devices=2
    ),
  }
  return {
    name: dict(killed, rerun=outputs) for name, outputs in zip(reruns, run_all(reruns).values())
  }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Every run, in two parallel waves; {name: workdir, name_out: its processes' outputs}."""
  base = tmp_path_factory.mktemp("multiprocess")
  dirs = {
    "manual": fake_data.write_idx_dataset(str(base / "manual"), num_train=512),
    "tfds": str(base / "tfds"),
  }
  config = helpers.experiment_config(
    "lenet_student",
    "dataset=fashion_mnist,smoke,method=ground_truth",
    manual_dir=dirs["manual"],
    data_dir=dirs["tfds"],
  )
  data.get_info(config.data)  # prepared once, before runs in parallel read it
  out = {"dirs": dirs}
  gt = STUDENT.format(method="ground_truth")

  def workdir(name):
    out[name] = str(base / name)
    return out[name]

  # Wave 1: ground truth and amalgamation, each in 2 processes and in 1 process of 2 devices.
  jobs = {
    "gt_2p": Job("kd_jax.main", main_args(dirs, workdir("gt_2p"), gt)),
    "gt_1p": Job("kd_jax.main", main_args(dirs, workdir("gt_1p"), gt), processes=1, devices=2),
    "amalgamate_2p": Job("kd_jax.main", main_args(dirs, workdir("amalgamate_2p"), AMALGAMATE)),
    "amalgamate_1p": Job(
      "kd_jax.main", main_args(dirs, workdir("amalgamate_1p"), AMALGAMATE), processes=1, devices=2
    ),
    # Half the flags of a multi-process run: one line, exit 2, nothing started.
    "bad_flags": Job(
      "kd_jax.main", main_args(dirs, workdir("bad_flags"), gt, "--num_processes=2"), processes=1
    ),
  }
  bad = jobs.pop("bad_flags")
  out.update(run_all(jobs))
  out["bad_flags_out"] = bad.wait()[0]

  # Wave 2: the ground-truth run is the distillation's teacher.
  kd = [
    STUDENT.format(method="hinton_kd"),
    f"--config.teacher_workdir={out['gt_2p']}",
    "--config.distill.cache_teacher_logits=True",
  ]
  jobs = {
    "kd_2p": Job("kd_jax.main", main_args(dirs, workdir("kd_2p"), *kd)),
    "kd_1p": Job("kd_jax.main", main_args(dirs, workdir("kd_1p"), *kd), processes=1, devices=2),
    "evaluate_2p": Job(
      "kd_jax.evaluate",
      [f"--workdir={out['gt_2p']}", f"--data_dir={dirs['tfds']}", f"--manual_dir={dirs['manual']}"],
    ),
  }
  # The ground-truth run resumed on 1 device instead of 2: refused before anything is written.
  before = helpers.tree_contents(out["gt_1p"])
  refused = Job("kd_jax.main", main_args(dirs, out["gt_1p"], gt), processes=1, devices=1)
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    killed = pool.submit(
      killed_mid_run,
      dirs,
      workdir("killed_2p"),
      workdir("killed_to_1p"),
      gt,
      "--config.checkpoint_every_steps=2",
    )
    out.update(run_all(jobs))
    for name, result in killed.result().items():
      out[name + "_killed"] = result
  out["refused_out"] = refused.wait()[0]
  out["gt_1p_unchanged"] = helpers.tree_contents(out["gt_1p"]) == before
  return out


def test_ground_truth_two_processes_equal_one_process_of_two_devices(runs):
  helpers.assert_trees_equal(
    helpers.final_params(runs["gt_2p"]), helpers.final_params(runs["gt_1p"])
  )
  two, one = (
    read_json(os.path.join(runs["gt_2p"], "results.json")),
    read_json(os.path.join(runs["gt_1p"], "results.json")),
  )
  assert two["history"] == one["history"] and two["test_accuracy"] == one["test_accuracy"]
  assert two["test_examples"] == 64  # the whole test split, not one process's share


def test_only_process_zero_writes(runs):
  p0, p1 = runs["gt_2p_out"]
  assert "test_accuracy=" in p0.stdout and "test_accuracy=" not in p1.stdout
  workdir = runs["gt_2p"]
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  train_steps = [r["step"] for r in rows if "train/loss" in r]
  assert train_steps == sorted(set(train_steps)) and train_steps  # each step once: one writer
  assert len([n for n in os.listdir(workdir) if n.startswith("events.out.tfevents")]) == 1
  assert not [n for n in os.listdir(workdir) if n.endswith(".tmp")]


def test_a_two_process_evaluate_gives_the_runs_results(runs):
  results = read_json(os.path.join(runs["gt_2p"], "results.json"))
  p0, p1 = runs["evaluate_2p_out"]
  printed = json.loads(
    p0.stdout[p0.stdout.index("{") :]
  )  # the metrics JSON, after what gloo prints on connecting
  assert "{" not in p1.stdout  # process 0 prints; process 1 does not
  assert (
    printed["test_accuracy"] == results["test_accuracy"]
    and printed["test_examples"] == results["test_examples"]
  )


def test_hinton_kd_two_processes_equal_one_process(runs):
  two, one = runs["kd_2p"], runs["kd_1p"]
  helpers.assert_trees_equal(helpers.final_params(two), helpers.final_params(one))
  r2, r1 = (
    read_json(os.path.join(two, "results.json")),
    read_json(os.path.join(one, "results.json")),
  )
  assert r2["history"] == r1["history"] and r2["teacher_agreement"] == r1["teacher_agreement"]


@pytest.mark.parametrize("name", ["killed_2p", "killed_to_1p"])
def test_killed_process_then_rerun_resumes_to_the_same_parameters(runs, name):
  """Re-run as 2 processes, or as 1 process of the same 2 devices: the uninterrupted run's
  parameters and history."""
  killed = runs[name + "_killed"]
  assert killed["steps"] and not killed["results"]  # stopped mid-run, with a checkpoint
  assert killed["returncodes"][1] == -signal.SIGKILL
  assert len(killed["rerun"]) == (2 if name == "killed_2p" else 1)
  helpers.assert_trees_equal(helpers.final_params(runs[name]), helpers.final_params(runs["gt_2p"]))
  resumed = read_json(os.path.join(runs[name], "results.json"))
  assert resumed["history"] == read_json(os.path.join(runs["gt_2p"], "results.json"))["history"]


def test_amalgamation_two_processes_equal_one_process(runs):
  two, one = runs["amalgamate_2p"], runs["amalgamate_1p"]
  helpers.assert_trees_equal(helpers.final_params(two), helpers.final_params(one))
  r2, r1 = (
    read_json(os.path.join(two, "results.json")),
    read_json(os.path.join(one, "results.json")),
  )
  assert r2["history"] == r1["history"] and "routing_accuracy" in r2
  for t in range(2):
    teachers = [os.path.join(w, "teachers", f"teacher_{t}") for w in (two, one)]
    helpers.assert_trees_equal(*(helpers.final_params(w) for w in teachers))


def test_bad_flags_and_another_device_count_are_refused_in_one_line(runs):
  for name in ("bad_flags_out", "refused_out"):
    out = runs[name]
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
  assert "--coordinator_address" in runs["bad_flags_out"].stderr and not os.path.exists(
    runs["bad_flags"]
  )
  assert "2 devices" in runs["refused_out"].stderr and runs["gt_1p_unchanged"]


@pytest.mark.parametrize(
  "flags, environ, expected",
  [
    ((None, None, None), {}, None),  # today's single process
    ((None, 1, None), {}, None),
    (("h:1", 2, 1), {}, {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}),
    (
      (None, 2, 0),
      {"JAX_COORDINATOR_ADDRESS": "h:7"},
      {"coordinator_address": "h:7", "num_processes": 2, "process_id": 0},
    ),
    (
      (None, None, None),
      {"SLURM_NTASKS": "4", "SLURM_STEP_NODELIST": "n[1-2]"},
      {},
    ),  # srun: JAX detects all
    ((None, None, None), {"SLURM_NTASKS": "1", "SLURM_STEP_NODELIST": "n1"}, None),
    ((None, None, None), {"SLURM_NTASKS": "4"}, None),  # sbatch's shell, not an srun task
  ],
)
def test_distributed_settings(flags, environ, expected):
  assert distributed.settings(*flags, environ=environ) == expected


@pytest.mark.parametrize(
  "flags, environ, message",
  [
    ((None, 2, None), {}, "--coordinator_address, --process_id"),
    (("h:1", None, None), {}, "--num_processes, --process_id"),
    (("h:1", 2, 2), {}, r"--process_id=2: must be in \[0, 2\)"),
    (("h:1", 0, 0), {}, "--num_processes=0"),
    (("h", 2, 0), {}, "HOST:PORT"),
    ((None, None, -1), {}, "--process_id=-1"),
  ],
)
def test_distributed_settings_refused(flags, environ, message):
  with pytest.raises(UsageError, match=message):
    distributed.settings(*flags, environ=environ)
