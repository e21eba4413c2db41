"""The amalgamation study: routing rules and students, over seeds, on one dataset.

  python experiments/studies/amalgamation_study.py --workdir_root=runs/ka_study --dataset=fashion_mnist

Per seed, as `python -m kd_jax.main` subprocesses (finished runs are skipped, so re-running
resumes):
  default_s<seed>       the default pipeline (components trained with this seed, pool_lda routing);
  teacher_card_s<seed>  teacher-card routing, amalgamating the same components;
  entropy_s<seed>       the paper's entropy rule, on the same components;
  supervised_s<seed>    the baseline: the same student trained with labels on the union.
Then the routing accuracy of every rule on those teachers (experiments/studies/routing_study.py)
and a Markdown table (mean ± sample std over seeds) in WORKDIR_ROOT/study.md.

`--teachers=DIR` amalgamates already-trained components instead (`DIR/teacher_<t>`, with
`{seed}` in DIR replaced by the seed; e.g. the `teachers/` of an earlier study's default run),
so that variants of stage 2 compare on the same teachers without training them again.
`--config` adds `--config.KEY=VALUE` overrides to every amalgamated run (a variant);
`--runs` picks which of default, teacher_card, entropy, supervised to run.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNS = ("default", "teacher_card", "entropy", "supervised")


def train(root: str, name: str, args_str: str, extra: list[str], data: list[str]) -> dict | None:
  workdir = os.path.join(root, name)
  results = os.path.join(workdir, "results.json")
  if not os.path.exists(results):
    cmd = [
      sys.executable,
      "-m",
      "kd_jax.main",
      f"--config=experiments/amalgamate.py:{args_str}",
      f"--workdir={workdir}",
      *data,
      *extra,
    ]
    os.makedirs(os.path.join(root, "logs"), exist_ok=True)
    print(f"[study] {name}: {' '.join(cmd[1:])}", flush=True)
    with open(os.path.join(root, "logs", f"{name}.log"), "a", encoding="utf-8") as log:
      if subprocess.run(
        cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=False
      ).returncode:
        print(f"[study] {name} failed: see {log.name}", flush=True)
        return None
  with open(results, encoding="utf-8") as f:
    return json.load(f)


def mean_std(values) -> str:
  values = [v for v in values if v is not None]
  if not values:
    return "—"
  std = statistics.stdev(values) if len(values) > 1 else 0.0
  return f"{statistics.mean(values):.3f} ± {std:.3f}"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir_root", required=True)
  parser.add_argument("--dataset", default="fashion_mnist")
  parser.add_argument("--teacher_classes", default="0+1/2+3")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--data_dir", default="")
  parser.add_argument("--manual_dir", default="")
  parser.add_argument(
    "--teachers", default="", help="DIR with teacher_<t> subdirectories; {seed} is replaced"
  )
  parser.add_argument(
    "--config", action="append", default=[], help="KEY=VALUE for every amalgamated run"
  )
  parser.add_argument("--runs", default=",".join(RUNS))
  args = parser.parse_args()
  runs = args.runs.split(",")
  if not set(runs) <= set(RUNS):
    parser.error(f"--runs must name some of {','.join(RUNS)}")
  variant = [f"--config.{kv}" for kv in args.config]
  n_teachers = len(args.teacher_classes.split("/"))
  root = os.path.abspath(args.workdir_root)
  # The runs are subprocesses started in the repository: paths are taken from the caller's directory.
  data = [
    f"--config.data.{k}={os.path.abspath(os.path.expanduser(v))}"
    for k, v in (("data_dir", args.data_dir), ("manual_dir", args.manual_dir))
    if v
  ]
  base = f"dataset={args.dataset},teacher_classes={args.teacher_classes}"
  results = {run: [] for run in RUNS}
  for seed in (int(s) for s in args.seeds.split(",")):
    given = (
      [
        os.path.abspath(os.path.join(args.teachers.replace("{seed}", str(seed)), f"teacher_{t}"))
        for t in range(n_teachers)
      ]
      if args.teachers
      else None
    )
    default = None
    if (
      "default" in runs or not given
    ):  # the default run trains the seed's teachers when none are given
      reuse = [f"--config.teacher_workdirs={':'.join(given)}"] if given else []
      default = train(root, f"default_s{seed}", f"{base},seed={seed}", reuse + variant, data)
    results["default"].append(default)
    teachers = given or ([t["workdir"] for t in default["teachers"]] if default else None)
    for rule in ("teacher_card", "entropy"):
      if rule in runs and teachers:
        results[rule].append(
          train(
            root,
            f"{rule}_s{seed}",
            f"{base},seed={seed},selection={rule}",
            [f"--config.teacher_workdirs={':'.join(teachers)}", *variant],
            data,
          )
        )
    if "supervised" in runs:
      results["supervised"].append(
        train(root, f"supervised_s{seed}", f"{base},seed={seed},supervised", [], data)
      )

  def column(run, key):
    return [r.get(key) if r else None for r in results[run]]

  lines = [
    f"| student ({args.dataset}, classes {args.teacher_classes}) | test accuracy | routing accuracy | "
    + " | ".join(f"teacher {t} on its classes" for t in range(n_teachers))
    + " |",
    "|---|---|---|" + "---|" * n_teachers,
    f"| amalgamated, pool_lda routing (default) | {mean_std(column('default', 'test_accuracy'))} | "
    f"{mean_std(column('default', 'routing_accuracy'))} | "
    + " | ".join(mean_std(column("default", f"teacher_{t}_accuracy")) for t in range(n_teachers))
    + " |",
    *(
      f"| amalgamated, {label} routing | {mean_std(column(rule, 'test_accuracy'))} | "
      f"{mean_std(column(rule, 'routing_accuracy'))} | "
      + " | ".join("same teachers" for _ in range(n_teachers))
      + " |"
      for rule, label in (("teacher_card", "teacher-card"), ("entropy", "entropy (the paper's)"))
    ),
    f"| supervised (labels, same student) | {mean_std(column('supervised', 'test_accuracy'))} | — | "
    + " | ".join("—" for _ in range(n_teachers))
    + " |",
  ]
  default_dirs = [os.path.join(root, f"default_s{s}") for s in args.seeds.split(",")]
  routing = subprocess.run(
    [
      sys.executable,
      "experiments/studies/routing_study.py",
      *(f"--workdir={d}" for d in default_dirs if os.path.isdir(d)),
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    check=False,
  ).stdout
  table = (
    "\n".join(lines) + "\n\nRouting accuracy of every rule on the same teachers:\n\n" + routing
  )
  with open(os.path.join(root, "study.md"), "w", encoding="utf-8") as f:
    f.write(table)
  print(table)


if __name__ == "__main__":
  main()
