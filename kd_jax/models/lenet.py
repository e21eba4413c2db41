"""The distillation seed's student, a LeNet-style convolutional net (about 3.5 M parameters)."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.models.dropout import Dropout
from kd_jax.models.nin import scaled
from kd_jax.ops.conv_pool import ConvMaxPool

# The seed's student was built for 28×28 / 32×32 inputs; the layers alone would accept 14×14
# (→ 1×1 after the second pool), but below 28 the net is no longer the seed's student.
MIN_INPUT_SIZE = 28


class LeNet(nn.Module):
  """conv 5×5→64 VALID, max pool 2, conv 5×5→128 VALID, max pool 2, Dense 1024 + ReLU, Dense.

  Attributes:
    num_classes: number of output logits.
    width: multiplier on the 64/128/1024 widths; rounded, at least 1.
    relu_after_conv: ReLU after each convolution. ``False`` reproduces the seed's variant, which
      has no non-linearity until the first dense layer. (The seed also draws conv biases from
      N(0, 0.5²); that is not reproduced: biases start at zero.)
    dropout_rate: dropout before the last dense layer; 0 disables it (the seed has none).
    dtype: the compute dtype ('float32' or 'bfloat16'); parameters stay float32.
    dropout_axis_name: the mesh axis the batch is sharded over under ``shard_map``, so that
      each example's dropout mask depends on its global position (``models.Dropout``).
  """

  num_classes: int = 10
  width: float = 1.0
  relu_after_conv: bool = True
  dropout_rate: float = 0.0
  dtype: str = "float32"
  dropout_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Maps images [B, H, W, C] (H, W ≥ 28, any C) to logits [B, num_classes].

    Sows its stage features into the 'intermediates' collection (read them with
    `kd_jax.models.features`): `block1` and `block2`, each conv block's output after its
    activation and pool (post-ReLU; no ReLU with `relu_after_conv=False`), and `fc`, fc1's
    post-ReLU output before dropout, also sown as `embedding` (the vector fc2 reads).
    """
    height, width = x.shape[1], x.shape[2]
    if min(height, width) < MIN_INPUT_SIZE:
      raise ValueError(
        f"LeNet needs inputs of at least {MIN_INPUT_SIZE}×{MIN_INPUT_SIZE}, got {height}×{width}"
      )
    act = nn.relu if self.relu_after_conv else (lambda y: y)
    dtype = jnp.dtype(self.dtype)

    # Each conv and the pool after it in one module (same parameters as nn.Conv), which computes
    # thin layers in polyphase form and, on the CPU, trains a wide conv2 in the frequency domain
    # (kd_jax.ops.conv_pool).
    x = ConvMaxPool(scaled(64, self.width), activation=act, dtype=self.dtype, name="conv1")(x)
    self.sow("intermediates", "block1", x)
    x = ConvMaxPool(scaled(128, self.width), activation=act, dtype=self.dtype, name="conv2")(x)
    self.sow("intermediates", "block2", x)

    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(scaled(1024, self.width), dtype=dtype, name="fc1")(x))
    self.sow("intermediates", "fc", x)
    self.sow("intermediates", "embedding", x)
    x = Dropout(self.dropout_rate, deterministic=not train, axis_name=self.dropout_axis_name)(x)
    return nn.Dense(self.num_classes, dtype=dtype, name="fc2")(x)
