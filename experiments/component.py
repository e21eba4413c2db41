"""One component (teacher) net of amalgamation, trained with labels on its own classes.

  python -m kd_jax.main --config=experiments/component.py:classes=0+1,dataset=fashion_mnist \
      --workdir=runs/teacher_01

Its final checkpoint also holds its teacher card (class means and shared covariance of
its penultimate features on its own training data), used for routing. Use it in
`experiments/amalgamate.py` with `--config.teacher_workdirs=runs/teacher_01:runs/teacher_23`.
"""

import ml_collections

from kd_jax import configs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = configs.parse_arg(
    arg,
    allowed=dict(
      dataset="mnist", classes="0+1", blocks="64-128-256", seed=0, epochs=4, smoke=False
    ),
  )
  config = configs.base_config(dataset=args["dataset"], seed=args["seed"])
  config.experiment = "component"
  config.method = "ground_truth"
  config.teacher_workdir = ""
  try:
    config.classes = [int(c) for c in args["classes"].split("+")]
  except ValueError:
    raise ValueError(f"classes={args['classes']!r} is not like 0+1") from None
  config.card_shrinkage = 0.1
  config.batch_size = 128
  config.num_epochs = args["epochs"]
  config.model = ml_collections.ConfigDict(
    dict(
      name="convnet",
      block_widths=[int(w) for w in args["blocks"].split("-")],
      convs_per_block=1,
      norm="batch",
      dtype="float32",
    )
  )
  if args["smoke"]:
    configs.apply_smoke(config)
    config.model.block_widths = [8, 16]
  return config
