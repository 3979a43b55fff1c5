"""Cost of a sparsified training step that does not update masks, vs dense.

Flax MLP 784-1024-1024-10, batch 256, Adam, 90% sparsity. Three steps are
timed interleaved in one process (A B C A B C ...): the dense step, the masked
step of ``static`` (fixed masks) and a non-update step of ``gradual_magnitude``
(mask updates under ``lax.cond``, not taken). Each figure is the median over
rounds of the step time divided by the dense step time of the same round, with
its interquartile range. Also printed: the peak memory of one
step as XLA plans it (``compiled.memory_analysis()``: arguments, outputs and
temporaries), dense vs sparse. The last line is the masked-step ratio.

    python benchmarks/step_overhead.py [--rounds 30]
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import optax
from common import interleaved_times, make_step, paired_ratios, setup

import jaxprune


def step_memory(step, *args) -> int:
  """Bytes of arguments + outputs + temporaries of one compiled step (no donation)."""
  m = step.lower(*args).compile().memory_analysis()
  return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--rounds", type=int, default=30)
  args = ap.parse_args()
  model, params, batch = setup()
  print(f"devices: {jax.devices()}")

  variants = {
    "dense": optax.adam(1e-3),
    "static": jaxprune.sparsify(optax.adam(1e-3), jaxprune.create("static", sparsity=0.9)),
    "gradual": jaxprune.sparsify(
      optax.adam(1e-3),
      jaxprune.create(
        "gradual_magnitude", sparsity=0.9, start_step=0, end_step=10**9, update_every=10**8
      ),
    ),
  }
  steps, state = {}, {}
  for name, tx in variants.items():
    steps[name] = make_step(model, tx)
    # One step first: step 0 of gradual_magnitude is an update step; every timed step is not.
    p, s, _ = steps[name](params, tx.init(params), batch)
    state[name] = (p, s)

  n_params = sum(x.size for x in jax.tree.leaves(params))
  for name in variants:
    mem = step_memory(steps[name], *state[name], batch)
    print(f"{name:8s} step memory {mem / 2**20:7.1f} MiB ({mem / n_params:.1f} bytes/param)")

  def run(name):
    def fn():
      p, s, loss = steps[name](*state[name], batch)
      loss.block_until_ready()
      state[name] = (p, s)

    return fn

  times = interleaved_times({name: run(name) for name in variants}, rounds=args.rounds, reps=3)
  ratios = paired_ratios(times)
  for name, ts in times.items():
    med, lo, hi = ratios[name]
    print(
      f"{name:8s} median {np.median(ts) * 1e3:8.2f} ms   ratio to dense {med:.3f} [{lo:.3f}-{hi:.3f}]"
    )
  med, lo, hi = ratios["gradual"]
  print(
    f"gradual_magnitude non-update step / dense step (median of paired ratios, IQR): {med:.3f} [{lo:.3f}-{hi:.3f}]"
  )
  med, lo, hi = ratios["static"]
  print(
    f"step overhead ratio (masked static step / dense, median of paired ratios, IQR): {med:.3f} [{lo:.3f}-{hi:.3f}]"
  )


if __name__ == "__main__":
  main()
