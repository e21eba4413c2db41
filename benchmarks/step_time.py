#!/usr/bin/env python
"""Step-time benchmarks: the distillation and amalgamation train steps, on the CPU.

  python benchmarks/step_time.py > /tmp/step_time.md          # the study recipe, all benchmarks
  python benchmarks/step_time.py --recipe=seed --json s.json  # the seed's full-width CIFAR recipe

Prints Markdown (machine, versions, a table of ms/step, a table of ratios, issue 12's targets)
to stdout and progress to stderr. Every benchmark runs in its own worker process, built exactly
as training builds its step (`kd_jax.train.steps`, `kd_jax.amalgamation.step`, compiled by
`kd_jax.train.mesh.data_parallel_step`, hyper-parameters read from the experiment configs), with
the XLA flags the entry points set (`kd_jax.ops.xla_flags.configure_cpu`). After compilation and
warm-up the workers are timed in rounds, one chunk of steps (about `--chunk_seconds`) per worker
per round, in a rotated order, so that every benchmark sees the same background load; a ratio
is computed within each round and its median over rounds reported. Each step is timed alone
(`jax.block_until_ready`); a chunk's value is the median of its steps, the table's the median
over rounds, with the interquartile range as the spread.

Recipes (`--recipe`) set the distillation benchmarks' shapes, read from
`experiments/nin_teacher.py` and `experiments/lenet_student.py` with their dataset argument:
  study  Fashion-MNIST 28×28×1, LeNet width 0.5, NiN width 0.25 (the default; all benchmarks)
  seed   CIFAR-10 32×32×3, LeNet width 1.0, NiN width 1.0 with the Caffe head (the distillation
         benchmarks and the peak probes)
Both use batch 256 for distillation; the amalgamation benchmarks are 28×28×1, batch 128.

Benchmarks:
  jax_kd            hinton_kd step: LeNet student + frozen NiN teacher (eval mode)
  jax_kd_cached     the same step fed the teacher's logits with the batch, as training
                    does by default (distill.cache_teacher_logits): no teacher in the step
  jax_gt            ground-truth step of the same student alone
  jax_teacher_fwd   the NiN teacher's forward pass alone (what the KD step adds)
  torch_*           the same three in PyTorch, 2 threads (skipped when torch is not
                    installed: torch is a dependency of this benchmark only, never of
                    kd_jax), and torch_kd_1thread / torch_gt_1thread on 1 thread
  jax_amalgamation  amalgamation step: ConvNet student + 2 ConvNet teachers,
                    teacher-card routing (cards fitted on random features)
  jax_convnet_gt    ground-truth step of the amalgamation student alone
  jax_amal_teachers both teachers' forward + routing alone
  jax_gt_2dev       jax_gt on 2 forced host devices (shard_map data parallelism)
  jax_gt_loop, jax_amalgamation_loop
                    the training loop around jax_gt / jax_amalgamation, step after step as
                    `kd_jax.train.loop.fit` runs it: the tf.data pipeline on the dataset
                    (Fashion-MNIST, uint8), the 2-deep on-device prefetch, the step with its
                    on-device preprocessing and metric sums, the divergence guard read a step
                    late, the log and checkpoint intervals (the writes themselves are not run).
                    An iteration does not wait for its own step (the loop does not), so its
                    time is the loop's steady-state time per step; the bare rows time each
                    step alone on pre-placed random data. Needs the dataset (the study
                    recipe's Fashion-MNIST)
  jax_gt_bf16, jax_amalgamation_bf16
                    jax_gt / jax_amalgamation computing in bfloat16 (`model.dtype`,
                    `amalgamation.dtype` and `teacher_dtype`): parameters, optimizer state and
                    losses float32. On a CPU without bfloat16 arithmetic XLA emulates it
  jax_matmul, torch_matmul
                    the peak probes: a float32 2048² matmul (2n³ FLOPs); per round, the
                    faster one is the machine's fp32 peak and every step's achieved GFLOP/s
                    is reported as a fraction of it
A JAX benchmark prefixed `before_` (e.g. `before_jax_amalgamation`) runs the kd_jax of
`--before_tree` (a worktree of an older commit), prefixed `noflag_` this code without
kd_jax's CPU XLA flags; both with the user's XLA_FLAGS only, or with `--twin_xla_flags` (e.g.
an older value of kd_jax's flags, to time a change of them). Their ratios to the plain
benchmark are the before/after speed-ups.

The 2-device worker runs with XLA_FLAGS=--xla_force_host_platform_device_count=2: on a
CPU both "devices" share the same cores, so it measures the overhead of the sharded
path (split batch, gradient all-reduce), not a speed-up.

Besides wall time the table gives images/s, CPU time per step and FLOPs per step (the
model's, by XLA's cost analysis with direct convolutions, which the % of peak divides; the
executed program's beside them; PyTorch's flop counter), hence a throughput per CPU-second
that depends less on the background load than wall time, and each worker's peak RSS.
`--json` writes one object per benchmark (name, images_per_s, ms_per_step, cpu_ms_per_step,
gflop_per_step, program_gflop_per_step, fraction_of_peak, ...), the ratios and the targets,
and the raw timings.

The parts: `suite.py` (the benchmarks, settings, ratios and targets), `harness.py` (workers,
timed rounds, statistics, rows), `jax_steps.py` (the JAX steps, on kd_jax's public API),
`torch_reference.py` (the PyTorch port), `report.py` (Markdown and JSON); this file holds the
flags and `main`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import harness
import report
import suite


def parse_args(argv=None):
  """The flags, and the parser (for its errors)."""
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--rounds", type=int, default=12, help="at most this many timed rounds")
  p.add_argument(
    "--min_rounds", type=int, default=4, help="at least this many, whatever the budget"
  )
  p.add_argument(
    "--budget_seconds",
    type=float,
    default=120.0,
    help="no new round starts after this much time in the timed rounds",
  )
  p.add_argument("--chunk_seconds", type=float, default=1.0, help="approximate time per chunk")
  p.add_argument("--min_steps", type=int, default=2, help="at least this many steps per chunk")
  p.add_argument(
    "--recipe",
    choices=sorted(suite.RECIPES),
    default="study",
    help="distillation setting: study (Fashion-MNIST 28×28×1, LeNet 0.5, NiN 0.25; "
    "all benchmarks by default) or seed (CIFAR 32×32×3, LeNet 1.0, NiN 1.0 with "
    "the Caffe head; the distillation benchmarks and the peak probes by default)",
  )
  p.add_argument(
    "--student_width", type=float, default=None, help="LeNet width (default: the recipe's)"
  )
  p.add_argument(
    "--teacher_width", type=float, default=None, help="NiN width (default: the recipe's)"
  )
  p.add_argument("--kd_batch", type=int, default=256)
  p.add_argument("--amal_batch", type=int, default=128)
  p.add_argument(
    "--amal_selection",
    default=None,
    help="the amalgamation benchmarks' routing rule (default: the experiment's, "
    "pool_lda; issue 12's before/after target is stated for teacher_card, which "
    "the trees before pool_lda also have)",
  )
  p.add_argument(
    "--amal_teacher_blocks",
    default="",
    help="the amalgamation teachers' block widths, e.g. 32-64-128 (issue 12's "
    "setting; default: the experiment's teacher_blocks)",
  )
  p.add_argument(
    "--only",
    default="",
    help="comma-separated benchmark names; a JAX one prefixed before_ runs the code "
    "of --before_tree, prefixed noflag_ runs without kd_jax's CPU XLA flags",
  )
  p.add_argument(
    "--before_tree",
    default="",
    help="a kd_jax checkout (e.g. a worktree of an older commit) for the before_ benchmarks",
  )
  p.add_argument(
    "--twin_xla_flags",
    default=None,
    help="XLA_FLAGS of the before_ and noflag_ twins (default: the user's XLA_FLAGS)",
  )
  p.add_argument("--json", default="", help="also write the raw timings here")
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)
  p.add_argument("--settings", default="", help=argparse.SUPPRESS)
  return p, p.parse_args(argv)


def main(argv=None) -> None:
  p, args = parse_args(argv)
  if args.worker:
    with open(args.settings, encoding="utf-8") as f:
      harness.run_worker(args.worker, json.load(f))
    return

  # As the entry points do, before any JAX backend starts (the workers inherit it); the
  # user's own XLA_FLAGS are kept for the twins that run without kd_jax's flags.
  user_xla_flags = (
    os.environ.get("XLA_FLAGS", "") if args.twin_xla_flags is None else args.twin_xla_flags
  )
  sys.path.insert(0, suite.REPO)  # here, not at the top: a before_ worker imports the old kd_jax
  from kd_jax.ops import xla_flags  # pylint: disable=g-import-not-at-top  (no JAX import)

  xla_flags.configure_cpu()
  started = time.time()
  default = suite.DISTILL_BENCHES if args.recipe == "seed" else suite.BENCHES
  names = [n for n in args.only.split(",") if n] or list(default)
  unknown = suite.unknown(names)
  if unknown:
    p.error(
      f"unknown benchmarks {sorted(unknown)}; choose from {', '.join(suite.BENCHES)} "
      f"(JAX ones also prefixed {' or '.join(suite.TWINS)})"
    )
  if any(n.startswith("before_") for n in names) and not os.path.isdir(
    os.path.join(args.before_tree, "kd_jax")
  ):
    p.error(
      f"before_ benchmarks need --before_tree, a directory holding kd_jax; got {args.before_tree!r}"
    )
  date = subprocess.run(["date"], capture_output=True, text=True, check=False).stdout.strip()
  load_before, psi_before = harness.loadavg(), harness.cpu_pressure()
  cfg = suite.settings(args)
  timed = harness.time_benchmarks(names, cfg, args, user_xla_flags)
  run = {
    "settings": cfg,
    "timed": timed,
    "date": date,
    "machine": harness.machine(),
    "load_before": load_before,
    "load_after": harness.loadavg(),
    "psi_before": psi_before,
    "elapsed": time.time() - started,
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "user_xla_flags": user_xla_flags,
  }
  rounds = timed["rounds"]
  run["n_rounds"] = len(next(iter(rounds.values()))) if rounds else 0
  run["probes"], run["peak"] = harness.peak_gflop_s(timed)
  run["rows"] = harness.rows(timed, run["peak"])
  run["ratios"] = harness.ratios(timed)
  run["targets"] = harness.targets(run["rows"], run["ratios"])
  print(report.markdown(run, args))
  if args.json:
    report.write_json(args.json, run)


if __name__ == "__main__":
  main()
