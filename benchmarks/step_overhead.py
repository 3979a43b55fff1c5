"""Cost of a sparsified training step that does not update masks, vs dense.

Flax MLP 784-1024-1024-10, batch 256, Adam. The dense step and the same step
through ``jaxprune.sparsify(adam, gradual_magnitude)`` on a non-update step are
timed interleaved in one process; the last line is the median ratio.

    python benchmarks/step_overhead.py [--rounds 30]
"""

from __future__ import annotations

import argparse

import jax
import optax
from common import interleaved, make_step, setup

import jaxprune


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--rounds", type=int, default=30)
  args = ap.parse_args()
  model, params, batch = setup()
  print(f"devices: {jax.devices()}")

  dense_tx = optax.adam(1e-3)
  algo = jaxprune.create(
    "gradual_magnitude", sparsity=0.9, start_step=0, end_step=10**9, update_every=10**8
  )
  sparse_tx = jaxprune.sparsify(optax.adam(1e-3), algo)
  dense_step, sparse_step = make_step(model, dense_tx), make_step(model, sparse_tx)
  state = {"dense": (params, dense_tx.init(params)), "sparse": (params, sparse_tx.init(params))}
  # Move past step 0 (an update step) so every timed sparse step is a non-update step.
  p, s, _ = sparse_step(*state["sparse"], batch)
  state["sparse"] = (p, s)

  def run(name, step):
    def fn():
      p, s, loss = step(*state[name], batch)
      loss.block_until_ready()
      state[name] = (p, s)

    return fn

  med = interleaved(
    {"dense": run("dense", dense_step), "sparse": run("sparse", sparse_step)},
    rounds=args.rounds,
    reps=3,
  )
  print(f"dense step  median {med['dense'] * 1e3:.2f} ms")
  print(f"sparse step median {med['sparse'] * 1e3:.2f} ms (non-update step)")
  print(f"step overhead ratio (sparse/dense, median): {med['sparse'] / med['dense']:.3f}")


if __name__ == "__main__":
  main()
