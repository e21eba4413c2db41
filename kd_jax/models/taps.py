"""Reading a model's intermediate features without changing the model or its parameters.

A tap names what to read:

* a stage name that the model sows into its 'intermediates' collection
  (`self.sow('intermediates', name, x)`; the built-in models sow theirs: NiN `stage1..3`,
  LeNet `block1`, `block2`, `fc`, ConvNet `block_<i>`, and every one an `embedding`);
* a module path with a '/' (`'/conv1'`, `'/encoder/block_2'`): the output of that
  submodule's `__call__`, captured by Flax's `capture_intermediates`, so that any Flax
  module can be tapped without a `sow`.

Sowing adds no parameters: checkpoints of a model are the same with and without taps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

COLLECTION = "intermediates"


def _is_path(tap: str) -> bool:
  return "/" in tap


def _path_filter(paths: Sequence[str]):
  wanted = {p.strip("/") for p in paths}
  return lambda module, method: method == "__call__" and "/".join(module.path) in wanted


def features(
  model: nn.Module,
  variables,
  images,
  *,
  taps: Sequence[str],
  train: bool = False,
  rngs=None,
  mutable: Sequence[str] = (),
):
  """Runs `model` once; returns `(output, {tap: array}, updates)`.

  `output` is what `model.apply` returns (logits, or ConvNet's `(logits, features)`),
  `updates` the other mutable collections (e.g. `{'batch_stats': ...}` with
  `mutable=['batch_stats']` in training), an empty dict without.

  Raises:
    KeyError: a tap the model neither sows nor has a submodule at (the message lists the
      model's stage names).
  """
  kwargs = {}
  paths = [t for t in taps if _is_path(t)]
  if paths:
    kwargs["capture_intermediates"] = _path_filter(paths)
  out, state = model.apply(
    variables, images, train=train, rngs=rngs or {}, mutable=[COLLECTION, *mutable], **kwargs
  )
  state = dict(state)
  sown = state.pop(COLLECTION, {})
  found = {}
  for tap in taps:
    node = sown
    keys = tap.strip("/").split("/") + ["__call__"] if _is_path(tap) else [tap]
    for key in keys:
      if not isinstance(node, Mapping) or key not in node:
        stages = sorted(k for k, v in sown.items() if isinstance(v, tuple))
        raise KeyError(
          f"{type(model).__name__} has no feature tap {tap!r}; its stages: {', '.join(stages)}"
        )
      node = node[key]
    found[tap] = node[-1]  # the last value sown or returned under this name
  return out, found, state


def stage_names(model: nn.Module, image_shape: Sequence[int]) -> list[str]:
  """The stage taps `model` sows, in the order it sows them (traced, not run)."""
  return list(tap_shapes(model, image_shape))


def tap_shapes(
  model: nn.Module, image_shape: Sequence[int], taps: Sequence[str] | None = None
) -> dict[str, tuple[int, ...]]:
  """`{tap: shape per example}` of `taps` (default: every sown stage), for one image of
  `image_shape` in eval mode (traced with `jax.eval_shape`, nothing computed)."""
  dummy = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)

  def run(x):
    variables = model.init(jax.random.PRNGKey(0), x, train=False)
    if taps is None:
      _, state = model.apply(variables, x, train=False, mutable=[COLLECTION])
      return {k: v[-1] for k, v in state.get(COLLECTION, {}).items() if isinstance(v, tuple)}
    return features(model, variables, x, taps=taps)[1]

  shapes = jax.eval_shape(run, dummy)
  return {k: tuple(v.shape[1:]) for k, v in shapes.items()}


def adaptive_avg_pool(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """torch's `adaptive_avg_pool2d` of NHWC `x` to `size`: output cell `i` averages rows
  `floor(i·H/h) … ceil((i+1)·H/h) − 1` (and likewise columns); exact, as a matrix product."""

  def weights(n_in: int, n_out: int) -> np.ndarray:
    w = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
      start, end = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
      w[i, start:end] = 1.0 / (end - start)
    return w

  h, w = x.shape[1], x.shape[2]
  if (h, w) == tuple(size):
    return x
  rows, cols = weights(h, size[0]), weights(w, size[1])
  return jnp.einsum("ih,jw,bhwc->bijc", rows, cols, x.astype(jnp.float32)).astype(x.dtype)


def match_spatial(student: jax.Array, teacher: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The larger of two NHWC maps average-pooled to the smaller's height and width (as
  mdistiller's attention transfer and RepDistiller's VID do); other inputs unchanged."""
  if student.ndim != 4 or teacher.ndim != 4:
    return student, teacher
  s, t = student.shape[1:3], teacher.shape[1:3]
  if s[0] > t[0]:
    return adaptive_avg_pool(student, t), teacher
  if s[0] < t[0]:
    return student, adaptive_avg_pool(teacher, s)
  return student, teacher
