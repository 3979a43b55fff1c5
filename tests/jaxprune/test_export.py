"""Export: BCOO, compressed N:M, compressed checkpoints."""

import io
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental import sparse

from jaxprune import export as E
from jaxprune import structured as S


def _mlp_params(rng, sizes=((784, 1024), (1024, 10))):
  params = {}
  for i, (a, b) in enumerate(sizes):
    params[f"Dense_{i}"] = {
      "kernel": rng.normal(size=(a, b)).astype(np.float32),
      "bias": rng.normal(size=b).astype(np.float32),
    }
  return params


def _magnitude_masks(params, sparsity):
  def make(p):
    if p.ndim < 2:
      return True
    k = p.size - int(np.floor(sparsity * p.size))
    thresh = np.sort(np.abs(p).ravel())[::-1][k - 1]
    return np.abs(p) >= thresh

  return jax.tree.map(make, params)


# ---------------------------------------------------------------------------
# BCOO


def test_to_bcoo_round_trip():
  rng = np.random.default_rng(0)
  params = _mlp_params(rng, ((12, 8), (8, 3)))
  masks = _magnitude_masks(params, 0.75)
  masks["Dense_1"]["kernel"] = True  # not pruned: stays dense
  params["Dense_0"]["kernel"][0, :] = 0.0  # kept zeros are stored too
  masks["Dense_0"]["kernel"][0, :] = True
  out = E.to_bcoo(params, masks)
  k = out["Dense_0"]["kernel"]
  assert isinstance(k, sparse.BCOO)
  assert k.nse == int(np.sum(masks["Dense_0"]["kernel"]))
  assert out["Dense_1"]["kernel"] is params["Dense_1"]["kernel"]
  assert out["Dense_0"]["bias"] is params["Dense_0"]["bias"]
  dense = E.from_bcoo(out)
  np.testing.assert_array_equal(
    dense["Dense_0"]["kernel"], np.where(masks["Dense_0"]["kernel"], params["Dense_0"]["kernel"], 0)
  )
  x = rng.normal(size=(4, 12)).astype(np.float32)
  np.testing.assert_allclose(
    jnp.asarray(x) @ k, x @ np.asarray(dense["Dense_0"]["kernel"]), rtol=1e-5, atol=1e-5
  )


# ---------------------------------------------------------------------------
# N:M compression


@settings(max_examples=10, deadline=None, derandomize=True)
@given(
  nm=st.sampled_from([(2, 4), (1, 4), (4, 8), (1, 2), (3, 3)]),
  groups=st.integers(1, 3),
  other=st.integers(1, 3),
  conv=st.booleans(),
  seed=st.integers(0, 2**16),
)
def test_nm_compress_round_trip(nm, groups, other, conv, seed):
  n, m = nm
  rng = np.random.default_rng(seed)
  shape = (3, groups * m, other) if conv else (groups * m, other)
  axis = -2 if conv else 0
  w = rng.normal(size=shape).astype(np.float32)
  mask = np.asarray(S.structured_mask(jnp.abs(w), None, f"{n}:{m}", axis=axis))
  ws = np.where(mask, w, 0.0).astype(np.float32)
  values, indices = E.nm_compress(ws, n, m, axis=axis)
  expect = list(shape)
  expect[axis] = groups * n
  assert values.shape == tuple(expect) and indices.shape == tuple(expect)
  assert indices.dtype == jnp.uint8 and int(indices.max()) < m
  back = np.asarray(E.nm_decompress(values, indices, n, m, axis=axis))
  np.testing.assert_array_equal(back, ws)
  assert back.dtype == ws.dtype
  # With the mask given, kept entries that are zero keep their slots: some kept entries
  # are set to 0.0, and the recorded slots still mark exactly the mask.
  w0 = np.where(mask & (rng.random(shape) < 0.5), 0.0, ws).astype(np.float32)
  v2, i2 = E.nm_compress(w0, n, m, axis=axis, mask=mask)
  np.testing.assert_array_equal(np.asarray(E.nm_decompress(v2, i2, n, m, axis=axis)), w0)
  slots = np.asarray(E.nm_decompress(jnp.ones_like(v2), i2, n, m, axis=axis)) != 0
  np.testing.assert_array_equal(slots, mask)


def test_nm_compress_layout_and_errors():
  w = np.array([[0.0, 1.5, 0.0, -2.0, 3.0, 0.0, 0.0, 0.0]], np.float32).T  # (8, 1)
  v, i = E.nm_compress(w, 2, 4, axis=0)
  np.testing.assert_array_equal(np.asarray(v)[:, 0], [1.5, -2.0, 3.0, 0.0])
  np.testing.assert_array_equal(np.asarray(i)[:, 0], [1, 3, 0, 1])
  with pytest.raises(ValueError, match="not 2:4 sparse"):
    E.nm_compress(np.ones((8, 1), np.float32), 2, 4, axis=0)
  with pytest.raises(ValueError, match="divisible"):
    E.nm_compress(np.ones((6, 1), np.float32), 2, 4, axis=0)
  # jit-able (no check under tracing).
  v2, i2 = jax.jit(lambda x: E.nm_compress(x, 2, 4))(w)
  np.testing.assert_array_equal(v2, v)


# ---------------------------------------------------------------------------
# compressed checkpoints


def test_checkpoint_round_trip_exact(tmp_path):
  rng = np.random.default_rng(1)
  params = _mlp_params(rng, ((20, 16), (16, 4)))
  params["emb"] = [
    jnp.asarray(rng.normal(size=(3, 5)), jnp.bfloat16),
    jnp.arange(4, dtype=jnp.int32),
  ]
  masks = _magnitude_masks(params, 0.8)
  masks["emb"] = [True, True]
  path = tmp_path / "ckpt.jxp"
  E.save_compressed(path, params, masks)
  loaded, lmasks = E.load_compressed(path, return_masks=True)
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  for a, b, m in zip(jax.tree.leaves(params), jax.tree.leaves(loaded), jax.tree.leaves(masks)):
    assert b.dtype == jnp.asarray(a).dtype
    np.testing.assert_array_equal(np.asarray(b), np.where(m, np.asarray(a), 0))
  assert isinstance(loaded["emb"], list)
  np.testing.assert_array_equal(lmasks["Dense_0"]["kernel"], masks["Dense_0"]["kernel"])
  assert lmasks["Dense_0"]["bias"].shape == () and bool(lmasks["Dense_0"]["bias"])
  # `like` restores the exact tree structure.
  like = {"b": (params["Dense_0"], params["Dense_1"])}
  E.save_compressed(path, like)
  again = E.load_compressed(path, like=like)
  assert jax.tree.structure(again) == jax.tree.structure(like)
  with pytest.raises(ValueError, match="like"):
    E.load_compressed(path, like=params)


def test_checkpoint_int8_error_bound(tmp_path):
  rng = np.random.default_rng(2)
  params = _mlp_params(rng, ((64, 32), (32, 8)))
  params["Dense_0"]["kernel"][:, 5] = 0.0  # an all-zero channel: scale 0
  masks = _magnitude_masks(params, 0.9)
  path = tmp_path / "q.jxp"
  E.save_compressed(path, params, masks, quantize="int8")
  loaded = E.load_compressed(path)
  for name in ("Dense_0", "Dense_1"):
    w = np.where(masks[name]["kernel"], params[name]["kernel"], 0)
    q = np.asarray(loaded[name]["kernel"])
    assert np.all((q != 0) <= masks[name]["kernel"])  # pruned entries stay exactly 0
    scale = np.abs(w).max(axis=0) / 127.0  # per output channel
    err = np.abs(q - w)
    assert np.all(err <= scale / 2 * (1 + 1e-6) + 1e-7), err.max()
    assert np.any(err > 0)  # really quantised
    np.testing.assert_array_equal(loaded[name]["bias"], params[name]["bias"])  # 1-D exact


def test_checkpoint_sizes_at_90_percent(tmp_path):
  rng = np.random.default_rng(3)
  params = _mlp_params(rng)  # 784x1024 + 1024x10
  masks = _magnitude_masks(params, 0.9)
  dense = E.save_compressed(tmp_path / "dense.jxp", params)
  buf = io.BytesIO()
  np.savez(buf, **{f"{k}/{n}": v for k, d in params.items() for n, v in d.items()})
  savez = len(buf.getvalue())
  f32 = E.save_compressed(tmp_path / "f32.jxp", params, masks)
  i8 = E.save_compressed(tmp_path / "i8.jxp", params, masks, quantize="int8")
  assert f32 == os.path.getsize(tmp_path / "f32.jxp")
  for base in (dense, savez):
    assert f32 <= 0.15 * base, (f32, base)
    assert i8 <= 0.05 * base, (i8, base)


def _write_valid(tmp_path):
  rng = np.random.default_rng(4)
  params = _mlp_params(rng, ((32, 16), (16, 4)))
  path = tmp_path / "c.jxp"
  E.save_compressed(path, params, _magnitude_masks(params, 0.9))
  return path, path.read_bytes()


def test_truncated_checkpoint_raises(tmp_path):
  path, data = _write_valid(tmp_path)
  for cut in (len(data) - 1, len(data) // 2, 30, 5, 0):
    path.write_bytes(data[:cut])
    with pytest.raises(E.CheckpointError, match="truncated"):
      E.load_compressed(path)


def test_tampered_checkpoint_raises(tmp_path):
  path, data = _write_valid(tmp_path)
  for pos in (len(data) - 40, len(data) // 2, 25, len(data) - 1):
    bad = bytearray(data)
    bad[pos] ^= 0x01
    path.write_bytes(bytes(bad))
    with pytest.raises(E.CheckpointError, match="checksum"):
      E.load_compressed(path)
  path.write_bytes(b"PK\x03\x04" + data[4:])
  with pytest.raises(E.CheckpointError, match="not a jaxprune"):
    E.load_compressed(path)
  bad = bytearray(data)
  bad[8] = 99  # version field
  path.write_bytes(bytes(bad))
  with pytest.raises(E.CheckpointError, match="version 99"):
    E.load_compressed(path)


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
  path, data = _write_valid(tmp_path)
  params = _mlp_params(np.random.default_rng(5), ((8, 4),))

  def disk_full(fd):
    raise OSError("No space left on device")

  monkeypatch.setattr(E.os, "fsync", disk_full)
  with pytest.raises(OSError, match="No space"):
    E.save_compressed(path, params)
  monkeypatch.undo()
  assert path.read_bytes() == data
  assert sorted(os.listdir(tmp_path)) == ["c.jxp"]  # no temp file left behind
  with pytest.raises(TypeError, match="Dense_0/name"):
    E.save_compressed(path, {"Dense_0": {"kernel": np.ones((2, 2)), "name": np.array(["x"])}})
  assert path.read_bytes() == data
  E.load_compressed(path)  # still valid


def test_bad_arguments(tmp_path):
  params = _mlp_params(np.random.default_rng(6), ((4, 4),))
  with pytest.raises(ValueError, match="quantize"):
    E.save_compressed(tmp_path / "x", params, quantize="int4")
  with pytest.raises(ValueError, match="masks do not match params: params have"):
    E.save_compressed(tmp_path / "x", params, {"Dense_0": True})
  assert not os.listdir(tmp_path)
