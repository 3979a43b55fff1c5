"""compact(): removing pruned neurons/channels gives the same outputs."""

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import structured as S
from jaxprune.compact import compact, infer_layers

ATOL = 1e-5


class MLP(nn.Module):
  features: Sequence[int]
  batch_norm: bool = False

  @nn.compact
  def __call__(self, x):
    for f in self.features[:-1]:
      x = nn.Dense(f)(x)
      if self.batch_norm:
        x = nn.BatchNorm(use_running_average=True)(x)
      x = nn.relu(x)
    return nn.Dense(self.features[-1])(x)


class CNN(nn.Module):
  convs: Sequence[int]
  dense: Sequence[int]
  padding: str = "SAME"
  pool: str = "flatten"

  @nn.compact
  def __call__(self, x):
    for f in self.convs:
      x = nn.Conv(f, (3, 3), padding=self.padding)(x)
      x = nn.BatchNorm(use_running_average=True)(x)
      x = nn.relu(x)
    x = x.reshape(x.shape[0], -1) if self.pool == "flatten" else x.mean(axis=(1, 2))
    for f in self.dense[:-1]:
      x = nn.relu(nn.Dense(f)(x))
    return nn.Dense(self.dense[-1])(x)


def _init(model, x, seed=0):
  """Random variables of the model's shapes (eval_shape: nothing to compile).

  Kernels are scaled normals; biases, BatchNorm scales/offsets and statistics are
  non-trivial, so removed units have non-zero constant outputs.
  """
  shapes = jax.eval_shape(model.init, jax.random.key(seed), x)
  rng = np.random.default_rng(seed)

  def fill(p):
    if len(p.shape) >= 2:
      fan_in = math.prod(p.shape[:-1])
      return jnp.asarray(rng.normal(size=p.shape) / math.sqrt(fan_in), jnp.float32)
    return jnp.asarray(rng.normal(size=p.shape), jnp.float32)

  params = jax.tree.map(fill, shapes["params"])
  stats = shapes.get("batch_stats")
  if stats is not None:
    stats = jax.tree.map(
      lambda p: jnp.asarray(np.abs(rng.normal(size=p.shape)) + 0.1, jnp.float32), stats
    )
  return params, stats


def _unit_masks(params, sparsity, last):
  def make(path, p):
    name = "/".join(k.key for k in path)
    if p.ndim >= 2 and not name.startswith(last):
      return S.structured_mask(jnp.abs(p), sparsity, "neuron")
    return jnp.asarray(True)

  return jax.tree_util.tree_map_with_path(make, params)


def _apply(model, params, stats, x):
  variables = {"params": params}
  if stats is not None:
    variables["batch_stats"] = stats
  return np.asarray(jax.jit(model.apply)(variables, x))


def _masked(params, masks):
  return jax.tree.map(lambda p, m: p * m, params, masks)


@pytest.mark.parametrize("sparsity", [0.5, 0.75])
def test_mlp_equivalence(sparsity):
  feats = (16, 12, 5)
  model = MLP(feats)
  x = np.random.default_rng(1).normal(size=(6, 10)).astype(np.float32)
  params, _ = _init(model, x)
  masks = _unit_masks(params, sparsity, "Dense_2")
  out = compact(params, masks)
  assert out.widths == [16 - math.floor(sparsity * 16), 12 - math.floor(sparsity * 12), 5]
  assert out.features == {"Dense_0": out.widths[0], "Dense_1": out.widths[1], "Dense_2": 5}
  assert out.params["Dense_0"]["kernel"].shape == (10, out.widths[0])
  assert out.params["Dense_1"]["kernel"].shape == (out.widths[0], out.widths[1])
  assert out.notes == {}
  big = _apply(model, _masked(params, masks), None, x)
  small = _apply(MLP(tuple(out.widths)), out.params, None, x)
  np.testing.assert_allclose(small, big, atol=ATOL)
  # Folding the removed units' act(bias) matters: dropping them naively differs.
  naive = jax.tree.map(lambda a: a, out.params)
  naive["Dense_1"]["bias"] = params["Dense_1"]["bias"][out.kept["Dense_1"]]
  naive["Dense_2"]["bias"] = params["Dense_2"]["bias"]
  assert np.abs(_apply(MLP(tuple(out.widths)), naive, None, x) - big).max() > 1e-3
  # Masks come back sliced like the params.
  assert jax.tree.structure(out.masks) == jax.tree.structure(out.params)
  assert out.masks["Dense_0"]["kernel"].shape == out.params["Dense_0"]["kernel"].shape
  assert bool(np.all(out.masks["Dense_0"]["kernel"]))


def test_mlp_batchnorm_and_inferred_order():
  feats = (16, 8, 3)
  model = MLP(feats, batch_norm=True)
  x = np.random.default_rng(2).normal(size=(4, 6)).astype(np.float32)
  params, stats = _init(model, x, seed=3)
  assert infer_layers(params, stats) == [
    "Dense_0",
    "BatchNorm_0",
    "Dense_1",
    "BatchNorm_1",
    "Dense_2",
  ]
  masks = _unit_masks(params, 0.5, "Dense_2")
  out = compact(params, masks, stats)
  assert out.widths == [8, 4, 3]
  assert out.batch_stats["BatchNorm_0"]["mean"].shape == (8,)
  assert out.params["BatchNorm_1"]["scale"].shape == (4,)
  big = _apply(model, _masked(params, masks), stats, x)
  small = _apply(MLP(tuple(out.widths), batch_norm=True), out.params, out.batch_stats, x)
  np.testing.assert_allclose(small, big, atol=ATOL)


def test_cascade_without_masks():
  model = MLP((6, 4, 2))
  x = np.random.default_rng(4).normal(size=(5, 3)).astype(np.float32)
  params, _ = _init(model, x)
  k0 = np.array(params["Dense_0"]["kernel"])
  k0[:, [1, 4]] = 0.0  # two dead units in layer 0
  k1 = np.array(params["Dense_1"]["kernel"])
  k1[[0, 2, 3, 5], 2] = 0.0  # unit 2 of layer 1 only reads the dead units
  params["Dense_0"]["kernel"], params["Dense_1"]["kernel"] = jnp.asarray(k0), jnp.asarray(k1)
  out = compact(params)  # masks=None: exact zeros define dead units
  assert out.widths == [4, 3, 2]
  np.testing.assert_array_equal(out.kept["Dense_1"], [0, 1, 3])
  assert out.masks is None
  np.testing.assert_allclose(
    _apply(MLP((4, 3, 2)), out.params, None, x), _apply(model, params, None, x), atol=ATOL
  )


def _cnn_setup(padding, pool):
  model = CNN(convs=(8, 6), dense=(10, 4), padding=padding, pool=pool)
  x = np.random.default_rng(5).normal(size=(3, 7, 7, 3)).astype(np.float32)
  params, stats = _init(model, x, seed=6)
  masks = _unit_masks(params, 0.5, "Dense_1")
  dead0 = np.flatnonzero(~np.asarray(masks["Conv_0"]["kernel"]).reshape(-1, 8).any(0))
  # Make the constant output relu(BN(bias)) of half the dead Conv_0 channels > 0.
  beta = np.array(params["BatchNorm_0"]["bias"])
  beta[dead0[::2]] = 5.0
  beta[dead0[1::2]] = -5.0
  params["BatchNorm_0"]["bias"] = jnp.asarray(beta)
  return model, x, params, stats, masks, dead0


def test_cnn_batchnorm_same_padding():
  model, x, params, stats, masks, dead0 = _cnn_setup("SAME", "flatten")
  assert infer_layers(params, stats) == [
    "Conv_0",
    "BatchNorm_0",
    "Conv_1",
    "BatchNorm_1",
    "Dense_0",
    "Dense_1",
  ]
  out = compact(params, masks, stats)
  # Conv_0 feeds a SAME-padded Conv: only channels with constant output 0 go.
  n_pos = len(dead0[::2])
  assert out.widths == [4 + n_pos, 3, 5, 4]
  assert "Conv_1" in out.notes["Conv_0"] and "SAME" in out.notes["Conv_0"]
  assert set(out.kept["Conv_0"]) >= set(dead0[::2]) and not set(out.kept["Conv_0"]) & set(
    dead0[1::2]
  )
  assert out.params["Conv_1"]["kernel"].shape == (3, 3, 4 + n_pos, 3)
  assert out.params["Dense_0"]["kernel"].shape == (7 * 7 * 3, 5)
  assert out.batch_stats["BatchNorm_1"]["var"].shape == (3,)
  big = _apply(model, _masked(params, masks), stats, x)
  small_model = CNN(convs=tuple(out.widths[:2]), dense=tuple(out.widths[2:]))
  np.testing.assert_allclose(_apply(small_model, out.params, out.batch_stats, x), big, atol=ATOL)


@pytest.mark.parametrize("pool", ["flatten", "mean"])
def test_cnn_valid_padding_folds_everything(pool):
  model, x, params, stats, masks, _ = _cnn_setup("VALID", pool)
  out = compact(params, masks, stats, conv_padding="VALID")
  assert out.widths == [4, 3, 5, 4] and out.notes == {}
  big = _apply(model, _masked(params, masks), stats, x)
  small_model = CNN(convs=(4, 3), dense=(5, 4), padding="VALID", pool=pool)
  np.testing.assert_allclose(_apply(small_model, out.params, out.batch_stats, x), big, atol=ATOL)


def test_explicit_layers_nested_paths():
  class Encoder(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.relu(nn.Dense(8, name="hidden")(x))

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3, name="head")(Encoder(name="enc")(x))

  x = np.ones((2, 4), np.float32)
  params, _ = _init(Net(), x)
  masks = jax.tree.map(lambda p: jnp.asarray(True), params)
  masks["enc"]["hidden"]["kernel"] = S.structured_mask(
    jnp.abs(params["enc"]["hidden"]["kernel"]), 0.5, "neuron"
  )
  with pytest.raises(ValueError, match="'enc'"):
    compact(params, masks)  # cannot infer: not an auto-named Dense/Conv/BatchNorm
  out = compact(params, masks, layers=["enc/hidden", "head"])
  assert out.widths == [4, 3]
  assert out.params["enc"]["hidden"]["kernel"].shape == (4, 4)
  big = _apply(Net(), _masked(params, masks), None, x)
  small = jax.nn.relu(
    x @ out.params["enc"]["hidden"]["kernel"] + out.params["enc"]["hidden"]["bias"]
  )
  small = small @ out.params["head"]["kernel"] + out.params["head"]["bias"]
  np.testing.assert_allclose(small, big, atol=ATOL)


# ---------------------------------------------------------------------------
# refusals


class WithLayerNorm(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.LayerNorm()(nn.Dense(8)(x)))
    return nn.Dense(2)(x)


class ResBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x + nn.relu(nn.Dense(x.shape[-1])(x))


class WithResidual(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(8)(x))
    x = ResBlock()(x)
    return nn.Dense(2)(x)


def test_refuses_layernorm_naming_path():
  params, _ = _init(WithLayerNorm(), np.ones((1, 4), np.float32))
  with pytest.raises(ValueError, match="LayerNorm_0"):
    compact(params)
  with pytest.raises(ValueError, match="LayerNorm_0"):
    compact(params, layers=["Dense_0", "LayerNorm_0", "Dense_1"])


def test_refuses_residual_block_naming_path():
  params, _ = _init(WithResidual(), np.ones((1, 4), np.float32))
  with pytest.raises(ValueError, match="ResBlock_0"):
    compact(params)
  # Leaving the block out of `layers` does not help: its params are uncovered.
  with pytest.raises(ValueError, match="ResBlock_0/Dense_0"):
    compact(params, layers=["Dense_0", "Dense_1"])


def test_refuses_non_chain_and_bad_inputs():
  model = MLP((8, 6, 2))
  params, _ = _init(model, np.ones((1, 4), np.float32))
  with pytest.raises(
    ValueError,
    match=r"'Dense_1' has 6 outputs but 'Dense_0'/kernel reads 4 inputs \(shape \(4, 8\)\)",
  ):
    compact(params, layers=["Dense_1", "Dense_0", "Dense_2"])
  with pytest.raises(ValueError, match="Dense_7"):
    compact(params, layers=["Dense_0", "Dense_7"])
  with pytest.raises(ValueError, match="compact: masks do not match params: params have"):
    compact(params, {"Dense_0": True})
  with pytest.raises(ValueError, match="conv_padding"):
    compact(params, conv_padding="CIRCULAR")
  cnn = CNN(convs=(4,), dense=(2,))
  cparams, stats = _init(cnn, np.ones((1, 5, 5, 3), np.float32))
  with pytest.raises(ValueError, match="BatchNorm_0.*batch_stats"):
    compact(cparams)  # BatchNorm params without their statistics
  with pytest.raises(ValueError, match="Conv_0.*Dense_0"):
    compact(
      {"Dense_0": {"kernel": jnp.ones((4, 3))}, "Conv_0": {"kernel": jnp.ones((3, 3, 3, 2))}},
      layers=["Dense_0", "Conv_0"],
    )
  with pytest.raises(ValueError, match="DenseGeneral_0"):
    compact(
      {"DenseGeneral_0": {"kernel": jnp.ones((4, 2, 3))}, "Dense_0": {"kernel": jnp.ones((6, 2))}}
    )
