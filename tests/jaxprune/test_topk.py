import math

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxprune
from jaxprune.topk import keep_count, topk_mask, topk_masks

shapes = st.lists(st.integers(1, 9), min_size=1, max_size=4).map(tuple)


@settings(max_examples=15)
@given(shape=shapes, sparsity=st.floats(0.0, 0.999), seed=st.integers(0, 2**16))
def test_exact_kept_count_magnitude(shape, sparsity, seed):
  w = jax.random.normal(jax.random.PRNGKey(seed), shape)
  n = math.prod(shape)
  masks = jaxprune.magnitude_masks({"w": w}, {"w": sparsity})
  expected = n - math.floor(sparsity * n)
  m = np.broadcast_to(np.asarray(masks["w"]), shape)
  assert m.sum() == expected
  if 0 < expected < n:  # kept entries dominate dropped ones
    a = np.abs(np.asarray(w))
    assert a[m].min() >= a[~m].max()


@settings(max_examples=15)
@given(
  shape=shapes, k_frac=st.floats(0.0, 1.0), seed=st.integers(0, 2**16), levels=st.integers(1, 4)
)
def test_topk_with_heavy_ties_is_exact_and_lowest_index_first(shape, k_frac, seed, levels):
  n = math.prod(shape)
  k = int(round(k_frac * n))
  s = jax.random.randint(jax.random.PRNGKey(seed), shape, 0, levels).astype(jnp.float32)
  m = np.asarray(jax.jit(topk_mask, static_argnums=1)(s, k)).reshape(-1)
  assert m.sum() == k
  # reference: stable sort by (-score, index)
  order = np.lexsort((np.arange(n), -np.asarray(s).reshape(-1)))
  ref = np.zeros(n, bool)
  ref[order[:k]] = True
  np.testing.assert_array_equal(m, ref)


@given(seed=st.integers(0, 2**16), k=st.integers(0, 30))
def test_joint_topk_matches_concatenated(seed, k):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  a = jax.random.randint(k1, (3, 4), -3, 3).astype(jnp.float32)
  b = jax.random.randint(k2, (2, 5, 1), -3, 3).astype(jnp.float32)
  ma, mb = topk_masks([a, b], k)
  joint = np.concatenate([np.asarray(ma).ravel(), np.asarray(mb).ravel()])
  # Against the lexsort reference over the concatenation (largest first, ties to the lower
  # flat index); k above the 22 entries keeps them all.
  ref = _reference_topk(np.concatenate([np.asarray(a).ravel(), np.asarray(b).ravel()]), k)
  np.testing.assert_array_equal(joint, ref)
  assert joint.sum() == min(k, 22)


def test_traced_k_and_nan_scores_rank_last():
  s = jnp.array([jnp.nan, 1.0, -jnp.inf, 2.0, jnp.nan])
  f = jax.jit(topk_mask)
  assert np.asarray(f(s, jnp.int32(2))).tolist() == [False, True, False, True, False]
  assert np.asarray(f(s, jnp.int32(3))).tolist() == [False, True, True, True, False]
  assert np.asarray(f(s, jnp.int32(4))).tolist() == [True, True, True, True, False]


def test_negative_zero_ties_with_zero():
  s = jnp.array([0.0, -0.0, 0.0, -0.0])
  assert np.asarray(topk_mask(s, 2)).tolist() == [True, True, False, False]


def test_keep_count_rule():
  assert keep_count(10, 0.9) == 1
  assert keep_count(2048, 0.9) == 205
  assert keep_count(7, 0.0) == 7
  assert keep_count(3, 0.5) == 2


@settings(max_examples=15)
@given(shape=shapes, sparsity=st.floats(0.0, 0.999), seed=st.integers(0, 2**16))
def test_random_masks_exact_count_and_deterministic(shape, sparsity, seed):
  params = {"w": jnp.ones(shape)}
  key = jax.random.PRNGKey(seed)
  m1 = jaxprune.random_masks(key, params, {"w": sparsity})
  m2 = jaxprune.random_masks(key, params, {"w": sparsity})
  n = math.prod(shape)
  assert np.broadcast_to(np.asarray(m1["w"]), shape).sum() == n - math.floor(sparsity * n)
  np.testing.assert_array_equal(np.asarray(m1["w"]), np.asarray(m2["w"]))


def test_traced_sparsity_keeps_the_eager_count():
  # float32(0.29) * 100 rounds to 29.0 in float32; the float64 product floors to 28.
  w = {"w": jnp.arange(100.0).reshape(100, 1)}
  traced = jax.jit(lambda p, s: jaxprune.magnitude_masks(p, {"w": s}))(w, 0.29)
  eager = jaxprune.magnitude_masks(w, {"w": float(np.float32(0.29))})
  assert int(np.sum(traced["w"])) == int(np.sum(eager["w"])) == 72


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 32), decimals=st.integers(0, 3))
def test_topk_matches_stable_sort_for_every_k(seed, n, decimals):
  # Rounded normal scores: distinct values and ties side by side, so every k meets
  # both ends of the bisection (a prefix that separates exactly k, ties to break).
  s = np.round(np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (n,))), decimals)
  s[:: max(1, n // 5)] = s[0]
  s = s.astype(np.float32)
  select = jax.jit(topk_mask)
  order = np.lexsort((np.arange(n), -s))
  for k in range(n + 1):
    ref = np.zeros(n, bool)
    ref[order[:k]] = True
    np.testing.assert_array_equal(np.asarray(select(jnp.asarray(s), k)), ref)


# Inputs of at least 16 * SAMPLE_SIZE entries take the sampled bracket first.
_LARGE = (257, 300)  # 77,100 entries, not a multiple of the sample stride
_topk_traced = jax.jit(topk_mask)


def _reference_topk(s, k):
  flat = np.asarray(s, np.float32).reshape(-1)
  key = np.where(np.isnan(flat), -np.inf, flat)  # NaN lowest (below -inf: by index after it)
  order = np.lexsort((np.arange(flat.size), np.isnan(flat), -key))
  ref = np.zeros(flat.size, bool)
  ref[order[:k]] = True
  return ref


_KINDS = ["normal", "ties", "masked", "nan_inf", "periodic", "constant"]


def _large_scores(kind, seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=_LARGE).astype(np.float32)
  if kind == "ties":  # few levels: the bracket holds whole tie groups
    x = np.round(x * 2).astype(np.float32)
  elif kind == "masked":  # most entries excluded at -inf, as the DST selections
    x = np.where(rng.random(_LARGE) < 0.9, -np.inf, np.abs(x)).astype(np.float32)
  elif kind == "nan_inf":
    r = rng.random(_LARGE)
    x[r < 0.05] = np.nan
    x[(r >= 0.05) & (r < 0.08)] = np.inf
    x[(r >= 0.08) & (r < 0.1)] = -np.inf
  elif kind == "periodic":  # a pattern with the period of the sample stride
    x = np.where(np.arange(x.size).reshape(_LARGE) % 16 == 0, 5.0, x).astype(np.float32)
  elif kind == "constant":
    x = np.full(_LARGE, 0.25, np.float32)
  return x


@settings(max_examples=20, deadline=None)
@given(kind=st.sampled_from(_KINDS), seed=st.integers(0, 2**16), k_frac=st.floats(0.0, 1.0))
def test_sampled_bracket_selection_is_exact(kind, seed, k_frac):
  """Large inputs (sampled bracket, then bisection inside it, or the full range
  where a sampled bound fails) select exactly the stable-sort top k."""
  x = _large_scores(kind, seed)
  k = int(round(k_frac * x.size))
  m = np.asarray(_topk_traced(jnp.asarray(x), k)).reshape(-1)
  assert m.sum() == k
  np.testing.assert_array_equal(m, _reference_topk(x, k))


def test_sampled_bracket_edges_of_k_and_joint_selection():
  x = _large_scores("normal", 0)
  for k in (0, 1, 2, x.size - 1, x.size):
    m = np.asarray(_topk_traced(jnp.asarray(x), k)).reshape(-1)
    np.testing.assert_array_equal(m, _reference_topk(x, k))
  a, b = x[:100], x[100:]  # jointly over two leaves = over their concatenation
  for k in (10, 5000, 40_000):
    ma, mb = topk_masks([jnp.asarray(a), jnp.asarray(b)], k)
    joint = np.concatenate([np.asarray(ma).ravel(), np.asarray(mb).ravel()])
    np.testing.assert_array_equal(joint, _reference_topk(x.reshape(-1), k))


def test_sampled_first_pass_brackets_the_kth_key():
  from jaxprune import topk

  x = np.abs(_large_scores("normal", 3))  # magnitudes, as pruning ranks them
  keys = [topk._sortable(jnp.asarray(x))]
  flat = np.sort(np.asarray(keys[0]).reshape(-1))[::-1]
  full = (jnp.uint32(0), jnp.uint32(topk._MAX_KEY), jnp.float32(x.size), jnp.float32(0))
  for k in (1, 7_710, 38_550, 77_099):
    kf = jnp.float32(k)
    ts = topk._sample_thresholds(keys, kf, x.size)
    assert len(ts) == topk.PROBES and all(int(a) <= int(b) for a, b in zip(ts, ts[1:]))
    lo, top, c_lo, c_up = topk._narrow(keys, full, ts, kf, jnp.float32)
    kth = flat[k - 1]
    assert int(lo) <= kth <= int(top)
    assert int(c_lo) == int((flat >= int(lo)).sum()) >= k
    assert int(c_up) == int((flat > int(top)).sum()) < k
    if 0.05 < k / x.size < 0.95:  # the sample narrows a continuous distribution
      assert int(c_lo) - int(c_up) < 0.1 * x.size


# Leaves whose axes group 16, a few, or no entries at a time before the
# fields are unpacked, a scalar, an empty leaf, and long rows.
_GROUPED_SHAPES = [(32, 16), (3, 3, 64, 8), (7, 13), (13,), (), (0, 4), (1, 70_001), (5, 3, 2)]


@settings(max_examples=30, deadline=None)
@given(
  shape=st.sampled_from(_GROUPED_SHAPES),
  levels=st.sampled_from([0, 1, 3]),
  seed=st.integers(0, 2**16),
)
def test_packed_counts_match_numpy_for_every_grouping(shape, levels, seed):
  from jaxprune import topk

  rng = np.random.default_rng(seed)
  x = rng.normal(size=shape).astype(np.float32)
  if levels:
    x = rng.integers(0, levels, size=shape).astype(np.float32)
  keys = [topk._sortable(jnp.asarray(x)).reshape(shape or (1,))]
  flat = np.asarray(keys[0]).reshape(-1)
  picks = rng.choice(np.concatenate([flat, [0, 2**32 - 1]]), topk.PROBES)
  ts = [jnp.uint32(t) for t in np.sort(picks)]
  got = np.asarray(topk._packed_counts(keys, ts, jnp.float32))
  np.testing.assert_array_equal(got, [(flat >= int(t)).sum() for t in ts])


@settings(max_examples=25, deadline=None)
@given(
  shape=st.sampled_from([s for s in _GROUPED_SHAPES if s != (0, 4)] + [(65_536,), (300, 301)]),
  levels=st.sampled_from([0, 1, 2, 5]),
  k_frac=st.floats(0.0, 1.0),
  seed=st.integers(0, 2**16),
)
def test_selection_is_exact_for_every_grouping_and_tie_pattern(shape, levels, k_frac, seed):
  """Continuous scores, few levels (whole tie groups across rows: the tied
  row counts and the bisected boundary row) or a single level, over shapes
  that group differently; 65,536 entries and more take the sampled first pass."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=shape).astype(np.float32)
  if levels:
    x = rng.integers(0, levels, size=shape).astype(np.float32)
  k = int(round(k_frac * x.size))
  m = np.asarray(_topk_traced(jnp.asarray(x), k)).reshape(-1)
  assert m.sum() == k
  np.testing.assert_array_equal(m, _reference_topk(x, k))


def test_empty_and_scalar_leaves_in_a_joint_selection():
  a, empty, s = jnp.array([[3.0, 1.0], [2.0, 2.0]]), jnp.zeros((0, 3)), jnp.float32(2.0)
  ma, me, ms = topk_masks([a, empty, s], 3)
  assert me.shape == (0, 3) and ms.shape == ()
  assert np.asarray(ma).tolist() == [[True, False], [True, True]] and not bool(ms)
  ma, me, ms = topk_masks([a, empty, s], 4)  # the 2.0 ties go to the earlier leaf first
  assert np.asarray(ma).tolist() == [[True, False], [True, True]] and bool(ms)
  assert not np.asarray(topk_masks([empty], 0)[0]).any()
