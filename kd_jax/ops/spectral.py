"""A VALID convolution trained in the frequency domain, by matrix products.

On a small feature map with many channels (LeNet's conv2: 14×14×64 → 10×10×128 at the seed's
width) a 5×5 convolution's gradients cost three forwards on XLA's CPU convolution kernels: the
weight gradient one, the input gradient two (a full convolution of the zero-padded output
gradient). By the convolution theorem the layer is, per spatial frequency, a product over
channels:

    Y[f] = X[f] · conj(K[f])        X = DFT(x), K = DFT(kernel zero-padded to H×W),
    y = IDFT(Y) cropped to (H−k+1)×(W−k+1)

exact on the VALID region (a circular correlation of period H wraps only outside it). With the
2-D real DFT of an H×W map written as a constant matrix (H·(W//2+1) frequencies, real and
imaginary parts as rows), every part of the layer, and by autodiff every part of its
gradient, is a dense matrix product: the transforms contract the H·W pixels, the per-frequency
products (three real ones per complex product, Gauss's trick) the channels. At the seed's conv2
the forward and both gradients take about a third of the direct form's FLOPs (XLA's cost
analysis), on XLA's matrix kernels, which reach more of a CPU's peak than its convolutions do.
It does not pay for few input channels (LeNet's conv1: the transforms then cost more than the
direct products) nor for large maps (the transforms grow as (H·W)²).

`conv_spectral_grad` is the form to train with: its value without differentiation is XLA's
direct convolution (bit-identical to `lax.conv_general_dilated`, and faster alone, so inference
and evaluation are unchanged); under differentiation its forward and backward are the spectral
form's, which reuses the forward's transforms. Values and gradients equal the direct ones up
to float rounding (relative 1e-6 in float32), which the tests check against NumPy.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def conv_valid(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """The stride-1 VALID cross-correlation of x [B, H, W, C_in] with kernel [k, k, C_in, C_out]."""
  return lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=_DIMENSIONS)


@functools.lru_cache(maxsize=16)
def dft_matrices(h: int, w: int, kh: int, kw: int) -> tuple[np.ndarray, np.ndarray]:
  """The half-spectrum 2-D real DFT of an h×w map as matrices (float64).

  Returns `(forward, inverse)`: forward [2, F, h, w] maps pixels to the real and imaginary
  parts of the F = h·(w//2+1) frequencies (`np.fft.rfft2`); inverse [2, F, h−kh+1, w−kw+1] maps
  a Hermitian spectrum's halves back to the pixels of the VALID output region
  (`np.fft.irfft2`, cropped): frequencies whose mirror image is not stored count twice.
  """
  u, v = np.arange(h), np.arange(w // 2 + 1)
  theta = (
    2 * np.pi * (u[:, None, None, None] * u[:, None] / h + v[:, None, None] * np.arange(w) / w)
  )  # [u, v, p, q]
  f = h * (w // 2 + 1)
  forward = np.stack([np.cos(theta), -np.sin(theta)]).reshape(2, f, h, w)
  twice = np.where((v == 0) | (2 * v == w), 1.0, 2.0)[None, :, None, None]
  inverse = np.stack([twice * np.cos(theta), -twice * np.sin(theta)]) / (h * w)
  inverse = inverse[..., : h - kh + 1, : w - kw + 1].reshape(2, f, h - kh + 1, w - kw + 1)
  return forward, inverse


def conv_spectral(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`conv_valid` computed in the frequency domain (module docstring): the same up to rounding.

  float32: the transforms sum H·W terms, too many for bfloat16's 8-bit mantissa."""
  b, h, w, c = x.shape
  kh, kw, _, o = kernel.shape
  forward, inverse = dft_matrices(h, w, kh, kw)
  f = forward.shape[1]
  as_matrix = lambda a: jnp.asarray(a.reshape(2 * f, -1), x.dtype)
  # Pixels first, so that each transform is one matrix product over B·C columns.
  spec_x = (as_matrix(forward) @ x.transpose(1, 2, 0, 3).reshape(h * w, b * c)).reshape(2, f, b, c)
  spec_k = (as_matrix(forward[:, :, :kh, :kw]) @ kernel.reshape(kh * kw, c * o)).reshape(2, f, c, o)
  per_frequency = lambda a, k: jnp.einsum("fbc,fco->fbo", a, k)
  (xr, xi), (kr, ki) = spec_x, spec_k
  # X · conj(K) = (xr·kr + xi·ki) + i (xi·kr − xr·ki), in three real products (Gauss's trick).
  rr, ii = per_frequency(xr, kr), per_frequency(xi, ki)
  spec_y = jnp.stack([rr + ii, per_frequency(xr + xi, kr - ki) - rr + ii])
  oh, ow = h - kh + 1, w - kw + 1
  y = as_matrix(inverse).T @ spec_y.reshape(2 * f, b * o)
  return y.reshape(oh, ow, b, o).transpose(2, 0, 1, 3)


@jax.custom_vjp
def conv_spectral_grad(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`conv_valid(x, kernel)`; under differentiation `conv_spectral`, forward and backward."""
  return conv_valid(x, kernel)


def _forward(x, kernel):
  return jax.vjp(conv_spectral, x, kernel)  # The backward function is a pytree of residuals.


def _backward(backward, cotangent):
  return backward(cotangent)


conv_spectral_grad.defvjp(_forward, _backward)
