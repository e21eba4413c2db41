"""Tests for kd_jax.models: shapes, parameter counts, train/eval behaviour, the registry."""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kd_jax import models
from kd_jax.models import (
  BlockAlignment,
  ConvNet,
  FeatureAlignment,
  LeNet,
  NiN,
  build,
  logits_of,
  penultimate,
  returns_features,
  spec_of,
)

KEY = jax.random.key(0)


def init(module, *args, **kwargs):
  """`module.init` under jit: eager Flax runs op by op, which is slower for tiny tests."""
  return jax.jit(functools.partial(module.init, **kwargs))(KEY, *args)


def apply(module, variables, *args, **kwargs):
  """`module.apply` under jit; keyword arguments (train, rngs, mutable) are fixed."""
  return jax.jit(functools.partial(module.apply, **kwargs))(variables, *args)


def param_shapes(module, shape):
  """Parameter shapes of `module` for inputs of `shape`, without allocating anything."""
  variables = jax.eval_shape(lambda: module.init(KEY, jnp.zeros(shape), train=False))
  return jax.tree.map(lambda p: p.shape, variables["params"])


def param_count(module, shape):
  return sum(
    int(np.prod(s))
    for s in jax.tree.leaves(param_shapes(module, shape), is_leaf=lambda s: isinstance(s, tuple))
  )


def conv_params(k, cin, cout):
  """k×k convolution (or dense layer with k=1) with bias."""
  return k * k * cin * cout + cout


# ---------------------------------------------------------------------------------------------
# Output shapes, under jit.


@pytest.mark.parametrize(
  "module, shape",
  [
    (NiN(num_classes=7, width=0.05), (2, 32, 32, 3)),
    (NiN(num_classes=7, width=0.05, head="fc", fc_width=8), (2, 28, 28, 1)),
    (LeNet(num_classes=7, width=0.1), (2, 32, 32, 3)),
    (LeNet(num_classes=7, width=0.1), (2, 28, 30, 2)),
    (ConvNet(num_classes=7, block_widths=(4, 8)), (2, 28, 28, 1)),
  ],
)
def test_logits_shape_under_jit(module, shape):
  x = jnp.ones(shape)
  variables = init(module, x, train=False)
  out = jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, x)
  assert returns_features(module) == isinstance(out, tuple)
  assert logits_of(out).shape == (2, 7)


@pytest.mark.parametrize(
  "widths, shape, expected_hw",
  [
    ((4, 6), (2, 28, 28, 1), [(14, 14), (7, 7)]),
    ((8, 16, 24, 32), (2, 28, 28, 1), [(14, 14), (7, 7), (4, 4), (2, 2)]),
    ((3, 5, 7, 9), (2, 3, 3, 1), [(2, 2), (1, 1), (1, 1), (1, 1)]),  # SAME pooling: tiny inputs.
  ],
)
def test_convnet_block_features(widths, shape, expected_hw):
  model = ConvNet(num_classes=3, block_widths=widths, convs_per_block=1)
  x = jnp.ones(shape)
  variables = init(model, x, train=False)
  logits, features = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  assert logits.shape == (2, 3)
  assert [f.shape for f in features] == [(2, *hw, w) for hw, w in zip(expected_hw, widths)]
  np.testing.assert_allclose(penultimate(features), features[-1].mean(axis=(1, 2)))


# ---------------------------------------------------------------------------------------------
# Parameter counts, worked out by hand.


def test_nin_param_count_gap_head():
  hidden = (
    conv_params(5, 3, 192)  # conv1    14,592
    + conv_params(1, 192, 160)  # cccp1    30,880
    + conv_params(1, 160, 96)  # cccp2    15,456
    + conv_params(5, 96, 192)  # conv2   460,992
    + conv_params(1, 192, 192)  # cccp3    37,056
    + conv_params(1, 192, 192)  # cccp4    37,056
    + conv_params(3, 192, 192)  # conv3   331,968
    + conv_params(1, 192, 192)  # cccp5    37,056
  )
  assert hidden == 965_056
  expected = hidden + conv_params(1, 192, 10)  # cccp6 1,930
  assert expected == 966_986
  assert param_count(NiN(), (1, 32, 32, 3)) == expected


def test_nin_param_count_fc_head():
  # 32×32 → max pool /2 → 16×16 → avg pool /2 → 8×8, so ip1 sees 8·8·192 = 12,288 inputs.
  expected = (
    965_056  # the same hidden layers as the gap head
    + conv_params(1, 8 * 8 * 192, 1024)  # ip1 12,583,936
    + conv_params(1, 1024, 10)
  )  # ip2     10,250
  assert expected == 13_559_242
  assert param_count(NiN(head="fc"), (1, 32, 32, 3)) == expected


def test_nin_width_and_head_validation():
  shapes = param_shapes(NiN(width=0.5), (1, 32, 32, 3))
  assert shapes["conv1"]["kernel"] == (5, 5, 3, 96)
  assert shapes["cccp2"]["kernel"] == (1, 1, 80, 48)
  assert shapes["cccp6"]["kernel"] == (1, 1, 96, 10)  # the class maps are not scaled
  assert param_shapes(NiN(width=1e-3), (1, 8, 8, 1))["cccp1"]["kernel"] == (1, 1, 1, 1)
  with pytest.raises(ValueError, match="'avg'"):
    param_shapes(NiN(head="avg"), (1, 8, 8, 1))


def test_lenet_param_count_cifar():
  # 32 → conv5 VALID 28 → pool 14 → conv5 VALID 10 → pool 5: fc1 sees 5·5·128 = 3,200 inputs.
  expected = (
    conv_params(5, 3, 64)  #     4,864
    + conv_params(5, 64, 128)  #   204,928
    + conv_params(1, 5 * 5 * 128, 1024)  # 3,277,824
    + conv_params(1, 1024, 10)
  )  #    10,250
  assert expected == 3_497_866  # "about 3.5 M"
  assert param_count(LeNet(), (1, 32, 32, 3)) == expected


def test_lenet_param_count_mnist():
  # 28 → 24 → 12 → 8 → 4: fc1 sees 4·4·128 = 2,048 inputs.
  expected = (
    conv_params(5, 1, 64)  #     1,664
    + conv_params(5, 64, 128)  #   204,928
    + conv_params(1, 4 * 4 * 128, 1024)  # 2,098,176
    + conv_params(1, 1024, 10)
  )  #    10,250
  assert expected == 2_315_018
  assert param_count(LeNet(), (1, 28, 28, 1)) == expected


def test_lenet_relu_after_conv_variants_differ():
  x = jax.random.normal(KEY, (2, 28, 28, 1))
  with_relu, without = LeNet(width=0.1), LeNet(width=0.1, relu_after_conv=False)
  variables = init(with_relu, x, train=False)  # same parameters for both
  a = apply(with_relu, variables, x, train=False)
  b = apply(without, variables, x, train=False)
  assert not np.allclose(a, b)


def test_lenet_rejects_small_input():
  with pytest.raises(ValueError, match="28"):
    LeNet().init(KEY, jnp.zeros((1, 20, 20, 1)), train=False)


# ---------------------------------------------------------------------------------------------
# Train/eval behaviour.


@pytest.mark.parametrize(
  "module",
  [
    NiN(width=0.05, dropout_rate=0.5),
    LeNet(width=0.05, dropout_rate=0.5),
    ConvNet(num_classes=10, block_widths=(4,), norm="none", dropout_rate=0.5),
  ],
)
def test_dropout_only_in_train(module):
  x = jax.random.normal(KEY, (2, 28, 28, 1))
  variables = init(module, x, train=False)

  @functools.partial(jax.jit, static_argnames="train")
  def run(seed, train):
    rngs = {"dropout": jax.random.key(seed)}
    return logits_of(module.apply(variables, x, train=train, rngs=rngs))

  assert not np.allclose(run(1, True), run(2, True))
  np.testing.assert_array_equal(run(1, False), run(2, False))


def test_convnet_batchnorm_updates_stats_in_train_only():
  model = ConvNet(num_classes=3, block_widths=(4, 8), convs_per_block=1)
  x = jax.random.normal(KEY, (4, 8, 8, 1)) + 3.0
  variables = init(model, x, train=False)
  assert "bias" not in variables["params"]["block_0_conv_0"]  # BatchNorm makes it redundant

  _, updates = apply(model, variables, x, train=True, mutable=["batch_stats"])
  before, after = variables["batch_stats"], updates["batch_stats"]
  assert jax.tree.structure(before) == jax.tree.structure(after)
  for old, new in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    assert not np.allclose(old, new)

  # Eval reads the running averages and needs no mutable collection.
  apply(model, variables, x, train=False)
  assert set(variables) == {"params", "batch_stats"}
  assert set(init(ConvNet(num_classes=3, norm="none"), x, train=False)) == {"params"}


def test_convnet_rejects_unknown_norm():
  with pytest.raises(ValueError, match="'layer'"):
    ConvNet(num_classes=3, norm="layer").init(KEY, jnp.zeros((1, 4, 4, 1)), train=False)


def convnet_reference(variables, x, *, block_widths, convs_per_block, train):
  """ConvNet's forward written out: (3×3 SAME conv → BatchNorm → ReLU) × n → Flax's 2×2 SAME
  max pool per block, global average pool, dense. BatchNorm from the running statistics
  (`train=False`) or the batch's (biased variance), epsilon 1e-5."""
  params, stats = variables["params"], variables["batch_stats"]
  features = []
  for i in range(len(block_widths)):
    for j in range(convs_per_block):
      name = f"block_{i}_{{}}_{j}"
      x = jax.lax.conv_general_dilated(
        x,
        params[name.format("conv")]["kernel"],
        (1, 1),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
      )
      bn = params[name.format("bn")]
      mean, var = (
        (jnp.mean(x, (0, 1, 2)), jnp.var(x, (0, 1, 2)))
        if train
        else (stats[name.format("bn")]["mean"], stats[name.format("bn")]["var"])
      )
      x = jnp.maximum((x - mean) / jnp.sqrt(var + 1e-5) * bn["scale"] + bn["bias"], 0.0)
    x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
    features.append(x)
  head = params["head"]
  return jnp.mean(x, (1, 2)) @ head["kernel"] + head["bias"], features


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("convs_per_block", [1, 2])
def test_convnet_matches_its_definition(train, convs_per_block):
  """Logits and block features against the written-out forward, in training and evaluation
  (where the block's last ReLU runs after the pool: the same values), on odd map sizes (SAME
  pooling of 7×7), with running statistics and BatchNorm scales of both signs."""
  widths = (4, 8, 8)
  model = ConvNet(num_classes=3, block_widths=widths, convs_per_block=convs_per_block)
  x = jax.random.normal(KEY, (3, 28, 28, 1))
  variables = init(model, x, train=False)
  keys = iter(jax.random.split(jax.random.key(5), 64))
  randomise = lambda tree, lo, hi: jax.tree.map(  # noqa: E731
    lambda a: jax.random.uniform(next(keys), a.shape, minval=lo, maxval=hi), tree
  )
  variables = {
    "params": {
      name: (randomise(p, -1.5, 1.5) if "_bn_" in name else p)
      for name, p in variables["params"].items()
    },
    "batch_stats": {
      name: {"mean": randomise(s["mean"], -0.5, 0.5), "var": randomise(s["var"], 0.5, 2.0)}
      for name, s in variables["batch_stats"].items()
    },
  }
  kwargs = dict(train=train, mutable=["batch_stats"]) if train else dict(train=False)
  out = apply(model, variables, x, **kwargs)
  logits, features = out[0] if train else out
  want_logits, want_features = jax.jit(
    functools.partial(
      convnet_reference, block_widths=widths, convs_per_block=convs_per_block, train=train
    )
  )(variables, x)
  assert [f.shape for f in features] == [(3, 14, 14, 4), (3, 7, 7, 8), (3, 4, 4, 8)]
  for got, want in zip((*features, logits), (*want_features, want_logits)):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  assert 0 < float(jnp.mean(features[0] == 0)) < 0.5  # the ReLU cut some windows, not most


def test_convnet_bn_axis_name_under_shard_map():
  x = jax.random.normal(KEY, (4, 8, 8, 1))
  plain = ConvNet(num_classes=3, block_widths=(4,), convs_per_block=1)
  sharded = ConvNet(num_classes=3, block_widths=(4,), convs_per_block=1, bn_axis_name="data")
  variables = init(plain, x, train=False)

  def step(model):
    def f(variables, x):
      (logits, _), updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
      return logits, updates["batch_stats"]

    return f

  expected = step(plain)(variables, x)
  mesh = jax.make_mesh((1,), ("data",))
  x = jax.device_put(x, NamedSharding(mesh, P("data")))
  got = jax.jit(
    jax.shard_map(step(sharded), mesh=mesh, in_specs=(P(), P("data")), out_specs=(P("data"), P()))
  )(variables, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), expected, got)


# ---------------------------------------------------------------------------------------------
# Feature alignment.


def test_feature_alignment():
  x = jax.random.normal(KEY, (2, 5, 5, 6))
  for width in (3, 12):  # fewer and more output filters than input channels
    fa = FeatureAlignment(width)
    variables = init(fa, x)
    assert jax.jit(fa.apply)(variables, x).shape == (2, 5, 5, width)
    (kernel,) = jax.tree.leaves(variables["params"])  # the only parameter: no bias
    assert kernel.shape == (1, 1, 6, width)
    # Starts on the unit-norm constraint that the amalgamation loss imposes per output filter.
    np.testing.assert_allclose(jnp.sum(kernel**2, axis=(0, 1, 2)), 1.0, rtol=1e-5)


def test_feature_alignment_is_the_1x1_convolution():
  """The projection (a matrix product, `pointwise.pointwise_conv`) against the NumPy sum and
  against `lax.conv_general_dilated`: values and both gradients."""
  from kd_jax.ops import pointwise

  x = jax.random.normal(KEY, (2, 5, 3, 6))
  fa = FeatureAlignment(4)
  variables = init(fa, x)
  kernel = variables["params"]["conv"]["kernel"]
  want = np.einsum("bhwc,co->bhwo", np.asarray(x, np.float64), np.asarray(kernel[0, 0], np.float64))
  np.testing.assert_allclose(apply(fa, variables, x), want, rtol=1e-5, atol=1e-5)
  conv = lambda k, x: jax.lax.conv_general_dilated(
    x,
    k,
    (1, 1),
    "SAME",  # noqa: E731
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  cotangent = jax.random.normal(jax.random.key(1), (2, 5, 3, 4))
  project = lambda k, x: fa.apply({"params": {"conv": {"kernel": k}}}, x)  # noqa: E731
  grads = lambda f: jax.jit(lambda k, x: jax.vjp(f, k, x)[1](cotangent))(kernel, x)  # noqa: E731
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), grads(project), grads(conv)
  )
  with pytest.raises(ValueError, match="1×1 kernel"):
    pointwise.pointwise_conv(x, jnp.ones((3, 3, 6, 4)), (1, 1), "SAME")


def test_block_alignment():
  features = (jnp.ones((2, 4, 4, 3)), jnp.ones((2, 2, 2, 5)))
  ba = BlockAlignment((7, 9))
  variables = init(ba, features)
  assert set(variables["params"]) == {"block_0", "block_1"}
  out = jax.jit(ba.apply)(variables, features)
  assert [o.shape for o in out] == [(2, 4, 4, 7), (2, 2, 2, 9)]
  with pytest.raises(ValueError, match="2 blocks"):
    apply(ba, variables, features[:1])


# ---------------------------------------------------------------------------------------------
# Registry.


@pytest.mark.parametrize(
  "module, shape",
  [
    (NiN(num_classes=4, width=0.1, head="fc", fc_width=16, dropout_rate=0.2), (1, 32, 32, 3)),
    (LeNet(num_classes=4, width=0.1, relu_after_conv=False), (1, 28, 28, 1)),
    (
      ConvNet(
        num_classes=4, block_widths=(4, 8, 16), convs_per_block=1, norm="none", bn_axis_name="data"
      ),
      (1, 28, 28, 1),
    ),
  ],
)
def test_build_spec_of_round_trip(module, shape):
  spec = json.loads(json.dumps(spec_of(module)))  # survives JSON: tuples come back as lists
  rebuilt = build(spec)
  assert type(rebuilt) is type(module)
  assert rebuilt == module
  assert spec_of(rebuilt) == spec
  assert param_shapes(rebuilt, shape) == param_shapes(module, shape)


def test_build_rejects_unknown_name():
  with pytest.raises(ValueError, match=r"unknown model 'resnet'; choose one of \["):
    build({"name": "resnet"})
  with pytest.raises(ValueError, match="not a registered model"):
    spec_of(FeatureAlignment(3))


def test_registry_contents():
  assert models.MODELS == {"nin": NiN, "lenet": LeNet, "convnet": ConvNet}
  assert logits_of((1, 2)) == 1 and logits_of(3) == 3
  assert isinstance(build({"name": "lenet"}), nn.Module)


# ---------------------------------------------------------------------------------------------
# Pooling (kd_jax.ops.pooling): the fast forms against Flax's reduce_window pools they
# replace, on random inputs (no ties), outputs and gradients; the 2×2 pool on ties too.

from kd_jax.ops import conv_pool, pooling  # noqa: E402

FLAX_POOLS = {
  "max_2x2_same": (
    functools.partial(pooling.max_pool_2x2, padding="SAME"),
    lambda x: nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME"),
  ),
  "max_2x2_valid": (
    functools.partial(pooling.max_pool_2x2, padding="VALID"),
    lambda x: nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID"),
  ),
  "max_3x3_s2": (
    pooling.max_pool_3x3_s2,
    lambda x: nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME"),
  ),
  "avg_3x3_s2": (
    pooling.avg_pool_3x3_s2,
    lambda x: nn.avg_pool(x, (3, 3), strides=(2, 2), padding="SAME", count_include_pad=False),
  ),
}


def value_and_vjp(pool, x, cotangent):
  out, vjp = jax.vjp(pool, x)
  return out, vjp(cotangent)[0]


@pytest.mark.parametrize("pool", sorted(FLAX_POOLS))
@pytest.mark.parametrize("shape", [(3, 28, 28, 4), (2, 7, 7, 3), (2, 9, 10, 2), (1, 3, 2, 1)])
def test_pooling_matches_flax_on_random_inputs(pool, shape):
  fast, reference = FLAX_POOLS[pool]
  x = jax.random.normal(jax.random.key(1), shape)
  expected = reference(x)
  cotangent = jax.random.normal(jax.random.key(2), expected.shape)
  out, grad = jax.jit(value_and_vjp, static_argnums=0)(fast, x, cotangent)
  want_grad = jax.jit(value_and_vjp, static_argnums=0)(reference, x, cotangent)[1]
  assert out.shape == expected.shape
  if pool.startswith("max"):  # a max picks an input: exact
    np.testing.assert_array_equal(out, expected)
  else:  # a sum of ≤ 9 terms in another order: float32 rounding
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
  # Overlapping 3×3 windows add their gradients in another order; 2×2 ones do not overlap.
  tol = 0 if pool.startswith("max_2x2") else 1e-6
  np.testing.assert_allclose(grad, want_grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("padding", ["SAME", "VALID"])
def test_max_pool_2x2_gradient_on_ties_equals_flax(padding):
  # Windows with 2–4 equal maxima (and the constant regions ReLU and BatchNorm produce):
  # both give the gradient to the first maximum in row-major order.
  x = jnp.asarray(
    [
      [1.0, 2.0, 5.0, 5.0, 0.0],
      [2.0, 2.0, 5.0, 5.0, 0.0],
      [3.0, 3.0, 0.0, 0.0, 7.0],
      [1.0, 3.0, 0.0, 0.0, 7.0],
      [4.0, 4.0, 4.0, 4.0, 4.0],
    ]
  )[None, :, :, None]
  n = 3 if padding == "SAME" else 2
  cotangent = jax.random.normal(jax.random.key(4), (1, n, n, 1))
  fast = functools.partial(pooling.max_pool_2x2, padding=padding)
  reference = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2), padding=padding)
  np.testing.assert_array_equal(
    value_and_vjp(fast, x, cotangent)[1], value_and_vjp(reference, x, cotangent)[1]
  )


def test_max_pool_2x2_rejects_unknown_padding():
  with pytest.raises(ValueError, match="padding"):
    pooling.max_pool_2x2(jnp.ones((1, 4, 4, 1)), padding="FULL")


@pytest.mark.parametrize(
  "module, shape",
  [
    (LeNet(num_classes=5, width=0.1), (2, 29, 32, 3)),  # odd sizes: VALID drops a row
    (NiN(num_classes=5, width=0.05, dropout_rate=0.0), (2, 28, 28, 1)),
    (ConvNet(num_classes=5, block_widths=(4, 8, 8), convs_per_block=1), (2, 28, 28, 1)),
  ],
)
def test_models_with_fast_pooling_match_flax_pooling(module, shape, monkeypatch):
  """Whole models, outputs and parameter gradients, with the new pools and the old ones."""
  x = jax.random.normal(jax.random.key(3), shape)
  variables = init(module, x, train=False)

  def loss_and_grad(variables):
    def loss(params):
      out, _ = module.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
      return jnp.sum(jnp.sin(logits_of(out)))

    return jax.value_and_grad(loss)(variables["params"])

  new = jax.jit(loss_and_grad)(variables)
  monkeypatch.setattr(
    pooling,
    "max_pool_2x2",
    lambda x, *, padding: nn.max_pool(x, (2, 2), strides=(2, 2), padding=padding),
  )
  monkeypatch.setattr(pooling, "max_pool_3x3_s2", FLAX_POOLS["max_3x3_s2"][1])
  monkeypatch.setattr(pooling, "avg_pool_3x3_s2", FLAX_POOLS["avg_3x3_s2"][1])
  monkeypatch.setattr(
    conv_pool, "POLYPHASE_MAX_CHANNELS", 0
  )  # LeNet's convs as nn.Conv computes them
  old = jax.jit(loss_and_grad)(variables)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), new, old)


# ---------------------------------------------------------------------------------------------
# LeNet's conv + pool blocks (kd_jax.ops.conv_pool): the polyphase form against the direct
# one (a VALID lax convolution, then the 2×2 pool tested above against Flax's).


def conv_pool_loss_and_grads(module, variables, x, cotangent):
  def loss(params, x):
    return jnp.sum(module.apply({"params": params}, x) * cotangent)

  return jax.value_and_grad(loss, argnums=(0, 1))(variables["params"], x)


@pytest.mark.parametrize(
  "kernel_size, shape",
  [(5, (3, 28, 28, 1)), (5, (2, 13, 15, 3)), (3, (2, 12, 11, 2)), (4, (2, 10, 10, 2))],
)
@pytest.mark.parametrize("activation", ["relu", "identity"])
def test_polyphase_conv_pool_equals_the_direct_form(kernel_size, shape, activation):
  act = nn.relu if activation == "relu" else (lambda y: y)
  x = jax.random.normal(jax.random.key(5), shape)
  direct = conv_pool.ConvMaxPool(8, kernel_size=kernel_size, activation=act, polyphase=False)
  polyphase = direct.clone(polyphase=True)
  variables = init(direct, x)
  variables = {
    "params": {**variables["params"], "bias": jax.random.normal(jax.random.key(6), (8,))}
  }
  out = apply(direct, variables, x)
  assert out.shape == (
    shape[0],
    (shape[1] - kernel_size + 1) // 2,
    (shape[2] - kernel_size + 1) // 2,
    8,
  )
  np.testing.assert_allclose(apply(polyphase, variables, x), out, rtol=1e-5, atol=1e-5)
  cotangent = jax.random.normal(jax.random.key(7), out.shape)
  want = jax.jit(conv_pool_loss_and_grads, static_argnums=0)(direct, variables, x, cotangent)
  got = jax.jit(conv_pool_loss_and_grads, static_argnums=0)(polyphase, variables, x, cotangent)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), got, want)


def test_polyphase_conv_pool_gradient_on_ties_follows_the_first_maximum():
  # Zero regions give all four conv outputs of a window the same value (the bias): the input
  # gradient must go through the first of them, as the direct form's pool sends it.
  x = jax.random.normal(jax.random.key(8), (2, 16, 16, 2)).at[:, 2:12, 4:14].set(0.0)
  direct = conv_pool.ConvMaxPool(4, activation=lambda y: y, polyphase=False)
  variables = init(direct, x)
  cotangent = jax.random.normal(jax.random.key(9), (2, 6, 6, 4))
  want = jax.jit(conv_pool_loss_and_grads, static_argnums=0)(direct, variables, x, cotangent)
  got = jax.jit(conv_pool_loss_and_grads, static_argnums=0)(
    direct.clone(polyphase=True), variables, x, cotangent
  )
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, want)


@pytest.mark.parametrize("shape", [(2, 3, 3, 4, 5), (1, 1, 2, 4, 1)])
def test_phase_max_value_and_derivatives_follow_the_first_maximum(shape):
  """Against NumPy: the max over the 4 phases, and both derivatives through the first maximum
  only (forward mode too); a window holding a NaN has a NaN max and a zero derivative."""
  rng = np.random.default_rng(12)
  y = rng.integers(0, 3, shape).astype(np.float32)  # a small range: most windows have ties
  y[0, 0, 0, 1, 0] = np.nan
  cotangent = rng.normal(size=shape[:3] + shape[4:]).astype(np.float32)
  tangent = rng.normal(size=shape).astype(np.float32)
  nan = np.isnan(y).any(axis=3)
  first = np.argmax(np.where(np.isnan(y), -np.inf, y), axis=3)
  one_hot = (np.arange(4)[:, None] == first[:, :, :, None]) & ~nan[:, :, :, None]
  want = np.where(nan, np.nan, np.max(np.where(np.isnan(y), -np.inf, y), axis=3))

  out, grad = jax.jit(value_and_vjp, static_argnums=0)(
    conv_pool.phase_max, jnp.asarray(y), jnp.asarray(cotangent)
  )
  np.testing.assert_array_equal(out, want)  # NaN exactly where the reference has one
  np.testing.assert_array_equal(grad, np.where(one_hot, cotangent[:, :, :, None], 0))
  _, forward = jax.jvp(conv_pool.phase_max, (jnp.asarray(y),), (jnp.asarray(tangent),))
  np.testing.assert_array_equal(forward, np.sum(np.where(one_hot, tangent, 0), axis=3))


def test_polyphase_kernel_places_each_weight_at_its_phase():
  """Independent of the convolution: K[p, q, (r, s, c), (a, b, o)] = w[2p + r − a, 2q + s − b, c, o]."""
  w = np.random.default_rng(0).normal(size=(5, 5, 2, 3)).astype(np.float32)
  got = np.asarray(conv_pool.polyphase_kernel(jnp.asarray(w))).reshape(3, 3, 2, 2, 2, 2, 2, 3)
  for p, q, r, s, c, a, b, o in np.ndindex(3, 3, 2, 2, 2, 2, 2, 3):
    u, v = 2 * p + r - a, 2 * q + s - b
    assert got[p, q, r, s, c, a, b, o] == (w[u, v, c, o] if 0 <= u < 5 and 0 <= v < 5 else 0.0)


@pytest.mark.parametrize(
  "cpu, features, polyphase",
  [
    (True, conv_pool.POLYPHASE_MAX_CHANNELS, True),
    (True, conv_pool.POLYPHASE_MAX_CHANNELS + 1, False),
    (False, conv_pool.POLYPHASE_MAX_CHANNELS_ELSEWHERE, True),
    (False, conv_pool.POLYPHASE_MAX_CHANNELS_ELSEWHERE + 1, False),
  ],
)
def test_conv_pool_picks_the_polyphase_form_for_few_channels(cpu, features, polyphase, monkeypatch):
  # (Where the frequency-domain form applies, it goes first: tests/test_spectral.py.)
  monkeypatch.setattr(conv_pool, "on_cpu", lambda: cpu)
  module = conv_pool.ConvMaxPool(features)
  x = jnp.zeros((1, 28, 28, 1))
  jaxpr = jax.make_jaxpr(lambda v: module.apply(v, x))(init(module, x)).jaxpr
  [conv] = [e for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
  assert conv.outvars[0].aval.shape[-1] == (4 * features if polyphase else features)


def test_lenet_parameters_are_those_of_nn_conv():
  """Checkpoints of the LeNet built from nn.Conv and pooling restore into this one: same names,
  shapes and initial values."""

  class Reference(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = pooling.max_pool_2x2(
        nn.relu(nn.Conv(8, (5, 5), padding="VALID", name="conv1")(x)), padding="VALID"
      )
      x = pooling.max_pool_2x2(
        nn.relu(nn.Conv(16, (5, 5), padding="VALID", name="conv2")(x)), padding="VALID"
      )
      x = nn.relu(nn.Dense(128, name="fc1")(x.reshape((x.shape[0], -1))))
      return nn.Dense(10, name="fc2")(x)

  x = jax.random.normal(jax.random.key(10), (2, 28, 28, 1))
  lenet = LeNet(width=0.125)
  variables, reference = init(lenet, x, train=False), init(Reference(), x)
  jax.tree.map(np.testing.assert_array_equal, variables, reference)
  np.testing.assert_allclose(
    apply(lenet, variables, x, train=False), apply(Reference(), reference, x), rtol=1e-5, atol=1e-5
  )


def test_polyphase_conv_pool_passes_a_nan_on():
  """A NaN pixel makes every pooled output whose window sees it NaN. (XLA's CPU reduce-max over
  the phase axis dropped it at this shape; the divergence guard needs it to reach the loss.)"""
  x = jax.random.normal(jax.random.key(11), (4, 28, 28, 1)).at[1, 3, 3, 0].set(jnp.nan)
  module = conv_pool.ConvMaxPool(8, polyphase=True)
  out = np.asarray(apply(module, init(module, x), x))
  # Conv outputs 0..3 (rows and columns) see pixel 3: pooled windows 0 and 1 hold them.
  expected = np.zeros(out.shape, bool)
  expected[1, :2, :2, :] = True
  np.testing.assert_array_equal(np.isnan(out), expected)
