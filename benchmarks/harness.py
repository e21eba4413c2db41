"""The timing harness of `step_time.py`: worker processes, timed rounds, statistics, rows.

Every benchmark runs in its own worker process (`step_time.py --worker NAME`), which builds
its step, compiles and warms it up, then runs chunks of steps on request. The parent times the
workers in rounds, one chunk per worker per round in a rotated order, so that every benchmark
sees the same background load; each step is timed alone, a chunk's value is the median of its
steps and a benchmark's the median over rounds. A ratio is taken within each round, then
summarised over rounds.

Worker protocol: one JSON object per line on the worker's original stdout (everything else
goes to stderr): ready → {"ready": info} or {"skip": why}; "run N" → {"wall": [s per step],
"cpu": s}; "quit" → {"maxrss_mb": peak RSS}.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import jax_steps
import suite

DEVICES_FLAG = "--xla_force_host_platform_device_count"
ENTRY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "step_time.py")


def log(*args) -> None:
  print("[step_time]", *args, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ worker side


def run_worker(name: str, cfg: dict) -> None:
  """Builds benchmark `name` from settings `cfg`, warms it up, then serves the protocol."""
  proto = os.fdopen(os.dup(1), "w")
  os.dup2(2, 1)  # stray prints (ours, XLA's, absl's) must not corrupt the protocol
  sys.stdout = sys.stderr

  def send(obj):
    proto.write(json.dumps(obj) + "\n")
    proto.flush()

  framework = suite.framework(name)
  if framework == "torch":
    if importlib.util.find_spec("torch") is None:
      send({"skip": "PyTorch is not installed (pip install torch==2.13.0 to compare)"})
      return
    import torch_reference as builder  # pylint: disable=g-import-not-at-top  (imports torch)
  else:
    builder = jax_steps
  c0 = time.process_time()
  one_step, info, count_flops = builder.build(suite.base_name(name), cfg)
  one_step()  # compiles (JAX) / allocates (PyTorch)
  info["first_step_cpu_s"] = time.process_time() - c0  # CPU time: the workers start together
  devices = info.get("devices", 1)
  info["flops"] = count_flops() * devices  # XLA counts one device's program
  if framework == "jax":
    info["program_flops"] = info["flops"]
    info["flops"] = jax_steps.model_flops(count_flops) * devices
  for _ in range(2):
    one_step()
  warm = []
  for _ in range(3):
    t = time.perf_counter()
    one_step()
    warm.append(time.perf_counter() - t)
  info["warm_step_s"] = statistics.median(warm)
  send({"ready": info})
  for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "run":
      walls, c0 = [], time.process_time()
      for _ in range(int(cmd[1])):
        t = time.perf_counter()
        one_step()
        walls.append(time.perf_counter() - t)
      getattr(one_step, "settle", lambda: None)()  # a loop's last step: done before the next chunk
      send({"wall": walls, "cpu": time.process_time() - c0})
    elif cmd[0] == "quit":
      break
  send({"maxrss_mb": peak_rss_mb()})


def peak_rss_mb() -> float:
  """This process's peak resident set size, VmHWM of /proc/self/status.

  Not `resource.getrusage(RUSAGE_SELF).ru_maxrss`: Linux carries that over exec from the
  forked parent (the orchestrator, with TensorFlow and JAX loaded), so it would be at least the
  parent's size in every worker. VmHWM belongs to the new image.
  """
  try:
    with open("/proc/self/status", encoding="utf-8") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # elsewhere: an upper bound


# ------------------------------------------------------------------------------ parent side


class Worker:
  """One worker process: a twin gets the user's XLA flags and, for `before_`, the old tree."""

  def __init__(self, name: str, cfg_path: str, *, user_xla_flags: str, before_tree: str):
    self.name = name
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env.pop("JAX_DISABLE_MOST_OPTIMIZATIONS", None)
    if suite.base_name(name) != name:  # a twin: the user's XLA flags only, not kd_jax's
      env["XLA_FLAGS"] = user_xla_flags
    if name.startswith("before_"):
      env["KD_JAX_TREE"] = os.path.abspath(before_tree)
    devices = suite.BENCHES[suite.base_name(name)][1]
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(DEVICES_FLAG)]
    if devices > 1:
      flags.append(f"{DEVICES_FLAG}={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    self.proc = subprocess.Popen(
      [sys.executable, ENTRY, "--worker", name, "--settings", cfg_path],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
      env=env,
      cwd=suite.REPO,
    )

  def request(self, line: str | None) -> dict:
    """Sends `line` (None: nothing) and returns the worker's reply."""
    if line is not None:
      self.proc.stdin.write(line + "\n")
      self.proc.stdin.flush()
    reply = self.proc.stdout.readline()
    if not reply:
      raise RuntimeError(f"worker {self.name} died (exit code {self.proc.wait()}); see stderr")
    return json.loads(reply)

  def close(self) -> None:
    """Ends a worker still running (one still building exits at EOF once built)."""
    if self.proc.poll() is not None:
      return
    try:
      self.proc.stdin.close()
    except OSError:
      pass
    try:
      self.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
      self.proc.kill()


def time_benchmarks(names, cfg: dict, args, user_xla_flags: str) -> dict:
  """Starts a worker per name, then times them in rounds (see the module docstring).

  All workers build and compile at once (nothing is timed yet); then the timed rounds, at most
  `args.rounds`, at least `args.min_rounds`, none started after `args.budget_seconds`. Returns
  the workers' `ready` infos, the skipped benchmarks, and per benchmark and round the chunk's
  median step (`rounds`), CPU time per step, the raw step times and the chunk's size, with the
  load after each round and each worker's peak RSS.
  """
  started = time.time()
  cfg_path = os.path.join(
    os.environ.get("TMPDIR", "/tmp"), f"step_time_settings_{os.getpid()}.json"
  )
  with open(cfg_path, "w", encoding="utf-8") as f:
    json.dump(cfg, f)
  pending, workers, ready, skipped = {}, {}, {}, {}
  try:
    log(f"starting {len(names)} workers: {', '.join(names)}")
    for name in names:
      pending[name] = Worker(
        name, cfg_path, user_xla_flags=user_xla_flags, before_tree=args.before_tree
      )
    for name, w in pending.items():
      reply = w.request(None)
      if "skip" in reply:
        skipped[name] = reply["skip"]
        log(f"{name}: skipped: {reply['skip']}")
        w.proc.wait()
        continue
      workers[name], ready[name] = w, reply["ready"]
      tree = reply["ready"].get("kd_jax_tree")
      if tree and (tree == suite.REPO) == name.startswith("before_"):  # a twin runs other code
        raise RuntimeError(f"{name} imported kd_jax from {tree}")
      log(
        f"{name}: ready after {time.time() - started:.0f} s; "
        f"warm step {1e3 * reply['ready']['warm_step_s']:.0f} ms"
      )

    chunk = {
      n: max(args.min_steps, min(200, round(args.chunk_seconds / ready[n]["warm_step_s"])))
      for n in workers
    }
    rounds = {n: [] for n in workers}  # per round: median seconds per step in the chunk
    cpu_step = {n: [] for n in workers}  # per round: process CPU seconds per step
    raw = {n: [] for n in workers}
    loads, psi = [], []
    order = list(workers)
    timing_started = time.time()
    r = 0
    while (
      order
      and r < args.rounds
      and (r < args.min_rounds or time.time() - timing_started < args.budget_seconds)
    ):
      for name in order[r % len(order) :] + order[: r % len(order)]:
        reply = workers[name].request(f"run {chunk[name]}")
        rounds[name].append(statistics.median(reply["wall"]))
        cpu_step[name].append(reply["cpu"] / len(reply["wall"]))
        raw[name].append(reply["wall"])
      loads.append(os.getloadavg()[0])
      if cpu_pressure() is not None:
        psi.append(cpu_pressure())
      r += 1
      log(f"round {r}: " + ", ".join(f"{n} {1e3 * rounds[n][-1]:.0f}" for n in order) + " ms")
    rss = {n: w.request("quit")["maxrss_mb"] for n, w in workers.items()}
  finally:
    for w in pending.values():
      w.close()
    os.remove(cfg_path)
  return {
    "ready": ready,
    "skipped": skipped,
    "rounds": rounds,
    "cpu_step": cpu_step,
    "raw": raw,
    "chunk": chunk,
    "loads": loads,
    "psi": psi,
    "rss": rss,
  }


# ------------------------------------------------------------------------------ statistics


def quantile(values, q: float) -> float:
  """The `q` quantile of `values`, linearly interpolated."""
  values = sorted(values)
  pos = (len(values) - 1) * q
  lo, hi = int(pos), min(int(pos) + 1, len(values) - 1)
  return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def spread(values, fmt: str) -> dict:
  """Median, interquartile range and range of `values`, formatted with `fmt`."""
  return {
    "median": fmt.format(statistics.median(values)),
    "iqr": f"{fmt.format(quantile(values, 0.25))}–{fmt.format(quantile(values, 0.75))}",
    "range": f"{fmt.format(min(values))}–{fmt.format(max(values))}",
  }


def peak_gflop_s(timed: dict) -> tuple[list, list]:
  """`(probes, peak per round)`: per round, the faster float32 matmul probe's GFLOP/s."""
  rounds, ready = timed["rounds"], timed["ready"]
  n_rounds = len(next(iter(rounds.values()))) if rounds else 0
  probes = [n for n in ("jax_matmul", "torch_matmul") if n in rounds]
  if not probes:
    return probes, []
  return probes, [
    max(ready[n]["flops"] / rounds[n][r] for n in probes) / 1e9 for r in range(n_rounds)
  ]


def rows(timed: dict, peak: list) -> list[dict]:
  """One row per benchmark: wall and CPU time per step, images/s, FLOPs, % of peak, memory.

  A step's achieved GFLOP/s is divided by the same round's peak, then the median over rounds
  taken.
  """
  out = []
  for name, info in timed["ready"].items():
    walls = timed["rounds"][name]
    wall_s = statistics.median(walls)
    gflop = info["flops"] / 1e9
    jax = suite.framework(name) == "jax"
    row = {
      "name": name,
      "what": suite.describe(name),
      "framework": suite.framework(name),
      "batch": info["batch"],
      "images_per_s": info["batch"] / wall_s if info["batch"] else None,
      "ms_per_step": 1e3 * wall_s,
      "cpu_ms_per_step": 1e3 * statistics.median(timed["cpu_step"][name]),
      "gflop_per_step": gflop,
      "gflop_source": ("XLA cost analysis, direct convolutions" if jax else "torch flop counter"),
      "program_gflop_per_step": (info["program_flops"] / 1e9 if "program_flops" in info else None),
      "gflop_per_s": gflop / wall_s,
      "fraction_of_peak": (
        statistics.median(gflop / w / pk for w, pk in zip(walls, peak)) if peak else None
      ),
      "student_params": info.get("student_params"),
      "teacher_params": info.get("teacher_params"),
      "rounds": len(walls),
      "steps_per_chunk": timed["chunk"][name],
      "start_up_cpu_s": info["first_step_cpu_s"],
      "peak_rss_mb": timed["rss"][name],
    }
    row["gflop_per_cpu_s"] = gflop / row["cpu_ms_per_step"] * 1e3
    out.append(row)
  return out


def ratios(timed: dict) -> list[dict]:
  """suite.RATIOS and each twin's ratio to its base, by wall and by CPU time, per round."""
  rounds, cpu_step = timed["rounds"], timed["cpu_step"]
  twin_ratios = []
  for name in timed["ready"]:
    base = suite.base_name(name)
    if base != name:
      reading = "> 1: this code faster" if name.startswith("before_") else "> 1: the CPU flags help"
      twin_ratios.append((f"{name[: -len(base)]}{base} / {base}", name, base, reading))
  out = []
  for label, num, den, reading in (*suite.RATIOS, *twin_ratios):
    if num in rounds and den in rounds:
      values = [x / y for x, y in zip(rounds[num], rounds[den])]
      cpu = [x / y for x, y in zip(cpu_step[num], cpu_step[den])]
      out.append(
        {
          "name": label,
          "numerator": num,
          "denominator": den,
          "reading": reading,
          "median": statistics.median(values),
          "q25": quantile(values, 0.25),
          "q75": quantile(values, 0.75),
          "min": min(values),
          "max": max(values),
          "cpu_median": statistics.median(cpu),
          "cpu_q25": quantile(cpu, 0.25),
          "cpu_q75": quantile(cpu, 0.75),
        }
      )
  return out


def targets(rows_: list[dict], ratio_rows: list[dict]) -> list[dict]:
  """suite.TARGETS that this run measured: value, goal and whether it is met."""
  by_name = {r["name"]: r for r in ratio_rows}
  out = []
  for label, key, invert, goal in suite.TARGETS:
    if key in by_name:
      value = by_name[key]["cpu_median" if key in suite.BY_CPU_TIME else "median"]
      value = 1 / value if invert else value
    elif key in {r["name"] for r in rows_}:
      value = next(r["fraction_of_peak"] for r in rows_ if r["name"] == key)
    else:
      continue
    if value is not None:
      out.append({"name": label, "value": value, "target": goal, "met": value >= goal})
  return out


# ------------------------------------------------------------------------------ the machine


def machine() -> dict:
  """CPU model and count, RAM, and the versions of Python and the frameworks."""
  cpu = "unknown"
  with open("/proc/cpuinfo", encoding="utf-8") as f:
    for line in f:
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  with open("/proc/meminfo", encoding="utf-8") as f:
    mem_kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
  versions = {}
  for pkg in ("jax", "jaxlib", "flax", "optax", "torch", "numpy"):
    try:
      versions[pkg] = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      versions[pkg] = "not installed"
  return {
    "nproc": os.cpu_count(),
    "cpu": cpu,
    "ram_gb": mem_kb / 2**20,
    "python": platform.python_version(),
    "versions": versions,
  }


def loadavg() -> str:
  return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_pressure() -> float | None:
  """PSI 'some avg10' of the CPU: % of the last 10 s in which a runnable task waited for a CPU."""
  try:
    with open("/proc/pressure/cpu", encoding="utf-8") as f:
      return float(f.readline().split()[1].split("=")[1])
  except (OSError, IndexError, ValueError):
    return None
