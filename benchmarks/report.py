"""The report of `step_time.py`: Markdown on stdout and, with `--json`, the raw results."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import suite
from harness import spread

_METHOD = (
  "ms/step: median over rounds of the chunk's median step, with the interquartile range. "
  "images/s: batch / ms/step. CPU ms/step: process CPU time (all threads, spinning included) "
  "per step. GFLOP/step: the model's FLOPs, by XLA's cost analysis of the step compiled with "
  "direct convolutions (× devices) for JAX, `torch.utils.flop_counter` (convolutions and "
  "matmuls only) for PyTorch, 2n³ for the matmul probes; program GFLOP: what the compiled JAX "
  "step executes (more where LeNet's blocks are polyphase, fewer where its conv2 trains in the "
  "frequency domain). % of peak: per round, the step's GFLOP/s over the faster matmul probe's "
  "GFLOP/s in that round, median over rounds. Start-up CPU: importing, building, compiling and "
  "running the first step, in CPU seconds. Peak RSS: VmHWM."
)


def markdown(run: dict, args) -> str:
  """The Markdown report: the run's setting, a table of benchmarks, of ratios, of targets."""
  m, cfg, timed = run["machine"], run["settings"], run["timed"]
  d, a = cfg["distill"], cfg["amalgamation"]
  loads, psi, peak, probes = timed["loads"], timed["psi"], run["peak"], run["probes"]
  out = ["## Results", ""]
  out.append(f"- Date: {run['date']}; the whole benchmark took {run['elapsed'] / 60:.1f} min.")
  out.append(
    f"- Machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram_gb']:.1f} GiB RAM; "
    f"Python {m['python']}; " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + "."
  )
  if loads:
    load = (
      f"- Background load: load average (1/5/15 min) {run['load_before']} before, "
      f"{run['load_after']} after; 1-min load after each round median "
      f"{statistics.median(loads):.1f} ({min(loads):.1f}–{max(loads):.1f}) on "
      f"{m['nproc']} CPUs, this benchmark adding about 1–2"
    )
    if psi:
      load += (
        f"; CPU pressure (PSI some avg10: % of time a runnable task waited for a CPU) "
        f"median {statistics.median(psi):.0f} % ({min(psi):.0f}–{max(psi):.0f})"
      )
    out.append(load + ".")
  out.append(
    f"- XLA flags of the workers: `{run['xla_flags']}` "
    f"(kd_jax.ops.xla_flags.configure_cpu; twins: `{run['user_xla_flags']}`)."
  )
  inherited = {k: v for k, v in os.environ.items() if k.startswith(("JAX_", "OMP_", "MKL_"))}
  if inherited:
    out.append(
      "- Environment passed to the workers: "
      + ", ".join(f"`{k}={v}`" for k, v in sorted(inherited.items()))
      + "."
    )
  out.append(
    "- Command: `python benchmarks/step_time.py" + "".join(f" {x}" for x in sys.argv[1:]) + "`"
  )
  if args.before_tree:
    head = subprocess.run(
      ["git", "-C", args.before_tree, "rev-parse", "--short", "HEAD"],
      capture_output=True,
      text=True,
      check=False,
    ).stdout.strip()
    out.append(
      f"- `before_*`: the code of `{args.before_tree}` (commit {head or 'unknown'}), "
      "the user's XLA flags."
    )
  out.append(
    f"- Distillation (recipe `{cfg['recipe']}`): LeNet width {d['student']['width']} student, "
    f"NiN width {d['teacher']['width']} teacher ({d['teacher']['head']} head, eval mode), "
    f"batch {d['batch_size']}, {'×'.join(map(str, d['image_shape']))} ({d['dataset']} shape), "
    f"T = {d['distill']['temperature']}, soft weight {d['distill']['soft_weight']}, Adam. "
    "PyTorch: NCHW float32, eager, `torch.set_num_threads(2)` unless marked 1 thread."
  )
  teacher_blocks = " / ".join("-".join(map(str, t)) for t in a["teacher_blocks"])
  out.append(
    f"- Amalgamation: ConvNet {'-'.join(map(str, a['student_blocks']))} student and "
    f"{len(a['class_sets'])} teachers ({teacher_blocks}), "
    f"{a['convs_per_block']} conv per block, classes {a['class_sets']}, selection "
    f"{a['cfg']['selection']}, {a['cfg']['routing']} routing, batch {a['batch_size']}, "
    "28×28×1."
  )
  out.append(
    f"- Rounds: {run['n_rounds']}; in each, every benchmark ran one chunk of steps (about "
    f"{args.chunk_seconds:g} s, at least {args.min_steps} step(s)) in a rotated order. " + _METHOD
  )
  if peak:
    out.append(
      f"- Measured fp32 matmul peak ({' / '.join(probes)}, {suite.MATMUL_SIZE}², faster "
      f"of the two per round): median {statistics.median(peak):.0f} GFLOP/s, best round "
      f"{max(peak):.0f}."
    )
  for name, why in timed["skipped"].items():
    out.append(f"- `{name}`: skipped — {why}")
  out += [
    "",
    _benchmark_table(run),
    "",
    "Each ratio of step times is taken within a round (its two chunks ran seconds apart, "
    "under about the same load), then summarised over the rounds.",
    "",
    "| ratio | median | IQR | min–max | reading | by CPU time: median (IQR) |",
    "|---|---:|---:|---:|---|---:|",
  ]
  for r in run["ratios"]:
    out.append(
      f"| {r['name']} | **{r['median']:.2f}** | {r['q25']:.2f}–{r['q75']:.2f} | "
      f"{r['min']:.2f}–{r['max']:.2f} | {r['reading']} | "
      f"{r['cpu_median']:.2f} ({r['cpu_q25']:.2f}–{r['cpu_q75']:.2f}) |"
    )
  if run["targets"]:
    out += ["", "| target (issues 11, 12) | measured | goal | met |", "|---|---:|---:|---|"]
    for t in run["targets"]:
      out.append(
        f"| {t['name']} | **{t['value']:.2f}** | ≥ {t['target']:.2f} "
        f"| {'yes' if t['met'] else 'no'} |"
      )
  return "\n".join(out)


def _benchmark_table(run: dict) -> str:
  fmt = lambda v, f: "—" if v is None else f.format(v)
  out = [
    "| benchmark | what | batch | ms/step | IQR | images/s | CPU ms/step | GFLOP/step "
    "| program GFLOP | GFLOP/s | % of peak | GFLOP per CPU-s | steps × rounds "
    "| start-up CPU s | peak RSS MB |",
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for row in run["rows"]:
    wall = spread([1e3 * x for x in run["timed"]["rounds"][row["name"]]], "{:.0f}")
    peak = row["fraction_of_peak"] and 100 * row["fraction_of_peak"]
    out.append(
      f"| `{row['name']}` | {row['what']} | {row['batch'] or '—'} | **{wall['median']}** "
      f"| {wall['iqr']} | {fmt(row['images_per_s'], '{:.0f}')} "
      f"| {row['cpu_ms_per_step']:.0f} | {row['gflop_per_step']:.2f} "
      f"| {fmt(row['program_gflop_per_step'], '{:.2f}')} | {row['gflop_per_s']:.1f} "
      f"| {fmt(peak, '{:.0f}')} | {row['gflop_per_cpu_s']:.1f} "
      f"| {row['steps_per_chunk']} × {row['rounds']} "
      f"| {row['start_up_cpu_s']:.1f} | {row['peak_rss_mb']:.0f} |"
    )
  return "\n".join(out)


def write_json(path: str, run: dict) -> None:
  """The rows, ratios and targets, the settings and machine, and every raw timing."""
  timed, peak = run["timed"], run["peak"]
  with open(path, "w", encoding="utf-8") as f:
    json.dump(
      {
        "recipe": run["settings"]["recipe"],
        "benchmarks": run["rows"],
        "ratios": run["ratios"],
        "targets": run["targets"],
        "peak_gflop_s": {
          "median": statistics.median(peak) if peak else None,
          "per_round": peak,
          "probes": run["probes"],
        },
        "settings": run["settings"],
        "machine": run["machine"],
        "date": run["date"],
        "xla_flags": run["xla_flags"],
        "ready": timed["ready"],
        "round_medians_s": timed["rounds"],
        "steps_s": timed["raw"],
        "cpu_s_per_step": timed["cpu_step"],
        "loadavg_1min": timed["loads"],
        "cpu_pressure": timed["psi"],
        "psi_before": run["psi_before"],
        "skipped": timed["skipped"],
      },
      f,
      indent=1,
    )
