"""Evaluates a saved teacher, student or amalgamated student on the test split.

  kd-jax-evaluate --workdir=DIR [--item=teacher_0] [--data_dir=... --manual_dir=...]
  python -m kd_jax.evaluate --workdir=DIR [--item=teacher_0] [--data_dir=... --manual_dir=...]

Prints the metrics as JSON. The data comes from the run's own config unless
`--data_dir`/`--manual_dir` point elsewhere (e.g. on another machine).
"""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
from kd_jax.ops.xla_flags import configure_cpu  # noqa: E402  isort: skip

configure_cpu()  # CPU-only speed flags, before JAX starts
# isort: split

from absl import app, flags  # noqa: E402

from kd_jax import cli, distributed, logs  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "A run's workdir.")
_ITEM = flags.DEFINE_string("item", None, "Model to evaluate (default: the run's main model).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Override the run's data.data_dir.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Override the run's data.manual_dir.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Evaluation batch size.")
_JOIN_PROCESSES = cli.define_process_flags()
flags.mark_flag_as_required("workdir")


def evaluate_workdir(
  workdir: str, *, item=None, data_dir=None, manual_dir=None, batch_size=256
) -> dict:
  """Test metrics of `item` (default: the main model) of the run in `workdir`."""
  import ml_collections  # pylint: disable=g-import-not-at-top

  from kd_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from kd_jax.train import evaluation, mesh  # pylint: disable=g-import-not-at-top

  if not workdir.strip():
    raise ValueError("--workdir is empty: give the workdir of the run to evaluate")
  meta = checkpoint.read_meta(workdir)
  name = item or meta["main"]
  if name not in meta["models"]:
    raise ValueError(f"{workdir} has no model {name!r}; it has {', '.join(meta['models'])}")
  if meta.get("kind") == "amalgamation":
    from kd_jax.amalgamation import components  # pylint: disable=g-import-not-at-top

    components.verify_teacher_origins(meta)
  model, variables = checkpoint.load(workdir, item=name)
  data_config = ml_collections.ConfigDict(meta["config"]["data"])
  if data_dir:
    data_config.data_dir = data_dir
  if manual_dir:
    data_config.manual_dir = manual_dir
  devices = mesh.make_mesh()
  batch_size = max(devices.size, batch_size - batch_size % devices.size)
  classes = meta["models"][name].get("classes")
  labels, logits = evaluation.predict(
    data_config,
    "test",
    {name: evaluation.Predictor(model, variables, devices)},
    batch_size=batch_size,
    classes=classes,
  )
  return {
    "workdir": os.path.abspath(workdir),
    "model": name,
    "dataset": data_config.name,
    "classes": classes,
    "test_examples": int(len(labels)),
    "test_accuracy": evaluation.accuracy(logits[name], labels),
    "test_loss": evaluation.cross_entropy(logits[name], labels),
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  # Quiet libraries unless --verbosity (absl's flag: 0 info, 1 debug) is given.
  logs.configure(flags.FLAGS.verbosity if flags.FLAGS["verbosity"].present else None)
  with cli.one_line_errors():
    _JOIN_PROCESSES()  # before anything starts JAX's backend
    metrics = evaluate_workdir(
      _WORKDIR.value,
      item=_ITEM.value,
      data_dir=_DATA_DIR.value,
      manual_dir=_MANUAL_DIR.value,
      batch_size=_BATCH_SIZE.value,
    )
  if distributed.is_primary():
    print(json.dumps(metrics, indent=2))


def run() -> None:
  """The `kd-jax-evaluate` console script."""
  cli.run(main)


if __name__ == "__main__":
  run()
