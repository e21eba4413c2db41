"""The PyTorch ports of the zoo's steps (`torch_<method>`), with torchdistill 1.1.5's losses.

The same step as `kd_jax.train.zoo.make_step` at the config's defaults: the NiN teacher's
forward without gradient, the LeNet student's with its taps, `ce_weight · CE + weight · term`
with the term from torchdistill's loss class (DKD: mdistiller's `dkd_loss`; FitNets: MSE
after an mdistiller-style `ConvReg`), Adam over the student and the auxiliary modules. The
taps are those of `kd_jax.models` (post-ReLU stage outputs), NCHW.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import torch_reference as ref
from suite import NUM_CLASSES
from torch import nn
from torchdistill.losses import mid_level as td


def teacher_taps(teacher: ref.NiN, x) -> tuple[torch.Tensor, dict]:
  """The NiN port's logits and stage taps (`stage1..3`, `embedding`), as kd_jax sows them."""
  layers, taps = list(teacher.body), {}
  for i, layer in enumerate(layers):
    x = layer(x)
    if isinstance(layer, nn.MaxPool2d):
      taps["stage1"] = x
    elif isinstance(layer, nn.AvgPool2d):
      taps["stage2"] = x
    elif i == len(layers) - 3:  # cccp5's ReLU, before the class maps
      taps["stage3"] = x
  taps["embedding"] = taps["stage3"].mean(dim=(2, 3))
  return x.mean(dim=(2, 3)), taps


def student_taps(student: ref.LeNet, x) -> tuple[torch.Tensor, dict]:
  """The LeNet port's logits and taps (`block1`, `block2`, `fc`, `embedding`)."""
  b1 = F.max_pool2d(F.relu(student.conv1(x)), 2)
  b2 = F.max_pool2d(F.relu(student.conv2(b1)), 2)
  fc = F.relu(student.fc1(b2.flatten(1)))
  return student.fc2(fc), {"block1": b1, "block2": b2, "fc": fc, "embedding": fc}


def dkd_loss(s, t, y, alpha, beta, temperature):
  """mdistiller's `dkd_loss` (its masks written with `F.one_hot`)."""
  gt = F.one_hot(y, s.shape[1]).bool()
  p_s, p_t = F.softmax(s / temperature, 1), F.softmax(t / temperature, 1)
  cat = lambda p: torch.stack([(p * gt).sum(1), (p * ~gt).sum(1)], 1)  # noqa: E731
  tckd = F.kl_div(torch.log(cat(p_s)), cat(p_t), reduction="sum") * temperature**2 / len(y)
  log_s2 = F.log_softmax(s / temperature - 1000.0 * gt, 1)
  p_t2 = F.softmax(t / temperature - 1000.0 * gt, 1)
  nckd = F.kl_div(log_s2, p_t2, reduction="sum") * temperature**2 / len(y)
  return alpha * tckd + beta * nckd


def _io(path, value):
  return {path: {"output": value}}


def _pool_to_smaller(a, b):
  """mdistiller's adaptive average pooling of the larger map to the smaller's size."""
  if a.shape[2] > b.shape[2]:
    return F.adaptive_avg_pool2d(a, b.shape[2:]), b
  if a.shape[2] < b.shape[2]:
    return a, F.adaptive_avg_pool2d(b, a.shape[2:])
  return a, b


class ConvReg(nn.Module):
  """mdistiller's `ConvReg` for a student map at least as large as the teacher's: a VALID
  convolution, BatchNorm, ReLU (`kd_jax.models.HintRegressor`)."""

  def __init__(self, s_shape, t_shape):
    super().__init__()
    kernel = (1 + s_shape[1] - t_shape[1], 1 + s_shape[2] - t_shape[2])
    self.conv = nn.Conv2d(s_shape[0], t_shape[0], kernel)
    self.bn = nn.BatchNorm2d(t_shape[0])

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


class Regressor4VID(nn.Module):
  """torchdistill 1.1.5's `Regressor4VID` (torchdistill.models.wrapper, which imports
  torchvision): three bias-free 1×1 convolutions and a learnt softplus variance."""

  def __init__(self, in_channels, middle_channels, out_channels, eps, init_pred_var):
    super().__init__()
    self.regressor = nn.Sequential(
      nn.Conv2d(in_channels, middle_channels, 1, bias=False),
      nn.ReLU(inplace=True),
      nn.Conv2d(middle_channels, middle_channels, 1, bias=False),
      nn.ReLU(inplace=True),
      nn.Conv2d(middle_channels, out_channels, 1, bias=False),
    )
    init = np.log(np.exp(init_pred_var - eps) - 1.0)
    self.soft_plus_param = nn.Parameter(init * torch.ones(out_channels))
    self.eps = eps

  def forward(self, x):
    var = torch.log(1.0 + torch.exp(self.soft_plus_param)) + self.eps
    return self.regressor(x), var.view(1, -1, 1, 1)


def build(name: str, cfg: dict):
  """`(run_one_step, info, count_flops)` of `torch_<method>` (see `jax_steps.build`)."""
  torch.set_num_threads(2)
  torch.manual_seed(0)
  method = name.removeprefix("torch_")
  h, d = cfg["zoo"][method], cfg["distill"]
  image_h, image_w, channels = d["image_shape"]
  batch_size = d["batch_size"]
  rng = np.random.default_rng(0)
  x = torch.from_numpy(
    rng.standard_normal((batch_size, channels, image_h, image_w)).astype(np.float32)
  )
  y = torch.from_numpy(rng.integers(0, NUM_CLASSES, batch_size).astype(np.int64))
  teacher = ref.NiN(channels, d["teacher"]["width"], d["teacher"]["dropout_rate"]).eval()
  for p in teacher.parameters():
    p.requires_grad_(False)
  student = ref.LeNet(d["image_shape"], d["student"]["width"]).train()
  pairs = (
    [tuple(p.split(":")) for p in h["feature_pairs"].split("+")] if "feature_pairs" in h else []
  )
  with torch.no_grad():
    _, s_taps = student_taps(student, x[:2])
    _, t_taps = teacher_taps(teacher, x[:2])
  aux = nn.ModuleList()
  if method == "fitnet":
    aux.extend(ConvReg(s_taps[s].shape[1:], t_taps[t].shape[1:]) for s, t in pairs)
  elif method == "vid":
    for s, t in pairs:
      c_s, c_t = s_taps[s].shape[1], t_taps[t].shape[1]
      aux.append(Regressor4VID(c_s, c_t, c_t, eps=1e-5, init_pred_var=h["init_variance"]))
  elif method == "crd":
    (s, t), width = pairs[0], h["embedding_dim"]
    aux.append(nn.Linear(s_taps[s][0].numel(), width))
    aux.append(nn.Linear(t_taps[t][0].numel(), width))
  term = _term_fn(method, h, pairs, aux, t_taps)
  opt = torch.optim.Adam([*student.parameters(), *aux.parameters()], lr=d["optim"]["learning_rate"])
  info = {
    "batch": batch_size,
    "threads": torch.get_num_threads(),
    "teacher_params": ref._n_params(teacher),
    "student_params": ref._n_params(student) + ref._n_params(aux),
  }
  index = torch.from_numpy(rng.choice(60_000, batch_size, replace=False))

  def one_step():
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
      t_logits, t_feats = teacher_taps(teacher, x)
    s_logits, s_feats = student_taps(student, x)
    loss = h["ce_weight"] * F.cross_entropy(s_logits, y)
    loss = loss + h["weight"] * term(s_logits, t_logits, s_feats, t_feats, index, y)
    loss.backward()
    opt.step()
    with torch.no_grad():  # the metrics kd_jax's step returns
      pred = s_logits.argmax(-1)
      [loss.detach(), (pred == y).float().mean(), (pred == t_logits.argmax(-1)).float().mean()]

  return one_step, info, ref._count_flops(one_step)


def _term_fn(method, h, pairs, aux, t_taps):
  """`term(s_logits, t_logits, s_feats, t_feats, index, y)` of `method`."""
  paths = dict(student_module_path="s", student_module_io="output")
  paths.update(teacher_module_path="t", teacher_module_io="output")
  pair_spec = {
    "p": {"student": {"io": "output", "path": "s"}, "teacher": {"io": "output", "path": "t"}}
  }
  if method == "dkd":
    return lambda s, t, sf, tf, i, y: dkd_loss(s, t, y, h["alpha"], h["beta"], h["temperature"])
  if method == "logit_standardized_kd":
    loss = td.LogitStdKDLoss(**paths, temperature=h["temperature"], alpha=0.0)
    return lambda s, t, sf, tf, i, y: h["temperature"] ** 2 * loss(_io("s", s), _io("t", t))
  if method == "dist":
    loss = td.DISTLoss(**paths, beta=h["beta"], gamma=h["gamma"], tau=h["temperature"])
    return lambda s, t, sf, tf, i, y: loss(_io("s", s), _io("t", t))
  feature_pairs = lambda sf, tf: [(sf[a], tf[b]) for a, b in pairs]  # noqa: E731
  if method == "fitnet":
    return lambda s, t, sf, tf, i, y: sum(
      F.mse_loss(reg(a), b) for reg, (a, b) in zip(aux, feature_pairs(sf, tf))
    )
  if method == "attention_transfer":
    loss = td.ATLoss(at_pairs=pair_spec, mode=h["mode"])

    def at(s, t, sf, tf, i, y):
      matched = [_pool_to_smaller(a, b) for a, b in feature_pairs(sf, tf)]
      return sum(loss(_io("s", a), _io("t", b)) for a, b in matched)

    return at
  if method == "pkt":
    loss = td.PKTLoss(**paths)
    return lambda s, t, sf, tf, i, y: sum(
      loss(_io("s", a.flatten(1)), _io("t", b.flatten(1))) for a, b in feature_pairs(sf, tf)
    )
  if method == "similarity_preserving":
    loss = td.SPKDLoss(student_output_path="s", teacher_output_path="t", reduction="batchmean")
    return lambda s, t, sf, tf, i, y: sum(
      loss(_io("s", a), _io("t", b)) for a, b in feature_pairs(sf, tf)
    )
  if method == "rkd":
    loss = td.RKDLoss(
      student_output_path="s",
      teacher_output_path="t",
      dist_factor=h["distance_weight"],
      angle_factor=h["angle_weight"],
      reduction="mean",
    )
    return lambda s, t, sf, tf, i, y: sum(
      loss(_io("s", a.flatten(1)), _io("t", b.flatten(1))) for a, b in feature_pairs(sf, tf)
    )
  if method == "vid":
    loss = td.VIDLoss(feature_pairs=pair_spec)

    def vid(s, t, sf, tf, i, y):
      total = 0.0
      for reg, (a, b) in zip(aux, feature_pairs(sf, tf)):
        a, b = _pool_to_smaller(a, b)
        total = total + loss({"s": {"output": reg(a)}}, _io("t", b))
      return total

    return vid
  if method == "crd":
    num_samples, k = 60_000, h["num_negatives"]
    loss = td.CRDLoss(
      student_norm_module_path="s",
      student_empty_module_path="e",
      teacher_norm_module_path="t",
      input_size=h["embedding_dim"],
      output_size=num_samples,
      num_negative_samples=k,
      num_samples=num_samples,
      temperature=h["temperature"],
      momentum=h["momentum"],
    )
    (a_path, b_path) = pairs[0]

    def crd(s, t, sf, tf, index, y):
      e_s = F.normalize(aux[0](sf[a_path].flatten(1)))
      e_t = F.normalize(aux[1](tf[b_path].flatten(1)))
      negatives = torch.randint(0, num_samples, (len(index), k))
      contrast = torch.cat([index[:, None], negatives], 1)
      student_io = {
        "s": {"output": e_s},
        "e": {"input": {"pos_idx": index, "contrast_idx": contrast}},
      }
      return loss(student_io, _io("t", e_t))

    return crd
  raise SystemExit(f"no PyTorch port of {method}")
