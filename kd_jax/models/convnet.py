"""A VGG-style block network: the source, component and target nets of knowledge amalgamation.

Amalgamation learns block by block, so the net returns every block's output next to its logits.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.choices import CONVNET_NORMS
from kd_jax.models.dropout import Dropout
from kd_jax.ops import pooling

_NORMS = CONVNET_NORMS


def penultimate(features: Sequence[jax.Array]) -> jax.Array:
  """The penultimate embedding [B, C]: global average pool of the last block's output.

  This is the vector the ConvNet head (dropout → Dense) reads, e.g. for amalgamation's teacher
  cards.
  """
  return jnp.mean(features[-1], axis=(1, 2))


class ConvNet(nn.Module):
  """Blocks of (3×3 conv → norm → ReLU) × ``convs_per_block`` → 2×2 max pool, then a GAP head.

  Attributes:
    num_classes: number of output logits.
    block_widths: channels of each block; one pooled feature map per entry.
    convs_per_block: 3×3 SAME convolutions per block.
    norm: ``'batch'`` (BatchNorm, momentum 0.9) or ``'none'``.
    bn_axis_name: passed to ``nn.BatchNorm(axis_name=...)``; set it to the mesh axis (e.g.
      ``'data'``) when the train step runs under ``shard_map`` so batch statistics are averaged
      across devices rather than per shard.
    dropout_rate: dropout on the pooled embedding before the classifier.
    dtype: the compute dtype ('float32' or 'bfloat16'); parameters and BatchNorm statistics
      stay float32.
    dropout_axis_name: the mesh axis the batch is sharded over under ``shard_map`` (see
      ``models.Dropout``).
  """

  num_classes: int
  block_widths: Sequence[int] = (32, 64, 128)
  convs_per_block: int = 2
  norm: str = "batch"
  bn_axis_name: str | None = None
  dropout_rate: float = 0.0
  dtype: str = "float32"
  dropout_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """Maps images [B, H, W, C] to ``(logits [B, num_classes], features)``.

    ``features[i]`` is block i's output after pooling, [B, h_i, w_i, block_widths[i]].
    The same maps are sown into the 'intermediates' collection as ``block_<i>`` (post-ReLU),
    and the pooled vector the head reads as ``embedding`` (``kd_jax.models.features``).
    """
    if self.norm not in _NORMS:
      raise ValueError(f"unknown ConvNet norm {self.norm!r}; choose one of {list(_NORMS)}")
    batch_norm = self.norm == "batch"
    dtype = jnp.dtype(self.dtype)

    # Without training, a block's last ReLU follows the pool: they commute exactly, and in
    # front of the pool XLA's CPU backend writes a tensor of zeros the size of the conv output
    # for the ReLU's max (conv, norm and pool fuse into one library call that takes no
    # broadcast; docs/performance.md). In training the ReLU stays in front, where the step is
    # faster.
    relu_after_pool = not train and self.convs_per_block > 0
    features = []
    for i, width in enumerate(self.block_widths):
      for j in range(self.convs_per_block):
        # A bias right before BatchNorm is cancelled by its mean subtraction, so drop it.
        x = nn.Conv(
          width,
          (3, 3),
          padding="SAME",
          use_bias=not batch_norm,
          dtype=dtype,
          name=f"block_{i}_conv_{j}",
        )(x)
        if batch_norm:
          x = nn.BatchNorm(
            use_running_average=not train,
            momentum=0.9,
            dtype=dtype,
            axis_name=self.bn_axis_name,
            name=f"block_{i}_bn_{j}",
          )(x)
        if not (relu_after_pool and j == self.convs_per_block - 1):
          x = nn.relu(x)
      # SAME padding keeps at least one pixel, so even 1×1 inputs survive many blocks.
      x = pooling.max_pool_2x2(x, padding="SAME")
      if relu_after_pool:
        x = nn.relu(x)
      self.sow("intermediates", f"block_{i}", x)
      features.append(x)

    x = penultimate(features)
    self.sow("intermediates", "embedding", x)
    x = Dropout(self.dropout_rate, deterministic=not train, axis_name=self.dropout_axis_name)(x)
    logits = nn.Dense(self.num_classes, dtype=dtype, name="head")(x)
    return logits, tuple(features)
