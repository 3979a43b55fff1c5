"""Cost of SET/RigL mask-update steps, relative to a dense training step.

Flax MLP 784-1024-1024-10, batch 256, Adam, 90% sparsity (ERK). Dense steps
and sparse steps are interleaved in one process; each figure is a median step
time divided by the median dense step time. A mask-update step runs the exact
top-k selections (drop by magnitude, grow by |grad| or at random) for every
layer, inside the jitted step.

    python benchmarks/mask_update.py [--rounds 20]
"""

from __future__ import annotations

import argparse

import jax
import optax
from common import interleaved, make_step, setup

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

  med = interleaved({name: run(name) for name in variants}, rounds=args.rounds)
  for name, t in med.items():
    print(f"{name:12s} median {t * 1e3:8.2f} ms   ratio to dense {t / med['dense']:.2f}")
  print(f"SET mask-update step / dense step (median): {med['set_update'] / med['dense']:.2f}")
  print(f"SET non-update step / dense step (median): {med['set_plain'] / med['dense']:.3f}")
  print(f"RigL non-update step / dense step (median): {med['rigl_plain'] / med['dense']:.3f}")
  print(f"RigL mask-update step / dense step (median): {med['rigl_update'] / med['dense']:.2f}")


if __name__ == "__main__":
  main()
