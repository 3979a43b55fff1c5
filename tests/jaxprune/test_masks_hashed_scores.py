"""The counter-based scores SET grows by (jaxprune.masks.hashed_scores)."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxprune.masks import hashed_scores


@settings(max_examples=10, deadline=None)
@given(
  shape=st.lists(st.integers(1, 40), min_size=1, max_size=3).map(tuple),
  seed=st.integers(0, 2**16),
)
def test_shapes_range_and_determinism(shape, seed):
  tree = {"a": jnp.zeros(shape), "b": jnp.zeros((3,))}
  key = jax.random.PRNGKey(seed)
  s = hashed_scores(key, tree)
  assert s["a"].shape == shape and s["a"].dtype == jnp.float32
  x = np.asarray(s["a"])
  assert (x >= 0).all() and (x < 1).all()
  np.testing.assert_array_equal(x, np.asarray(jax.jit(hashed_scores)(key, tree)["a"]))


def test_uniform_and_independent_across_keys_leaves_and_neighbours():
  tree = {"a": jnp.zeros((512, 512)), "b": jnp.zeros((512, 512))}
  s = hashed_scores(jax.random.PRNGKey(0), tree)
  t = hashed_scores(jax.random.PRNGKey(1), tree)
  a, b, c = (np.asarray(v).reshape(-1) for v in (s["a"], s["b"], t["a"]))
  n = a.size
  # 64-bin chi-square of a uniform sample: mean 63, sd ~11; 150 fails a biased generator.
  counts = np.bincount((a * 64).astype(int), minlength=64)
  assert ((counts - n / 64) ** 2 / (n / 64)).sum() < 150
  for u, v in ((a, b), (a, c), (a[:-1], a[1:])):  # leaves, keys, adjacent entries
    assert abs(np.corrcoef(u, v)[0, 1]) < 0.01
  # Selections differ: the top 1% of two keys overlap about as chance (1%).
  top = lambda x: set(np.argsort(-x)[: n // 100])
  assert len(top(a) & top(c)) < 0.03 * (n // 100)
  assert len(np.unique(a)) > 0.98 * n  # 2**24 levels: few equal draws
