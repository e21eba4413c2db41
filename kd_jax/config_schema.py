"""The declared schema of every experiment config, checked in one pass by `validate(config)`.

`SCHEMA` declares each field that a config of `experiments/` can hold, by its dotted name:
its type, the values it allows and what it means. `validate` checks a config against it
before anything is written: `kd_jax.main` calls it as soon as the config is loaded, and
`kd_jax.train.distill.train_and_evaluate` and `kd_jax.amalgamation.pipeline.run` call it again
for library users. The first bad field raises `UsageError`, one line naming the field, its
value and what is allowed. What needs the data, the devices or a teacher (a batch larger
than the training split or not divisible over the devices, a class outside the dataset, a
block pair beyond a net's depth) is checked where those are known, still before the
workdir is claimed.

A field that a config does not hold is not checked (experiments differ); a config field
that is not declared here fails tests/test_config_schema.py, so a new field needs an entry.
The loss functions keep their own trace-time checks for users of the library.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# The allowed values live in `kd_jax.choices`, read by the code that acts on them too.
from kd_jax.choices import (
  ATTENTION_MODES,
  CONVNET_NORMS,
  DATASETS,
  DTYPES,
  LOGIT_LOSSES,
  MATMUL_PRECISIONS,
  METHODS,
  MODELS,
  NIN_HEADS,
  ON_NONFINITE,
  PREPROCESS,
  ROUTINGS,
  SELECTIONS,
)
from kd_jax.config_fields import (
  Field,
  check_class_sets,
  check_classes,
  check_not_empty,
  check_one_pair,
  check_sources_per_task,
  check_train_split,
  choice,
  flag,
  fraction,
  integer,
  parse_block_pairs,
  parse_class_sets,
  parse_feature_pairs,
  parse_teacher_workdirs,
  parse_widths,
  positive,
  text,
)
from kd_jax.errors import UsageError

MAX_SEED = 2**31 - 1  # the pipeline derives teachers' seeds as seed * 1000 + t: keep them in int64


def _stage(name: str) -> dict[str, Field]:
  """The fields every training stage of `experiments/amalgamate.py` has."""
  return {
    f"{name}.epochs": integer(f"the {name} stage's number of epochs", low=1),
    f"{name}.min_steps": integer(
      f"the fewest optimizer steps of the {name} stage (its epochs are raised "
      "to reach them; 0: epochs alone)",
      low=0,
    ),
    f"{name}.learning_rate": positive(f"the {name} stage's learning rate"),
    f"{name}.batch_size": integer(f"the {name} stage's global batch size", low=1),
    f"{name}.decay_at": fraction(
      f"the fraction of the {name} stage after which its learning rate decays"
    ),
    f"{name}.decay_factor": positive(f"the {name} stage's learning-rate decay factor"),
  }


def _amalgamation(name: str) -> dict[str, Field]:
  """The fields of an amalgamation stage (`amalgamation`, and `dual_stage`'s stage 1)."""
  return {
    **_stage(name),
    f"{name}.selection": choice(f"{name}'s per-sample teacher rule", SELECTIONS),
    f"{name}.routing": choice(
      f"{name}'s routing (one teacher per sample, or weights over them)", ROUTINGS
    ),
    f"{name}.routing_temperature": positive(f"{name}'s soft-routing temperature"),
    f"{name}.logit_loss": choice(
      f"{name}'s logit term (KL to the union target, or the paper's L2)", LOGIT_LOSSES
    ),
    f"{name}.temperature": positive(f"{name}'s softmax temperature of the KL logit term"),
    f"{name}.feature_weight": Field(f"{name}'s weight of the feature-alignment term", float, low=0),
    f"{name}.logit_weight": Field(f"{name}'s weight of the logit term", float, low=0),
    f"{name}.unit_norm_weight": Field(f"{name}'s weight of the unit-norm penalty", float, low=0),
    f"{name}.seed_compat": flag(f"whether {name} uses the seed's recipe instead of the paper's"),
    f"{name}.dtype": choice(
      f"{name}'s compute dtype of the student and alignment projections", DTYPES
    ),
    f"{name}.teacher_dtype": choice(f"{name}'s compute dtype of the frozen teachers", DTYPES),
    f"{name}.self_training": fraction(
      f"{name}'s weight of the student's own task probabilities in the routing (0: off)"
    ),
    f"{name}.self_training_start": fraction(
      f"the fraction of {name} where the self-training ramp starts"
    ),
    f"{name}.self_training_end": fraction(
      f"the fraction of {name} where the self-training ramp ends"
    ),
    f"{name}.pool_grid": integer(
      f"{name}'s pool_lda grid: each teacher block averaged over pool_grid × pool_grid "
      "cells (1: global average)",
      low=1,
      high=16,
    ),
    f"{name}.pool_balance_rounds": integer(
      f"{name}'s pool_lda refits on class-balanced pseudo-classes (0: off)", low=0, high=20
    ),
  }


def _zoo() -> dict[str, Field]:
  """The method zoo's fields, `distill.<method>.<field>` (`kd_jax.train.zoo`)."""

  def weights(method):
    return {
      f"distill.{method}.ce_weight": Field(
        f"{method}'s weight of the label cross-entropy", float, low=0
      ),
      f"distill.{method}.weight": Field(
        f"{method}'s weight of its distillation term", float, low=0
      ),
    }

  def pairs(method, check=parse_feature_pairs):
    return {
      f"distill.{method}.feature_pairs": text(
        f"{method}'s (student tap, teacher tap) feature pairs", check=check
      )
    }

  def temperature(method):
    return {f"distill.{method}.temperature": positive(f"{method}'s softmax temperature")}

  def non_negative(method, name, meaning):
    return {f"distill.{method}.{name}": Field(f"{method}'s {meaning}", float, low=0)}

  return {
    **weights("dkd"),
    **non_negative("dkd", "alpha", "weight of the target-class term (TCKD)"),
    **non_negative("dkd", "beta", "weight of the non-target-class term (NCKD)"),
    **temperature("dkd"),
    "distill.dkd.warmup_epochs": integer(
      "the epochs over which DKD's weight ramps up linearly (0: none)", low=0
    ),
    **weights("logit_standardized_kd"),
    **temperature("logit_standardized_kd"),
    **weights("dist"),
    **non_negative("dist", "beta", "weight of the inter-class relation"),
    **non_negative("dist", "gamma", "weight of the intra-class relation"),
    **temperature("dist"),
    **weights("fitnet"),
    **pairs("fitnet"),
    "distill.fitnet.hint_epochs": integer(
      "the epochs of FitNets' hint stage before KD (0: hint and labels jointly)", low=0
    ),
    **weights("attention_transfer"),
    **pairs("attention_transfer"),
    "distill.attention_transfer.p": positive("attention transfer's exponent p"),
    "distill.attention_transfer.mode": choice(
      "attention transfer's normalisation (the reference code's or the paper's)", ATTENTION_MODES
    ),
    **weights("pkt"),
    **pairs("pkt"),
    **weights("similarity_preserving"),
    **pairs("similarity_preserving"),
    **weights("rkd"),
    **pairs("rkd"),
    **non_negative("rkd", "distance_weight", "weight of the distance term"),
    **non_negative("rkd", "angle_weight", "weight of the angle term"),
    **weights("vid"),
    **pairs("vid"),
    "distill.vid.init_variance": positive("VID's initial per-channel variance"),
    **weights("crd"),
    **pairs("crd", check=check_one_pair),
    "distill.crd.embedding_dim": integer("CRD's embedding width", low=1),
    "distill.crd.num_negatives": integer("CRD's negatives per example", low=1),
    **temperature("crd"),
    "distill.crd.momentum": fraction("CRD's memory momentum"),
  }


SCHEMA: dict[str, Field] = {
  # Every experiment (kd_jax/configs.py: base_config).
  "experiment": text("the experiment's name", check=check_not_empty),
  "seed": integer("the random seed", low=0, high=MAX_SEED),
  "batch_size": integer("the global batch size", low=1),
  "num_epochs": integer("the number of training epochs", low=1),
  "steps_per_epoch": integer("the steps per epoch (0: a full pass over the training split)", low=0),
  "train_split": text("the TFDS split trained on", check=check_train_split),
  "optim.learning_rate": positive("the learning rate"),
  "optim.decay_at": fraction("the fraction of training after which the learning rate decays"),
  "optim.decay_factor": positive("the learning-rate decay factor"),
  "optim.weight_decay": Field("the AdamW weight decay (0: plain Adam)", float, low=0),
  "log_every_steps": integer("the steps between logged training metrics", low=1),
  "checkpoint_every_steps": integer("the steps between periodic checkpoints", low=1),
  "keep_checkpoints": integer("the number of checkpoints kept (the newest)", low=1),
  "eval_every_epochs": integer("the epochs between test evaluations", low=1),
  "early_stopping_patience": integer(
    "the evaluations without a better validation accuracy that stop training (0: never)", low=0
  ),
  "on_nonfinite": choice(
    "what a non-finite loss or gradient does (stop the run, or skip the update)", ON_NONFINITE
  ),
  "allow_unfinished_teacher": flag(
    "whether a teacher without results.json (an unfinished run) is used"
  ),
  "matmul_precision": choice(
    "the float32 matmul precision ('default': JAX's; 'highest': no TF32 on GPUs)", MATMUL_PRECISIONS
  ),
  # Data (kd_jax/data/defaults.py: default_data_config, kd_jax/configs.py: data_config).
  "data.name": choice("the dataset", DATASETS),
  "data.data_dir": text("the TFDS data directory ('' for TFDS's default)"),
  "data.manual_dir": text("the directory of raw data files ('' for none: download)"),
  "data.preprocess": choice("the preprocessing", PREPROCESS),
  "data.augment": flag("whether training images get pad-and-crop augmentation"),
  "data.download": flag("whether TFDS may download the dataset when no manual_dir is set"),
  "data.shuffle_buffer": integer(
    "the shuffle block size (0: a uniform permutation of the split)", low=0
  ),
  "data.validation_split": integer(
    "the last training images held out of training to choose the best epoch and stop early "
    "(0: none)",
    low=0,
  ),
  # Teachers and students (experiments/nin_teacher.py, lenet_student.py, component.py).
  "method": choice("the training method", METHODS),
  "teacher_workdir": text("the distillation teacher's workdir ('' for none)"),
  "model.name": choice("the model", MODELS),
  "model.width": positive("the width multiplier"),
  "model.head": choice(
    "the NiN head (Caffe's global-average-pool head, or the seed's fc head)", NIN_HEADS
  ),
  "model.dropout_rate": Field("the dropout rate", float, low=0, high=1, high_open=True),
  "model.relu_after_conv": flag("whether the LeNet has a ReLU after each convolution"),
  "model.block_widths": Field("the ConvNet's block widths", list, low=1),
  "model.convs_per_block": integer("the ConvNet's convolutions per block", low=1),
  "model.norm": choice("the ConvNet's normalisation", CONVNET_NORMS),
  "model.dtype": choice("the model's compute dtype (parameters stay float32)", DTYPES),
  "distill.temperature": positive("Hinton KD's softmax temperature"),
  "distill.soft_weight": fraction("Hinton KD's weight of the soft (teacher) term"),
  "distill.noise_ratio": fraction("the noisy teacher's fraction of perturbed samples"),
  "distill.noise_std": Field("the noisy teacher's noise standard deviation", float, low=0),
  "distill.teacher_dropout": flag("whether the teacher's dropout stays on while distilling"),
  "distill.cache_teacher_logits": flag(
    "whether a deterministic teacher's logits are computed once"
  ),
  "distill.teacher_dtype": choice("the frozen teacher's compute dtype", DTYPES),
  "distill.seed_compat": flag(
    "whether distillation uses the seed's formulas instead of the papers'"
  ),
  "distill.cache_budget_mb": Field(
    "the memory budget (MiB) of the cached teacher features (0: the teacher runs in the step)",
    float,
    low=0,
  ),
  **_zoo(),
  "classes": Field("the classes a component net is trained on", list, low=0, check=check_classes),
  "card_shrinkage": fraction("the teacher cards' covariance shrinkage"),
  # Amalgamation (experiments/amalgamate.py).
  "teacher_classes": text(
    "the teachers' class sets", check=lambda v: check_class_sets(parse_class_sets(v))
  ),
  "teacher_workdirs": text("the external teachers' workdirs", check=parse_teacher_workdirs),
  "teacher_blocks": text("the teachers' block widths", check=parse_widths),
  "student_blocks": text("the student's block widths", check=parse_widths),
  "source_blocks": text(
    "the dual stage's source nets' block widths", check=lambda v: v and parse_widths(v)
  ),
  "convs_per_block": integer("the convolutions per block of every amalgamation net", low=1),
  "block_pairs": text("the tapped (student block, teacher block) pairs", check=parse_block_pairs),
  "sources_per_task": Field(
    "the source nets per task of the dual stage", int, check=check_sources_per_task
  ),
  "supervised": flag("whether the student is the supervised baseline (labels on the union)"),
  **_stage("component"),
  **_amalgamation("amalgamation"),
  **_amalgamation("dual_stage"),
}


def flatten(config) -> dict[str, Any]:
  """`{dotted name: value}` of a config's leaves (ConfigDicts and dicts are descended)."""
  tree = config.to_dict() if hasattr(config, "to_dict") else config
  flat = {}

  def walk(node: Mapping, prefix: str):
    for key, value in node.items():
      if isinstance(value, Mapping):
        walk(value, f"{prefix}{key}.")
      else:
        flat[f"{prefix}{key}"] = (
          list(value) if isinstance(value, tuple) else value
        )  # as JSON has it

  walk(tree, "")
  return flat


def undeclared(config) -> list[str]:
  """The config's fields that `SCHEMA` does not declare."""
  return sorted(set(flatten(config)) - set(SCHEMA))


def validate(config) -> None:
  """Checks every declared field of `config`; raises `UsageError` on the first bad one."""
  values = flatten(config)
  for key, field in SCHEMA.items():
    if key in values:
      problem = field.problem(values[key])
      if problem is not None:
        raise UsageError(f"--config.{key}={values[key]!r}: {problem}")
  method, teacher = values.get("method"), values.get("teacher_workdir")
  if method not in (None, "ground_truth") and not teacher:
    raise UsageError(
      f"--config.method={method!r} needs a trained teacher: set --config.teacher_workdir=DIR "
      "to the workdir of an experiments/nin_teacher.py run"
    )
  for stage in ("amalgamation", "dual_stage"):
    start, end = (
      values.get(f"{stage}.self_training_start"),
      values.get(f"{stage}.self_training_end"),
    )
    if start is not None and end is not None and start > end:
      raise UsageError(
        f"--config.{stage}.self_training_start={start!r} is after --config.{stage}.self_training_end="
        f"{end!r}: the ramp must start before it ends"
      )
  if values.get("early_stopping_patience") and not values.get("data.validation_split"):
    raise UsageError(
      f"--config.early_stopping_patience={values['early_stopping_patience']!r} needs held-out "
      "images to watch: set --config.data.validation_split (e.g. 5000)"
    )
  if values.get("sources_per_task", 0) >= 2 and values.get("dual_stage.self_training"):
    raise UsageError(
      "--config.dual_stage.self_training must be 0: the dual stage's sources share their task's "
      "classes, so the student has no task of its own to prefer"
    )
