"""Structured sparsity through jaxprune.create / sparsify (the algorithm side)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_zeros_where_masked, tiny_problem, train
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxprune
from jaxprune.structured import group_counts, replace_connections, structured_mask

# Registered algorithms of the 'dst' family (Algorithm.family).
DST_FAMILY = [
  n
  for n in sorted(jaxprune.REGISTRY)
  if jaxprune.create(n, sparsity=0.5, end_step=10).family == "dst"
]


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


@pytest.mark.parametrize("name", DST_FAMILY)
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


@pytest.mark.parametrize(
  "stype, shape", [("neuron", (2, 100)), ("block:1x4", (100, 4)), ("block:2x2", (20, 10))]
)
def test_gradual_structured_final_step_keeps_the_eager_count(stype, shape):
  # 0.29 of 100 groups: the float64 rule prunes floor(28.999999999999996) = 28; a float32
  # product of the traced target rounds to 29.0.
  params = {"w": jax.random.normal(jax.random.PRNGKey(0), shape)}
  algo = jaxprune.create(
    "gradual_magnitude", sparsity=0.29, sparsity_type=stype, end_step=4, update_every=2
  )
  tx = jaxprune.sparsify(optax.sgd(0.0), algo)
  step = jax.jit(lambda p, s: tx.update(jax.tree.map(jnp.zeros_like, p), s, p)[1])
  state = tx.init(params)
  for _ in range(6):
    state = step(params, state)
  m = np.asarray(jaxprune.get_masks(state)["w"])
  kept_groups = m.sum() // (m.size // 100)  # 100 units or tiles of m.size // 100 entries
  assert kept_groups == 100 - math.floor(0.29 * 100) == 72
  one_shot = jaxprune.create("magnitude", sparsity=0.29, sparsity_type=stype)
  eager = jaxprune.sparsify(optax.sgd(0.0), one_shot)
  s = eager.init(params)
  _, s = eager.update(jax.tree.map(jnp.zeros_like, params), s, params)
  assert np.asarray(jaxprune.get_masks(s)["w"]).sum() == m.sum()


_REPLACE_CASES = {"2:4": [(8, 6), (3, 8, 2)], "block:2x2": [(6, 8), (4, 10)], "neuron": [(5, 8)]}
_replace_jit = {
  k: jax.jit(lambda m, w, g, d, k=k: replace_connections(m, w, g, d, k)) for k in _REPLACE_CASES
}


def _groups(x, stype):
  """Entries grouped as the pattern replaces them: rows of a (groups, entries) array."""
  x = np.asarray(x)
  if stype == "neuron":
    return x.reshape(-1, x.shape[-1]).T
  if stype.startswith("block"):
    rows, cols = x.reshape(-1, x.shape[-1]).shape
    return x.reshape(rows // 2, 2, cols // 2, 2).transpose(0, 2, 1, 3).reshape(-1, 4)
  return np.moveaxis(x, -2, -1).reshape(-1)[:, None]  # N:M: entry by entry


@settings(max_examples=12)
@given(
  stype=st.sampled_from(sorted(_REPLACE_CASES)),
  case=st.integers(0, 1),
  seed=st.integers(0, 2**16),
  bad_rate=st.sampled_from([0.05, 0.2, 0.6]),
)
def test_structured_replace_non_finite_never_wins(stype, case, seed, bad_rate):
  shape = _REPLACE_CASES[stype][case % len(_REPLACE_CASES[stype])]
  rng = np.random.default_rng(seed)
  mask = np.asarray(structured_mask(jnp.asarray(rng.random(shape)), 0.5, stype))
  w = rng.normal(size=shape).astype(np.float32)
  w[rng.random(shape) < bad_rate / 2] = np.nan
  g = rng.normal(size=shape).astype(np.float32)
  bad = rng.random(shape) < bad_rate
  g[bad] = rng.choice(np.float32([np.nan, np.inf, -np.inf]), size=int(bad.sum()))
  new, _ = _replace_jit[stype](jnp.asarray(mask), jnp.asarray(w), jnp.asarray(g), 0.5)
  new = np.asarray(new)
  assert new.sum() == mask.sum()  # the active count is constant
  active, after = _groups(mask, stype).any(-1), _groups(new, stype).any(-1)
  if stype == "2:4":  # groups of 4 along axis -2 keep exactly 2
    assert np.all(group_counts(new, 4, axis=-2) == 2)
    active, after = _groups(mask, stype)[:, 0], _groups(new, stype)[:, 0]
  g_bad = ~np.isfinite(_groups(g, stype)).all(-1)
  w_nan = np.isnan(_groups(w, stype)).any(-1)
  grown, not_grown = after & ~active, ~after & ~active
  if stype == "2:4":  # growth competes within each group of 4
    gid = np.arange(active.size) // 4
    for i in np.unique(gid[grown & g_bad]):
      assert not np.any(not_grown & ~g_bad & (gid == i)), "a non-finite score won growth"
  else:
    if np.any(grown & g_bad):
      assert not np.any(not_grown & ~g_bad), "a non-finite growth score won"
    dropped, kept = active & ~after, active & after
    if np.any(kept & w_nan):
      assert not np.any(dropped & ~w_nan), "a NaN weight was kept over a finite one"


def _units(norms_per_unit, rows=3):
  """A kernel of ``rows`` rows whose unit ``j`` has L2 norm ``norms_per_unit[j]``."""
  norms = np.asarray(norms_per_unit, np.float32)
  return jnp.asarray(np.broadcast_to(norms / math.sqrt(rows), (rows, norms.size)).copy())


def _kept_units(mask):
  m = np.asarray(mask)
  u = m.reshape(-1, m.shape[-1])
  assert np.all(u == u[:1]), "a unit is partly kept"
  return np.flatnonzero(u[0]).tolist()


@pytest.mark.parametrize("name", ["global_magnitude", "global_saliency"])
def test_global_channels_keep_the_top_units_of_all_layers_and_one_per_layer(name):
  # Units of a rank below every unit of b: one global threshold would empty a, so a
  # keeps its best unit and b its 4 best (5 of the 10 units in all).
  params = {
    "a": {"kernel": _units([1, 4, 2, 3])},
    "b": {"kernel": _units([10, 60, 30, 50, 20, 40])},
  }
  algo = jaxprune.create(name, sparsity=0.5, sparsity_type="channel", include=".*kernel")
  grads = jax.tree.map(jnp.ones_like, params)  # saliency |w g| ranks as |w|
  masks, state = algo.init(params)
  masks, _ = jax.jit(algo.update)(0, params, grads, masks, state)
  assert _kept_units(masks["a"]["kernel"]) == [1]
  assert _kept_units(masks["b"]["kernel"]) == [1, 2, 3, 5]  # 60, 30, 50, 40


@pytest.mark.parametrize("name", ["global_magnitude", "global_saliency"])
def test_global_channels_keep_one_unit_per_layer_when_others_have_infinite_norms(name):
  # Three units of a hold an inf weight (norm +inf), more than the 2 units kept in all:
  # b's best unit must still outrank them (the guarantee ranks above every real norm).
  params = {
    "a": {"kernel": _units([1, 2, 3, 4]).at[0, :3].set(jnp.inf)},
    "b": {"kernel": _units([10, 30, 20, 5])},
  }
  algo = jaxprune.create(name, sparsity=0.75, sparsity_type="channel", include=".*kernel")
  grads = jax.tree.map(jnp.ones_like, params)
  masks, state = algo.init(params)
  masks, _ = jax.jit(algo.update)(0, params, grads, masks, state)
  assert _kept_units(masks["a"]["kernel"]) == [0]  # the first of the tied +inf units
  assert _kept_units(masks["b"]["kernel"]) == [1]  # its best, 30


def test_global_channels_follow_the_cubic_schedule_of_the_total_and_only_shrink():
  rng = np.random.default_rng(0)
  params = {
    "c1": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 1, 8)), jnp.float32)},
    "c2": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 8, 16)), jnp.float32)},
  }
  algo = jaxprune.create(
    "global_magnitude", sparsity=0.75, sparsity_type="channel", include=".*kernel",
    start_step=0, end_step=10, update_every=5,
  )  # fmt: skip
  masks, state = algo.init(params)
  update = jax.jit(algo.update)
  totals, before = [], None
  for step in (0, 5, 10):
    masks, state = update(step, params, params, masks, state)
    units = [set(_kept_units(masks[k]["kernel"])) for k in ("c1", "c2")]
    if before is not None:
      assert all(u <= b for u, b in zip(units, before)), "a removed unit came back"
    totals.append(sum(map(len, units)))
    assert min(map(len, units)) >= 1
    before = units
  # 24 units: none removed at the start, 24 - floor(0.75 * 24 * (1 - 0.5^3)) midway, 6 at the end.
  assert totals == [24, 24 - math.floor(18 * (1 - 0.5**3)), 6]


def test_global_channels_refuse_a_target_below_one_unit_per_layer():
  params = {"a": {"kernel": _units([1, 2])}, "b": {"kernel": _units([3, 4])}}
  algo = jaxprune.create("global_magnitude", sparsity=0.8, sparsity_type="neuron", include=".*")
  masks, state = algo.init(params)
  with pytest.raises(ValueError, match="keeps 1 of the 4 units of 2 pruned leaves"):
    algo.update(0, params, params, masks, state)


@pytest.mark.parametrize("stype", ["2:4", "block:2x2"])
def test_global_magnitude_names_the_unsupported_sparsity_type(stype):
  with pytest.raises(ValueError, match=f"global_magnitude: sparsity_type must be .*{stype}"):
    jaxprune.create("global_magnitude", sparsity=0.5, sparsity_type=stype)
