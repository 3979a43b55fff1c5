"""Channel pruning, then compaction, of the Fashion-MNIST CNN, end to end.

    python -m experiments.compact_cnn                      # defaults: 200 steps, 50%
    python -m experiments.compact_cnn --steps 1000 --sparsity 0.75 --workdir /tmp/cc

1. Trains the CNN of `experiments/configs/fmnist_cnn.py` (Conv 3x3 -> BatchNorm ->
   ReLU -> max-pool, twice, then Dense 128 and Dense 10) with `experiments.harness.run`
   (the config's Adam and cosine learning rate, its data order and loop), sparse through
   `gradual_magnitude` at `sparsity_type="channel"`: whole output channels of both
   convs and whole units of the hidden Dense are pruned by L2 norm on the cubic
   schedule of Zhu & Gupta (2017); the output layer is left whole. The training run
   lives in `<workdir>/train` (checkpoints, metrics): rerunning the same command
   resumes it, a different one is refused (use another `--workdir`).
2. Evaluates the masked full-size model on the test set.
3. Calls `jaxprune.compact.compact(params, masks, batch_stats)` to remove the pruned
   channels and units, rebuilds the CNN with the returned widths, checks that it
   computes the masked model's function (max |logit difference| on a test batch
   <= 1e-4 in float32), and compares both models: test accuracy, parameter counts,
   FLOPs, inference latency at batch 1 and 256 (jitted, interleaved A B A B,
   medians), and checkpoint sizes written by `jaxprune.export.save_compressed`.
4. Prints a table; the last line is one JSON object with the figures.

BatchNorm and SAME padding. A pruned channel's conv output is 0, but BatchNorm
turns it into the constant `relu(offset - mean * scale / sqrt(var + eps))`. Feeding
a SAME-padded conv, a non-zero constant channel cannot be folded into the next
layer (the zero padding breaks it at the borders), so `compact` would keep it.
The algorithm is therefore wrapped in `jaxprune.shrink.tie_units`, which prunes the
BatchNorm scale and offset (and a bias) of every pruned channel with it (as network
slimming prunes a channel together with its BatchNorm scale, Liu et al. 2017): the
channel then outputs exactly 0 and is removed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jaxprune
from experiments import configs, data, harness, models
from experiments.harness import steps
from experiments.harness.config import create_algorithm
from experiments.harness.inputs import in_memory
from jaxprune import shrink
from jaxprune.compact import compact
from jaxprune.export import load_compressed, save_compressed

# Both convs and the hidden Dense; not the output layer Dense_1.
INCLUDE = r"^(Conv_\d+|Dense_0)/kernel$"
CHECK_BATCH = 256
ATOL = 1e-4


def make_predict(model):
  return jax.jit(lambda variables, x: model.apply(variables, x, train=False))


def evaluate(predict_a, vars_a, predict_b, vars_b, source, batch_size=CHECK_BATCH):
  """Accuracy of both models, prediction disagreements and max |logit diff|."""
  correct_a = correct_b = disagree = total = 0
  max_diff = 0.0
  for batch in data.Batches(source, batch_size, train=False):
    real = batch["mask"]
    la = np.asarray(predict_a(vars_a, batch["image"]))[real]
    lb = np.asarray(predict_b(vars_b, batch["image"]))[real]
    labels = batch["label"][real]
    pa, pb = la.argmax(-1), lb.argmax(-1)
    correct_a += int((pa == labels).sum())
    correct_b += int((pb == labels).sum())
    disagree += int((pa != pb).sum())
    total += int(real.sum())
    max_diff = max(max_diff, float(np.max(np.abs(la - lb))))
  return correct_a / total, correct_b / total, disagree, max_diff, total


# ------------------------------------------------------------------------ figures


def count_params(tree) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def count_kept(params, masks) -> int:
  """Entries whose mask is True (a scalar True mask keeps the whole leaf)."""
  return int(
    sum(
      np.sum(np.broadcast_to(np.asarray(m), np.shape(p)))
      for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks))
    )
  )


def cnn_flops(params, input_shape: Sequence[int]) -> int:
  """Forward FLOPs per example of the CNN: 2 x multiply-adds of its convs and Denses.

  Convs are 3x3 SAME (output size = input size), each followed by a 2x2/2
  max-pool; BatchNorm, ReLU and pooling (a few ops per activation) are left out.
  """
  h, w = input_shape[0], input_shape[1]
  flops, i = 0, 0
  while f"Conv_{i}" in params:
    kh, kw, cin, cout = params[f"Conv_{i}"]["kernel"].shape
    flops += 2 * h * w * kh * kw * cin * cout
    h, w, i = h // 2, w // 2, i + 1
  i = 0
  while f"Dense_{i}" in params:
    n_in, n_out = params[f"Dense_{i}"]["kernel"].shape
    flops += 2 * n_in * n_out
    i += 1
  return int(flops)


def interleaved_latency(fns: dict, x, rounds: int) -> dict[str, float]:
  """Median milliseconds per call of each `fn(x)`, run A B A B (order alternating)."""
  names = list(fns)
  for name in names:  # compile and warm up
    for _ in range(2):
      jax.block_until_ready(fns[name](x))
  times = {name: [] for name in names}
  for r in range(rounds):
    for name in names if r % 2 == 0 else names[::-1]:
      t0 = time.perf_counter()
      jax.block_until_ready(fns[name](x))
      times[name].append(time.perf_counter() - t0)
  return {name: 1e3 * statistics.median(t) for name, t in times.items()}


# -------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog="python -m experiments.compact_cnn", description=__doc__.split("\n")[0]
  )
  p.add_argument("--steps", type=int, default=200, help="training steps")
  p.add_argument(
    "--sparsity",
    type=float,
    default=0.5,
    help="fraction of channels/units removed per pruned layer",
  )
  p.add_argument(
    "--workdir", default="/tmp/jaxprune_compact_cnn", help="where the checkpoints are written"
  )
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--learning-rate", type=float, default=2e-3)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--dataset", default="fashion_mnist", choices=("fashion_mnist", "digits"))
  p.add_argument(
    "--data-dir", default=None, help="TFDS data dir (default: data.default_data_dir())"
  )
  p.add_argument(
    "--eval-examples", type=int, default=0, help="evaluate on the first N test examples (0: all)"
  )
  p.add_argument("--rounds", type=int, default=15, help="latency rounds per model")
  args = p.parse_args(argv)
  if args.steps < 1:
    p.error(f"--steps must be >= 1, got {args.steps}")
  if not 0.0 <= args.sparsity < 1.0:
    p.error(f"--sparsity must be in [0, 1), got {args.sparsity}")
  return args


def train_config(args: argparse.Namespace):
  """The fmnist_cnn config of the training run: `gradual_magnitude` over channels
  (an update every `steps / 20` steps from 10% to 60% of the steps)."""
  config = configs.get_config("fmnist_cnn")
  steps_ = int(args.steps)
  start_step, end_step = steps_ // 10, max(1, int(0.6 * steps_))
  config.dataset = args.dataset
  config.data_dir = args.data_dir
  config.seed = int(args.seed)
  config.steps = steps_
  config.batch_size = int(args.batch_size)
  config.learning_rate = float(args.learning_rate)
  config.eval_every = steps_
  config.log_every = max(1, steps_ // 5)
  config.checkpoint_every = steps_
  config.workdir = os.path.join(args.workdir, "train")
  config.algorithm = "gradual_magnitude"
  config.sparsity = float(args.sparsity)
  config.sparsity_type = "channel"
  config.include = INCLUDE
  config.distribution = None  # the library default (uniform), not the config's RigL values
  config.drop_fraction = None
  config.start_step = min(start_step, end_step)
  config.end_step = end_step
  config.update_every = max(1, steps_ // 20)
  return config


def run(args: argparse.Namespace) -> dict[str, Any]:
  t_start = time.perf_counter()
  config = train_config(args)
  model = models.get_model(config)
  input_shape = data.input_shape(config)

  # 1. Train with channel pruning (BatchNorm and biases tied to their channels).
  algorithm = shrink.tie_units(create_algorithm(config))
  state, trained = harness.run(config, algorithm=algorithm)
  params, batch_stats = jax.device_get((state.params, state.batch_stats))
  masks = jax.device_get(jaxprune.get_masks(state.opt_state))
  test_source = in_memory(data.load(config, "test", args.data_dir), args.eval_examples)
  masked_params = jaxprune.apply_masks(params, masks)
  big_vars = steps.variables(masked_params, batch_stats)

  # 3. Compact and rebuild.
  out = compact(masked_params, masks, batch_stats, conv_padding="SAME")
  n_convs = len(model.channels)
  small = model.clone(channels=tuple(out.widths[:n_convs]), hidden=out.widths[n_convs])
  small_vars = {"params": out.params, "batch_stats": out.batch_stats}
  widths_before = [*model.channels, model.hidden, model.num_classes]

  # Equivalence on one test batch, then accuracy of both (2.) on the test set.
  predict_big, predict_small = make_predict(model), make_predict(small)
  x_check = data.Batches(test_source, CHECK_BATCH, train=False).batch_at(0)["image"]
  check_diff = float(
    jnp.max(jnp.abs(predict_big(big_vars, x_check) - predict_small(small_vars, x_check)))
  )
  print(
    f"max |logit difference| masked vs compacted on {len(x_check)} test images: {check_diff:.3g}",
    flush=True,
  )
  assert check_diff <= ATOL, f"compacted model differs: max |diff| {check_diff} > {ATOL}"
  acc_big, acc_small, disagree, eval_diff, n_eval = evaluate(
    predict_big, big_vars, predict_small, small_vars, test_source
  )

  # Figures.
  params_dense = count_params(params)
  params_kept = count_kept(params, masks)
  params_small = count_params(out.params)
  flops_big = cnn_flops(params, input_shape)
  flops_small = cnn_flops(out.params, input_shape)
  latency = {}
  for bs in (1, 256):
    x = np.resize(x_check, (bs, *x_check.shape[1:]))
    latency[bs] = interleaved_latency(
      {
        "masked": lambda x: predict_big(big_vars, x),
        "compact": lambda x: predict_small(small_vars, x),
      },
      x,
      args.rounds,
    )

  os.makedirs(args.workdir, exist_ok=True)
  path = lambda name: os.path.join(args.workdir, name)
  all_true = jax.tree.map(lambda _: jnp.asarray(True), batch_stats)
  ckpt = {
    "dense": save_compressed(path("dense.jxp"), {"params": params, "batch_stats": batch_stats}),
    "masked": save_compressed(
      path("masked.jxp"),
      {"params": params, "batch_stats": batch_stats},
      {"params": masks, "batch_stats": all_true},
    ),
    "compact": save_compressed(path("compact.jxp"), small_vars),
    "compact_int8": save_compressed(path("compact_int8.jxp"), small_vars, quantize="int8"),
  }
  restored = load_compressed(path("compact.jxp"), like=small_vars)
  assert bool(jnp.all(predict_small(restored, x_check) == predict_small(small_vars, x_check)))

  result = {
    "dataset": trained["dataset"],  # the data actually read (digits when it fell back)
    "steps": args.steps,
    "sparsity": args.sparsity,
    "widths_before": widths_before,
    "widths_after": [int(w) for w in out.widths],
    "eval_examples": n_eval,
    "accuracy_masked": acc_big,
    "accuracy_compact": acc_small,
    "prediction_disagreements": disagree,
    "max_abs_diff_check_batch": check_diff,
    "max_abs_diff_eval": eval_diff,
    "params_dense": params_dense,
    "params_masked_kept": params_kept,
    "params_compact": params_small,
    "flops_masked": flops_big,
    "flops_compact": flops_small,
    "latency_ms": {
      f"batch_{bs}": {k: round(v, 4) for k, v in t.items()} for bs, t in latency.items()
    },
    "speedup_batch_1": latency[1]["masked"] / latency[1]["compact"],
    "speedup_batch_256": latency[256]["masked"] / latency[256]["compact"],
    "checkpoint_bytes": ckpt,
    "notes": out.notes,
    "train_seconds": round(trained["wall_s"], 1),
    "total_seconds": round(time.perf_counter() - t_start, 1),
  }
  print_table(result)
  print(json.dumps(result), flush=True)
  return result


def print_table(r: dict) -> None:
  lat1, lat256 = r["latency_ms"]["batch_1"], r["latency_ms"]["batch_256"]
  ck = r["checkpoint_bytes"]
  rows = [
    ("widths (conv, conv, dense, out)", r["widths_before"], r["widths_after"], ""),
    (
      f"test accuracy ({r['eval_examples']} images)",
      f"{r['accuracy_masked']:.4f}",
      f"{r['accuracy_compact']:.4f}",
      f"{r['prediction_disagreements']} preds differ",
    ),
    (
      "parameters",
      f"{r['params_dense']} ({r['params_masked_kept']} kept)",
      r["params_compact"],
      f"{r['params_dense'] / r['params_compact']:.2f}x fewer",
    ),
    (
      "FLOPs per image",
      r["flops_masked"],
      r["flops_compact"],
      f"{r['flops_masked'] / r['flops_compact']:.2f}x fewer",
    ),
    (
      "latency batch 1 (ms, median)",
      f"{lat1['masked']:.3f}",
      f"{lat1['compact']:.3f}",
      f"{r['speedup_batch_1']:.2f}x",
    ),
    (
      "latency batch 256 (ms, median)",
      f"{lat256['masked']:.3f}",
      f"{lat256['compact']:.3f}",
      f"{r['speedup_batch_256']:.2f}x",
    ),
    (
      "checkpoint bytes (save_compressed)",
      f"{ck['masked']} (dense {ck['dense']})",
      f"{ck['compact']} (int8 {ck['compact_int8']})",
      f"{ck['masked'] / ck['compact']:.2f}x smaller",
    ),
  ]
  header = ("", "masked full-size", "compacted", "")
  cells = [header] + [tuple(str(c) for c in row) for row in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(4)]
  print(
    f"\nchannel sparsity {r['sparsity']}, {r['steps']} steps on {r['dataset']} "
    f"(training {r['train_seconds']} s); max |logit diff| "
    f"{r['max_abs_diff_check_batch']:.3g} on a test batch, "
    f"{r['max_abs_diff_eval']:.3g} over the test set"
  )
  for i, row in enumerate(cells):
    print(
      "  ".join(
        c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))
      ).rstrip()
    )
    if i == 0:
      print("-" * (sum(widths) + 6))
  if r["notes"]:
    print("notes:", r["notes"])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  return run(parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
  main()
