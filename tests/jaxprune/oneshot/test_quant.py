"""Quantisation on the Q4_0/Q8_0 grid: round-to-nearest, GPTQ and the joint SparseGPT solver."""

import math

import flax.linen as nn
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import jaxprune
from jaxprune import oneshot
from jaxprune.oneshot import Quantized, QuantSpec, dequantize, quantize_rtn

QMAX = {4: 7, 8: 127}
FP16_TINY = 2.0**-14  # the smallest normal float16
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
  return w, QuantSpec(bits, group, draw(st.sampled_from(oneshot.SCALE_RULES))), mask


_rtn = jax.jit(lambda w, spec, mask: quantize_rtn(w, spec, mask=mask), static_argnums=1)


def _check_grid(q: Quantized, spec: QuantSpec, d_in: int, d_out: int):
  g = spec.group_size or d_in
  codes, scales = np.asarray(q.codes), np.asarray(q.scales)
  assert codes.dtype == np.int8 and codes.shape == (d_in, d_out)
  assert scales.dtype == np.float32 and scales.shape == (d_in // g, d_out)
  assert codes.min() >= LOW[spec.bits] and codes.max() <= QMAX[spec.bits]
  np.testing.assert_array_equal(scales.astype(np.float16).astype(np.float32), scales)
  if spec.scale_rule == "absmax" or spec.bits == 8:
    assert np.all(scales >= 0)
  expect = codes.astype(np.float32) * np.repeat(scales, g, axis=0)
  deq = np.asarray(dequantize(q))
  np.testing.assert_array_equal(deq, expect)
  assert not np.any(np.signbit(deq[codes == 0]))  # +0.0, also under a negative scale
  assert q.spec == spec


@settings(max_examples=20, deadline=None)
@given(kernels())
def test_rtn_grid_invariants(case):
  w, spec, mask = case
  d_in, d_out = w.shape
  g = spec.group_size or d_in
  for m in (None, mask):
    q = _rtn(w, spec, m)
    _check_grid(q, spec, d_in, d_out)
    kept = np.ones_like(w, bool) if m is None else m
    deq = np.asarray(dequantize(q))
    assert np.all(deq[~kept] == 0.0) and np.all(np.asarray(q.codes)[~kept] == 0)
    # round to nearest: within half a step of the (kept) weight, unless clipped
    step = np.abs(np.repeat(np.asarray(q.scales), g, axis=0))
    wk = np.where(kept, w, 0)
    codes = np.asarray(q.codes)
    inside = (codes > LOW[spec.bits]) & (codes < QMAX[spec.bits])
    assert np.all(np.abs(deq - wk)[inside] <= 0.5 * step[inside] * (1 + 1e-3))
    # the extreme kept weight of each group gets the extreme code
    wg = wk.reshape(d_in // g, g, d_out)
    cg = codes.reshape(d_in // g, g, d_out)
    top = np.argmax(np.abs(wg), axis=1)[:, None]  # the first of the largest, as ggml
    nonzero = np.abs(wg).max(axis=1) > 0
    if spec.bits == 4 and spec.scale_rule == "ggml":  # m / -8: code -8, the scale's sign opposite
      np.testing.assert_array_equal(np.take_along_axis(cg, top, 1)[:, 0][nonzero], -8)
      m = np.take_along_axis(wg, top, 1)[:, 0]
      assert np.all(np.sign(np.asarray(q.scales))[nonzero] == -np.sign(m)[nonzero])
    else:  # max |w| / qmax: the largest kept weight gets code +-qmax ...
      # ... where the scale is a normal float16; a subnormal one (|s| < 2^-14) is rounded
      # by up to 0.4%, and the code is the nearest on the stored grid (checked above).
      normal = np.abs(np.asarray(q.scales)) >= FP16_TINY
      np.testing.assert_array_equal(np.abs(cg).max(axis=1)[nonzero & normal], QMAX[spec.bits])


def test_rtn_codes_are_nearest_on_the_stored_float16_grid_when_the_scale_is_subnormal():
  """Groups whose int8 scale max|w| / 127 is subnormal in float16: the stored scale is up
  to 0.4% off, so max|w| / scale may round to 126, not 127. Codes are the nearest points
  of the stored grid (ggml's reference quantiser divides by the float32 scale instead and
  writes 127, further from the weight)."""
  amax = np.arange(1e-5, 1e-3, 2.5e-6, dtype=np.float32)  # one group per column
  w = np.stack([amax, amax / 3, -amax / 5, 0 * amax])
  q = quantize_rtn(w, QuantSpec(8, 4, "ggml"))
  codes, s = np.asarray(q.codes)[0], np.asarray(q.scales)[0]
  low = codes == 126
  assert low.any()
  a, s = amax[low], s[low]
  assert np.all((0 < s) & (s < FP16_TINY))  # subnormal float16
  np.testing.assert_array_equal(s, (a / 127).astype(np.float16).astype(np.float32))
  # nearest on the stored grid: 126 * s is closer to the weight than 127 * s
  assert np.all(np.abs(126 * s - a) <= np.abs(127 * s - a))
  assert np.all(np.abs(np.asarray(dequantize(q))[0][low] - a) <= 0.5 * s)


@settings(max_examples=30, deadline=None)
@given(
  st.sampled_from([4, 8, 16, 32, 64]),
  st.integers(1, 3),
  st.integers(1, 6),
  st.integers(0, 2**16),
  st.sampled_from([0.5, 1.0]),
)
def test_ggml_int4_codes_and_error_bound(group, n_groups, d_out, seed, density):
  """ggml's Q4_0 rule: codes in [-8, 7], |w - q| <= |d| / 2 wherever not clipped at 7,
  pruned entries exactly +0.0."""
  rng = np.random.default_rng(seed)
  w = (rng.standard_normal((group * n_groups, d_out)) * 10.0 ** rng.integers(-3, 3)).astype(
    np.float32
  )
  mask = rng.random(w.shape) < density
  q = quantize_rtn(w, QuantSpec(4, group), mask=mask)
  codes, deq = np.asarray(q.codes), np.asarray(dequantize(q))
  assert codes.min() >= -8 and codes.max() <= 7
  d = np.abs(np.repeat(np.asarray(q.scales), group, axis=0))
  wk = np.where(mask, w, 0)
  s = np.repeat(np.asarray(q.scales), group, axis=0)
  clipped = (codes == 7) & (np.divide(wk, s, out=np.zeros_like(wk), where=s != 0) > 7.5)
  assert np.all(np.abs(deq - wk)[~clipped] <= 0.5 * d[~clipped] * (1 + 1e-6))
  assert np.all(deq[~mask] == 0.0) and not np.any(np.signbit(deq[~mask]))


def test_ggml_int4_represents_the_extreme_weight_exactly():
  # extremes whose / -8 is a float16 value: the old max/7 rule gives 7 * fp16(m / 7) != m
  w = np.random.default_rng(0).uniform(-0.7, 0.7, size=(64, 4)).astype(np.float32)
  w[3, 0], w[40, 0], w[17, 1], w[33, 2], w[63, 3] = 1.0, -3.0, -2.5, 6.0, 0.75
  q = quantize_rtn(w, QuantSpec(4, 32))
  deq, codes = np.asarray(dequantize(q)), np.asarray(q.codes)
  for i, j in [(3, 0), (40, 0), (17, 1), (33, 2), (63, 3)]:
    assert codes[i, j] == -8 and deq[i, j] == w[i, j], (i, j)
  np.testing.assert_array_equal(np.asarray(q.scales)[:, 0], [-0.125, 0.375])
  old = np.asarray(dequantize(quantize_rtn(w, QuantSpec(4, 32, "absmax"))))
  assert old[3, 0] != 1.0 and abs(old[3, 0] - 1.0) < 1e-3


def test_int8_rules_agree_and_bad_rule_is_named():
  w = np.random.default_rng(1).normal(size=(64, 5)).astype(np.float32)
  a, b = quantize_rtn(w, QuantSpec(8, 32)), quantize_rtn(w, QuantSpec(8, 32, "absmax"))
  np.testing.assert_array_equal(a.codes, b.codes)
  np.testing.assert_array_equal(a.scales, b.scales)
  np.testing.assert_array_equal(
    a.scales, (np.abs(w).reshape(2, 32, 5).max(1) / 127).astype(np.float16).astype(np.float32)
  )
  with pytest.raises(ValueError, match="quantize_rtn: scale_rule must be one of"):
    quantize_rtn(w, QuantSpec(4, 32, "minmax"))


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
  for name in (
    "QuantSpec",
    "Quantized",
    "dequantize",
    "quantize_rtn",
    "gptq",
    "sparsegpt_quant",
    "compress_sequential",
  ):
    assert name in oneshot.__all__ and hasattr(oneshot, name)


# --- GPTQ and the joint solver -------------------------------------------------------------


def _calibration(seed, d_in, n=256):
  """Correlated inputs (a random mixing plus noise) and their Hessian 2/n X^T X."""
  rng = np.random.default_rng(seed)
  mix = rng.normal(size=(d_in, d_in)) / math.sqrt(d_in)
  x = rng.normal(size=(n, d_in)) @ mix + 0.1 * rng.normal(size=(n, d_in))
  x[:, 1] = 0.0  # a dead input
  x = x.astype(np.float32)
  return x, (2.0 / n) * x.T @ x


def _err(x, w, q):
  return float(np.sum((x.astype(np.float64) @ (w - np.asarray(q, np.float64))) ** 2))


@st.composite
def solves(draw):
  bits = draw(st.sampled_from([4, 8]))
  group = draw(st.sampled_from([None, 8, 16]))
  d_in = draw(st.sampled_from([32, 48]))
  d_out = draw(st.sampled_from([3, 8]))
  seed = draw(st.integers(0, 2**16))
  rule = draw(st.sampled_from(oneshot.SCALE_RULES))
  return bits, group, d_in, d_out, seed, rule


@settings(max_examples=4, deadline=None)
@given(solves(), st.sampled_from([0.3, 1.0]))
def test_gptq_grid_invariants(case, density):
  bits, group, d_in, d_out, seed, rule = case
  spec = QuantSpec(bits, group, rule)
  x, h = _calibration(seed, d_in)
  rng = np.random.default_rng(seed + 1)
  w = rng.normal(size=(d_in, d_out)).astype(np.float32)
  mask = rng.random(w.shape) < density
  q, info = oneshot.gptq(w, h, spec, mask=mask, blocksize=16)
  _check_grid(q, spec, d_in, d_out)
  codes = np.asarray(q.codes)
  assert np.all(codes[~mask] == 0) and np.all(np.asarray(dequantize(q))[~mask] == 0.0)
  assert np.all(codes[1] == 0) and int(info.dead) == 1  # the dead input is zeroed


@settings(max_examples=5, deadline=None)
@given(solves(), st.sampled_from(["0.5", "0.3", "2:4", "1:8"]))
def test_joint_solver_grid_and_exact_counts(case, target):
  bits, group, d_in, d_out, seed, rule = case
  spec = QuantSpec(bits, group, rule)
  x, h = _calibration(seed, d_in)
  w = np.random.default_rng(seed + 1).normal(size=(d_in, d_out)).astype(np.float32)
  kw = {"sparsity_type": target} if ":" in target else {"sparsity": float(target)}
  q, mask, _ = oneshot.sparsegpt_quant(w, h, spec, **kw, blocksize=16)
  _check_grid(q, spec, d_in, d_out)
  mask, codes = np.asarray(mask), np.asarray(q.codes)
  assert np.all(codes[~mask] == 0) and np.all(np.asarray(dequantize(q))[~mask] == 0.0)
  if ":" in target:
    n, m = map(int, target.split(":"))
    assert jaxprune.structured.is_nm_sparse(mask, n, m)
    np.testing.assert_array_equal(mask.reshape(d_in // m, m, d_out).sum(1), n)
  else:
    s = float(target)
    for b in range(0, d_in, 16):  # blocks of 16 rows (blocksize is a multiple of the group)
      block = mask[b : b + 16]
      assert block.sum() == block.size - math.floor(s * block.size)


def _np_gptq(w, h, bits, group, blocksize=128, percdamp=0.01, rule="ggml"):
  """GPTQ (Frantar et al. 2022) after the reference loop, in float64, W (out, in)."""
  qmax, lo = QMAX[bits], LOW[bits]
  W = w.T.astype(np.float64).copy()
  cols = W.shape[1]
  H = h.astype(np.float64).copy()
  dead = np.diag(H) == 0
  H[dead, dead] = 1
  W[:, dead] = 0
  H[np.arange(cols), np.arange(cols)] += percdamp * np.mean(np.diag(H))
  Hinv = np.linalg.cholesky(np.linalg.inv(H)).T
  Q = np.zeros_like(W)
  codes = np.zeros(W.shape, np.int64)
  scale = None
  for i1 in range(0, cols, blocksize):
    i2 = min(i1 + blocksize, cols)
    W1, Err1 = W[:, i1:i2].copy(), np.zeros((W.shape[0], i2 - i1))
    Hinv1 = Hinv[i1:i2, i1:i2]
    for i in range(i2 - i1):
      if (i1 + i) % group == 0:  # the group's scale from its current weights
        rows = W1[:, i : i + group]
        if rule == "ggml" and bits == 4:  # ggml's Q4_0: the signed extreme / -8
          s = rows[np.arange(len(rows)), np.argmax(np.abs(rows), axis=1)] / -8
        else:
          s = np.abs(rows).max(axis=1) / qmax
        scale = s.astype(np.float16).astype(np.float64)
      w_, d = W1[:, i], Hinv1[i, i]
      c = np.clip(np.round(np.divide(w_, scale, out=np.zeros_like(w_), where=scale != 0)), lo, qmax)
      q = c * scale
      Q[:, i1 + i], codes[:, i1 + i] = q, c
      err = (w_ - q) / d
      W1[:, i:] -= np.outer(err, Hinv1[i, i:])
      Err1[:, i] = err
    W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
  return Q.T, codes.T


@pytest.mark.parametrize("rule", ["ggml", "absmax"])
def test_gptq_matches_numpy_reference(rule):
  x, h = _calibration(3, 64)
  w = np.random.default_rng(4).normal(size=(64, 6)).astype(np.float32)
  q, _ = oneshot.gptq(w, h, QuantSpec(4, 16, rule), blocksize=32)
  ref, ref_codes = _np_gptq(w, h, 4, 16, blocksize=32, rule=rule)
  # float32 against float64: a few codes at a rounding boundary may differ
  assert np.mean(np.asarray(q.codes) == ref_codes) >= 0.97
  assert abs(_err(x, w, dequantize(q)) - _err(x, w, ref)) <= 0.05 * _err(x, w, ref)


@pytest.mark.parametrize(
  "spec", [QuantSpec(4, 32), QuantSpec(8, 32), QuantSpec(4, None), QuantSpec(4, 32, "absmax")]
)
def test_gptq_reconstructs_better_than_rtn(spec):
  x, h = _calibration(0, 128)
  w = np.random.default_rng(1).normal(size=(128, 16)).astype(np.float32)
  w[1] = 0.0  # a dead input carries no weight in either
  q, _ = oneshot.gptq(w, h, spec)
  e_gptq, e_rtn = _err(x, w, dequantize(q)), _err(x, w, dequantize(quantize_rtn(w, spec)))
  assert e_gptq <= e_rtn, (e_gptq, e_rtn)


@pytest.mark.parametrize("target", [{"sparsity": 0.5}, {"sparsity_type": "2:4"}])
def test_joint_solver_reconstructs_better_than_prune_then_rtn(target):
  x, h = _calibration(2, 128)
  w = np.random.default_rng(3).normal(size=(128, 16)).astype(np.float32)
  spec = QuantSpec(4, 32)
  pruned, mask = oneshot.sparsegpt(w, h, **target)
  two_step = dequantize(quantize_rtn(pruned, spec, mask=mask))
  q, joint_mask, _ = oneshot.sparsegpt_quant(w, h, spec, **target)
  e_joint, e_two = _err(x, w, dequantize(q)), _err(x, w, two_step)
  assert e_joint <= e_two, (e_joint, e_two)
  assert int(np.sum(joint_mask)) == int(np.sum(mask))


@pytest.mark.parametrize(
  "call, match",
  [
    (lambda w, h: oneshot.gptq(w, h, QuantSpec(2, 32)), "gptq: bits must be 4 or 8"),
    (lambda w, h: oneshot.gptq(w, h, QuantSpec(4, 48)), "gptq: group_size=48"),
    (lambda w, h: oneshot.gptq(w, h[:8], QuantSpec(4, 32)), "gptq: hessian has shape"),
    (
      lambda w, h: oneshot.gptq(w, h, QuantSpec(4), mask=np.ones((64,), bool)),
      r"gptq: mask has shape \(64,\)",
    ),
    (
      lambda w, h: oneshot.sparsegpt_quant(w, h, QuantSpec(8, 7), 0.5),
      "sparsegpt_quant: group_size=7",
    ),
    (lambda w, h: oneshot.sparsegpt_quant(w, h, QuantSpec(4), 1.5), "sparsity must be in"),
    (
      lambda w, h: oneshot.gptq(np.where(np.eye(64, 4) > 0, np.inf, w), h, QuantSpec(4)),
      "gptq: 4 NaN/inf",
    ),
  ],
)
def test_solver_errors(call, match):
  w = np.ones((64, 4), np.float32)
  h = np.eye(64, dtype=np.float32)
  with pytest.raises(ValueError, match=match):
    call(w, h)


# --- the layer-sequential driver -----------------------------------------------------------


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(32, name="up")(x))
    return x + nn.Dense(16, use_bias=False, name="down")(h)


@pytest.fixture(scope="module")
def two_blocks():
  x = jax.random.normal(jax.random.key(0), (4, 8, 16)) @ jax.random.normal(
    jax.random.key(1), (16, 16)
  )
  blocks = [Block().init(jax.random.key(i + 2), x)["params"] for i in range(2)]
  return (lambda p, x: Block().apply({"params": p}, x)), blocks, [x[:2], x[2:]]


@pytest.mark.parametrize(
  "method, target, quantizer",
  [
    ("none", {}, "gptq"),
    ("none", {}, "rtn"),
    ("sparsegpt", {"sparsity": 0.5}, "gptq"),
    ("wanda", {"sparsity_type": "2:4"}, "gptq"),
    ("magnitude", {"sparsity": 0.5}, "rtn"),
  ],
)
def test_compress_sequential(two_blocks, method, target, quantizer):
  fn, blocks, xs = two_blocks
  spec = QuantSpec(4, 16)
  new, masks, quants, out = oneshot.compress_sequential(
    fn, blocks, xs, method, quant=spec, quantizer=quantizer, log=lambda s: None, **target
  )
  assert len(new) == len(masks) == len(quants) == 2 and len(out) == 2
  for b, m, q, old in zip(new, masks, quants, blocks):
    assert set(q) == {"up/kernel", "down/kernel"}
    for layer in ("up", "down"):
      kernel = np.asarray(b[layer]["kernel"])
      np.testing.assert_array_equal(kernel, np.asarray(dequantize(q[f"{layer}/kernel"])))
      _check_grid(q[f"{layer}/kernel"], spec, *kernel.shape)
      mask = np.asarray(m[layer]["kernel"])
      if method == "none":
        assert mask.ndim == 0
      else:
        assert np.all(kernel[~mask] == 0.0) and mask.mean() == 0.5
    np.testing.assert_array_equal(b["up"]["bias"], old["up"]["bias"])
  # the outputs are those of the compressed blocks
  y = [fn(new[1], fn(new[0], x)) for x in xs]
  assert len(xs) == 2
  for got, want in zip(out, y):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_prune_sequential_equals_compress_without_quant(two_blocks):
  fn, blocks, xs = two_blocks
  a, ma, ya = oneshot.prune_sequential(fn, blocks, xs, "sparsegpt", 0.5, log=lambda s: None)
  b, mb, qb, yb = oneshot.compress_sequential(fn, blocks, xs, "sparsegpt", 0.5, log=lambda s: None)
  assert qb == [{}, {}]
  for u, v in zip(jax.tree.leaves((a, ma, ya)), jax.tree.leaves((b, mb, yb))):
    np.testing.assert_array_equal(u, v)


def test_compress_sequential_errors(two_blocks):
  fn, blocks, xs = two_blocks
  quiet = {"log": lambda s: None}
  with pytest.raises(ValueError, match="block 0: down/kernel: group_size=24 .* input size 32"):
    oneshot.compress_sequential(fn, blocks, xs, "none", quant=QuantSpec(4, 8 * 3), **quiet)
  bad = jax.tree.map(lambda a: a, blocks)
  bad[1] = {
    **bad[1],
    "up": {**bad[1]["up"], "kernel": bad[1]["up"]["kernel"].at[0, 0].set(jnp.nan)},
  }
  with pytest.raises(ValueError, match="block 1: up/kernel: 1 NaN/inf"):
    oneshot.compress_sequential(fn, bad, xs, "none", quant=QuantSpec(8, 16), **quiet)
  with pytest.raises(ValueError, match="quant: bits must be 4 or 8"):
    oneshot.compress_sequential(fn, blocks, xs, "none", quant=QuantSpec(5), **quiet)
  with pytest.raises(ValueError, match="quantizer must be one of"):
    oneshot.compress_sequential(fn, blocks, xs, "none", quant=QuantSpec(4), quantizer="awq")
  with pytest.raises(ValueError, match="method='none' needs quant"):
    oneshot.compress_sequential(fn, blocks, xs, "none")
  with pytest.raises(ValueError, match="method must be"):
    oneshot.compress_sequential(fn, blocks, xs, "obs", 0.5, quant=QuantSpec(4))
