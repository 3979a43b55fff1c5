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

The k-th largest score is found by bisection over the 32 bits of an
order-preserving integer image of the float32 scores: at most 32 counting passes
(fewer when a prefix already separates exactly k entries), each a
fused compare-and-sum that XLA shards like any reduction (no gather, no sort).
Counts are float32 sums, exact while a count stays below 2**24, else int32.
NaN scores rank lowest, below -inf.
"""

from __future__ import annotations

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


@jax.jit
def _topk_masks(scores, k):
  keys = [_sortable(s) for s in scores]
  total = sum(int(s.size) for s in keys)
  cdt = _count_dtype(total)
  k = jnp.clip(jnp.asarray(k), 0, total).astype(cdt)

  def count(pred_fn):
    return sum(jnp.sum(pred_fn(i, key), dtype=cdt) for i, key in enumerate(keys))

  # Bisection for the largest t with count(key >= t) >= k (the k-th largest key),
  # one bit per counting pass from the top. It stops as soon as count(key >= t)
  # is exactly k: then ``key >= t`` is the selection (every key >= the k-th
  # largest, no tie to break), the same set the full 32 bits would give.
  def unresolved(carry):
    b, _, c = carry
    return (b < 32) & (c != k)

  def bit_step(carry):
    b, t, c = carry
    cand = t | (jnp.uint32(1) << (31 - b).astype(jnp.uint32))
    c_cand = count(lambda i, key: key >= cand)
    take = c_cand >= k
    return b + 1, jnp.where(take, cand, t), jnp.where(take, c_cand, c)

  init = (jnp.int32(0), jnp.uint32(0), jnp.asarray(total, cdt))  # count(key >= 0) = total
  _, thresh, n_at_least = lax.while_loop(unresolved, bit_step, init)

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
