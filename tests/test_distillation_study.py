"""experiments/studies/distillation_study.py: what it launches and how it aggregates (no training)."""

import json
import os
import statistics
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import helpers  # noqa: E402  pylint: disable=g-import-not-at-top

study = helpers.experiment("studies/distillation_study")


def test_label_scarce_study_launches_students_on_the_split_with_a_shared_teacher(
  tmp_path, monkeypatch
):
  launched = []
  monkeypatch.setattr(
    study,
    "run",
    lambda args, name, workdir, config, extra=(): (
      launched.append((name, workdir, config, list(extra))) or True
    ),
  )
  args = study.parse_args(
    [
      f"--workdir_root={tmp_path / 'root'}",
      f"--teacher_workdir={tmp_path / 'teacher'}",
      "--seeds=0,1",
      "--methods=ground_truth,hinton_kd",
      "--student_train_split=train[:6000]",
      "--batch_size=128",
    ]
  )
  assert study.train_all(args)
  names = [name for name, *_ in launched]
  assert names == ["teacher", "ground_truth_s0", "hinton_kd_s0", "ground_truth_s1", "hinton_kd_s1"]
  (_, teacher_workdir, _, teacher_extra), *students = launched
  assert teacher_workdir == str(tmp_path / "teacher")
  assert "--config.batch_size=256" in teacher_extra  # the teacher keeps its own batch
  for name, workdir, config, extra in students:
    assert workdir == str(tmp_path / "root" / name)
    assert f"seed={name[-1]}" in config
    assert {
      f"--config.teacher_workdir={tmp_path / 'teacher'}",
      "--config.batch_size=128",
      "--config.train_split=train[:6000]",
    } <= set(extra)


def test_unknown_method_is_refused(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    study.parse_args([f"--workdir_root={tmp_path}", "--methods=ground_truth,distil"])
  assert exit_info.value.code == 2
  assert "unknown methods ['distil']" in capsys.readouterr().err


def write_results(workdir, *, accuracy, best, agreement, seed):
  os.makedirs(workdir)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(
      {
        "seed": seed,
        "test_accuracy": accuracy,
        "teacher_agreement": agreement,
        "last_epoch": {"epoch": 10, "test_accuracy": accuracy},
        "best_on_validation": {"epoch": 7 + seed, "test_accuracy": best},
        "config": {},
      },
      f,
    )


def test_aggregate_takes_mean_and_sample_std_over_the_finished_seeds(tmp_path):
  args = study.parse_args([f"--workdir_root={tmp_path}", "--methods=hinton_kd,logit_regression"])
  last, best = [0.80, 0.83, 0.86], [0.81, 0.84, 0.90]
  for seed in range(3):
    write_results(
      tmp_path / f"hinton_kd_s{seed}",
      accuracy=last[seed],
      best=best[seed],
      agreement=0.9,
      seed=seed,
    )
  summary, _ = study.aggregate(args)
  assert list(summary["methods"]) == ["hinton_kd"]  # no logit_regression run has finished
  kd = summary["methods"]["hinton_kd"]
  assert kd["last_epoch_accuracy"]["mean"] == pytest.approx(statistics.fmean(last))
  assert kd["last_epoch_accuracy"]["std"] == pytest.approx(statistics.stdev(last))  # n − 1
  assert kd["best_on_validation_accuracy"]["mean"] == pytest.approx(statistics.fmean(best))
  assert kd["best_epochs"] == [7, 8, 9]
  assert summary["teacher_test_accuracy"] is None
