"""LeNet's conv + 2×2 max-pool blocks, direct against polyphase form (kd_jax.ops.conv_pool).

  python benchmarks/conv_pool.py             # LeNet's layers at widths 0.125–1.0, both shapes
  python benchmarks/conv_pool.py --rounds 15

Each block alone (whole steps, `step_time.py`, set `POLYPHASE_MAX_CHANNELS`): for each layer, the
block's forward plus its gradients (weights and bias; the input too for conv2, whose input is a
layer's output), batch 256, float32, under `jax.jit` with kd_jax's CPU XLA flags. Both forms
run in this one process, alternately, in `--rounds` rounds; each cell is the median over rounds
of a chunk's mean wall time, the ratio the median of the within-round ratios (> 1: the
polyphase form is faster).
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from conv_ops import chunk_ms, layers  # noqa: E402  (it sets kd_jax's CPU XLA flags)

from kd_jax.ops.conv_pool import ConvMaxPool  # noqa: E402

SHAPES = {"28×28×1": (28, 28, 1), "32×32×3": (32, 32, 3)}
WIDTHS = (0.125, 0.25, 0.5, 1.0)


def block_step(layer, x_shape, features, polyphase, rng):
  """A jitted forward + gradients of one block (the input's too, except for conv1's images)."""
  module = ConvMaxPool(features, polyphase=polyphase)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  params = module.init(jax.random.key(0), x)["params"]
  g = jnp.asarray(
    rng.standard_normal(jax.eval_shape(module.apply, {"params": params}, x).shape), jnp.float32
  )
  loss = lambda p, x: jnp.sum(module.apply({"params": p}, x) * g)
  step = jax.jit(jax.grad(loss, argnums=0 if layer == "conv1" else (0, 1)))
  return lambda: jax.block_until_ready(step(params, x))


def main():
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--rounds", type=int, default=9)
  parser.add_argument("--chunk_seconds", type=float, default=0.3)
  args = parser.parse_args()
  if jax.config.read("jax_disable_most_optimizations"):
    raise SystemExit(
      "jax_disable_most_optimizations is set: refusing to benchmark unoptimised code"
    )
  rng = np.random.default_rng(0)
  print(
    f"- Date: {time.strftime('%a %b %d %H:%M UTC %Y', time.gmtime())}; {os.cpu_count()} CPUs; "
    f"jax {jax.__version__}; rounds {args.rounds}"
  )
  print(
    "\n| input | width | layer | C_in → C_out | direct ms | polyphase ms | direct ÷ polyphase |"
  )
  print("|---|---:|---|---|---:|---:|---:|")
  for name, image_shape in SHAPES.items():
    for width in WIDTHS:
      for layer, x_shape, features in layers(image_shape, width):
        runs = {
          form: block_step(layer, x_shape, features, form == "polyphase", rng)
          for form in ("direct", "polyphase")
        }
        times = {form: [] for form in runs}
        for _ in range(args.rounds):
          for form, run in runs.items():
            times[form].append(chunk_ms(run, args.chunk_seconds))
        ratio = statistics.median(d / p for d, p in zip(times["direct"], times["polyphase"]))
        print(
          f"| {name} | {width} | {layer} | {x_shape[-1]} → {features} | "
          f"{statistics.median(times['direct']):.2f} | {statistics.median(times['polyphase']):.2f} | "
          f"**{ratio:.2f}** |",
          flush=True,
        )


if __name__ == "__main__":
  main()
