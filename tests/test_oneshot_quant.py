"""Quantisation on the Q4_0/Q8_0 grid: round-to-nearest, GPTQ and the joint SparseGPT solver."""

import hypothesis.strategies as st
import jax
import numpy as np
import pytest
from hypothesis import given, settings

from jaxprune import oneshot
from jaxprune.oneshot import Quantized, QuantSpec, dequantize, quantize_rtn

QMAX = {4: 7, 8: 127}
LOW = {4: -8, 8: -127}


@st.composite
def kernels(draw):
  """A random (in, out) kernel, a QuantSpec that fits it, and a random mask."""
  bits = draw(st.sampled_from([4, 8]))
  group = draw(st.sampled_from([None, 4, 8, 32]))
  n_groups = draw(st.integers(1, 4))
  d_in = (group or draw(st.sampled_from([8, 24, 40]))) * n_groups
  d_out = draw(st.integers(1, 9))
  seed = draw(st.integers(0, 2**16))
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(d_in, d_out)).astype(np.float32) * draw(st.sampled_from([1e-2, 1.0, 30.0]))
  mask = rng.random((d_in, d_out)) < draw(st.sampled_from([0.3, 0.7, 1.0]))
  return w, QuantSpec(bits, group), mask


def _check_grid(q: Quantized, spec: QuantSpec, d_in: int, d_out: int):
  g = spec.group_size or d_in
  codes, scales = np.asarray(q.codes), np.asarray(q.scales)
  assert codes.dtype == np.int8 and codes.shape == (d_in, d_out)
  assert scales.dtype == np.float32 and scales.shape == (d_in // g, d_out)
  assert codes.min() >= LOW[spec.bits] and codes.max() <= QMAX[spec.bits]
  np.testing.assert_array_equal(scales.astype(np.float16).astype(np.float32), scales)
  assert np.all(scales >= 0)
  expect = codes.astype(np.float32) * np.repeat(scales, g, axis=0)
  np.testing.assert_array_equal(np.asarray(dequantize(q)), expect)
  assert q.spec == spec


@settings(max_examples=20, deadline=None)
@given(kernels())
def test_rtn_grid_invariants(case):
  w, spec, mask = case
  d_in, d_out = w.shape
  g = spec.group_size or d_in
  for m in (None, mask):
    q = quantize_rtn(w, spec, mask=m)
    _check_grid(q, spec, d_in, d_out)
    kept = np.ones_like(w, bool) if m is None else m
    deq = np.asarray(dequantize(q))
    assert np.all(deq[~kept] == 0.0) and np.all(np.asarray(q.codes)[~kept] == 0)
    # round to nearest: within half a step of the (kept) weight
    step = np.repeat(np.asarray(q.scales), g, axis=0)
    assert np.all(np.abs(deq - np.where(kept, w, 0)) <= 0.5 * step * (1 + 1e-3))
    # the scale is the group's absmax / qmax: its largest kept weight gets code +-qmax
    wk = np.abs(np.where(kept, w, 0)).reshape(d_in // g, g, d_out)
    top = np.abs(np.asarray(q.codes)).reshape(d_in // g, g, d_out).max(axis=1)
    np.testing.assert_array_equal(top[wk.max(axis=1) > 0], QMAX[spec.bits])


def test_rtn_is_jittable_and_zero_groups_stay_zero():
  w = np.random.default_rng(0).normal(size=(64, 5)).astype(np.float32)
  w[:32, 2] = 0.0
  spec = QuantSpec(4, 32)
  eager = quantize_rtn(w, spec)
  jitted = jax.jit(quantize_rtn, static_argnums=1)(w, spec)
  np.testing.assert_array_equal(eager.codes, jitted.codes)
  np.testing.assert_array_equal(eager.scales, jitted.scales)
  assert float(eager.scales[0, 2]) == 0.0 and not np.any(np.asarray(eager.codes)[:32, 2])


@pytest.mark.parametrize(
  "spec, kw, match",
  [
    (QuantSpec(3, 32), {}, "bits must be 4 or 8"),
    (QuantSpec(4, 24), {}, "group_size=24 must be a positive divisor of the input size 64"),
    (QuantSpec(8, 0), {}, "group_size=0"),
    (QuantSpec(4, 32), {"mask": np.ones((64, 4), bool)}, r"mask has shape \(64, 4\)"),
  ],
)
def test_rtn_errors(spec, kw, match):
  w = np.ones((64, 3), np.float32)
  with pytest.raises(ValueError, match=match):
    quantize_rtn(w, spec, **kw)


def test_rtn_rejects_nan():
  w = np.ones((64, 3), np.float32)
  w[5, 1] = np.nan
  with pytest.raises(ValueError, match="NaN/inf"):
    quantize_rtn(w, QuantSpec(4, 32))


def test_exported_names():
  for name in ("QuantSpec", "Quantized", "dequantize", "quantize_rtn"):
    assert name in oneshot.__all__ and hasattr(oneshot, name)
