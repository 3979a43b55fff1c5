"""Sparsity distributions: ERK and uniform (jaxprune.distributions)."""

import math

import jax.numpy as jnp
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxprune


def test_erk_hand_computed():
  params = {"a": jnp.zeros((4, 6)), "b": jnp.zeros((6, 2)), "bias": jnp.zeros((6,))}
  s = jaxprune.erk(params, 0.5)
  # raw densities (4+6)/24 and (6+2)/12; eps = 18 / (10 + 8) = 1
  assert s["a"] == pytest.approx(1 - 10 / 24)
  assert s["b"] == pytest.approx(1 - 8 / 12)
  assert s["bias"] == 0.0


def test_erk_makes_small_layer_dense_and_rebalances():
  params = {"a": jnp.zeros((100, 100)), "b": jnp.zeros((2, 2))}
  s = jaxprune.erk(params, 0.1)
  assert s["b"] == 0.0
  eps = (0.9 * 10000 - 0.1 * 4) / 200
  assert s["a"] == pytest.approx(1 - 0.02 * eps)


@given(
  dims=st.lists(st.tuples(st.integers(2, 64), st.integers(2, 64)), min_size=1, max_size=5),
  sparsity=st.floats(0.05, 0.99),
)
def test_erk_total_equals_uniform(dims, sparsity):
  params = {f"l{i}": jnp.zeros(d) for i, d in enumerate(dims)}
  s = jaxprune.erk(params, sparsity)
  total = sum(math.prod(d) for d in dims)
  kept = sum((1 - s[f"l{i}"]) * math.prod(d) for i, d in enumerate(dims))
  assert kept == pytest.approx((1 - sparsity) * total, rel=1e-9, abs=1e-6)
  assert all(0.0 <= v < 1.0 for v in s.values())


def test_uniform_and_include_regex():
  params = {
    "Dense_0": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros(4)},
    "Dense_1": {"kernel": jnp.zeros((4, 2)), "bias": jnp.zeros(2)},
  }
  s = jaxprune.uniform(params, 0.7, include="Dense_1/kernel")
  assert s == {"Dense_0": {"kernel": 0.0, "bias": 0.0}, "Dense_1": {"kernel": 0.7, "bias": 0.0}}
  s = jaxprune.uniform(params, 0.7, include=lambda path, leaf: path.endswith("bias"))
  assert s["Dense_0"]["bias"] == 0.7 and s["Dense_0"]["kernel"] == 0.0


def test_erk_skips_zero_size_leaves():
  s = jaxprune.erk({"z": jnp.zeros((0, 5)), "w": jnp.ones((4, 4))}, 0.5)
  assert s["z"] == 0.0 and s["w"] == pytest.approx(0.5)


@given(
  widths=st.lists(st.integers(1, 40), min_size=2, max_size=5),
  sparsity=st.floats(0.0, 0.95),
  own=st.floats(0.0, 0.95),
  chosen=st.integers(0, 4),
)
def test_per_layer_gives_named_layers_their_own_sparsity_and_the_rest_the_global_one(
  widths, sparsity, own, chosen
):
  params = {
    f"Dense_{i}": {"kernel": jnp.zeros((w, w + 1)), "bias": jnp.zeros(w + 1)}
    for i, w in enumerate(widths)
  }
  name = f"Dense_{chosen % len(widths)}"
  s = jaxprune.per_layer({name: own})(params, sparsity, include="kernel")
  for layer, leaves in s.items():
    assert leaves["bias"] == 0.0  # not pruned
    assert leaves["kernel"] == (own if layer == name else sparsity)
  # A leaf path names that leaf alone.
  s = jaxprune.per_layer({f"{name}/kernel": own})(params, sparsity, include="kernel")
  assert s[name]["kernel"] == own


def test_per_layer_names_a_key_that_matches_no_pruned_leaf():
  params = {"Conv_0": {"kernel": jnp.zeros((3, 3, 1, 4)), "bias": jnp.zeros(4)}}
  with pytest.raises(
    ValueError, match="'Conv_9' names no pruned leaf; pruned leaves: Conv_0/kernel"
  ):
    jaxprune.per_layer({"Conv_9": 0.5})(params, 0.5, include="kernel")
  with pytest.raises(ValueError, match="sparsity of 'Conv_0' must be a number in"):
    jaxprune.per_layer({"Conv_0": 1.5})
