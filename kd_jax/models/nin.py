"""Network in Network (Lin, Chen & Yan, 2014): the distillation teacher.

The layer stack is the Caffe `cifar10_nin` graph that the distillation seed uses (the
paper's CIFAR-10 network: three mlpconv stages, max/avg pools, dropout). Two heads are offered:

* ``'gap'`` (default): the Caffe/paper head, a 1×1 conv to ``num_classes`` maps, ReLU, global
  average pool.
* ``'fc'``: the seed's replacement head, flatten → Dense(``fc_width``) + ReLU → Dense.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.choices import NIN_HEADS
from kd_jax.models.dropout import Dropout
from kd_jax.ops import pooling

_HEADS = NIN_HEADS


def scaled(features: int, width: float) -> int:
  """Scales a layer width by a multiplier, rounding and keeping at least one channel."""
  return max(1, int(round(features * width)))


class NiN(nn.Module):
  """Network in Network for small images (CIFAR-10 32×32×3, MNIST 28×28×1, ...).

  Attributes:
    num_classes: number of output logits.
    width: multiplier applied to every hidden convolution width (192/160/96); rounded, at least
      1. The head's ``num_classes`` maps and ``fc_width`` are not scaled.
    head: ``'gap'`` (Caffe head: cccp6 1×1 → num_classes, ReLU, global average pool) or
      ``'fc'`` (the seed's head: flatten → Dense(fc_width) + ReLU → Dense(num_classes)).
    fc_width: width of the seed's hidden fully connected layer ``ip1``. The seed does not record
      it (its converted weights are unavailable), so 1024 is our choice. Used only by
      ``head='fc'``.
    dropout_rate: rate of the two dropout layers after the first two pooling stages.
    dtype: the compute dtype ('float32' or 'bfloat16'); parameters stay float32.
    dropout_axis_name: the mesh axis the batch is sharded over under ``shard_map`` (see
      ``models.Dropout``).
  """

  num_classes: int = 10
  width: float = 1.0
  head: str = "gap"
  fc_width: int = 1024
  dropout_rate: float = 0.5
  dtype: str = "float32"
  dropout_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Maps images [B, H, W, C] to logits [B, num_classes].

    Sows its stage features into the 'intermediates' collection (read them with
    `kd_jax.models.features`), all post-ReLU: `stage1` and `stage2` after their pools
    (before dropout), `stage3` (cccp5's output), and `embedding`, the vector the classifier
    reads (`fc` head: ip1's output; `gap` head: the global average of `stage3`).
    """
    if self.head not in _HEADS:
      raise ValueError(f"unknown NiN head {self.head!r}; choose one of {list(_HEADS)}")

    dtype = jnp.dtype(self.dtype)

    def conv(y: jax.Array, features: int, kernel: int, name: str) -> jax.Array:
      y = nn.Conv(
        scaled(features, self.width), (kernel, kernel), padding="SAME", dtype=dtype, name=name
      )(y)
      return nn.relu(y)

    def dropout(y: jax.Array) -> jax.Array:
      return Dropout(self.dropout_rate, deterministic=not train, axis_name=self.dropout_axis_name)(
        y
      )

    x = conv(x, 192, 5, "conv1")
    x = conv(x, 160, 1, "cccp1")
    x = conv(x, 96, 1, "cccp2")
    x = pooling.max_pool_3x3_s2(x)
    self.sow("intermediates", "stage1", x)
    x = dropout(x)

    x = conv(x, 192, 5, "conv2")
    x = conv(x, 192, 1, "cccp3")
    x = conv(x, 192, 1, "cccp4")
    # TensorFlow's SAME average pool (the seed's framework) leaves padding out of the average.
    x = pooling.avg_pool_3x3_s2(x)
    self.sow("intermediates", "stage2", x)
    x = dropout(x)

    x = conv(x, 192, 3, "conv3")
    x = conv(x, 192, 1, "cccp5")
    self.sow("intermediates", "stage3", x)

    if self.head == "gap":
      self.sow("intermediates", "embedding", jnp.mean(x, axis=(1, 2)))
      # Caffe keeps a ReLU on the class maps, so these logits are non-negative.
      x = nn.relu(nn.Conv(self.num_classes, (1, 1), dtype=dtype, name="cccp6")(x))
      return jnp.mean(x, axis=(1, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.fc_width, dtype=dtype, name="ip1")(x))
    self.sow("intermediates", "embedding", x)
    return nn.Dense(self.num_classes, dtype=dtype, name="ip2")(x)
