"""The rounding rule inside jit: floor(s * n) exact for a traced float32 s (jaxprune.rounding)."""

import math

import jax
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxprune.masks import keep_count_of
from jaxprune.rounding import floor_product
from jaxprune.topk import keep_count

_floor_product_jit = jax.jit(jax.vmap(floor_product))
_float32_in_unit = st.floats(0.0, 1.0, width=32, exclude_max=True)
_counts = st.one_of(st.integers(0, 1000), st.integers(0, 2**31 - 1), st.just(2**31 - 1))


@settings(max_examples=20)
@given(cases=st.lists(st.tuples(_float32_in_unit, _counts), min_size=1, max_size=64))
def test_floor_product_under_jit_is_the_float64_rule(cases):
  s = np.asarray([c[0] for c in cases], np.float32)
  n = np.asarray([c[1] for c in cases], np.int32)
  got = np.asarray(_floor_product_jit(s, n))
  expected = [math.floor(float(a) * int(b)) for a, b in zip(s, n)]
  np.testing.assert_array_equal(got, expected)
  keep = np.asarray(jax.jit(jax.vmap(keep_count_of, (None, 0)), static_argnums=0)(1000, s))
  np.testing.assert_array_equal(keep, [keep_count(1000, float(a)) for a in s])


def test_floor_product_edges():
  f = jax.jit(floor_product)
  # float64 rounds this 55-bit product up to the next integer; the rule follows float64.
  s, n = np.float32(0.74402136), 1462526562
  assert (int(s.view(np.uint32) & 0x7FFFFF | 0x800000) * n) >> 24 == 1088150995
  assert int(f(s, n)) == math.floor(float(s) * n) == 1088150996
  largest_below_one = np.nextafter(np.float32(1), np.float32(0))
  for s, n in [(0.0, 7), (1.0, 7), (largest_below_one, 2**31 - 1), (np.float32(1e-45), 2**31 - 1)]:
    assert int(f(np.float32(s), n)) == math.floor(float(np.float32(s)) * n)
  assert int(f(np.float32("nan"), 7)) == 0 and int(f(np.float32(-0.5), 7)) == 0
