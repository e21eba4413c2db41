"""kd_jax: knowledge distillation and knowledge amalgamation in JAX/Flax."""
