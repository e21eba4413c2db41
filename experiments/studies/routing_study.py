"""How often each selection rule routes a test image to the teacher that owns its class.

  python experiments/studies/routing_study.py --workdir=runs/ka [--workdir=runs/ka_seed1 ...]

Reads the trained teachers of amalgamation runs (their `teachers/teacher_<t>` or
`teacher_workdirs`), scores every test image of the union's classes by every rule of
`kd_jax.amalgamation.routing`, and prints a Markdown table of routing accuracy (mean ± std over
the given runs). Energy is standardised per teacher, and the pool_lda router fitted, on the
unlabelled training pool (`train_split`), with the run's `amalgamation.pool_grid` unless
`--pool_grid` is given.
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from kd_jax.ops.xla_flags import configure_cpu  # noqa: E402  isort: skip

configure_cpu()  # CPU-only speed flags, before JAX starts
# isort: split

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from kd_jax import checkpoint, data, models  # noqa: E402
from kd_jax.amalgamation import routing  # noqa: E402
from kd_jax.amalgamation import step as step_lib  # noqa: E402


def teacher_outputs(teachers, data_config, split, classes, grid, batch_size=512):
  """Logits, penultimate and pooled block features (`grid`) of every teacher over `split`
  (union classes), and the labels (which only score the rules)."""
  fns = [
    jax.jit(
      lambda v, x, m=m: (
        lambda o: (o[0], models.penultimate(o[1]), step_lib.pooled_blocks(o[1], grid))
      )(m.apply(v, x, train=False))
    )
    for m, _ in teachers
  ]
  outputs, labels = [[[] for _ in teachers] for _ in range(3)], []
  ds = data.make_dataset(data_config, split, batch_size=batch_size, train=False, classes=classes)
  for batch in data.as_numpy(ds):
    keep = batch["mask"].astype(bool)
    labels.append(batch["label"][keep])
    for t, ((_, variables), fn) in enumerate(zip(teachers, fns)):
      for rows, out in zip(outputs, fn(variables, batch["image"])):
        rows[t].append(np.asarray(out)[keep])
  return [[np.concatenate(r) for r in rows] for rows in outputs], np.concatenate(labels)


def routing_accuracies(workdir: str, pool_grid: int | None = None) -> dict[str, float]:
  meta = checkpoint.read_meta(workdir)
  config = ml_collections.ConfigDict(meta["config"])
  grid = pool_grid or config.get("amalgamation", {}).get("pool_grid", 1)
  names = sorted(k for k in meta["models"] if k.startswith("teacher_"))
  teachers = [checkpoint.load(workdir, item=name) for name in names]
  class_sets = [meta["models"][name]["classes"] for name in names]
  union = [c for cs in class_sets for c in cs]
  owner = np.concatenate([[t] * len(cs) for t, cs in enumerate(class_sets)])
  cards = []
  for name in names:
    origin = meta["models"][name]["origin"]["workdir"]
    ckpts = checkpoint.Checkpoints(origin, read_only=True)
    cards.append(routing.TeacherCard.from_dict(ckpts.restore(None, {"card": None})["card"]))
    ckpts.close()
  (logits, feats, blocks), labels = teacher_outputs(teachers, config.data, "test", union, grid)
  pool = config.get("train_split", "train")
  (pool_logits, pool_feats, pool_blocks), _ = teacher_outputs(
    teachers, config.data, pool, union, grid
  )
  energy = routing.fit_energy_stats(pool_logits)
  class_index = [[union.index(c) for c in cs] for cs in class_sets]
  start = routing.card_routed_classes(pool_logits, pool_feats, cards, class_index)
  balance = config.get("amalgamation", {}).get("pool_balance_rounds", 0)
  router = routing.fit_pool_router(
    pool_blocks,
    start,
    class_index,
    balance_rounds=balance,
    class_shares=routing.class_shares(cards, class_index),
  )
  out = {}
  for rule in routing.RULES:
    scores = routing.teacher_scores(
      rule,
      logits=logits,
      features=blocks if rule == "pool_lda" else feats,
      cards=cards,
      energy_stats=energy,
      pool_router=router,
    )
    out[rule] = float(routing.routing_accuracy(routing.route(scores), owner[labels]))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--workdir", action="append", required=True, help="an amalgamation run (repeatable)"
  )
  parser.add_argument(
    "--pool_grid", type=int, default=None, help="pool_lda's grid (default: each run's)"
  )
  args = parser.parse_args()
  runs = [routing_accuracies(w, args.pool_grid) for w in args.workdir]
  print("| rule | routing accuracy (test) |\n|---|---|")
  for rule in routing.RULES:
    values = np.array([r[rule] for r in runs])
    print(f"| {rule} | {values.mean():.3f} ± {values.std():.3f} (n={len(values)}) |")


if __name__ == "__main__":
  main()
