"""Multi-process start-up on JAX's own distributed runtime, shared by the entry points.

One command runs on 1 device, on every device of a node, or as N processes (one or more
per host): each process runs the same command, and `jax.distributed.initialize` joins
them into one job whose devices form one data-parallel mesh. It is called when the job
is distributed, i.e. when one of these is given:

  * the entry points' flags `--coordinator_address=HOST:PORT` (process 0's address, the same for all),
    `--num_processes=N` and `--process_id=I`;
  * JAX's variable `JAX_COORDINATOR_ADDRESS` (with the flags for the rest);
  * a cluster launcher JAX detects by itself with more than one task (SLURM's `srun`,
    Open MPI's `mpirun`, ...): JAX reads the address, count and id from its variables.

With none of them the process is a job of its own, exactly as without this module.
"""

from __future__ import annotations

import os

from kd_jax.errors import UsageError

# Launchers JAX's cluster detection knows: (variable with the task count, variable that
# JAX needs to find the rest, e.g. only `srun` sets SLURM_STEP_NODELIST, not `sbatch`).
_LAUNCHERS = (
  ("SLURM_NTASKS", "SLURM_STEP_NODELIST"),
  ("OMPI_COMM_WORLD_SIZE", "OMPI_MCA_orte_hnp_uri"),
)


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> None:
  """Joins the job that the arguments (the entry points' flags of the same names) or the
  environment describe (see the module docstring); must run before anything starts a JAX
  backend. Bad combinations: a `UsageError`."""
  kwargs = settings(coordinator_address, num_processes, process_id, environ=os.environ)
  if kwargs is None:
    return
  import jax  # pylint: disable=g-import-not-at-top

  jax.distributed.initialize(**kwargs)
  # Start the backend and the CPU collectives now, while every process is at the same point:
  # both wait for the others only so long (device topologies 2 min, gloo's context 30 s).
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  multihost_utils.sync_global_devices("kd_jax start")


def settings(
  coordinator: str | None, num_processes: int | None, process_id: int | None, *, environ
) -> dict | None:
  """The arguments of `jax.distributed.initialize` (None: a single-process job), checked.

  A launcher's variables fill what the flags leave unset (JAX reads them itself); without
  a launcher, a multi-process job needs all three: the coordinator's address, the count
  and this process's id.
  """
  coordinator = coordinator or environ.get("JAX_COORDINATOR_ADDRESS") or None
  launcher = _launcher_tasks(environ)
  if num_processes is not None and num_processes < 1:
    raise UsageError(f"--num_processes={num_processes}: give the number of processes, at least 1")
  if process_id is not None and (
    process_id < 0 or (num_processes is not None and process_id >= num_processes)
  ):
    bound = f"in [0, {num_processes})" if num_processes is not None else "0 or more"
    raise UsageError(f"--process_id={process_id}: must be {bound}, one id per process")
  if coordinator is not None and (
    ":" not in coordinator or not coordinator.rsplit(":", 1)[1].isdigit()
  ):
    raise UsageError(
      f"--coordinator_address={coordinator}: give HOST:PORT of process 0, e.g. 10.0.0.1:1234"
    )
  if coordinator is None and num_processes is None and process_id is None:
    return {} if launcher > 1 else None  # {}: JAX detects everything from the launcher
  if launcher <= 1:
    if num_processes == 1 and coordinator is None and process_id in (None, 0):
      return None  # a job of one process: nothing to join
    missing = [
      name
      for name, value in (
        ("--coordinator_address", coordinator),
        ("--num_processes", num_processes),
        ("--process_id", process_id),
      )
      if value is None
    ]
    if missing:
      raise UsageError(
        f"a multi-process run needs {', '.join(missing)} too (or a cluster launcher such as srun): give every "
        "process --coordinator_address=HOST:PORT of process 0, --num_processes=N and its own --process_id"
      )
  return {
    "coordinator_address": coordinator,
    "num_processes": num_processes,
    "process_id": process_id,
  }


def _launcher_tasks(environ) -> int:
  """Tasks of the cluster launcher this process runs under (0: none)."""
  for count, detected in _LAUNCHERS:
    if detected in environ and environ.get(count, "").isdigit():
      return int(environ[count])
  return 0


def is_primary() -> bool:
  """Whether this is process 0, the one that writes the run's files."""
  import jax  # pylint: disable=g-import-not-at-top

  return jax.process_index() == 0


def _process_count() -> int:
  import jax  # pylint: disable=g-import-not-at-top

  return jax.process_count()


def barrier(name: str) -> None:
  """Waits until every process reaches `name` (a no-op in a single-process job): where one
  process must see a file another writes."""
  if _process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices(name)


def primary_first(fn, *, what: str):
  """`fn()` on process 0, then on the others (e.g. preparing a data set on first use: one
  writer, then readers). If it fails on process 0, the others fail too, in one line."""
  if is_primary():
    try:
      result = fn()
    except Exception:
      agree(False)
      raise
    agree(True)
    return result
  if not agree(True):
    raise UsageError(f"process 0 failed {what} (its error line says why)")
  return fn()


def agree(ok: bool) -> bool:
  """Process 0's `ok`, on every process (a single-process job: `ok`)."""
  if _process_count() == 1:
    return ok
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))
