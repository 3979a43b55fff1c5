"""One-shot solvers against straightforward numpy versions of the papers' algorithms."""

import math

import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from jaxprune import oneshot, structured


def _np_wanda(w, x, sparsity=None, nm=None):
  """Wanda (Sun et al. 2023), torch layout as in the reference: W (out, in)."""
  wt = w.T.astype(np.float64)
  metric = np.abs(wt) * np.sqrt(np.sum(x.astype(np.float64) ** 2, axis=0))[None, :]
  prune = np.zeros_like(wt, dtype=bool)
  if nm is not None:
    n, m = nm
    for g in range(0, wt.shape[1], m):
      tmp = metric[:, g : g + m]
      idx = np.argsort(tmp, axis=1, kind="stable")[:, : m - n]
      np.put_along_axis(prune[:, g : g + m], idx, True, axis=1)
  else:
    k = math.floor(sparsity * wt.shape[1])
    idx = np.argsort(metric, axis=1, kind="stable")[:, :k]
    np.put_along_axis(prune, idx, True, axis=1)
  wt = np.where(prune, 0.0, wt)
  return wt.T, ~prune.T


def _np_sparsegpt(w, x, sparsity=None, nm=None, blocksize=128, percdamp=0.01):
  """SparseGPT (Frantar & Alistarh 2023), following the reference prune loop (W (out, in))."""
  W = w.T.astype(np.float64).copy()
  cols = W.shape[1]
  H = 2.0 / x.shape[0] * x.T.astype(np.float64) @ x.astype(np.float64)
  dead = np.diag(H) == 0
  H[dead, dead] = 1
  W[:, dead] = 0
  H[np.arange(cols), np.arange(cols)] += percdamp * np.mean(np.diag(H))
  Hinv = np.linalg.cholesky(np.linalg.inv(H)).T
  keep = np.zeros_like(W, dtype=bool)
  for i1 in range(0, cols, blocksize):
    i2 = min(i1 + blocksize, cols)
    W1 = W[:, i1:i2].copy()
    Q1 = np.zeros_like(W1)
    Err1 = np.zeros_like(W1)
    Hinv1 = Hinv[i1:i2, i1:i2]
    prune1 = np.zeros_like(W1, dtype=bool)
    if nm is None:
      tmp = W1**2 / np.diag(Hinv1)[None, :] ** 2
      k = math.floor(sparsity * tmp.size)
      # the lowest k, by the transposed (in, out) flat order used by jaxprune
      order = np.argsort(tmp.T.reshape(-1), kind="stable")[:k]
      pt = np.zeros(tmp.size, bool)
      pt[order] = True
      prune1 = pt.reshape(tmp.T.shape).T
    n, m = nm if nm is not None else (0, 0)
    for i in range(i2 - i1):
      w_ = W1[:, i]
      d = Hinv1[i, i]
      if nm is not None and i % m == 0:
        tmp = W1[:, i : i + m] ** 2 / np.diag(Hinv1)[i : i + m][None, :] ** 2
        idx = np.argsort(tmp, axis=1, kind="stable")[:, : m - n]
        np.put_along_axis(prune1[:, i : i + m], idx, True, axis=1)
      q = w_.copy()
      q[prune1[:, i]] = 0
      Q1[:, i] = q
      err1 = (w_ - q) / d
      W1[:, i:] -= np.outer(err1, Hinv1[i, i:])
      Err1[:, i] = err1
    W[:, i1:i2] = Q1
    W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    keep[:, i1:i2] = ~prune1
  return W.T, keep.T


def _layer(seed, d_in, d_out, n=256, dead=(3, 17)):
  rng = np.random.default_rng(seed)
  scales = np.exp(rng.normal(size=d_in)).astype(np.float32)
  x = (rng.normal(size=(n, d_in)) * scales + 0.3 * rng.normal(size=(n, 1))).astype(np.float32)
  for j in dead:
    if j < d_in:
      x[:, j] = 0.0
  w = rng.normal(size=(d_in, d_out)).astype(np.float32)
  return w, x


def _stats(x):
  x = jnp.asarray(x)
  return jnp.sum(x * x, axis=0), 2.0 / x.shape[0] * x.T @ x


@pytest.mark.parametrize("target", [dict(sparsity=0.5), dict(sparsity_type="2:4")])
def test_wanda_matches_numpy(target):
  w, x = _layer(0, 64, 24)
  sq, _ = _stats(x)
  new, mask = oneshot.wanda(w, sq, **target)
  nm = (2, 4) if "sparsity_type" in target else None
  ref_w, ref_mask = _np_wanda(w, x, target.get("sparsity"), nm)
  np.testing.assert_array_equal(np.asarray(mask), ref_mask)
  np.testing.assert_allclose(np.asarray(new), ref_w, rtol=0, atol=0)


@pytest.mark.parametrize(
  "d_in,target",
  [
    (320, dict(sparsity=0.5)),
    (320, dict(sparsity_type="2:4")),
    pytest.param(200, dict(sparsity=0.7), marks=pytest.mark.slow),
  ],
)
def test_sparsegpt_matches_numpy(d_in, target):
  # 320 = two blocks of 128 and a partial block of 64, with two dead inputs.
  w, x = _layer(1, d_in, 40, n=512)
  _, h = _stats(x)
  new, mask, info = oneshot.sparsegpt(w, h, **target, return_info=True)
  nm = (2, 4) if "sparsity_type" in target else None
  ref_w, ref_mask = _np_sparsegpt(w, x, target.get("sparsity"), nm)
  agree = np.mean(np.asarray(mask) == ref_mask)
  assert agree > 0.995, agree  # float32 vs float64: rare near-ties may flip
  rel = np.linalg.norm(np.asarray(new) - ref_w) / np.linalg.norm(ref_w)
  assert rel < 3e-2, rel  # a few flipped near-ties move later rows slightly
  e, e_ref = (np.sum((x @ (w - v)) ** 2) for v in (np.asarray(new), ref_w))
  assert abs(e - e_ref) < 1e-2 * e_ref
  assert int(info.dead) == 2 and not bool(info.damp_increased)
  assert np.all(np.asarray(new)[[3, 17]] == 0)


def test_sparsegpt_singular_hessian_gets_more_damping():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(4, 32)).astype(np.float32)  # rank 4 << 32
  h = 2.0 / 4 * x.T @ x
  w = rng.normal(size=(32, 8)).astype(np.float32)
  new, mask, info = oneshot.sparsegpt(w, h, sparsity=0.5, damp=0.0, return_info=True)
  assert np.all(np.isfinite(np.asarray(new)))
  assert bool(info.damp_increased) and float(info.damp) > 0
  assert int(np.sum(~np.asarray(mask))) == 16 * 8


@settings(max_examples=3, deadline=None)
@given(
  d_in=st.sampled_from([24, 136]),
  d_out=st.just(5),
  s=st.sampled_from([0.0, 0.3, 0.5, 0.9]),
  seed=st.integers(0, 100),
)
def test_exact_counts(d_in, d_out, s, seed):
  w, x = _layer(seed, d_in, d_out, n=64)
  sq, h = _stats(x)
  k = d_in - math.floor(s * d_in)
  _, m = oneshot.wanda(w, sq, sparsity=s)
  np.testing.assert_array_equal(np.asarray(m).sum(0), k)
  _, m = oneshot.magnitude(w, sparsity=s)
  assert int(np.asarray(m).sum()) == w.size - math.floor(s * w.size)
  new, m = oneshot.sparsegpt(w, h, sparsity=s, blocksize=16)
  expect = sum(
    min(16, d_in - i) * d_out - math.floor(s * min(16, d_in - i) * d_out)
    for i in range(0, d_in, 16)
  )
  assert int(np.asarray(m).sum()) == expect
  assert np.all(np.asarray(new)[~np.asarray(m)] == 0)
  for solver in ("magnitude", "wanda", "sparsegpt"):
    args = {"magnitude": (w,), "wanda": (w, sq), "sparsegpt": (w, h)}[solver]
    new, m = getattr(oneshot, solver)(*args, sparsity_type="2:4")
    assert structured.is_nm_sparse(np.asarray(m), 2, 4)
    assert np.all(np.asarray(m).reshape(d_in // 4, 4, d_out).sum(1) == 2)
    assert np.all(np.asarray(new)[~np.asarray(m)] == 0)


@settings(max_examples=3, deadline=None)
@given(
  seed=st.integers(0, 1000), target=st.sampled_from([dict(sparsity=0.5), dict(sparsity_type="2:4")])
)
def test_reconstruction_error_ordering(seed, target):
  w, x = _layer(seed, 64, 32, n=256, dead=())
  sq, h = _stats(x)

  def err(new):
    return float(np.sum((x @ w - x @ np.asarray(new)) ** 2))

  e_sgpt = err(oneshot.sparsegpt(w, h, **target)[0])
  e_wanda = err(oneshot.wanda(w, sq, **target)[0])
  e_mag = err(oneshot.magnitude(w, **target)[0])
  assert e_sgpt < e_wanda < e_mag


def test_bad_targets_raise():
  w = np.ones((8, 4), np.float32)
  with pytest.raises(ValueError, match="sparsity"):
    oneshot.magnitude(w)
  with pytest.raises(ValueError, match="sparsity"):
    oneshot.magnitude(w, sparsity=1.0)
  with pytest.raises(ValueError, match="divisible"):
    oneshot.magnitude(np.ones((6, 4)), sparsity_type="2:4")
  with pytest.raises(ValueError, match="N:M"):
    oneshot.wanda(w, np.ones(8), sparsity_type="block:2x2")
  with pytest.raises(ValueError, match="hessian"):
    oneshot.sparsegpt(w, np.eye(4), sparsity=0.5)
