"""Data parallelism: one 'data' mesh axis over every device, in the pmap style.

Each device holds a replica of the state and its shard of the global batch; the
step averages gradients with `lax.pmean`. It is written with `jax.shard_map` under
`jax.jit`, which is what `jax.pmap` itself is built on since JAX 0.10 and what JAX
recommends for new code (docs/migrate_pmap).

The mesh spans every process's devices (process p's are the p-th contiguous block of
`jax.devices()`). A batch is a global array built from each process's rows
(`kd_jax.data` gives process p rows [p*b, (p+1)*b) of every global batch), so the devices
hold the same rows whether they belong to 1 process or to N; state, teachers and
restored checkpoints are replicated global arrays; `to_host` brings outputs back whole.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Iterable, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh named 'data' over `devices` (default: all devices)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (AXIS,))


def check_batch_size(batch_size: int, mesh: Mesh, *, name: str = "batch_size") -> None:
  n = mesh.size
  if batch_size % n:
    raise ValueError(
      f"{name}={batch_size} is not divisible by the {n} devices; choose a multiple of {n}"
    )


def shard_batch(batch, mesh: Mesh):
  """The global batch of which `batch` (pytree of host arrays, leading batch axis) is this
  process's rows, split across the 'data' axis."""
  sharding = NamedSharding(mesh, P(AXIS))
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch
  )


def prefetch(batches: Iterable, mesh: Mesh, *, depth: int = 2) -> Iterator:
  """Yields `shard_batch(batch, mesh)` of each host batch, `depth` batches ahead.

  The transfers are asynchronous: while the device runs one step, the next `depth - 1`
  batches are already on their way, so the step never waits for its input.
  """
  batches = iter(batches)
  queue = collections.deque()

  def enqueue(n: int) -> None:
    for batch in itertools.islice(batches, n):
      queue.append(shard_batch(batch, mesh))

  enqueue(depth)
  while queue:
    yield queue.popleft()
    enqueue(1)


def replicate(tree, mesh: Mesh):
  """`tree` (the same values on every process) as arrays replicated on every device."""
  sharding = NamedSharding(mesh, P())
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def place(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.device_put(x, sharding)  # already global: at most a resharding
    # Each process places its own copy: no cross-process transfer (and no check that the
    # copies agree, which `device_put` of host data does).
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))

  return jax.tree.map(place, tree)


def to_host(tree):
  """Every leaf whole, as NumPy, on every process: a global array's full value (e.g. a
  batch-sharded output: all rows, in global order); a host array (this process's rows
  of a batch) concatenated with the other processes' rows, in process order."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def data_parallel_step(step_fn: Callable, mesh: Mesh, *, donate_state: bool = True) -> Callable:
  """Compiles `step_fn(state, batch, frozen) -> (state, metrics)` data-parallel.

  Inside `step_fn`, `batch` is the device's shard; `state` and `frozen` (inputs that
  never change, such as teacher variables) are replicated. `step_fn` must reduce what
  it returns across the axis (`lax.pmean(..., AXIS)`), so outputs are replicated.
  """
  return jax.jit(sharded_step(step_fn, mesh), donate_argnums=(0,) if donate_state else ())


def sharded_step(step_fn: Callable, mesh: Mesh) -> Callable:
  """`step_fn` under `shard_map`, not yet compiled (for callers that add work around it in
  one `jax.jit`); see `data_parallel_step`."""
  return jax.shard_map(step_fn, mesh=mesh, in_specs=(P(), P(AXIS), P()), out_specs=(P(), P()))
