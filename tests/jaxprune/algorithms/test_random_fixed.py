"""`create("fixed", masks=...)`: user-given masks kept exactly; bad masks name their path."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_zeros_where_masked, tiny_problem, train
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxprune


def _random_masks(params, seed, as_float=False):
  key = jax.random.PRNGKey(seed)
  leaves, treedef = jax.tree.flatten(params)
  masks = []
  for i, p in enumerate(leaves):
    if jnp.ndim(p) < 2:
      masks.append(jnp.ones((), jnp.bool_))
    else:
      m = jax.random.bernoulli(jax.random.fold_in(key, i), 0.3, jnp.shape(p))
      masks.append(m.astype(jnp.float32) if as_float else m)
  return jax.tree.unflatten(treedef, masks)


@settings(max_examples=2, deadline=None)
@given(seed=st.integers(0, 1000), as_float=st.booleans())
def test_masks_kept_exactly_through_training(seed, as_float):
  params, loss_fn = tiny_problem()
  masks = _random_masks(params, seed, as_float)
  algo = jaxprune.create("fixed", masks=masks, sparsity=0.9, update_every=1, end_step=5)
  tx = jaxprune.sparsify(optax.adam(1e-2), algo)
  p, state, losses = train(tx, params, loss_fn, 6)
  want = jax.tree.map(lambda m: np.asarray(m).astype(bool), masks)
  got = jaxprune.get_masks(state)
  for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    assert np.array_equal(np.broadcast_to(w, np.shape(g)), np.asarray(g))
    assert np.asarray(g).dtype == np.bool_
  assert_zeros_where_masked(p, got)
  # kept entries of a pruned kernel trained (dead ReLU units may not move)
  k0 = params["params"]["Dense_0"]["kernel"]
  k1 = p["params"]["Dense_0"]["kernel"]
  m = np.asarray(want["params"]["Dense_0"]["kernel"])
  assert np.mean(np.asarray(k1)[m] != np.asarray(k0)[m]) > 0.5
  assert losses[-1] < losses[0]


def test_scalar_false_prunes_whole_leaf_scalar_true_keeps_it():
  params = {"a": jnp.ones((3, 4)), "b": jnp.ones((5,))}
  algo = jaxprune.create("fixed", masks={"a": False, "b": True})
  masks, _ = algo.init(params)
  assert masks["a"].shape == (3, 4) and not masks["a"].any()
  assert masks["b"].shape == () and bool(masks["b"])


def test_bad_masks_name_the_path():
  params = {"a": {"kernel": jnp.ones((3, 4))}, "b": {"kernel": jnp.ones((4, 2))}}
  good = {"a": {"kernel": jnp.ones((3, 4), bool)}, "b": {"kernel": jnp.ones((4, 2), bool)}}
  shape = {**good, "b": {"kernel": jnp.ones((2, 4), bool)}}
  with pytest.raises(ValueError, match="b/kernel.*shape"):
    jaxprune.create("fixed", masks=shape).init(params)
  missing = {"a": good["a"]}
  with pytest.raises(ValueError, match="b/kernel"):
    jaxprune.create("fixed", masks=missing).init(params)
  renamed = {"a": good["a"], "c": good["b"]}
  with pytest.raises(ValueError, match="'b/kernel'.*'c/kernel'"):
    jaxprune.create("fixed", masks=renamed).init(params)
  almost = {**good, "a": {"kernel": jnp.ones((3, 4)).at[1, 2].set(0.5)}}
  with pytest.raises(ValueError, match="a/kernel.*0.5.*exactly 0 or 1"):
    jaxprune.create("fixed", masks=almost)
  with pytest.raises(ValueError, match="'masks' is required"):
    jaxprune.create("fixed", sparsity=0.5).init(params)
  with pytest.raises(ValueError, match="'maks'"):
    jaxprune.create("fixed", maks=good)
