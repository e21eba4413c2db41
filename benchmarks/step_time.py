#!/usr/bin/env python
"""Step-time benchmarks: the distillation and amalgamation train steps, on the CPU.

  python benchmarks/step_time.py > /tmp/step_time.md          # the study recipe, all benchmarks
  python benchmarks/step_time.py --recipe=seed --json s.json  # the seed's full-width CIFAR recipe

Prints Markdown (machine, versions, a table of ms/step, a table of ratios, issue 12's targets)
to stdout and progress to stderr. Every benchmark runs in its own worker process, built exactly
as training builds its step (`kd_jax.train.steps`, `kd_jax.amalgamation.step`, compiled by
`kd_jax.train.mesh.data_parallel_step`, hyper-parameters read from the experiment configs), with
the XLA flags the entry points set (`kd_jax.xla_flags.configure_cpu`). After compilation and
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
                    recipe's Fashion-MNIST: /usr/share/datasets/fashion-mnist here)
  jax_gt_bf16, jax_amalgamation_bf16
                    jax_gt / jax_amalgamation computing in bfloat16 (`model.dtype`,
                    `amalgamation.dtype` and `teacher_dtype`): parameters, optimizer state and
                    losses float32. This CPU has no bfloat16 arithmetic: XLA emulates it
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
"""

from __future__ import annotations

import argparse
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES_FLAG = "--xla_force_host_platform_device_count"
AMAL_IMAGE_SHAPE = (28, 28, 1)  # the amalgamation benchmarks: Fashion-MNIST in both recipes
NUM_CLASSES = 10
MATMUL_SIZE = 2048  # the peak probe: a float32 [n, n] @ [n, n]
# --recipe: the distillation benchmarks' setting. 'study' is the Fashion-MNIST setting of the
# distillation study's teacher (NiN 0.25); 'seed' the distillation seed's own: full-width NiN
# (Caffe head) → full-width LeNet on CIFAR-shaped images.
RECIPES = {
    "study": dict(dataset="fashion_mnist", image_shape=(28, 28, 1), student_width=0.5, teacher_width=0.25),
    "seed": dict(dataset="cifar10", image_shape=(32, 32, 3), student_width=1.0, teacher_width=1.0),
}
# Twins of the JAX benchmarks: the same step from the code before this work (--before_tree,
# e.g. a worktree of an older commit) and from this code without kd_jax.xla_flags' CPU flags.
TWINS = {"before_": "code of --before_tree, the twins' XLA flags", "noflag_": "this code, the twins' XLA flags"}

# name: (framework, devices, description)
BENCHES = {
    "jax_kd": ("jax", 1, "kd_jax hinton_kd step (LeNet + frozen NiN)"),
    "jax_kd_cached": ("jax", 1, "kd_jax hinton_kd step on cached teacher logits (the default)"),
    "jax_gt": ("jax", 1, "kd_jax ground-truth step (LeNet alone)"),
    "jax_teacher_fwd": ("jax", 1, "NiN teacher forward alone"),
    "torch_kd": ("torch", 1, "PyTorch hinton_kd step (LeNet + frozen NiN)"),
    "torch_gt": ("torch", 1, "PyTorch ground-truth step (LeNet alone)"),
    "torch_teacher_fwd": ("torch", 1, "PyTorch NiN teacher forward alone"),
    "jax_amalgamation": ("jax", 1, "kd_jax amalgamation step (2 teachers; routing rule in the settings below)"),
    "jax_convnet_gt": ("jax", 1, "ground-truth step of the amalgamation student alone"),
    "jax_amal_teachers": ("jax", 1, "2 teachers' forward + routing alone"),
    "jax_gt_2dev": ("jax", 2, "kd_jax ground-truth step (LeNet), 2 host devices"),
    "jax_gt_loop": ("jax", 1, "the training loop around jax_gt (data, prefetch, step, bookkeeping)"),
    "jax_amalgamation_loop": ("jax", 1, "the training loop around jax_amalgamation"),
    "jax_gt_bf16": ("jax", 1, "jax_gt computing in bfloat16"),
    "jax_amalgamation_bf16": ("jax", 1, "jax_amalgamation computing in bfloat16 (student and teachers)"),
    "torch_kd_1thread": ("torch", 1, "PyTorch hinton_kd step, 1 thread"),
    "torch_gt_1thread": ("torch", 1, "PyTorch ground-truth step, 1 thread"),
    "jax_matmul": ("jax", 1, f"JAX float32 matmul {MATMUL_SIZE}² (the peak probe)"),
    "torch_matmul": ("torch", 1, f"PyTorch float32 matmul {MATMUL_SIZE}², 2 threads (the peak probe)"),
}
DISTILL_BENCHES = ("jax_kd", "jax_kd_cached", "jax_gt", "jax_teacher_fwd", "torch_kd", "torch_gt",
                   "torch_teacher_fwd", "torch_kd_1thread", "torch_gt_1thread", "jax_matmul", "torch_matmul")


# (label, numerator, denominator, how to read it)
RATIOS = (
    ("KD step / GT step (JAX)", "jax_kd", "jax_gt", "cost of distilling vs plain training"),
    ("teacher forward / KD step (JAX)", "jax_teacher_fwd", "jax_kd", "teacher's share of the KD step"),
    ("KD step on cached logits / KD step (JAX)", "jax_kd_cached", "jax_kd", "what caching saves"),
    ("KD step on cached logits / GT step (JAX)", "jax_kd_cached", "jax_gt", "what distilling still costs"),
    ("KD step / GT step (PyTorch)", "torch_kd", "torch_gt", ""),
    ("teacher forward / KD step (PyTorch)", "torch_teacher_fwd", "torch_kd", ""),
    ("JAX KD / PyTorch KD", "jax_kd", "torch_kd", "> 1: JAX slower"),
    ("JAX KD / PyTorch KD on 1 thread", "jax_kd", "torch_kd_1thread", "> 1: JAX slower"),
    ("JAX GT / PyTorch GT", "jax_gt", "torch_gt", "> 1: JAX slower"),
    ("JAX teacher fwd / PyTorch teacher fwd", "jax_teacher_fwd", "torch_teacher_fwd", "> 1: JAX slower"),
    ("amalgamation step / ConvNet GT step", "jax_amalgamation", "jax_convnet_gt", ""),
    ("teachers fwd + routing / amalgamation step", "jax_amal_teachers", "jax_amalgamation",
     "teachers' share of the amalgamation step"),
    ("GT step 2 devices / 1 device", "jax_gt_2dev", "jax_gt", "shard_map overhead on shared cores"),
    ("GT loop / GT step (LeNet)", "jax_gt_loop", "jax_gt", "≤ 1.11: the loop keeps ≥ 0.9× the bare step's rate"),
    ("amalgamation loop / amalgamation step", "jax_amalgamation_loop", "jax_amalgamation",
     "≤ 1.11: the loop keeps ≥ 0.9× the bare step's rate"),
    ("GT step bfloat16 / float32", "jax_gt_bf16", "jax_gt", "> 1: bfloat16 slower (no bf16 hardware here)"),
    ("amalgamation step bfloat16 / float32", "jax_amalgamation_bf16", "jax_amalgamation",
     "> 1: bfloat16 slower (no bf16 hardware here)"),
    ("PyTorch KD 1 thread / 2 threads", "torch_kd_1thread", "torch_kd", "< 1: OpenMP suffers from the load"),
    ("JAX GT / PyTorch GT on 1 thread", "jax_gt", "torch_gt_1thread", "> 1: JAX slower"),
    ("JAX KD on cached logits / PyTorch GT", "jax_kd_cached", "torch_gt", "> 1: JAX slower (target ≤ 1/1.3)"),
    ("PyTorch matmul / JAX matmul", "torch_matmul", "jax_matmul", "> 1: PyTorch's matmul slower"),
)
# Issues 11 and 12's targets: (label, ratio label or benchmark name, invert the ratio, goal). A
# speed-up is the inverse of a JAX / PyTorch time ratio; "the KD step (teacher in it)" is its
# fraction of the peak. The loop targets are read by CPU time (see the ratio table's last column).
TARGETS = (
    ("KD step, teacher in it: JAX images/s ÷ PyTorch (2 threads)", "JAX KD / PyTorch KD", True, 1.5),
    ("KD step on cached logits ÷ PyTorch GT step", "JAX KD on cached logits / PyTorch GT", True, 1.3),
    ("LeNet GT step (this run's width): JAX ÷ PyTorch", "JAX GT / PyTorch GT", True, 1.3),
    ("amalgamation step: before ÷ now", "before_jax_amalgamation / jax_amalgamation", False, 1.5),
    ("KD step (teacher in it): fraction of the fp32 peak", "jax_kd", False, 0.5),
    ("LeNet GT: whole loop's steps per CPU-s ÷ bare step's (issue 11)", "GT loop / GT step (LeNet)", True, 0.9),
    ("amalgamation: whole loop's steps per CPU-s ÷ bare step's (issue 11)",
     "amalgamation loop / amalgamation step", True, 0.9),
)
# Ratios whose target is read by CPU time: a loop iteration does not wait for its own step, a
# bare step does, and under heavy load the waiting (descheduled) process loses the CPU, so
# their wall-time ratio measures the scheduler more than the code.
BY_CPU_TIME = ("GT loop / GT step (LeNet)", "amalgamation loop / amalgamation step")



def base_name(name: str) -> str:
  """The benchmark a twin (`before_jax_kd`, `noflag_jax_kd`) runs."""
  for prefix in TWINS:
    if name.startswith(prefix):
      return name[len(prefix):]
  return name


def describe(name: str) -> str:
  base = base_name(name)
  return BENCHES[base][2] + (f" — {TWINS[name[:-len(base)]]}" if base != name else "")


def log(*args):
  print("[step_time]", *args, file=sys.stderr, flush=True)


def load_config(relpath: str, arg: str):
  """`get_config(arg)` of an experiment file, as training reads it."""
  spec = importlib.util.spec_from_file_location(os.path.basename(relpath)[:-3], os.path.join(REPO, relpath))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def settings(args) -> dict:
  """Everything a worker needs, read from the experiment configs (imported here, in the
  parent, so that the workers do not load TensorFlow)."""
  sys.path.insert(0, REPO)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  recipe = RECIPES[args.recipe]
  student_width = recipe["student_width"] if args.student_width is None else args.student_width
  teacher_width = recipe["teacher_width"] if args.teacher_width is None else args.teacher_width
  student = load_config("experiments/lenet_student.py",
                        f"method=hinton_kd,dataset={recipe['dataset']},width={student_width}")
  teacher = load_config("experiments/nin_teacher.py", f"dataset={recipe['dataset']},width={teacher_width}")
  amal = load_config("experiments/amalgamate.py", "dataset=fashion_mnist"
                     + (f",selection={args.amal_selection}" if args.amal_selection else ""))
  if amal.block_pairs != "auto":
    raise SystemExit(f"the benchmark builds block_pairs='auto', the config has {amal.block_pairs!r}")
  class_sets = [[int(c) for c in g.split("+")] for g in amal.teacher_classes.split("/")]
  blocks = args.amal_teacher_blocks or amal.teacher_blocks
  teacher_blocks = [[int(w) for w in g.split("-")] for g in blocks.split("/")]
  if len(teacher_blocks) == 1:
    teacher_blocks *= len(class_sets)
  return {
      "recipe": args.recipe,
      "distill": {
          "dataset": recipe["dataset"],
          "image_shape": list(recipe["image_shape"]),
          "batch_size": args.kd_batch,
          "student": student.model.to_dict(),
          "teacher": teacher.model.to_dict(),
          "distill": student.distill.to_dict(),
          "optim": student.optim.to_dict(),
          "data": student.data.to_dict(),
      },
      "amalgamation": {
          "batch_size": args.amal_batch,
          "cfg": amal.amalgamation.to_dict(),
          "class_sets": class_sets,
          "student_blocks": [int(w) for w in amal.student_blocks.split("-")],
          "teacher_blocks": teacher_blocks,
          "convs_per_block": amal.convs_per_block,
          "card_shrinkage": amal.card_shrinkage,
          "data": amal.data.to_dict(),
      },
  }


# ------------------------------------------------------------------------- JAX workers


def model_kwargs(model: dict) -> dict:
  """The model config without `dtype` at its float32 default: the trees before mixed precision
  (e.g. a `--before_tree`) do not know the field."""
  return {k: v for k, v in model.items() if not (k == "dtype" and v == "float32")}


def jax_bench(name: str, cfg: dict):
  """Returns (run_one_step, info) for a JAX benchmark, compiled and placed like training."""
  loop_bench, bf16 = name.endswith("_loop"), name.endswith("_bf16")
  name = name.removesuffix("_loop").removesuffix("_bf16")  # the step they run
  sys.path.insert(0, os.environ.get("KD_JAX_TREE", REPO))  # a before_ twin imports the old kd_jax
  import jax
  import ml_collections
  import numpy as np

  from kd_jax import models, routing
  from kd_jax.amalgamation import step as amal_step
  from kd_jax.train import mesh as mesh_lib
  from kd_jax.train import steps
  from kd_jax.train.state import TrainState
  import kd_jax

  info_tree = os.path.dirname(os.path.dirname(os.path.abspath(kd_jax.__file__)))

  if jax.config.read("jax_disable_most_optimizations"):
    raise SystemExit("jax_disable_most_optimizations is set: refusing to benchmark unoptimised code")
  mesh = mesh_lib.make_mesh()
  expected = BENCHES[name][1]
  if mesh.size != expected:
    raise SystemExit(f"{name}: expected {expected} devices, got {mesh.size} ({jax.devices()})")
  rng = np.random.default_rng(0)
  n_params = lambda tree: int(sum(np.size(x) for x in jax.tree.leaves(tree)))
  info = {"devices": mesh.size, "kd_jax_tree": info_tree}

  if name == "jax_matmul":
    a = jax.device_put(rng.standard_normal((MATMUL_SIZE, MATMUL_SIZE)).astype(np.float32))
    matmul = jax.jit(lambda a, b: a @ b)
    info.update(batch=None, student_params=None, teacher_params=None)
    return (lambda: jax.block_until_ready(matmul(a, a))), info, lambda: 2.0 * MATMUL_SIZE**3

  if name in ("jax_kd", "jax_kd_cached", "jax_gt", "jax_gt_2dev", "jax_teacher_fwd"):
    d = cfg["distill"]
    batch_size, image_shape = d["batch_size"], tuple(d["image_shape"])
    mesh_lib.check_batch_size(batch_size, mesh)
    student = models.build({**model_kwargs(d["student"]), "num_classes": NUM_CLASSES,
                            **({"dtype": "bfloat16"} if bf16 else {})})
    teacher = models.build({**model_kwargs(d["teacher"]), "num_classes": NUM_CLASSES})
    dummy = np.zeros((1, *image_shape), np.float32)
    teacher_vars = teacher.init(jax.random.PRNGKey(1), dummy, train=False)
    batch = {
        "image": rng.standard_normal((batch_size, *image_shape)).astype(np.float32),
        "label": rng.integers(0, NUM_CLASSES, batch_size).astype(np.int32),
    }
    info.update(batch=batch_size, student_params=None, teacher_params=n_params(teacher_vars))
    if name == "jax_teacher_fwd":
      fwd = jax.jit(lambda v, x: steps.apply_model(teacher, v, x, train=False))
      teacher_vars = jax.device_put(teacher_vars)
      images = jax.device_put(batch["image"])
      return (lambda: jax.block_until_ready(fwd(teacher_vars, images))), info, \
          lambda: xla_flops(fwd, teacher_vars, images)

    method = "ground_truth" if name.startswith("jax_gt") else "hinton_kd"
    distill = ml_collections.ConfigDict(d["distill"])
    tx = steps.make_optimizer(ml_collections.ConfigDict(d["optim"]), total_steps=10_000)
    in_step_teacher = name == "jax_kd"
    if name == "jax_kd_cached":  # what the training loop's cache feeds the step
      batch["teacher_logits"] = np.asarray(steps.apply_model(teacher, teacher_vars, batch["image"], train=False))
    step_fn = steps.make_train_step(
        student=student, tx=tx, objective=steps.make_objective(method, distill),
        teacher=teacher if in_step_teacher else None,
        teacher_dropout=bool(distill.get("teacher_dropout", False)),
    )
    init_rng, train_rng = jax.random.split(jax.random.PRNGKey(0))
    state = TrainState.create(variables=student.init(init_rng, dummy, train=False), tx=tx, rng=train_rng)
    info["student_params"] = n_params(state.params)
    if method == "ground_truth":
      info["teacher_params"] = None
    frozen = teacher_vars if in_step_teacher else {}
  else:
    a = cfg["amalgamation"]
    batch_size = a["batch_size"]
    mesh_lib.check_batch_size(batch_size, mesh)
    amal_cfg = ml_collections.ConfigDict(a["cfg"])
    if amal_cfg.selection not in routing.RULES:
      raise SystemExit(f"{name}: the kd_jax of {info_tree} has no selection {amal_cfg.selection!r} "
                       f"(it has {', '.join(routing.RULES)}): pass --amal_selection=teacher_card")
    if bf16:
      amal_cfg.update(dict(dtype="bfloat16", teacher_dtype="bfloat16"))
    # kd_jax.amalgamation.pipeline.build_plan, without its data imports.
    union = list(dict.fromkeys(c for classes in a["class_sets"] for c in classes))
    teachers = tuple(
        models.ConvNet(num_classes=len(classes), block_widths=tuple(widths),
                       convs_per_block=a["convs_per_block"], norm="batch")
        for classes, widths in zip(a["class_sets"], a["teacher_blocks"]))
    student = models.ConvNet(num_classes=len(union), block_widths=tuple(a["student_blocks"]),
                             convs_per_block=a["convs_per_block"], norm="batch")
    plan = amal_step.Plan(
        student=student, teachers=teachers,
        class_index=tuple(tuple(union.index(c) for c in classes) for classes in a["class_sets"]),
        pairs=tuple(amal_step.auto_pairs(len(student.block_widths), len(t.block_widths)) for t in teachers),
    )
    dummy = np.zeros((1, *AMAL_IMAGE_SHAPE), np.float32)
    teacher_vars = [t.init(jax.random.PRNGKey(10 + i), dummy, train=False) for i, t in enumerate(teachers)]
    cards = []
    for t, classes in zip(teachers, a["class_sets"]):  # cards fitted on random features
      dim = t.block_widths[-1]
      cards.append(routing.fit_teacher_card(
          rng.standard_normal((1024, dim)).astype(np.float32), np.arange(1024) % len(classes),
          num_classes=len(classes), shrinkage=a["card_shrinkage"]))
    frozen = {"teachers": teacher_vars}
    if amal_cfg.selection in ("teacher_card", "pool_lda"):
      frozen["cards"] = cards
    if amal_cfg.selection == "pool_lda":  # fitted on random pooled block features, like the cards
      _, feats, _ = amal_step.teacher_outputs(plan, teacher_vars, np.zeros((1, *AMAL_IMAGE_SHAPE), np.float32))
      dims = [amal_step.pooled_blocks(f, amal_cfg.get("pool_grid", 1)).shape[-1] for f in feats]
      frozen["pool_router"] = routing.fit_pool_router(
          [rng.standard_normal((1024, d)).astype(np.float32) for d in dims], np.arange(1024) % len(union),
          plan.class_index)
    images = rng.standard_normal((batch_size, *AMAL_IMAGE_SHAPE)).astype(np.float32)
    info.update(batch=batch_size, selection=amal_cfg.selection, routing=amal_cfg.routing,
                teacher_params=sum(n_params(v["params"]) for v in teacher_vars))
    if name == "jax_amal_teachers":
      def teachers_fwd(frozen, x):
        logits, feats, penultimate = amal_step.teacher_outputs(plan, frozen["teachers"], x)
        return logits, amal_step.routing_weights(amal_cfg, logits, penultimate, frozen, blocks=feats)
      fwd = jax.jit(teachers_fwd)
      frozen = jax.device_put(frozen)
      images = jax.device_put(images)
      return (lambda: jax.block_until_ready(fwd(frozen, images))), info, lambda: xla_flops(fwd, frozen, images)

    tx = steps.make_optimizer(ml_collections.ConfigDict(dict(
        learning_rate=amal_cfg.learning_rate, decay_at=amal_cfg.decay_at,
        decay_factor=amal_cfg.decay_factor, weight_decay=0.0)), total_steps=10_000)
    init_rng, train_rng = jax.random.split(jax.random.PRNGKey(0))
    if name == "jax_amalgamation":
      variables = amal_step.init_params(plan, init_rng, AMAL_IMAGE_SHAPE)
      state = TrainState(
          step=np.zeros((), np.int32), params=variables["params"], batch_stats=variables["batch_stats"],
          opt_state=tx.init(variables["params"]), rng=np.asarray(train_rng, np.uint32))
      step_fn = amal_step.make_step(plan, amal_cfg, tx)
      batch = {"image": images}  # labels never reach the amalgamation step
    else:  # jax_convnet_gt
      state = TrainState.create(variables=student.init(init_rng, dummy, train=False), tx=tx, rng=train_rng)
      step_fn = steps.make_train_step(student=student, tx=tx,
                                      objective=steps.make_objective("ground_truth", {}))
      batch = {"image": images, "label": rng.integers(0, len(union), batch_size).astype(np.int32)}
      frozen = {}
      info["teacher_params"] = None
    info["student_params"] = n_params(state.params["student"] if name == "jax_amalgamation" else state.params)

  if loop_bench:
    return whole_loop(cfg["amalgamation" if name == "jax_amalgamation" else "distill"], step_fn, state, frozen,
                      mesh, info, labels=name != "jax_amalgamation")
  compiled = mesh_lib.data_parallel_step(step_fn, mesh)
  box = {"state": mesh_lib.replicate(state, mesh)}
  frozen = mesh_lib.replicate(frozen, mesh)
  batch = mesh_lib.shard_batch(batch, mesh)  # placed once: input transfer is not timed

  def one_step():
    box["state"], metrics = compiled(box["state"], batch, frozen)
    jax.block_until_ready((box["state"], metrics))

  return one_step, info, lambda: xla_flops(compiled, box["state"], batch, frozen)


def whole_loop(cfg: dict, step_fn, state, frozen, mesh, info, *, labels: bool):
  """One iteration of `kd_jax.train.loop.fit`'s inner loop per call, built from its own
  pieces: host batches (tf.data, uint8), the on-device prefetch, the step compiled with its
  preprocessing and metric sums, the divergence guard a step late, the log and checkpoint
  intervals. Logged metrics are pulled to the host as the loop does; nothing is written."""
  import jax
  import ml_collections

  from kd_jax import data
  from kd_jax.train import loop
  from kd_jax.train import mesh as mesh_lib

  classes = list(dict.fromkeys(c for cs in cfg["class_sets"] for c in cs)) if "class_sets" in cfg else None
  config = ml_collections.ConfigDict(dict(data=cfg["data"], batch_size=cfg["batch_size"], seed=0, num_epochs=10_000,
                                          steps_per_epoch=0, log_every_steps=50, checkpoint_every_steps=500))
  steps_per_epoch = loop.steps_per_epoch_of(config, classes)
  prepare = None if labels else (lambda batch: {"image": batch["image"]})
  batches = mesh_lib.prefetch(loop._host_batches(config, "train", classes, steps_per_epoch, 0, prepare), mesh)
  compiled = loop._step_with_sums(step_fn, mesh, data.device_preprocess(config.data))
  frozen = mesh_lib.replicate(frozen, mesh)
  box = {"state": mesh_lib.replicate(state, mesh), "step": 0, "sums": None}
  guard = loop._NonfiniteGuard("stop")

  def one_step():
    batch = next(batches)
    if box["sums"] is None:
      box["sums"] = mesh_lib.replicate(loop._zero_sums(compiled, box["state"], batch, frozen), mesh)
    box["state"], metrics, nonfinite, box["sums"] = compiled(box["state"], batch, frozen, box["sums"])
    box["step"] = step = box["step"] + 1
    guard.check()
    guard.pending = (step, nonfinite)
    if step % config.log_every_steps == 0:
      guard.check()
      box["logged"] = {k: float(v) for k, v in metrics.items()}
    if step % config.checkpoint_every_steps == 0:
      guard.check()
    box["last"] = metrics

  one_step.settle = lambda: jax.block_until_ready(box["state"])

  def flops():
    jax.block_until_ready(box["state"])
    batch = next(batches)
    return xla_flops(compiled, box["state"], batch, frozen, box["sums"])

  info["dataset"] = cfg["data"]["name"]
  return one_step, info, flops


def model_flops(count_flops) -> float:
  """The FLOPs of the step as its model defines it, with every convolution direct: what "% of
  peak" divides by (model FLOPs utilisation). LeNet's blocks compute some layers in polyphase
  form (more FLOPs) and train conv2 in the frequency domain (`kd_jax.models.spectral`, fewer);
  counted as executed, a step that got faster by dropping FLOPs would show a lower fraction of
  the peak. The program is traced anew (caches cleared) with both forms switched off, then the
  caches are cleared again so that the timed step recompiles as it is. A `--before_tree`
  without these forms (no `kd_jax.models.conv_pool`, or not all of its switches): as counted."""
  import jax
  try:
    from kd_jax.models import conv_pool
  except ImportError:  # a --before_tree from before LeNet's polyphase and spectral forms
    return count_flops()
  direct = {"SPECTRAL_MIN_INPUT_CHANNELS": sys.maxsize, "POLYPHASE_MAX_CHANNELS": 0,
            "POLYPHASE_MAX_CHANNELS_ELSEWHERE": 0}
  saved = {name: getattr(conv_pool, name) for name in direct if hasattr(conv_pool, name)}
  for name in saved:
    setattr(conv_pool, name, direct[name])
  jax.clear_caches()
  try:
    return count_flops()
  finally:
    for name, value in saved.items():
      setattr(conv_pool, name, value)
    jax.clear_caches()


def xla_flops(jitted, *args) -> float:
  """FLOPs of one call by XLA's cost analysis of the compiled program (per device: with n
  devices, each runs 1/n of the batch). Called after the first step, so the compilation is
  cached, not repeated."""
  cost = jitted.lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan")))


# ----------------------------------------------------------------------- PyTorch workers


def torch_bench(name: str, cfg: dict):
  """The same distillation step in PyTorch (NCHW, float32, eager, Adam)."""
  import numpy as np
  import torch
  import torch.nn.functional as F
  from torch import nn

  torch.set_num_threads(1 if name.endswith("_1thread") else 2)
  torch.manual_seed(0)
  if name == "torch_matmul":
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    info = {"batch": None, "threads": torch.get_num_threads(), "student_params": None, "teacher_params": None}
    return (lambda: a @ a), info, lambda: 2.0 * MATMUL_SIZE**3
  d = cfg["distill"]
  image_h, image_w, channels = d["image_shape"]
  scaled = lambda features, width: max(1, int(round(features * width)))

  class NiN(nn.Module):  # kd_jax.models.NiN, head='gap'
    def __init__(self, width, dropout):
      super().__init__()
      w = lambda f: scaled(f, width)

      def conv(cin, cout, k):
        return [nn.Conv2d(cin, cout, k, padding=k // 2), nn.ReLU()]

      self.body = nn.Sequential(
          *conv(channels, w(192), 5), *conv(w(192), w(160), 1), *conv(w(160), w(96), 1),
          nn.MaxPool2d(3, 2, padding=1), nn.Dropout(dropout),
          *conv(w(96), w(192), 5), *conv(w(192), w(192), 1), *conv(w(192), w(192), 1),
          nn.AvgPool2d(3, 2, padding=1, count_include_pad=False), nn.Dropout(dropout),
          *conv(w(192), w(192), 3), *conv(w(192), w(192), 1), *conv(w(192), NUM_CLASSES, 1))

    def forward(self, x):
      return self.body(x).mean(dim=(2, 3))

  class LeNet(nn.Module):  # kd_jax.models.LeNet, relu_after_conv=True
    def __init__(self, width):
      super().__init__()
      c1, c2, f1 = scaled(64, width), scaled(128, width), scaled(1024, width)
      self.conv1, self.conv2 = nn.Conv2d(channels, c1, 5), nn.Conv2d(c1, c2, 5)
      side = lambda n: ((n - 4) // 2 - 4) // 2  # two VALID 5×5 convs, each then a 2×2 pool
      self.fc1, self.fc2 = nn.Linear(c2 * side(image_h) * side(image_w), f1), nn.Linear(f1, NUM_CLASSES)

    def forward(self, x):
      x = F.max_pool2d(F.relu(self.conv1(x)), 2)
      x = F.max_pool2d(F.relu(self.conv2(x)), 2)
      return self.fc2(F.relu(self.fc1(x.flatten(1))))

  if not d["student"]["relu_after_conv"] or d["student"]["dropout_rate"] or d["teacher"]["head"] != "gap":
    raise SystemExit("the PyTorch port covers LeNet(relu_after_conv, no dropout) and NiN(head='gap') only")
  batch_size = d["batch_size"]
  rng = np.random.default_rng(0)
  x = torch.from_numpy(rng.standard_normal((batch_size, channels, image_h, image_w)).astype(np.float32))
  y = torch.from_numpy(rng.integers(0, NUM_CLASSES, batch_size).astype(np.int64))
  teacher = NiN(d["teacher"]["width"], d["teacher"]["dropout_rate"]).eval()
  for p in teacher.parameters():
    p.requires_grad_(False)
  n_params = lambda m: sum(p.numel() for p in m.parameters())
  info = {"batch": batch_size, "threads": torch.get_num_threads(), "teacher_params": n_params(teacher)}
  def flops(fn):
    def count():
      from torch.utils.flop_counter import FlopCounterMode
      with FlopCounterMode(display=False) as counter:
        fn()
      return float(counter.get_total_flops())
    return count

  if name == "torch_teacher_fwd":
    def fwd():
      with torch.no_grad():
        teacher(x)
    return fwd, info, flops(fwd)

  student = LeNet(d["student"]["width"]).train()
  info["student_params"] = n_params(student)
  if name.startswith("torch_gt"):
    info["teacher_params"] = None
  opt = torch.optim.Adam(student.parameters(), lr=d["optim"]["learning_rate"])
  temperature, alpha = d["distill"]["temperature"], d["distill"]["soft_weight"]
  distill = name.startswith("torch_kd")

  def one_step():
    opt.zero_grad(set_to_none=True)
    if distill:
      with torch.no_grad():
        t = teacher(x)
    s = student(x)
    hard = F.cross_entropy(s, y)
    if distill:  # α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1 − α)·CE, as kd_jax.losses.hinton_kd
      soft = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                      reduction="batchmean", log_target=True) * temperature**2
      loss = alpha * soft + (1 - alpha) * hard
    else:
      loss = hard
    loss.backward()
    opt.step()
    with torch.no_grad():  # the metrics kd_jax's step returns
      pred = s.argmax(-1)
      metrics = [loss.detach(), (pred == y).float().mean()]
      if distill:
        metrics.append((pred == t.argmax(-1)).float().mean())

  return one_step, info, flops(one_step)


# ------------------------------------------------------------------------------ worker


def worker(name: str, cfg: dict) -> None:
  """Builds one benchmark, warms it up, then runs chunks of steps on request.

  Protocol (one JSON object per line on the original stdout; everything else goes to
  stderr): ready → {"ready": …}; "run N" → {"wall": [s per step], "cpu": s}; "quit" →
  {"maxrss_mb": peak RSS}.
  """
  proto = os.fdopen(os.dup(1), "w")
  os.dup2(2, 1)  # stray prints (ours, XLA's, absl's) must not corrupt the protocol
  sys.stdout = sys.stderr

  def send(obj):
    proto.write(json.dumps(obj) + "\n")
    proto.flush()

  framework = BENCHES[base_name(name)][0]
  if framework == "torch":
    try:
      import torch  # noqa: F401
    except ImportError:
      send({"skip": "PyTorch is not installed (pip install torch==2.13.0 to compare)"})
      return
  c0 = time.process_time()
  one_step, info, count_flops = (torch_bench if framework == "torch" else jax_bench)(base_name(name), cfg)
  one_step()  # compiles (JAX) / allocates (PyTorch)
  info["first_step_cpu_s"] = time.process_time() - c0  # CPU time: the workers start together
  info["flops"] = count_flops() * info.get("devices", 1)  # XLA counts one device's program
  if framework == "jax":
    info["program_flops"], info["flops"] = info["flops"], model_flops(count_flops) * info.get("devices", 1)
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
  forked parent (here the orchestrator, with TensorFlow and JAX loaded, ~660 MB), so it
  would be at least the parent's size in every worker. VmHWM belongs to the new image.
  """
  try:
    with open("/proc/self/status", encoding="utf-8") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # elsewhere: an upper bound


# ------------------------------------------------------------------------------ parent


class Worker:
  def __init__(self, name: str, cfg_path: str, *, user_xla_flags: str, before_tree: str):
    self.name = name
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env.pop("JAX_DISABLE_MOST_OPTIMIZATIONS", None)
    if base_name(name) != name:  # a twin: the user's XLA flags only, not kd_jax's
      env["XLA_FLAGS"] = user_xla_flags
    if name.startswith("before_"):
      env["KD_JAX_TREE"] = os.path.abspath(before_tree)
    devices = BENCHES[base_name(name)][1]
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(DEVICES_FLAG)]
    if devices > 1:
      flags.append(f"{DEVICES_FLAG}={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    self.proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--worker", name, "--settings", cfg_path],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)

  def request(self, line: str | None) -> dict:
    if line is not None:
      self.proc.stdin.write(line + "\n")
      self.proc.stdin.flush()
    reply = self.proc.stdout.readline()
    if not reply:
      raise RuntimeError(f"worker {self.name} died (exit code {self.proc.wait()}); see stderr")
    return json.loads(reply)


def quantile(values, q):
  values = sorted(values)
  pos = (len(values) - 1) * q
  lo, hi = int(pos), min(int(pos) + 1, len(values) - 1)
  return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def machine() -> dict:
  cpu = "unknown"
  with open("/proc/cpuinfo", encoding="utf-8") as f:
    for line in f:
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  with open("/proc/meminfo", encoding="utf-8") as f:
    mem_kb = int(next(l for l in f if l.startswith("MemTotal")).split()[1])
  versions = {}
  for pkg in ("jax", "jaxlib", "flax", "optax", "torch", "numpy"):
    try:
      versions[pkg] = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      versions[pkg] = "not installed"
  return {"nproc": os.cpu_count(), "cpu": cpu, "ram_gb": mem_kb / 2**20, "python": platform.python_version(),
          "versions": versions}


def loadavg() -> str:
  return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_pressure() -> float | None:
  """PSI 'some avg10' of the CPU: % of the last 10 s in which a runnable task waited for a CPU."""
  try:
    with open("/proc/pressure/cpu", encoding="utf-8") as f:
      return float(f.readline().split()[1].split("=")[1])
  except (OSError, IndexError, ValueError):
    return None


def spread(values, fmt):
  return {
      "median": fmt.format(statistics.median(values)),
      "iqr": f"{fmt.format(quantile(values, .25))}–{fmt.format(quantile(values, .75))}",
      "range": f"{fmt.format(min(values))}–{fmt.format(max(values))}",
  }


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--rounds", type=int, default=12, help="at most this many timed rounds")
  p.add_argument("--min_rounds", type=int, default=4, help="at least this many, whatever the budget")
  p.add_argument("--budget_seconds", type=float, default=120.0,
                 help="no new round starts after this much time in the timed rounds")
  p.add_argument("--chunk_seconds", type=float, default=1.0, help="approximate time per chunk")
  p.add_argument("--min_steps", type=int, default=2, help="at least this many steps per chunk")
  p.add_argument("--recipe", choices=sorted(RECIPES), default="study",
                 help="distillation setting: study (Fashion-MNIST 28×28×1, LeNet 0.5, NiN 0.25; all "
                      "benchmarks by default) or seed (CIFAR 32×32×3, LeNet 1.0, NiN 1.0 with the Caffe "
                      "head; the distillation benchmarks and the peak probes by default)")
  p.add_argument("--student_width", type=float, default=None, help="LeNet width (default: the recipe's)")
  p.add_argument("--teacher_width", type=float, default=None, help="NiN width (default: the recipe's)")
  p.add_argument("--kd_batch", type=int, default=256)
  p.add_argument("--amal_batch", type=int, default=128)
  p.add_argument("--amal_selection", default=None,
                 help="the amalgamation benchmarks' routing rule (default: the experiment's, "
                      "pool_lda; issue 12's before/after target is stated for teacher_card, which "
                      "the trees before pool_lda also have)")
  p.add_argument("--amal_teacher_blocks", default="",
                 help="the amalgamation teachers' block widths, e.g. 32-64-128 (issue 12's setting; "
                      "default: the experiment's teacher_blocks, 64-128-256 since 2026-12-03)")
  p.add_argument("--only", default="",
                 help="comma-separated benchmark names; a JAX one prefixed before_ runs the code of "
                      "--before_tree, prefixed noflag_ runs without kd_jax's CPU XLA flags")
  p.add_argument("--before_tree", default="", help="a kd_jax checkout (e.g. a worktree of an older commit) "
                                                   "for the before_ benchmarks")
  p.add_argument("--twin_xla_flags", default=None,
                 help="XLA_FLAGS of the before_ and noflag_ twins (default: the user's XLA_FLAGS)")
  p.add_argument("--json", default="", help="also write the raw timings here")
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)
  p.add_argument("--settings", default="", help=argparse.SUPPRESS)
  args = p.parse_args(argv)

  if args.worker:
    with open(args.settings, encoding="utf-8") as f:
      worker(args.worker, json.load(f))
    return

  # As the entry points do, before any JAX backend starts (the workers inherit it); the
  # user's own XLA_FLAGS are kept for the twins that run without kd_jax's flags.
  user_xla_flags = os.environ.get("XLA_FLAGS", "") if args.twin_xla_flags is None else args.twin_xla_flags
  sys.path.insert(0, REPO)  # here, not at the top: a before_ worker must import the old kd_jax
  from kd_jax import xla_flags  # pylint: disable=g-import-not-at-top  (no JAX import)

  xla_flags.configure_cpu()
  started = time.time()
  default = DISTILL_BENCHES if args.recipe == "seed" else BENCHES
  names = [n for n in args.only.split(",") if n] or list(default)
  unknown = {n for n in names if base_name(n) not in BENCHES
             or (base_name(n) != n and BENCHES[base_name(n)][0] != "jax")}
  if unknown:
    p.error(f"unknown benchmarks {sorted(unknown)}; choose from {', '.join(BENCHES)} "
            f"(JAX ones also prefixed {' or '.join(TWINS)})")
  if any(n.startswith("before_") for n in names) and not os.path.isdir(os.path.join(args.before_tree, "kd_jax")):
    p.error(f"before_ benchmarks need --before_tree, a directory holding kd_jax; got {args.before_tree!r}")
  date = subprocess.run(["date"], capture_output=True, text=True, check=False).stdout.strip()
  load_before, psi_before = loadavg(), cpu_pressure()
  cfg = settings(args)
  cfg_path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"step_time_settings_{os.getpid()}.json")
  with open(cfg_path, "w", encoding="utf-8") as f:
    json.dump(cfg, f)

  # All workers build and compile at once (nothing is timed yet); then the timed rounds.
  pending, workers, ready, skipped = {}, {}, {}, {}
  try:
    log(f"starting {len(names)} workers: {', '.join(names)}")
    for name in names:
      pending[name] = Worker(name, cfg_path, user_xla_flags=user_xla_flags, before_tree=args.before_tree)
    for name, w in pending.items():
      reply = w.request(None)
      if "skip" in reply:
        skipped[name] = reply["skip"]
        log(f"{name}: skipped: {reply['skip']}")
        w.proc.wait()
        continue
      workers[name], ready[name] = w, reply["ready"]
      tree = reply["ready"].get("kd_jax_tree")
      if tree and (tree == REPO) == name.startswith("before_"):  # the twin must run the other code
        raise RuntimeError(f"{name} imported kd_jax from {tree}")
      log(f"{name}: ready after {time.time() - started:.0f} s; warm step {1e3 * reply['ready']['warm_step_s']:.0f} ms")

    chunk = {n: max(args.min_steps, min(200, round(args.chunk_seconds / ready[n]["warm_step_s"])))
             for n in workers}
    rounds = {n: [] for n in workers}  # per round: median seconds per step in the chunk
    cpu_step = {n: [] for n in workers}  # per round: process CPU seconds per step
    raw = {n: [] for n in workers}
    loads, psi = [], []
    order = list(workers)
    timing_started = time.time()
    r = 0
    while order and r < args.rounds and (r < args.min_rounds or time.time() - timing_started < args.budget_seconds):
      rotated = order[r % len(order):] + order[:r % len(order)]
      for name in rotated:
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
    for w in pending.values():  # a worker still building exits at EOF once built
      if w.proc.poll() is None:
        try:
          w.proc.stdin.close()
        except OSError:
          pass
        try:
          w.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
          w.proc.kill()
    os.remove(cfg_path)
  load_after = loadavg()
  elapsed = time.time() - started

  # ----------------------------------------------------------------------------- report
  m = machine()
  d, a = cfg["distill"], cfg["amalgamation"]
  n_rounds = len(next(iter(rounds.values()))) if rounds else 0
  # The peak: per round, the faster of the two float32 matmul probes (GFLOP/s); each step's
  # achieved GFLOP/s is divided by the same round's peak, then the median over rounds taken.
  probes = [n for n in ("jax_matmul", "torch_matmul") if n in rounds]
  peak = [max(ready[n]["flops"] / rounds[n][r] for n in probes) / 1e9 for r in range(n_rounds)] if probes else []
  rows, ratio_rows = [], []
  for name in workers:
    info, wall_s = ready[name], statistics.median(rounds[name])
    gflop = info["flops"] / 1e9
    row = {
        "name": name, "what": describe(name), "framework": BENCHES[base_name(name)][0], "batch": info["batch"],
        "images_per_s": info["batch"] / wall_s if info["batch"] else None,
        "ms_per_step": 1e3 * wall_s, "cpu_ms_per_step": 1e3 * statistics.median(cpu_step[name]),
        "gflop_per_step": gflop,
        "gflop_source": ("XLA cost analysis, direct convolutions" if BENCHES[base_name(name)][0] == "jax"
                         else "torch flop counter"),
        "program_gflop_per_step": info["program_flops"] / 1e9 if "program_flops" in info else None,
        "gflop_per_s": gflop / wall_s,
        "fraction_of_peak": (statistics.median(gflop / w / pk for w, pk in zip(rounds[name], peak))
                             if peak else None),
        "student_params": info.get("student_params"), "teacher_params": info.get("teacher_params"),
        "rounds": len(rounds[name]), "steps_per_chunk": chunk[name], "start_up_cpu_s": info["first_step_cpu_s"],
        "peak_rss_mb": rss[name],
    }
    row["gflop_per_cpu_s"] = gflop / row["cpu_ms_per_step"] * 1e3
    rows.append(row)
  twin_ratios = [(f"{name[:-len(base_name(name))]}{base_name(name)} / {base_name(name)}", name, base_name(name),
                  "> 1: this code faster" if name.startswith("before_") else "> 1: the CPU flags help")
                 for name in workers if base_name(name) != name]
  for label, num, den, reading in (*RATIOS, *twin_ratios):
    if num in rounds and den in rounds:
      values = [x / y for x, y in zip(rounds[num], rounds[den])]
      cpu = [x / y for x, y in zip(cpu_step[num], cpu_step[den])]
      ratio_rows.append({"name": label, "numerator": num, "denominator": den, "reading": reading,
                         "median": statistics.median(values), "q25": quantile(values, .25),
                         "q75": quantile(values, .75), "min": min(values), "max": max(values),
                         "cpu_median": statistics.median(cpu), "cpu_q25": quantile(cpu, .25),
                         "cpu_q75": quantile(cpu, .75)})
  by_name = {r["name"]: r for r in ratio_rows}
  targets = []
  for label, key, invert, goal in TARGETS:
    if key in by_name:
      value = by_name[key]["cpu_median" if key in BY_CPU_TIME else "median"]
      value = 1 / value if invert else value
    elif key in {r["name"] for r in rows}:
      value = next(r["fraction_of_peak"] for r in rows if r["name"] == key)
    else:
      continue
    if value is not None:
      targets.append({"name": label, "value": value, "target": goal, "met": value >= goal})

  out = ["## Results", ""]
  out.append(f"- Date: {date}; the whole benchmark took {elapsed / 60:.1f} min.")
  out.append(f"- Machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram_gb']:.1f} GiB RAM; "
             f"Python {m['python']}; " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".")
  if loads:
    load = (f"- Background load: load average (1/5/15 min) {load_before} before, {load_after} after; "
            f"1-min load after each round median {statistics.median(loads):.1f} "
            f"({min(loads):.1f}–{max(loads):.1f}) on {m['nproc']} CPUs, this benchmark adding about 1–2")
    if psi:
      load += (f"; CPU pressure (PSI some avg10: % of time a runnable task waited for a CPU) "
               f"median {statistics.median(psi):.0f} % ({min(psi):.0f}–{max(psi):.0f})")
    out.append(load + ".")
  out.append(f"- XLA flags of the workers: `{os.environ.get('XLA_FLAGS', '')}` (kd_jax.xla_flags.configure_cpu; "
             f"twins: `{user_xla_flags}`).")
  inherited = {k: v for k, v in os.environ.items() if k.startswith(("JAX_", "OMP_", "MKL_"))}
  if inherited:
    out.append("- Environment passed to the workers: "
               + ", ".join(f"`{k}={v}`" for k, v in sorted(inherited.items())) + ".")
  out.append("- Command: `python benchmarks/step_time.py" + "".join(f" {x}" for x in sys.argv[1:]) + "`")
  if args.before_tree:
    head = subprocess.run(["git", "-C", args.before_tree, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=False).stdout.strip()
    out.append(f"- `before_*`: the code of `{args.before_tree}` (commit {head or 'unknown'}), the user's XLA flags.")
  out.append(f"- Distillation (recipe `{cfg['recipe']}`): LeNet width {d['student']['width']} student, NiN width "
             f"{d['teacher']['width']} teacher ({d['teacher']['head']} head, eval mode), batch {d['batch_size']}, "
             f"{'×'.join(map(str, d['image_shape']))} ({d['dataset']} shape), "
             f"T = {d['distill']['temperature']}, soft weight {d['distill']['soft_weight']}, Adam. "
             "PyTorch: NCHW float32, eager, `torch.set_num_threads(2)` unless marked 1 thread.")
  out.append(f"- Amalgamation: ConvNet {'-'.join(map(str, a['student_blocks']))} student and "
             f"{len(a['class_sets'])} teachers ({' / '.join('-'.join(map(str, t)) for t in a['teacher_blocks'])}), "
             f"{a['convs_per_block']} conv per block, classes {a['class_sets']}, selection "
             f"{a['cfg']['selection']}, {a['cfg']['routing']} routing, batch {a['batch_size']}, 28×28×1.")
  out.append(f"- Rounds: {n_rounds}; in each, every benchmark ran one chunk of steps (about "
             f"{args.chunk_seconds:g} s, at least {args.min_steps} step(s)) in a rotated order. ms/step: median "
             "over rounds of the chunk's median step, with the interquartile range. images/s: batch / ms/step. "
             "CPU ms/step: process CPU time (all threads, spinning included) per step. GFLOP/step: the model's "
             "FLOPs, by XLA's cost analysis of the step compiled with direct convolutions (× devices) for JAX, "
             "`torch.utils.flop_counter` (convolutions and matmuls only) for PyTorch, 2n³ for the matmul probes; "
             "program GFLOP: what the compiled JAX step executes (more where LeNet's blocks are polyphase, "
             "fewer where its conv2 trains in the frequency domain). % of peak: per round, the step's "
             "GFLOP/s over the faster matmul probe's GFLOP/s in that round, median over rounds. Start-up CPU: "
             "importing, building, compiling and running the first step, in CPU seconds. Peak RSS: VmHWM.")
  if peak:
    out.append(f"- Measured fp32 matmul peak ({' / '.join(probes)}, {MATMUL_SIZE}², faster of the two per round): "
               f"median {statistics.median(peak):.0f} GFLOP/s, best round {max(peak):.0f}.")
  for name, why in skipped.items():
    out.append(f"- `{name}`: skipped — {why}")
  out.append("")
  out.append("| benchmark | what | batch | ms/step | IQR | images/s | CPU ms/step | GFLOP/step | program GFLOP "
             "| GFLOP/s | % of peak | GFLOP per CPU-s | steps × rounds | start-up CPU s | peak RSS MB |")
  out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for row in rows:
    wall = spread([1e3 * x for x in rounds[row["name"]]], "{:.0f}")
    fmt = lambda v, f: "—" if v is None else f.format(v)
    out.append(
        f"| `{row['name']}` | {row['what']} | {row['batch'] or '—'} | **{wall['median']}** | {wall['iqr']} "
        f"| {fmt(row['images_per_s'], '{:.0f}')} | {row['cpu_ms_per_step']:.0f} | {row['gflop_per_step']:.2f} "
        f"| {fmt(row['program_gflop_per_step'], '{:.2f}')} | {row['gflop_per_s']:.1f} "
        f"| {fmt(row['fraction_of_peak'] and 100 * row['fraction_of_peak'], '{:.0f}')} "
        f"| {row['gflop_per_cpu_s']:.1f} | {row['steps_per_chunk']} × {row['rounds']} "
        f"| {row['start_up_cpu_s']:.1f} | {row['peak_rss_mb']:.0f} |")
  out.append("")
  out.append("Each ratio of step times is taken within a round (its two chunks ran seconds apart, under about "
             "the same load), then summarised over the rounds.")
  out.append("")
  out.append("| ratio | median | IQR | min–max | reading | by CPU time: median (IQR) |")
  out.append("|---|---:|---:|---:|---|---:|")
  for r in ratio_rows:
    out.append(f"| {r['name']} | **{r['median']:.2f}** | {r['q25']:.2f}–{r['q75']:.2f} | "
               f"{r['min']:.2f}–{r['max']:.2f} | {r['reading']} | "
               f"{r['cpu_median']:.2f} ({r['cpu_q25']:.2f}–{r['cpu_q75']:.2f}) |")
  if targets:
    out.append("")
    out.append("| target (issues 11, 12) | measured | goal | met |")
    out.append("|---|---:|---:|---|")
    for t in targets:
      out.append(f"| {t['name']} | **{t['value']:.2f}** | ≥ {t['target']:.2f} | {'yes' if t['met'] else 'no'} |")
  print("\n".join(out))
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"recipe": cfg["recipe"], "benchmarks": rows, "ratios": ratio_rows, "targets": targets,
                 "peak_gflop_s": {"median": statistics.median(peak) if peak else None, "per_round": peak,
                                  "probes": probes},
                 "settings": cfg, "machine": m, "date": date, "xla_flags": os.environ.get("XLA_FLAGS", ""),
                 "ready": ready, "round_medians_s": rounds, "steps_s": raw, "cpu_s_per_step": cpu_step,
                 "loadavg_1min": loads, "cpu_pressure": psi, "psi_before": psi_before,
                 "skipped": skipped}, f, indent=1)


if __name__ == "__main__":
  main()
