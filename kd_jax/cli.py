"""Command-line plumbing shared by `kd_jax.main` and `kd_jax.evaluate`.

Bad input (unknown method, missing teacher, wrong data directory, a bad flag, ...) is
reported as one line on stderr with exit status 2, not as a traceback; a run stopped by a
fault as one line with its own status (`kd_jax.errors`).
"""

import ast
import contextlib
import functools
import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging

from kd_jax import catalog, errors


@contextlib.contextmanager
def one_line_errors():
  """A `KdJaxError` → one line `<label>: <message>` and its exit status (`kd_jax.errors`);
  any other `ValueError` is bad input too (e.g. a loss's hyper-parameter): `error:`, 2.
  Ctrl-C before training: one line, 130."""
  try:
    yield
  except errors.KdJaxError as e:
    print(f"{e.label}: {e}", file=sys.stderr)
    sys.exit(e.exit_status)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(errors.UsageError.exit_status)
  except KeyboardInterrupt:
    print(
      "interrupted: SIGINT before training started; nothing to save: run the same command again",
      file=sys.stderr,
    )
    sys.exit(130)


class _QuietLibraries(logging.Filter):
  """Drops the chatter of Orbax and TFDS (every save and read); keeps their errors."""

  NOISY = ("/orbax/", "/tensorflow_datasets/", "/jax/_src/", "/ml_collections/")

  def filter(self, record: logging.LogRecord) -> bool:
    if record.name == "asyncio" and record.getMessage().startswith(
      "Task exception was never retrieved"
    ):
      return (
        False  # Orbax's other parallel reads of a damaged checkpoint (see _quiet_abandoned_reads)
      )
    return record.levelno >= logging.ERROR or not any(p in record.pathname for p in self.NOISY)


def _one_line(message: str) -> str:
  """The gist of a flag-parsing error message in one line.

  A config file that raises (e.g. `:dataset=foo`) reaches us as a flags error holding a
  whole traceback: keep its last line, the exception, without the exception's type name.
  """
  lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
  if not lines:
    return "bad command-line arguments"
  if any(line.startswith("Traceback") for line in lines):
    last = lines[-1]
    name, sep, rest = last.partition(": ")
    return rest if sep and name.isidentifier() and name.endswith(("Error", "Exception")) else last
  return " ".join(lines)


def _unknown_config_field(error: Exception, argv) -> str:
  """'--config.model.foo: no config field 'foo' (Did you mean ...?)' from ml_collections' error."""
  detail = error
  while isinstance(detail, BaseException) and detail.args:  # AttributeError(KeyError(str))
    detail = detail.args[0]
  lines = str(detail).strip().splitlines() or [""]
  key = lines[0].strip("\"' ")
  hint = " ".join(line.strip() for line in lines[1:])
  overrides = [arg[2:].split("=", 1)[0] for arg in argv[1:] if arg.startswith("--config.")]
  culprits = [o for o in overrides if o.split(".")[-1] == key] or overrides
  return f"--{' --'.join(culprits)}: the config has no field {key!r}" + (
    f" ({hint})" if hint else ""
  )


def _config_file(argv) -> str | None:
  """The file of `--config=PATH[:ARGS]` (or `--config PATH`) in `argv`, or None."""
  for i, arg in enumerate(argv[1:], start=1):
    if arg == "--":
      break
    if arg.startswith("--config="):
      return arg[len("--config=") :].split(":", 1)[0]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1].split(":", 1)[0]
  return None


def config_file_problem(path: str) -> str | None:
  """Why `path` cannot be a config file (missing, unreadable, not Python, no `get_config`),
  or None. ml_collections reports these only on first use, as tracebacks, or garbled."""
  if not path:
    return "--config is empty: give an experiment's config file, e.g. --config=experiments/nin_teacher.py"
  shown = f"--config={path}"
  if not os.path.exists(path):
    known = ", ".join(catalog.names())
    return f"{shown}: no such file" + (f"; the packaged experiments are {known}" if known else "")
  if os.path.isdir(path):
    return f"{shown} is a directory, not a config file"
  try:
    with open(path, "rb") as f:
      tree = ast.parse(f.read(), filename=path)
  except OSError as e:
    return f"{shown}: cannot read it ({e.strerror})"
  except SyntaxError as e:
    return f"{shown} is not valid Python: {e.msg} (line {e.lineno})"
  except ValueError as e:  # e.g. null bytes: not a text file
    return f"{shown} is not valid Python: {e}"
  defines = any(
    (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "get_config")
    or (isinstance(node, ast.Name) and node.id == "get_config" and isinstance(node.ctx, ast.Store))
    or (isinstance(node, ast.alias) and "get_config" in (node.name, node.asname, "*"))
    for node in ast.walk(tree)
  )
  if not defines:
    return f"{shown} defines no get_config(arg=None) returning an ml_collections.ConfigDict"
  return None


def loaded_config(config):
  """The `--config` flag's value, or a one-line `ValueError` if its file did not load."""
  import ml_collections  # pylint: disable=g-import-not-at-top

  try:
    config.get("experiment")
  except OSError as e:  # ml_collections reports an unloadable config file only on first use
    raise ValueError(f"cannot load --config: {str(e).strip().splitlines()[-1].strip()}") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ValueError(
      f"--config: get_config() returned {type(config).__name__}, not an ml_collections.ConfigDict"
    )
  return config


def _with_packaged_config(argv) -> list[str]:
  """`argv` with `--config=NAME[:ARGS]` naming a packaged experiment's file (`catalog.resolve`)."""
  argv = list(argv)
  for i, arg in enumerate(argv[1:], start=1):
    if arg == "--":
      break
    if arg.startswith("--config="):
      argv[i] = "--config=" + catalog.resolve(arg[len("--config=") :])
    elif arg == "--config" and i + 1 < len(argv):
      argv[i + 1] = catalog.resolve(argv[i + 1])
  return argv


_HELP = ("--help", "-h", "--helpshort", "--helpfull", "--helpxml", "-?")


def _no_experiment(argv) -> None:
  """Without `--config`: the experiments, one line on how to choose, exit status 2."""
  program = os.path.basename(argv[0]) if argv else "kd-jax-train"
  if program in ("main.py", "__main__.py"):
    program = "python -m kd_jax.main"
  print(f"The experiments:\n{catalog.listing()}", file=sys.stderr)
  print(
    f"error: no --config: choose an experiment, e.g. {program} "
    "--config=nin_teacher:dataset=fashion_mnist,smoke --workdir=runs/teacher "
    "(--config=NAME --describe lists its fields)",
    file=sys.stderr,
  )
  sys.exit(2)


def _parse_flags(argv, *, experiment: bool = False):
  """absl's flag parsing, each failure reported as one `error: ...` line (exit status 2).

  `experiment`: the command trains an experiment (`--config`): without one, list them.
  """
  argv = _with_packaged_config(argv)
  config_file = _config_file(argv)
  if experiment and config_file is None and not any(a.split("=")[0] in _HELP for a in argv[1:]):
    _no_experiment(argv)
  message = config_file_problem(config_file) if config_file is not None else None
  if message is None:
    try:
      return flags.FLAGS(argv)
    except SystemExit as e:  # absl exits 1 after printing --help: asked for, it succeeded
      if e.code == 1 and any(a.split("=")[0] in _HELP for a in argv[1:]):
        sys.exit(0)
      raise
    except flags.Error as e:
      message = _one_line(str(e))
      if "--config must have a value other than None" in message:
        message = (
          f"--config={config_file}: get_config() returned None, not an ml_collections.ConfigDict"
        )
    except (AttributeError, KeyError) as e:  # ml_collections: --config.KEY with an unknown KEY
      message = _unknown_config_field(e, argv)
      if "<class 'NoneType'>" in message:  # --config.KEY on a get_config() that returned None
        message = (
          f"--config={config_file}: get_config() returned None, not an ml_collections.ConfigDict"
        )
    except Exception as e:  # pylint: disable=broad-except  (the config file raised while loading)
      message = f"--config={config_file}: loading it raised {type(e).__name__}: {_one_line(str(e))}"
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _quiet_abandoned_reads(unraisable, default=sys.unraisablehook) -> None:
  """Drops 'Event loop is closed' from Orbax's parallel reads that finish after a restore
  already failed on a damaged checkpoint (kd_jax.checkpoint reports that in one line)."""
  if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(
    unraisable.exc_value
  ):
    return
  default(unraisable)


def define_process_flags():
  """Defines the multi-process flags of an entry point; returns `join()`, which joins the job
  they describe (`kd_jax.distributed.initialize`; call it before anything starts JAX)."""
  coordinator = flags.DEFINE_string(
    "coordinator_address",
    None,
    "HOST:PORT of process 0 (multi-process runs; default: $JAX_COORDINATOR_ADDRESS or the "
    "cluster launcher's).",
  )
  num_processes = flags.DEFINE_integer("num_processes", None, "Processes of a multi-process run.")
  process_id = flags.DEFINE_integer(
    "process_id", None, "This process's index in [0, num_processes)."
  )

  def join() -> None:
    from kd_jax import distributed  # pylint: disable=g-import-not-at-top

    distributed.initialize(coordinator.value, num_processes.value, process_id.value)

  return join


def run(main, *, experiment: bool = False) -> None:
  """`app.run(main)` with quiet libraries and one-line errors for bad flags and config arguments.

  `experiment`: `main` trains the experiment of `--config` (see `_parse_flags`).
  """
  absl_logging.get_absl_handler().addFilter(_QuietLibraries())
  sys.unraisablehook = _quiet_abandoned_reads
  if main.__module__ != "__main__":  # a console script: its --help shows __main__'s doc and flags
    for flag in flags.FLAGS.get_key_flags_for_module(main.__module__):
      flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    sys.modules["__main__"].__doc__ = sys.modules[main.__module__].__doc__
  try:
    app.run(main, flags_parser=functools.partial(_parse_flags, experiment=experiment))
  except ValueError as e:  # raised while parsing --config (e.g. a bad config argument)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
