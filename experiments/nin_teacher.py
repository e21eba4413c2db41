"""Network-in-Network teacher trained with labels (the distillation seed's teacher).

  python -m kd_jax.main --config=experiments/nin_teacher.py:dataset=fashion_mnist,width=0.25 \
      --workdir=runs/teacher

Arguments: dataset (cifar10 | mnist | fashion_mnist), seed, width (multiplier on every
NiN width; 1.0 is the Caffe cifar10_nin), head (gap: Caffe's cccp6 → ReLU → global
average pool; fc: the seed's flatten → fc → fc; default gap, fc under smoke, where the
Caffe head learns too slowly to leave chance in two short epochs), epochs, smoke.
"""

import ml_collections

from kd_jax import configs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = configs.parse_arg(
    arg, allowed=dict(dataset="cifar10", seed=0, width=1.0, head="", epochs=100, smoke=False)
  )
  head = args["head"] or ("fc" if args["smoke"] else "gap")
  config = configs.base_config(dataset=args["dataset"], seed=args["seed"])
  config.experiment = "nin_teacher"
  config.method = "ground_truth"
  config.teacher_workdir = ""
  config.model = ml_collections.ConfigDict(
    # dtype: 'bfloat16' computes in it (parameters and optimizer state stay float32).
    dict(name="nin", width=args["width"], head=head, dropout_rate=0.5, dtype="float32")
  )
  config.num_epochs = args["epochs"]
  if args["smoke"]:
    configs.apply_smoke(config)
    config.model.width = 0.05
  return config
