"""XLA flags that make kd_jax's steps faster on the CPU backend, set by the entry points.

XLA's CPU backend hands each convolution to YNNPACK by default; its own convolution emitter is
faster for the LeNet and NiN steps (docs/performance.md). To get the same in your own program,
set, before JAX starts a backend (before the first computation):

  XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION

or call `kd_jax.ops.xla_flags.configure_cpu()` before importing jax. This module imports
nothing of JAX, so importing it does not start a backend.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from collections.abc import MutableMapping

CPU_FLAGS = {
  "--xla_cpu_experimental_ynn_fusion_type": "-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
}


def with_cpu_flags(xla_flags: str, *, jax_platforms: str, accelerator_installed: bool) -> str:
  """`xla_flags` plus every `CPU_FLAGS` option it does not set already, when the CPU backend
  is the one JAX will use; otherwise `xla_flags` unchanged.

  The CPU is JAX's backend when `JAX_PLATFORMS` names it first, or when it is unset and no
  accelerator plugin is installed. A GPU or TPU user's flags are never touched, and an option
  the user set (to any value) is kept as is.
  """
  platforms = [p.strip() for p in jax_platforms.split(",") if p.strip()]
  on_cpu = platforms[0] == "cpu" if platforms else not accelerator_installed
  if not on_cpu:
    return xla_flags
  present = {flag.split("=", 1)[0] for flag in xla_flags.split()}
  extra = [f"{name}={value}" for name, value in CPU_FLAGS.items() if name not in present]
  return " ".join([*xla_flags.split(), *extra])


def configure_cpu(environ: MutableMapping[str, str] | None = None) -> None:
  """Adds `CPU_FLAGS` to `XLA_FLAGS` in the environment (see `with_cpu_flags`).

  Call it before JAX starts a backend: XLA reads `XLA_FLAGS` once, then.
  """
  environ = os.environ if environ is None else environ
  flags = with_cpu_flags(
    environ.get("XLA_FLAGS", ""),
    jax_platforms=environ.get("JAX_PLATFORMS", ""),
    accelerator_installed=_accelerator_installed(),
  )
  if flags:
    environ["XLA_FLAGS"] = flags


def _accelerator_installed() -> bool:
  """Whether JAX could find a GPU/TPU backend: the places its plugin discovery looks
  (the `jax_plugins` entry points and namespace package) and the TPU runtime."""
  if importlib.metadata.entry_points(group="jax_plugins"):
    return True
  return any(importlib.util.find_spec(name) is not None for name in ("jax_plugins", "libtpu"))
