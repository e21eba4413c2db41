"""Trains one experiment: `python -m kd_jax.main --config=experiments/NAME.py[:ARGS] --workdir=DIR`.

Any config field can be overridden with `--config.KEY=VALUE`; the config is locked, so
an unknown key is an error. Re-running the same command on a workdir resumes it.
Several processes (hosts) run it together with `--coordinator_address`, `--num_processes`
and `--process_id`, or under a cluster launcher (`kd_jax.distributed`).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
from kd_jax.ops.xla_flags import configure_cpu  # noqa: E402  isort: skip

configure_cpu()  # CPU-only speed flags, before JAX starts
# isort: split

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from kd_jax import cli, config_schema, distributed, workdir  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
_JOIN_PROCESSES = cli.define_process_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.INFO)
  with cli.one_line_errors():
    _JOIN_PROCESSES()  # before anything starts JAX's backend
    config = cli.loaded_config(_CONFIG.value)
    # One validation pass before any data, teacher or workdir is touched.
    config_schema.validate(config)
    workdir.check_path(_WORKDIR.value)
    from kd_jax import data  # pylint: disable=g-import-not-at-top

    distributed.primary_first(
      lambda: data.get_info(config.data), what="to find or prepare the data"
    )
    if config.experiment in ("amalgamate", "component"):
      from kd_jax.amalgamation import pipeline  # pylint: disable=g-import-not-at-top

      results = pipeline.run(config, _WORKDIR.value)
    else:
      from kd_jax.train import distill  # pylint: disable=g-import-not-at-top

      results = distill.train_and_evaluate(config, _WORKDIR.value)
  if distributed.is_primary():
    print(
      f"test_accuracy={results['test_accuracy']:.4f}  results: {os.path.join(_WORKDIR.value, 'results.json')}"
    )


if __name__ == "__main__":
  cli.run(main)
