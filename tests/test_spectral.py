"""The frequency-domain convolution (kd_jax.ops.spectral) against NumPy: its DFT matrices
against np.fft, its values and gradients against a sliding-window correlation in float64; and
where LeNet's conv + pool block uses it."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.ops import conv_pool, spectral

SHAPES = [  # x [B, H, W, C_in], kernel size, C_out: the seed's conv2 (narrower), odd and non-square maps
  ((2, 14, 14, 6), 5, 7),
  ((3, 13, 11, 4), 5, 5),
  ((2, 12, 9, 3), 3, 2),
]


def numpy_conv(x, k):
  """y[b, i, j, o] = Σ_{p, q, c} x[b, i + p, j + q, c] · k[p, q, c, o], in float64."""
  windows = np.lib.stride_tricks.sliding_window_view(x.astype(np.float64), k.shape[:2], axis=(1, 2))
  return np.einsum("bijcpq,pqco->bijo", windows, k.astype(np.float64))


def numpy_conv_grads(x, k, g):
  """The gradients of Σ g · numpy_conv(x, k) with respect to x and k, loop by kernel tap."""
  kh, kw = k.shape[:2]
  oh, ow = g.shape[1:3]
  x, k, g = x.astype(np.float64), k.astype(np.float64), g.astype(np.float64)
  dx, dk = np.zeros_like(x), np.zeros_like(k)
  for p in range(kh):
    for q in range(kw):
      dx[:, p : p + oh, q : q + ow] += np.einsum("bijo,co->bijc", g, k[p, q])
      dk[p, q] = np.einsum("bijc,bijo->co", x[:, p : p + oh, q : q + ow], g)
  return dx, dk


def random_case(shape, kernel_size, out_channels, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape).astype(np.float32)
  k = (
    rng.standard_normal((kernel_size, kernel_size, shape[-1], out_channels)) / kernel_size
  ).astype(np.float32)
  out_shape = (shape[0], shape[1] - kernel_size + 1, shape[2] - kernel_size + 1, out_channels)
  return x, k, rng.standard_normal(out_shape).astype(np.float32)


def assert_close(got, want):
  """float32 against float64: sums of H·W products, so relative to the largest entry."""
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("h, w, k", [(14, 14, 5), (13, 11, 5), (12, 9, 3)])
def test_dft_matrices_are_numpys_rfft2_and_its_cropped_inverse(h, w, k):
  x = np.random.default_rng(1).standard_normal((h, w))
  forward, inverse = spectral.dft_matrices(h, w, k, k)
  spectrum = np.fft.rfft2(x).reshape(-1)
  halves = np.einsum("sfpq,pq->sf", forward, x)
  np.testing.assert_allclose(halves[0] + 1j * halves[1], spectrum, atol=1e-9)
  np.testing.assert_allclose(
    np.einsum("sfpq,sf->pq", inverse, halves), x[: h - k + 1, : w - k + 1], atol=1e-9
  )


@pytest.mark.parametrize("shape, kernel_size, out_channels", SHAPES)
def test_conv_spectral_is_the_valid_correlation(shape, kernel_size, out_channels):
  x, k, _ = random_case(shape, kernel_size, out_channels)
  assert_close(np.asarray(jax.jit(spectral.conv_spectral)(x, k)), numpy_conv(x, k))


@pytest.mark.parametrize("shape, kernel_size, out_channels", SHAPES)
def test_conv_spectral_grad_trains_on_the_correlations_gradients(shape, kernel_size, out_channels):
  x, k, g = random_case(shape, kernel_size, out_channels, seed=2)
  # Its value is XLA's direct convolution, bit for bit; under differentiation the spectral form.
  np.testing.assert_array_equal(
    jax.jit(spectral.conv_spectral_grad)(x, k), jax.jit(spectral.conv_valid)(x, k)
  )
  y, (dx, dk) = jax.jit(
    lambda x, k, g: (lambda y, vjp: (y, vjp(g)))(*jax.vjp(spectral.conv_spectral_grad, x, k))
  )(x, k, g)
  assert_close(np.asarray(y), numpy_conv(x, k))
  want_dx, want_dk = numpy_conv_grads(x, k, g)
  assert_close(np.asarray(dx), want_dx)
  assert_close(np.asarray(dk), want_dk)


def convolutions_in(fn, *args):
  """How many convolutions the program of fn(*args) holds, nested sub-programs included."""

  def count(jaxpr):
    total = 0
    for eqn in jaxpr.eqns:
      total += eqn.primitive.name == "conv_general_dilated"
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          if isinstance(sub, jax.extend.core.ClosedJaxpr):
            total += count(sub.jaxpr)
          elif isinstance(sub, jax.extend.core.Jaxpr):
            total += count(sub)
    return total

  return count(jax.make_jaxpr(fn)(*args).jaxpr)


@pytest.mark.parametrize(
  "in_channels, size, dtype, spectral_expected",
  [
    (conv_pool.SPECTRAL_MIN_INPUT_CHANNELS, 14, "float32", True),  # LeNet's conv2 from width 0.5
    (conv_pool.SPECTRAL_MIN_INPUT_CHANNELS - 1, 14, "float32", False),  # few input channels
    (conv_pool.SPECTRAL_MIN_INPUT_CHANNELS, 20, "float32", False),  # a larger map
    (conv_pool.SPECTRAL_MIN_INPUT_CHANNELS, 14, "bfloat16", False),
  ],
)
def test_conv_pool_trains_in_the_frequency_domain_where_it_pays(
  in_channels, size, dtype, spectral_expected
):
  module = conv_pool.ConvMaxPool(40, dtype=dtype)
  x = jnp.zeros((2, size, size, in_channels))
  variables = module.init(jax.random.key(0), x)
  assert convolutions_in(lambda v: module.apply(v, x), variables) == 1  # inference: always direct
  grad = jax.grad(lambda p: jnp.sum(module.apply({"params": p}, x)))
  # Otherwise (polyphase or direct) the training program holds the forward and the weight
  # gradient's convolutions.
  assert (convolutions_in(grad, variables["params"]) == 0) == spectral_expected


def test_conv_pool_block_gradients_are_those_of_the_direct_form():
  x = jax.random.normal(jax.random.key(3), (2, 14, 14, conv_pool.SPECTRAL_MIN_INPUT_CHANNELS))
  direct = conv_pool.ConvMaxPool(48, spectral_gradients=False)
  variables = direct.init(jax.random.key(4), x)
  cotangent = jax.random.normal(jax.random.key(5), (2, 5, 5, 48))

  def loss_and_grads(module):
    loss = lambda params, x: jnp.sum(module.apply({"params": params}, x) * cotangent)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(variables["params"], x)

  want, got = loss_and_grads(direct), loss_and_grads(direct.clone(spectral_gradients=True))
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max()), got, want
  )


def test_lenet_routes_only_conv2_through_the_frequency_domain_at_the_seeds_width():
  from kd_jax.models.lenet import LeNet

  lenet = LeNet(width=1.0)
  x = jnp.zeros((1, 32, 32, 3))
  params = lenet.init(jax.random.key(0), x, train=False)["params"]
  grad = jax.grad(lambda p: jnp.sum(lenet.apply({"params": p}, x, train=True)))
  # conv1 (3 input channels, polyphase): its forward and weight gradient; conv2 has none.
  assert convolutions_in(grad, params) == 2
