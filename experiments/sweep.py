"""Sweeps algorithms x sparsities x seeds and tabulates and plots the results.

    python -m experiments.sweep --steps=3000 --seeds=0,1,2 --workdir=runs/sweep \\
        --results_dir=results

runs every combination of `--algorithms` (default dense, gradual_magnitude,
static, set, rigl), `--sparsities` (default 0.8, 0.9, 0.95, 0.98) and `--seeds`
with `experiments.train` on `--config` (default the Fashion-MNIST MLP), one
workdir per run under `--workdir` (`<algorithm>_sparsity<s>_seed<k>`; dense runs
once per seed as the reference). Runs go one after another, in this process or,
with `--subprocess`, each in its own `python -m experiments.train`.

The sweep is resumable: a run whose workdir holds a `result.json` for the same
config and steps is skipped, an unfinished one resumes from its checkpoint.
Afterwards `--results_dir` (default: `--workdir`) gets

- `results.jsonl`: one result object per run (see `experiments.train`);
- `results.md`: test accuracy, mean ± std over seeds, per algorithm x
  sparsity, with dense as the reference row, and the dataset the runs read;
- `accuracy_vs_sparsity.png` and `layer_sparsity_<algorithm>.png`;
- below the accuracy table, a table with both FLOPs ratios of every algorithm x
  sparsity x length (`inference_flops_ratio`, `training_flops_ratio`; results
  written before runs recorded them get them from their per-layer sparsity,
  `experiments.harness.result`), and `accuracy_vs_training_flops.png`.

Recipe applied to every run (later `--set KEY=VALUE` flags override it):
gradual_magnitude prunes from 10% to 75% of `steps` (Zhu & Gupta's cubic
schedule); SET and RigL update masks every 100 steps from step 0 until 75% of
`steps` with drop fraction 0.3 (the RigL recipe); every algorithm uses its
library default distribution (uniform for magnitude pruning, ERK for static,
SET and RigL). A persistent XLA compilation cache (`--compile_cache`, default
`<workdir>/jax_cache`) spares recompiling identical programs.

Every result records the dataset its run actually read (`dataset`; "digits"
when Fashion-MNIST is missing and the fallback is used); a sweep whose runs
read different datasets writes no table and exits with status 1.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from typing import Iterable, Sequence

DEFAULT_CONFIG = os.path.join(
  os.path.dirname(os.path.abspath(__file__)), "configs", "fmnist_mlp.py"
)
ALGORITHMS = ("dense", "gradual_magnitude", "static", "set", "rigl")
SPARSITIES = (0.8, 0.9, 0.95, 0.98)
DENSE = "dense"
DST = ("set", "rigl")


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One run of the sweep."""

  algorithm: str
  sparsity: float | None  # None for dense.
  seed: int

  @property
  def name(self) -> str:
    if self.sparsity is None:
      return f"{self.algorithm}_seed{self.seed}"
    return f"{self.algorithm}_sparsity{self.sparsity:g}_seed{self.seed}"


def plan(
  algorithms: Sequence[str], sparsities: Sequence[float], seeds: Sequence[int]
) -> list[RunSpec]:
  """Every run of the sweep, seed-major (all of seed 0 first); dense once per seed."""
  runs = []
  for seed in seeds:
    for algo in algorithms:
      if algo == DENSE:
        runs.append(RunSpec(algo, None, seed))
      else:
        runs.extend(RunSpec(algo, float(s), seed) for s in sparsities)
  return runs


def recipe_overrides(algorithm: str, steps: int) -> list[str]:
  """The schedule keys of `algorithm` for a run of `steps` (see module doc)."""
  end = int(0.75 * steps)
  if algorithm == "gradual_magnitude":
    return [
      f"--config.start_step={int(0.1 * steps)}",
      f"--config.end_step={end}",
      "--config.update_every=100",
    ]
  if algorithm in DST:
    return [
      "--config.start_step=0",
      f"--config.end_step={end}",
      "--config.update_every=100",
      "--config.drop_fraction=0.3",
    ]
  return []


def run_argv(
  spec: RunSpec, *, config: str, steps: int, workdir: str, extra: Sequence[str] = ()
) -> list[str]:
  """The `experiments.train` command line of one run (without the program)."""
  argv = [
    f"--config={config}",
    f"--config.algorithm={spec.algorithm}",
    f"--config.seed={spec.seed}",
    f"--config.steps={steps}",
    f"--config.workdir={os.path.join(workdir, spec.name)}",
  ]
  if spec.sparsity is not None:
    argv.append(f"--config.sparsity={spec.sparsity}")
  argv += recipe_overrides(spec.algorithm, steps)
  argv += [a if a.startswith("--config.") else f"--config.{a}" for a in extra]
  return argv


def dataset_of(rows: Iterable[dict]) -> str:
  """The one dataset of `rows`; ValueError if they mix datasets (or lack one).

  A fallback (e.g. Fashion-MNIST missing, digits read instead) shows up here,
  so accuracies on different data never share a table or a plot.
  """
  runs = collections.defaultdict(list)
  for r in rows:
    runs[r.get("dataset")].append(r.get("workdir") or r.get("algorithm"))
  if not runs:
    raise ValueError("no results to tabulate")
  if None in runs:
    raise ValueError(
      f"results without a recorded dataset cannot be tabulated: {sorted(map(str, runs[None]))}"
    )
  if len(runs) > 1:
    listed = "; ".join(f"{d}: {sorted(map(str, w))}" for d, w in sorted(runs.items()))
    raise ValueError(
      f"runs on different datasets cannot share one table: {listed}. "
      "Tabulate each dataset separately (a separate --results_dir)."
    )
  return next(iter(runs))


# ------------------------------------------------------------------ statistics


def aggregate(rows: Iterable[dict]) -> dict:
  """`{(algorithm, target sparsity or None): (mean %, std %, n)}` of test accuracy.

  std is the sample standard deviation over seeds (0.0 for a single seed).
  """
  groups = collections.defaultdict(list)
  for r in rows:
    key = (r["algorithm"], None if r["algorithm"] == DENSE else r["target_sparsity"])
    groups[key].append(100.0 * r["test_accuracy"])
  out = {}
  for key, values in groups.items():
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    out[key] = (mean, std, n)
  return out


def markdown_table(
  rows: Sequence[dict],
  algorithms: Sequence[str] | None = None,
  sparsities: Sequence[float] | None = None,
) -> str:
  """Test accuracy (%) as mean ± std (n seeds): algorithms x target sparsities.

  The dense row repeats its single value in every column as the reference.
  Raises ValueError if the rows mix datasets (see `dataset_of`).
  """
  dataset_of(rows)
  stats = aggregate(rows)
  if sparsities is None:
    sparsities = sorted({s for (_, s) in stats if s is not None})
  if algorithms is None:
    algorithms = sorted({a for (a, _) in stats}, key=lambda a: (a != DENSE, a))
  cell = lambda v: "–" if v is None else f"{v[0]:.2f} ± {v[1]:.2f} ({v[2]})"
  lines = [
    "| algorithm | " + " | ".join(f"{s:g}" for s in sparsities) + " |",
    "|---|" + "---|" * len(sparsities),
  ]
  for algo in algorithms:
    if algo == DENSE:
      name, cells = "dense (reference)", [cell(stats.get((DENSE, None)))] * len(sparsities)
    else:
      name, cells = algo, [cell(stats.get((algo, float(s)))) for s in sparsities]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def with_flops(result: dict, config) -> dict:
  """`result` with the FLOPs fields of `experiments.harness.result`; a result
  written before runs recorded them gets them from its per-layer sparsity."""
  from experiments.harness import result as accounting

  if all(k in result for k in accounting.FIELDS):
    return result
  return {**result, **accounting.from_result(result, config)}


def flops_table(
  rows: Sequence[dict],
  algorithms: Sequence[str] | None = None,
  sparsities: Sequence[float] | None = None,
) -> str:
  """Test accuracy (%) with both FLOPs ratios, one line per algorithm x target
  sparsity x length (`steps`): mean ± std (n seeds), the mean
  `inference_flops_ratio` (final masks) and `training_flops_ratio` (the run
  over dense training of the same length); "–" where runs did not record them.
  """
  groups = collections.defaultdict(list)
  for r in rows:
    target = None if r["algorithm"] == DENSE else r["target_sparsity"]
    groups[(r["algorithm"], target, r.get("steps"))].append(r)
  if algorithms is None:
    algorithms = sorted({a for (a, _, _) in groups}, key=lambda a: (a != DENSE, a))
  order = {a: i for i, a in enumerate(algorithms)}
  wanted = lambda s: s is None or sparsities is None or any(abs(s - x) < 1e-9 for x in sparsities)
  keys = sorted(
    (k for k in groups if k[0] in order and wanted(k[1])),
    key=lambda k: (order[k[0]], k[1] or 0.0, k[2] or 0),
  )

  def mean(group, key):
    values = [r[key] for r in group if r.get(key) is not None]
    return f"{sum(values) / len(values):.3f}" if values else "–"

  lines = [
    "| algorithm | sparsity | steps | test accuracy (%) | inference FLOPs (x dense) "
    "| training FLOPs (x dense) |",
    "|---|---|---|---|---|---|",
  ]
  for algo, target, steps in keys:
    group = groups[(algo, target, steps)]
    acc = [100.0 * r["test_accuracy"] for r in group]
    m = sum(acc) / len(acc)
    sd = math.sqrt(sum((a - m) ** 2 for a in acc) / (len(acc) - 1)) if len(acc) > 1 else 0.0
    sparsity = "–" if target is None else f"{target:g}"
    lines.append(
      f"| {algo} | {sparsity} | {steps} | {m:.2f} ± {sd:.2f} ({len(acc)}) "
      f"| {mean(group, 'inference_flops_ratio')} | {mean(group, 'training_flops_ratio')} |"
    )
  return "\n".join(lines)


def write_outputs(
  rows: Sequence[dict],
  results_dir: str,
  algorithms: Sequence[str],
  sparsities: Sequence[float],
  title: str = "",
) -> dict:
  """results.jsonl, results.md and the plots in `results_dir`; returns their paths.

  Raises ValueError, before writing anything, if the rows mix datasets.
  """
  from experiments import plots

  dataset = dataset_of(rows)
  title = f"{title}, {dataset}" if title else dataset
  os.makedirs(results_dir, exist_ok=True)
  paths = {
    "results": os.path.join(results_dir, "results.jsonl"),
    "table": os.path.join(results_dir, "results.md"),
    "accuracy_plot": os.path.join(results_dir, "accuracy_vs_sparsity.png"),
  }
  with open(paths["results"], "w") as f:
    for r in rows:
      f.write(json.dumps(r, sort_keys=True) + "\n")
  table = markdown_table(rows, algorithms, sparsities)
  with open(paths["table"], "w") as f:
    f.write(f"Test accuracy (%), mean ± std over seeds (n runs): {title}\n\n")
    f.write(f"Dataset: {dataset}\n\n")
    f.write(table + "\n")
    f.write("\nWith both FLOPs ratios (one line per length):\n\n")
    f.write(flops_table(rows, algorithms, sparsities) + "\n")
  plots.accuracy_vs_sparsity(rows, paths["accuracy_plot"], title=title)
  paths["flops_plot"] = plots.accuracy_vs_training_flops(
    rows, os.path.join(results_dir, "accuracy_vs_training_flops.png"), title=title
  )
  for algo in algorithms:
    if algo != DENSE and any(r["algorithm"] == algo for r in rows):
      paths[f"layer_plot_{algo}"] = plots.layer_sparsity(
        rows, algo, os.path.join(results_dir, f"layer_sparsity_{algo}.png")
      )
  return paths


# ------------------------------------------------------------------------- runs


def _run_in_process(argv: list[str], log_path: str) -> dict:
  from experiments import harness

  config = harness.parse_config(["train", *argv])
  with open(log_path, "a") as log, contextlib.redirect_stderr(log):
    return harness.run(config, out=log)[1]


def _run_subprocess(argv: list[str], log_path: str, env: dict) -> dict:
  from experiments import harness
  from experiments.harness.result import RESULT_FILE

  with open(log_path, "a") as log:
    proc = subprocess.run(
      [sys.executable, "-m", "experiments.train", *argv],
      stdout=log,
      stderr=subprocess.STDOUT,
      env=env,
    )
  if proc.returncode in (130, 143):
    raise harness.Interrupted(proc.returncode - 128, -1)
  if proc.returncode != 0:
    raise RuntimeError(f"experiments.train exited with status {proc.returncode}; see {log_path}")
  workdir = [a.split("=", 1)[1] for a in argv if a.startswith("--config.workdir=")][-1]
  with open(os.path.join(workdir, RESULT_FILE)) as f:
    return json.load(f)


def _parse_list(text: str, kind):
  return [kind(x) for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog="python -m experiments.sweep",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument(
    "--algorithms",
    default=",".join(ALGORITHMS),
    type=lambda t: _parse_list(t, str),
    help="comma-separated jaxprune.create names (default: %(default)s)",
  )
  p.add_argument(
    "--sparsities",
    default=",".join(map(str, SPARSITIES)),
    type=lambda t: _parse_list(t, float),
    help="comma-separated target sparsities (default: %(default)s)",
  )
  p.add_argument(
    "--seeds",
    default="0,1,2",
    type=lambda t: _parse_list(t, int),
    help="comma-separated seeds (default: %(default)s)",
  )
  p.add_argument(
    "--steps", type=int, default=3000, help="training steps per run (default: %(default)s)"
  )
  p.add_argument(
    "--workdir", default="runs/sweep", help="one run folder per run here (default: %(default)s)"
  )
  p.add_argument(
    "--results_dir",
    default=None,
    help="where results.jsonl, results.md and the plots go (default: --workdir)",
  )
  p.add_argument("--config", default=DEFAULT_CONFIG, help="config file (default: %(default)s)")
  p.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="extra config override for every run (repeatable)",
  )
  p.add_argument("--subprocess", action="store_true", help="one process per run")
  p.add_argument(
    "--compile_cache",
    default=None,
    help="persistent XLA cache dir (default <workdir>/jax_cache; '' disables)",
  )
  args = p.parse_args(list(argv))
  import jaxprune

  unknown = [a for a in args.algorithms if a not in jaxprune.REGISTRY]
  if unknown:
    p.error(f"unknown algorithm(s) {unknown}; known: {sorted(jaxprune.REGISTRY)}")
  bad = [s for s in args.sparsities if not 0.0 <= s < 1.0]
  if bad:
    p.error(f"sparsities must be in [0, 1): {bad}")
  if args.steps < 1:
    p.error("--steps must be >= 1")
  return args


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the sweep; returns the exit status (1 if any run failed)."""
  from experiments import harness
  from experiments.harness import cache as finished

  args = parse_args(sys.argv[1:] if argv is None else argv)
  results_dir = args.results_dir or args.workdir
  cache = (
    os.path.join(args.workdir, "jax_cache") if args.compile_cache is None else args.compile_cache
  )
  env = dict(os.environ)
  if cache:
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.abspath(cache))
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.abspath(cache)
  runs = plan(args.algorithms, args.sparsities, args.seeds)
  t0 = time.time()
  rows, failed = [], []
  for i, spec in enumerate(runs, 1):
    argv_run = run_argv(
      spec, config=args.config, steps=args.steps, workdir=args.workdir, extra=args.set
    )
    run_dir = os.path.join(args.workdir, spec.name)
    config = harness.parse_config(["train", *argv_run])
    result = finished.finished_run(run_dir, config)
    status = "done before"
    if result is None:
      os.makedirs(run_dir, exist_ok=True)
      log_path = os.path.join(run_dir, "log.txt")
      try:
        result = (
          _run_subprocess(argv_run, log_path, env)
          if args.subprocess
          else _run_in_process(argv_run, log_path)
        )
        status = f"{result['wall_s']:.1f} s"
      except harness.Interrupted as e:
        print(
          f"[sweep] interrupted during {spec.name}; rerun the same command to resume", flush=True
        )
        return e.exit_code
      except Exception as e:  # noqa: BLE001 -- report, go on with the others.
        failed.append((spec.name, f"{type(e).__name__}: {e}"))
        print(f"[sweep] {i}/{len(runs)} {spec.name}: FAILED {type(e).__name__}: {e}", flush=True)
        continue
    rows.append({**with_flops(result, config), "target_sparsity": spec.sparsity})
    print(
      f"[sweep] {i}/{len(runs)} {spec.name}: test accuracy {result['test_accuracy']:.4f}, "
      f"sparsity {result['sparsity']:.4f} ({status})",
      flush=True,
    )
  wall = time.time() - t0
  title = f"{os.path.basename(args.config).removesuffix('.py')}, {args.steps} steps"
  if rows:
    try:
      paths = write_outputs(rows, results_dir, args.algorithms, args.sparsities, title)
    except ValueError as e:
      print(f"[sweep] error: {e}", flush=True)
      return 1
    print(markdown_table(rows, args.algorithms, args.sparsities))
    print(
      f"[sweep] {len(rows)} runs in {wall:.0f} s; wrote " + ", ".join(sorted(paths.values())),
      flush=True,
    )
  for name, error in failed:
    print(f"[sweep] FAILED {name}: {error}", flush=True)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
