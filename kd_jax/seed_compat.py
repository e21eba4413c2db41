"""The seeds' own loss formulas, kept only for reproducing their numbers.

These are NOT the papers' methods (those are in `kd_jax.losses`, the default).
Each function documents how the seed departs from its paper.
They are selected by `seed_compat=True` in a config.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from kd_jax import losses


def seed_noisy_logits(key, teacher_logits, *, noise_ratio: float, noise_std: float):
  """The model-compression seed's noisy teacher: `t' = t · (m_b · g_b)`.

  One scalar `g_b ~ N(0, σ²)` per sample, masked by `m_b ~ Bernoulli(α)`, multiplies
  the logits directly instead of `(1 + ξ)` per logit, so unselected samples get
  all-zero targets (the seed's bug; the paper's version is `losses.noisy_logits`).
  """
  losses._check_unit_interval("noise_ratio", noise_ratio)
  losses._check_non_negative("noise_std", noise_std)
  t = losses._as_logits("teacher_logits", teacher_logits)
  mask_key, noise_key = jax.random.split(key)
  m = jax.random.bernoulli(mask_key, noise_ratio, (t.shape[0], 1)).astype(t.dtype)
  g = noise_std * jax.random.normal(noise_key, (t.shape[0], 1), t.dtype)
  return jax.lax.stop_gradient(t * (m * g))


def seed_kd_loss(student_logits, teacher_logits, labels, *, temperature: float, hard_weight: float):
  """The model-compression seed's "KD": sigmoid cross-entropy + L2 on tempered logits.

  `L = λ · mean(sigmoid_CE(s/τ, onehot(y))) + (1 − λ) · 1/(2B) Σ_b ‖s_b/τ − t_b/τ‖²`,
  with no `T²` factor (λ = `hard_weight`, 0.3 in the seed). Hinton et al.'s loss is
  `losses.hinton_kd`.
  """
  losses._check_positive("temperature", temperature)
  losses._check_unit_interval("hard_weight", hard_weight)
  s = losses._as_logits("student_logits", student_logits) / temperature
  t = jax.lax.stop_gradient(losses._as_logits("teacher_logits", teacher_logits)) / temperature
  targets = jax.nn.one_hot(labels, s.shape[-1], dtype=s.dtype)
  hard = jnp.mean(optax.sigmoid_binary_cross_entropy(s, targets))
  return hard_weight * hard + (1.0 - hard_weight) * losses.logit_regression(s, t)
