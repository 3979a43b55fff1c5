"""SET/RigL never grow a connection at a NaN or inf growth score, whatever the
placement of non-finite values in gradients and weights, and keep their active
counts exact (per N:M group: exactly N)."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxprune
from jaxprune import structured
from jaxprune.algorithms.dst import replace_connections

_BAD = np.float32([np.nan, np.inf, -np.inf])


def _nm_groups(x):
  """(groups, 4) of a 2-D array grouped along axis 0 (the N:M default axis -2)."""
  return np.moveaxis(np.asarray(x), 0, -1).reshape(-1, 4)


def test_nm_group_with_one_finite_candidate_grows_one_at_most():
  # Reproduces the failure: a 2:4 group whose two active weights are the layer's
  # smallest must drop both, but only one of its inactive slots has a finite gradient.
  mask = np.zeros((4, 2), bool)
  mask[:2] = True  # every group (column) keeps rows 0 and 1
  w = np.float32([[1e-3, 5.0], [2e-3, 6.0], [0.0, 0.0], [0.0, 0.0]])
  g = np.float32([[0.0, 0.0], [0.0, 0.0], [np.nan, 1.0], [3.0, 2.0]])
  new, n_drop = structured.replace_connections(mask, w, g, 0.5, "2:4")
  new = np.asarray(new)
  assert np.all(new.sum(0) == 2)
  assert not new[2, 0], "grown at a NaN gradient"
  assert int(n_drop) == 2  # column 0 drops one (one finite slot), column 1 one (the cap)


def test_nm_rigl_through_create_grows_no_nan():
  # The same through jaxprune.create("rigl", sparsity_type="2:4"): three NaN
  # gradients where each group had one finite candidate were grown before.
  mask = np.zeros((4, 3), bool)
  mask[:2] = True
  w = np.float32([[1e-3, 2e-3, 3e-3], [4e-3, 5e-3, 6e-3], [0, 0, 0], [0, 0, 0]])
  g = np.float32([[0, 0, 0], [0, 0, 0], [np.nan, 1.0, np.inf], [3.0, np.nan, 2.0]])
  algo = jaxprune.create("rigl", sparsity_type="2:4", end_step=10, drop_fraction=1.0)
  _, state = algo.init({"k": jnp.asarray(w)})
  new, state = algo.update(
    jnp.int32(1), {"k": jnp.asarray(w)}, {"k": jnp.asarray(g)}, {"k": jnp.asarray(mask)}, state
  )
  new = np.asarray(new["k"])
  assert np.all(new.sum(0) == 2)
  assert np.all(np.isfinite(g[new & ~mask]))
  assert (new & ~mask).sum() == 3  # one per group: its one finite candidate


_nm_replace = jax.jit(structured.replace_connections, static_argnums=(4,))


@settings(max_examples=40, deadline=None)
@given(
  shape=st.sampled_from([(4, 1), (8, 3), (16, 5)]),
  seed=st.integers(0, 2**16),
  g_rate=st.sampled_from([0.1, 0.4, 0.8, 1.0]),
  w_rate=st.sampled_from([0.0, 0.2, 0.6]),
  drop=st.floats(0.0, 1.0),
)
def test_nm_never_grows_at_non_finite_scores(shape, seed, g_rate, w_rate, drop):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=shape).astype(np.float32)
  w_bad = rng.random(shape) < w_rate
  w[w_bad] = rng.choice(_BAD, size=int(w_bad.sum()))
  g = rng.normal(size=shape).astype(np.float32)
  g_bad = rng.random(shape) < g_rate
  g[g_bad] = rng.choice(_BAD, size=int(g_bad.sum()))
  mask = np.asarray(structured.structured_mask(jnp.asarray(rng.random(shape)), None, "2:4"))
  new, n_drop = _nm_replace(jnp.asarray(mask), jnp.asarray(w), jnp.asarray(g), drop, "2:4")
  new = np.asarray(new)
  assert np.all(_nm_groups(new).sum(-1) == 2), "a group does not hold exactly 2"
  grown = new & ~mask
  assert np.all(np.isfinite(g[grown])), "grown at a non-finite score"
  assert int(n_drop) == grown.sum()


@settings(max_examples=30, deadline=None)
@given(
  shape=st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple),
  seed=st.integers(0, 2**16),
  g_rate=st.sampled_from([0.1, 0.5, 0.9, 1.0]),
  w_rate=st.sampled_from([0.0, 0.3]),
  sparsity=st.floats(0.05, 0.95),
  drop=st.floats(0.0, 1.0),
  regrow_dropped=st.booleans(),
)
def test_unstructured_never_grows_at_non_finite_scores(
  shape, seed, g_rate, w_rate, sparsity, drop, regrow_dropped
):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=shape).astype(np.float32)
  w_bad = rng.random(shape) < w_rate
  w[w_bad] = rng.choice(_BAD, size=int(w_bad.sum()))
  g = rng.normal(size=shape).astype(np.float32)
  g_bad = rng.random(shape) < g_rate
  g[g_bad] = rng.choice(_BAD, size=int(g_bad.sum()))
  mask = rng.random(shape) >= sparsity
  new, n_drop = replace_connections(
    jnp.asarray(mask), jnp.asarray(w), jnp.asarray(g), drop, regrow_dropped
  )
  new = np.asarray(new)
  assert new.sum() == mask.sum()
  assert np.all(np.isfinite(g[new & ~mask])), "grown at a non-finite score"
  if not regrow_dropped:
    assert int(n_drop) <= int((~mask & np.isfinite(g)).sum())
