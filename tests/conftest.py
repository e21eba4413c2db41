"""Test-wide settings: CPU only, fast compiles, TensorFlow kept quiet and off any GPU."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One persistent compilation cache for the session, inherited by every subprocess the tests
# start: the command-line tests run `kd_jax.main` dozens of times on the same programs, and
# a process that finds its step compiled skips the compile. Fresh per session (nothing
# carries over between runs), removed at exit.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="kd_jax_tests_jit_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402

# Tiny models and few steps: compile time dominates, so trade run-time speed for it.
jax.config.update("jax_disable_most_optimizations", True)
