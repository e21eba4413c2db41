"""Tests for kd_jax.ops.xla_flags: the CPU-only XLA flags the entry points set."""

import pytest

from kd_jax.ops import xla_flags

FLAG = "--xla_cpu_experimental_ynn_fusion_type"
DEFAULT = f"{FLAG}={xla_flags.CPU_FLAGS[FLAG]}"


@pytest.mark.parametrize(
  "jax_platforms, accelerator", [("cpu", False), ("cpu", True), ("", False), ("cpu,cuda", True)]
)
def test_cpu_backend_gets_the_flag_and_keeps_other_flags(jax_platforms, accelerator):
  flags = xla_flags.with_cpu_flags(
    "--xla_force_host_platform_device_count=2",
    jax_platforms=jax_platforms,
    accelerator_installed=accelerator,
  )
  assert flags.split() == ["--xla_force_host_platform_device_count=2", DEFAULT]


@pytest.mark.parametrize(
  "jax_platforms, accelerator",
  [("", True), ("cuda", False), ("cuda,cpu", False), ("tpu", True), ("rocm", True)],
)
def test_other_backends_flags_untouched(jax_platforms, accelerator):
  for user_flags in ("", "--xla_gpu_autotune_level=0"):
    assert (
      xla_flags.with_cpu_flags(
        user_flags, jax_platforms=jax_platforms, accelerator_installed=accelerator
      )
      == user_flags
    )


@pytest.mark.parametrize("user_value", ["", "-LIBRARY_FUSION_TYPE_DOT"])
def test_user_setting_wins(user_value):
  user_flags = f"--xla_cpu_use_onednn=false {FLAG}={user_value}"
  assert (
    xla_flags.with_cpu_flags(user_flags, jax_platforms="cpu", accelerator_installed=False)
    == user_flags
  )


def test_configure_cpu_edits_only_the_given_environment(monkeypatch):
  monkeypatch.setattr(xla_flags, "_accelerator_installed", lambda: False)
  environ = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_cpu_use_onednn=false"}
  xla_flags.configure_cpu(environ)
  assert environ == {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_cpu_use_onednn=false {DEFAULT}"}
  xla_flags.configure_cpu(environ)  # idempotent: the option is now the user's
  assert environ["XLA_FLAGS"] == f"--xla_cpu_use_onednn=false {DEFAULT}"
  gpu_environ = {"JAX_PLATFORMS": "cuda"}
  xla_flags.configure_cpu(gpu_environ)
  assert gpu_environ == {"JAX_PLATFORMS": "cuda"}  # no XLA_FLAGS added, not even empty
