"""What `step_time.py` times: the benchmarks, their settings, the ratios and the targets.

One table of names shared by the parent (which reports) and the workers (which build the
steps), so that a benchmark's framework, device count and description are stated once.
"""

from __future__ import annotations

import importlib.util
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from kd_jax.choices import ZOO_METHODS  # noqa: E402  (the methods the zoo rows time)

AMAL_IMAGE_SHAPE = (28, 28, 1)  # the amalgamation benchmarks: Fashion-MNIST in both recipes
NUM_CLASSES = 10
MATMUL_SIZE = 2048  # the peak probe: a float32 [n, n] @ [n, n]
# --recipe: the distillation benchmarks' setting. 'study' is the Fashion-MNIST setting of the
# distillation study's teacher (NiN 0.25); 'seed' the distillation seed's own: full-width NiN
# (Caffe head) → full-width LeNet on CIFAR-shaped images.
RECIPES = {
  "study": dict(
    dataset="fashion_mnist", image_shape=(28, 28, 1), student_width=0.5, teacher_width=0.25
  ),
  "seed": dict(dataset="cifar10", image_shape=(32, 32, 3), student_width=1.0, teacher_width=1.0),
}
# Twins of the JAX benchmarks: the same step from the code before this work (--before_tree,
# e.g. a worktree of an older commit) and from this code without kd_jax's CPU XLA flags.
TWINS = {
  "before_": "code of --before_tree, the twins' XLA flags",
  "noflag_": "this code, the twins' XLA flags",
}

# name: (framework, devices, description)
BENCHES = {
  "jax_kd": ("jax", 1, "kd_jax hinton_kd step (LeNet + frozen NiN)"),
  "jax_kd_cached": ("jax", 1, "kd_jax hinton_kd step on cached teacher logits (the default)"),
  "jax_gt": ("jax", 1, "kd_jax ground-truth step (LeNet alone)"),
  "jax_teacher_fwd": ("jax", 1, "NiN teacher forward alone"),
  "torch_kd": ("torch", 1, "PyTorch hinton_kd step (LeNet + frozen NiN)"),
  "torch_gt": ("torch", 1, "PyTorch ground-truth step (LeNet alone)"),
  "torch_teacher_fwd": ("torch", 1, "PyTorch NiN teacher forward alone"),
  "jax_amalgamation": (
    "jax",
    1,
    "kd_jax amalgamation step (2 teachers; routing rule in the settings below)",
  ),
  "jax_convnet_gt": ("jax", 1, "ground-truth step of the amalgamation student alone"),
  "jax_amal_teachers": ("jax", 1, "2 teachers' forward + routing alone"),
  "jax_gt_2dev": ("jax", 2, "kd_jax ground-truth step (LeNet), 2 host devices"),
  "jax_gt_loop": ("jax", 1, "the training loop around jax_gt (data, prefetch, step, bookkeeping)"),
  "jax_amalgamation_loop": ("jax", 1, "the training loop around jax_amalgamation"),
  "jax_gt_bf16": ("jax", 1, "jax_gt computing in bfloat16"),
  "jax_amalgamation_bf16": (
    "jax",
    1,
    "jax_amalgamation computing in bfloat16 (student and teachers)",
  ),
  "torch_kd_1thread": ("torch", 1, "PyTorch hinton_kd step, 1 thread"),
  "torch_gt_1thread": ("torch", 1, "PyTorch ground-truth step, 1 thread"),
  "jax_matmul": ("jax", 1, f"JAX float32 matmul {MATMUL_SIZE}² (the peak probe)"),
  "torch_matmul": (
    "torch",
    1,
    f"PyTorch float32 matmul {MATMUL_SIZE}², 2 threads (the peak probe)",
  ),
}
# The method zoo (kd_jax.train.zoo): each method's step against a PyTorch port of the same step
# with torchdistill's loss class (benchmarks/torch_zoo.py), the teacher in both steps.
for _method in ZOO_METHODS:
  BENCHES[f"jax_{_method}"] = ("jax", 1, f"kd_jax {_method} step (LeNet + frozen NiN)")
  BENCHES[f"torch_{_method}"] = ("torch", 1, f"PyTorch {_method} step, torchdistill's loss")
ZOO_BENCHES = tuple(f"{fw}_{m}" for m in ZOO_METHODS for fw in ("jax", "torch"))
# What --recipe=seed runs by default: the distillation benchmarks and the peak probes.
DISTILL_BENCHES = (
  "jax_kd",
  "jax_kd_cached",
  "jax_gt",
  "jax_teacher_fwd",
  "torch_kd",
  "torch_gt",
  "torch_teacher_fwd",
  "torch_kd_1thread",
  "torch_gt_1thread",
  "jax_matmul",
  "torch_matmul",
)

_SLOWER = "> 1: JAX slower"
_LOOP_GOAL = "≤ 1.11: the loop keeps ≥ 0.9× the bare step's rate"
_NO_BF16 = "> 1: bfloat16 slower (no bf16 hardware here)"
# (label, numerator, denominator, how to read it)
RATIOS = (
  ("KD step / GT step (JAX)", "jax_kd", "jax_gt", "cost of distilling vs plain training"),
  (
    "teacher forward / KD step (JAX)",
    "jax_teacher_fwd",
    "jax_kd",
    "teacher's share of the KD step",
  ),
  ("KD step on cached logits / KD step (JAX)", "jax_kd_cached", "jax_kd", "what caching saves"),
  (
    "KD step on cached logits / GT step (JAX)",
    "jax_kd_cached",
    "jax_gt",
    "what distilling still costs",
  ),
  ("KD step / GT step (PyTorch)", "torch_kd", "torch_gt", ""),
  ("teacher forward / KD step (PyTorch)", "torch_teacher_fwd", "torch_kd", ""),
  ("JAX KD / PyTorch KD", "jax_kd", "torch_kd", _SLOWER),
  ("JAX KD / PyTorch KD on 1 thread", "jax_kd", "torch_kd_1thread", _SLOWER),
  ("JAX GT / PyTorch GT", "jax_gt", "torch_gt", _SLOWER),
  ("JAX teacher fwd / PyTorch teacher fwd", "jax_teacher_fwd", "torch_teacher_fwd", _SLOWER),
  ("amalgamation step / ConvNet GT step", "jax_amalgamation", "jax_convnet_gt", ""),
  (
    "teachers fwd + routing / amalgamation step",
    "jax_amal_teachers",
    "jax_amalgamation",
    "teachers' share of the amalgamation step",
  ),
  ("GT step 2 devices / 1 device", "jax_gt_2dev", "jax_gt", "shard_map overhead on shared cores"),
  ("GT loop / GT step (LeNet)", "jax_gt_loop", "jax_gt", _LOOP_GOAL),
  (
    "amalgamation loop / amalgamation step",
    "jax_amalgamation_loop",
    "jax_amalgamation",
    _LOOP_GOAL,
  ),
  ("GT step bfloat16 / float32", "jax_gt_bf16", "jax_gt", _NO_BF16),
  ("amalgamation step bfloat16 / float32", "jax_amalgamation_bf16", "jax_amalgamation", _NO_BF16),
  (
    "PyTorch KD 1 thread / 2 threads",
    "torch_kd_1thread",
    "torch_kd",
    "< 1: OpenMP suffers from the load",
  ),
  ("JAX GT / PyTorch GT on 1 thread", "jax_gt", "torch_gt_1thread", _SLOWER),
  (
    "JAX KD on cached logits / PyTorch GT",
    "jax_kd_cached",
    "torch_gt",
    "> 1: JAX slower (target ≤ 1/1.3)",
  ),
  ("PyTorch matmul / JAX matmul", "torch_matmul", "jax_matmul", "> 1: PyTorch's matmul slower"),
)
RATIOS += tuple(
  (f"JAX {m} / PyTorch {m}", f"jax_{m}", f"torch_{m}", "> 1: JAX slower (target ≤ 1/1.5)")
  for m in ZOO_METHODS
)
# Issues 11 and 12's targets: (label, ratio label or benchmark name, invert the ratio, goal). A
# speed-up is the inverse of a JAX / PyTorch time ratio; "the KD step (teacher in it)" is its
# fraction of the peak. The loop targets are read by CPU time (see BY_CPU_TIME).
TARGETS = (
  ("KD step, teacher in it: JAX images/s ÷ PyTorch (2 threads)", "JAX KD / PyTorch KD", True, 1.5),
  ("KD step on cached logits ÷ PyTorch GT step", "JAX KD on cached logits / PyTorch GT", True, 1.3),
  ("LeNet GT step (this run's width): JAX ÷ PyTorch", "JAX GT / PyTorch GT", True, 1.3),
  ("amalgamation step: before ÷ now", "before_jax_amalgamation / jax_amalgamation", False, 1.5),
  ("KD step (teacher in it): fraction of the fp32 peak", "jax_kd", False, 0.5),
  (
    "LeNet GT: whole loop's steps per CPU-s ÷ bare step's (issue 11)",
    "GT loop / GT step (LeNet)",
    True,
    0.9,
  ),
  (
    "amalgamation: whole loop's steps per CPU-s ÷ bare step's (issue 11)",
    "amalgamation loop / amalgamation step",
    True,
    0.9,
  ),
)
TARGETS += tuple(
  (f"{m} step: JAX images/s ÷ PyTorch (issue 35)", f"JAX {m} / PyTorch {m}", True, 1.5)
  for m in ZOO_METHODS
)
# Ratios whose target is read by CPU time: a loop iteration does not wait for its own step, a
# bare step does, and under heavy load the waiting (descheduled) process loses the CPU, so
# their wall-time ratio measures the scheduler more than the code.
BY_CPU_TIME = ("GT loop / GT step (LeNet)", "amalgamation loop / amalgamation step")


def base_name(name: str) -> str:
  """The benchmark a twin (`before_jax_kd`, `noflag_jax_kd`) runs."""
  for prefix in TWINS:
    if name.startswith(prefix):
      return name[len(prefix) :]
  return name


def framework(name: str) -> str:
  """'jax' or 'torch': what runs benchmark `name` (a twin's is its base's)."""
  return BENCHES[base_name(name)][0]


def describe(name: str) -> str:
  """The table's description of benchmark `name`, with a twin's code and flags."""
  base = base_name(name)
  return BENCHES[base][2] + (f" — {TWINS[name[: -len(base)]]}" if base != name else "")


def unknown(names) -> set:
  """The names in `names` that are no benchmark (twins exist of the JAX ones only)."""
  return {
    n for n in names if base_name(n) not in BENCHES or (base_name(n) != n and framework(n) != "jax")
  }


def load_config(relpath: str, arg: str):
  """`get_config(arg)` of an experiment file, as training reads it."""
  path = os.path.join(REPO, relpath)
  spec = importlib.util.spec_from_file_location(os.path.basename(relpath)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def settings(args) -> dict:
  """Everything a worker needs, as JSON-ready values read from the experiment configs.

  Called in the parent, so that the workers do not load TensorFlow to read configs.
  """
  sys.path.insert(0, REPO)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  recipe = RECIPES[args.recipe]
  student_width = recipe["student_width"] if args.student_width is None else args.student_width
  teacher_width = recipe["teacher_width"] if args.teacher_width is None else args.teacher_width
  student = load_config(
    "experiments/lenet_student.py",
    f"method=hinton_kd,dataset={recipe['dataset']},width={student_width}",
  )
  teacher = load_config(
    "experiments/nin_teacher.py", f"dataset={recipe['dataset']},width={teacher_width}"
  )
  selection = f",selection={args.amal_selection}" if args.amal_selection else ""
  amal = load_config("experiments/amalgamate.py", "dataset=fashion_mnist" + selection)
  if amal.block_pairs != "auto":
    raise SystemExit(
      f"the benchmark builds block_pairs='auto', the config has {amal.block_pairs!r}"
    )
  class_sets = [[int(c) for c in g.split("+")] for g in amal.teacher_classes.split("/")]
  blocks = args.amal_teacher_blocks or amal.teacher_blocks
  teacher_blocks = [[int(w) for w in g.split("-")] for g in blocks.split("/")]
  if len(teacher_blocks) == 1:
    teacher_blocks *= len(class_sets)
  zoo = {
    m: load_config("experiments/lenet_student.py", f"method={m},dataset={recipe['dataset']}")
    .distill[m]
    .to_dict()
    for m in ZOO_METHODS
  }
  return {
    "recipe": args.recipe,
    "zoo": zoo,
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
