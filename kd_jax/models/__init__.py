"""Models, and a registry to build them from JSON-friendly specs stored with checkpoints.

Usage::

  model = build({'name': 'convnet', 'num_classes': 4, 'block_widths': [32, 64]})
  spec = spec_of(model)          # {'name': 'convnet', 'num_classes': 4, ...}; build(spec) again
  logits = logits_of(model.apply(variables, x, train=False))   # works for every model
  out, feats, _ = features(model, variables, x, taps=['stage1', 'embedding'])  # stage features
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn

from kd_jax.models.alignment import BlockAlignment, FeatureAlignment, unit_filter_orthogonal
from kd_jax.models.convnet import ConvNet, penultimate
from kd_jax.models.dropout import Dropout
from kd_jax.models.lenet import LeNet
from kd_jax.models.nin import NiN
from kd_jax.models.regressors import CRDEmbed, HintRegressor, VIDRegressor
from kd_jax.models.taps import features, stage_names, tap_shapes

__all__ = [
  "BlockAlignment",
  "CRDEmbed",
  "ConvNet",
  "Dropout",
  "FeatureAlignment",
  "HintRegressor",
  "LeNet",
  "MODELS",
  "NiN",
  "VIDRegressor",
  "build",
  "features",
  "logits_of",
  "penultimate",
  "returns_features",
  "spec_of",
  "stage_names",
  "tap_shapes",
  "unit_filter_orthogonal",
]

MODELS: dict[str, type[nn.Module]] = {"nin": NiN, "lenet": LeNet, "convnet": ConvNet}


def _to_python(value: Any, *, as_tuple: bool) -> Any:
  """Recursively turns lists/tuples into tuples (for modules) or lists (for JSON)."""
  if isinstance(value, (list, tuple)):
    items = [_to_python(v, as_tuple=as_tuple) for v in value]
    return tuple(items) if as_tuple else items
  return value


def build(spec: Mapping[str, Any]) -> nn.Module:
  """Builds a model from ``{'name': <registry key>, **fields}``; lists become tuples."""
  kwargs = dict(spec)
  name = kwargs.pop("name", None)
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
  kwargs = {k: _to_python(v, as_tuple=True) for k, v in kwargs.items()}
  return MODELS[name](**kwargs)


def spec_of(module: nn.Module) -> dict[str, Any]:
  """The JSON-friendly spec that ``build`` turns back into an equal module.

  Records the registry name and every declared field (not Flax's ``parent``/``name``).
  """
  names = [key for key, cls in MODELS.items() if type(module) is cls]
  if not names:
    raise ValueError(
      f"{type(module).__name__} is not a registered model; registered: {sorted(MODELS)}"
    )
  spec = {"name": names[0]}
  for field in dataclasses.fields(module):
    if field.init and field.name not in ("parent", "name"):
      spec[field.name] = _to_python(getattr(module, field.name), as_tuple=False)
  return spec


def returns_features(module: nn.Module) -> bool:
  """Whether ``module.apply`` returns ``(logits, features)`` rather than bare logits."""
  return isinstance(module, ConvNet)


def logits_of(output: Any) -> Any:
  """The logits of any model's output: ``output[0]`` for ``(logits, features)``, else output."""
  return output[0] if isinstance(output, tuple) else output
