"""RigL's reference rules (``reference=True``) against a hand-written reference.

The reference is the mask update of the RigL paper's code and of jaxpruner
(google-research/rigl ``SparseSETOptimizerBase._get_update_op``; jaxpruner
``SET._update_masks``), written here in numpy, independent of the library:
``n_prune = floor(d * n_active)``; keep the ``n_active - n_prune`` active entries
of largest ``|w|``; then grow the ``n_prune`` entries of largest ``|g|`` among
all entries not kept (a just-dropped one included). Both sort with a stable
``top_k``: among equal scores the lower flat index comes first.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune


def reference_rigl_update(mask, w, g, drop_fraction):
  """The reference mask update of one leaf (numpy; see the module doc)."""
  mask, w, g = (np.asarray(x).reshape(-1) for x in (mask, w, g))
  n_ones = int(mask.sum())
  n_prune = math.floor(float(drop_fraction) * n_ones)
  n_keep = n_ones - n_prune
  drop_score = np.where(mask, np.abs(w).astype(np.float64), -np.inf)
  order = np.argsort(-drop_score, kind="stable")  # descending, ties: lower index first
  kept = np.zeros(mask.size, bool)
  kept[order[:n_keep]] = True
  grow_score = np.where(kept, -np.inf, np.abs(g).astype(np.float64))
  order = np.argsort(-grow_score, kind="stable")
  grown = np.zeros(mask.size, bool)
  grown[order[:n_prune]] = True
  return kept | grown


def reference_is_update_step(step, start, end, every):
  """jaxpruner's PeriodicSchedule / rigl's is_mask_update_iter: start and end included."""
  return start <= step <= end and (step - start) % every == 0


def reference_drop_fraction(step, d, end):
  """jaxpruner: optax.cosine_decay_schedule(d, end) of the absolute step."""
  t = min(step, end) / end
  return d / 2 * (1 + math.cos(math.pi * t))


def _problem(seed, shape=(24, 16)):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=shape).astype(np.float32)
  w[rng.random(shape) < 0.1] = 0.5  # ties in |w|
  g = rng.normal(size=shape).astype(np.float32)
  g[rng.random(shape) < 0.1] = -1.0  # ties in |g|
  return w, g


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("step", [0, 50, 100])
def test_reference_parity_one_update(seed, step):
  w, g = _problem(seed)
  algo = jaxprune.create(
    "rigl",
    sparsity=0.8,
    update_every=50,
    end_step=100,
    drop_fraction=0.3,
    seed=seed,
    reference=True,
  )
  params = {"k": jnp.asarray(w)}
  masks, state = algo.init(params)
  m = np.asarray(masks["k"])
  w = w * m  # masked parameters, as the wrapper keeps them
  # The largest gradients on the weakest active weights: the reference regrows
  # some of them at once, the default rule could not.
  weakest = np.argsort(np.where(m, np.abs(w), np.inf).reshape(-1))[:5]
  g.reshape(-1)[weakest] = 100.0
  assert bool(algo.is_update_step(jnp.int32(step)))
  new, state = jax.jit(algo.update)(
    jnp.int32(step), {"k": jnp.asarray(w)}, {"k": jnp.asarray(g)}, masks, state
  )
  d = reference_drop_fraction(step, 0.3, 100)
  assert float(state.drop_fraction) == pytest.approx(d, abs=1e-6)
  expected = reference_rigl_update(m, w, g, np.float32(state.drop_fraction))
  got = np.asarray(new["k"]).reshape(-1)
  np.testing.assert_array_equal(got, expected)
  if d > 0:
    regrown = m.reshape(-1) & got & (np.abs(g.reshape(-1)) == 100.0)
    assert regrown.sum() > 0  # the reference rule did regrow just-dropped entries


def test_reference_schedule_includes_start_and_end():
  kw = dict(sparsity=0.8, update_every=10, start_step=20, end_step=60)
  ref = jaxprune.create("rigl", **kw, reference=True)
  default = jaxprune.create("rigl", **kw)
  for step in range(0, 80):
    assert bool(ref.is_update_step(jnp.int32(step))) == reference_is_update_step(step, 20, 60, 10)
    assert bool(default.is_update_step(jnp.int32(step))) == (
      20 <= step < 60 and step % 10 == 0 and step > 0
    )
  at_zero = jaxprune.create("rigl", sparsity=0.8, update_every=10, end_step=60, reference=True)
  assert bool(at_zero.is_update_step(jnp.int32(0)))


def test_reference_flags_follow_reference_and_can_be_set_alone():
  cfg = jaxprune.create("rigl", sparsity=0.5, end_step=10, reference=True).config
  assert cfg["regrow_dropped"] and cfg["skip_optimizer_step"] and cfg["update_at_ends"]
  cfg = jaxprune.create("rigl", sparsity=0.5, end_step=10, reference=True, update_at_ends=False)
  assert not cfg.config["update_at_ends"] and cfg.config["regrow_dropped"]
  cfg = jaxprune.create("set", sparsity=0.5, end_step=10, skip_optimizer_step=True).config
  assert cfg["skip_optimizer_step"] and not cfg["regrow_dropped"] and not cfg["update_at_ends"]
  with pytest.raises(TypeError, match="reference"):
    jaxprune.create("rigl", sparsity=0.5, end_step=10, reference="yes")
  with pytest.raises(ValueError, match="regrow_dropped"):
    jaxprune.create("rigl", sparsity_type="2:4", end_step=10, reference=True)
  with pytest.raises(ValueError, match="drop_schedule"):
    jaxprune.create("rigl", sparsity=0.5, end_step=10, drop_schedule="linear")


def test_cosine_from_start_decays_over_the_update_window():
  algo = jaxprune.create(
    "rigl", sparsity=0.5, start_step=100, end_step=300, drop_schedule="cosine_from_start"
  )
  masks, state = algo.init({"k": jnp.ones((4, 4))})
  for t, frac in [(100, 0.0), (200, 0.5), (299, 199 / 200)]:
    _, s = algo.update(jnp.int32(t), {"k": jnp.ones((4, 4))}, {"k": jnp.ones((4, 4))}, masks, state)
    assert float(s.drop_fraction) == pytest.approx(0.15 * (1 + math.cos(math.pi * frac)), abs=1e-6)


@pytest.mark.parametrize("inner", ["adam", "momentum"])
def test_reference_parity_skips_optimizer_step(inner):
  """On a mask-update step the reference changes the masks only: no optimizer step,
  optimizer state kept (jaxpruner ``skip_gradients``; rigl's mask update replaces
  ``apply_gradients``). The wrapper still zeroes what the new masks prune, in the
  parameters and in the state."""
  w, _ = _problem(7, (32, 12))
  params = {"k": jnp.asarray(w), "b": jnp.ones((12,))}
  opt = optax.adam(1e-2) if inner == "adam" else optax.sgd(1e-2, momentum=0.9)
  algo = jaxprune.create("rigl", sparsity=0.75, update_every=2, end_step=4, reference=True)
  tx = jaxprune.sparsify(opt, algo)
  state = tx.init(params)
  params = jaxprune.apply_masks(params, jaxprune.get_masks(state))
  rng = np.random.default_rng(3)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  def leaves_like_params(inner_state):
    return [x for x in jax.tree.leaves(inner_state) if jnp.shape(x) == jnp.shape(params["k"])]

  for t in range(5):  # steps 0, 2, 4 update the masks (start and end included)
    grads = {
      "k": jnp.asarray(rng.normal(size=(32, 12)).astype(np.float32)),
      "b": jnp.asarray(rng.normal(size=(12,)).astype(np.float32)),
    }
    old_m = np.asarray(jaxprune.get_masks(state)["k"])
    old_p = jax.tree.map(np.asarray, params)
    old_inner = [np.asarray(x) for x in leaves_like_params(state.inner_state)]
    params, state = step(params, state, grads)
    new_m = np.asarray(jaxprune.get_masks(state)["k"])
    new_inner = [np.asarray(x) for x in leaves_like_params(state.inner_state)]
    assert new_m.sum() == old_m.sum()
    if t % 2 == 0:
      d = np.float32(reference_drop_fraction(t, 0.3, 4))
      expected = reference_rigl_update(old_m, old_p["k"], grads["k"], d).reshape(new_m.shape)
      np.testing.assert_array_equal(new_m, expected)
      # no optimizer step: the kept entries and the unpruned bias do not move ...
      np.testing.assert_array_equal(np.asarray(params["k"]), np.where(new_m, old_p["k"], 0.0))
      np.testing.assert_array_equal(np.asarray(params["b"]), old_p["b"])
      # ... and the state is the old one, zero where the new masks prune.
      for old, new in zip(old_inner, new_inner):
        np.testing.assert_array_equal(new, np.where(new_m, old, 0.0))
    else:
      np.testing.assert_array_equal(new_m, old_m)
      assert not np.array_equal(np.asarray(params["b"]), old_p["b"])  # a real step
    assert np.all(np.asarray(params["k"])[~new_m] == 0.0)
    for new in new_inner:
      assert np.all(new[~new_m] == 0.0)


def test_default_takes_the_optimizer_step_on_update_steps():
  params = {"k": jnp.asarray(_problem(0, (16, 8))[0]), "b": jnp.ones((8,))}
  algo = jaxprune.create("rigl", sparsity=0.75, update_every=1, end_step=4)
  tx = jaxprune.sparsify(optax.sgd(0.1), algo)
  state = tx.init(params)
  params = jaxprune.apply_masks(params, jaxprune.get_masks(state))
  state = state._replace(count=jnp.int32(1))  # an update step
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, state, params)
  np.testing.assert_allclose(np.asarray(updates["b"]), -0.1)
