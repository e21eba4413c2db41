"""The teacher's outputs a zoo method needs, cached once where they fit a memory budget.

With `distill.cache_teacher_logits` (and no teacher dropout or augmentation, see
`kd_jax.train.distill.caches_teacher_logits`), the teacher's logits and the feature maps the
method taps are computed once over the training split when they fit `distill.cache_budget_mb`
MiB of host memory (float32); the step then reads them by each example's 'index' instead of
running the teacher.
"""

from __future__ import annotations

import logging
import math
import time

import jax
import jax.numpy as jnp

from kd_jax import models
from kd_jax.models import taps as taps_lib
from kd_jax.train import evaluation
from kd_jax.train import mesh as mesh_lib
from kd_jax.train.zoo_defaults import DEFAULT_CACHE_BUDGET_MB


def table_bytes(plan, num_classes: int) -> int:
  """Host bytes of the teacher's cached float32 logits and tapped features."""
  per_example = num_classes + sum(math.prod(shape) for shape in plan.teacher_shapes.values())
  return 4 * plan.num_examples * per_example


def fits_budget(config, plan, num_classes: int) -> bool:
  """Whether the teacher's outputs fit `distill.cache_budget_mb` (MiB)."""
  budget = config.distill.get("cache_budget_mb", DEFAULT_CACHE_BUDGET_MB)
  return table_bytes(plan, num_classes) <= budget * 2**20


def teacher_table(config, teacher, plan, mesh, split, classes) -> dict:
  """The eval-mode teacher's `{'logits': [N, C], 'features': {tap: [N, ...]}}` (float32) of
  every example of `split`, in stored order: row i belongs to the example whose 'index' is i."""
  start = time.time()
  model, variables = teacher["model"], mesh_lib.replicate(teacher["variables"], mesh)

  @jax.jit
  def outputs(v, images):
    out, feats, _ = taps_lib.features(model, v, images, taps=plan.teacher_taps)
    cast = lambda x: x.astype(jnp.float32)  # noqa: E731
    return {"logits": cast(models.logits_of(out)), "features": jax.tree.map(cast, feats)}

  _, table = evaluation.map_split(
    lambda images: outputs(variables, images),
    config.data,
    split,
    batch_size=config.batch_size,
    mesh=mesh,
    classes=classes,
  )
  logging.info(
    "Cached the teacher's logits and %d feature maps of %d training examples in %.1f s.",
    len(table["features"]),
    len(table["logits"]),
    time.time() - start,
  )
  return table


def prepare_batch(plan, table: dict | None):
  """`prepare_batch` of a zoo run: the teacher's cached outputs looked up by the batch's
  'index' (kept for CRD, which needs it); None when there is nothing to do."""
  keep_index = plan.method == "crd"
  if table is None and not keep_index:
    return None

  def prepare(batch):
    batch = dict(batch)
    index = batch["index"] if keep_index else batch.pop("index")
    if table is not None:
      batch["teacher_logits"] = table["logits"][index]
      batch["teacher_features"] = {k: v[index] for k, v in table["features"].items()}
    return batch

  return prepare
