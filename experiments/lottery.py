"""Lottery tickets: iterative magnitude pruning with rewinding, and its controls.

    python -m experiments.lottery --config=experiments/configs/fmnist_mlp.py \\
        --rounds=N --prune_fraction=0.2 --rewind_step=K [--scope=layer|global] \\
        [--plot=results/lottery.png] [--config.KEY=VALUE ...]

Frankle & Carbin (2019, "The Lottery Ticket Hypothesis: Finding Sparse, Trainable
Neural Networks") with the rewinding of Frankle et al. (2020, "Linear Mode
Connectivity and the Lottery Ticket Hypothesis"):

1. round 0 trains the dense network for `config.steps` steps and keeps its
   weights at step `rewind_step` (K; 0 is the original init);
2. each round prunes `prune_fraction` of the remaining weights of the previous
   round's trained ticket by magnitude (per layer, or with one global
   threshold), rewinds the survivors to their values at step K and retrains
   them with `jaxprune.create("fixed", masks=...)` from step K to the end;
3. at the same masks' sparsity it trains two controls: the same mask with a
   random re-initialisation, and a random mask with the same per-layer
   sparsity (on the rewound weights).

Every run is an `experiments.harness.run` (its loop, checkpoints every
`checkpoint_every` steps, resume after interruption) in its own folder under
`config.workdir`; finished runs are skipped when the command is run again.
Prints a table of test accuracy against remaining weights, writes the plot,
and ends with one JSON line.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
from typing import Sequence

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

import jaxprune
from experiments import harness
from experiments.harness import cache
from experiments.harness.config import check_config

KINDS = ("ticket", "reinit", "random")
FLAGS = {"rounds": 3, "prune_fraction": 0.2, "rewind_step": 0, "scope": "layer", "plot": ""}


def split_argv(argv: Sequence[str]) -> tuple[dict, list[str]]:
  """``(lottery flags, the argv left for experiments.harness.parse_config)``."""
  flags, rest = dict(FLAGS), [argv[0]]
  for a in argv[1:]:
    key = a[2:].split("=", 1)[0] if a.startswith("--") else None
    if key in FLAGS:
      if "=" not in a:
        raise harness.ConfigError(f"--{key} needs a value (--{key}=...)")
      value = a.split("=", 1)[1]
      flags[key] = type(FLAGS[key])(value) if not isinstance(FLAGS[key], str) else value
    else:
      rest.append(a)
  if flags["rounds"] < 0:
    raise harness.ConfigError(f"--rounds must be >= 0, got {flags['rounds']}")
  if not 0.0 < flags["prune_fraction"] < 1.0:
    raise harness.ConfigError(f"--prune_fraction must be in (0, 1), got {flags['prune_fraction']}")
  if flags["scope"] not in ("layer", "global"):
    raise harness.ConfigError(f"--scope must be 'layer' or 'global', got {flags['scope']!r}")
  return flags, rest


def dense_masks(params):
  """Full-shape all-True masks for kernels (ndim >= 2), scalar True elsewhere."""
  return jax.tree.map(
    lambda p: jnp.ones(jnp.shape(p), bool) if jnp.ndim(p) >= 2 else jnp.ones((), bool), params
  )


def prune(params, masks, fraction: float, scope: str):
  """Removes ``floor(fraction * active)`` of the active weights by magnitude,
  per leaf (``scope="layer"``) or over all pruned leaves at once (``"global"``)."""
  leaves, treedef = jax.tree.flatten(params)
  mleaves = jax.tree.leaves(masks)
  sel = [np.ndim(m) > 0 for m in mleaves]
  scores = [jnp.where(m, jnp.abs(p), -jnp.inf) for p, m, s in zip(leaves, mleaves, sel) if s]
  active = [int(np.sum(m)) for m, s in zip(mleaves, sel) if s]
  if scope == "global":
    total = sum(active)
    kept = jaxprune.topk_masks(scores, total - math.floor(fraction * total))
  else:
    kept = [jaxprune.topk_mask(s, a - math.floor(fraction * a)) for s, a in zip(scores, active)]
  it = iter(kept)
  return jax.tree.unflatten(treedef, [next(it) if s else m for m, s in zip(mleaves, sel)])


def random_like(masks, params, key):
  """Random masks with exactly the same number of kept entries per leaf."""
  sparsities = jax.tree.map(
    lambda m, p: (np.size(m) - int(np.sum(m))) / np.size(m) if np.ndim(m) else 0.0, masks, params
  )
  out = jaxprune.random_masks(key, params, sparsities)
  return jax.tree.map(lambda o, m: o if np.ndim(m) else m, out, masks)


def remaining(masks) -> float:
  full = [np.asarray(m) for m in jax.tree.leaves(masks) if np.ndim(m)]
  return float(sum(m.sum() for m in full) / sum(m.size for m in full))


def _save(path, tree):
  with open(path + ".tmp", "wb") as f:
    f.write(flax.serialization.to_bytes(jax.device_get(tree)))
  os.replace(path + ".tmp", path)


def _load(path, template):
  with open(path, "rb") as f:
    return flax.serialization.from_bytes(template, f.read())


def run_one(config, workdir: str, params0, masks, start_step: int, stop_at=None, log=None):
  """One `experiments.harness.run` with fixed ``masks`` from ``params0`` at
  ``start_step`` (resumed from its checkpoint when there is one), in ``workdir``,
  to ``config.steps`` or, with the same learning-rate schedule, to ``stop_at``.

  Returns ``(final params, result dict)``; progress goes to ``log`` (default: nowhere).
  """
  config = config.copy_and_resolve_references()
  config.workdir = workdir
  state, result = harness.run(
    config,
    algorithm=jaxprune.create("fixed", masks=masks),
    params0=params0,
    start_step=start_step,
    stop_at=stop_at,
    out=log or io.StringIO(),
  )
  return jax.device_get(state.params), result


def lottery(config, flags: dict, out=None) -> dict:
  """Runs (or resumes) the whole experiment; returns the summary dict."""
  out = out or sys.stdout
  say = lambda *a: print(*a, file=out, flush=True)
  root = os.path.abspath(config.workdir)
  os.makedirs(root, exist_ok=True)
  steps, k = int(config.steps), int(flags["rewind_step"])
  if not 0 <= k < max(steps, 1):
    raise harness.ConfigError(f"--rewind_step must be in [0, config.steps), got {k}")
  seed = int(config.seed)

  # Round 0: dense training; the weights at step K are the rewind point.
  _, init_params, _ = harness.initial_variables(config, seed)
  masks = dense_masks(init_params)
  rewind_path = os.path.join(root, "rewind.msgpack")
  if not os.path.exists(rewind_path):
    if k == 0:
      _save(rewind_path, init_params)
    else:  # the first K steps of round 0 (same data, schedule and init)
      rewound, _ = run_one(config, os.path.join(root, "rewind"), init_params, masks, 0, stop_at=k)
      _save(rewind_path, rewound)
  rewind = _load(rewind_path, init_params)
  _, reinit, _ = harness.initial_variables(config, seed + 10_000)

  rows = []

  def run_cached(name, params0, masks, start):
    """A finished run's final params and result, or the run (its params kept)."""
    folder = os.path.join(root, name)
    final_path = os.path.join(folder, "final.msgpack")

    def fresh():
      final, result = run_one(config, folder, params0, masks, start)
      _save(final_path, final)
      return result

    done = os.path.join(folder, "lottery_result.json")
    result = cache.cached(done, fresh, matches=lambda _: os.path.exists(final_path))
    return _load(final_path, init_params), result

  final, result = run_cached("round_0", init_params, masks, 0)
  dense_acc = result["test_accuracy"]
  rows.append({"round": 0, "remaining": 1.0, "ticket": dense_acc, "reinit": None, "random": None})
  say(f"[lottery] round 0: dense, test accuracy {dense_acc:.4f}")
  for r in range(1, int(flags["rounds"]) + 1):
    masks = prune(final, masks, float(flags["prune_fraction"]), flags["scope"])
    rand = random_like(masks, init_params, jax.random.PRNGKey(seed * 1000 + r))
    row = {"round": r, "remaining": remaining(masks)}
    ticket_final, res = run_cached(f"round_{r}/ticket", rewind, masks, k)
    row["ticket"] = res["test_accuracy"]
    _, res = run_cached(f"round_{r}/reinit", reinit, masks, k)
    row["reinit"] = res["test_accuracy"]
    _, res = run_cached(f"round_{r}/random", rewind, rand, k)
    row["random"] = res["test_accuracy"]
    rows.append(row)
    final = ticket_final
    say(
      f"[lottery] round {r}: {100 * row['remaining']:.2f}% remaining, ticket "
      f"{row['ticket']:.4f}, reinit {row['reinit']:.4f}, random {row['random']:.4f}"
    )

  say(table(rows))
  summary = {
    "config": config.name,
    "dataset": result.get("dataset"),
    "rounds": int(flags["rounds"]),
    "prune_fraction": float(flags["prune_fraction"]),
    "rewind_step": k,
    "scope": flags["scope"],
    "steps": steps,
    "seed": seed,
    "rows": rows,
    "workdir": root,
  }
  if flags["plot"]:
    summary["plot"] = plot(rows, flags["plot"], title=f"{config.name}: lottery tickets (K={k})")
  with open(os.path.join(root, "lottery.json"), "w") as f:
    json.dump(summary, f)
  say(json.dumps(summary))
  return summary


def table(rows) -> str:
  fmt = lambda x: "   -  " if x is None else f"{x:.4f}"
  lines = ["round  remaining  ticket  reinit  random"]
  for row in rows:
    lines.append(
      f"{row['round']:>5}  {100 * row['remaining']:>8.2f}%  {fmt(row['ticket'])}  "
      f"{fmt(row['reinit'])}  {fmt(row['random'])}"
    )
  return "\n".join(lines)


def plot(rows, path: str, title: str = "") -> str:
  from experiments import plots  # matplotlib with the Agg backend

  plt = plots.plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for kind, style in zip(KINDS, ("o-", "s--", "^:")):
    pts = [(100 * r["remaining"], r[kind]) for r in rows if r[kind] is not None]
    if kind == "ticket" or pts:
      ax.plot(*zip(*pts), style, label=kind)
  return plots.finish_remaining_weights_plot(fig, ax, path, title)


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv if argv is None else argv)

  def main_():
    flags, rest = split_argv(argv)
    config = harness.parse_config(rest)
    check_config(config)
    lottery(config, flags)

  return harness.exit_status("lottery", main_)


if __name__ == "__main__":
  sys.exit(main())
