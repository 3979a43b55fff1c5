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
image (uint32) of the float32 scores, each step a fused compare-and-sum pass that
XLA shards like any reduction (no sort of the data); it stops as soon as a
threshold separates exactly k entries. For large inputs a sampled bracket
narrows the range first (:func:`_sampled_bracket`): a fixed, spread-out sample
of ``SAMPLE_SIZE`` keys is sorted, the keys just above and below the sample
quantile of ``k`` become candidate bounds, and two counting passes check them
(a bound that fails falls back to 0 below, or to the largest key above), so the
result is exact whatever the sample. While the range holds ``2**16`` keys or
more, a pass counts one probe (interpolated from the counts, or the middle);
below that, a pass counts two probes at once, their two in-bracket counts packed
into one uint32 sum (a single-output reduction, which XLA:CPU vectorises, unlike
a multi-output one): the probes sandwich the interpolated position of the k-th
key, or cut the range in thirds after a pass that did not shrink it threefold.
Counts are float32 sums, exact while a count stays below 2**24, else int32.
NaN scores rank lowest, below -inf.
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


SAMPLE_SIZE = 4096  # keys sampled for the bracket (inputs below 16 x this are bisected directly)
_SAMPLE_MIN_TOTAL = 16 * SAMPLE_SIZE
_MARGIN_SIGMAS = 4.0  # bracket half-width around the sample quantile, in binomial std devs


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


def _sampled_bracket(keys, k, total: int, count_both):
  """``(lo, c_lo, top, c_up, narrow)``: the k-th largest key lies in ``[lo, top]``,
  ``c_lo = count(key >= lo)`` and ``c_up = count(key >= top + 1)``; from the
  sample when its bounds check out (two counting passes), else ``lo = 0`` below
  and the largest key above (one more pass); ``narrow``: the lower bound came
  from the sample."""
  stride = max(1, total // SAMPLE_SIZE)
  sample = _sample_keys(keys, stride)
  n_s = int(sample.size)
  desc = jnp.sort(sample)[::-1]
  kf = k.astype(jnp.float32)
  p = kf / float(total)
  q = kf / float(stride)  # the k-th largest's expected position in the sample
  margin = _MARGIN_SIGMAS * jnp.sqrt(n_s * p * (1.0 - p)) + 2.0
  hi_pos = jnp.floor(q - margin).astype(jnp.int32)
  lo_pos = jnp.ceil(q + margin).astype(jnp.int32)
  hi_key = desc[jnp.clip(hi_pos, 0, n_s - 1)]
  lo_key = desc[jnp.clip(lo_pos, 0, n_s - 1)]
  c_lo_key, c_hi_key = count_both(lambda i, key: key >= lo_key, lambda i, key: key >= hi_key)
  lo_ok = (lo_pos < n_s) & (c_lo_key >= k)
  hi_ok = (hi_pos >= 0) & (c_hi_key < k) & (hi_key > 0)
  lo = jnp.where(lo_ok, lo_key, jnp.uint32(0))
  c_lo = jnp.where(lo_ok, c_lo_key, jnp.asarray(total, c_lo_key.dtype))
  # Above the sample (small k): the largest key bounds the range, with nothing above it.
  top = lax.cond(
    hi_ok, lambda: hi_key - jnp.uint32(1), lambda: functools.reduce(jnp.maximum, map(jnp.max, keys))
  )
  c_up = jnp.where(hi_ok, c_hi_key, jnp.zeros((), c_hi_key.dtype))
  return lo, c_lo, top, c_up, lo_ok


_PACKED_LIMIT = 2**16  # brackets holding fewer keys count two probes in one pass


_MAX_UINT32_FLOAT = 4294967040.0  # the largest float32 below 2**32


def _position(c_lo, c_up, k, shift):
  """Where in ``[lo, top]`` (a fraction of the range, from ``lo``) the counts
  interpolate the k-th largest key, moved by ``shift`` (a fraction)."""
  n_in = jnp.maximum((c_lo - c_up).astype(jnp.float32), 1.0)
  return (c_lo - k).astype(jnp.float32) / n_in + shift


def _key_at(lo, gap, frac):
  """The key ``lo + ceil(frac * (gap + 1))``, clipped to ``[lo + 1, lo + gap]``
  (in uint32 before the addition, which cannot then wrap around)."""
  g = gap.astype(jnp.float32)
  step = jnp.clip(jnp.ceil(frac * (g + 1.0)), 1.0, jnp.minimum(g, _MAX_UINT32_FLOAT))
  return lo + jnp.clip(step.astype(jnp.uint32), jnp.uint32(1), gap)


@jax.jit
def _topk_masks(scores, k):
  keys = [_sortable(s) for s in scores]
  total = sum(int(s.size) for s in keys)
  cdt = _count_dtype(total)
  k = jnp.clip(jnp.asarray(k), 0, total).astype(cdt)

  def count(pred_fn):
    return sum(jnp.sum(pred_fn(i, key), dtype=cdt) for i, key in enumerate(keys))

  # Several counts in one pass: each predicate sets one bit field of a uint32
  # word, the words are summed along each leaf's last axis (a row holds fewer
  # entries than a field can count), and the row sums are unpacked and added.
  # In the leaf's own shape: a reshape of a sharded leaf would gather it.
  row = max(int(key.shape[-1]) if key.ndim else 1 for key in keys)

  def packed_counts(preds, bits):
    field = jnp.uint32(2**bits - 1)
    counts = [jnp.zeros((), cdt) for _ in preds]
    for i, key in enumerate(keys):
      word = functools.reduce(
        jnp.bitwise_or, [p(i, key).astype(jnp.uint32) << (bits * j) for j, p in enumerate(preds)]
      )
      rows = jnp.sum(word, axis=-1, dtype=jnp.uint32) if key.ndim else word
      for j in range(len(preds)):
        counts[j] = counts[j] + jnp.sum((rows >> (bits * j)) & field, dtype=cdt)
    return counts

  def count_both(pred_a, pred_b):
    if row < 2**16:
      return packed_counts([pred_a, pred_b], 16)
    return count(pred_a), count(pred_b)

  # Search for the largest t with count(key >= t) >= k (the k-th largest key)
  # in the integer range [lo, top] that holds it, keeping count(key >= lo) =
  # c_lo >= k > c_up = count(key >= top + 1). It stops as soon as count(key >= t)
  # is exactly k: then ``key >= t`` is the selection (every key >= the k-th
  # largest, no tie to break), the same set the full search would give.
  if total >= _SAMPLE_MIN_TOTAL:
    lo, c_lo, top, c_up, bracketed = _sampled_bracket(keys, k, total, count_both)
  else:  # count(key >= 0) = total
    lo, c_lo = jnp.uint32(0), jnp.asarray(total, cdt)
    top, c_up = jnp.uint32(0xFFFFFFFF), jnp.asarray(0, cdt)
    bracketed = jnp.asarray(False)

  def unresolved(carry):
    lo, top, c_lo, _, _ = carry
    return (lo < top) & (c_lo != k)

  # Rows of 2**16 entries or more (a long last axis) cannot count in a 16-bit
  # field: while the bracket holds 2**16 keys or more, one probe per pass,
  # where the counts interpolate k, or the upper middle after a probe that did
  # not halve the range.
  def wide(carry):
    lo, top, c_lo, c_up, _ = carry
    return unresolved(carry) & (c_lo - c_up >= _PACKED_LIMIT)

  def one_probe(carry):
    lo, top, c_lo, c_up, interpolate = carry
    gap = top - lo  # >= 1
    half = lo + (gap >> 1) + (gap & jnp.uint32(1))  # upper middle: no overflow, always moves
    mid = jnp.where(interpolate, _key_at(lo, gap, _position(c_lo, c_up, k, 0.0)), half)
    c_mid = count(lambda i, key: key >= mid)
    take = c_mid >= k
    new_lo, new_top = jnp.where(take, mid, lo), jnp.where(take, top, mid - jnp.uint32(1))
    halved = bracketed & ((new_top - new_lo) <= (gap >> 1))
    return new_lo, new_top, jnp.where(take, c_mid, c_lo), jnp.where(take, c_up, c_mid), halved

  # Several probes per pass, their counts packed into one uint32 word per
  # entry (a single-output reduction, which XLA:CPU vectorises; a multi-output
  # one it does not; see packed_counts): 2 probes of 16 bits, 4 of 8 bits once
  # the bracket holds fewer than 2**8 keys, 8 of 4 bits below 2**4, each pass
  # at about the cost of one count. The probes spread evenly over the
  # interpolated position of the k-th key, two binomial standard deviations
  # either side, or split the range evenly after a pass that did not shrink it
  # by the factor P + 1.
  def probes(n_probes):
    bits = 32 // n_probes

    def body(carry):
      lo, top, c_lo, c_up, interpolate = carry
      gap = top - lo  # >= 1
      n_in = (c_lo - c_up).astype(jnp.float32)
      f = (c_lo - k).astype(jnp.float32) / jnp.maximum(n_in, 1.0)
      spread = (2.0 * jnp.sqrt(n_in * f * (1.0 - f)) + 1.0) / jnp.maximum(n_in, 1.0)
      ts = []
      for i in range(n_probes):
        near = f - spread + 2.0 * spread * (i / (n_probes - 1))
        even = (i + 1) / (n_probes + 1)
        ts.append(_key_at(lo, gap, jnp.where(interpolate, near, even)))

      def probe(t):
        return lambda i, key: (key <= top) & (key >= t)

      cs = [c_up + c for c in packed_counts([probe(t) for t in ts], bits)]
      # Counts fall as probes rise: the new bracket lies between the last
      # probe that still counts k and the next one.
      n_above = sum((c >= k).astype(jnp.int32) for c in cs)
      ts, cs = jnp.stack(ts), jnp.stack(cs)
      new_lo = jnp.concatenate([lo[None], ts])[n_above]
      new_c_lo = jnp.concatenate([c_lo[None], cs])[n_above]
      new_top = jnp.concatenate([ts - jnp.uint32(1), top[None]])[n_above]
      new_c_up = jnp.concatenate([cs, c_up[None]])[n_above]
      shrunk = (new_top - new_lo) <= gap // jnp.uint32(n_probes + 1)
      return new_lo, new_top, new_c_lo, new_c_up, shrunk

    return body

  def holding_at_least(bound):
    return lambda carry: unresolved(carry) & (carry[2] - carry[3] >= bound)

  carry = (lo, top, c_lo, c_up, bracketed)
  if row >= 2**16:  # a row's count may not fit a 16-bit field
    carry = lax.while_loop(wide, one_probe, carry)
  carry = lax.while_loop(holding_at_least(2**8), probes(2), carry)
  carry = lax.while_loop(holding_at_least(2**4), probes(4), carry)
  thresh, _, n_at_least, _, _ = lax.while_loop(unresolved, probes(8), carry)

  offsets = [0]
  for key in keys[:-1]:
    offsets.append(offsets[-1] + int(key.size))

  def exact(_):
    return [key >= thresh for key in keys]

  def break_ties(_):
    # thresh is the k-th largest key and more than k keys reach it: keep every
    # key above it and, of those equal to it, the ``need`` lowest flat indices.
    need = k - count(lambda i, key: key > thresh)
    idx = [_flat_index(key.shape, off) for key, off in zip(keys, offsets)]

    def idx_step(b, j):  # largest j with count(eq & idx <= j) < need, plus one
      cand = j | (1 << (nbits - 1 - b))
      below = count(lambda i, key: (key == thresh) & (idx[i] < cand))
      return jnp.where((cand <= total) & (below < need), cand, j)

    nbits = max(1, int(total).bit_length())
    j = lax.fori_loop(0, nbits, idx_step, jnp.int32(0))
    return [(key > thresh) | ((key == thresh) & (ix <= j)) for key, ix in zip(keys, idx)]

  kept = lax.cond(n_at_least == k, exact, break_ties, None)
  return [m & (k > 0) for m in kept]


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
