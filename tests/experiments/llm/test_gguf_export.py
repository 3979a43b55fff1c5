"""GGUF export: bit-exact Q4_0/Q8_0 packing, tiny models written and read back, atomicity and
every refused input. The real SmolLM2 export and the llama.cpp crosscheck are slow tests."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

gguf = pytest.importorskip("gguf")

from experiments import prune_llm  # noqa: E402
from experiments.llm import data, gguf_export, loader  # noqa: E402
from experiments.llm import model as llm  # noqa: E402
from jaxprune import oneshot  # noqa: E402

Q4_0 = gguf.GGMLQuantizationType.Q4_0
Q8_0 = gguf.GGMLQuantizationType.Q8_0
TINY = llm.Config(
  vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, rope_base=1e4
)
KERNELS = [rel for _, rel, _ in gguf_export._BLOCK_TENSORS]
V = gguf.GGUFValueType
TOKENIZER = {  # a toy tokenizer, so the tiny source file has the keys a real one has
  "tokenizer.ggml.model": ("gpt2", V.STRING),
  "tokenizer.ggml.tokens": ([f"t{i}" for i in range(TINY.vocab_size)], V.ARRAY, V.STRING),
  "tokenizer.ggml.token_type": ([1] * TINY.vocab_size, V.ARRAY, V.INT32),
  "tokenizer.ggml.merges": (["t 1"], V.ARRAY, V.STRING),
  "tokenizer.ggml.add_bos_token": (False, V.BOOL),
  "general.name": ("tiny", V.STRING),
}


def _codes_scales(draw_seed, rows, blocks, bits):
  rng = np.random.default_rng(draw_seed)
  lo, hi = (-8, 7) if bits == 4 else (-127, 127)
  codes = rng.integers(lo, hi + 1, size=(rows, blocks * 32)).astype(np.int8)
  codes[rng.random(codes.shape) < 0.3] = 0  # pruned entries
  # Any finite float16 scale, including 0, subnormals and large values.
  scales = rng.standard_normal((rows, blocks)) * 10.0 ** rng.integers(-7, 4, size=(rows, blocks))
  scales = scales.astype(np.float16).astype(np.float32)
  scales[0, 0] = 0.0
  return codes, scales


@given(
  seed=st.integers(0, 2**31 - 1),
  rows=st.integers(1, 5),
  blocks=st.integers(1, 4),
  bits=st.sampled_from([4, 8]),
)
def test_packing_is_bit_exact(seed, rows, blocks, bits):
  codes, scales = _codes_scales(seed, rows, blocks, bits)
  pack, qtype = (gguf_export.pack_q4_0, Q4_0) if bits == 4 else (gguf_export.pack_q8_0, Q8_0)
  packed = pack(codes, scales)
  assert packed.dtype == np.uint8 and packed.shape == (rows, blocks * (18 if bits == 4 else 34))
  back = gguf.dequantize(packed, qtype)
  want = codes.astype(np.float32) * np.repeat(scales, 32, axis=1)
  assert np.array_equal(back, want)
  assert np.all(back[codes == 0] == 0.0)


@given(seed=st.integers(0, 2**31 - 1), bits=st.sampled_from([4, 8]), n_in=st.sampled_from([32, 96]))
def test_quantized_kernels_pack_to_dequantize_exactly(seed, bits, n_in):
  key, kmask = jax.random.split(jax.random.key(seed))
  w = jax.random.normal(key, (n_in, 24))
  mask = jax.random.bernoulli(kmask, 0.5, w.shape)
  q = oneshot.quantize_rtn(w, oneshot.QuantSpec(bits, 32), mask=mask)
  fmt, qtype = ("q4_0", Q4_0) if bits == 4 else ("q8_0", Q8_0)
  rows = gguf_export.pack_quantized(q, fmt)
  back = gguf.dequantize(rows, qtype).T  # GGUF rows are (out, in)
  assert np.array_equal(back, np.asarray(oneshot.dequantize(q)))
  assert np.all(back[~np.asarray(mask)] == 0.0)


def test_negative_q4_0_scales_round_trip_bit_exactly():
  """ggml's Q4_0 rule gives negative scales (d = m / -8 for a positive extreme m): the
  file's fp16 d holds them bit for bit, and pruned entries still read back as 0."""
  rng = np.random.default_rng(7)
  w = rng.standard_normal((64, 16)).astype(np.float32)
  mask = rng.random(w.shape) < 0.5
  q = oneshot.quantize_rtn(w, oneshot.QuantSpec(4, 32), mask=mask)
  scales = np.asarray(q.scales)
  assert (scales < 0).any() and (scales > 0).any()
  rows = gguf_export.pack_quantized(q, "q4_0")  # (out, 2 blocks * 18 bytes)
  d = rows.reshape(16, 2, 18)[:, :, :2].copy().view(np.float16)[..., 0]  # (out, blocks)
  np.testing.assert_array_equal(d.view(np.uint16), scales.T.astype(np.float16).view(np.uint16))
  back = gguf.dequantize(rows, Q4_0).T
  assert np.array_equal(back, np.asarray(oneshot.dequantize(q)))
  assert np.all(back[~mask] == 0.0)
  codes = np.asarray(q.codes)
  assert np.all(codes[~mask] == 0) and (codes == -8).sum() >= 32  # each block's extreme


def test_permutation_is_the_loaders_inverse():
  w = np.arange(64 * 3, dtype=np.float32).reshape(64, 3)
  p = gguf_export.permute_rows(w, 4)
  assert not np.array_equal(p, w)
  assert np.array_equal(loader._unpermute(p, 4), w)
  # llama.cpp's convert_hf_to_gguf permute, written out.
  ref = w.reshape(4, 2, 8, 3).swapaxes(1, 2).reshape(64, 3)
  assert np.array_equal(p, ref)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  params = jax.tree.map(np.asarray, llm.init(TINY, jax.random.key(0)))
  d = tmp_path_factory.mktemp("tiny")
  src = d / "source.gguf"
  gguf_export.write_gguf(src, TINY, params, fmt="f32", metadata=TOKENIZER)
  return params, src


def _quants(params, bits, sparsity=0.5):
  quants, new = {}, jax.tree.map(np.array, params)
  for i in range(TINY.n_layers):
    blk = f"layers_{i}"
    for rel in KERNELS:
      w = gguf_export._get(params[blk], rel)
      new_w, mask = oneshot.magnitude(jnp.asarray(w), sparsity)
      q = oneshot.quantize_rtn(new_w, oneshot.QuantSpec(bits, 32), mask=mask)
      quants[f"{blk}/{rel}"] = q
      leaf = new[blk]
      *head, last = rel.split("/")
      for k in head:
        leaf = leaf[k]
      leaf[last] = np.asarray(oneshot.dequantize(q))
  return new, quants


def _logits(cfg, params, tokens):
  return np.asarray(llm.LLaMA(cfg).apply({"params": jax.tree.map(jnp.asarray, params)}, tokens))


def test_f32_round_trip_and_metadata(tiny, tmp_path):
  params, src = tiny
  out = tmp_path / "f32.gguf"
  n = gguf_export.write_gguf(out, TINY, params, fmt="f32", source=src)
  assert n == os.path.getsize(out)
  cfg, back = loader.load_gguf(out)
  assert cfg == TINY._replace(norm_eps=cfg.norm_eps)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(back)):
    assert np.array_equal(a, b), path
  r_src, r_out = gguf.GGUFReader(str(src)), gguf.GGUFReader(str(out))
  for key, f in r_src.fields.items():
    if not key.startswith("GGUF."):
      assert r_out.fields[key].contents() == f.contents(), key
  assert r_out.fields["general.file_type"].contents() == 0


def test_f16_export_rounds_kernels_and_keeps_norms(tiny, tmp_path):
  params, src = tiny
  out = tmp_path / "f16.gguf"
  gguf_export.write_gguf(out, TINY, params, fmt="f16", source=src)
  types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
  assert types["blk.0.ffn_up.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"
  _, back = loader.load_gguf(out)
  k = params["layers_1"]["self_attn"]["q_proj"]["kernel"]
  assert np.array_equal(back["layers_1"]["self_attn"]["q_proj"]["kernel"], k.astype(np.float16))


@pytest.mark.parametrize("fmt,bits", [("q4_0", 4), ("q8_0", 8)])
def test_quantised_sparse_export_reads_back_exactly(tiny, tmp_path, fmt, bits):
  params, src = tiny
  new, quants = _quants(params, bits)
  new["embed_tokens"]["embedding"] = gguf_export.embedding_as_written(
    params["embed_tokens"]["embedding"], fmt
  )
  out = tmp_path / f"{fmt}.gguf"
  gguf_export.write_gguf(out, TINY, new, quants, fmt=fmt, source=src)
  reader = gguf.GGUFReader(str(out))
  types = {t.name: t.tensor_type.name for t in reader.tensors}
  assert types["blk.1.ffn_down.weight"] == fmt.upper() and types["token_embd.weight"] == "Q8_0"
  assert types["output_norm.weight"] == "F32"
  assert reader.fields["general.file_type"].contents() == {"q4_0": 2, "q8_0": 7}[fmt]
  if bits == 4:  # ggml's rule: blocks whose extreme weight is positive have d < 0
    assert any((np.asarray(q.scales) < 0).any() for q in quants.values())
  cfg, back = loader.load_gguf(out)
  for path, q in quants.items():
    blk, rel = path.split("/", 1)
    got = gguf_export._get(back[blk], rel)
    assert np.array_equal(got, np.asarray(oneshot.dequantize(q))), path
    assert np.mean(got == 0) >= 0.5  # pruned entries read back exactly 0
  tokens = jnp.arange(16).reshape(2, 8) % TINY.vocab_size
  assert np.array_equal(_logits(cfg, back, tokens), _logits(TINY, new, tokens))


def test_removed_blocks_rewrite_block_count(tiny, tmp_path):
  params, src = tiny
  short = oneshot.remove_blocks(params, [0])
  cfg = TINY._replace(n_layers=1)
  out = tmp_path / "short.gguf"
  gguf_export.write_gguf(out, cfg, short, fmt="f32", source=src)
  got, back = loader.load_gguf(out)
  assert got.n_layers == 1
  assert np.array_equal(
    back["layers_0"]["mlp"]["up_proj"]["kernel"], short["layers_0"]["mlp"]["up_proj"]["kernel"]
  )


# --- atomicity and refused inputs ------------------------------------------------------------


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tiny, tmp_path, monkeypatch):
  params, src = tiny
  out = tmp_path / "model.gguf"
  out.write_bytes(b"previous model")

  def boom(self, **kw):
    raise OSError("disk full")

  monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
  with pytest.raises(OSError, match="disk full"):
    gguf_export.write_gguf(out, TINY, params, fmt="f32", source=src)
  assert out.read_bytes() == b"previous model"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_success_replaces_the_old_file_and_leaves_no_temp(tiny, tmp_path):
  params, src = tiny
  out = tmp_path / "model.gguf"
  out.write_bytes(b"previous model")
  gguf_export.write_gguf(out, TINY, params, fmt="f16", source=src)
  assert out.read_bytes()[:4] == b"GGUF"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


@pytest.mark.parametrize("fmt", ["q4_1", "Q4_K", "q5_1", "q2_k", "q5_k"])
def test_formats_without_an_exact_zero_are_refused(tiny, tmp_path, fmt):
  params, src = tiny
  new, _ = _quants(params, 4)
  with pytest.raises(ValueError, match=f"{fmt.upper()} has no exact zero"):
    gguf_export.write_gguf(tmp_path / "m.gguf", TINY, new, fmt=fmt, source=src)
  assert list(tmp_path.iterdir()) == []


def test_unknown_formats_are_refused():
  with pytest.raises(ValueError, match="'q6_k' is not written"):
    gguf_export.check_format("q6_k")


def test_group_size_and_width_must_match_the_block(tiny, tmp_path):
  params, src = tiny
  new, quants = _quants(params, 4)
  path = "layers_0/mlp/up_proj/kernel"
  w = gguf_export._get(params["layers_0"], "mlp/up_proj/kernel")
  quants[path] = oneshot.quantize_rtn(w, oneshot.QuantSpec(4, 64))
  with pytest.raises(ValueError, match="up_proj/kernel: Q4_0 needs group_size=32.*got 64"):
    gguf_export.write_gguf(tmp_path / "m.gguf", TINY, new, quants, fmt="q4_0", source=src)
  quants[path] = oneshot.quantize_rtn(w, oneshot.QuantSpec(8, 32))
  with pytest.raises(ValueError, match="up_proj/kernel: a 8-bit Quantized cannot be written as"):
    gguf_export.write_gguf(tmp_path / "m.gguf", TINY, new, quants, fmt="q4_0", source=src)
  del quants[path]
  with pytest.raises(ValueError, match="layers_0/mlp/up_proj/kernel: no Quantized kernel"):
    gguf_export.write_gguf(tmp_path / "m.gguf", TINY, new, quants, fmt="q4_0", source=src)
  with pytest.raises(ValueError, match="not exactly representable in float16"):
    gguf_export.pack_q8_0(np.zeros((1, 32), np.int8), np.full((1, 1), 0.1, np.float32))
  assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
  "bad, message",
  [
    ("model.bin", "must end in .gguf"),
    ("model", "must end in .gguf"),
    ("no_such_dir/model.gguf", "does not exist"),
  ],
)
def test_bad_output_paths_are_refused(tiny, tmp_path, bad, message):
  params, _ = tiny
  with pytest.raises(ValueError, match=message):
    gguf_export.write_gguf(tmp_path / bad, TINY, params, fmt="f32")
  with pytest.raises(ValueError, match=message):
    prune_llm.parse_args([f"--export={tmp_path / bad}"])
  assert list(tmp_path.iterdir()) == []


def test_nan_weights_are_refused(tiny, tmp_path):
  params, src = tiny
  bad = jax.tree.map(np.array, params)
  bad["layers_1"]["mlp"]["gate_proj"]["kernel"][3, 4] = np.nan
  with pytest.raises(ValueError, match="layers_1/mlp/gate_proj/kernel: non-finite"):
    gguf_export.write_gguf(tmp_path / "m.gguf", TINY, bad, fmt="f16", source=src)
  assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("keep", [0.02, 0.5, 0.999])
def test_truncated_gguf_is_named_by_the_loader(tiny, tmp_path, keep):
  _, src = tiny
  raw = src.read_bytes()
  bad = tmp_path / "cut.gguf"
  bad.write_bytes(raw[: int(len(raw) * keep)])
  with pytest.raises(ValueError, match="cut.gguf.*(truncated or corrupt)"):
    loader.load_gguf(bad)


def test_corrupt_and_missing_files_are_named(tmp_path):
  bad = tmp_path / "text.gguf"
  bad.write_text("not a model " * 20)
  with pytest.raises(ValueError, match="text.gguf: not a readable GGUF"):
    loader.load_gguf(bad)
  with pytest.raises(FileNotFoundError, match="missing.gguf"):
    loader.load_gguf(tmp_path / "missing.gguf")


def test_quant_flags_parse():
  a = prune_llm.parse_args(["--quant=q4_0", "--quantizer=rtn"])
  assert (a.quant, a.quantizer, a.export) == ("q4_0", "rtn", None)
  assert prune_llm.parse_args([]).quantizer == "gptq"
  assert prune_llm.parse_args([]).scale_rule == "ggml"
  assert prune_llm.parse_args(["--quant=q4_0", "--scale_rule=absmax"]).scale_rule == "absmax"
  with pytest.raises(SystemExit):
    prune_llm.parse_args(["--scale_rule=minmax"])
  with pytest.raises(ValueError, match="--single_pass"):
    prune_llm.parse_args(["--quant=q8_0", "--single_pass"])


def test_crosscheck_nll_matches_the_project_definition():
  from experiments.llm import crosscheck

  rng = np.random.default_rng(0)
  logits = rng.standard_normal((1, 9, 11)).astype(np.float32)
  tokens = rng.integers(0, 11, (1, 9))
  ours = np.asarray(data.nll(jnp.asarray(logits), jnp.asarray(tokens)))[0]
  np.testing.assert_allclose(crosscheck.segment_nll(logits[0], tokens[0]), ours, rtol=1e-5)


def test_compressed_tiny_model_exports_with_the_same_perplexity(tiny, tmp_path):
  method, quant, quantizer = "sparsegpt", "q4_0", "gptq"  # the joint solver
  params, src = tiny
  rng = np.random.default_rng(0)
  calib = rng.integers(0, TINY.vocab_size, (4, 16)).astype(np.int32)
  evals = rng.integers(0, TINY.vocab_size, (3, 16)).astype(np.int32)
  jparams = jax.tree.map(jnp.asarray, params)
  new, masks, quants = prune_llm.compress(
    TINY, jparams, calib, method, 0.5, quant=quant, quantizer=quantizer, log=lambda s: None
  )
  assert len(quants) == TINY.n_layers * len(KERNELS)
  fwd = prune_llm.forward_fn(TINY)
  ppl = data.perplexity(lambda t: fwd(new, t), evals)
  n, ppl_file = prune_llm.export_gguf(tmp_path / "m.gguf", TINY, new, quants, quant, src, evals)
  assert n == os.path.getsize(tmp_path / "m.gguf")
  assert ppl_file == pytest.approx(ppl, rel=1e-6)
  _, back = loader.load_gguf(tmp_path / "m.gguf")
  for path, q in quants.items():
    blk, rel = path.split("/", 1)
    m = np.asarray(gguf_export._get(masks[blk], rel))
    got = gguf_export._get(back[blk], rel)
    assert np.all(got[~m] == 0.0) and np.mean(m) == pytest.approx(0.5)
    assert np.array_equal(got, np.asarray(oneshot.dequantize(q)))
