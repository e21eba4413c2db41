"""Dropout whose random numbers do not depend on how the batch is split over devices.

`nn.Dropout` draws one mask for the whole array it sees. Under data parallelism each device
sees its shard, so the masks (and the run) change with the device count unless every
device's key differs, which again ties the numbers to the device count. Here each example's
mask is drawn from its own key, `fold_in(layer key, global position of the example)`: 1, 2
or 4 devices draw the same masks for the same global batch.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def example_positions(batch: int, axis_name: str | None) -> jax.Array:
  """Global positions `[batch]` of this shard's examples in a batch split evenly over the
  mesh axis `axis_name` (device i holds rows i·batch … (i+1)·batch − 1); 0..batch−1 outside
  `shard_map` (`axis_name=None`)."""
  offset = lax.axis_index(axis_name) * batch if axis_name else 0
  return offset + jnp.arange(batch)


def example_keys(key: jax.Array, batch: int, axis_name: str | None) -> jax.Array:
  """One key per example, `fold_in(key, global position)`: `[batch]` keys (see the module
  docstring)."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(example_positions(batch, axis_name))


class Dropout(nn.Module):
  """`nn.Dropout` (inverted dropout on the leading batch axis) with per-example masks.

  Attributes:
    rate: probability of dropping a unit.
    deterministic: if true, the identity (also settable per call, like `nn.Dropout`).
    axis_name: the mesh axis the batch is sharded over under `shard_map` (None outside).
  """

  rate: float
  deterministic: bool | None = None
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool | None = None) -> jax.Array:
    deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    if self.rate == 0.0 or deterministic:
      return x
    if self.rate == 1.0:
      return jnp.zeros_like(x)
    keep_prob = 1.0 - self.rate
    keys = example_keys(self.make_rng("dropout"), x.shape[0], self.axis_name)
    keep = jax.vmap(lambda k: jax.random.bernoulli(k, keep_prob, x.shape[1:]))(keys)
    return lax.select(keep, x / keep_prob, jnp.zeros_like(x))
