"""What a run shows its user: metric writers, a progress bar, results.json and a plot."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from clu import metric_writers


class JsonlWriter(metric_writers.MetricWriter):
  """Appends `{"step": s, name: value, ...}` lines to `metrics.jsonl` (easy to grep and load)."""

  def __init__(self, path: str):
    self._file = open(
      path, "a", encoding="utf-8", buffering=1
    )  # line-buffered: readable while training

  def write_scalars(self, step, scalars):
    record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    self._file.write(json.dumps(strict_json(record), allow_nan=False) + "\n")

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_pointcloud(self, step, point_clouds, *, point_colors=None, configs=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


def create_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard event files and log lines (CLU's default writer) plus `metrics.jsonl`."""
  default = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if jax.process_index() > 0:
    return default
  return metric_writers.MultiWriter([default, JsonlWriter(os.path.join(workdir, "metrics.jsonl"))])


def progress_bar(*, total: int, initial: int, description: str):
  """A progress bar with step rate and ETA (on stderr; quiet on non-primary processes)."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  return tqdm(
    total=total,
    initial=initial,
    desc=description,
    unit="step",
    file=sys.stderr,
    disable=jax.process_index() > 0,
    dynamic_ncols=True,
    mininterval=1.0,
  )


@contextlib.contextmanager
def paused(progress, what: str = ""):
  """A block (an evaluation) run outside `progress`'s step rate: the bar shows `what` while it
  runs, and afterwards its rate and ETA count training steps only, not the pause."""
  clock = getattr(progress, "_time", time.time)
  shown = getattr(progress, "postfix", None)
  if what and not progress.disable:
    progress.set_postfix_str(what, refresh=True)
  start = clock()
  try:
    yield
  finally:
    if not progress.disable:  # the next rate sample starts where the pause ended
      progress.last_print_t += clock() - start
      if what:
        progress.set_postfix_str(shown or "", refresh=False)


def announce(message: str) -> None:
  """One line on stderr for a phase the user waits on (process 0; kept above a progress bar)."""
  if jax.process_index() > 0:
    return
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  tqdm.write(message, file=sys.stderr)


def write_json_atomic(path: str, payload) -> None:
  """Writes JSON through a temporary file and a rename: never a half-written file; mode 0644."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  with tempfile.NamedTemporaryFile(
    "w", dir=directory, delete=False, suffix=".tmp", encoding="utf-8"
  ) as f:
    json.dump(strict_json(payload), f, indent=2, sort_keys=True, allow_nan=False)
    f.write("\n")
    tmp = f.name
  os.chmod(tmp, 0o644)  # results are for others to read too (a temporary file is 0600)
  os.replace(tmp, path)


def load_json(path: str):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def strict_json(value):
  """`value` with NumPy scalars and arrays as Python numbers and lists, and NaN/±inf as
  None: JSON has no such numbers, and a file with bare `NaN` tokens is not JSON."""
  if isinstance(value, Mapping):
    return {k: strict_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [strict_json(v) for v in value]
  if isinstance(value, np.ndarray):
    return strict_json(value.tolist())
  if isinstance(value, np.generic):
    return strict_json(value.item())
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def truncate_jsonl(path: str, *, max_step: int) -> None:
  """Drops the rows of a metrics file logged after `max_step` (and a half-written last
  line), atomically: a resumed run logs those steps again, and each step appears once."""
  if not os.path.isfile(path):
    return
  with open(path, encoding="utf-8") as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= max_step:
        kept.append(line)
    except (ValueError, KeyError, TypeError):
      pass  # a line cut short by a kill
  if len(kept) == len(lines) and all(line.endswith("\n") for line in kept):
    return
  directory = os.path.dirname(os.path.abspath(path))
  with tempfile.NamedTemporaryFile(
    "w", dir=directory, delete=False, suffix=".tmp", encoding="utf-8"
  ) as f:
    f.writelines(line if line.endswith("\n") else line + "\n" for line in kept)
    tmp = f.name
  os.chmod(tmp, 0o644)  # as the metrics file it replaces (a temporary file is 0600)
  os.replace(tmp, path)


def read_jsonl(path: str) -> list[dict]:
  """The rows of a metrics file (none if it is missing; a line cut short by a kill skipped)."""
  if not os.path.isfile(path):
    return []
  rows = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except ValueError:
        pass
  return rows


# Per-step points are drawn with markers up to this many; more make a line.
_MARKED_STEPS = 300


def curves_figure(
  history: Sequence[Mapping[str, float]],
  *,
  panels: Mapping[str, Sequence[str]],
  title: str = "",
  step_rows: Sequence[Mapping[str, float]] = (),
  references: Mapping[str, Mapping[str, float]] | None = None,
):
  """The figure of `plot_curves`: a panel per entry of `panels` (title → epoch metrics).

  The x axis is in epochs. A metric `train_X` also gets its per-step values `train/X` from
  `step_rows` (metrics.jsonl), at `step / steps per epoch`, so that a run of a few epochs
  still shows a curve. `references` (panel title → {label: value}) adds dashed horizontal
  lines, e.g. the teacher's test accuracy. Legends sit below their panels, off the data.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  references = references or {}
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), squeeze=False)
  epochs = [h["epoch"] for h in history]
  per_epoch = next((h["step"] / h["epoch"] for h in history if h.get("epoch")), None)
  for ax, (panel, names) in zip(axes[0], panels.items()):
    for name in names:
      color = None
      steps_name = "train/" + name.removeprefix("train_") if name.startswith("train_") else None
      rows = [r for r in step_rows if steps_name and r.get(steps_name) is not None]
      if rows and per_epoch:
        (line,) = ax.plot(
          [r["step"] / per_epoch for r in rows],
          [r[steps_name] for r in rows],
          marker="." if len(rows) <= _MARKED_STEPS else None,
          markersize=3,
          linewidth=0.8,
          alpha=0.6,
          label=f"{name} (per step)",
        )
        color = line.get_color()
      values = np.asarray([h.get(name, np.nan) for h in history], float)
      if not np.all(np.isnan(values)):
        kept = ~np.isnan(values)  # epochs without evaluation have no test metrics
        # An epoch's training mean belongs to its middle; an evaluation to its end.
        shift = 0.5 if color else 0.0
        ax.plot(
          np.asarray(epochs, float)[kept] - shift,
          values[kept],
          marker="o",
          markersize=4,
          color=color,
          label=f"{name} (epoch mean)" if color else name,
        )
    styles = ["--", ":", "-.", (0, (5, 1, 1, 1))]  # several references stay told apart
    for i, (label, value) in enumerate(references.get(panel, {}).items()):
      if value is not None:
        ax.axhline(
          value, linestyle=styles[i % len(styles)], color="0.3", linewidth=1.2, label=label
        )
    ax.set_xlabel("epoch")
    ax.set_title(panel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8, frameon=False)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return fig


def plot_curves(
  path: str,
  history: Sequence[Mapping[str, float]],
  *,
  panels: Mapping[str, Sequence[str]],
  title: str = "",
  step_rows: Sequence[Mapping[str, float]] = (),
  references: Mapping[str, Mapping[str, float]] | None = None,
) -> None:
  """Saves `curves_figure(...)` as a PNG (atomically)."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig = curves_figure(
    history, panels=panels, title=title, step_rows=step_rows, references=references
  )
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=110, bbox_inches="tight")
  plt.close(fig)
  os.replace(tmp, path)


def plot_series(
  path: str, *, steps, series: Mapping[str, Sequence[float]], title: str, ylabel: str
) -> None:
  """Saves one PNG of several named curves over training steps (log-scale y)."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(6.5, 4))
  for name, values in series.items():
    ax.plot(steps, values, label=name)
  ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)
