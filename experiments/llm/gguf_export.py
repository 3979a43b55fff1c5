"""Writes :mod:`experiments.llm.model` params as a complete GGUF model (llama.cpp's format).

The inverse of :mod:`experiments.llm.loader`: Flax kernels ``(in, out)`` become
GGUF rows ``(out, in)``, the rows of ``attn_q`` / ``attn_k`` are permuted back
into llama.cpp's interleaved-pair RoPE layout, and every metadata key of a
source GGUF (tokenizer included) is copied, with the architecture keys rewritten
from the :class:`~experiments.llm.model.Config` (so a model with removed blocks
says so) and ``general.file_type`` set to the format written.

Formats (``fmt``) and what each tensor becomes:

=========  ===================  ===============================  ========
``fmt``    block kernels        ``token_embd`` (and ``output``)  norms
=========  ===================  ===============================  ========
``f32``    F32                  F32                              F32
``f16``    F16                  F16                              F32
``q8_0``   Q8_0 from Quantized  Q8_0 (ggml's round-to-nearest)   F32
``q4_0``   Q4_0 from Quantized  Q8_0 (ggml's round-to-nearest)   F32
=========  ===================  ===============================  ========

In ``q8_0`` / ``q4_0`` every block kernel must come with a ``Quantized``
(``jaxprune.oneshot``: int codes ``(in, out)``, one float32 scale per 32
consecutive inputs and output) of the matching width; its codes and scales are
packed into GGML blocks bit-exactly (Q4_0: fp16 ``d`` then 16 bytes whose low
nibbles hold inputs 0-15 and high nibbles inputs 16-31, value ``(nibble - 8) *
d``; Q8_0: fp16 ``d`` then 32 int8 codes, value ``code * d``), so the file
dequantises to exactly ``codes * scales``. The embedding is not a calibrated
kernel: it is written in Q8_0 by ggml's own reference quantiser, and
:func:`embedding_as_written` gives the values the file holds so that the
in-memory model can use the same ones.

The exact-zero rule: Q4_0 and Q8_0 have no offset, so code 0 is exactly 0.0 and
pruned weights stay 0 in the file. Q4_1, Q5_1 and the K-quants with block minima
(Q2_K, Q4_K, Q5_K) have no exact zero; they and every other type this writer
does not produce are refused by name.

Writing is atomic: the file is written to a temporary name in the destination
directory, flushed and fsynced, then renamed over ``path`` with
:func:`os.replace`; a failure removes the temporary file and leaves any existing
``path`` untouched.
"""

from __future__ import annotations

import os
import pathlib
import secrets

import jax
import numpy as np

from experiments.llm import loader
from experiments.llm.model import Config

BLOCK = 32  # weights per GGML Q4_0 / Q8_0 block
FORMATS = ("f32", "f16", "q8_0", "q4_0")
# Types whose grid has no exact zero (per-block scale and offset).
NO_EXACT_ZERO = ("q4_1", "q5_1", "q2_k", "q4_k", "q5_k")

# llama.cpp's ``general.file_type`` (LlamaFileType) of each format.
_FILE_TYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7}
_BITS = {"q8_0": 8, "q4_0": 4}

# GGUF tensor name -> (param path inside a block, heads for the RoPE row permutation).
_BLOCK_TENSORS = (
  ("attn_q", "self_attn/q_proj/kernel", "n_heads"),
  ("attn_k", "self_attn/k_proj/kernel", "n_kv_heads"),
  ("attn_v", "self_attn/v_proj/kernel", None),
  ("attn_output", "self_attn/o_proj/kernel", None),
  ("ffn_gate", "mlp/gate_proj/kernel", None),
  ("ffn_up", "mlp/up_proj/kernel", None),
  ("ffn_down", "mlp/down_proj/kernel", None),
)


def _gguf():
  return loader._require("gguf")


def check_format(fmt: str) -> str:
  """Returns ``fmt`` lower-cased if this writer produces it, else raises ValueError naming it."""
  f = str(fmt).lower()
  if f in FORMATS:
    return f
  if f in NO_EXACT_ZERO:
    raise ValueError(
      f"GGUF type {f.upper()} has no exact zero (each block has a scale and an offset), so "
      f"pruned weights would not stay 0: export sparse models as q4_0 or q8_0"
    )
  raise ValueError(f"GGUF type {fmt!r} is not written by this exporter; use one of {FORMATS}")


def check_path(path) -> pathlib.Path:
  """``path`` as a Path if it ends in ``.gguf`` and its directory exists, else ValueError."""
  p = pathlib.Path(path)
  if p.suffix != ".gguf":
    raise ValueError(f"export path must end in .gguf, got {str(path)!r}")
  parent = p.parent if str(p.parent) else pathlib.Path(".")
  if not parent.is_dir():
    raise ValueError(f"export directory {str(parent)!r} does not exist (for {str(path)!r})")
  return p


# --- GGML blocks -------------------------------------------------------------------------------


def _check_blocks(codes, scales, lo, hi, name):
  codes = np.asarray(codes)
  scales = np.asarray(scales, np.float32)
  rows, n = codes.shape
  if n % BLOCK:
    raise ValueError(f"{name}: row length {n} is not a multiple of the {BLOCK}-weight block")
  if scales.shape != (rows, n // BLOCK):
    raise ValueError(f"{name}: scales of shape {scales.shape}, expected {(rows, n // BLOCK)}")
  if codes.min(initial=0) < lo or codes.max(initial=0) > hi:
    raise ValueError(f"{name}: codes outside [{lo}, {hi}]")
  if not np.all(np.isfinite(scales)):
    raise ValueError(f"{name}: non-finite scales")
  d = scales.astype(np.float16)
  if not np.array_equal(d.astype(np.float32), scales):
    raise ValueError(f"{name}: scales are not exactly representable in float16 (GGML's block d)")
  return codes.astype(np.int16), d


def pack_q4_0(codes, scales, name: str = "tensor") -> np.ndarray:
  """GGML Q4_0 rows from int4 codes ``(rows, n)`` in [-8, 7] and scales ``(rows, n // 32)``.

  Returns uint8 ``(rows, n // 32 * 18)``: per block the fp16 scale, then byte j holds
  ``code[j] + 8`` in its low nibble and ``code[j + 16] + 8`` in its high nibble.
  """
  c, d = _check_blocks(codes, scales, -8, 7, name)
  rows, n = c.shape
  nib = (c + 8).astype(np.uint8).reshape(rows, n // BLOCK, 2, BLOCK // 2)
  qs = nib[:, :, 0] | (nib[:, :, 1] << np.uint8(4))
  blocks = np.concatenate([d.reshape(rows, -1, 1).view(np.uint8), qs], axis=-1)
  return np.ascontiguousarray(blocks.reshape(rows, -1))


def pack_q8_0(codes, scales, name: str = "tensor") -> np.ndarray:
  """GGML Q8_0 rows from int8 codes ``(rows, n)`` and scales ``(rows, n // 32)``.

  Returns uint8 ``(rows, n // 32 * 34)``: per block the fp16 scale, then 32 int8 codes.
  """
  c, d = _check_blocks(codes, scales, -128, 127, name)
  rows, n = c.shape
  qs = c.astype(np.int8).reshape(rows, n // BLOCK, BLOCK).view(np.uint8)
  blocks = np.concatenate([d.reshape(rows, -1, 1).view(np.uint8), qs], axis=-1)
  return np.ascontiguousarray(blocks.reshape(rows, -1))


def pack_quantized(q, fmt: str, name: str = "kernel") -> np.ndarray:
  """GGUF rows ``(out, ...)`` of a ``Quantized`` Flax kernel ``(in, out)`` in Q4_0 or Q8_0."""
  bits, group = int(q.spec.bits), q.spec.group_size
  if bits != _BITS[fmt]:
    raise ValueError(f"{name}: a {bits}-bit Quantized cannot be written as {fmt.upper()}")
  if group != BLOCK:
    raise ValueError(
      f"{name}: {fmt.upper()} needs group_size={BLOCK} along the input axis, got {group}"
    )
  codes = np.asarray(q.codes).T  # (out, in): GGUF rows run along the input axis
  scales = np.asarray(q.scales, np.float32).T  # (out, in // 32)
  return (pack_q4_0 if fmt == "q4_0" else pack_q8_0)(codes, scales, name)


def q8_0_reference(w) -> np.ndarray:
  """ggml's reference Q8_0 round-to-nearest of a 2-D array whose rows are blocks of 32."""
  gguf = _gguf()
  return gguf.quants.quantize(np.asarray(w, np.float32), gguf.GGMLQuantizationType.Q8_0)


def embedding_as_written(embedding, fmt: str) -> np.ndarray:
  """The float32 values ``fmt`` stores for ``token_embd`` (Q8_0 in the quantised formats)."""
  fmt = check_format(fmt)
  e = np.asarray(embedding, np.float32)
  if fmt == "f32":
    return e
  if fmt == "f16":
    return e.astype(np.float16).astype(np.float32)
  gguf = _gguf()
  return gguf.dequantize(q8_0_reference(e), gguf.GGMLQuantizationType.Q8_0).reshape(e.shape)


def permute_rows(a, n_heads: int) -> np.ndarray:
  """llama.cpp's ``permute`` of Q/K rows (rotate-half -> interleaved pairs); inverse of the
  loader's ``_unpermute``. Works on any array whose first axis is the output rows."""
  a = np.asarray(a)
  out = a.shape[0]
  return a.reshape(n_heads, 2, out // n_heads // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


# --- tensors -----------------------------------------------------------------------------------


def _get(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return tree


def check_finite(params) -> None:
  """ValueError naming the first param path with a NaN or infinity."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    a = np.asarray(leaf)
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
      name = "/".join(str(getattr(k, "key", k)) for k in path)
      raise ValueError(f"{name}: non-finite weights (NaN or inf); nothing was written")


def _float(a, fmt, name):
  a = np.asarray(a, np.float32)
  if fmt == "f32":
    return a
  h = a.astype(np.float16)
  if not np.all(np.isfinite(h)):
    raise ValueError(f"{name}: values beyond float16's range (|w| > 65504); write it as f32")
  return h


def gguf_tensors(cfg: Config, params, quants=None, fmt: str = "f16"):
  """The tensors of the GGUF file: ordered list of ``(name, array, raw_dtype or None)``.

  ``quants`` maps full param paths (``"layers_3/mlp/up_proj/kernel"``) to ``Quantized``;
  it is required for every block kernel in ``q8_0`` / ``q4_0`` and must be empty otherwise.
  """
  gguf = _gguf()
  fmt = check_format(fmt)
  quants = dict(quants or {})
  check_finite(params)
  quantised = fmt in _BITS
  if quants and not quantised:
    raise ValueError(f"quantised kernels given, but fmt={fmt!r}: use q8_0 or q4_0")
  q8 = gguf.GGMLQuantizationType.Q8_0
  raw = {"q8_0": q8, "q4_0": gguf.GGMLQuantizationType.Q4_0}.get(fmt)

  def embedding_like(name, w):  # token_embd / output: rows are the vocabulary
    if quantised:
      if np.shape(w)[1] % BLOCK:
        raise ValueError(f"{name}: row length {np.shape(w)[1]} is not a multiple of {BLOCK}")
      return (name, q8_0_reference(w), q8)
    return (name, _float(w, fmt, name), None)

  out = [embedding_like("token_embd.weight", params["embed_tokens"]["embedding"])]
  names = sorted((k for k in params if k.startswith("layers_")), key=lambda k: int(k.split("_")[1]))
  if len(names) != cfg.n_layers:
    raise ValueError(f"params have {len(names)} blocks, the config says {cfg.n_layers}")
  used = set()
  for i, blk in enumerate(names):
    p = params[blk]
    out.append((f"blk.{i}.attn_norm.weight", _norm(p["input_layernorm"]), None))
    for tname, rel, heads in _BLOCK_TENSORS:
      full = f"{blk}/{rel}"
      gname = f"blk.{i}.{tname}.weight"
      if quantised:
        if full not in quants:
          raise ValueError(
            f"{full}: no Quantized kernel for {fmt.upper()} (quantise every block kernel first)"
          )
        q = quants[full]
        if tuple(np.shape(q.codes)) != tuple(np.shape(_get(p, rel))):
          raise ValueError(f"{full}: Quantized codes of shape {np.shape(q.codes)} != kernel")
        rows, dtype = pack_quantized(q, fmt, full), raw
        used.add(full)
      else:
        rows, dtype = _float(np.asarray(_get(p, rel)).T, fmt, full), None
      if heads is not None:
        rows = permute_rows(rows, getattr(cfg, heads))
      out.append((gname, np.ascontiguousarray(rows), dtype))
    out.append((f"blk.{i}.ffn_norm.weight", _norm(p["post_attention_layernorm"]), None))
  extra = sorted(set(quants) - used)
  if extra:
    raise ValueError(f"Quantized kernels for paths the model does not have: {extra[:3]}")
  out.append(("output_norm.weight", _norm(params["norm"]), None))
  if not cfg.tie_embeddings:
    out.append(embedding_like("output.weight", np.asarray(params["lm_head"]["kernel"]).T))
  return out


def _norm(p):  # RMSNorm scales stay float32 in every format
  return np.asarray(p["scale"], np.float32)


# --- metadata ----------------------------------------------------------------------------------


def config_metadata(cfg: Config) -> dict:
  """The ``llama.*`` keys the loader and llama.cpp read, from the config: ``{key: (value, type)}``."""
  V = _gguf().GGUFValueType
  return {
    "llama.vocab_size": (cfg.vocab_size, V.UINT32),
    "llama.embedding_length": (cfg.dim, V.UINT32),
    "llama.block_count": (cfg.n_layers, V.UINT32),
    "llama.feed_forward_length": (cfg.hidden_dim, V.UINT32),
    "llama.attention.head_count": (cfg.n_heads, V.UINT32),
    "llama.attention.head_count_kv": (cfg.n_kv_heads, V.UINT32),
    "llama.rope.dimension_count": (cfg.head_dim, V.UINT32),
    "llama.rope.freq_base": (float(cfg.rope_base), V.FLOAT32),
    "llama.attention.layer_norm_rms_epsilon": (float(cfg.norm_eps), V.FLOAT32),
  }


def source_metadata(source) -> dict:
  """Every key/value of a GGUF file except the header's: ``{key: (value, type, sub_type)}``."""
  gguf = _gguf()
  reader = gguf.GGUFReader(str(source))
  meta = {}
  for key, field in reader.fields.items():
    if key.startswith("GGUF."):
      continue
    sub = field.types[1] if len(field.types) > 1 else None
    meta[key] = (field.contents(), field.types[0], sub)
  return meta


# --- writing -----------------------------------------------------------------------------------


def write_gguf(
  path, cfg: Config, params, quants=None, fmt: str = "f16", source=None, metadata=None
):
  """Writes ``params`` (+ ``quants``) as a GGUF model at ``path``, atomically; returns its size.

  Args:
    path: destination, ending in ``.gguf``, in an existing directory; replaced only once the
      new file is complete and synced.
    cfg: the model's :class:`~experiments.llm.model.Config` (its ``llama.*`` keys are written).
    params: the Flax params of :class:`~experiments.llm.model.LLaMA` (dequantised values).
    quants: ``{param path: Quantized}`` for every block kernel (``q8_0`` / ``q4_0`` only).
    fmt: ``"f32"``, ``"f16"``, ``"q8_0"`` or ``"q4_0"``.
    source: a GGUF file whose metadata (tokenizer, names, chat template...) is copied;
      without one only the architecture keys are written (a model llama.cpp cannot tokenize).
    metadata: extra ``{key: (value, GGUFValueType[, sub_type])}`` written last.
  """
  gguf = _gguf()
  path = check_path(path)
  fmt = check_format(fmt)
  tensors = gguf_tensors(cfg, params, quants, fmt)  # every check happens before any write

  meta = source_metadata(source) if source is not None else {}
  V = gguf.GGUFValueType
  for k, (v, t) in config_metadata(cfg).items():
    meta[k] = (v, t, None)
  meta["general.file_type"] = (_FILE_TYPE[fmt], V.UINT32, None)
  meta.setdefault("general.quantization_version", (2, V.UINT32, None))
  for k, v in (metadata or {}).items():
    meta[k] = (v[0], v[1], v[2] if len(v) > 2 else None)
  arch = meta.pop("general.architecture", ("llama",))[0]
  if arch != "llama":
    raise ValueError(f"source {source}: general.architecture={arch!r}, expected 'llama'")

  tmp = _temp_path(path)
  writer = gguf.GGUFWriter(tmp, arch)
  try:
    if "general.alignment" in meta:
      writer.data_alignment = int(meta["general.alignment"][0])
    for k, (v, t, sub) in meta.items():
      writer.add_key_value(k, v, t, sub_type=sub)
    for name, a, raw in tensors:
      writer.add_tensor(name, a, raw_dtype=raw)
    writer.write_header_to_file(pathlib.Path(tmp))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    for f in writer.fout:
      f.flush()
      os.fsync(f.fileno())
    writer.close()
    os.replace(tmp, path)
  except BaseException:
    writer.close()
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  _fsync_dir(path.parent)
  return os.path.getsize(path)


def _temp_path(path: pathlib.Path) -> str:
  """A new, empty file beside ``path`` (same filesystem, so the final rename is atomic)."""
  while True:
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
      with open(tmp, "xb"):  # created with the process umask, like the final file
        return str(tmp)
    except FileExistsError:  # pragma: no cover - a 32-bit random collision
      continue


def _fsync_dir(d):
  try:
    fd = os.open(str(d) or ".", os.O_RDONLY)
  except OSError:  # pragma: no cover - platforms without directory fds
    return
  try:
    os.fsync(fd)
  finally:
    os.close(fd)
