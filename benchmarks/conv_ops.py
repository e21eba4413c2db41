"""Per-convolution times of LeNet's layers: XLA (as kd_jax compiles them) against PyTorch.

  python benchmarks/conv_ops.py             # study widths 0.125 and 0.5 (28×28×1), the seed recipe
  python benchmarks/conv_ops.py --rounds 20

Where the LeNet training step spends its time, op by op: for each convolution of the LeNet of
a setting, the forward pass, the forward plus the weight gradient (what conv1 needs: no input
gradient for the images) and the forward plus both gradients (conv2), batch 256, float32.
JAX: `lax.conv_general_dilated` under `jax.jit` with kd_jax's CPU XLA flags
(`kd_jax.ops.xla_flags.configure_cpu`); PyTorch: `F.conv2d` and autograd, NCHW, 2 threads. The two
run in this one process, alternately, in `--rounds` rounds; each cell is the median over rounds of
a chunk's mean wall time, and the ratio JAX ÷ PyTorch the median of the within-round ratios
(> 1: JAX slower). Inputs are random; the shapes are those of `kd_jax.models.LeNet`.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kd_jax.ops import xla_flags  # noqa: E402

xla_flags.configure_cpu()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from kd_jax.models.nin import scaled  # noqa: E402

BATCH = 256
# (setting, input [H, W, C], LeNet width)
SETTINGS = (
  ("study 0.125", (28, 28, 1), 0.125),
  ("study 0.5", (28, 28, 1), 0.5),
  ("seed 1.0", (32, 32, 3), 1.0),
)


def layers(image_shape, width):
  """LeNet's two 5×5 VALID convolutions: (name, input [B, H, W, C], output channels)."""
  h, w, c = image_shape
  c1, c2 = scaled(64, width), scaled(128, width)
  return (("conv1", (BATCH, h, w, c), c1), ("conv2", (BATCH, (h - 4) // 2, (w - 4) // 2, c1), c2))


def jax_ops(x_shape, out_channels, rng):
  conv = lambda x, k: lax.conv_general_dilated(
    x, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  x = jax.device_put(rng.standard_normal(x_shape).astype(np.float32))
  k = jax.device_put(
    (0.1 * rng.standard_normal((5, 5, x_shape[-1], out_channels))).astype(np.float32)
  )
  g = jax.device_put(rng.standard_normal(jax.eval_shape(conv, x, k).shape).astype(np.float32))
  fwd = jax.jit(conv)

  # The forward's output is returned too: otherwise XLA drops the forward from a gradient-only
  # program (a training step needs the output for the next layer).
  def with_output(fn):
    return jax.jit(lambda x, k, g: (lambda y, vjp: (y, vjp(g)))(*fn(x, k)))

  dw = with_output(lambda x, k: jax.vjp(lambda k: conv(x, k), k))
  both = with_output(lambda x, k: jax.vjp(conv, x, k))
  return {
    "fwd": lambda: jax.block_until_ready(fwd(x, k)),
    "fwd+dW": lambda: jax.block_until_ready(dw(x, k, g)),
    "fwd+dW+dx": lambda: jax.block_until_ready(both(x, k, g)),
  }


def torch_ops(x_shape, out_channels, rng):
  import torch
  import torch.nn.functional as F

  b, h, w, c = x_shape
  x = torch.from_numpy(rng.standard_normal((b, c, h, w)).astype(np.float32))
  k = torch.from_numpy((0.1 * rng.standard_normal((out_channels, c, 5, 5))).astype(np.float32))
  g = torch.randn(F.conv2d(x, k).shape)

  def grads(need_x):
    xr, kr = x.clone().requires_grad_(need_x), k.clone().requires_grad_(True)
    F.conv2d(xr, kr).backward(g)

  def fwd():
    with torch.no_grad():
      F.conv2d(x, k)

  return {"fwd": fwd, "fwd+dW": lambda: grads(False), "fwd+dW+dx": lambda: grads(True)}


def chunk_ms(fn, seconds):
  fn()
  n, start = 0, time.perf_counter()
  while n < 2 or time.perf_counter() - start < seconds:
    fn()
    n += 1
  return (time.perf_counter() - start) / n * 1e3


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument("--chunk_seconds", type=float, default=0.3)
  args = parser.parse_args()
  if jax.config.read("jax_disable_most_optimizations"):
    raise SystemExit(
      "jax_disable_most_optimizations is set: refusing to benchmark unoptimised code"
    )
  try:
    import torch
  except ImportError:
    raise SystemExit(
      "PyTorch is needed for this comparison: pip install torch==2.13.0 (CPU)"
    ) from None
  torch.set_num_threads(2)
  rng = np.random.default_rng(0)
  print(
    f"- Date: {time.strftime('%a %b %d %H:%M:%S UTC %Y', time.gmtime())}; jax {jax.__version__}, "
    f"torch {torch.__version__}; batch {BATCH}, float32, {args.rounds} rounds, PyTorch 2 threads.\n"
  )
  print("| setting | layer | op | JAX ms | PyTorch ms | JAX ÷ PyTorch (> 1: JAX slower) |")
  print("|---|---|---|---:|---:|---:|")
  for setting, image_shape, width in SETTINGS:
    for name, x_shape, out_channels in layers(image_shape, width):
      ops = {
        "jax": jax_ops(x_shape, out_channels, rng),
        "torch": torch_ops(x_shape, out_channels, rng),
      }
      wanted = ("fwd", "fwd+dW") if name == "conv1" else ("fwd", "fwd+dW", "fwd+dW+dx")
      for op in wanted:
        times = {"jax": [], "torch": []}
        for r in range(args.rounds):
          for fw in ("jax", "torch") if r % 2 == 0 else ("torch", "jax"):
            times[fw].append(chunk_ms(ops[fw][op], args.chunk_seconds))
        ratio = statistics.median(a / b for a, b in zip(times["jax"], times["torch"]))
        print(
          f"| {setting} | {name} {x_shape[1]}×{x_shape[2]}×{x_shape[3]}→{out_channels} | {op} | "
          f"{statistics.median(times['jax']):.1f} | {statistics.median(times['torch']):.1f} | {ratio:.2f} |",
          flush=True,
        )


if __name__ == "__main__":
  main()
