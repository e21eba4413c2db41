"""Knowledge amalgamation: expert teachers → one customised student, without labels.

  python -m kd_jax.main --config=experiments/amalgamate.py:dataset=fashion_mnist --workdir=runs/ka

Stage 1 trains a component net per class set (`teacher_classes`, with labels: each
expert knows only its own classes); stage 2 amalgamates them into a student over the
union without labels; stage 3 evaluates. See `kd_jax/amalgamation/pipeline.py`.

Arguments (`:k=v,...`):
  dataset           mnist | fashion_mnist | cifar10.
  teacher_classes   class sets, '/' between teachers, '+' within: '0+1/2+3'.
  selection         per-sample teacher rule: pool_lda (default: a linear discriminant over
                    all teachers' features fitted on the unlabelled pool, started from
                    teacher_card and refitted once on class-balanced pseudo-classes),
                    teacher_card, entropy (the paper's), max_softmax, energy.
                    docs/results.md compares them.
  routing           hard (one teacher per sample) | soft (weights over teachers).
  seed, smoke       as everywhere.
  dual_stage        the paper's dual stage: 2 source nets per task, on disjoint halves of
                    the task's data and with different widths, amalgamated by per-sample
                    entropy selection into each component, then components → target.
  seed_compat       the seed's recipe: zero-padded logits, MSE ×200, (W − 1)² regulariser.
  supervised        the baseline: the same student trained with labels on the union.
Any field can also be set with --config.KEY=VALUE (e.g. --config.teacher_blocks=32-64/16-32-64).
"""

import ml_collections

from kd_jax import configs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = configs.parse_arg(
    arg,
    allowed=dict(
      dataset="mnist",
      teacher_classes="0+1/2+3",
      selection="pool_lda",
      routing="hard",
      seed=0,
      smoke=False,
      dual_stage=False,
      seed_compat=False,
      supervised=False,
    ),
  )
  config = configs.base_config(dataset=args["dataset"], seed=args["seed"])
  config.experiment = "amalgamate"
  # Nets: VGG-style ConvNets; widths per block, '/' between nets when they differ.
  config.teacher_classes = args["teacher_classes"]
  config.teacher_workdirs = ""  # 'dir0:dir1': amalgamate already-trained component nets instead
  # Teachers twice as wide as the student: their features route better, for about twice
  # stage 1's time (docs/results.md).
  config.teacher_blocks = "64-128-256"
  config.student_blocks = "32-64-128"
  config.convs_per_block = 1
  config.block_pairs = "auto"  # or 's:t+s:t' (student block : teacher block), '/' per teacher
  config.sources_per_task = 2 if args["dual_stage"] else 0
  config.source_blocks = "32-64-128/16-32-64"  # dual stage: heterogeneous source nets
  config.card_shrinkage = 0.1

  def stage(epochs, learning_rate, batch_size=128, min_steps=0):
    # min_steps: raise the epochs of a small pool until the stage makes that many steps.
    return ml_collections.ConfigDict(
      dict(
        epochs=epochs,
        min_steps=min_steps,
        learning_rate=learning_rate,
        batch_size=batch_size,
        decay_at=0.8,
        decay_factor=0.1,
      )
    )

  # Epochs, and a floor of optimizer steps so that a small pool trains as long as a full one.
  # On a full data set's classes the epochs give more steps than the floors, which then bind
  # only for small pools (a train_split slice, the dual stage's half-data sources).
  config.component = stage(epochs=4, learning_rate=1e-3, min_steps=300)

  def amalgamation(**kw):
    cfg = stage(epochs=3, learning_rate=1e-3, min_steps=500)
    cfg.update(
      dict(
        selection=args["selection"],
        routing=args["routing"],
        routing_temperature=1.0,
        logit_loss="kl",
        temperature=2.0,
        feature_weight=1.0,
        logit_weight=1.0,
        unit_norm_weight=0.1,
        seed_compat=args["seed_compat"],
        # Compute dtypes of the student (and alignment projections) and of the frozen teachers:
        # 'bfloat16' computes in it; parameters, optimizer state and every loss stay float32.
        dtype="float32",
        teacher_dtype="float32",
        # Self-training: the student's own task probabilities join the routing, ramped in
        # between these fractions of the stage (kd_jax/amalgamation/objective.py). Off by
        # default: it did not change accuracy measurably (docs/results.md).
        self_training=0.0,
        self_training_start=0.3,
        self_training_end=0.6,
        # pool_lda reads each teacher block averaged over a pool_grid × pool_grid grid
        # (1: global average): where a feature fires helps routing (docs/results.md).
        pool_grid=2,
        # One refit of the pool router on pseudo-classes balanced to the teachers' class mix
        # (routing.fit_pool_router; ablation in docs/results.md).
        pool_balance_rounds=1,
      )
    )
    cfg.update(kw)
    return cfg

  # 2e-3: within 3 epochs the student then reaches its routed teachers' own accuracy; the
  # supervised baseline shares this schedule.
  config.amalgamation = amalgamation(learning_rate=2e-3)
  # Stage 1 of the dual stage: sources share one task; the paper picks the least
  # ambiguous source per sample (entropy), which is sound when they share classes.
  config.dual_stage = amalgamation(selection="entropy", routing="hard", self_training=0.0)
  if args["seed_compat"]:
    config.amalgamation.update(
      dict(
        logit_loss="l2",
        selection="entropy",
        routing="hard",
        feature_weight=1.0,
        logit_weight=1.0,
        unit_norm_weight=1.0,
      )
    )
  config.supervised = args["supervised"]
  if args["smoke"]:
    configs.apply_smoke(config)
    config.teacher_blocks = "8-16"
    config.student_blocks = "8-16"
    config.source_blocks = "8-16/8-8-16"
    for name in ("component", "amalgamation", "dual_stage"):
      config[name].epochs = 2
      config[name].min_steps = 0
      config[name].batch_size = 32
  # Each stage has its own epochs, batch size and optimizer: the shared fields would do
  # nothing here, so they are left out (setting one is then an error, not silently ignored).
  for key in ("num_epochs", "batch_size", "optim"):
    del config[key]
  return config
