"""CPU kernels: XLA-CPU-friendly forms of convolution and pooling, and the CPU's XLA flags.

Each module computes a standard layer (a VALID convolution with its max pool, a 1×1
convolution, a pooling window) in a form that XLA's CPU backend runs faster, with the same
values and gradients up to float rounding; the models in `kd_jax.models` choose a form by
backend. `xla_flags` sets the CPU's XLA options before JAX starts.

Modules:
  conv_pool: `ConvMaxPool`, LeNet's convolution + bias + activation + 2×2 max pool block.
  spectral: a VALID convolution trained in the frequency domain, by matrix products.
  pooling: max and average pools as reshapes, strided slices and elementwise maxima/sums.
  pointwise: the 1×1 convolution as one matrix product.
  xla_flags: the CPU-only XLA flags the entry points set at start-up.

This file imports nothing (no re-exports): `kd_jax.ops.xla_flags` must be importable before
JAX is, so that its flags reach XLA.
"""
