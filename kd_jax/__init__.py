"""kd_jax: knowledge distillation and knowledge amalgamation in JAX/Flax."""

# The one place the version is written: pyproject.toml reads it (dynamic version).
__version__ = "0.2.0"
