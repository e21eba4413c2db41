"""The distillation study: a NiN teacher, then LeNet students by each method and seed.

  python experiments/studies/distillation_study.py --workdir_root=runs/distill

The defaults are the full-data study of docs/results.md on real Fashion-MNIST (the Debian
package's files in --manual_dir): NiN teacher at width 0.25 with the seed's fc head for 15
epochs, LeNet students at width 0.125 for 15 epochs, seeds 0, 1, 2. Once the teacher has
finished, two copies of the command with disjoint --methods can run side by side. The
label-scarce study (students see the first 6,000 training images, the teacher all 60,000) is

  python experiments/studies/distillation_study.py --workdir_root=runs/distill_6k \
      --student_width=0.25 --student_epochs=120 --student_train_split='train[:6000]' \
      --batch_size=128 --eval_every_epochs=5 --teacher_workdir=runs/distill/teacher

with the full-data study's teacher (trained there once, reused here).

Trains the teacher (experiments/nin_teacher.py) once, then one student
(experiments/lenet_student.py) per method and seed, each a `python -m kd_jax.main`
subprocess with its own workdir under --workdir_root (logs in WORKDIR_ROOT/logs/).
The ground-truth students also get the teacher, only to report their agreement with it.
Re-running the same command resumes: finished runs (with a results.json) are skipped and
interrupted ones continue from their last checkpoint. Then it writes the table of test
accuracies (mean ± sample std over seeds, at the best epoch on the held-out validation
images and at the last epoch) to
WORKDIR_ROOT/study.md and the numbers to WORKDIR_ROOT/study.json; --aggregate_only
writes them from the runs that have finished so far, training nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
from kd_jax.choices import METHODS as ALL_METHODS  # noqa: E402
from kd_jax.choices import ZOO_METHODS  # noqa: E402

METHODS = tuple(m for m in ALL_METHODS if m not in ZOO_METHODS)  # the seed's four
# The method zoo (experiments/studies/zoo_study.py runs them) is accepted by --methods too.


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--workdir_root", required=True, help="one workdir per run goes here")
  p.add_argument("--data_dir", default="", help="TFDS data_dir (prepared on first use)")
  p.add_argument("--manual_dir", default="/usr/share/datasets/fashion-mnist", help="raw IDX files")
  p.add_argument("--dataset", default="fashion_mnist")
  p.add_argument("--teacher_width", type=float, default=0.25)
  p.add_argument("--teacher_epochs", type=int, default=15)
  p.add_argument("--teacher_seed", type=int, default=0)
  p.add_argument(
    "--teacher_workdir",
    default="",
    help="the teacher's workdir (default WORKDIR_ROOT/teacher); trained there unless finished",
  )
  p.add_argument(
    "--teacher_head",
    default="fc",
    help="fc (the seed's; learns much faster at width 0.25) | gap (Caffe: cccp6, ReLU, average pool)",
  )
  p.add_argument("--student_width", type=float, default=0.125)
  p.add_argument("--student_epochs", type=int, default=15)
  p.add_argument(
    "--student_train_split",
    default="train",
    help="what the students train on, e.g. train[:6000] for the label-scarce study; "
    "the teacher always trains on the whole train split",
  )
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--batch_size", type=int, default=256, help="the students' batch")
  p.add_argument("--teacher_batch_size", type=int, default=256)
  p.add_argument("--eval_every_epochs", type=int, default=1, help="students' test evaluations")
  p.add_argument(
    "--validation_split",
    type=int,
    default=5000,
    help="the last training images held out of every run to choose its best epoch (0: none, "
    "as in the runs of docs/results.md)",
  )
  p.add_argument("--aggregate_only", action="store_true", help="write the table, train nothing")
  args = p.parse_args(argv)
  args.seeds = [int(s) for s in args.seeds.split(",") if s]
  args.methods = [m for m in args.methods.split(",") if m]
  unknown = set(args.methods) - set(METHODS) - set(ZOO_METHODS)
  if unknown:
    p.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS + ZOO_METHODS)}")
  # The runs are subprocesses started in the repository: paths are taken from the caller's directory.
  absolute = lambda path: os.path.abspath(os.path.expanduser(path)) if path else ""
  args.workdir_root, args.data_dir, args.manual_dir, args.teacher_workdir = map(
    absolute, (args.workdir_root, args.data_dir, args.manual_dir, args.teacher_workdir)
  )
  return args


def teacher_dir(args) -> str:
  return args.teacher_workdir or os.path.join(args.workdir_root, "teacher")


def student_dir(args, method: str, seed: int) -> str:
  return os.path.join(args.workdir_root, f"{method}_s{seed}")


def run(args, name: str, workdir: str, config: str, extra=()) -> bool:
  """Trains one run unless it has finished; True if its results.json exists afterwards."""
  results = os.path.join(workdir, "results.json")
  if os.path.exists(results):
    print(f"[study] {name}: done already", flush=True)
    return True
  cmd = [sys.executable, "-m", "kd_jax.main", f"--config={config}", f"--workdir={workdir}", *extra]
  if args.data_dir:
    cmd.append(f"--config.data.data_dir={args.data_dir}")
  if args.manual_dir:
    cmd.append(f"--config.data.manual_dir={args.manual_dir}")
  cmd.append(f"--config.data.validation_split={args.validation_split}")
  log = os.path.join(args.workdir_root, "logs", f"{name}.log")
  os.makedirs(os.path.dirname(log), exist_ok=True)
  print(f"[study] {name}: training ({' '.join(cmd[1:])}), log {log}", flush=True)
  start = time.time()
  with open(log, "a", encoding="utf-8") as f:
    code = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, check=False).returncode
  minutes = (time.time() - start) / 60
  if code or not os.path.exists(results):
    print(f"[study] {name}: FAILED (exit {code}) after {minutes:.1f} min; see {log}", flush=True)
    return False
  with open(results, encoding="utf-8") as f:
    acc = json.load(f)["test_accuracy"]
  print(f"[study] {name}: test accuracy {acc:.4f} in {minutes:.1f} min", flush=True)
  return True


def train_all(args) -> bool:
  common = f"dataset={args.dataset}"
  teacher = f"experiments/nin_teacher.py:{common},width={args.teacher_width},epochs={args.teacher_epochs},seed={args.teacher_seed}"
  if not run(
    args,
    "teacher",
    teacher_dir(args),
    teacher,
    [f"--config.model.head={args.teacher_head}", f"--config.batch_size={args.teacher_batch_size}"],
  ):
    return False
  ok = True
  for seed in args.seeds:  # seed-major: an early stop still leaves every method with some seeds
    for method in args.methods:
      config = (
        f"experiments/lenet_student.py:{common},method={method},width={args.student_width},"
        f"epochs={args.student_epochs},seed={seed}"
      )
      ok &= run(
        args,
        f"{method}_s{seed}",
        student_dir(args, method, seed),
        config,
        [
          f"--config.teacher_workdir={teacher_dir(args)}",
          f"--config.batch_size={args.batch_size}",
          f"--config.train_split={args.student_train_split}",
          f"--config.eval_every_epochs={args.eval_every_epochs}",
        ],
      )
  return ok


def load(workdir: str) -> dict | None:
  path = os.path.join(workdir, "results.json")
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def mean_std(values: list[float]) -> dict:
  return {
    "mean": statistics.fmean(values) if values else None,  # e.g. no run held images out
    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
    "values": values,
  }


def aggregate(args) -> tuple[dict, str]:
  teacher = load(teacher_dir(args))
  summary = {
    "settings": {k: v for k, v in vars(args).items() if k != "aggregate_only"},
    "teacher_test_accuracy": teacher["test_accuracy"] if teacher else None,
    "methods": {},
  }
  student = None
  for method in args.methods:
    runs = [r for r in (load(student_dir(args, method, s)) for s in args.seeds) if r]
    if not runs:
      continue
    student = student or runs[0]["config"]
    summary["methods"][method] = {
      "seeds": [r["seed"] for r in runs],
      # The test accuracy at the epoch chosen on the held-out validation images.
      "best_on_validation_accuracy": mean_std(
        [r["best_on_validation"]["test_accuracy"] for r in runs if r.get("best_on_validation")]
      ),
      "best_epochs": [
        r["best_on_validation"]["epoch"] for r in runs if r.get("best_on_validation")
      ],
      "last_epoch_accuracy": mean_std([r["last_epoch"]["test_accuracy"] for r in runs]),
      "teacher_agreement": mean_std(
        [r["teacher_agreement"] for r in runs if "teacher_agreement" in r]
      ),
    }
  return summary, table(summary, teacher and teacher["config"], student)


def table(summary: dict, teacher: dict | None, student: dict | None) -> str:
  """The Markdown table; the settings line is read from the runs' own configs."""
  pct = lambda s: f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}" if s["values"] else "–"
  t = summary["teacher_test_accuracy"]
  setup = []
  if teacher:
    m = teacher["model"]
    setup.append(
      f"Teacher: NiN width {m['width']}, head {m['head']}, dropout {m['dropout_rate']}, "
      f"{teacher['num_epochs']} epochs, seed {teacher['seed']}."
    )
  if student:
    d, o = student["distill"], student["optim"]
    setup.append(
      f"Students: LeNet width {student['model']['width']}, trained on {student.get('train_split', 'train')}, "
      f"{student['num_epochs']} epochs, batch "
      f"{student['batch_size']}, Adam {o['learning_rate']} ×{o['decay_factor']} at {o['decay_at']:.0%} of "
      f"training. Hinton KD: T = {d['temperature']}, soft weight {d['soft_weight']}; noisy teacher: "
      f"ratio {d['noise_ratio']}, σ {d['noise_std']}; teacher dropout while distilling: {d['teacher_dropout']}."
    )
  data = (teacher or student or {}).get("data", {}).get("name", summary["settings"]["dataset"])
  lines = [
    f"Real {data}; the teacher trained on its train split; all tested on its 10,000 test images; "
    "a shared 2-core CPU. " + " ".join(setup),
    "",
    f"Teacher test accuracy: {'–' if t is None else f'{100 * t:.2f} %'}",
    "",
    "| Student method | Seeds | Test acc. % (best epoch on validation) | Test acc. % (last epoch) | Agreement with teacher % | Best epochs |",
    "|---|---|---|---|---|---|",
  ]
  for method, m in summary["methods"].items():
    lines.append(
      f"| {method} | {len(m['seeds'])} | {pct(m['best_on_validation_accuracy'])} | {pct(m['last_epoch_accuracy'])} "
      f"| {pct(m['teacher_agreement'])} | {','.join(map(str, m['best_epochs']))} |"
    )
  lines += [
    "",
    "Mean ± sample standard deviation over seeds. The best epoch is chosen on the held-out "
    "validation images (data.validation_split), never on the test set. Agreement: fraction of test "
    "images where the student's top-1 class is the teacher's (last epoch).",
  ]
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  args = parse_args(argv)
  os.makedirs(args.workdir_root, exist_ok=True)
  ok = True if args.aggregate_only else train_all(args)
  summary, text = aggregate(args)
  with open(os.path.join(args.workdir_root, "study.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
  with open(os.path.join(args.workdir_root, "study.md"), "w", encoding="utf-8") as f:
    f.write(text)
  print(text, flush=True)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
