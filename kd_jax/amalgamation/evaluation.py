"""Test metrics of an amalgamated student, its teachers, and its routing."""

from __future__ import annotations

import jax
import numpy as np

from kd_jax.amalgamation import step as step_lib
from kd_jax.train import evaluation
from kd_jax.train import mesh as mesh_lib


class Evaluator:
  """Test metrics of an amalgamation: the student over the union, each teacher on its
  own classes, the student per teacher task, and how often routing picks the owner."""

  def __init__(self, plan: step_lib.Plan, cfg, frozen, mesh):
    self.plan, self.mesh = plan, mesh
    self.frozen = mesh_lib.replicate(frozen, mesh)

    def predict(student_vars, frozen, images):
      s_logits, _ = plan.student.apply(student_vars, images, train=False)
      t_logits, t_feats, t_pen = step_lib.teacher_outputs(plan, frozen["teachers"], images)
      return (
        s_logits,
        t_logits,
        step_lib.routing_weights(cfg, t_logits, t_pen, frozen, blocks=t_feats),
      )

    self._predict = jax.jit(predict)

  def __call__(self, student_vars, run_config, union, split: str = "test") -> dict:
    """The metrics on `split` (default the test split), named `test_*` whatever the split."""
    plan = self.plan
    student_vars = mesh_lib.replicate(student_vars, self.mesh)
    # owns[t, c]: teacher t knows union class c (several teachers may, in the dual stage).
    owns = np.zeros((len(plan.teachers), len(union)), bool)
    for t, index in enumerate(plan.class_index):
      owns[t, list(index)] = True
    labels, (student, teachers, weights) = evaluation.map_split(
      lambda images: self._predict(student_vars, self.frozen, images),
      run_config.data,
      split,
      batch_size=run_config.batch_size,
      mesh=self.mesh,
      classes=union,
    )
    prediction = student.argmax(-1)
    metrics = {
      "test_accuracy": float(np.mean(prediction == labels)),
      "test_loss": evaluation.cross_entropy(student, labels),
      "test_examples": int(len(labels)),
      "routing_accuracy": float(np.mean(owns[weights.argmax(-1), labels])),
    }
    for t, index in enumerate(plan.class_index):
      mine = owns[t, labels]
      own_logits = teachers[t][mine]
      metrics[f"teacher_{t}_accuracy"] = float(
        np.mean(np.asarray(index)[own_logits.argmax(-1)] == labels[mine])
      )
      metrics[f"student_task_{t}_accuracy"] = float(np.mean(prediction[mine] == labels[mine]))
    return metrics
