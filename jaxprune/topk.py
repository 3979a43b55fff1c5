"""Exact top-k selection without sorting.

Rounding rule (used everywhere in jaxprune): a leaf of ``n`` entries at target
sparsity ``s`` keeps exactly ``n - floor(s * n)`` entries, ``floor`` taken of the
float64 product. Inside jit a traced sparsity is a float32 (without x64); its
count is the same float64 rule for that float32 value, computed exactly with
integer arithmetic for every ``n < 2**31`` (:func:`jaxprune.rounding.floor_product`),
so traced and eager counts agree for the same float32 value. (A traced 0.7 is
the float32 0.69999999: 10 entries keep 4, where the Python float 0.7 keeps 3.)
Structured types count tiles or units the same way. Ties are broken
deterministically: among equal scores, lower flat (row-major) indices win;
across several leaves selected jointly, earlier leaves (in tree-flattening
order) win.

The k-th largest score is found by a search over an order-preserving integer
image (uint32) of the float32 scores: no sort of the data, only counting
passes that XLA shards like any reduction. Every pass counts ``count(key >= t)``
for :data:`PROBES` thresholds at once: each entry sets one 8-bit field per
threshold in a uint32 word, the words are summed over groups of at most 16
entries along one axis of the leaf (a field cannot overflow; an axis split in
the leaf's own layout, so a sharded leaf is not gathered), and the group sums
are unpacked and added. On XLA:CPU such a pass costs less than one plain
``sum(key >= t)``: the grouped sum is a vectorised loop, the full reduction
then runs over 16 times fewer words.

The search keeps a bracket ``[lo, top]`` that holds the k-th largest key,
with ``count(key >= lo) >= k > count(key > top)``, and stops as soon as a
threshold separates exactly k entries. For large inputs the first pass takes
its thresholds from a fixed, spread-out sample of ``SAMPLE_SIZE`` keys (sorted):
the sample quantiles around the k-th, four binomial standard deviations
either side. Later passes place the thresholds around the position of the
k-th key interpolated from the counts (two binomial standard deviations
either side), or split the bracket evenly after a pass that did not shrink it
by the factor ``PROBES + 1``. Whatever the sample, the counts are exact, so the
result is. Ties at the k-th key are broken by index in two steps: one pass
counts the tied entries of every row (last axis), a bisection over these
counts finds the row where the ``k``-th falls, and that row alone is bisected
by column. Counts are float32 sums, exact while a count
stays below 2**24, else int32. NaN scores rank lowest, below -inf.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax


def keep_count(n: int, sparsity: float) -> int:
  """Entries kept out of ``n`` at ``sparsity``: ``n - floor(sparsity * n)``.

  Examples:
    >>> keep_count(100, 0.29)
    72
    >>> keep_count(10, 0.7)
    3
  """
  return int(n) - math.floor(float(sparsity) * int(n))


def _sortable(scores: jax.Array) -> jax.Array:
  """Maps float scores to uint32 keys with the same order (NaN lowest)."""
  x = jnp.asarray(scores, jnp.float32)
  x = jnp.where(x == 0, jnp.float32(0), x)  # -0.0 ties with +0.0
  bits = lax.bitcast_convert_type(x, jnp.uint32)
  negative = (bits >> 31) == 1
  key = jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))
  return jnp.where(jnp.isnan(x), jnp.uint32(0), key)  # NaN below -inf


def _count_dtype(total: int):
  return jnp.float32 if total < 2**24 else jnp.int32


def _flat_index(shape, offset: int) -> jax.Array:
  idx = jnp.full(shape, offset, jnp.int32)
  stride = 1
  for d in reversed(range(len(shape))):
    idx = idx + lax.broadcasted_iota(jnp.int32, shape, d) * stride
    stride *= shape[d]
  return idx


def topk_masks(scores: Sequence[jax.Array], k) -> list[jax.Array]:
  """Keeps the ``k`` highest scores jointly over several arrays.

  Args:
    scores: arrays of any shapes (cast to float32).
    k: number of entries to keep in total (Python int or traced int scalar),
      clipped to ``[0, total size]``.

  Returns:
    bool arrays shaped like ``scores`` with exactly ``k`` True entries in total.
  """
  return _topk_masks(list(scores), jnp.asarray(k, jnp.int32))


SAMPLE_SIZE = (
  4096  # keys sampled for the first pass (inputs below 16 x this start from the full range)
)
_SAMPLE_MIN_TOTAL = 16 * SAMPLE_SIZE
_MARGIN_SIGMAS = (
  4.0  # the sampled thresholds' reach around the sample quantile, in binomial std devs
)
PROBES = 4  # thresholds counted in one pass
_FIELD_BITS = 32 // PROBES  # one count field of the packed word
_GROUP = 16  # at most this many words summed before the fields are unpacked (< 2**_FIELD_BITS)
_MAX_KEY = 0xFFFFFFFF
_MAX_UINT32_FLOAT = 4294967040.0  # the largest float32 below 2**32


def _sample_keys(keys, stride: int) -> jax.Array:
  """One key from each block of ``stride`` consecutive entries (flat order) of
  every array, at a fixed pseudo-random offset inside the block (so that a
  periodic pattern, e.g. N:M, cannot alias with the stride). Static shapes."""
  parts = []
  for key in keys:
    flat = key.reshape(-1)
    blocks = flat.size // stride
    if blocks == 0:
      continue
    j = jnp.arange(blocks, dtype=jnp.uint32)
    jitter = ((j * jnp.uint32(2654435761)) >> 8) % jnp.uint32(stride)
    parts.append(flat[(j * jnp.uint32(stride) + jitter).astype(jnp.int32)])
  return jnp.concatenate(parts)


def _grouping(shape) -> tuple[int, int]:
  """``(axis, g)``: the first summation stage adds ``g`` consecutive entries
  along ``axis`` (the largest divisor of an axis length up to :data:`_GROUP`;
  the leading axes first, as jaxprune shards parameters along the last)."""
  best = (0, 1)
  for axis in [*range(len(shape) - 1), len(shape) - 1]:
    g = max(d for d in range(1, _GROUP + 1) if shape[axis] % d == 0)
    if g > best[1]:
      best = (axis, g)
  return best


def _packed_counts(keys, thresholds, cdt) -> jax.Array:
  """``count(key >= t)`` jointly over ``keys`` for every ``t`` of ``thresholds``
  (at most :data:`PROBES`), in one pass over the data."""
  field = jnp.uint32(2**_FIELD_BITS - 1)
  counts = jnp.zeros((len(thresholds),), cdt)
  for key in keys:
    word = functools.reduce(
      jnp.bitwise_or,
      [(key >= t).astype(jnp.uint32) << (_FIELD_BITS * j) for j, t in enumerate(thresholds)],
    )
    axis, g = _grouping(key.shape)
    if g > 1:
      s = key.shape
      grouped = s[:axis] + (s[axis] // g, g) + s[axis + 1 :]
      word = jnp.sum(word.reshape(grouped), axis=axis + 1, dtype=jnp.uint32)
    fields = jnp.stack([(word >> (_FIELD_BITS * j)) & field for j in range(len(thresholds))])
    counts = counts + jnp.sum(fields, axis=tuple(range(1, fields.ndim)), dtype=cdt)
  return counts


def _key_at(lo, gap, frac):
  """The key ``lo + ceil(frac * (gap + 1))``, clipped to ``[lo + 1, lo + gap]``
  (in uint32 before the addition, which cannot then wrap around)."""
  g = gap.astype(jnp.float32)
  step = jnp.clip(jnp.ceil(frac * (g + 1.0)), 1.0, jnp.minimum(g, _MAX_UINT32_FLOAT))
  return lo + jnp.clip(step.astype(jnp.uint32), jnp.uint32(1), gap)


def _spread(center, sigma):
  """:data:`PROBES` evenly spaced positions over ``center +- sigma``, ascending."""
  return [center - sigma + 2.0 * sigma * (i / (PROBES - 1)) for i in range(PROBES)]


def _sample_thresholds(keys, k, total: int):
  """Thresholds of the first pass: sample quantiles around the k-th largest
  key's expected position in a sorted sample, ascending."""
  stride = max(1, total // SAMPLE_SIZE)
  sample = _sample_keys(keys, stride)
  n_s = int(sample.size)
  desc = jnp.sort(sample)[::-1]
  kf = k.astype(jnp.float32)
  p = kf / float(total)
  q = kf / float(stride)  # the k-th largest's expected position in the sample
  margin = _MARGIN_SIGMAS * jnp.sqrt(n_s * p * (1.0 - p)) + 2.0
  positions = _spread(q, margin)[::-1]  # lower keys sit further down the sample
  return [desc[jnp.clip(jnp.round(x), 0, n_s - 1).astype(jnp.int32)] for x in positions]


def _narrow(keys, carry, thresholds, k, cdt):
  """Counts the ascending ``thresholds`` in one pass; the new bracket lies
  between the last threshold that still counts k and the next one."""
  lo, top, c_lo, c_up = carry
  cs = _packed_counts(keys, thresholds, cdt)  # falling as the thresholds rise
  ts = jnp.stack(thresholds)
  n_at_least = jnp.sum(cs >= k, dtype=jnp.int32)
  return (
    jnp.concatenate([lo[None], ts])[n_at_least],
    jnp.concatenate([ts - jnp.uint32(1), top[None]])[n_at_least],
    jnp.concatenate([c_lo[None], cs])[n_at_least],
    jnp.concatenate([cs, c_up[None]])[n_at_least],
  )


def _rows(shape) -> int:
  return math.prod(shape[:-1])


def _break_ties(keys, thresh, need, cdt):
  """Every key above ``thresh`` and, of those equal to it, the ``need`` first
  in flat order (leaf by leaf). One pass counts each row's ties; the row that
  holds the ``need``-th is found by bisection over the row counts and then
  bisected by column alone. Only reductions: no cumulative sum or dynamic
  slice over an axis that may be sharded, so nothing is gathered."""
  eqs = [key == thresh for key in keys]
  row_ids, offset = [], 0
  for key in keys:
    row_ids.append(_flat_index(key.shape[:-1], offset))
    offset += _rows(key.shape)
  per_row = [jnp.sum(eq, axis=-1, dtype=cdt) for eq in eqs]

  def ties_before(r):  # tied entries in the rows before row r
    return sum(jnp.sum(jnp.where(ids < r, n, 0), dtype=cdt) for ids, n in zip(row_ids, per_row))

  def row_step(bit, r):  # the largest r with ties_before(r) < need: the need-th tie's row
    cand = r | (1 << (offset.bit_length() - 1 - bit))
    return jnp.where((cand < offset) & (ties_before(cand) < need), cand, r)

  b = lax.fori_loop(0, offset.bit_length(), row_step, jnp.int32(0))
  need_in_row = need - ties_before(b)
  width = max(int(key.shape[-1]) for key in keys)
  row = functools.reduce(  # the ties of row b, over the columns
    jnp.logical_or,
    [
      jnp.pad(
        jnp.any(eq & (ids == b)[..., None], axis=tuple(range(eq.ndim - 1))),
        (0, width - eq.shape[-1]),
      )
      for eq, ids in zip(eqs, row_ids)
    ],
  )
  col = lax.broadcasted_iota(jnp.int32, (width,), 0)

  def col_step(bit, j):  # the largest j with count(row & col < j) < need_in_row
    cand = j | (1 << (width.bit_length() - 1 - bit))
    below = jnp.sum(row & (col < cand), dtype=cdt)
    return jnp.where((cand <= width) & (below < need_in_row), cand, j)

  last = lax.fori_loop(0, width.bit_length(), col_step, jnp.int32(0))  # the need-th tie's column
  masks = []
  for key, eq, ids in zip(keys, eqs, row_ids):
    col_id = lax.broadcasted_iota(jnp.int32, key.shape, key.ndim - 1)
    chosen = (ids[..., None] < b) | ((ids[..., None] == b) & (col_id <= last))
    masks.append((key > thresh) | (eq & chosen))
  return masks


@jax.jit
def _topk_masks(scores, k):
  shapes = [jnp.shape(s) for s in scores]
  keys = [_sortable(s).reshape(s.shape or (1,)) for s in map(jnp.asarray, scores) if s.size]
  total = sum(int(key.size) for key in keys)
  if total == 0:
    return [jnp.zeros(shape, bool) for shape in shapes]
  cdt = _count_dtype(total)
  k = jnp.clip(jnp.asarray(k), 0, total).astype(cdt)

  # The bracket [lo, top] holds the k-th largest key: c_lo = count(key >= lo)
  # >= k > c_up = count(key > top). The search stops as soon as count(key >= t)
  # is exactly k (then ``key >= t`` is the selection, the same set the full
  # search would give) or the bracket holds a single key value (ties to break).
  carry = (jnp.uint32(0), jnp.uint32(_MAX_KEY), jnp.asarray(total, cdt), jnp.zeros((), cdt))
  if total >= _SAMPLE_MIN_TOTAL:
    carry = _narrow(keys, carry, _sample_thresholds(keys, k, total), k, cdt)
  lo, top, c_lo, c_up = carry
  # Above every threshold (or below), the largest (smallest) key bounds the range.
  lo = lax.cond(
    c_lo == total, lambda: functools.reduce(jnp.minimum, map(jnp.min, keys)), lambda: lo
  )
  top = lax.cond(c_up == 0, lambda: functools.reduce(jnp.maximum, map(jnp.max, keys)), lambda: top)

  def unresolved(carry):
    lo, top, c_lo, _, _ = carry
    return (lo < top) & (c_lo != k) & (k > 0)

  def search_pass(carry):
    lo, top, c_lo, c_up, interpolate = carry
    gap = top - lo  # >= 1
    n_in = jnp.maximum((c_lo - c_up).astype(jnp.float32), 1.0)
    f = (c_lo - k).astype(jnp.float32) / n_in  # the k-th key's interpolated place in the bracket
    sigma = (2.0 * jnp.sqrt(n_in * f * (1.0 - f)) + 1.0) / n_in
    even = [(i + 1) / (PROBES + 1) for i in range(PROBES)]
    fracs = [jnp.where(interpolate, x, e) for x, e in zip(_spread(f, sigma), even)]
    new = _narrow(keys, (lo, top, c_lo, c_up), [_key_at(lo, gap, x) for x in fracs], k, cdt)
    shrunk = (new[1] - new[0]) <= gap // jnp.uint32(PROBES + 1)
    return (*new, shrunk)

  thresh, _, c_at_least, c_above, _ = lax.while_loop(
    unresolved, search_pass, (lo, top, c_lo, c_up, jnp.asarray(True))
  )
  kept = lax.cond(
    (c_at_least == k) | (k == 0),
    lambda: [key >= thresh for key in keys],
    # thresh is the k-th largest key and more than k keys reach it.
    lambda: _break_ties(keys, thresh, k - c_above, cdt),
  )
  kept = iter(kept)
  return [
    (next(kept) & (k > 0)).reshape(shape) if math.prod(shape) else jnp.zeros(shape, bool)
    for shape in shapes
  ]


def topk_mask(scores: jax.Array, k) -> jax.Array:
  """Boolean mask of the ``k`` highest entries of ``scores`` (exact, no sort).

  Ties go to the lower flat index; NaN ranks lowest.

  Examples:
    >>> import jax.numpy as jnp
    >>> topk_mask(jnp.array([0.3, 0.1, 0.3, 0.9]), 2).tolist()
    [True, False, False, True]
    >>> topk_mask(jnp.array([jnp.nan, -1.0, 2.0]), 2).tolist()
    [False, True, True]
  """
  return topk_masks([scores], k)[0]
