"""LeNet student: on labels, or distilled from a trained teacher.

  python -m kd_jax.main \
      --config=experiments/lenet_student.py:method=hinton_kd,dataset=fashion_mnist \
      --config.teacher_workdir=runs/teacher --workdir=runs/hinton_kd

Methods: ground_truth (labels only), logit_regression (Ba & Caruana
2014), noisy_teacher (Sau & Balasubramanian 2016), hinton_kd (Hinton et al. 2015), and the
zoo (`kd_jax.train.zoo`): dkd, logit_standardized_kd, dist, fitnet, attention_transfer, pkt,
similarity_preserving, rkd, vid, crd, each with its fields in `distill.<method>` (loss
weights, hyper-parameters, feature pairs `'student tap:teacher tap+...'`; docs/training.md).
`distill.seed_compat=True` switches to the seed's own formulas (`kd_jax.seed_compat`),
which differ from the papers'.

Arguments: method, dataset, seed, width (LeNet multiplier), epochs, smoke.
"""

import ml_collections

from kd_jax import configs
from kd_jax.train import zoo_defaults as zoo


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = configs.parse_arg(
    arg,
    allowed=dict(method="hinton_kd", dataset="cifar10", seed=0, width=1.0, epochs=100, smoke=False),
  )
  config = configs.base_config(dataset=args["dataset"], seed=args["seed"])
  config.experiment = "lenet_student"
  config.method = args["method"]
  config.teacher_workdir = ""
  # relu_after_conv=False is the seed's LeNet (no ReLU after its convolutions).
  config.model = ml_collections.ConfigDict(
    # dtype: 'bfloat16' computes in it (parameters and optimizer state stay float32).
    dict(name="lenet", width=args["width"], relu_after_conv=True, dropout_rate=0.0, dtype="float32")
  )
  config.distill = ml_collections.ConfigDict(
    dict(
      # Hinton et al.: soft targets at a high temperature, the hard term weighted low.
      temperature=4.0,
      soft_weight=0.9,
      # Sau & Balasubramanian: perturb half the samples, with the seed's sigma.
      noise_ratio=0.5,
      noise_std=0.1,
      # The seed keeps teacher dropout on while distilling; the papers use a fixed teacher.
      teacher_dropout=False,
      # Without teacher dropout and augmentation the teacher's logits depend on the image
      # alone: compute them once per run, not in every step (same numbers, faster steps).
      cache_teacher_logits=True,
      # The frozen teacher's compute dtype, independent of the student's ('bfloat16': faster
      # on hardware that has it; its logits are cast to float32 before the loss).
      teacher_dtype="float32",
      seed_compat=False,
    )
  )
  if args["method"] in zoo.DEFAULTS:
    # Only the chosen method's fields: the configs of the other methods stay as they were.
    config.distill[args["method"]] = ml_collections.ConfigDict(zoo.DEFAULTS[args["method"]])
    # The teacher's features are cached beside its logits when they fit this host memory.
    config.distill.cache_budget_mb = zoo.DEFAULT_CACHE_BUDGET_MB
  config.num_epochs = args["epochs"]
  if args["smoke"]:
    configs.apply_smoke(config)
    config.model.width = 0.125
  return config
