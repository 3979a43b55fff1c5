"""``floor(s * n)`` as the library's rounding rule defines it, also inside jit.

The rule (:func:`jaxprune.topk.keep_count`): a leaf of ``n`` entries at sparsity
``s`` prunes ``floor(s * n)`` entries, the product taken in float64. Outside jit
``s`` is a Python float and the product is a float64 multiplication. Inside jit
without x64, a traced ``s`` is a float32 and a float32 product rounds: at
``s = 0.29`` (float32 0.2899999917) and ``n = 100`` it gives 29.0, where the
float64 product 28.999999 floors to 28.

:func:`floor_product` computes the float64 product of a float32 ``s`` and an
integer ``0 <= n < 2**31`` exactly with integer arithmetic in uint32 limbs: ``s``
is its 24-bit mantissa times a power of two, the 55-bit product mantissa x n is
rounded to 53 bits as float64 rounds it (to nearest, ties to even), and the
power of two becomes a right shift. So a traced sparsity gives exactly the count
the eager path gives for the same float32 value, for every ``n < 2**31``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_U32 = jnp.uint32


def _mul_24x31(m, n):
  """``m * n`` as a (hi, lo) pair of uint32 for ``m < 2**24`` and ``n < 2**31``."""
  m0, m1 = m & _U32(0xFFF), m >> _U32(12)
  n0, n1 = n & _U32(0xFFFF), n >> _U32(16)
  hi, lo = jnp.zeros_like(m), jnp.zeros_like(m)
  for x, shift in ((m0 * n0, 0), (m1 * n0, 12), (m0 * n1, 16), (m1 * n1, 28)):  # each < 2**28
    t_lo = x << _U32(shift)
    t_hi = x >> _U32(32 - shift) if shift else jnp.zeros_like(x)
    new_lo = lo + t_lo
    hi = hi + t_hi + (new_lo < lo).astype(_U32)
    lo = new_lo
  return hi, lo


def _round_to_53_bits(hi, lo):
  """Rounds a product below ``2**55`` to 53 significant bits, ties to even (as float64)."""
  r = jnp.where(hi >= _U32(1 << 22), _U32(2), jnp.where(hi >= _U32(1 << 21), _U32(1), _U32(0)))
  unit = _U32(1) << r
  low = lo & (unit - _U32(1))
  half = unit >> _U32(1)
  odd = ((lo >> r) & _U32(1)) == _U32(1)
  up = (r > 0) & ((low > half) | ((low == half) & odd))
  lo_t = lo - low
  new_lo = lo_t + jnp.where(up, unit, _U32(0))
  return hi + (new_lo < lo_t).astype(_U32), new_lo


def _shift_right(hi, lo, k):
  """``(hi, lo) >> k`` truncated to uint32, for ``k >= 1`` (0 for ``k >= 64``)."""
  small = k < _U32(32)
  ks = jnp.where(small, k, _U32(1))
  kb = jnp.clip(k - _U32(32), 0, 31).astype(_U32)
  from_small = (lo >> ks) | (hi << (_U32(32) - ks))
  from_big = jnp.where(k < _U32(64), hi >> kb, _U32(0))
  return jnp.where(small, from_small, from_big)


def floor_product(s, n) -> jax.Array:
  """``floor(s * n)`` with the product rounded as float64 rounds it, as an int32.

  Args:
    s: a float scalar (traced or not; cast to float32, or used as float64 when
      it is a float64 array under x64), clipped to ``[0, 1]``; NaN counts as 0.
    n: an integer (Python int or int32 array) with ``0 <= n < 2**31``.

  Returns:
    int32 ``floor(float64(s) * n)``: for the same float32 value of ``s``, the
    count :func:`jaxprune.topk.keep_count` gives outside jit.
  """
  s = jnp.asarray(s)
  if s.dtype == jnp.float64:  # x64 enabled: the float64 product itself
    s = jnp.where(jnp.isnan(s), 0.0, jnp.clip(s, 0.0, 1.0))
    return jnp.floor(s * jnp.asarray(n, jnp.float64)).astype(jnp.int32)
  s = jnp.asarray(s, jnp.float32)
  n_u = jnp.asarray(n, jnp.int32).astype(_U32)
  bits = jax.lax.bitcast_convert_type(jnp.clip(s, 0.0, 1.0), _U32)
  exponent = (bits >> _U32(23)) & _U32(0xFF)
  fraction = bits & _U32(0x7FFFFF)
  normal = exponent > 0
  mantissa = jnp.where(normal, fraction | _U32(0x800000), fraction)
  shift = jnp.where(normal, _U32(150) - exponent, _U32(149))  # s = mantissa * 2**-shift
  hi, lo = _round_to_53_bits(*_mul_24x31(mantissa, n_u))
  count = _shift_right(hi, lo, jnp.maximum(shift, _U32(1))).astype(jnp.int32)
  count = jnp.where(s >= 1.0, n_u.astype(jnp.int32), count)
  return jnp.where((s > 0) & ~jnp.isnan(s), count, jnp.int32(0))
