"""kd_jax.losses against the public reference implementations, on random inputs.

Each function is compared with torchdistill 1.1.5's loss class (DKD with mdistiller's
`dkd_loss`, copied below) on several shapes and dtypes; the table gives the largest
absolute and relative difference over the cases. Not part of the test suite: the
references need torch and torchdistill, which kd_jax does not depend on:

  .venv/bin/pip install torch==2.13.0            # the CPU wheel
  .venv/bin/pip install --no-deps torchdistill==1.1.5
  .venv/bin/python benchmarks/reference_losses.py > benchmarks/results/reference_losses.txt

The references run in float64 on the same (rounded) inputs; kd_jax runs in its compute
dtype (float32, or float32 after upcasting bfloat16 inputs), so the differences measure
kd_jax's float32 rounding plus any difference of definition, which the notes name.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from torchdistill.losses import mid_level as td

from kd_jax import losses

SHAPES_LOGITS = [(8, 10), (32, 100), (4, 3)]
SHAPES_MAPS = [((8, 6, 6, 4), (8, 6, 6, 12)), ((16, 4, 4, 8), (16, 4, 4, 8))]
SHAPES_EMBED = [((8, 16), (8, 32)), ((32, 64), (32, 64))]
DTYPES = ["float32", "bfloat16"]


def _rounded(rng, shape, dtype, scale=1.0):
  """Random normal values, rounded to `dtype` and returned as float64 NumPy."""
  x = rng.normal(size=shape) * scale
  return np.asarray(jnp.asarray(x, dtype).astype(jnp.float32), np.float64)


def _ours(x, dtype):
  return jnp.asarray(x, jnp.float32).astype(dtype)


def _io(path, value):
  return {path: {"output": value}}


def _t(x):
  return torch.tensor(x, dtype=torch.float64)


# mdistiller's dkd_loss (megvii-research/mdistiller, mdistiller/distillers/DKD.py), verbatim
# but for `size_average=False` written as `reduction="sum"` (the same, without the warning).
def _get_gt_mask(logits, target):
  target = target.reshape(-1)
  return torch.zeros_like(logits).scatter_(1, target.unsqueeze(1), 1).bool()


def _get_other_mask(logits, target):
  target = target.reshape(-1)
  return torch.ones_like(logits).scatter_(1, target.unsqueeze(1), 0).bool()


def _cat_mask(t, mask1, mask2):
  t1 = (t * mask1).sum(dim=1, keepdims=True)
  t2 = (t * mask2).sum(1, keepdims=True)
  return torch.cat([t1, t2], dim=1)


def mdistiller_dkd_loss(logits_student, logits_teacher, target, alpha, beta, temperature):
  gt_mask = _get_gt_mask(logits_student, target)
  other_mask = _get_other_mask(logits_student, target)
  pred_student = F.softmax(logits_student / temperature, dim=1)
  pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
  pred_student = _cat_mask(pred_student, gt_mask, other_mask)
  pred_teacher = _cat_mask(pred_teacher, gt_mask, other_mask)
  log_pred_student = torch.log(pred_student)
  tckd_loss = (
    F.kl_div(log_pred_student, pred_teacher, reduction="sum") * (temperature**2) / target.shape[0]
  )
  pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
  log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
  nckd_loss = (
    F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum")
    * (temperature**2)
    / target.shape[0]
  )
  return alpha * tckd_loss + beta * nckd_loss


def _nchw(x):
  return _t(np.transpose(x, (0, 3, 1, 2)))


def cases(rng):
  """Yields (function name, case label, ours, reference) for every comparison."""
  for shape in SHAPES_LOGITS:
    for dtype in DTYPES:
      for scale in (1.0, 10.0):
        s, t = _rounded(rng, shape, dtype, scale), _rounded(rng, shape, dtype, scale)
        y = rng.integers(0, shape[1], size=shape[0])
        label = f"{shape} {dtype} x{scale:g}"
        js, jt = _ours(s, dtype), _ours(t, dtype)
        for temp in (1.0, 4.0):
          # KDLoss's alpha weights the hard term: alpha = 1 − soft_weight, beta = soft_weight.
          # With alpha=0 it returns the KL alone, without T².
          kd = lambda alpha, beta, temp=temp: td.KDLoss(
            student_module_path="s",
            student_module_io="output",
            teacher_module_path="t",
            teacher_module_io="output",
            temperature=temp,
            alpha=alpha,
            beta=beta,
          )
          yield (
            "distillation_kl",
            f"{label} T={temp:g}",
            losses.distillation_kl(js, jt, temperature=temp),
            temp**2 * kd(0.0, None)(_io("s", _t(s)), _io("t", _t(t))),
          )
          yield (
            "hinton_kd",
            f"{label} T={temp:g}",
            losses.hinton_kd(js, jt, y, temperature=temp, soft_weight=0.9),
            kd(0.1, 0.9)(_io("s", _t(s)), _io("t", _t(t)), _t(y).long()),
          )
        yield (
          "dkd",
          label,
          losses.dkd(js, jt, y),
          mdistiller_dkd_loss(_t(s), _t(t), _t(y).long(), 1.0, 8.0, 4.0),
        )
        lskd = td.LogitStdKDLoss(
          student_module_path="s",
          student_module_io="output",
          teacher_module_path="t",
          teacher_module_io="output",
          temperature=2.0,
          alpha=0.0,
        )
        # Its default alpha=None fails in __init__ (1 - None); with alpha=0 it returns the KL
        # alone, without T², which the paper's loss (and kd_jax's) carries.
        yield (
          "logit_standardized_kd",
          label,
          losses.logit_standardized_kd(js, jt),
          4.0 * lskd(_io("s", _t(s)), _io("t", _t(t))),
        )
        for temp in (1.0, 4.0):
          dist = td.DISTLoss(
            student_module_path="s",
            student_module_io="output",
            teacher_module_path="t",
            teacher_module_io="output",
            tau=temp,
          )
          yield (
            "dist",
            f"{label} T={temp:g}",
            losses.dist(js, jt, temperature=temp),
            dist(_io("s", _t(s)), _io("t", _t(t))),
          )

  for s_shape, t_shape in SHAPES_MAPS:
    for dtype in DTYPES:
      s, t = _rounded(rng, s_shape, dtype), _rounded(rng, t_shape, dtype)
      label = f"{s_shape}->{t_shape} {dtype}"
      js, jt = _ours(s, dtype), _ours(t, dtype)
      pair = {
        "p": {"student": {"io": "output", "path": "s"}, "teacher": {"io": "output", "path": "t"}}
      }
      for mode in ("code", "paper"):
        at = td.ATLoss(at_pairs=pair, mode=mode)
        yield (
          f"attention_transfer[{mode}]",
          label,
          losses.attention_transfer(js, jt, mode=mode),
          at(_io("s", _nchw(s)), _io("t", _nchw(t))),
        )
      sp = td.SPKDLoss(student_output_path="s", teacher_output_path="t", reduction="batchmean")
      yield (
        "similarity_preserving (vs SPKDLoss, L1 rows)",
        label,
        losses.similarity_preserving(js, jt),
        sp(_io("s", _nchw(s)), _io("t", _nchw(t))),
      )
      g_s = F.normalize(_t(s.reshape(len(s), -1)) @ _t(s.reshape(len(s), -1)).T)  # RepDistiller
      g_t = F.normalize(_t(t.reshape(len(t), -1)) @ _t(t.reshape(len(t), -1)).T)
      yield (
        "similarity_preserving (vs RepDistiller, L2 rows)",
        label,
        losses.similarity_preserving(js, jt),
        ((g_t - g_s) ** 2).sum() / len(s) ** 2,
      )
      if s_shape == t_shape:
        yield ("fitnet", label, losses.fitnet(js, jt), F.mse_loss(_t(s), _t(t)))
        var = np.abs(_rounded(rng, t_shape[-1:], "float32")) + 0.5
        vid = td.VIDLoss(feature_pairs=pair)
        student_io = {"s": {"output": (_nchw(s), _t(var).view(1, -1, 1, 1))}}
        yield (
          "vid",
          label,
          losses.vid(js, jnp.asarray(var, jnp.float32), jt),
          vid(student_io, _io("t", _nchw(t))),
        )

  for s_shape, t_shape in SHAPES_EMBED:
    for dtype in DTYPES:
      s, t = _rounded(rng, s_shape, dtype), _rounded(rng, t_shape, dtype)
      label = f"{s_shape} vs {t_shape} {dtype}"
      js, jt = _ours(s, dtype), _ours(t, dtype)
      pk = td.PKTLoss(
        student_module_path="s",
        student_module_io="output",
        teacher_module_path="t",
        teacher_module_io="output",
      )
      yield ("pkt", label, losses.pkt(js, jt), pk(_io("s", _t(s)), _io("t", _t(t))))
      rk = td.RKDLoss(
        student_output_path="s",
        teacher_output_path="t",
        dist_factor=25.0,
        angle_factor=50.0,
        reduction="mean",
      )
      yield ("rkd", label, losses.rkd(js, jt), rk(_io("s", _t(s)), _io("t", _t(t))))

  yield from crd_cases(rng)


def crd_cases(rng):
  for batch, dim, n, k in ((8, 16, 64, 10), (16, 32, 200, 50)):
    s = F.normalize(_t(rng.normal(size=(batch, dim)))).numpy()
    t = F.normalize(_t(rng.normal(size=(batch, dim)))).numpy()
    idx = rng.choice(n, size=batch, replace=False)
    contrast = np.concatenate([idx[:, None], rng.integers(0, n, size=(batch, k))], axis=1)
    crd = td.CRDLoss(
      student_norm_module_path="s",
      student_empty_module_path="e",
      teacher_norm_module_path="t",
      input_size=dim,
      output_size=n,
      num_negative_samples=k,
      num_samples=n,
    ).double()
    memory = losses.CRDMemory(
      jnp.asarray(crd.memory_v1.numpy(), jnp.float32),
      jnp.asarray(crd.memory_v2.numpy(), jnp.float32),
      jnp.float32(-1.0),
      jnp.float32(-1.0),
    )
    for step in range(2):  # the first call sets the normalisers, the second uses them
      student_io = {
        "s": {"output": _t(s)},
        "e": {"input": {"pos_idx": torch.tensor(idx), "contrast_idx": torch.tensor(contrast)}},
      }
      ref = crd(student_io, _io("t", _t(t)))
      ours, memory = losses.crd_loss(
        jnp.asarray(s, jnp.float32),
        jnp.asarray(t, jnp.float32),
        idx,
        memory,
        contrast_indices=contrast,
      )
      yield "crd_loss", f"B={batch} D={dim} N={n} K={k} call {step + 1}", ours, ref
      yield (
        "crd memory (after update)",
        f"B={batch} D={dim} N={n} call {step + 1}",
        jnp.concatenate([memory.student, memory.teacher]),
        torch.cat([crd.memory_v1, crd.memory_v2]),
      )


def main() -> None:
  rng = np.random.default_rng(0)
  rows: dict[str, list[float]] = {}
  for name, label, ours, ref in cases(rng):
    ours = np.asarray(ours, np.float64)
    ref = ref.detach().numpy().astype(np.float64)
    abs_diff = float(np.max(np.abs(ours - ref)))
    rel_diff = float(np.max(np.abs(ours - ref) / np.maximum(np.abs(ref), 1e-30)))
    worst = rows.setdefault(name, [0, 0.0, 0.0, ""])
    worst[0] += 1
    if rel_diff >= worst[2]:
      worst[1:] = [max(worst[1], abs_diff), rel_diff, label]
    else:
      worst[1] = max(worst[1], abs_diff)
  print(
    f"kd_jax.losses vs references (torch {torch.__version__}, torchdistill 1.1.5, "
    f"jax {jax.__version__}); reference in float64, kd_jax in float32"
  )
  print(f"{'function':<50} {'cases':>5} {'max abs diff':>13} {'max rel diff':>13}  worst case")
  for name, (count, abs_diff, rel_diff, label) in rows.items():
    print(f"{name:<50} {count:>5} {abs_diff:>13.3e} {rel_diff:>13.3e}  {label}")
  sys.stdout.flush()


if __name__ == "__main__":
  main()
