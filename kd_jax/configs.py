"""Shared pieces of the experiment configs in `experiments/`.

An experiment file defines `get_config(arg: str | None)`; `arg` is what follows the
colon in `--config=experiments/NAME.py:ARGS`, a comma-separated list of `key=value`
pairs and bare flags (e.g. `method=hinton_kd,dataset=fashion_mnist,smoke`).
"""

from __future__ import annotations

import os

import ml_collections

from kd_jax.config_schema import DATASETS

# Where the Debian package dataset-fashion-mnist puts real Fashion-MNIST IDX files.
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


_BOOLEANS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def parse_arg(arg: str | None, *, allowed: dict[str, object]) -> dict[str, object]:
  """Parses `k=v,flag` into a dict, typed like `allowed`'s defaults; unknown keys raise."""
  values = dict(allowed)
  for part in filter(None, (arg or "").split(",")):
    key, sep, raw = part.partition("=")
    key = key.strip()
    if key not in allowed:
      raise ValueError(
        f"unknown config argument {key!r}; this experiment takes {', '.join(sorted(allowed))}"
      )
    default = allowed[key]
    if not sep:
      if not isinstance(default, bool):
        raise ValueError(f"config argument {key!r} needs a value: {key}=...")
      values[key] = True
    elif isinstance(default, bool):
      if raw.lower() not in _BOOLEANS:
        raise ValueError(
          f"config argument {key}={raw!r} is not a boolean: use {key}=true or {key}=false"
        )
      values[key] = _BOOLEANS[raw.lower()]
    elif isinstance(default, (int, float)):
      try:
        values[key] = type(default)(raw)
      except ValueError:
        kind = "an integer" if isinstance(default, int) else "a number"
        raise ValueError(f"config argument {key}={raw!r} is not {kind}") from None
    else:
      values[key] = raw
  return values


def data_config(name: str) -> ml_collections.ConfigDict:
  """The `config.data` block: which dataset, where it is, how it is preprocessed."""
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
  from kd_jax.data import default_data_config  # pylint: disable=g-import-not-at-top

  data = default_data_config(name)
  if name == "fashion_mnist" and os.path.isdir(DEBIAN_FASHION_MNIST):
    data.manual_dir = DEBIAN_FASHION_MNIST  # real data on machines with the Debian package
  # Both seeds subtract the per-pixel mean image of the training set; no augmentation.
  data.preprocess = "mean_image"
  data.augment = False
  return data


def base_config(*, dataset: str, seed: int) -> ml_collections.ConfigDict:
  """Fields every experiment has; experiment files fill in the rest."""
  config = ml_collections.ConfigDict()
  config.seed = seed
  config.data = data_config(dataset)
  config.batch_size = 256
  config.num_epochs = 100
  config.steps_per_epoch = 0  # 0: a full pass over the training split.
  # The TFDS split trained on, e.g. 'train[:6000]' for a label-scarce run; preprocessing
  # statistics still come from the whole train split.
  config.train_split = "train"
  config.optim = ml_collections.ConfigDict(
    dict(learning_rate=1e-3, decay_at=0.8, decay_factor=0.1, weight_decay=0.0)
  )
  config.log_every_steps = 50
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 3
  config.eval_every_epochs = 1
  # Held-out images choose the best epoch (never the test set); P evaluations in a row
  # without a better validation accuracy stop the run (0: never). kd_jax/train/selection.py.
  config.data.validation_split = 5000  # the last 5,000 training images of every data set
  config.early_stopping_patience = 0
  config.on_nonfinite = (
    "stop"  # a non-finite loss or gradient: 'stop' the run, or 'skip' the update and count it
  )
  # A teacher must be a finished run (its results.json written); True distils from the
  # latest checkpoint of an unfinished one.
  config.allow_unfinished_teacher = False
  # 'default' leaves JAX's matmul precision alone; 'highest' reproduces papers' float32 numbers
  # on GPUs whose default float32 matmuls use TF32 (Ampere and later).
  config.matmul_precision = "default"
  return config


def apply_smoke(config: ml_collections.ConfigDict) -> None:
  """Two short epochs on a small batch: the whole pipeline end to end, a quick check on a CPU
  that still learns well above chance (README: what smoke is for). Nothing is held out, so
  that a tiny data set (the tests') still fills its batches."""
  config.batch_size = 32
  config.num_epochs = 2
  config.steps_per_epoch = 60
  config.data.validation_split = 0
  config.log_every_steps = 4
  config.checkpoint_every_steps = 8
