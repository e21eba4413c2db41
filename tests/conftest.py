"""Test-wide settings: CPU only, fast compiles, TensorFlow kept quiet and off any GPU."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

# Tiny models and few steps: compile time dominates, so trade run-time speed for it.
jax.config.update("jax_disable_most_optimizations", True)
