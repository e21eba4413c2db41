"""Pooling written as reshapes, strided slices and elementwise max/add.

Why not `nn.max_pool` / `nn.avg_pool`: XLA's CPU backend lowers their `reduce_window` and,
worse, the max pool's gradient (`select_and_scatter` over index tensors) to slow loops, a large
share of the LeNet training step. The forms here compile to plain vectorised elementwise code,
forward and backward.

Outputs equal `nn.max_pool` / `nn.avg_pool` with the same window, stride and padding (the
average up to float rounding: it sums in another order). The 2×2 max pool's gradient equals
reduce_window's, ties included (the first maximum of a window takes it). The 3×3 pools' gradients
equal theirs up to float rounding, except on exact ties, which the separable max splits
differently (NiN, with biases and no BatchNorm, rarely has them).
"""

import jax
import jax.numpy as jnp
import numpy as np


def max_pool_2x2(x: jax.Array, *, padding: str) -> jax.Array:
  """2×2 max pool, stride 2, on [B, H, W, C]; `padding` 'SAME' or 'VALID' as in `nn.max_pool`.

  The two differ on odd sizes only: VALID drops the last row/column, SAME pads it with -inf
  (which never wins) at the end, TensorFlow's rule.
  """
  b, h, w, c = x.shape
  if padding == "VALID":
    h, w = h - h % 2, w - w % 2
    x = x[:, :h, :w]
  elif padding == "SAME":
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), constant_values=-jnp.inf)
    h, w = h + h % 2, w + w % 2
  else:
    raise ValueError(f"padding must be 'SAME' or 'VALID', got {padding!r}")
  return _window_max(x.reshape(b, h // 2, 2, w // 2, 2, c))


@jax.custom_jvp
def _window_max(windows: jax.Array) -> jax.Array:
  """Max of [B, h, 2, w, 2, C] over axes 2 and 4: one 2×2 window per output pixel."""
  return jnp.max(windows, axis=(2, 4))


@_window_max.defjvp
def _window_max_jvp(primals, tangents):
  # The derivative follows the first maximum of each window in row-major order, as
  # reduce_window's does (select_and_scatter), rather than jnp.max's even split among ties.
  # Ties are common: a ReLU'd region of zeros gives a conv without bias a constant output.
  # (conv_pool.phase_max's stored reduction and min-index mask made the steps using this pool
  # slower: here XLA does better fusing the max into its consumers.)
  (windows,), (tangent,) = primals, tangents
  out = _window_max(windows)
  hit = windows == out[:, :, None, :, None, :]
  h00, h01, h10 = hit[:, :, 0, :, 0], hit[:, :, 0, :, 1], hit[:, :, 1, :, 0]
  first = jnp.stack(
    [
      jnp.stack([h00, h01 & ~h00], axis=3),
      jnp.stack([h10 & ~(h00 | h01), ~(h00 | h01 | h10)], axis=3),
    ],
    axis=2,
  )
  return out, jnp.sum(jnp.where(first, tangent, 0), axis=(2, 4))


def _pool3_stride2_axis(x: jax.Array, axis: int, op, fill) -> jax.Array:
  """out[i] = op(x[2i], x[2i+1], x[2i+2]) along `axis`, SAME-padded at the end with `fill`."""
  n = x.shape[axis]
  out = -(-n // 2)
  lo, hi = _same_pads(n)
  pads = [(0, 0)] * x.ndim
  pads[axis] = (lo, hi)
  x = jnp.pad(x, pads, constant_values=fill)
  take = lambda start: jax.lax.slice_in_dim(x, start, start + 2 * out - 1, stride=2, axis=axis)
  return op(op(take(0), take(1)), take(2))


def _same_pads(n: int) -> tuple[int, int]:
  """TensorFlow SAME padding (before, after) of a 3-window at stride 2 over n positions."""
  out = -(-n // 2)
  total = max((out - 1) * 2 + 3 - n, 0)
  return total // 2, total - total // 2


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """3×3 max pool, stride 2, SAME padding, on [B, H, W, C]; separable: rows, then columns."""
  x = _pool3_stride2_axis(x, 1, jnp.maximum, -jnp.inf)
  return _pool3_stride2_axis(x, 2, jnp.maximum, -jnp.inf)


def avg_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """3×3 average pool, stride 2, SAME padding, padding left out of the average
  (`count_include_pad=False`, TensorFlow's rule) on [B, H, W, C]."""
  _, h, w, _ = x.shape
  total = _pool3_stride2_axis(_pool3_stride2_axis(x, 1, jnp.add, 0.0), 2, jnp.add, 0.0)
  counts = np.outer(_window_counts(h), _window_counts(w))  # static: from the shape alone
  return total / jnp.asarray(counts, x.dtype)[None, :, :, None]


def _window_counts(n: int) -> np.ndarray:
  """How many of each output window's 3 positions are real (not padding), along one axis."""
  lo, hi = _same_pads(n)
  real = np.pad(np.ones(n), (lo, hi))
  out = -(-n // 2)
  return np.array([real[2 * i : 2 * i + 3].sum() for i in range(out)])
