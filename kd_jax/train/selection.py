"""Honest model selection: held-out validation images, the best epoch on them, early stopping.

`config.data.validation_split = N` holds the last N images of the TFDS train split out of
training: no net, teacher card, pool router or cached teacher logits reads them, and every
evaluation also scores them. The best epoch is chosen on them, never on the test set; with
`config.early_stopping_patience = P`, P evaluations in a row without a better validation
accuracy stop the run. Preprocessing statistics still come from the whole train split: they
read no labels and every net of an experiment must see the same input for the same image.

Label-free training (amalgamation) uses the held-out labels only to choose and stop, as any
validation set is used; its training never reads them.
"""

from __future__ import annotations

from kd_jax import data
from kd_jax.errors import UsageError

# The record keys that describe one evaluated epoch in results.json.
_EPOCH_KEYS = ("epoch", "step")
_EPOCH_PREFIXES = ("test_", "validation_")


def held_out(config) -> int:
  """The number of training images held out for validation (0: none)."""
  return int(config.data.get("validation_split", 0) or 0)


def _train_size(data_config) -> int:
  return data.num_batches(data_config, "train", batch_size=1, train=False)


def _bounds(split: str, size: int) -> tuple[int, int]:
  """`[start, stop)` of a slice of the train split, in images."""
  from tensorflow_datasets.core import splits  # pylint: disable=g-import-not-at-top

  train = {"train": splits.SplitInfo(name="train", shard_lengths=[size], num_bytes=0)}
  (bounds,) = splits.ReadInstruction.from_spec(split).to_absolute(train)
  return bounds.from_ or 0, size if bounds.to is None else bounds.to


def training_split(config, split: str | None = None) -> str:
  """What a net trains on: `split` (default `config.train_split`) without the held-out images.

  Unchanged when nothing is held out; else `train[start:stop]`, cut before the held-out
  tail. Applying it twice gives the same split.

  Raises:
    UsageError: the held-out images are the whole train split, or cover all of `split`.
  """
  split = split or config.train_split
  n = held_out(config)
  if not n:
    return split
  size = _train_size(config.data)
  if n >= size:
    raise UsageError(
      f"--config.data.validation_split={n} holds out all {size} training images of "
      f"{config.data.name}: hold out fewer"
    )
  start, stop = _bounds(split, size)
  stop = min(stop, size - n)
  if stop <= start:
    raise UsageError(
      f"train_split={split!r} lies inside the {n} held-out validation images (the last of "
      f"the {size} training images): train on an earlier slice, or hold out fewer with "
      "--config.data.validation_split"
    )
  return f"train[{start}:{stop}]"


def validation_split(config) -> str | None:
  """The held-out images as a TFDS split (`train[size-N:]`), or None when none are."""
  n = held_out(config)
  if not n:
    return None
  size = _train_size(config.data)
  if n >= size:
    training_split(config)  # raises the one-line error
  return f"train[{size - n}:]"


def validation_examples(config, classes=None) -> int:
  """How many held-out images the validation scores (of `classes`, when given)."""
  split = validation_split(config)
  if split is None:
    return 0
  return data.num_batches(config.data, split, batch_size=1, train=False, classes=classes)


def plateaued(history, patience: int) -> bool:
  """Whether the last `patience` evaluations did not beat the best validation accuracy
  before them (0: never). A pure function of the history, so a resumed run that had
  stopped stops again at once."""
  if patience <= 0:
    return False
  scores = [h["validation_accuracy"] for h in history if h.get("validation_accuracy") is not None]
  if not scores:
    return False
  best = scores.index(max(scores))  # the first best: a tie is no improvement
  return len(scores) - 1 - best >= patience


def _entry(record: dict) -> dict:
  return {k: v for k, v in record.items() if k in _EPOCH_KEYS or k.startswith(_EPOCH_PREFIXES)}


def epoch_summary(history, patience: int = 0) -> dict:
  """`last_epoch` (the final evaluation), `best_on_validation` (the evaluation with the
  highest validation accuracy, first of ties; None without validation images) and
  `stopped_early`: each epoch entry holds its epoch, step, test and validation metrics."""
  evaluated = [h for h in history if "test_accuracy" in h]
  validated = [h for h in evaluated if h.get("validation_accuracy") is not None]
  best = max(validated, key=lambda h: h["validation_accuracy"]) if validated else None
  return {
    "last_epoch": _entry(evaluated[-1]) if evaluated else None,
    "best_on_validation": _entry(best) if best else None,
    "stopped_early": plateaued(history, patience),
  }


def core_results(
  config, *, steps: int, test_accuracy: float, test_examples: int, history, classes=None
) -> dict:
  """The keys every results.json has, distillation's and amalgamation's alike.

  `test_accuracy` is the final model's (what its checkpoint holds); `last_epoch` and
  `best_on_validation` (see `epoch_summary`) say what each evaluation scored.
  """
  return {
    "experiment": config.get("experiment", ""),
    "dataset": config.data.name,
    "seed": config.seed,
    "steps": int(steps),
    "test_accuracy": test_accuracy,
    "test_examples": int(test_examples),
    "validation_examples": validation_examples(config, classes),
    **epoch_summary(history, config.get("early_stopping_patience", 0)),
    "history": history,
    "config": config.to_dict(),
  }
