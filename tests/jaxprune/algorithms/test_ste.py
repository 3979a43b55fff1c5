"""Straight-through training: identity gradient, dense params, N:M masks, SR-STE decay."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tiny_problem

import jaxprune
from jaxprune.structured import group_counts


def test_straight_through_forward_masked_backward_identity():
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  params = {"w": jax.random.normal(k1, (4, 6)), "b": jnp.ones((6,))}
  masks = {"w": jax.random.bernoulli(k2, 0.5, (4, 6)), "b": jnp.ones((), bool)}
  out = jaxprune.straight_through(params, masks)
  np.testing.assert_array_equal(out["w"], jnp.where(masks["w"], params["w"], 0.0))
  assert np.all(np.asarray(out["w"])[~np.asarray(masks["w"])] == 0.0)
  x = jnp.arange(1.0, 5.0)
  loss = lambda p: jnp.sum(jnp.tanh(x @ p["w"] + p["b"]))
  g_st = jax.grad(lambda p: loss(jaxprune.straight_through(p, masks)))(params)
  g_sparse = jax.grad(loss)(jaxprune.apply_masks(params, masks))
  # the gradient at the masked weights reaches every entry, pruned ones included
  np.testing.assert_allclose(g_st["w"], g_sparse["w"], rtol=1e-6)
  assert np.all(np.asarray(g_st["w"])[~np.asarray(masks["w"])] != 0.0)


def _train(algo, steps, lr=1e-2):
  params, loss_fn = tiny_problem(d=16)
  tx = jaxprune.sparsify(optax.adam(lr), algo)
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    masks = jaxprune.get_masks(s)
    loss, g = jax.value_and_grad(lambda q: loss_fn(jaxprune.straight_through(q, masks)))(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  losses, changed, prev = [], 0, None
  for _ in range(steps):
    params, state, loss = step(params, state)
    losses.append(float(loss))
    m = np.asarray(jaxprune.get_masks(state)["params"]["Dense_0"]["kernel"])
    changed += int(prev is not None and not np.array_equal(m, prev))
    prev = m
  return params, state, losses, changed


@pytest.mark.parametrize("name", [pytest.param("ste", marks=pytest.mark.slow), "sr_ste"])
def test_ste_nm_masks_exact_params_dense_masks_follow_magnitude(name):
  algo = jaxprune.create(name, sparsity_type="2:4", include="Dense_[01]/kernel")
  params, state, losses, changed = _train(algo, 25)
  masks = jaxprune.get_masks(state)
  for layer in ("Dense_0", "Dense_1"):
    m = np.asarray(masks["params"][layer]["kernel"])
    assert np.all(group_counts(m, 4, axis=0) == 2)  # exactly 2:4 along the input axis
    w = np.asarray(params["params"][layer]["kernel"])
    assert np.count_nonzero(w[~m]) > 0  # params stay dense
    sparse = jaxprune.apply_masks(params, masks)["params"][layer]["kernel"]
    assert np.all(np.asarray(sparse)[~m] == 0.0) and np.all(np.asarray(sparse)[m] == w[m])
  assert changed > 0  # masks recomputed from the dense weights, and they moved
  assert losses[-1] < losses[0]


def test_sr_ste_decay_only_on_pruned_entries():
  lam = 0.1
  w = jnp.array([[4.0, -3.0], [1.0, 2.0], [-0.5, 0.25], [2.5, -1.0]])
  params = {"w": w}
  algo = jaxprune.create("sr_ste", sparsity_type="2:4", decay=lam)
  tx = jaxprune.sparsify(optax.sgd(1.0), algo)
  state = tx.init(params)
  g = {"w": jnp.full_like(w, 0.5)}
  updates, state = tx.update(g, state, params)
  m = np.asarray(jaxprune.get_masks(state)["w"])
  want_mask = np.array([[True, True], [False, True], [False, False], [True, False]])
  np.testing.assert_array_equal(m, want_mask)
  want = -(0.5 + lam * np.where(want_mask, 0.0, np.asarray(w)))
  np.testing.assert_allclose(updates["w"], want, rtol=1e-6)
  # plain STE: no decay, the gradient as is
  tx = jaxprune.sparsify(optax.sgd(1.0), jaxprune.create("ste", sparsity_type="2:4"))
  updates, _ = tx.update(g, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], -0.5)


def test_ste_update_schedule_and_config():
  algo = jaxprune.create("ste", sparsity=0.5, update_every=10, end_step=20)
  assert [bool(algo.is_update_step(t)) for t in (0, 5, 10, 20, 30)] == [
    True,
    False,
    True,
    True,
    False,
  ]
  with pytest.raises(ValueError, match="'sparsity' is required"):
    jaxprune.create("ste")
  with pytest.raises(ValueError, match="decay"):
    jaxprune.create("sr_ste", sparsity_type="2:4", decay=-1.0)
  with pytest.raises(ValueError, match="'decay'"):
    jaxprune.create("ste", sparsity_type="2:4", decay=1e-4)
