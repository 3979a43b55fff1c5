"""Cost of SET/RigL mask-update steps, relative to a dense training step.

Flax MLP 784-1024-1024-10, batch 256, Adam, 90% sparsity (ERK). Dense steps
and sparse steps are interleaved in one process; each figure is the median over
rounds of the step time divided by the dense step time of the same round, with
its interquartile range. A mask-update step runs the exact
top-k selections (drop by magnitude, grow by |grad| or at random) for every
layer, inside the jitted step.

    python benchmarks/mask_update.py [--rounds 20]
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import optax
from common import interleaved_times, make_step, paired_ratios, setup

import jaxprune


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--rounds", type=int, default=20)
  args = ap.parse_args()
  model, params, batch = setup()
  print(f"devices: {jax.devices()}")

  # update_every=1: every step of "rigl_update"/"set_update" updates the masks;
  # "rigl_plain"/"set_plain" never do within the timed window.
  variants = {
    "dense": optax.adam(1e-3),
    "rigl_update": jaxprune.sparsify(
      optax.adam(1e-3), jaxprune.create("rigl", sparsity=0.9, update_every=1, end_step=10**9)
    ),
    "set_update": jaxprune.sparsify(
      optax.adam(1e-3), jaxprune.create("set", sparsity=0.9, update_every=1, end_step=10**9)
    ),
    "rigl_plain": jaxprune.sparsify(
      optax.adam(1e-3), jaxprune.create("rigl", sparsity=0.9, update_every=10**8, end_step=10**9)
    ),
    "set_plain": jaxprune.sparsify(
      optax.adam(1e-3), jaxprune.create("set", sparsity=0.9, update_every=10**8, end_step=10**9)
    ),
  }
  steps, state = {}, {}
  for name, tx in variants.items():
    steps[name] = make_step(model, tx)
    state[name] = (params, tx.init(params))

  def run(name):
    def fn():
      p, s, loss = steps[name](*state[name], batch)
      loss.block_until_ready()
      state[name] = (p, s)

    return fn

  times = interleaved_times({name: run(name) for name in variants}, rounds=args.rounds)
  ratios = paired_ratios(times)
  for name, ts in times.items():
    med, lo, hi = ratios[name]
    print(
      f"{name:12s} median {np.median(ts) * 1e3:8.2f} ms   ratio to dense {med:.3f} [{lo:.3f}-{hi:.3f}]"
    )

  def line(what, name, digits):
    med, lo, hi = ratios[name]
    return f"{what} / dense step (median of paired ratios, IQR): {med:.{digits}f} [{lo:.{digits}f}-{hi:.{digits}f}]"

  print(line("SET mask-update step", "set_update", 2))
  print(line("SET non-update step", "set_plain", 3))
  print(line("RigL non-update step", "rigl_plain", 3))
  print(line("RigL mask-update step", "rigl_update", 2))


if __name__ == "__main__":
  main()
