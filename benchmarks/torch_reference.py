"""The PyTorch reference: the distillation steps of `jax_steps`, ported to PyTorch.

NCHW, float32, eager, Adam; `torch.set_num_threads(2)`, or 1 for the `_1thread` benchmarks.
The only part of `step_time.py` that imports torch: torch is a dependency of this benchmark,
never of kd_jax, and `step_time.py` skips these benchmarks when it is not installed.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from suite import MATMUL_SIZE, NUM_CLASSES, ZOO_METHODS
from torch import nn


def scaled(features: int, width: float) -> int:
  """A layer's width at `width`, rounded as `kd_jax.models.nin.scaled` rounds it."""
  return max(1, int(round(features * width)))


class NiN(nn.Module):
  """`kd_jax.models.NiN` with head='gap'."""

  def __init__(self, channels: int, width: float, dropout: float):
    super().__init__()
    w = lambda f: scaled(f, width)

    def conv(cin, cout, k):
      return [nn.Conv2d(cin, cout, k, padding=k // 2), nn.ReLU()]

    self.body = nn.Sequential(
      *conv(channels, w(192), 5),
      *conv(w(192), w(160), 1),
      *conv(w(160), w(96), 1),
      nn.MaxPool2d(3, 2, padding=1),
      nn.Dropout(dropout),
      *conv(w(96), w(192), 5),
      *conv(w(192), w(192), 1),
      *conv(w(192), w(192), 1),
      nn.AvgPool2d(3, 2, padding=1, count_include_pad=False),
      nn.Dropout(dropout),
      *conv(w(192), w(192), 3),
      *conv(w(192), w(192), 1),
      *conv(w(192), NUM_CLASSES, 1),
    )

  def forward(self, x):
    return self.body(x).mean(dim=(2, 3))


class LeNet(nn.Module):
  """`kd_jax.models.LeNet` with relu_after_conv=True and no dropout."""

  def __init__(self, image_shape, width: float):
    super().__init__()
    image_h, image_w, channels = image_shape
    c1, c2, f1 = scaled(64, width), scaled(128, width), scaled(1024, width)
    self.conv1, self.conv2 = nn.Conv2d(channels, c1, 5), nn.Conv2d(c1, c2, 5)
    side = lambda n: ((n - 4) // 2 - 4) // 2  # two VALID 5×5 convs, each then a 2×2 pool
    self.fc1 = nn.Linear(c2 * side(image_h) * side(image_w), f1)
    self.fc2 = nn.Linear(f1, NUM_CLASSES)

  def forward(self, x):
    x = F.max_pool2d(F.relu(self.conv1(x)), 2)
    x = F.max_pool2d(F.relu(self.conv2(x)), 2)
    return self.fc2(F.relu(self.fc1(x.flatten(1))))


def _count_flops(fn):
  """A call counting `fn()`'s FLOPs with torch's flop counter (convolutions and matmuls)."""

  def count():
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
      fn()
    return float(counter.get_total_flops())

  return count


def _n_params(module: nn.Module) -> int:
  return sum(p.numel() for p in module.parameters())


def build(name: str, cfg: dict):
  """`(run_one_step, info, count_flops)` of PyTorch benchmark `name` (see `jax_steps.build`)."""
  if name.removeprefix("torch_") in ZOO_METHODS:
    import torch_zoo  # pylint: disable=g-import-not-at-top  (imports torchdistill)

    return torch_zoo.build(name, cfg)
  torch.set_num_threads(1 if name.endswith("_1thread") else 2)
  torch.manual_seed(0)
  if name == "torch_matmul":
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    info = {
      "batch": None,
      "threads": torch.get_num_threads(),
      "student_params": None,
      "teacher_params": None,
    }
    return (lambda: a @ a), info, lambda: 2.0 * MATMUL_SIZE**3
  d = cfg["distill"]
  image_h, image_w, channels = d["image_shape"]
  if (
    not d["student"]["relu_after_conv"]
    or d["student"]["dropout_rate"]
    or d["teacher"]["head"] != "gap"
  ):
    raise SystemExit(
      "the PyTorch port covers LeNet(relu_after_conv, no dropout) and NiN(head='gap') only"
    )
  batch_size = d["batch_size"]
  rng = np.random.default_rng(0)
  images = rng.standard_normal((batch_size, channels, image_h, image_w)).astype(np.float32)
  x = torch.from_numpy(images)
  y = torch.from_numpy(rng.integers(0, NUM_CLASSES, batch_size).astype(np.int64))
  teacher = NiN(channels, d["teacher"]["width"], d["teacher"]["dropout_rate"]).eval()
  for p in teacher.parameters():
    p.requires_grad_(False)
  info = {
    "batch": batch_size,
    "threads": torch.get_num_threads(),
    "teacher_params": _n_params(teacher),
  }

  if name == "torch_teacher_fwd":

    def fwd():
      with torch.no_grad():
        teacher(x)

    return fwd, info, _count_flops(fwd)

  student = LeNet(d["image_shape"], d["student"]["width"]).train()
  info["student_params"] = _n_params(student)
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
    # α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1 − α)·CE, as kd_jax.losses.hinton_kd
    if distill:
      soft = (
        F.kl_div(
          F.log_softmax(s / temperature, -1),
          F.log_softmax(t / temperature, -1),
          reduction="batchmean",
          log_target=True,
        )
        * temperature**2
      )
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

  return one_step, info, _count_flops(one_step)
