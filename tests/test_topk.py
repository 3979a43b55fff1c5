import math

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxprune
from jaxprune.topk import keep_count, topk_mask, topk_masks

shapes = st.lists(st.integers(1, 9), min_size=1, max_size=4).map(tuple)


@settings(max_examples=15)
@given(shape=shapes, sparsity=st.floats(0.0, 0.999), seed=st.integers(0, 2**16))
def test_exact_kept_count_magnitude(shape, sparsity, seed):
  w = jax.random.normal(jax.random.PRNGKey(seed), shape)
  n = math.prod(shape)
  masks = jaxprune.magnitude_masks({"w": w}, {"w": sparsity})
  expected = n - math.floor(sparsity * n)
  m = np.broadcast_to(np.asarray(masks["w"]), shape)
  assert m.sum() == expected
  if 0 < expected < n:  # kept entries dominate dropped ones
    a = np.abs(np.asarray(w))
    assert a[m].min() >= a[~m].max()


@settings(max_examples=15)
@given(
  shape=shapes, k_frac=st.floats(0.0, 1.0), seed=st.integers(0, 2**16), levels=st.integers(1, 4)
)
def test_topk_with_heavy_ties_is_exact_and_lowest_index_first(shape, k_frac, seed, levels):
  n = math.prod(shape)
  k = int(round(k_frac * n))
  s = jax.random.randint(jax.random.PRNGKey(seed), shape, 0, levels).astype(jnp.float32)
  m = np.asarray(jax.jit(topk_mask, static_argnums=1)(s, k)).reshape(-1)
  assert m.sum() == k
  # reference: stable sort by (-score, index)
  order = np.lexsort((np.arange(n), -np.asarray(s).reshape(-1)))
  ref = np.zeros(n, bool)
  ref[order[:k]] = True
  np.testing.assert_array_equal(m, ref)


@given(seed=st.integers(0, 2**16), k=st.integers(0, 30))
def test_joint_topk_matches_concatenated(seed, k):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  a = jax.random.randint(k1, (3, 4), -3, 3).astype(jnp.float32)
  b = jax.random.randint(k2, (2, 5, 1), -3, 3).astype(jnp.float32)
  ma, mb = topk_masks([a, b], k)
  joint = np.concatenate([np.asarray(ma).ravel(), np.asarray(mb).ravel()])
  ref = np.asarray(topk_mask(jnp.concatenate([a.ravel(), b.ravel()]), k))
  np.testing.assert_array_equal(joint, ref)


def test_traced_k_and_nan_scores_rank_last():
  s = jnp.array([jnp.nan, 1.0, -jnp.inf, 2.0, jnp.nan])
  f = jax.jit(topk_mask)
  assert np.asarray(f(s, jnp.int32(2))).tolist() == [False, True, False, True, False]
  assert np.asarray(f(s, jnp.int32(3))).tolist() == [False, True, True, True, False]
  assert np.asarray(f(s, jnp.int32(4))).tolist() == [True, True, True, True, False]


def test_negative_zero_ties_with_zero():
  s = jnp.array([0.0, -0.0, 0.0, -0.0])
  assert np.asarray(topk_mask(s, 2)).tolist() == [True, True, False, False]


def test_keep_count_rule():
  assert keep_count(10, 0.9) == 1
  assert keep_count(2048, 0.9) == 205
  assert keep_count(7, 0.0) == 7
  assert keep_count(3, 0.5) == 2


@settings(max_examples=15)
@given(shape=shapes, sparsity=st.floats(0.0, 0.999), seed=st.integers(0, 2**16))
def test_random_masks_exact_count_and_deterministic(shape, sparsity, seed):
  params = {"w": jnp.ones(shape)}
  key = jax.random.PRNGKey(seed)
  m1 = jaxprune.random_masks(key, params, {"w": sparsity})
  m2 = jaxprune.random_masks(key, params, {"w": sparsity})
  n = math.prod(shape)
  assert np.broadcast_to(np.asarray(m1["w"]), shape).sum() == n - math.floor(sparsity * n)
  np.testing.assert_array_equal(np.asarray(m1["w"]), np.asarray(m2["w"]))
