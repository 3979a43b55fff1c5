"""jaxprune.flops against hand counts (2 FLOPs per multiply-add)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxprune
from experiments import models
from jaxprune.flops import NO_PARAMETER


class MLP(nn.Module):
  features: tuple

  @nn.compact
  def __call__(self, x):
    for f in self.features[:-1]:
      x = nn.relu(nn.Dense(f)(x))
    return nn.Dense(self.features[-1])(x)


def _apply(model):
  return lambda p, x: model.apply({"params": p}, x)


def _shapes(model, x):
  """The params' shapes and dtypes, without running the initialisers."""
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]


def _dense_masks(params):
  return jax.tree.map(lambda p: jnp.ones((), jnp.bool_), params)


@settings(max_examples=6, deadline=None)
@given(
  batch=st.integers(1, 4),
  d_in=st.integers(1, 9),
  features=st.lists(st.integers(1, 9), min_size=1, max_size=3),
  keep=st.integers(1, 5),
)
def test_mlp_hand_count_with_and_without_masks(batch, d_in, features, keep):
  model = MLP(tuple(features))
  x = jnp.ones((batch, d_in))
  params = _shapes(model, x)
  widths = [d_in, *features]
  hand = [2 * batch * a * b for a, b in zip(widths[:-1], widths[1:])]

  dense = jaxprune.flops(_apply(model), params, None, x)
  assert dense.dense == sum(hand) and dense.sparse == sum(hand)
  assert [r.dense for r in dense.layers] == hand
  assert [r.path for r in dense.layers] == [f"Dense_{i}/kernel" for i in range(len(features))]

  # Mask the first kernel: keep every `keep`-th entry.
  masks = _dense_masks(params)
  k = params["Dense_0"]["kernel"]
  m = (np.arange(k.size) % keep == 0).reshape(k.shape)
  masks["Dense_0"]["kernel"] = jnp.asarray(m)
  sparse = jaxprune.flops(_apply(model), params, masks, x)
  assert sparse.dense == sum(hand)
  np.testing.assert_allclose(sparse.sparse, hand[0] * m.mean() + sum(hand[1:]))
  np.testing.assert_allclose(sparse.layers[0].sparse, hand[0] * m.mean())
  # masks=None and all-True masks agree.
  assert jaxprune.flops(_apply(model), params, _dense_masks(params), x) == dense


def _out(size, k, stride, padding):
  return -(-size // stride) if padding == "SAME" else (size - k) // stride + 1


@pytest.mark.parametrize("padding", ["SAME", "VALID"])
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_conv_hand_count_padding_and_strides(padding, stride):
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(6, (3, 3), strides=stride, padding=padding)(x)
      x = nn.relu(x)
      x = nn.Conv(4, (2, 2), strides=(1, stride), padding=padding, use_bias=False)(x)
      x = x.reshape((x.shape[0], -1))
      return nn.Dense(5)(x)

  net, x = Net(), jnp.ones((2, 11, 10, 3))
  params = _shapes(net, x)
  h1, w1 = _out(11, 3, stride, padding), _out(10, 3, stride, padding)
  h2, w2 = _out(h1, 2, 1, padding), _out(w1, 2, stride, padding)
  hand = [2 * 2 * h1 * w1 * 6 * (3 * 3 * 3), 2 * 2 * h2 * w2 * 4 * (2 * 2 * 6)]
  hand.append(2 * 2 * (h2 * w2 * 4) * 5)
  result = jaxprune.flops(_apply(net), params, None, x)
  assert [r.dense for r in result.layers] == hand
  assert result.dense == sum(hand)

  masks = _dense_masks(params)
  masks["Conv_1"]["kernel"] = jnp.zeros((2, 2, 6, 4), jnp.bool_).at[0].set(True)  # density 1/2
  result = jaxprune.flops(_apply(net), params, masks, x)
  np.testing.assert_allclose(result.sparse, hand[0] + hand[1] / 2 + hand[2])


def test_grouped_conv():
  net, x = nn.Conv(8, (3, 3), feature_group_count=4, use_bias=False), jnp.ones((1, 5, 5, 4))
  params = _shapes(net, x)
  assert jaxprune.flops(_apply(net), params, None, x).dense == 2 * 5 * 5 * 8 * (3 * 3 * 1)


class Attention(nn.Module):
  heads: int = 2
  head_dim: int = 3

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    proj = lambda name: nn.DenseGeneral((self.heads, self.head_dim), name=name)(x)
    q, k, v = proj("query"), proj("key"), proj("value")
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(self.head_dim)
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores), v)
    return nn.DenseGeneral(d, axis=(-2, -1), name="out")(out)


def test_attention_block_einsum():
  b, t, d, h, hd = 2, 5, 4, 2, 3
  net, x = Attention(h, hd), jnp.ones((b, t, d))
  params = _shapes(net, x)
  proj = 2 * b * t * d * h * hd
  scores = 2 * b * h * t * t * hd
  mix = 2 * b * h * t * t * hd
  out = 2 * b * t * h * hd * d
  result = jaxprune.flops(_apply(net), params, None, x)
  rows = result.as_dict()
  for name in ("query", "key", "value"):
    assert rows[f"{name}/kernel"][0] == proj
  assert rows["out/kernel"][0] == out
  assert rows[NO_PARAMETER][0] == scores + mix
  assert result.dense == 3 * proj + scores + mix + out
  assert result.layers[-1].path == NO_PARAMETER

  masks = _dense_masks(params)
  masks["query"]["kernel"] = jnp.zeros((d, h, hd), jnp.bool_).at[0].set(True)  # density 1/4
  result = jaxprune.flops(_apply(net), params, masks, x)
  np.testing.assert_allclose(result.sparse, proj / 4 + 2 * proj + scores + mix + out)


def test_nnx_model():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.a = nnx.Linear(6, 8, rngs=rngs)
      self.b = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
      return self.b(nnx.relu(self.a(x)))

  graphdef, state = nnx.split(Net(nnx.Rngs(0)), nnx.Param)
  apply_fn = lambda s, x: nnx.merge(graphdef, s)(x)
  x = jnp.ones((4, 6))
  masks = jax.tree.map(lambda p: jnp.ones((), jnp.bool_), state)
  masks["b"]["kernel"] = nnx.Param(jnp.arange(24).reshape(8, 3) < 6)  # density 1/4
  result = jaxprune.flops(apply_fn, state, masks, x)
  assert result.dense == 2 * 4 * (6 * 8 + 8 * 3)
  np.testing.assert_allclose(result.sparse, 2 * 4 * (6 * 8 + 8 * 3 / 4))
  assert [r.path for r in result.layers] == ["a/kernel", "b/kernel"]


def test_experiments_cnn_with_batch_norm():
  model = models.CNN(channels=(32, 64), hidden=128)
  x = jnp.ones((1, 28, 28, 1))
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  hand = [
    2 * 28 * 28 * 32 * 9,
    2 * 14 * 14 * 64 * 9 * 32,
    2 * 7 * 7 * 64 * 128,
    2 * 128 * 10,
  ]
  result = jaxprune.flops(model.apply, variables, None, x)
  assert [r.dense for r in result.layers] == hand
  assert [r.path for r in result.layers] == [
    "params/Conv_0/kernel",
    "params/Conv_1/kernel",
    "params/Dense_0/kernel",
    "params/Dense_1/kernel",
  ]


def test_follows_params_through_jit_custom_vjp_scan_and_cond():
  @jax.custom_vjp
  def masked(w):
    return w * 1.0

  masked.defvjp(lambda w: (w, None), lambda _, g: (g,))

  def apply_fn(p, x):
    w = masked(p["w"]).T  # custom_vjp, then a transpose
    y = jax.jit(lambda a, b: a @ b)(x, w)  # 2*2*4*4 through a jit
    y, _ = jax.lax.scan(lambda c, s: (c @ s, None), y, p["stack"])  # 3 x 2*2*4*4
    return jax.lax.cond(y.sum() > 0, lambda: y @ p["w"], lambda: y)  # max branch: 2*2*4*4

  p = {"w": jnp.ones((4, 4)), "stack": jnp.ones((3, 4, 4))}
  masks = {"w": jnp.arange(16).reshape(4, 4) < 4, "stack": jnp.ones((), jnp.bool_)}
  result = jaxprune.flops(apply_fn, p, masks, jnp.ones((2, 4)))
  unit = 2 * 2 * 4 * 4
  assert result.as_dict() == {"w": (2 * unit, 2 * unit / 4), "stack": (3 * unit, 3 * unit)}


def test_bad_masks_name_the_path():
  model = MLP((3, 2))
  x = jnp.ones((1, 4))
  params = _shapes(model, x)
  masks = _dense_masks(params)
  masks["Dense_1"]["kernel"] = jnp.ones((5, 5), jnp.bool_)
  with pytest.raises(ValueError, match="Dense_1/kernel"):
    jaxprune.flops(_apply(model), params, masks, x)
  del masks["Dense_1"]
  with pytest.raises(ValueError, match="Dense_1"):
    jaxprune.flops(_apply(model), params, masks, x)


def test_summary_shows_flops_next_to_sparsity():
  model = MLP((3, 2))
  x = jnp.ones((1, 4))
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  masks = _dense_masks(params)
  masks["Dense_0"]["kernel"] = jnp.arange(12).reshape(4, 3) < 6
  table = jaxprune.summary(params, masks, flops=jaxprune.flops(_apply(model), params, masks, x))
  rows = {r.path: r for r in table.rows}
  assert rows["Dense_0/kernel"].flops_dense == 24 and rows["Dense_0/kernel"].flops_sparse == 12
  assert rows["Dense_0/bias"].flops_dense is None
  assert table.total.flops_dense == 24 + 12 and table.total.flops_sparse == 12 + 12
  text = str(table)
  assert "sparse FLOPs" in text and text.splitlines()[-1].split()[-2:] == ["36", "24"]
  assert "FLOPs" not in str(jaxprune.summary(params, masks))
