"""Forward and gradient time of the fmnist_cnn CNN at the conv widths shrinking leaves.

  python -m benchmarks.conv_widths [--rounds 10]   (from the repository root)

The Conv-BN CNN of ``experiments/configs/fmnist_cnn.py`` (two Conv 3x3 - BatchNorm -
ReLU - max-pool stages, Dense 128, Dense 10) at its dense widths 32-64 and at the
conv widths that channel pruning leaves (``experiments.shrink``): the forward pass in
inference mode at batch 256 (what ``inference_speedup`` times) and the loss gradient
in training mode at batch 128 (the bulk of a training step). All variants run
interleaved (A B A B ...), jitted; per round, each time is divided by the dense one,
and the median of those ratios (and their IQR) is printed, as speedups (dense /
variant). The last line is the headline: the 8-16 model's gradient and forward
speedups.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import optax

from benchmarks.common import interleaved_times, paired_ratios
from experiments import models, train

WIDTHS = ((32, 64), (32, 16), (24, 16), (16, 16), (16, 8), (12, 12), (8, 16), (4, 16))
CONFIG = "experiments/configs/fmnist_cnn.py"


def name(widths) -> str:
  return "dense" if widths == WIDTHS[0] else "-".join(map(str, widths))


def variant(config, widths):
  """``(forward, gradient)`` thunks that block until their result is ready."""
  c = config.copy_and_resolve_references()
  c.model_kwargs.channels = widths
  model = models.get_model(c, num_classes=10)
  v = models.init_variables(model, jax.random.PRNGKey(0), (28, 28, 1))
  k1, k2 = jax.random.split(jax.random.PRNGKey(1))
  x256 = jax.random.normal(k1, (256, 28, 28, 1))
  x128, y128 = x256[:128], jax.random.randint(k2, (128,), 0, 10)
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))

  def loss(params, x, y):
    out, _ = model.apply(
      {"params": params, "batch_stats": v["batch_stats"]}, x, train=True, mutable=["batch_stats"]
    )
    return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()

  grad = jax.jit(jax.grad(loss))
  return (
    lambda: jax.block_until_ready(forward(v, x256)),
    lambda: jax.block_until_ready(grad(v["params"], x128, y128)),
  )


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rounds", type=int, default=10)
  args = p.parse_args()
  config = train.parse_config(["prog", f"--config={CONFIG}"])
  fwd, grad = {}, {}
  for widths in WIDTHS:
    fwd[name(widths)], grad[name(widths)] = variant(config, widths)
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {args.rounds} rounds")
  out = {}
  for label, fns in (("forward b256", fwd), ("gradient b128", grad)):
    times = interleaved_times(fns, rounds=args.rounds, reps=3)
    ratios = paired_ratios(times)
    for n, ts in times.items():
      med, lo, hi = ratios[n]
      print(
        f"{label:14s} {n:6s} median {np.median(ts) * 1e3:7.2f} ms   speedup vs dense "
        f"{1 / med:.2f} [{1 / hi:.2f}-{1 / lo:.2f}]"
      )
    out[label] = 1 / ratios["8-16"][0]
  print(
    f"8-16 conv widths (75% of the channels removed) vs dense 32-64, median of paired ratios: "
    f"gradient {out['gradient b128']:.2f}x faster, forward {out['forward b256']:.2f}x"
  )


if __name__ == "__main__":
  main()
