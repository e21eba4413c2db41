"""Student-side regressors of feature distillation: FitNets' hint regressor and VID's Gaussian head.

They map a student feature map (NHWC) to the teacher's; their parameters train with the
student and live in its train state.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


class HintRegressor(nn.Module):
  """conv + BatchNorm (+ ReLU) from a student map to the teacher's `[H_t, W_t, C_t]` (FitNets).

  The convolution resizes as mdistiller's `ConvReg` does, from the student's height `H_s`:

  * `H_s = 2 H_t`: 3×3, stride 2, padding 1;
  * `2 H_s = H_t`: 4×4 transposed convolution, stride 2, padding 1;
  * `H_s ≥ H_t`: a VALID convolution of kernel `(1 + H_s − H_t, 1 + W_s − W_t)`;
  * otherwise a `ValueError`.

  BatchNorm uses torch's defaults (momentum 0.1, i.e. Flax's 0.9; epsilon 1e-5) and its
  statistics in the `batch_stats` collection.

  Attributes:
    features: the teacher's channel count `C_t`.
    target_size: the teacher's `(H_t, W_t)`.
    use_relu: apply the ReLU (mdistiller's default; FitNets' hint layer may be pre-ReLU).
    dtype: the compute dtype; parameters stay float32.
    bn_axis_name: the mesh axis BatchNorm averages its batch statistics over under
      `shard_map` (None outside), so that they do not depend on the device count.
  """

  features: int
  target_size: tuple[int, int]
  use_relu: bool = True
  dtype: str = "float32"
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    """`[B, H_s, W_s, C_s]` → `[B, H_t, W_t, C_t]`."""
    if x.ndim != 4:
      raise ValueError(f"HintRegressor needs NHWC inputs, got shape {x.shape}")
    s_h, s_w = x.shape[1], x.shape[2]
    t_h, t_w = self.target_size
    dtype = jnp.dtype(self.dtype)
    if s_h == 2 * t_h:
      conv = nn.Conv(
        self.features, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), dtype=dtype, name="conv"
      )
    elif 2 * s_h == t_h:
      # torch's padding p is k − 1 − p = 2 on each side of the stride-dilated input.
      conv = nn.ConvTranspose(
        self.features, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)), dtype=dtype, name="conv"
      )
    elif s_h >= t_h and s_w >= t_w:
      conv = nn.Conv(
        self.features, (1 + s_h - t_h, 1 + s_w - t_w), padding="VALID", dtype=dtype, name="conv"
      )
    else:
      raise ValueError(
        f"HintRegressor cannot map a {s_h}x{s_w} student map to the teacher's {t_h}x{t_w}"
      )
    y = conv(x)
    if y.shape[1:3] != (t_h, t_w):
      raise ValueError(
        f"HintRegressor maps {s_h}x{s_w} to {y.shape[1]}x{y.shape[2]}, not the teacher's "
        f"{t_h}x{t_w} (the widths must follow the heights)"
      )
    y = nn.BatchNorm(
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      dtype=dtype,
      axis_name=self.bn_axis_name,
      name="bn",
    )(y)
    return nn.relu(y) if self.use_relu else y


def _inverse_softplus(y: float) -> float:
  return math.log(math.expm1(y))


class VIDRegressor(nn.Module):
  """VID's Gaussian head: three 1×1 convolutions for the mean, a learnt per-channel variance.

  `μ = conv1×1(relu(conv1×1(relu(conv1×1(x)))))` (no biases) and
  `σ²_c = softplus(ρ_c) + eps`, with `ρ` a parameter of this module initialised so that
  `σ² = init_variance` (Ahn et al., CVPR 2019; the authors' and torchdistill's
  `Regressor4VID`). mdistiller keeps its `ρ` in a plain Python list, so it is never
  registered: its optimizer does not train it and its checkpoints do not hold it (the
  variance stays at its initial value). Here `ρ` is the `variance_param` parameter and
  trains with the rest. Pass `(μ, σ²)` to `kd_jax.losses.vid`.

  Attributes:
    features: the teacher's channel count `C_t`.
    hidden_features: the two hidden widths (default `C_t`, as mdistiller).
    init_variance: the initial `σ²` (5.0).
    eps: the floor added to `σ²` (1e-5).
    dtype: the compute dtype; parameters and `σ²` stay float32.
  """

  features: int
  hidden_features: int | None = None
  init_variance: float = 5.0
  eps: float = 1e-5
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array]:
    """`[..., C_s]` → `(μ [..., C_t], σ² [C_t])` (σ² broadcasts over the leading axes)."""
    if not self.init_variance > self.eps:
      raise ValueError(f"init_variance must be > eps = {self.eps}, got {self.init_variance}")
    hidden = self.hidden_features or self.features
    dtype = jnp.dtype(self.dtype)
    y = nn.relu(nn.Conv(hidden, (1, 1), use_bias=False, dtype=dtype, name="conv1")(x))
    y = nn.relu(nn.Conv(hidden, (1, 1), use_bias=False, dtype=dtype, name="conv2")(y))
    mean = nn.Conv(self.features, (1, 1), use_bias=False, dtype=dtype, name="conv3")(y)
    init = _inverse_softplus(self.init_variance - self.eps)
    rho = self.param(
      "variance_param", nn.initializers.constant(init), (self.features,), jnp.float32
    )
    return mean, jax.nn.softplus(rho) + self.eps


class CRDEmbed(nn.Module):
  """CRD's embedding head: flatten, a linear map to `features`, L2-normalise each row.

  RepDistiller's and torchdistill's `Embed` (Tian et al., ICLR 2020), one on the student's
  and one on the teacher's features; both train with the student.

  Attributes:
    features: the embedding width (the paper's 128).
    dtype: the compute dtype; parameters and the output stay float32.
  """

  features: int = 128
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """`[B, ...]` → `[B, features]`, unit rows."""
    y = nn.Dense(self.features, dtype=jnp.dtype(self.dtype), name="linear")(
      x.reshape((x.shape[0], -1))
    ).astype(jnp.float32)
    return y / jnp.sqrt(jnp.sum(y * y, axis=-1, keepdims=True))
