"""Exporting sparse parameters: BCOO, compressed N:M, compressed checkpoints.

* :func:`to_bcoo` / :func:`from_bcoo`: pruned leaves as
  ``jax.experimental.sparse.BCOO`` (coordinate format), dense leaves unchanged.
* :func:`nm_compress` / :func:`nm_decompress`: the compressed N:M layout of
  sparse tensor cores -- per group of ``M`` along the input axis, the ``N`` kept
  values and their positions in the group (Mishra et al. 2021, "Accelerating
  Sparse Deep Neural Networks"). The round trip is exact.
* :func:`save_compressed` / :func:`load_compressed`: a self-describing
  checkpoint holding only the kept values of each pruned leaf plus a packed
  bitmask (``np.packbits``), optionally with int8 symmetric per-output-channel
  quantisation, deflate-compressed and protected by a SHA-256 checksum.

File format (version 1), all integers little-endian::

  magic        8 bytes   b"JXPRUNE\\0"
  version      uint32    1
  header_len   uint64
  header       JSON, UTF-8 (format, version, payload_size, leaves:
               [{path, keys, shape, dtype, encoding, quant, segments}])
  payload      the leaf segments, each compressed on its own
  sha256       32 bytes over everything above

Each leaf is ``"dense"`` (raw bytes) or ``"masked"`` (packed bitmask + kept
values in row-major order); with ``quant="int8"`` the values are int8 codes
plus one float32 scale per output channel (last axis), ``scale =
max|kept values of the channel| / 127``, so every reconstructed value is within
``scale / 2`` of the original. Each segment records its codec: ``"lzma"`` for
bitmasks (close to the entropy of a random mask, about 0.5 bit per entry at
90% sparsity), ``"zlib"`` for values, ``"raw"`` when compressing does not help. A truncated, tampered or foreign file raises
:class:`CheckpointError` (a ValueError) before any value is returned; a file is
written to a temporary file in the same directory, fsynced and moved into
place with ``os.replace`` (then the directory is fsynced), so a write that fails
or is killed leaves no partial file at the target path: an existing file stays
untouched, at worst a ``<name>.<random>.tmp`` file is left beside it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import lzma
import os
import struct
import tempfile
import zlib
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse

from jaxprune.masks import check_structure
from jaxprune.paths import path_str

__all__ = [
  "to_bcoo",
  "from_bcoo",
  "nm_compress",
  "nm_decompress",
  "save_compressed",
  "load_compressed",
  "CheckpointError",
  "FORMAT_VERSION",
]

FORMAT_VERSION = 1
_MAGIC = b"JXPRUNE\x00"
_PREFIX = struct.Struct("<8sIQ")
_DIGEST = 32


def _is_scalar_true(m) -> bool:
  return np.ndim(m) == 0 and bool(m)


# ----------------------------------------------------------------------------
# BCOO.


def to_bcoo(params, masks):
  """Pruned leaves as ``BCOO`` arrays holding exactly the kept entries.

  A leaf whose mask is an array becomes ``BCOO((values, indices), shape)`` with
  one stored entry per True mask entry (kept zeros included, in row-major
  order); a leaf whose mask is a scalar True is returned unchanged (a scalar
  False mask gives an all-zero dense leaf). Not jit-able: the number of stored
  entries depends on the mask.
  """
  check_structure(params, masks)

  def convert(p, m):
    m = np.asarray(m, bool)
    if m.ndim == 0:
      return p if bool(m) else jnp.zeros_like(p)
    m = np.broadcast_to(m, np.shape(p))
    idx = np.argwhere(m).astype(np.int32)
    vals = jnp.asarray(p)[tuple(idx.T)] if idx.size else jnp.zeros((0,), jnp.result_type(p))
    return sparse.BCOO((vals, jnp.asarray(idx.reshape(-1, m.ndim))), shape=m.shape)

  return jax.tree.map(convert, params, masks)


def from_bcoo(tree):
  """Densifies every ``BCOO`` leaf of ``tree`` (other leaves unchanged)."""
  return jax.tree.map(
    lambda x: x.todense() if isinstance(x, sparse.BCOO) else x,
    tree,
    is_leaf=lambda x: isinstance(x, sparse.BCOO),
  )


# ----------------------------------------------------------------------------
# Compressed N:M.


def nm_compress(w, n: int, m: int, axis: int = -2, mask=None):
  """Compresses an N:M-sparse array to ``(values, indices)``.

  Along ``axis``, every group of ``m`` consecutive entries keeps ``n``:
  ``values`` holds them (``axis`` shrunk by ``n/m``), ``indices`` (uint8) their
  positions ``0..m-1`` within the group, ascending. Kept positions are the
  ``mask`` entries if given, else the non-zeros; groups with fewer than ``n``
  are padded with the lowest unused positions (storing zeros).

  Args:
    w: array whose ``axis`` length is divisible by ``m``.
    n: kept entries per group (``1 <= n <= m``).
    m: the group size (``m <= 256``).
    axis: the grouping axis (default -2: axis 0 of Dense ``(in, out)`` kernels, the
      input-channel axis of Conv ``(H, W, in, out)`` kernels), as in :mod:`jaxprune.structured`.
    mask: optional bool array of ``w``'s shape.

  Raises:
    ValueError: if a group has more than ``n`` kept entries (checked when the
      inputs are concrete; under jit the caller guarantees it).
  """
  w = jnp.asarray(w)
  n, m = int(n), int(m)
  if not 1 <= n <= m <= 256:
    raise ValueError(f"nm_compress needs 1 <= n <= m <= 256, got n={n}, m={m}")
  ax = axis % w.ndim
  if w.shape[ax] % m:
    raise ValueError(f"axis {ax} of shape {w.shape} is not divisible by m={m}")
  keep = (w != 0) if mask is None else jnp.broadcast_to(jnp.asarray(mask, bool), w.shape)
  try:
    k = np.moveaxis(np.asarray(keep), ax, -1)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    k = None  # traced: the caller guarantees the pattern
  if k is not None:
    most = int(k.reshape(k.shape[:-1] + (k.shape[-1] // m, m)).sum(-1).max(initial=0))
    if most > n:
      raise ValueError(
        f"array is not {n}:{m} sparse along axis {ax}: a group has {most} kept entries"
      )
  return _nm_compress_impl(w, keep, n, m, ax)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _nm_compress_impl(w, keep, n, m, ax):
  x = jnp.moveaxis(w, ax, -1)
  k = jnp.moveaxis(keep, ax, -1)
  lead, d = x.shape[:-1], x.shape[-1]
  xg = x.reshape(lead + (d // m, m))
  kg = k.reshape(lead + (d // m, m))
  # Kept positions first, each part in index order (stable sort on "not kept").
  order = jnp.argsort(~kg, axis=-1, stable=True)[..., :n]
  idx = jnp.sort(order, axis=-1)
  vals = jnp.take_along_axis(xg, idx, axis=-1)
  vals = jnp.moveaxis(vals.reshape(lead + (d // m * n,)), -1, ax)
  idx = jnp.moveaxis(idx.astype(jnp.uint8).reshape(lead + (d // m * n,)), -1, ax)
  return vals, idx


def nm_decompress(values, indices, n: int, m: int, axis: int = -2):
  """Inverse of :func:`nm_compress`: the dense array (zeros where not kept)."""
  values, indices = jnp.asarray(values), jnp.asarray(indices)
  n, m = int(n), int(m)
  if values.shape != indices.shape:
    raise ValueError(f"values {values.shape} and indices {indices.shape} differ in shape")
  ax = axis % values.ndim
  if values.shape[ax] % n:
    raise ValueError(f"axis {ax} of shape {values.shape} is not divisible by n={n}")
  return _nm_decompress_impl(values, indices, n, m, ax)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _nm_decompress_impl(values, indices, n, m, ax):
  v = jnp.moveaxis(values, ax, -1)
  i = jnp.moveaxis(indices, ax, -1).astype(jnp.int32)
  lead, g = v.shape[:-1], v.shape[-1] // n
  v = v.reshape(lead + (g, n))
  i = i.reshape(lead + (g, n))
  dense = jnp.put_along_axis(jnp.zeros(lead + (g, m), v.dtype), i, v, axis=-1, inplace=False)
  return jnp.moveaxis(dense.astype(values.dtype).reshape(lead + (g * m,)), -1, ax)


# ----------------------------------------------------------------------------
# Compressed checkpoints.


class CheckpointError(ValueError):
  """A compressed checkpoint that is truncated, corrupted or not one at all."""


def _key_json(k):
  if isinstance(k, jax.tree_util.DictKey):
    if isinstance(k.key, str):
      return ["d", k.key]
    if isinstance(k.key, int):
      return ["di", k.key]
    raise TypeError(f"save_compressed: dict key {k.key!r} is neither str nor int")
  if isinstance(k, jax.tree_util.SequenceKey):
    return ["s", k.idx]
  if isinstance(k, jax.tree_util.GetAttrKey):
    return ["a", k.name]
  if isinstance(k, jax.tree_util.FlattenedIndexKey):
    return ["f", k.key]
  raise TypeError(f"save_compressed: unsupported tree key {k!r}")


def _quantize(vals: np.ndarray, channel: np.ndarray, n_channels: int):
  """int8 symmetric per-channel codes and float32 scales."""
  v = vals.astype(np.float64)
  amax = np.zeros(n_channels, np.float64)
  np.maximum.at(amax, channel, np.abs(v))
  scale = (amax / 127.0).astype(np.float32)
  s = scale.astype(np.float64)[channel]
  q = np.where(s > 0, np.round(v / np.where(s > 0, s, 1.0)), 0.0)
  return np.clip(q, -127, 127).astype(np.int8), scale


def _encode_leaf(p: np.ndarray, m, quantize: Optional[str]):
  """(segments, header entry fields) of one leaf."""
  dtype = p.dtype
  floating = np.issubdtype(dtype, np.floating) or dtype == jnp.bfloat16
  quant = quantize if (quantize and floating and p.ndim >= 2) else None
  if m is None or _is_scalar_true(m):
    encoding, mask = "dense", None
    flat = p.reshape(-1)
  else:
    encoding = "masked"
    mask = np.broadcast_to(np.asarray(m, bool), p.shape).reshape(-1)
    flat = p.reshape(-1)[mask]
  segments = []
  if mask is not None:
    segments.append(("mask", np.packbits(mask).tobytes()))
  if quant == "int8":
    n_ch = p.shape[-1]
    channel = (np.flatnonzero(mask) if mask is not None else np.arange(p.size)) % n_ch
    q, scale = _quantize(flat, channel, n_ch)
    segments.append(("values", q.tobytes()))
    segments.append(("scales", scale.astype("<f4").tobytes()))
  else:
    segments.append(
      ("values", np.ascontiguousarray(flat).astype(dtype.newbyteorder("<")).tobytes())
    )
  return segments, encoding, quant


def _compress(name: str, data: bytes, level: int):
  """(codec, bytes) for one segment: lzma for bitmasks, zlib otherwise, raw if larger."""
  if name == "mask":
    codec, packed = "lzma", lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_NONE)
  else:
    codec, packed = "zlib", zlib.compress(data, level)
  if len(packed) >= len(data):
    return "raw", data
  return codec, packed


def _decompress(codec: str, data: bytes, raw_size: int) -> bytes:
  if codec == "raw":
    out = data
  elif codec == "zlib":
    out = zlib.decompress(data)
  elif codec == "lzma":
    out = lzma.decompress(data, format=lzma.FORMAT_XZ)
  else:
    raise ValueError(f"unknown codec {codec!r}")
  if len(out) != raw_size:
    raise ValueError(f"segment decompresses to {len(out)} bytes, expected {raw_size}")
  return out


def save_compressed(
  path, params, masks=None, quantize: Optional[str] = None, compression_level: int = 6
) -> int:
  """Writes ``params`` (masked by ``masks``) as a compressed checkpoint.

  Only the kept entries of pruned leaves are stored, with a packed bitmask;
  leaves whose mask is a scalar True are stored whole. Reading gives back
  ``apply_masks(params, masks)`` exactly (or within the int8 bound).

  Args:
    path: file to write; written atomically (temp file + ``os.replace``).
    params: pytree of arrays (nested dicts/lists/tuples, NamedTuples...).
    masks: None or masks with exactly the params' tree structure.
    quantize: None or ``"int8"``: symmetric int8 with one scale per output
      channel (last axis) for floating leaves with ``ndim >= 2``; 1-D leaves
      (biases, norms) stay in their dtype.
    compression_level: zlib level 0-9 for the value segments.

  Returns:
    The number of bytes written.

  Example::

    save_compressed("model.jxp", params, masks, quantize="int8")
    params = load_compressed("model.jxp", like=params)
  """
  if quantize not in (None, "int8"):
    raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  if masks is not None:
    check_structure(params, masks)
    mask_leaves = jax.tree.leaves(masks)
  else:
    mask_leaves = [None] * len(flat)

  entries, payload_parts = [], []
  offset = 0
  for (keypath, leaf), m in zip(flat, mask_leaves):
    p = np.asarray(leaf)
    if not (p.dtype.kind in "biuf" or p.dtype == jnp.bfloat16):
      raise TypeError(
        f"save_compressed: leaf {path_str(keypath)!r} has unsupported dtype {p.dtype}"
      )
    if m is not None and np.ndim(m) and np.shape(m) != p.shape:
      raise ValueError(
        f"save_compressed: mask of {path_str(keypath)!r} has shape "
        f"{np.shape(m)}, parameter has {p.shape}"
      )
    segments, encoding, quant = _encode_leaf(p, m, quantize)
    seg_info = {}
    for name, data in segments:
      codec, packed = _compress(name, data, compression_level)
      seg_info[name] = {
        "offset": offset,
        "size": len(packed),
        "codec": codec,
        "raw_size": len(data),
      }
      offset += len(packed)
      payload_parts.append(packed)
    entries.append(
      {
        "path": path_str(keypath),
        "keys": [_key_json(k) for k in keypath],
        "shape": list(p.shape),
        "dtype": p.dtype.name,
        "encoding": encoding,
        "quant": quant,
        "segments": seg_info,
      }
    )
  header = {
    "format": "jaxprune-compressed",
    "version": FORMAT_VERSION,
    "payload_size": offset,
    "treedef": str(treedef),
    "leaves": entries,
  }
  header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")

  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      digest = hashlib.sha256()
      for part in [
        _PREFIX.pack(_MAGIC, FORMAT_VERSION, len(header_bytes)),
        header_bytes,
        *payload_parts,
      ]:
        digest.update(part)
        f.write(part)
      f.write(digest.digest())
      f.flush()
      os.fsync(f.fileno())
    size = os.path.getsize(tmp)
    os.replace(tmp, path)
  except BaseException:
    try:
      os.unlink(tmp)
    except OSError:
      pass
    raise
  _fsync_directory(directory)  # The rename itself survives a crash.
  return size


def _fsync_directory(directory: str) -> None:
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:  # E.g. platforms that cannot open directories.
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def _rebuild(entries_keys, leaves):
  """Nested dicts/lists from key paths (lists for sequence keys)."""
  if len(entries_keys) == 1 and not entries_keys[0]:
    return leaves[0]
  root: Any = None

  def container(kind):
    return [] if kind == "s" else {}

  for keys, leaf in zip(entries_keys, leaves):
    if root is None:
      root = container(keys[0][0])
    node = root
    for depth, (kind, key) in enumerate(keys):
      last = depth == len(keys) - 1
      if isinstance(node, list):
        while len(node) <= key:
          node.append(None)
        if last:
          node[key] = leaf
        else:
          if node[key] is None:
            node[key] = container(keys[depth + 1][0])
          node = node[key]
      else:
        if last:
          node[key] = leaf
        else:
          if key not in node:
            node[key] = container(keys[depth + 1][0])
          node = node[key]
  return root if root is not None else {}


class _Loaded(NamedTuple):
  params: Any
  masks: Any


def load_compressed(path, like=None, return_masks: bool = False):
  """Reads a checkpoint written by :func:`save_compressed`.

  Args:
    path: the file.
    like: optional pytree with the original structure (e.g. the params used at
      save time, or ``jax.eval_shape`` of the init); the result then has exactly
      that tree structure. Without it, the result is nested dicts (and lists
      for sequences).
    return_masks: also return the masks (bool arrays for pruned leaves, scalar
      True for the others).

  Returns:
    params as jax arrays, or ``(params, masks)`` with ``return_masks=True``.

  Raises:
    CheckpointError: if the file is not a jaxprune compressed checkpoint, has an
      unsupported version, is truncated, or fails its SHA-256 checksum.
  """
  with open(path, "rb") as f:
    data = f.read()
  if len(data) < _PREFIX.size + _DIGEST:
    raise CheckpointError(
      f"{path}: file is truncated ({len(data)} bytes) or not a jaxprune compressed checkpoint"
    )
  magic, version, header_len = _PREFIX.unpack_from(data, 0)
  if magic != _MAGIC:
    raise CheckpointError(f"{path}: not a jaxprune compressed checkpoint (bad magic {magic!r})")
  if version != FORMAT_VERSION:
    raise CheckpointError(
      f"{path}: unsupported format version {version} (this jaxprune reads version {FORMAT_VERSION})"
    )
  body, stored = data[:-_DIGEST], data[-_DIGEST:]
  if hashlib.sha256(body).digest() != stored:
    raise CheckpointError(f"{path}: checksum mismatch: the file is truncated or corrupted")
  start = _PREFIX.size
  if start + header_len > len(body):
    raise CheckpointError(f"{path}: header length {header_len} exceeds the file")
  try:
    header = json.loads(body[start : start + header_len].decode("utf-8"))
  except ValueError as e:
    raise CheckpointError(f"{path}: corrupted header: {e}") from None
  payload = body[start + header_len :]
  if (
    not isinstance(header, dict)
    or header.get("format") != "jaxprune-compressed"
    or header.get("version") != FORMAT_VERSION
    or header.get("payload_size") != len(payload)
  ):
    raise CheckpointError(f"{path}: inconsistent header (format, version or payload size)")

  params_leaves, mask_leaves, keys = [], [], []
  try:
    for e in header["leaves"]:
      p, m = _decode_leaf(e, payload)
      params_leaves.append(p)
      mask_leaves.append(m)
      keys.append([(k[0], k[1]) for k in e["keys"]])
  except (KeyError, TypeError, ValueError, IndexError, zlib.error, lzma.LZMAError) as err:
    raise CheckpointError(f"{path}: corrupted leaf entry: {err}") from None

  if like is not None:
    flat, treedef = jax.tree_util.tree_flatten_with_path(like)
    want = [path_str(kp) for kp, _ in flat]
    have = [e["path"] for e in header["leaves"]]
    if want != have:
      raise ValueError(f"load_compressed: `like` has leaves {want}, the file has {have}")
    for (kp, x), p in zip(flat, params_leaves):
      if tuple(np.shape(x)) != tuple(p.shape):
        raise ValueError(
          f"load_compressed: {path_str(kp)!r} has shape {p.shape} in the file, "
          f"{np.shape(x)} in `like`"
        )
    params = jax.tree.unflatten(treedef, params_leaves)
    masks = jax.tree.unflatten(treedef, mask_leaves)
  else:
    params = _rebuild(keys, params_leaves)
    masks = _rebuild(keys, mask_leaves)
  return _Loaded(params, masks) if return_masks else params


def _decode_leaf(e: dict, payload: bytes):
  shape = tuple(int(d) for d in e["shape"])
  dtype = jnp.dtype(e["dtype"])
  size = int(np.prod(shape, dtype=np.int64))
  segs = e["segments"]

  def seg(name):
    info = segs[name]
    off, length = int(info["offset"]), int(info["size"])
    if off < 0 or length < 0 or off + length > len(payload):
      raise ValueError(f"segment {name!r} of {e['path']!r} lies outside the payload")
    return _decompress(info["codec"], payload[off : off + length], int(info["raw_size"]))

  if e["encoding"] == "masked":
    bits = np.frombuffer(seg("mask"), np.uint8)
    if bits.size != (size + 7) // 8:
      raise ValueError(f"mask of {e['path']!r} has {bits.size} bytes for {size} entries")
    mask = np.unpackbits(bits, count=size).astype(bool)
    positions = np.flatnonzero(mask)
  elif e["encoding"] == "dense":
    mask, positions = None, np.arange(size)
  else:
    raise ValueError(f"unknown encoding {e['encoding']!r} of {e['path']!r}")
  count = positions.size
  if e["quant"] == "int8":
    q = np.frombuffer(seg("values"), np.int8)
    scale = np.frombuffer(seg("scales"), "<f4")
    if q.size != count or scale.size != shape[-1]:
      raise ValueError(f"int8 values/scales of {e['path']!r} have the wrong size")
    vals = (q.astype(np.float64) * scale.astype(np.float64)[positions % shape[-1]]).astype(dtype)
  elif e["quant"] is None:
    raw = seg("values")
    if len(raw) != count * dtype.itemsize:
      raise ValueError(
        f"values of {e['path']!r} have {len(raw)} bytes, expected {count * dtype.itemsize}"
      )
    vals = np.frombuffer(raw, dtype.newbyteorder("<")).astype(dtype)
  else:
    raise ValueError(f"unknown quantisation {e['quant']!r} of {e['path']!r}")
  full = np.zeros(size, dtype)
  full[positions] = vals
  p = jnp.asarray(full.reshape(shape))
  m = jnp.asarray(True) if mask is None else jnp.asarray(mask.reshape(shape))
  return p, m
