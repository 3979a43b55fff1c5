"""Dense vs RigL at 90% sparsity on offline Fashion-MNIST, in a few CPU minutes.

    python -m experiments.demo                # 2000 steps each
    python -m experiments.demo --steps=500    # quicker, less accurate

Trains the LeNet-300-100 MLP of `experiments/configs/fmnist_mlp.py` twice with
`experiments.harness.run` -- densely, then sparse from scratch with RigL (Evci et
al., 2020) at 90% sparsity (ERK, mask updates every 100 steps until 75% of
training) -- prints each run's per-layer sparsity table, then both test
accuracies. Runs live in `--workdir` (default /tmp/jaxprune_demo); rerunning the
same command reuses the finished runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from experiments import harness

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "fmnist_mlp.py")


def run_argv(algorithm: str, steps: int, workdir: str) -> list[str]:
  argv = [
    "demo",
    f"--config={CONFIG}",
    f"--config.algorithm={algorithm}",
    f"--config.steps={steps}",
    f"--config.workdir={os.path.join(workdir, algorithm)}",
  ]
  if algorithm == "rigl":
    argv += [
      "--config.sparsity=0.9",
      "--config.start_step=0",
      f"--config.end_step={int(0.75 * steps)}",
      "--config.update_every=100",
    ]
  return argv


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
    prog="python -m experiments.demo",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--steps", type=int, default=2000, help="steps per run (default: %(default)s)")
  p.add_argument(
    "--workdir", default="/tmp/jaxprune_demo", help="where the two runs live (default: %(default)s)"
  )
  args = p.parse_args(sys.argv[1:] if argv is None else argv)
  results = {}
  for algorithm in ("dense", "rigl"):
    print(f"\n=== {algorithm} ===", flush=True)
    config = harness.parse_config(run_argv(algorithm, args.steps, args.workdir))
    _, results[algorithm] = harness.run(config)
  dense, rigl = results["dense"], results["rigl"]
  print(f"\ndense:          test accuracy {dense['test_accuracy']:.4f}")
  print(
    f"rigl (90%):     test accuracy {rigl['test_accuracy']:.4f}, "
    f"sparsity {rigl['sparsity']:.4f} of the kernels"
  )
  print(
    json.dumps(
      {
        "dense_accuracy": dense["test_accuracy"],
        "rigl_accuracy": rigl["test_accuracy"],
        "rigl_sparsity": rigl["sparsity"],
        "steps": args.steps,
      }
    )
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
