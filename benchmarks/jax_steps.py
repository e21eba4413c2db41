"""The JAX steps `step_time.py` times, built exactly as training builds them.

`build(name, cfg)` returns `(run_one_step, info, count_flops)`: a call that runs one step and
waits for it, what the report says about it (batch, parameter counts, the kd_jax tree it
imported) and a call that counts one step's FLOPs with XLA's cost analysis. The steps come
from `kd_jax.train.steps` and `kd_jax.amalgamation.step`, compiled by
`kd_jax.train.mesh.data_parallel_step`; the `_loop` benchmarks add the training loop's public
parts (`kd_jax.train.loop`, `kd_jax.train.faults`).

A `before_` twin runs this module against the kd_jax of `--before_tree` (`KD_JAX_TREE`), an
older checkout, so the imports of what moved since (routing, the CPU kernels, the loop's parts)
fall back to where an old tree has them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import suite
from suite import AMAL_IMAGE_SHAPE, MATMUL_SIZE, NUM_CLASSES

DISTILL_STEPS = ("jax_kd", "jax_kd_cached", "jax_gt", "jax_gt_2dev", "jax_teacher_fwd")


class Forward(NamedTuple):
  """A forward pass timed alone (no training step): a jitted function and its arguments."""

  fn: Callable
  args: tuple


class Step(NamedTuple):
  """A training step to time, with what it runs on."""

  step_fn: Callable
  state: Any
  frozen: Any
  batch: dict


def build(name: str, cfg: dict):
  """`(run_one_step, info, count_flops)` of JAX benchmark `name`, placed like training."""
  loop_bench, bf16 = name.endswith("_loop"), name.endswith("_bf16")
  name = name.removesuffix("_loop").removesuffix("_bf16")  # the step they run
  sys.path.insert(0, os.environ.get("KD_JAX_TREE", suite.REPO))  # a before_ twin: the old tree
  import jax
  import numpy as np

  import kd_jax
  from kd_jax.train import mesh as mesh_lib

  tree = os.path.dirname(os.path.dirname(os.path.abspath(kd_jax.__file__)))
  if jax.config.read("jax_disable_most_optimizations"):
    raise SystemExit(
      "jax_disable_most_optimizations is set: refusing to benchmark unoptimised code"
    )
  mesh = mesh_lib.make_mesh()
  expected = suite.BENCHES[name][1]
  if mesh.size != expected:
    raise SystemExit(f"{name}: expected {expected} devices, got {mesh.size} ({jax.devices()})")
  rng = np.random.default_rng(0)
  info = {"devices": mesh.size, "kd_jax_tree": tree}

  if name == "jax_matmul":
    a = jax.device_put(rng.standard_normal((MATMUL_SIZE, MATMUL_SIZE)).astype(np.float32))
    matmul = jax.jit(lambda a, b: a @ b)
    info.update(batch=None, student_params=None, teacher_params=None)
    return (lambda: jax.block_until_ready(matmul(a, a))), info, lambda: 2.0 * MATMUL_SIZE**3
  if name in DISTILL_STEPS:
    build_step = _distillation
  elif name.removeprefix("jax_") in suite.ZOO_METHODS:
    build_step = _zoo
  else:
    build_step = _amalgamation
  built = build_step(name, cfg, mesh, rng, info, bf16)
  if isinstance(built, Forward):
    return _forward(built, info)
  step_fn, state, frozen, batch = built
  if loop_bench:
    data_cfg = cfg["amalgamation" if name == "jax_amalgamation" else "distill"]
    return whole_loop(
      data_cfg, step_fn, state, frozen, mesh, info, labels=name != "jax_amalgamation"
    )
  compiled = mesh_lib.data_parallel_step(step_fn, mesh)
  box = {"state": mesh_lib.replicate(state, mesh)}
  frozen = mesh_lib.replicate(frozen, mesh)
  batch = mesh_lib.shard_batch(batch, mesh)  # placed once: input transfer is not timed

  def one_step():
    box["state"], metrics = compiled(box["state"], batch, frozen)
    jax.block_until_ready((box["state"], metrics))

  return one_step, info, lambda: xla_flops(compiled, box["state"], batch, frozen)


def _forward(forward: Forward, info: dict):
  """`build`'s triple for a forward pass, its arguments placed on the device once."""
  import jax

  fn, args = forward.fn, jax.device_put(forward.args)
  return (lambda: jax.block_until_ready(fn(*args))), info, lambda: xla_flops(fn, *args)


def _n_params(tree) -> int:
  import jax
  import numpy as np

  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def model_kwargs(model: dict) -> dict:
  """The model config without `dtype` at its float32 default: the trees before mixed precision
  (e.g. a `--before_tree`) do not know the field."""
  return {k: v for k, v in model.items() if not (k == "dtype" and v == "float32")}


def _distillation(name, cfg, mesh, rng, info, bf16):
  """LeNet student and NiN teacher: the `Step`, or the teacher's `Forward` alone."""
  import jax
  import ml_collections
  import numpy as np

  from kd_jax import models
  from kd_jax.train import mesh as mesh_lib
  from kd_jax.train import steps
  from kd_jax.train.state import TrainState

  d = cfg["distill"]
  batch_size, image_shape = d["batch_size"], tuple(d["image_shape"])
  mesh_lib.check_batch_size(batch_size, mesh)
  student = models.build(
    {
      **model_kwargs(d["student"]),
      "num_classes": NUM_CLASSES,
      **({"dtype": "bfloat16"} if bf16 else {}),
    }
  )
  teacher = models.build({**model_kwargs(d["teacher"]), "num_classes": NUM_CLASSES})
  dummy = np.zeros((1, *image_shape), np.float32)
  teacher_vars = teacher.init(jax.random.PRNGKey(1), dummy, train=False)
  batch = {
    "image": rng.standard_normal((batch_size, *image_shape)).astype(np.float32),
    "label": rng.integers(0, NUM_CLASSES, batch_size).astype(np.int32),
  }
  info.update(batch=batch_size, student_params=None, teacher_params=_n_params(teacher_vars))
  if name == "jax_teacher_fwd":
    fwd = jax.jit(lambda v, x: steps.apply_model(teacher, v, x, train=False))
    return Forward(fwd, (teacher_vars, batch["image"]))

  method = "ground_truth" if name.startswith("jax_gt") else "hinton_kd"
  distill = ml_collections.ConfigDict(d["distill"])
  tx = steps.make_optimizer(ml_collections.ConfigDict(d["optim"]), total_steps=10_000)
  in_step_teacher = name == "jax_kd"
  if name == "jax_kd_cached":  # what the training loop's cache feeds the step
    batch["teacher_logits"] = np.asarray(
      steps.apply_model(teacher, teacher_vars, batch["image"], train=False)
    )
  step_fn = steps.make_train_step(
    student=student,
    tx=tx,
    objective=steps.make_objective(method, distill),
    teacher=teacher if in_step_teacher else None,
    teacher_dropout=bool(distill.get("teacher_dropout", False)),
  )
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(0))
  variables = student.init(init_rng, dummy, train=False)
  state = TrainState.create(variables=variables, tx=tx, rng=train_rng)
  info["student_params"] = _n_params(state.params)
  if method == "ground_truth":
    info["teacher_params"] = None
  return Step(step_fn, state, teacher_vars if in_step_teacher else {}, batch)


def _zoo(name, cfg, mesh, rng, info, bf16):
  """A zoo method's step (`kd_jax.train.zoo`), the teacher in it, as training builds it; CRD's
  memory has a row per training example of the recipe's dataset (60,000)."""
  import jax
  import ml_collections
  import numpy as np

  from kd_jax import models
  from kd_jax.train import steps, zoo

  method = name.removeprefix("jax_")
  d = cfg["distill"]
  batch_size, image_shape = d["batch_size"], tuple(d["image_shape"])
  student = models.build({**d["student"], "num_classes": NUM_CLASSES})
  teacher = models.build({**d["teacher"], "num_classes": NUM_CLASSES})
  teacher_vars = teacher.init(jax.random.PRNGKey(1), np.zeros((1, *image_shape)), train=False)
  config = ml_collections.ConfigDict(
    dict(method=method, distill={**d["distill"], method: cfg["zoo"][method]})
  )
  plan = zoo.make_plan(
    config, student, teacher, image_shape, num_examples=60_000, steps_per_epoch=100
  )
  tx = steps.make_optimizer(ml_collections.ConfigDict(d["optim"]), total_steps=10_000)
  state = zoo.init_state(plan, tx, 0, image_shape)
  batch = {
    "image": rng.standard_normal((batch_size, *image_shape)).astype(np.float32),
    "label": rng.integers(0, NUM_CLASSES, batch_size).astype(np.int32),
  }
  if method == "crd":
    batch["index"] = rng.choice(60_000, batch_size, replace=False).astype(np.int32)
  info.update(
    batch=batch_size,
    student_params=_n_params(state.params),
    teacher_params=_n_params(teacher_vars),
  )
  step_fn = zoo.make_step(plan, tx=tx, teacher=teacher)
  return Step(step_fn, state, teacher_vars, batch)


def _routing():
  """kd_jax's routing module, where the imported tree has it."""
  try:
    from kd_jax.amalgamation import routing
  except ImportError:  # a --before_tree from before routing moved into amalgamation/
    from kd_jax import routing
  return routing


def _amalgamation(name, cfg, mesh, rng, info, bf16):
  """ConvNet student and teachers, as `kd_jax.amalgamation.pipeline` plans them, without its
  data imports: the `Step`, or the teachers' forward and routing alone as a `Forward`."""
  import jax
  import ml_collections
  import numpy as np

  from kd_jax import models
  from kd_jax.amalgamation import step as amal_step
  from kd_jax.train import mesh as mesh_lib
  from kd_jax.train import steps
  from kd_jax.train.state import TrainState

  routing = _routing()
  a = cfg["amalgamation"]
  batch_size = a["batch_size"]
  mesh_lib.check_batch_size(batch_size, mesh)
  amal_cfg = ml_collections.ConfigDict(a["cfg"])
  if amal_cfg.selection not in routing.RULES:
    raise SystemExit(
      f"{name}: the kd_jax of {info['kd_jax_tree']} has no selection {amal_cfg.selection!r} "
      f"(it has {', '.join(routing.RULES)}): pass --amal_selection=teacher_card"
    )
  if bf16:
    amal_cfg.update(dict(dtype="bfloat16", teacher_dtype="bfloat16"))
  union = list(dict.fromkeys(c for classes in a["class_sets"] for c in classes))
  convnet = lambda classes, widths: models.ConvNet(
    num_classes=classes,
    block_widths=tuple(widths),
    convs_per_block=a["convs_per_block"],
    norm="batch",
  )
  teachers = tuple(
    convnet(len(classes), widths) for classes, widths in zip(a["class_sets"], a["teacher_blocks"])
  )
  student = convnet(len(union), a["student_blocks"])
  plan = amal_step.Plan(
    student=student,
    teachers=teachers,
    class_index=tuple(tuple(union.index(c) for c in classes) for classes in a["class_sets"]),
    pairs=tuple(
      amal_step.auto_pairs(len(student.block_widths), len(t.block_widths)) for t in teachers
    ),
  )
  dummy = np.zeros((1, *AMAL_IMAGE_SHAPE), np.float32)
  teacher_vars = [
    t.init(jax.random.PRNGKey(10 + i), dummy, train=False) for i, t in enumerate(teachers)
  ]
  cards = []
  for t, classes in zip(teachers, a["class_sets"]):  # cards fitted on random features
    features = rng.standard_normal((1024, t.block_widths[-1])).astype(np.float32)
    cards.append(
      routing.fit_teacher_card(
        features,
        np.arange(1024) % len(classes),
        num_classes=len(classes),
        shrinkage=a["card_shrinkage"],
      )
    )
  frozen = {"teachers": teacher_vars}
  if amal_cfg.selection in ("teacher_card", "pool_lda"):
    frozen["cards"] = cards
  if amal_cfg.selection == "pool_lda":  # fitted on random pooled block features, like the cards
    _, feats, _ = amal_step.teacher_outputs(plan, teacher_vars, dummy)
    dims = [amal_step.pooled_blocks(f, amal_cfg.get("pool_grid", 1)).shape[-1] for f in feats]
    frozen["pool_router"] = routing.fit_pool_router(
      [rng.standard_normal((1024, d)).astype(np.float32) for d in dims],
      np.arange(1024) % len(union),
      plan.class_index,
    )
  images = rng.standard_normal((batch_size, *AMAL_IMAGE_SHAPE)).astype(np.float32)
  info.update(
    batch=batch_size,
    selection=amal_cfg.selection,
    routing=amal_cfg.routing,
    teacher_params=sum(_n_params(v["params"]) for v in teacher_vars),
  )
  if name == "jax_amal_teachers":

    def teachers_fwd(frozen, x):
      logits, feats, penultimate = amal_step.teacher_outputs(plan, frozen["teachers"], x)
      weights = amal_step.routing_weights(amal_cfg, logits, penultimate, frozen, blocks=feats)
      return logits, weights

    return Forward(jax.jit(teachers_fwd), (frozen, images))

  tx = steps.make_optimizer(
    ml_collections.ConfigDict(
      dict(
        learning_rate=amal_cfg.learning_rate,
        decay_at=amal_cfg.decay_at,
        decay_factor=amal_cfg.decay_factor,
        weight_decay=0.0,
      )
    ),
    total_steps=10_000,
  )
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(0))
  if name == "jax_amalgamation":
    variables = amal_step.init_params(plan, init_rng, AMAL_IMAGE_SHAPE)
    state = TrainState(
      step=np.zeros((), np.int32),
      params=variables["params"],
      batch_stats=variables["batch_stats"],
      opt_state=tx.init(variables["params"]),
      rng=np.asarray(train_rng, np.uint32),
    )
    info["student_params"] = _n_params(state.params["student"])
    batch = {"image": images}  # labels never reach the amalgamation step
    return Step(amal_step.make_step(plan, amal_cfg, tx), state, frozen, batch)
  # jax_convnet_gt
  variables = student.init(init_rng, dummy, train=False)
  state = TrainState.create(variables=variables, tx=tx, rng=train_rng)
  step_fn = steps.make_train_step(
    student=student, tx=tx, objective=steps.make_objective("ground_truth", {})
  )
  labels = rng.integers(0, len(union), batch_size).astype(np.int32)
  info.update(teacher_params=None, student_params=_n_params(state.params))
  return Step(step_fn, state, {}, {"image": images, "label": labels})


def _loop_parts():
  """`(host_batches, compile_step, zero_sums, NonfiniteGuard)`: the training loop's parts."""
  from kd_jax.train import loop

  try:
    from kd_jax.train import faults

    return loop.host_batches, loop.compile_step, loop.zero_sums, faults.NonfiniteGuard
  except (ImportError, AttributeError):  # a --before_tree from before these were public
    return loop._host_batches, loop._step_with_sums, loop._zero_sums, _old_guard(loop)


def _old_guard(loop):
  """An old tree's guard, given the `record` of today's (its loop set `pending` itself)."""

  class Guard(loop._NonfiniteGuard):
    def record(self, step, mask):
      self.check()
      self.pending = (step, mask)

  return Guard


def whole_loop(cfg: dict, step_fn, state, frozen, mesh, info, *, labels: bool):
  """One iteration of `kd_jax.train.loop.fit`'s inner loop per call, built from its public
  parts: host batches (tf.data, uint8), the on-device prefetch, the step compiled with its
  preprocessing and metric sums, the divergence guard a step late, the log and checkpoint
  intervals. Logged metrics are pulled to the host as the loop does; nothing is written."""
  import jax
  import ml_collections

  from kd_jax import data
  from kd_jax.train import loop
  from kd_jax.train import mesh as mesh_lib

  host_batches, compile_step, zero_sums, NonfiniteGuard = _loop_parts()
  classes = (
    list(dict.fromkeys(c for cs in cfg["class_sets"] for c in cs)) if "class_sets" in cfg else None
  )
  config = ml_collections.ConfigDict(
    dict(
      data=cfg["data"],
      batch_size=cfg["batch_size"],
      seed=0,
      num_epochs=10_000,
      steps_per_epoch=0,
      log_every_steps=50,
      checkpoint_every_steps=500,
    )
  )
  steps_per_epoch = loop.steps_per_epoch_of(config, classes)
  prepare = None if labels else (lambda batch: {"image": batch["image"]})
  batches = mesh_lib.prefetch(
    host_batches(config, "train", classes, steps_per_epoch, 0, prepare), mesh
  )
  compiled = compile_step(step_fn, mesh, data.device_preprocess(config.data))
  frozen = mesh_lib.replicate(frozen, mesh)
  box = {"state": mesh_lib.replicate(state, mesh), "step": 0, "sums": None}
  guard = NonfiniteGuard("stop")

  def one_step():
    batch = next(batches)
    if box["sums"] is None:
      box["sums"] = mesh_lib.replicate(zero_sums(compiled, box["state"], batch, frozen), mesh)
    box["state"], metrics, nonfinite, box["sums"] = compiled(
      box["state"], batch, frozen, box["sums"]
    )
    box["step"] = step = box["step"] + 1
    guard.record(step, nonfinite)  # checks the previous step's mask
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


def _conv_pool():
  """kd_jax's LeNet kernels module, or None for a tree from before them."""
  try:
    from kd_jax.ops import conv_pool
  except ImportError:  # a --before_tree from before the kernels moved to kd_jax/ops/
    try:
      from kd_jax.models import conv_pool
    except ImportError:  # ... or from before LeNet's polyphase and spectral forms
      return None
  return conv_pool


def model_flops(count_flops) -> float:
  """The FLOPs of the step as its model defines it, with every convolution direct: what "% of
  peak" divides by (model FLOPs utilisation).

  LeNet's blocks compute some layers in polyphase form (more FLOPs) and train conv2 in the
  frequency domain (fewer); counted as executed, a step that got faster by dropping FLOPs would
  show a lower fraction of the peak. The program is traced anew (caches cleared) with both
  forms switched off, then the caches are cleared again so that the timed step recompiles as it
  is. A `--before_tree` without these forms (or not all of their switches): as counted.
  """
  import jax

  conv_pool = _conv_pool()
  if conv_pool is None:
    return count_flops()
  direct = {
    "SPECTRAL_MIN_INPUT_CHANNELS": sys.maxsize,
    "POLYPHASE_MAX_CHANNELS": 0,
    "POLYPHASE_MAX_CHANNELS_ELSEWHERE": 0,
  }
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
