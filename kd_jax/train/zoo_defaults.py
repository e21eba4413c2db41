"""The method zoo's config defaults (`distill.<method>.*`), free of JAX: configs import them."""

from __future__ import annotations

from typing import Any

# Defaults: the papers' (as the reference code named in docs/losses.md uses them). Weights:
# RepDistiller's CIFAR-100 commands (FitNets 100, AT 1000, SP 3000, PKT 30000, RKD 1, VID 1,
# CRD 0.8), mdistiller's DKD config (warm-up 20 epochs), the LS-KD authors' KD recipe
# (CE 0.1, KD 9, base temperature 2), DIST's ImageNet recipe (all 1).
DEFAULTS: dict[str, dict[str, Any]] = {
  "dkd": dict(ce_weight=1.0, weight=1.0, alpha=1.0, beta=8.0, temperature=4.0, warmup_epochs=20),
  "logit_standardized_kd": dict(ce_weight=0.1, weight=9.0, temperature=2.0),
  "dist": dict(ce_weight=1.0, weight=1.0, beta=1.0, gamma=1.0, temperature=1.0),
  "fitnet": dict(ce_weight=1.0, weight=100.0, feature_pairs="block1:stage2", hint_epochs=0),
  "attention_transfer": dict(
    ce_weight=1.0, weight=1000.0, feature_pairs="block1:stage1+block2:stage2", p=2.0, mode="code"
  ),
  "pkt": dict(ce_weight=1.0, weight=30000.0, feature_pairs="embedding:embedding"),
  "similarity_preserving": dict(ce_weight=1.0, weight=3000.0, feature_pairs="block2:stage3"),
  "rkd": dict(
    ce_weight=1.0,
    weight=1.0,
    feature_pairs="embedding:embedding",
    distance_weight=25.0,
    angle_weight=50.0,
  ),
  "vid": dict(
    ce_weight=1.0, weight=1.0, feature_pairs="block1:stage1+block2:stage2", init_variance=5.0
  ),
  "crd": dict(
    ce_weight=1.0,
    weight=0.8,
    feature_pairs="embedding:embedding",
    embedding_dim=128,
    num_negatives=16384,
    temperature=0.07,
    momentum=0.5,
  ),
}
# The host memory the teacher's cached features may take (MiB; `distill.cache_budget_mb`).
DEFAULT_CACHE_BUDGET_MB = 2048.0
