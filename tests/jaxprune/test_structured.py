"""Tests for N:M, block and neuron/channel masks (jaxprune.structured)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxprune
from jaxprune import structured as S

SETTINGS = settings(max_examples=12, deadline=None, derandomize=True)


def _scores(rng, shape, ties):
  """Random scores; with ``ties`` drawn from a handful of values so ties are common."""
  if ties:
    return rng.integers(0, 3, size=shape).astype(np.float32)
  return rng.random(shape, dtype=np.float32)


def _ref_topk(flat_scores, k):
  """Reference: stable order by descending score, lower index first on ties."""
  order = sorted(range(len(flat_scores)), key=lambda i: (-flat_scores[i], i))
  keep = np.zeros(len(flat_scores), bool)
  keep[order[:k]] = True
  return keep


# ---------------------------------------------------------------------------
# parse / validate


@pytest.mark.parametrize(
  "s, expect",
  [
    ("2:4", S.SparsityType("nm", 2, 4, (), "2:4")),
    (" 1:4 ", S.SparsityType("nm", 1, 4, (), "1:4")),
    ("4:8", S.SparsityType("nm", 4, 8, (), "4:8")),
    ("block:4x2", S.SparsityType("block", 0, 0, (4, 2), "block:4x2")),
    ("Neuron", S.SparsityType("unit", name="neuron")),
    ("channel", S.SparsityType("unit", name="channel")),
    ("unstructured", S.SparsityType("unstructured")),
  ],
)
def test_parse_valid(s, expect):
  assert S.parse_sparsity_type(s) == expect


@pytest.mark.parametrize(
  "bad",
  [
    "3:2",
    "0:4",
    "2:0",
    "2:4:8",
    "",
    "2-4",
    "block:0x4",
    "block:4",
    "neurons",
    "2:4 block",
    ":4",
    "a:b",
  ],
)
def test_parse_invalid_strings(bad):
  with pytest.raises(ValueError, match="sparsity_type") as e:
    S.parse_sparsity_type(bad)
  assert repr(bad) in str(e.value)


@pytest.mark.parametrize("bad", [None, 2, 0.5, (2, 4), b"2:4", True])
def test_parse_non_string(bad):
  with pytest.raises(TypeError, match="sparsity_type"):
    S.parse_sparsity_type(bad)
  with pytest.raises(ValueError, match="sparsity_type"):
    S.parse_sparsity_type(bad)


def test_nm_sparsity():
  assert S.nm_sparsity("2:4") == 0.5
  assert S.nm_sparsity("1:4") == 0.75
  assert S.nm_sparsity("4:8") == 0.5
  with pytest.raises(ValueError, match="N:M"):
    S.nm_sparsity("neuron")


def test_incompatibility():
  assert S.incompatibility((8, 3), "2:4") is None
  assert S.incompatibility((3, 3, 16, 5), "2:4") is None
  assert "divisible by M=4" in S.incompatibility((10, 3), "2:4")
  assert "divisible by M=4" in S.incompatibility((3, 3, 6, 8), "2:4")  # input channels
  assert S.incompatibility((3, 8), "2:4", axis=-1) is None
  assert "out of range" in S.incompatibility((8, 4), "2:4", axis=3)
  assert S.incompatibility((8, 4), "block:4x4") is None
  assert "not divisible by C=4" in S.incompatibility((8, 6), "block:4x4")
  assert "not divisible by R=4" in S.incompatibility((3, 3, 3, 8), "block:4x4")  # 27 rows
  assert S.incompatibility((3, 3, 4, 8), "block:4x4") is None  # 36 rows
  assert "ndim >= 2" in S.incompatibility((8,), "neuron")
  assert S.incompatibility((3, 3, 2, 5), "channel") is None
  assert S.incompatibility((7,), "unstructured") is None
  with pytest.raises(ValueError, match="sparsity_type"):
    S.incompatibility((8, 4), "3:2")
  with pytest.raises(ValueError, match="cannot apply"):
    S.structured_mask(jnp.ones((10, 3)), None, "2:4")


# ---------------------------------------------------------------------------
# N:M


@SETTINGS
@given(
  nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (2, 8), (5, 16), (8, 32), (4, 4)]),
  groups=st.integers(1, 4),
  other=st.integers(1, 5),
  conv=st.booleans(),
  ties=st.booleans(),
  seed=st.integers(0, 2**16),
)
def test_nm_exact_counts_and_reference(nm, groups, other, conv, ties, seed):
  n, m = nm
  rng = np.random.default_rng(seed)
  shape = (2, 3, groups * m, other) if conv else (groups * m, other)
  scores = _scores(rng, shape, ties)
  mask = np.asarray(S.structured_mask(jnp.asarray(scores), None, f"{n}:{m}"))
  assert mask.shape == shape and mask.dtype == bool
  # Exactly n per group of m along the input axis (axis 0 for Dense, -2 for Conv).
  counts = S.group_counts(mask, m, axis=-2)
  assert np.all(counts == n)
  assert S.is_nm_sparse(mask, n, m, axis=-2)
  assert mask.sum() == scores.size * n // m
  # Same selection as a reference top-n per group with lower-index tie-break.
  x = np.moveaxis(scores, -2, -1)
  mk = np.moveaxis(mask, -2, -1)
  for idx in np.ndindex(x.shape[:-1]):
    for g in range(groups):
      seg = x[idx][g * m : (g + 1) * m]
      np.testing.assert_array_equal(mk[idx][g * m : (g + 1) * m], _ref_topk(list(seg), n))


def test_nm_axis_choice():
  scores = jnp.asarray(np.random.default_rng(0).random((6, 8), np.float32))
  m0 = np.asarray(S.structured_mask(scores, None, "2:4", axis=-1))
  assert np.all(S.group_counts(m0, 4, axis=-1) == 2)
  assert S.is_nm_sparse(m0, 2, 4, axis=-1) and m0.sum() == 24
  m1 = np.asarray(S.nm_mask_from_scores(scores, 1, 2, axis=0))
  assert np.all(S.group_counts(m1, 2, axis=0) == 1)
  with pytest.raises(ValueError, match="divisible"):
    S.nm_mask_from_scores(scores, 2, 4, axis=0)


def test_nm_tie_break_and_nan():
  ones = jnp.ones((8, 2))
  mask = np.asarray(S.structured_mask(ones, None, "2:4"))
  np.testing.assert_array_equal(mask[:, 0], [1, 1, 0, 0, 1, 1, 0, 0])
  x = jnp.asarray([[jnp.nan], [0.0], [-0.0], [1.0]])
  # NaN ranks lowest; +0.0 and -0.0 tie, so the lower index wins.
  np.testing.assert_array_equal(np.asarray(S.structured_mask(x, None, "2:4"))[:, 0], [0, 1, 0, 1])
  # Large groups (sort path) follow the same rule.
  big = np.asarray(S.nm_mask_from_scores(jnp.zeros((64, 1)), 8, 32, axis=0))[:, 0]
  np.testing.assert_array_equal(np.flatnonzero(big), list(range(8)) + list(range(32, 40)))


def test_nm_jit_and_sparsity_ignored():
  x = jnp.asarray(np.random.default_rng(1).random((16, 4), np.float32))
  f = jax.jit(lambda s, sp: S.structured_mask(s, sp, "2:4"))
  np.testing.assert_array_equal(f(x, 0.9), S.structured_mask(x, 0.1, "2:4"))


# ---------------------------------------------------------------------------
# blocks


@SETTINGS
@given(
  r=st.sampled_from([1, 2, 4]),
  c=st.sampled_from([1, 2, 3]),
  gr=st.integers(1, 5),
  gc=st.integers(1, 4),
  sparsity=st.floats(0.0, 0.99),
  ties=st.booleans(),
  seed=st.integers(0, 2**16),
)
def test_block_exact(r, c, gr, gc, sparsity, ties, seed):
  rng = np.random.default_rng(seed)
  shape = (gr * r, gc * c)
  scores = _scores(rng, shape, ties)
  mask = np.asarray(S.structured_mask(jnp.asarray(scores), sparsity, f"block:{r}x{c}"))
  tiles = mask.reshape(gr, r, gc, c)
  # Each tile all-in or all-out.
  assert np.all(tiles.all(axis=(1, 3)) == tiles.any(axis=(1, 3)))
  kept = tiles.any(axis=(1, 3))
  g = gr * gc
  assert kept.sum() == g - math.floor(sparsity * g)
  tile_scores = scores.reshape(gr, r, gc, c).sum(axis=(1, 3)).reshape(-1)
  np.testing.assert_array_equal(kept.reshape(-1), _ref_topk(list(tile_scores), kept.sum()))


def test_block_conv_matrix_view():
  scores = jnp.asarray(np.random.default_rng(2).random((3, 3, 4, 8), np.float32))
  mask = np.asarray(S.structured_mask(scores, 0.5, "block:4x4"))
  tiles = mask.reshape(9, 4, 2, 4)
  assert np.all(tiles.all(axis=(1, 3)) == tiles.any(axis=(1, 3)))
  assert tiles.any(axis=(1, 3)).sum() == 18 - 9


def test_block_ties_lower_index():
  mask = np.asarray(S.structured_mask(jnp.ones((4, 4)), 0.5, "block:2x2"))
  np.testing.assert_array_equal(mask, [[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]])


# ---------------------------------------------------------------------------
# neurons / channels


@SETTINGS
@given(
  units=st.integers(1, 12),
  rows=st.integers(1, 6),
  conv=st.booleans(),
  sparsity=st.floats(0.0, 0.99),
  ties=st.booleans(),
  seed=st.integers(0, 2**16),
)
def test_unit_exact(units, rows, conv, sparsity, ties, seed):
  rng = np.random.default_rng(seed)
  shape = (2, 2, rows, units) if conv else (rows, units)
  scores = _scores(rng, shape, ties)
  kind = "channel" if conv else "neuron"
  mask = np.asarray(S.structured_mask(jnp.asarray(scores), sparsity, kind))
  cols = mask.reshape(-1, units)
  assert np.all(cols.all(0) == cols.any(0))  # whole units
  kept = cols.any(0)
  assert kept.sum() == units - math.floor(sparsity * units)
  norms = np.sqrt((scores.reshape(-1, units).astype(np.float64) ** 2).sum(0))
  norms32 = np.asarray(S.unit_norms(jnp.asarray(scores)))
  np.testing.assert_allclose(norms32, norms, rtol=1e-6)
  np.testing.assert_array_equal(kept, _ref_topk(list(norms32), kept.sum()))


def test_unit_l2_not_l1():
  # Unit 0 has the larger L1 norm, unit 1 the larger L2 norm.
  w = jnp.asarray([[1.0, 2.5], [1.0, 0.0], [1.0, 0.0]])
  mask = np.asarray(S.structured_mask(jnp.abs(w), 0.5, "neuron"))
  np.testing.assert_array_equal(mask.any(0), [False, True])


def test_unit_traced_sparsity_and_ties():
  x = jnp.ones((3, 10))
  f = jax.jit(lambda s, sp: S.structured_mask(s, sp, "neuron"))
  for sp in (0.0, 0.25, 0.5, 0.7, 0.95):
    sp = float(np.float32(sp))  # a traced sparsity is this float32 value (0.7 -> 0.69999999)
    m = np.asarray(f(x, sp))
    np.testing.assert_array_equal(m, np.asarray(S.structured_mask(x, sp, "neuron")))
    k = 10 - math.floor(sp * 10)
    np.testing.assert_array_equal(m.any(0), np.arange(10) < k)  # lower index wins


def test_unit_custom_axis():
  x = jnp.asarray(np.random.default_rng(3).random((6, 4), np.float32))
  m = np.asarray(S.structured_mask(x, 0.5, "neuron", axis=0))
  assert np.all(m.all(1) == m.any(1)) and m.any(1).sum() == 3


def test_bad_sparsity_value():
  with pytest.raises(ValueError, match="sparsity"):
    S.structured_mask(jnp.ones((4, 4)), 1.5, "neuron")
  with pytest.raises(ValueError, match="sparsity is required"):
    S.structured_mask(jnp.ones((4, 4)), None, "block:2x2")


def test_nan_units_and_blocks_rank_lowest():
  x = np.ones((4, 4), np.float32)
  x[0, 0] = np.nan
  m = np.asarray(S.structured_mask(jnp.asarray(x), 0.25, "neuron"))
  np.testing.assert_array_equal(m.any(0), [False, True, True, True])
  m = np.asarray(S.structured_mask(jnp.asarray(x), 0.75, "block:2x2"))
  np.testing.assert_array_equal(
    m.reshape(2, 2, 2, 2).any(axis=(1, 3)), [[False, True], [False, False]]
  )


def test_select_compatible_and_notes():
  params = {
    "a": {"kernel": jnp.ones((8, 3))},
    "b": {"kernel": jnp.ones((6, 3)), "bias": jnp.ones(3)},
  }
  pruned = {"a": {"kernel": True}, "b": {"kernel": True, "bias": False}}
  cfg = {"sparsity_type": "2:4", "include": None}
  assert S.select_compatible(params, pruned, cfg) == {
    "a": {"kernel": True},
    "b": {"kernel": False, "bias": False},
  }
  notes = S.incompatibility_notes(params, "2:4")
  assert list(notes) == ["b/kernel"] and "not divisible by M=4" in notes["b/kernel"]
  with pytest.raises(ValueError, match=r"'b/kernel'.*2:4.*divisible"):
    S.select_compatible(params, pruned, {"sparsity_type": "2:4", "include": "kernel"})


# ---------------------------------------------------------------------------
# drop-and-grow within a pattern (SET / RigL)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(
  nm=st.sampled_from([(2, 4), (1, 4), (3, 4), (4, 8)]),
  d=st.floats(0.0, 1.0),
  conv=st.booleans(),
  seed=st.integers(0, 2**16),
)
def test_replace_connections_nm_keeps_pattern(nm, d, conv, seed):
  n, m = nm
  rng = np.random.default_rng(seed)
  shape = (2, 2 * m, 3) if conv else (3 * m, 4)
  w = jnp.asarray(rng.normal(size=shape), jnp.float32)
  g = jnp.asarray(rng.normal(size=shape), jnp.float32)
  mask = S.structured_mask(jnp.abs(w), None, f"{n}:{m}")
  f = jax.jit(lambda mk, w, g, d: S.replace_connections(mk, w, g, d, f"{n}:{m}"))
  new, n_rep = f(mask, w, g, d)
  new, mask = np.asarray(new), np.asarray(mask)
  assert np.all(S.group_counts(new, m, axis=-2) == n)  # still exactly N:M
  grown = new & ~mask
  dropped = mask & ~new
  assert grown.sum() == dropped.sum() == int(n_rep)
  cap = min(n, m - n)
  assert int(n_rep) == min(math.floor(np.float32(d) * np.float32(mask.sum())), cap * mask.size // m)
  # Dropped weights are the smallest-magnitude active ones among those allowed to go.
  if dropped.any() and (mask & new).any() and cap == n:
    assert np.abs(np.asarray(w))[dropped].max() <= np.abs(np.asarray(w))[mask & new].min()


def test_replace_connections_nm_grows_by_gradient():
  w = jnp.asarray([[4.0], [3.0], [0.0], [0.0], [1.0], [5.0], [0.0], [0.0]])
  mask = jnp.asarray([[1], [1], [0], [0], [1], [1], [0], [0]], bool)
  g = jnp.asarray([[0.0], [0.0], [0.5], [2.0], [0.0], [0.0], [9.0], [0.1]])
  new, n_rep = S.replace_connections(mask, w, g, 0.25, "2:4")
  # One drop: |w|=1 in group 2, which regrows its best inactive slot (|g|=9).
  np.testing.assert_array_equal(np.asarray(new)[:, 0], [1, 1, 0, 0, 0, 1, 1, 0])
  assert int(n_rep) == 1


@pytest.mark.parametrize(
  "stype, shape", [("neuron", (6, 8)), ("channel", (3, 3, 2, 8)), ("block:2x2", (8, 8))]
)
def test_replace_connections_whole_groups(stype, shape):
  rng = np.random.default_rng(7)
  w = jnp.asarray(rng.normal(size=shape), jnp.float32)
  g = jnp.asarray(rng.normal(size=shape), jnp.float32)
  mask = S.structured_mask(jnp.abs(w), 0.5, stype)
  new, n_rep = jax.jit(lambda m, w, g: S.replace_connections(m, w, g, 0.5, stype))(mask, w, g)
  new, mask = np.asarray(new), np.asarray(mask)
  assert new.sum() == mask.sum() and int(n_rep) == (mask & ~new).sum() > 0
  if stype == "block:2x2":
    tiles = new.reshape(4, 2, 4, 2)
    assert np.all(tiles.all(axis=(1, 3)) == tiles.any(axis=(1, 3)))
  else:
    cols = new.reshape(-1, shape[-1])
    assert np.all(cols.all(0) == cols.any(0))
  # Grown units were inactive before; the kept ones are the strongest active ones.
  before = mask.reshape(-1, shape[-1]).any(0) if stype != "block:2x2" else None
  if before is not None:
    after = new.reshape(-1, shape[-1]).any(0)
    norms = np.linalg.norm(np.asarray(w).reshape(-1, shape[-1]), axis=0)
    stay, gone = before & after, before & ~after
    assert norms[gone].max() <= norms[stay].min()


@pytest.mark.parametrize(
  "s, pattern",
  [
    ("2:4", S.NM(2, 4)),
    ("block:4x2", S.Block(4, 2)),
    ("neuron", S.Units("neuron")),
    ("channel", S.Units("channel")),
    ("unstructured", S.Unstructured()),
  ],
)
def test_strings_parse_into_typed_patterns_that_act_like_them(s, pattern):
  parsed = S.parse_sparsity_type(s)
  assert parsed == pattern and type(parsed) is type(pattern) and parsed.name == s
  assert S.parse_sparsity_type(pattern) is pattern
  assert hash(parsed) == hash(pattern)  # frozen values
  scores = jax.random.normal(jax.random.PRNGKey(0), (8, 4))
  np.testing.assert_array_equal(
    S.structured_mask(scores, 0.5, pattern), S.structured_mask(scores, 0.5, s)
  )
  assert S.group_count((8, 4), pattern) == S.group_count((8, 4), s)


def test_typed_patterns_check_their_fields():
  with pytest.raises(ValueError, match="1 <= N <= M"):
    S.NM(3, 2)
  with pytest.raises(ValueError, match=">= 1"):
    S.Block(0, 4)
  with pytest.raises(ValueError, match="neuron"):
    S.Units("filter")
  assert S.NM(2, 4).implied_sparsity == 0.5 and S.Block(2, 2).implied_sparsity is None


def test_an_algorithm_takes_a_typed_pattern():
  params = {"w": jax.random.normal(jax.random.PRNGKey(1), (8, 4))}
  by_object = jaxprune.create("magnitude", sparsity_type=S.NM(2, 4))
  by_string = jaxprune.create("magnitude", sparsity_type="2:4")
  assert by_object.config == by_string.config
  masks = {"w": jnp.ones((8, 4), bool)}
  np.testing.assert_array_equal(
    by_object.update(0, params, params, masks, ())[0]["w"],
    by_string.update(0, params, params, masks, ())[0]["w"],
  )
