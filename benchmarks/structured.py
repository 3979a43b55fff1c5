"""Inference latency: compacted vs masked MLP, and BCOO vs dense matmul.

  python benchmarks/structured.py [--rounds 15]

1. A 784-2048-2048-10 ReLU MLP (Flax) with 50% and 75% of the hidden neurons
   pruned (jaxprune.structured, L2-norm neuron masks) is run masked at full size
   and after jaxprune.compact.compact, interleaved (A B A B ...), jitted, median
   of ``--rounds``; the measured speedup is printed next to the ideal FLOP ratio.
2. ``x @ W`` for a 2048x2048 W at 90/95/99% unstructured sparsity: dense vs
   ``jax.experimental.sparse.BCOO`` (jaxprune.export.to_bcoo), as measured.

Batch sizes 1 and 256. The last line is the headline figure.
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import MLP, interleaved

from jaxprune.compact import compact
from jaxprune.export import to_bcoo
from jaxprune.structured import structured_mask

SIZES = (784, 2048, 2048, 10)


def mlp_params(rng):
  params = {}
  for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:])):
    params[f"Dense_{i}"] = {
      "kernel": jnp.asarray(rng.normal(size=(a, b)) / math.sqrt(a), jnp.float32),
      "bias": jnp.asarray(rng.normal(size=b) * 0.1, jnp.float32),
    }
  return params


def flops(widths) -> int:
  dims = (SIZES[0], *widths)
  return sum(a * b for a, b in zip(dims[:-1], dims[1:]))


def bench_compact(rng, rounds):
  params = mlp_params(rng)
  big = MLP(SIZES[1:])
  headline = None
  print("== compacted vs masked dense MLP 784-2048-2048-10 (neuron sparsity) ==")
  print(
    f"{'sparsity':>8} {'batch':>5} {'masked ms':>10} {'compact ms':>10} {'speedup':>8} {'ideal':>6}"
  )
  for sparsity in (0.5, 0.75):
    last = f"Dense_{len(SIZES) - 2}"
    masks = {
      name: {
        "kernel": (
          jnp.asarray(True)
          if name == last
          else structured_mask(jnp.abs(layer["kernel"]), sparsity, "neuron")
        ),
        "bias": jnp.asarray(True),
      }
      for name, layer in params.items()
    }
    masked = jax.tree.map(lambda p, m: p * m, params, masks)
    out = compact(params, masks)
    small = MLP(tuple(out.widths))
    ideal = flops(SIZES[1:]) / flops(out.widths)
    f_big = jax.jit(lambda p, x: big.apply({"params": p}, x))
    f_small = jax.jit(lambda p, x: small.apply({"params": p}, x))
    for batch in (1, 256):
      x = jnp.asarray(rng.normal(size=(batch, SIZES[0])), jnp.float32)
      np.testing.assert_allclose(f_small(out.params, x), f_big(masked, x), atol=1e-4)
      t = interleaved(
        {
          "masked": lambda: f_big(masked, x).block_until_ready(),
          "compact": lambda: f_small(out.params, x).block_until_ready(),
        },
        rounds,
        reps=50 if batch == 1 else 2,
      )
      speedup = t["masked"] / t["compact"]
      print(
        f"{sparsity:8.0%} {batch:5d} {t['masked'] * 1e3:10.3f} {t['compact'] * 1e3:10.3f} "
        f"{speedup:7.2f}x {ideal:5.1f}x"
      )
      if sparsity == 0.75 and batch == 256:
        headline = (
          f"compacted 75% neuron sparsity, batch 256: speedup {speedup:.1f}x (ideal {ideal:.1f}x)"
        )
  return headline


def bench_bcoo(rng, rounds):
  n = 2048
  w = jnp.asarray(rng.normal(size=(n, n)), jnp.float32)
  matmul = jax.jit(lambda x, w: x @ w)
  print("== BCOO vs dense matmul, x (batch, 2048) @ W (2048, 2048) ==")
  print(f"{'sparsity':>8} {'batch':>5} {'dense ms':>10} {'bcoo ms':>10} {'bcoo vs dense':>14}")
  for sparsity in (0.9, 0.95, 0.99):
    mask = structured_mask(jnp.abs(w), sparsity, "unstructured")
    wm = w * mask
    ws = to_bcoo({"w": wm}, {"w": mask})["w"]
    for batch in (1, 256):
      x = jnp.asarray(rng.normal(size=(batch, n)), jnp.float32)
      np.testing.assert_allclose(matmul(x, ws), matmul(x, wm), rtol=1e-3, atol=1e-3)
      t = interleaved(
        {
          "dense": lambda: matmul(x, wm).block_until_ready(),
          "bcoo": lambda: matmul(x, ws).block_until_ready(),
        },
        rounds,
        reps=20 if batch == 1 else 1,
      )
      ratio = t["dense"] / t["bcoo"]
      kind = f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"
      print(
        f"{sparsity:8.0%} {batch:5d} {t['dense'] * 1e3:10.3f} {t['bcoo'] * 1e3:10.3f} {kind:>14}"
      )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=15, help="timed rounds per pair (median)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  rng = np.random.default_rng(args.seed)
  print(
    f"jax {jax.__version__}, backend {jax.default_backend()}, "
    f"{jax.device_count()} device(s), rounds={args.rounds}"
  )
  start = time.perf_counter()
  bench_bcoo(rng, args.rounds)
  headline = bench_compact(rng, args.rounds)
  print(f"(total {time.perf_counter() - start:.0f} s)")
  print(headline)


if __name__ == "__main__":
  main()
