"""The config schema: every field of every experiment is declared, every default config is
valid, and each bad value is refused in one line naming the field, its value and what is
allowed, by the library entry points too, before the workdir is touched.

The bad values are checked in-process, through `cli.one_line_errors` as `kd_jax.main` runs
them (one `error:` line, exit status 2); tests/test_bad_input.py runs a few as real commands.
"""

import math
import os
import sys

import ml_collections
import pytest

from kd_jax import cli, config_fields, config_schema
from kd_jax.config_schema import SCHEMA, UsageError, validate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import helpers  # noqa: E402  pylint: disable=g-import-not-at-top

VARIANTS = [
  ("nin_teacher", ""),
  ("nin_teacher", "smoke"),
  ("nin_teacher", "head=fc,width=0.5,dataset=mnist"),
  *[("lenet_student", f"method={m}") for m in config_schema.METHODS],
  ("lenet_student", "smoke"),
  ("component", ""),
  ("component", "smoke,classes=2+3+4"),
  ("amalgamate", ""),
  ("amalgamate", "smoke"),
  ("amalgamate", "dual_stage"),
  ("amalgamate", "seed_compat"),
  ("amalgamate", "supervised"),
  ("amalgamate", "smoke,dual_stage,seed_compat,routing=soft,selection=energy"),
]


def experiment_config(name, arg):
  config = helpers.experiment(name).get_config(arg)
  if config.get("method", "ground_truth") != "ground_truth":
    config.teacher_workdir = "runs/teacher"  # a distilled student's one required field
  return config


def internal_configs():
  """The configs the amalgamation pipeline builds for its nets and stages."""
  from kd_jax.amalgamation import components  # pylint: disable=g-import-not-at-top

  config = helpers.experiment("amalgamate").get_config("dual_stage")
  for stage in ("component", "amalgamation", "dual_stage"):
    # A floor of steps makes net_config count the data set's examples (tested with data in
    # test_amalgamation_pipeline.py); this test has none and must not reach for a download.
    config[stage].min_steps = 0
  return {
    "component_config": components.component_config(
      config, classes=[0, 1], widths=[8, 16], seed=1, split="train[0%:50%]"
    ),
    "net_config(amalgamation)": components.net_config(config, "amalgamation"),
    "net_config(dual_stage)": components.net_config(config, "dual_stage"),
  }


@pytest.mark.parametrize("name, arg", VARIANTS)
def test_every_field_is_declared_and_every_default_is_valid(name, arg):
  config = experiment_config(name, arg)
  assert config_schema.undeclared(config) == [], "declare these fields in kd_jax/config_schema.py"
  validate(config)


def test_the_pipelines_own_configs_are_declared_and_valid():
  for what, config in internal_configs().items():
    assert config_schema.undeclared(config) == [], what
    validate(config)


def test_every_declared_field_is_used_by_some_config():
  used = set()
  for name, arg in VARIANTS:
    used |= set(config_schema.flatten(experiment_config(name, arg)))
  assert sorted(set(SCHEMA) - used) == []


def test_choices_are_the_codes():
  """The code acts on the same lists the schema validates (`kd_jax.choices`), and each
  choice is one the code handles."""
  from kd_jax import data, models  # pylint: disable=g-import-not-at-top
  from kd_jax.amalgamation import objective, routing  # pylint: disable=g-import-not-at-top
  from kd_jax.models import convnet, nin  # pylint: disable=g-import-not-at-top
  from kd_jax.train import steps  # pylint: disable=g-import-not-at-top

  assert config_schema.DATASETS == data.DATASET_NAMES
  assert config_schema.METHODS == steps.METHODS
  assert config_schema.MODELS == tuple(models.MODELS)
  assert config_schema.PREPROCESS == data.PREPROCESS_CHOICES
  assert config_schema.SELECTIONS == routing.RULES
  assert config_schema.LOGIT_LOSSES == objective.LOGIT_LOSSES
  assert config_schema.NIN_HEADS == nin._HEADS  # pylint: disable=protected-access
  assert config_schema.CONVNET_NORMS == convnet._NORMS  # pylint: disable=protected-access
  distill = {"noise_ratio": 0.5, "noise_std": 0.1, "temperature": 4.0, "soft_weight": 0.9}
  from kd_jax.train import zoo  # pylint: disable=g-import-not-at-top

  for method in config_schema.METHODS:
    if zoo.is_zoo(method):  # the zoo's methods have their own step (kd_jax.train.zoo)
      assert method in zoo.DEFAULTS
      continue
    assert callable(steps.make_objective(method, ml_collections.ConfigDict(distill)))


def test_every_field_has_a_meaning_and_an_allowed_set():
  for key, field in SCHEMA.items():
    assert field.meaning and field.allowed(), key


def test_allowed_text():
  assert SCHEMA["num_epochs"].allowed() == "an integer >= 1"
  assert SCHEMA["distill.temperature"].allowed() == "a finite number > 0"
  assert SCHEMA["distill.soft_weight"].allowed() == "a finite number in [0, 1]"
  assert SCHEMA["model.dropout_rate"].allowed() == "a finite number in [0, 1)"
  assert (
    SCHEMA["method"].allowed()
    == "one of ground_truth, logit_regression, noisy_teacher, hinton_kd, dkd, logit_standardized_kd, "
    "dist, fitnet, attention_transfer, pkt, similarity_preserving, rkd, vid, crd"
  )


# ---------------------------------------------------------------------------- bad values

STUDENT = ("lenet_student", "smoke,method=hinton_kd")
TEACHER = ("nin_teacher", "smoke")
AMALGAMATE = ("amalgamate", "smoke")
COMPONENT = ("component", "smoke")

# (experiment, the field, its bad value, what the message says is allowed)
BAD_VALUES = [
  (TEACHER, "num_epochs", 0, "an integer >= 1"),
  (TEACHER, "num_epochs", -3, "an integer >= 1"),
  (TEACHER, "keep_checkpoints", 0, "an integer >= 1"),
  (TEACHER, "log_every_steps", 0, "an integer >= 1"),
  (TEACHER, "eval_every_epochs", 0, "an integer >= 1"),
  (TEACHER, "checkpoint_every_steps", 0, "an integer >= 1"),
  (TEACHER, "steps_per_epoch", -1, "an integer >= 0"),
  (TEACHER, "batch_size", 0, "an integer >= 1"),
  (TEACHER, "seed", -1, "an integer in [0, 2147483647]"),
  (TEACHER, "optim.learning_rate", 0.0, "a finite number > 0"),
  (TEACHER, "optim.learning_rate", -1e-3, "a finite number > 0"),
  (TEACHER, "optim.learning_rate", math.nan, "a finite number > 0"),
  (TEACHER, "optim.learning_rate", math.inf, "a finite number > 0"),
  (TEACHER, "optim.decay_at", 1.5, "a finite number in [0, 1]"),
  (TEACHER, "optim.decay_factor", 0.0, "a finite number > 0"),
  (TEACHER, "optim.weight_decay", -0.1, "a finite number >= 0"),
  (TEACHER, "model.width", 0.0, "a finite number > 0"),
  (TEACHER, "model.width", -0.5, "a finite number > 0"),
  (TEACHER, "model.dropout_rate", 1.0, "a finite number in [0, 1)"),
  (TEACHER, "model.head", "mlp", "one of gap, fc"),
  (TEACHER, "model.name", "resnet", "one of nin, lenet, convnet"),
  (TEACHER, "data.shuffle_buffer", -1, "an integer >= 0"),
  (TEACHER, "data.preprocess", "whiten", "one of mean_image, mean_image_255, standardize, none"),
  (TEACHER, "data.name", "svhn", "one of cifar10, mnist, fashion_mnist"),
  (TEACHER, "method", "foo", "one of ground_truth, logit_regression, noisy_teacher, hinton_kd"),
  (TEACHER, "on_nonfinite", "ignore", "one of stop, skip"),
  (TEACHER, "train_split", "test", "names the test split, which evaluation reports on"),
  (TEACHER, "train_split", "train[:50%]+test", "is not the train split or one slice of it"),
  (TEACHER, "train_split", "validation", "is not the train split or one slice of it"),
  (TEACHER, "train_split", "train[abc]", "is not a TFDS split"),
  (TEACHER, "train_split", "train[:150%]", "is not a TFDS split"),
  (STUDENT, "distill.temperature", 0.0, "a finite number > 0"),
  (STUDENT, "distill.temperature", -4.0, "a finite number > 0"),
  (STUDENT, "distill.soft_weight", 1.5, "a finite number in [0, 1]"),
  (STUDENT, "distill.soft_weight", -0.1, "a finite number in [0, 1]"),
  (STUDENT, "distill.noise_ratio", 2.0, "a finite number in [0, 1]"),
  (STUDENT, "distill.noise_std", -0.1, "a finite number >= 0"),
  (AMALGAMATE, "amalgamation.temperature", 0.0, "a finite number > 0"),
  (AMALGAMATE, "amalgamation.routing_temperature", 0.0, "a finite number > 0"),
  (AMALGAMATE, "dual_stage.temperature", -1.0, "a finite number > 0"),
  (AMALGAMATE, "amalgamation.logit_loss", "l1", "one of kl, l2"),
  (
    AMALGAMATE,
    "amalgamation.selection",
    "oracle",
    "one of entropy, max_softmax, energy, teacher_card",
  ),
  (
    AMALGAMATE,
    "dual_stage.selection",
    "oracle",
    "one of entropy, max_softmax, energy, teacher_card",
  ),
  (AMALGAMATE, "amalgamation.routing", "sometimes", "one of hard, soft"),
  (AMALGAMATE, "amalgamation.epochs", 0, "an integer >= 1"),
  (AMALGAMATE, "component.learning_rate", 0.0, "a finite number > 0"),
  (AMALGAMATE, "amalgamation.feature_weight", -1.0, "a finite number >= 0"),
  (AMALGAMATE, "teacher_classes", "0+a/2+3", "not like '0+1/2+3'"),
  (
    AMALGAMATE,
    "teacher_classes",
    "0+1/1+2",
    "teachers' class sets overlap on [1]: they must be disjoint",
  ),
  (AMALGAMATE, "teacher_classes", "0+1", "amalgamation needs at least 2 teachers, got 1"),
  (AMALGAMATE, "teacher_classes", "0+1/-2+3", "teacher 1's classes [-2] are outside 0 and up"),
  (AMALGAMATE, "teacher_blocks", "8-x", "not like '32-64-128' or '32-64/16-32-64'"),
  (AMALGAMATE, "student_blocks", "8-0", "every block width must be >= 1"),
  (AMALGAMATE, "source_blocks", "8/16-", "not like '32-64-128'"),
  (AMALGAMATE, "block_pairs", "0-0", "not 'auto' or like '0:0+2:1'"),
  (
    AMALGAMATE,
    "teacher_workdirs",
    "only_one",
    "amalgamation needs at least 2 teachers: use 'dir0:dir1'",
  ),
  (AMALGAMATE, "teacher_workdirs", "a:", "has an empty path: use 'dir0:dir1'"),
  (
    AMALGAMATE,
    "sources_per_task",
    1,
    "0 (no dual stage) or >= 2 (source nets per task) are allowed",
  ),
  (AMALGAMATE, "card_shrinkage", 1.5, "a finite number in [0, 1]"),
  (AMALGAMATE, "convs_per_block", 0, "an integer >= 1"),
  (COMPONENT, "classes", [3], "a net needs at least 2 distinct classes"),
  (COMPONENT, "classes", [1, 1, 2], "lists a class twice"),
  (COMPONENT, "model.block_widths", [8, 0], "a list of integers >= 1"),
]


def _entry_point(name):
  """What a library user calls for experiment `name` (each validates first)."""
  if name in ("amalgamate", "component"):
    from kd_jax.amalgamation import pipeline  # pylint: disable=g-import-not-at-top

    return pipeline.run
  from kd_jax.train import distill  # pylint: disable=g-import-not-at-top

  return distill.train_and_evaluate


@pytest.mark.parametrize(
  "experiment, key, value, allowed", BAD_VALUES, ids=[f"{k}={v!r}" for _, k, v, _ in BAD_VALUES]
)
def test_bad_value_is_refused_in_one_line_before_anything_is_written(
  tmp_path, capsys, experiment, key, value, allowed
):
  name, arg = experiment
  config = helpers.experiment_config(
    name,
    arg,
    manual_dir=str(tmp_path / "no_data"),
    data_dir=str(tmp_path / "tfds"),
    **({"teacher_workdir": "runs/teacher"} if name == "lenet_student" else {}),
  )
  config = helpers.override(config, **{key: value})
  workdir = tmp_path / "run"
  # As kd_jax.main runs it: the library's UsageError becomes one stderr line and exit status 2.
  with pytest.raises(SystemExit) as exit_info, cli.one_line_errors():
    _entry_point(name)(config, str(workdir))
  assert exit_info.value.code == 2
  lines = capsys.readouterr().err.splitlines()
  assert len(lines) == 1, lines
  assert lines[0].startswith(f"error: --config.{key}={value!r}: "), lines[0]
  assert allowed in lines[0], lines[0]
  assert not workdir.exists() and not (tmp_path / "tfds").exists()


@pytest.mark.parametrize(
  "key, value, allowed",
  [
    ("num_epochs", 2.5, "the number of training epochs must be an integer >= 1"),
    ("batch_size", True, "the global batch size must be an integer >= 1"),
    ("data.augment", "yes", "must be True or False"),
    ("optim.learning_rate", "1e-3", "the learning rate must be a finite number > 0"),
    ("model.block_widths", "8-16", "must be a list of integers >= 1"),
    ("teacher_blocks", 8, "the teachers' block widths must be a string"),
  ],
)
def test_wrong_types_are_refused(key, value, allowed):
  """Types that a locked ConfigDict would refuse, as a library user's plain dict holds them."""
  *path, leaf = key.split(".")
  tree = {leaf: value}
  for part in reversed(path):
    tree = {part: tree}
  with pytest.raises(UsageError, match=f"^--config.{key}={value!r}: .*{allowed}"):
    validate(tree)


def test_a_distilled_student_needs_a_teacher():
  config = helpers.experiment("lenet_student").get_config("method=noisy_teacher")
  with pytest.raises(
    UsageError,
    match=r"method='noisy_teacher' needs a trained teacher: set --config.teacher_workdir",
  ):
    validate(config)


@pytest.mark.parametrize(
  "split", ["train", "train[:6000]", "train[10%:60%]", "train[-1000:]", "train[0%:50%]"]
)
def test_train_slices_are_allowed(split):
  config_fields.check_train_split(split)


@pytest.mark.parametrize(
  "arg, message",
  [
    ("epochs=x", "config argument epochs='x' is not an integer"),
    ("width=wide", "config argument width='wide' is not a number"),
    (
      "smoke=maybe",
      "config argument smoke='maybe' is not a boolean: use smoke=true or smoke=false",
    ),
    ("depth=3", "unknown config argument 'depth'"),
  ],
)
def test_bad_config_arguments_are_named(arg, message):
  with pytest.raises(ValueError, match=message):
    helpers.experiment("nin_teacher").get_config(arg)
