"""Feature alignment (FA) modules of knowledge amalgamation: bias-free 1×1 projections.

Every parameter of these modules is a conv kernel of shape (1, 1, C_in, C_out) (there are no
biases), so a loss can apply the unit-norm penalty Σ_k (‖w_k‖² − 1)² to
``jax.tree.leaves(params)`` without knowing parameter names.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def unit_filter_orthogonal(key: jax.Array, shape: Sequence[int],
                           dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """Orthogonal init with every output filter rescaled to unit norm.

  Why: the teacher-side projection is regularised toward unit-norm filters, so starting there
  makes the penalty zero at step 0 and the projection starts as an isometry-like map rather than
  a random shrink/stretch. When C_in ≥ C_out the filters are exactly orthonormal (rescaling is a
  no-op); when C_in < C_out plain orthogonal init would give filters of norm √(C_in/C_out), hence
  the rescale.
  """
  w = nn.initializers.orthogonal()(key, shape, dtype)
  norms = jnp.sqrt(jnp.sum(jnp.square(w), axis=tuple(range(w.ndim - 1)), keepdims=True))
  return w / norms


def pointwise_conv(lhs: jax.Array, rhs: jax.Array, window_strides, padding, *, lhs_dilation=None,
                   rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                   precision=None) -> jax.Array:
  """`lax.conv_general_dilated` of NHWC `lhs` with a 1×1 HWIO kernel, as one matrix product
  over the flattened pixels (`nn.Conv(conv_general_dilated=...)` calls it so).

  The same values; why: XLA's CPU backend computes a 1×1 convolution's weight gradient as a
  convolution with the whole map as its window, after copying both operands into batch-minor
  layouts, while a matrix product's is a matrix product (a `dot_general` on the 4-D operands
  was slower still). The amalgamation step 1.05× faster (BENCHMARKS.md).
  """
  del lhs_dilation, rhs_dilation  # moot for a 1×1 kernel at unit strides
  no_padding = padding in ('SAME', 'VALID') or all(tuple(p) == (0, 0) for p in padding)
  if rhs.shape[:2] != (1, 1) or tuple(window_strides) != (1, 1) or feature_group_count != 1 or not no_padding:
    raise ValueError(f'pointwise_conv takes a 1×1 kernel at unit strides without padding, got kernel '
                     f'{rhs.shape}, strides {window_strides}, padding {padding}, {feature_group_count} groups')
  if dimension_numbers is not None and tuple(dimension_numbers.lhs_spec) != (0, 3, 1, 2):
    raise ValueError(f'pointwise_conv takes NHWC inputs, got {dimension_numbers}')
  out = jnp.dot(lhs.reshape(-1, lhs.shape[-1]), rhs[0, 0], precision=precision)
  return out.reshape(*lhs.shape[:-1], rhs.shape[-1])


class FeatureAlignment(nn.Module):
  """Projects features [B, H, W, C] to [B, H, W, width] with a bias-free 1×1 convolution
  (parameters `conv/kernel` [1, 1, C, width], computed as a matrix product: `pointwise_conv`).

  Attributes:
    width: output channels.
    dtype: the compute dtype; the kernel stays float32.
  """
  width: int
  dtype: str = 'float32'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.Conv(self.width, (1, 1), use_bias=False, kernel_init=unit_filter_orthogonal,
                   dtype=jnp.dtype(self.dtype), conv_general_dilated=pointwise_conv, name='conv')(x)


class BlockAlignment(nn.Module):
  """One FeatureAlignment per block (submodules ``block_0``, ``block_1``, ...).

  Attributes:
    widths: output width of each block's projection.
    dtype: the compute dtype.
  """
  widths: Sequence[int]
  dtype: str = 'float32'

  @nn.compact
  def __call__(self, features: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
    if len(features) != len(self.widths):
      raise ValueError(f'BlockAlignment has {len(self.widths)} blocks, got {len(features)} '
                       'feature maps')
    return tuple(FeatureAlignment(width, dtype=self.dtype, name=f'block_{i}')(f)
                 for i, (width, f) in enumerate(zip(self.widths, features)))
