"""Feature alignment (FA) modules of knowledge amalgamation: bias-free 1×1 projections.

Every parameter of these modules is a conv kernel of shape (1, 1, C_in, C_out) (there are no
biases), so a loss can apply the unit-norm penalty Σ_k (‖w_k‖² − 1)² to
``jax.tree.leaves(params)`` without knowing parameter names.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.ops.pointwise import pointwise_conv


def unit_filter_orthogonal(
  key: jax.Array, shape: Sequence[int], dtype: jnp.dtype = jnp.float32
) -> jax.Array:
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


class FeatureAlignment(nn.Module):
  """Projects features [B, H, W, C] to [B, H, W, width] with a bias-free 1×1 convolution
  (parameters `conv/kernel` [1, 1, C, width], computed as a matrix product: `pointwise_conv`).

  Attributes:
    width: output channels.
    dtype: the compute dtype; the kernel stays float32.
  """

  width: int
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.Conv(
      self.width,
      (1, 1),
      use_bias=False,
      kernel_init=unit_filter_orthogonal,
      dtype=jnp.dtype(self.dtype),
      conv_general_dilated=pointwise_conv,
      name="conv",
    )(x)


class BlockAlignment(nn.Module):
  """One FeatureAlignment per block (submodules ``block_0``, ``block_1``, ...).

  Attributes:
    widths: output width of each block's projection.
    dtype: the compute dtype.
  """

  widths: Sequence[int]
  dtype: str = "float32"

  @nn.compact
  def __call__(self, features: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
    if len(features) != len(self.widths):
      raise ValueError(
        f"BlockAlignment has {len(self.widths)} blocks, got {len(features)} feature maps"
      )
    return tuple(
      FeatureAlignment(width, dtype=self.dtype, name=f"block_{i}")(f)
      for i, (width, f) in enumerate(zip(self.widths, features))
    )
