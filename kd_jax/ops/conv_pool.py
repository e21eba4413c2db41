"""A VALID k×k convolution, bias, activation and 2×2/stride-2 max pool, as LeNet stacks them.

With few output channels XLA's CPU convolution is slow (a thin matrix product per pixel), so
for those layers the block is computed in **polyphase** form: the input is folded 2×2 into
channels (space-to-depth, 4·C_in channels at half the resolution), one convolution with a
⌊k/2⌋+1-square kernel produces each 2×2 pooling window's four conv outputs as 4·C_out
channels, and the pool becomes a max over those four (`phase_max`). Same parameters (`kernel`
[k, k, C_in, C_out], `bias`, as `nn.Conv`), same outputs up to float rounding (the polyphase
kernel holds the same weights and zeros), more FLOPs (about 1.44× for k = 5) on far faster
kernels. Inside LeNet's training step, since `phase_max` stores the max once, a layer of up to
64 outputs that does not train in the frequency domain (below) is faster in polyphase form
(`benchmarks/conv_pool.py` times a block alone; docs/performance.md has the numbers). Hence
`POLYPHASE_MAX_CHANNELS`, on the CPU only: other backends keep the earlier limit, 16.

The direct form, with many input channels on a small map (LeNet's conv2 from width 0.5), trains
its convolution in the frequency domain (`kd_jax.ops.spectral`): the same values and gradients
up to float rounding at a third of the FLOPs. Hence `SPECTRAL_MIN_INPUT_CHANNELS` and
`SPECTRAL_MAX_PIXELS` (16×16, just above the map sizes LeNet has).

The activation must be monotone non-decreasing (ReLU, identity): it is applied after the max,
where it commutes with it. Gradients follow the first maximum of each window in row-major
order, as `pooling.max_pool_2x2` (and reduce_window) do.
"""

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.ops import pooling, spectral

POLYPHASE_MAX_CHANNELS = 64
# Not measured on a GPU: other backends keep the limit set before the CPU's was raised.
POLYPHASE_MAX_CHANNELS_ELSEWHERE = 16
SPECTRAL_MIN_INPUT_CHANNELS = 32
SPECTRAL_MAX_PIXELS = 256


class ConvMaxPool(nn.Module):
  """`max_pool_2x2(act(conv(x) + bias), 'VALID')`; parameters named and initialised as `nn.Conv`'s.

  Attributes:
    features: output channels.
    kernel_size: k of the k×k kernel.
    activation: a monotone non-decreasing function (see the module docstring).
    dtype: the compute dtype; parameters stay float32.
    polyphase: None picks the polyphase form for at most `POLYPHASE_MAX_CHANNELS` outputs on
      the CPU backend (`POLYPHASE_MAX_CHANNELS_ELSEWHERE` on others), unless the convolution
      trains in the frequency domain; True/False force it.
    spectral_gradients: train the direct form's convolution in the frequency domain
      (`spectral.conv_spectral_grad`; the value without differentiation is unchanged). None
      picks it on the CPU backend for float32 with at least `SPECTRAL_MIN_INPUT_CHANNELS`
      input channels and maps of at most `SPECTRAL_MAX_PIXELS`; elsewhere the direct gradients
      (a GPU's convolution kernels are another matter: not measured).
  """

  features: int
  kernel_size: int = 5
  activation: Callable[[jax.Array], jax.Array] = nn.relu
  dtype: str = "float32"
  polyphase: bool | None = None
  spectral_gradients: bool | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    kernel = self.param(
      "kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features)
    )
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    dtype = jnp.dtype(self.dtype)
    x, kernel, bias = x.astype(dtype), kernel.astype(dtype), bias.astype(dtype)
    cpu = on_cpu()
    spectral_gradients = self.spectral_gradients
    if spectral_gradients is None:
      spectral_gradients = (
        cpu
        and dtype == jnp.float32
        and x.shape[-1] >= SPECTRAL_MIN_INPUT_CHANNELS
        and x.shape[1] * x.shape[2] <= SPECTRAL_MAX_PIXELS
      )
    polyphase = self.polyphase
    if polyphase is None:
      limit = POLYPHASE_MAX_CHANNELS if cpu else POLYPHASE_MAX_CHANNELS_ELSEWHERE
      polyphase = self.features <= limit and not spectral_gradients
    if not polyphase:
      y = (spectral.conv_spectral_grad if spectral_gradients else spectral.conv_valid)(x, kernel)
      return pooling.max_pool_2x2(self.activation(y + bias), padding="VALID")
    # The pool drops an odd last row/column of the conv output: so does cropping the input to
    # even sizes (conv output = input − k + 1 loses the same row).
    h, w = x.shape[1] - x.shape[1] % 2, x.shape[2] - x.shape[2] % 2
    y = spectral.conv_valid(space_to_depth(x[:, :h, :w]), polyphase_kernel(kernel))
    y = y.reshape(
      *y.shape[:3], 4, self.features
    )  # [B, (h − k + 1) // 2, (w − k + 1) // 2, 4, C_out]
    return self.activation(phase_max(y) + bias)


def space_to_depth(x: jax.Array) -> jax.Array:
  """[B, H, W, C] (H, W even) → [B, H/2, W/2, 4·C], channels ordered (row in the 2×2 cell,
  column in it, c)."""
  b, h, w, c = x.shape
  return (
    x.reshape(b, h // 2, 2, w // 2, 2, c)
    .transpose(0, 1, 3, 2, 4, 5)
    .reshape(b, h // 2, w // 2, 4 * c)
  )


def polyphase_kernel(kernel: jax.Array) -> jax.Array:
  """[k, k, C_in, C_out] → [m, m, 4·C_in, 4·C_out], m = ⌊k/2⌋ + 1, such that the VALID
  convolution of `space_to_depth(x)` gives, at (i, j), output channel (a, b, o) = the VALID
  convolution of x with `kernel` at (2i + a, 2j + b), channel o:

      K[p, q, (r, s, c), (a, b, o)] = kernel[2p + r − a, 2q + s − b, c, o]   (0 outside the kernel).
  """
  k = kernel.shape[0]
  m = k // 2 + 1
  # Index into the kernel padded by one zero on each side: offset u → u + 1, outside → 0.
  u = (
    2 * np.arange(m)[:, None, None] + np.arange(2)[None, :, None] - np.arange(2)[None, None, :]
  )  # [p, r, a]
  index = np.where((u >= 0) & (u < k), u + 1, 0)
  padded = jnp.pad(kernel, ((1, 1), (1, 1), (0, 0), (0, 0)))
  taps = padded[
    index[:, None, :, None, :, None], index[None, :, None, :, None, :]
  ]  # [p, q, r, s, a, b, c, o]
  c_in, c_out = kernel.shape[2:]
  return taps.transpose(0, 1, 2, 3, 6, 4, 5, 7).reshape(m, m, 4 * c_in, 4 * c_out)


def on_cpu() -> bool:
  """Whether JAX computes on the CPU (read at trace time)."""
  return jax.default_backend() == "cpu"


@jax.custom_jvp
def phase_max(y: jax.Array) -> jax.Array:
  """Max over axis 3 of [B, h, w, 4, C]: the four phases of each 2×2 pooling window, row-major.

  A reduction with a reducer XLA does not take for a plain max, on purpose: XLA's own loop
  computes it (YNNPACK's CPU reduce-max can drop a NaN, which must reach the loss for the
  divergence guard to see it), and its result is stored once. Elementwise maxima were fused
  into every consumer instead, among them the batch-minor transpose that feeds conv2's weight
  gradient, which then read the 4-phase conv output in the worst order.
  """
  nan_max = lambda a, b: jnp.where(jnp.isnan(a), a, jnp.maximum(a, b))
  return jax.lax.reduce(y, np.array(-np.inf, y.dtype), nan_max, (3,))


@phase_max.defjvp
def _phase_max_jvp(primals, tangents):
  # The derivative follows the first maximum, as pooling.max_pool_2x2's does: the lowest phase
  # equal to the max, found by one min-reduction (a window holding a NaN has none: 4), which
  # moves less memory than a mask built from cumulative sums or stacked comparisons.
  (y,), (tangent,) = primals, tangents
  out = phase_max(y)
  phase = jax.lax.broadcasted_iota(jnp.int32, y.shape, 3)
  first = jnp.min(jnp.where(y == out[:, :, :, None], phase, 4), axis=3, keepdims=True)
  return out, jnp.sum(jnp.where(phase == first, tangent, 0), axis=3)
