"""Structured sparsity through jaxprune.create / sparsify (the algorithm side)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_zeros_where_masked, tiny_problem, train

import jaxprune
from jaxprune.structured import group_counts


def test_gradual_nm_ramps_by_steps_of_the_pattern():
  params, loss_fn = tiny_problem()
  algo = jaxprune.create(
    "gradual_magnitude",
    sparsity_type="2:4",
    end_step=20,
    update_every=5,
    include="Dense_[01]/kernel",
  )
  seen = []

  def record(i, p, s):
    m = np.asarray(jaxprune.get_masks(s)["params"]["Dense_0"]["kernel"])
    seen.append(sorted(set(group_counts(m, 4, axis=0).ravel().tolist())))
    assert_zeros_where_masked(p, jaxprune.get_masks(s))

  train(jaxprune.sparsify(optax.adam(1e-2), algo), params, loss_fn, 26, callback=record)
  assert seen[0] == [4] and seen[5] == [3] and seen[19] == [3]
  assert all(x == [2] for x in seen[20:])


@pytest.mark.parametrize("name", ["set", "rigl"])
def test_nm_dst_keeps_constraint_after_every_update(name):
  params, loss_fn = tiny_problem()
  algo = jaxprune.create(
    name,
    sparsity_type="2:4",
    update_every=3,
    end_step=30,
    drop_fraction=0.5,
    include="Dense_[01]/kernel",
  )
  changes = []

  def check(i, p, s):
    masks = jaxprune.get_masks(s)
    for path in ("Dense_0", "Dense_1"):
      m = np.asarray(masks["params"][path]["kernel"])
      assert np.all(group_counts(m, 4, axis=0) == 2)
    changes.append(
      float(jaxprune.get_sparse_state(s).algo_state.changed["params"]["Dense_0"]["kernel"])
    )

  _, _, losses = train(
    jaxprune.sparsify(optax.adam(1e-2), algo), params, loss_fn, 31, callback=check
  )
  assert max(changes) > 0
  assert losses[-1] < losses[0]


def test_neuron_sparsity_and_summary_notes_for_skipped_leaves():
  params = {
    "Dense_0": {"kernel": jnp.ones((6, 8)) * jnp.arange(8.0)},
    "Dense_1": {"kernel": jnp.ones((8, 3))},
    "odd": jnp.ones((3, 5)),
  }
  algo = jaxprune.create("magnitude", sparsity=0.5, sparsity_type="2:4")
  masks = jaxprune.sparsify(optax.sgd(0.1), algo).init(params).masks
  assert masks["odd"].shape == ()  # 3 rows are not divisible by 4: skipped, not pruned
  text = str(jaxprune.summary(params, masks, algorithm=algo))
  assert "odd" in text and "skipped" in text
  algo = jaxprune.create("magnitude", sparsity=0.5, sparsity_type="neuron", include="Dense_0")
  tx = jaxprune.sparsify(optax.sgd(0.1), algo)
  state = tx.init(params)
  u, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  m = np.asarray(jaxprune.get_masks(state)["Dense_0"]["kernel"])
  assert m.all(axis=0).sum() == 4 and (~m).all(axis=0).sum() == 4  # whole columns
  assert m[:, 4:].all()  # the 4 largest-norm columns survive


def test_explicitly_named_incompatible_leaf_raises():
  params = {"odd": jnp.ones((3, 5))}
  algo = jaxprune.create("magnitude", sparsity_type="2:4", include="odd")
  with pytest.raises(ValueError, match="odd"):
    jaxprune.sparsify(optax.sgd(0.1), algo).init(params)


@pytest.mark.parametrize("bad", ["3:2", "0:4", "2:0", "2:4:8", "two:four", 24])
def test_bad_sparsity_type_names_the_key(bad):
  with pytest.raises((ValueError, TypeError), match="sparsity_type"):
    jaxprune.create("magnitude", sparsity=0.5, sparsity_type=bad)


def test_axis_key_configures_nm_grouping():
  params = {"w": jax.random.normal(jax.random.PRNGKey(0), (6, 8))}
  algo = jaxprune.create("magnitude", sparsity_type="1:4", axis=1)
  tx = jaxprune.sparsify(optax.sgd(0.1), algo)
  state = tx.init(params)
  _, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  m = np.asarray(jaxprune.get_masks(state)["w"])
  assert np.all(group_counts(m, 4, axis=1) == 1)
  with pytest.raises(TypeError, match="axis"):
    jaxprune.create("magnitude", sparsity_type="1:4", axis="rows")
