import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_zeros_where_masked, tiny_problem, train

import jaxprune

OPTIMIZERS = {
  "sgd": lambda: optax.sgd(0.1),
  "sgd_momentum": lambda: optax.sgd(0.1, momentum=0.9),
  "adam": lambda: optax.adam(1e-2),
  "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
  "lion": lambda: optax.lion(1e-3),
  "chain_clip_adam": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)),
  "inject_hyperparams": lambda: optax.inject_hyperparams(optax.adam)(learning_rate=1e-2),
  "multi_steps": lambda: optax.MultiSteps(optax.adam(1e-2), every_k_schedule=3),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_zeros_contract_every_step_for_each_optimizer(name):
  params, loss_fn = tiny_problem()
  algo = jaxprune.create(
    "gradual_magnitude", sparsity=0.8, start_step=0, end_step=12, update_every=4
  )
  tx = jaxprune.sparsify(OPTIMIZERS[name](), algo)
  initial = params
  checked = []

  def check(i, p, s):
    masks = jaxprune.get_masks(s)
    assert jax.tree.structure(masks) == jax.tree.structure(p)
    assert_zeros_where_masked(p, masks)
    checked.append(i)

  params, state, losses = train(tx, params, loss_fn, 24, callback=check)
  assert len(checked) == 24
  s = jaxprune.summary(params, jaxprune.get_masks(state)).as_dict()
  assert s["params/Dense_0/kernel"] == pytest.approx(0.8, abs=1 / 384)
  # unpruned leaves (biases) still train
  b0, b1 = initial["params"]["Dense_0"]["bias"], params["params"]["Dense_0"]["bias"]
  assert not np.allclose(np.asarray(b0), np.asarray(b1))
  assert np.isfinite(losses[-1])


def test_nested_sparse_state_is_found():
  params, loss_fn = tiny_problem()
  tx = optax.chain(
    optax.clip(1.0), jaxprune.sparsify(optax.sgd(0.1), jaxprune.create("magnitude", sparsity=0.5))
  )
  outer = optax.MultiSteps(tx, every_k_schedule=2)
  state = outer.init(params)
  masks = jaxprune.get_masks(state)
  assert jax.tree.structure(masks) == jax.tree.structure(params)
  with pytest.raises(ValueError, match="SparseState"):
    jaxprune.get_masks(optax.adam(1e-3).init(params))


def test_inner_state_is_zero_at_pruned_entries():
  params, loss_fn = tiny_problem()
  algo = jaxprune.create("magnitude", sparsity=0.7, start_step=3)
  tx = jaxprune.sparsify(optax.adam(1e-2), algo)
  params, state, _ = train(tx, params, loss_fn, 8)
  masks = jaxprune.get_masks(state)
  mu = state.inner_state[0].mu
  for leaf, m in zip(jax.tree.leaves(mu), jax.tree.leaves(masks)):
    m = np.broadcast_to(np.asarray(m), leaf.shape)
    assert np.all(np.asarray(leaf)[~m] == 0.0)
    if m.ndim == 2:
      assert np.any(np.asarray(leaf)[m] != 0.0)


def test_pruning_without_initial_apply_still_zeroes_after_first_step():
  params, loss_fn = tiny_problem()
  tx = jaxprune.sparsify(optax.adam(1e-2), jaxprune.create("static", sparsity=0.9))
  params, state, _ = train(tx, params, loss_fn, 1, apply_initial_masks=False)
  assert_zeros_where_masked(params, jaxprune.get_masks(state))


def test_update_requires_params():
  params, _ = tiny_problem()
  tx = jaxprune.sparsify(optax.sgd(0.1), jaxprune.create("magnitude", sparsity=0.5))
  state = tx.init(params)
  with pytest.raises(ValueError, match="params"):
    tx.update(params, state)


def test_mask_update_does_not_retrace():
  params, loss_fn = tiny_problem()
  algo = jaxprune.create("gradual_magnitude", sparsity=0.9, end_step=10, update_every=2)
  tx = jaxprune.sparsify(optax.adam(1e-2), algo)
  traces = []

  @jax.jit
  def step(p, s):
    traces.append(1)
    g = jax.grad(loss_fn)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  state = tx.init(params)
  for _ in range(12):
    params, state = step(params, state)
  assert len(traces) == 1
  assert jaxprune.summary(params, jaxprune.get_masks(state)).as_dict()[
    "params/Dense_1/kernel"
  ] == pytest.approx(0.9, abs=1e-2)


@pytest.mark.parametrize(
  "name", ["dense", "magnitude", "gradual_magnitude", "global_magnitude", "random", "static"]
)
def test_every_algorithm_trains_and_reduces_loss(name):
  params, loss_fn = tiny_problem()
  algo = jaxprune.create(name, sparsity=0.5, end_step=20, update_every=5, distribution="uniform")
  params, state, losses = train(jaxprune.sparsify(optax.adam(1e-2), algo), params, loss_fn, 60)
  assert losses[-1] < losses[0]
  assert_zeros_where_masked(params, jaxprune.get_masks(state))
  total = jaxprune.summary(params, jaxprune.get_masks(state))
  kernels = [r for r in total.rows if r.path.endswith("kernel")]
  kept = sum(r.nonzeros for r in kernels)
  size = sum(r.size for r in kernels)
  if name == "dense":
    assert kept == size
  elif name == "global_magnitude":
    assert kept == size - size // 2  # one threshold over all kernels
  else:
    assert all(r.nonzeros == r.size - r.size // 2 for r in kernels)


def test_multisteps_wrapping_sparsify_keeps_zeros():
  params, loss_fn = tiny_problem()
  algo = jaxprune.create("gradual_magnitude", sparsity=0.7, end_step=6, update_every=2)
  tx = optax.MultiSteps(jaxprune.sparsify(optax.adam(1e-2), algo), every_k_schedule=3)
  checked = []

  def check(i, p, s):
    assert_zeros_where_masked(p, jaxprune.get_masks(s))
    checked.append(i)

  params, state, losses = train(tx, params, loss_fn, 24, callback=check)
  assert len(checked) == 24 and losses[-1] < losses[0]
  assert int(jaxprune.get_sparse_state(state).count) == 8  # the inner step runs every 3rd call


def test_mixed_precision_updates_still_give_exact_zeros():
  params = {"w": jax.random.normal(jax.random.PRNGKey(0), (16, 16))}  # float32
  tx = jaxprune.sparsify(optax.sgd(0.1), jaxprune.create("magnitude", sparsity=0.5))
  state = tx.init(params)
  grads = {"w": jnp.ones((16, 16), jnp.bfloat16)}
  updates, state = jax.jit(tx.update)(grads, state, params)
  new = optax.apply_updates(params, updates)
  m = np.asarray(jaxprune.get_masks(state)["w"])
  assert (np.asarray(new["w"])[~m] == 0.0).all() and (~m).sum() == 128


def test_traced_sparsity_in_magnitude_masks():
  params = {"w": jnp.arange(1.0, 11.0)}
  masks = jax.jit(jaxprune.magnitude_masks)(params, {"w": 0.5})
  assert np.asarray(masks["w"]).tolist() == [False] * 5 + [True] * 5


def test_scalar_masks_are_applied_by_apply_masks():
  assert float(jaxprune.apply_masks({"w": jnp.float32(3.0)}, {"w": jnp.array(False)})["w"]) == 0.0


def test_scalar_leaf_cannot_be_selected_and_steps_are_bounded():
  algo = jaxprune.create("global_magnitude", sparsity=0.5, include=".*")
  with pytest.raises(ValueError, match="scalar 's'"):
    algo.init({"s": jnp.float32(0.001), "w": jnp.ones((4, 4))})
  with pytest.raises(ValueError, match="end_step"):
    jaxprune.create("rigl", sparsity=0.5, end_step=10**10)


def _per_param_state(state, params):
  """Every sub-tree of the inner state shaped like ``params`` (momentum, Adam moments, ...)."""
  pdef = jax.tree.structure(params)
  matches = lambda x: jax.tree.structure(x) == pdef
  inner = jaxprune.get_sparse_state(state).inner_state
  return [x for x in jax.tree.leaves(inner, is_leaf=matches) if matches(x)]


@pytest.mark.parametrize("name", ["static", "gradual_magnitude", "rigl"])
def test_inner_state_is_zero_where_masked_for_every_algorithm_from_the_first_step(name):
  # Params not masked beforehand and weight decay: the momentum at pruned entries would
  # pick up weight decay of the unmasked params unless the state is reset on every step.
  params, loss_fn = tiny_problem()
  algo = jaxprune.create(name, sparsity=0.8, start_step=0, end_step=4, update_every=2)
  inner = optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(0.1, momentum=0.9))
  tx = jaxprune.sparsify(inner, algo)
  checked = []

  def check(i, p, s):
    masks = jaxprune.get_masks(s)
    assert_zeros_where_masked(p, masks)
    (trace,) = _per_param_state(s, p)
    for t, m in zip(jax.tree.leaves(trace), jax.tree.leaves(masks)):
      m = np.broadcast_to(np.asarray(m), t.shape)
      assert np.all(np.asarray(t)[~m] == 0.0), (i, int(np.sum(np.asarray(t)[~m] != 0)))
      if m.ndim == 2 and not m.all():
        assert np.any(np.asarray(t)[m] != 0.0)
    checked.append(i)

  assert all(
    np.all(np.asarray(t)[~np.broadcast_to(np.asarray(m), t.shape)] == 0.0)
    for t, m in zip(
      jax.tree.leaves(_per_param_state(tx.init(params), params)),
      jax.tree.leaves(jaxprune.get_masks(tx.init(params))),
    )
  )
  train(tx, params, loss_fn, 6, apply_initial_masks=False, callback=check)
  assert checked == list(range(6))


def test_regrown_entries_start_at_zero_with_zero_adam_state():
  params, loss_fn = tiny_problem()
  algo = jaxprune.create("rigl", sparsity=0.8, end_step=100, update_every=3, drop_fraction=0.5)
  tx = jaxprune.sparsify(optax.adamw(1e-2, weight_decay=0.1), algo)
  previous = {}
  grew = []  # (step, leaf index) of every leaf that grew entries

  def check(i, p, s):
    masks = jaxprune.get_masks(s)
    assert_zeros_where_masked(p, masks)
    if "masks" in previous:
      moments = [jax.tree.leaves(m) for m in _per_param_state(s, p)]
      assert len(moments) == 2  # Adam's mu and nu
      leaves = zip(
        jax.tree.leaves(previous["masks"]), jax.tree.leaves(masks), jax.tree.leaves(p), *moments
      )
      for k, (old, new, w, *state) in enumerate(leaves):
        w, state = np.asarray(w), [np.asarray(x) for x in state]
        old, new = (np.broadcast_to(np.asarray(m), w.shape) for m in (old, new))
        grown = new & ~old
        if grown.any():
          grew.append((i, k))
        assert np.all(w[grown] == 0.0), (i, k)
        assert all(np.all(x[grown] == 0.0) for x in state), (i, k)
    previous["masks"] = masks

  train(tx, params, loss_fn, 9, callback=check)
  # The masks change on the steps that see counts 3 and 6, and every kernel grows there.
  kernels = [k for k, m in enumerate(jax.tree.leaves(previous["masks"])) if np.ndim(m) == 2]
  assert len(kernels) == 3
  assert grew == [(i, k) for i in (3, 6) for k in kernels]
