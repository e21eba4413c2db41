"""Trains one experiment: `kd-jax-train --config=NAME[:ARGS] --workdir=DIR`.

Also `python -m kd_jax.main`. NAME is a packaged experiment (listed when `--config` is left
out) or a config file `PATH.py`. Any config field can be overridden with `--config.KEY=VALUE`;
`--config=NAME --describe` lists the fields, their types, defaults and meanings. The config is
locked, so an unknown key is an error. Re-running the same command on a workdir resumes it.
Several processes (hosts) run it together with `--coordinator_address`, `--num_processes`
and `--process_id`, or under a cluster launcher (`kd_jax.distributed`).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
from kd_jax.ops.xla_flags import configure_cpu  # noqa: E402  isort: skip

configure_cpu()  # CPU-only speed flags, before JAX starts
# isort: split

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from kd_jax import catalog, cli, config_schema, distributed, logs, workdir  # noqa: E402
from kd_jax.errors import UsageError  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "The experiment: NAME[:ARGS] (a packaged experiment: nin_teacher, lenet_student, component, "
  "amalgamate; left out, they are listed) or a config file PATH.py[:ARGS]. Set any config field "
  "with --config.KEY=VALUE; --config=NAME --describe lists the keys.",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
_DESCRIBE = flags.DEFINE_bool(
  "describe",
  False,
  "Print the --config experiment's fields (key, type, default, meaning) and exit; trains nothing.",
)
_JOIN_PROCESSES = cli.define_process_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _DESCRIBE.value:
    with cli.one_line_errors():
      config = cli.loaded_config(_CONFIG.value)
    print(catalog.describe(config, config.get("experiment", "")))
    return
  # Quiet libraries unless --verbosity (absl's flag: 0 info, 1 debug) is given.
  logs.configure(flags.FLAGS.verbosity if flags.FLAGS["verbosity"].present else None)
  with cli.one_line_errors():
    if _WORKDIR.value is None:
      raise UsageError("--workdir is missing: give the directory for checkpoints and results")
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


def run() -> None:
  """The `kd-jax-train` console script."""
  cli.run(main, experiment=True)


if __name__ == "__main__":
  run()
