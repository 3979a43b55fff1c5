"""SET/RigL grow_init (regrown values, optimizer state restarts at zero) and drop_schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_zeros_where_masked, tiny_problem

import jaxprune


def _one_update(name, grow_init, opt=None):
  """Trains to the first mask update (step 5) and returns what changed there."""
  params, loss_fn = tiny_problem(d=32)
  algo = jaxprune.create(
    name, sparsity=0.8, update_every=5, end_step=100, drop_fraction=0.5, grow_init=grow_init
  )
  tx = jaxprune.sparsify(opt or optax.adam(1e-2), algo)
  state = tx.init(params)
  params = jaxprune.apply_masks(params, jaxprune.get_masks(state))
  step = jax.jit(lambda p, s: tx.update(jax.grad(loss_fn)(p), s, p))
  for _ in range(5):
    u, state = step(params, state)
    params = optax.apply_updates(params, u)
  before, old = params, jaxprune.get_masks(state)
  u, state = step(params, state)
  after, new = optax.apply_updates(params, u), jaxprune.get_masks(state)
  return algo, before, after, old, new, state


def _leaf(tree):
  return np.asarray(tree["params"]["Dense_0"]["kernel"])


@pytest.mark.parametrize("name", [pytest.param("set", marks=pytest.mark.slow), "rigl"])
def test_float_grow_init_values_and_zero_optimizer_state(name):
  algo, before, after, old, new, state = _one_update(name, 0.5)
  grown = _leaf(new) & ~_leaf(old)
  assert grown.sum() > 20
  want = algo.grow_values(jnp.int32(5), before, old)
  np.testing.assert_array_equal(_leaf(after)[grown], _leaf(want)[grown])  # exactly the draws
  assert 0.35 < np.std(_leaf(after)[grown]) < 0.65
  assert_zeros_where_masked(after, new)
  mu = jaxprune.get_sparse_state(state).inner_state[0].mu
  nu = jaxprune.get_sparse_state(state).inner_state[0].nu
  assert np.all(_leaf(mu)[grown] == 0.0) and np.all(_leaf(nu)[grown] == 0.0)


@pytest.mark.slow
def test_random_grow_init_uses_std_of_active_weights():
  algo, before, after, old, new, _ = _one_update("set", "random", optax.sgd(1e-2))
  grown = _leaf(new) & ~_leaf(old)
  active = _leaf(before)[_leaf(old)]
  ratio = np.std(_leaf(after)[grown]) / np.std(active)
  assert grown.sum() > 20 and 0.7 < ratio < 1.3
  assert np.all(_leaf(after)[grown] != 0.0)


@pytest.mark.slow
def test_zeros_grow_init_is_the_default():
  algo, before, after, old, new, _ = _one_update("rigl", None)
  grown = _leaf(new) & ~_leaf(old)
  assert algo.grow_values is None and grown.sum() > 0
  assert np.all(_leaf(after)[grown] == 0.0)


def test_drop_schedule_constant_and_cosine():
  common = dict(sparsity=0.8, update_every=10, end_step=100, drop_fraction=0.3)
  params, _ = tiny_problem()
  for schedule, check in [
    ("constant", lambda d: np.allclose(d, 0.3)),
    ("cosine", lambda d: d[0] > d[-1] and np.allclose(d[0], 0.15 * (1 + np.cos(np.pi * 0.1)))),
  ]:
    algo = jaxprune.create("set", drop_schedule=schedule, **common)
    masks, st = algo.init(params)
    ds = []
    for step in (10, 50, 90):
      masks, st = algo.update(jnp.int32(step), params, params, masks, st)
      ds.append(float(st.drop_fraction))
    assert check(np.array(ds)), (schedule, ds)


def test_bad_keys_named():
  with pytest.raises(ValueError, match="grow_init"):
    jaxprune.create("set", sparsity=0.5, end_step=10, grow_init="ones")
  with pytest.raises(ValueError, match="grow_init"):
    jaxprune.create("rigl", sparsity=0.5, end_step=10, grow_init=-1.0)
  with pytest.raises(ValueError, match="drop_schedule"):
    jaxprune.create("rigl", sparsity=0.5, end_step=10, drop_schedule="linear")
