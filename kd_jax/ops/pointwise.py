"""The 1×1 convolution as one matrix product over the flattened pixels.

Why: XLA's CPU backend computes a 1×1 convolution's weight gradient as a convolution with the
whole map as its window, after copying both operands into batch-minor layouts, while a matrix
product's gradient is a matrix product (a `dot_general` on the 4-D operands was slower still).
"""

import jax
import jax.numpy as jnp


def pointwise_conv(
  lhs: jax.Array,
  rhs: jax.Array,
  window_strides,
  padding,
  *,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count: int = 1,
  precision=None,
) -> jax.Array:
  """`lax.conv_general_dilated` of NHWC `lhs` with a 1×1 HWIO kernel, as one matrix product
  over the flattened pixels (`nn.Conv(conv_general_dilated=...)` calls it so): the same values.

  Raises:
    ValueError: a kernel other than 1×1, strides other than 1, padding, feature groups, or
      inputs other than NHWC.
  """
  del lhs_dilation, rhs_dilation  # moot for a 1×1 kernel at unit strides
  no_padding = padding in ("SAME", "VALID") or all(tuple(p) == (0, 0) for p in padding)
  if (
    rhs.shape[:2] != (1, 1)
    or tuple(window_strides) != (1, 1)
    or feature_group_count != 1
    or not no_padding
  ):
    raise ValueError(
      f"pointwise_conv takes a 1×1 kernel at unit strides without padding, got kernel "
      f"{rhs.shape}, strides {window_strides}, padding {padding}, {feature_group_count} groups"
    )
  if dimension_numbers is not None and tuple(dimension_numbers.lhs_spec) != (0, 3, 1, 2):
    raise ValueError(f"pointwise_conv takes NHWC inputs, got {dimension_numbers}")
  out = jnp.dot(lhs.reshape(-1, lhs.shape[-1]), rhs[0, 0], precision=precision)
  return out.reshape(*lhs.shape[:-1], rhs.shape[-1])
