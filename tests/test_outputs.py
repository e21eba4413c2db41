"""What a run shows: curves.png's panels, a progress rate that excludes pauses, quiet libraries."""

import io
import os
import subprocess
import sys

import numpy as np
from tqdm import tqdm

from kd_jax import reporting
from kd_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HISTORY = [
  {"epoch": 1, "step": 10, "train_loss": 1.5, "train_accuracy": 0.5, "test_loss": 0.9,
   "test_accuracy": 0.7, "validation_loss": 1.0, "validation_accuracy": 0.65},
  {"epoch": 2, "step": 20, "train_loss": 0.5, "train_accuracy": 0.8, "test_loss": 0.6,
   "test_accuracy": 0.8, "validation_loss": 0.7, "validation_accuracy": 0.75},
]  # fmt: skip
STEPS = [{"step": s, "train/loss": 2.0 / s, "train/accuracy": 0.04 * s} for s in range(2, 21, 2)]


def lines_of(ax) -> dict:
  return {line.get_label(): line for line in ax.get_lines()}


def test_curves_separate_objective_and_test_loss_with_a_teacher_line():
  fig = reporting.curves_figure(
    HISTORY,
    panels=loop.CURVES,
    title="t",
    step_rows=STEPS,
    references={"accuracy": {"teacher (test)": 0.9}},
  )
  try:
    objective, test_loss, accuracy = fig.axes[:3]
    assert [ax.get_title() for ax in (objective, test_loss, accuracy)] == list(loop.CURVES)
    # The training objective and the test cross-entropy never share an axis.
    assert set(lines_of(objective)) == {"train_loss (per step)", "train_loss (epoch mean)"}
    assert set(lines_of(test_loss)) == {"test_loss", "validation_loss"}
    # Per-step points at step / steps-per-epoch (10 here), with markers for a short run.
    per_step = lines_of(objective)["train_loss (per step)"]
    np.testing.assert_allclose(per_step.get_xdata(), [s / 10 for s in range(2, 21, 2)])
    assert per_step.get_marker() == "."
    np.testing.assert_allclose(
      lines_of(objective)["train_loss (epoch mean)"].get_xdata(), [0.5, 1.5]
    )
    teacher = lines_of(accuracy)["teacher (test)"]
    assert teacher.get_linestyle() == "--" and set(teacher.get_ydata()) == {0.9}
    assert "test_accuracy" in lines_of(accuracy) and "validation_accuracy" in lines_of(accuracy)
    # Legends sit below their panels: off the data.
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes[:3]:
      legend = ax.get_legend().get_window_extent(renderer)
      assert legend.y1 < ax.get_window_extent(renderer).y0, ax.get_title()
  finally:
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

    plt.close(fig)


def test_curves_of_a_run_without_per_step_rows_or_validation(tmp_path):
  history = [{k: v for k, v in h.items() if not k.startswith("validation")} for h in HISTORY]
  fig = reporting.curves_figure(history, panels=loop.CURVES)
  assert set(lines_of(fig.axes[0])) == {"train_loss"}
  assert set(lines_of(fig.axes[1])) == {"test_loss"}
  path = str(tmp_path / "curves.png")
  reporting.plot_curves(path, history, panels=loop.CURVES)
  assert os.path.getsize(path) > 1000


def test_a_pause_is_not_counted_in_the_step_rate():
  clock = [0.0]

  def bar():
    b = tqdm(total=100, file=io.StringIO(), mininterval=0, miniters=1)
    b._time = lambda: clock[0]  # pylint: disable=protected-access
    b.start_t = b.last_print_t = clock[0]
    return b

  for pause in (False, True):
    progress = bar()
    for _ in range(10):
      clock[0] += 1.0
      progress.update(1)
    if pause:
      with reporting.paused(progress, "evaluating"):
        assert progress.postfix == "evaluating"
        clock[0] += 100.0  # an evaluation
    else:
      clock[0] += 100.0
    for _ in range(3):
      clock[0] += 1.0
      progress.update(1)
    rate = progress.format_dict["rate"]
    progress.close()
    if pause:
      assert rate == 1.0 and progress.postfix == ""  # one step a second: an honest ETA
    else:
      assert rate < 0.5  # what the bar showed before


def test_tensorflow_start_up_notes_are_dropped():
  script = "from kd_jax import logs; logs.configure(); import tensorflow as tf; print(tf.__name__)"
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  done = subprocess.run(
    [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
  )
  assert done.returncode == 0 and done.stdout.strip() == "tensorflow", done.stderr
  assert "oneDNN" not in done.stderr and "InitializeLog" not in done.stderr, done.stderr
