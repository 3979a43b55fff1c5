"""Quantisation-aware training (qwix) x sparsity, against post-training quantisation.

    python -m experiments.qat [--config=experiments/configs/fmnist_cnn.py] [--steps=469] \\
        [--precisions=float,int8,int4] [--sparsities=0,0.5,0.9] [--seeds=0,1,2] \\
        [--group_size=32] [--workdir=runs/qat] [--out=results/qat/qat.json] [--config.KEY=V]

Every cell (precision x sparsity x seed) is one `experiments.harness.run` of the
config (data, model, optimizer and loop are the harness's), sparse through
``jaxprune.sparsify``: sparsity 0 is ``dense``, otherwise ``gradual_magnitude``
(Zhu & Gupta 2018) with the schedule `experiments.sweep` uses (10% to 75% of
`steps`, masks updated every 100 steps) and the config's distribution.
Precision ``float`` trains as usual; ``int8``/``int4`` wrap the model with
``qwix.quantize_model`` and ``qwix.QtProvider(jaxprune.qat.qat_rules(bits,
group_size=...))``: symmetric weights per output channel, Dense kernels in
groups of `group_size` along the input axis at int4 (convolutions per-channel,
qwix does not group them); activations stay float.

Each trained model is evaluated as trained (QAT: fake-quantised forward pass)
and after weight-only post-training quantisation (PTQ, round-to-nearest) at
int8 and int4 on the same grid (`jaxprune.qat.fake_quantize`; qwix's own PTQ
convolutions need integer activations as well, which QAT here does not
train with); for each PTQ the number of pruned entries (mask
False) with a non-zero integer code is recorded (it must be 0). A cell's result
is cached in ``<workdir>/<cell>/qat_result.json`` and reused on a rerun.

Writes `--out` (refused if it exists: a finished results file is never
overwritten) with every cell and the table, prints the table, and ends with
one JSON line. `--plot=PATH.png` also draws test accuracy against sparsity;
`--from=RESULTS.json` redraws the table (and `--plot`) of a finished results
file without running anything; `--finished_only=1` tabulates the cells whose
result is cached and lists the others as `missing` instead of running them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Sequence

import jax
import ml_collections
import numpy as np

import jaxprune
from experiments import data, harness, sweep
from experiments.harness import cache, loop, steps
from experiments.harness import checkpoint as ckpt
from experiments.harness.config import check_config
from experiments.harness.result import write_json
from jaxprune import qat

DEFAULT_CONFIG = os.path.join(
  os.path.dirname(os.path.abspath(__file__)), "configs", "fmnist_cnn.py"
)
FLAGS = {
  "config": DEFAULT_CONFIG,
  "steps": "469",
  "precisions": "float,int8,int4",
  "sparsities": "0,0.5,0.9",
  "seeds": "0,1,2",
  "group_size": "32",
  "workdir": "runs/qat",
  "out": "results/qat/qat.json",
  "plot": "",
  "from": "",
  "finished_only": "",
}
PRECISIONS = {"float": None, "int8": 8, "int4": 4}
RESULT_FILE = "qat_result.json"


@dataclasses.dataclass(frozen=True)
class Cell:
  precision: str
  sparsity: float
  seed: int

  @property
  def name(self) -> str:
    return f"{self.precision}_sparsity{self.sparsity:g}_seed{self.seed}"


def parse(argv: Sequence[str]) -> tuple[dict, list[str]]:
  """(flags, `--config.KEY=V` overrides); errors name the flag."""
  flags, overrides = dict(FLAGS), []
  for a in argv[1:]:
    key, eq, value = a[2:].partition("=")
    if a.startswith("--config.") and eq:
      overrides.append(a)
    elif a.startswith("--") and key in FLAGS and eq:
      flags[key] = value
    else:
      raise harness.ConfigError(
        f"unknown argument {a!r}; flags: {', '.join(FLAGS)}, --config.KEY=V"
      )
  bad = [p for p in flags["precisions"].split(",") if p not in PRECISIONS]
  if bad:
    raise harness.ConfigError(f"--precisions: unknown {bad}; one of {', '.join(PRECISIONS)}")
  for s in flags["sparsities"].split(","):
    if not 0.0 <= float(s) < 1.0:
      raise harness.ConfigError(f"--sparsities: {s} is not in [0, 1)")
  if not flags["out"].endswith(".json"):
    raise harness.ConfigError(f"--out must be a .json path, got {flags['out']!r}")
  return flags, overrides


def plan(flags: dict) -> list[Cell]:
  """Seed-major (all of seed 0 first), so a partial grid has whole seeds."""
  return [
    Cell(p, float(s), int(seed))
    for seed in flags["seeds"].split(",")
    for s in flags["sparsities"].split(",")
    for p in flags["precisions"].split(",")
  ]


def cell_config(flags: dict, overrides: list[str], cell: Cell, workdir: str):
  """The `experiments.train` config of `cell` (the harness's parser and checks)."""
  steps = int(flags["steps"])
  algorithm = "dense" if cell.sparsity == 0.0 else "gradual_magnitude"
  argv = [
    "qat",
    f"--config={flags['config']}",
    f"--config.algorithm={algorithm}",
    f"--config.seed={cell.seed}",
    f"--config.steps={steps}",
    f"--config.checkpoint_every={steps}",
    f"--config.eval_every={steps}",
    f"--config.workdir={workdir}",
    *sweep.recipe_overrides(algorithm, steps),
  ]
  if algorithm != "dense":
    argv.append(f"--config.sparsity={cell.sparsity}")
  config = ml_collections.ConfigDict(harness.parse_config(argv + overrides).to_dict())
  check_config(config)
  return config


def quantised_model(model, bits: int | None, group_size: int):
  """`model` wrapped for qwix QAT at `bits` (None: the model itself)."""
  if bits is None:
    return None
  import qwix

  rules = qat.qat_rules(bits, group_size=group_size if bits == 4 else None)
  return qwix.quantize_model(model, qwix.QtProvider(rules))


def ptq_figures(setup: harness.Setup, config, state, masks, bits: int, group_size) -> dict:
  """Test accuracy after weight-only PTQ at `bits` (round-to-nearest on qwix's grid,
  `jaxprune.qat.fake_quantize`) and the pruned entries with a non-zero code."""
  params = jax.device_get(state.params)
  rounded = qat.fake_quantize(params, bits, group_size=group_size)
  eval_step = jax.jit(steps.make_eval_step(setup.model, setup.num_classes))
  evaluation = loop.evaluate(
    eval_step,
    state._replace(params=rounded),
    data.eval_batches(config, source=setup.test_source),
    setup.mesh,
  )
  flat_masks = {
    jaxprune.path_str(k): np.asarray(m) for k, m in jax.tree_util.tree_flatten_with_path(masks)[0]
  }
  nonzero = 0
  for path, codes in qat.tree_codes(params, bits, group_size=group_size).items():
    pruned = ~np.broadcast_to(flat_masks[path], codes.shape)
    nonzero += int(np.count_nonzero(np.asarray(codes)[pruned]))
  return {"accuracy": evaluation["accuracy"], "pruned_nonzero_codes": nonzero}


def run_cell(flags: dict, overrides: list[str], cell: Cell, out) -> dict | None:
  """Trains `cell` (or reads its cached result) and returns its row (None: not
  cached and `--finished_only`)."""
  workdir = os.path.abspath(os.path.join(flags["workdir"], cell.name))
  done = os.path.join(workdir, RESULT_FILE)
  config = cell_config(flags, overrides, cell, workdir)
  row = cache.load(done)
  if row is not None:
    if row.get("config") != ckpt.config_dict(config):
      raise harness.ConfigError(
        f"{done} was made with a different config; move it away or use another --workdir"
      )
    return row
  if flags["finished_only"]:
    return None
  group_size = int(flags["group_size"])
  t0 = time.time()
  base = harness.build(config)
  model = quantised_model(base.model, PRECISIONS[cell.precision], group_size)
  state, result = harness.run(config, model=model, out=out)
  masks = jax.device_get(jaxprune.get_masks(state.opt_state))
  row = {
    "precision": cell.precision,
    "sparsity": cell.sparsity,
    "seed": cell.seed,
    "group_size": group_size,
    "test_accuracy": result["test_accuracy"],
    "measured_sparsity": result["sparsity"],
    "dataset": result["dataset"],
    "steps": result["steps"],
    "train_wall_s": result["wall_s"],
  }
  for bits in (8, 4):
    figures = ptq_figures(base, config, state, masks, bits, group_size if bits == 4 else None)
    row[f"ptq_int{bits}_accuracy"] = figures["accuracy"]
    row[f"ptq_int{bits}_pruned_nonzero_codes"] = figures["pruned_nonzero_codes"]
  row["wall_s"] = round(time.time() - t0, 2)
  row["config"] = ckpt.config_dict(config)
  write_json(done, row)
  return row


def _stats(values: list[float]) -> tuple[float, float, int]:
  n = len(values)
  mean = sum(values) / n
  std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
  return mean, std, n


COLUMNS = (
  ("test_accuracy", "as trained"),
  ("ptq_int8_accuracy", "PTQ int8"),
  ("ptq_int4_accuracy", "PTQ int4"),
)


def table(rows: Sequence[dict]) -> tuple[str, list[dict]]:
  """Markdown table (test accuracy %, mean ± std (n seeds)) and its cells as dicts."""
  groups: dict = {}
  for r in rows:
    groups.setdefault((r["precision"], r["sparsity"]), []).append(r)
  order = list(PRECISIONS)
  lines = [
    "| training | sparsity | " + " | ".join(title for _, title in COLUMNS) + " |",
    "|---|---|" + "---|" * len(COLUMNS),
  ]
  summary = []
  for (precision, sparsity), group in sorted(
    groups.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])
  ):
    entry = {"precision": precision, "sparsity": sparsity, "seeds": len(group)}
    cells = []
    for key, _ in COLUMNS:
      mean, std, n = _stats([100.0 * r[key] for r in group])
      entry[key] = [round(mean, 2), round(std, 2)]
      cells.append(f"{mean:.2f} ± {std:.2f} ({n})")
    name = "float" if precision == "float" else f"QAT {precision}"
    lines.append(f"| {name} | {sparsity:g} | " + " | ".join(cells) + " |")
    summary.append(entry)
  return "\n".join(lines), summary


CURVES = (  # (precision of training, result key, label)
  ("float", "test_accuracy", "float"),
  ("int8", "test_accuracy", "QAT int8"),
  ("int4", "test_accuracy", "QAT int4"),
  ("float", "ptq_int8_accuracy", "float + PTQ int8"),
  ("float", "ptq_int4_accuracy", "float + PTQ int4"),
)


def plot(summary: Sequence[dict], path: str) -> str:
  """Test accuracy (mean, error bars one std over seeds) against sparsity."""
  from experiments import plots

  fig, ax = plots.plt.subplots(figsize=(6, 4))
  for precision, key, label in CURVES:
    points = sorted((e["sparsity"], *e[key]) for e in summary if e["precision"] == precision)
    if points:
      xs, means, stds = zip(*points)
      style = "--" if key.startswith("ptq") else "-"
      ax.errorbar([100 * x for x in xs], means, yerr=stds, fmt=style + "o", capsize=3, label=label)
  ax.set_xlabel("sparsity (%)")
  ax.set_ylabel("test accuracy (%)")
  ax.grid(alpha=0.3)
  ax.legend()
  return plots.save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv if argv is None else argv)
  try:
    flags, overrides = parse(argv)
    if flags["from"]:
      with open(flags["from"]) as f:
        rows = json.load(f)["rows"]
      markdown, summary = table(rows)
      print(markdown)
      if flags["plot"]:
        plot(summary, flags["plot"])
      print(json.dumps({"from": flags["from"], "runs": len(rows), "table": summary}))
      return 0
    out_path = os.path.abspath(flags["out"])
    if os.path.exists(out_path):
      raise harness.ConfigError(f"--out {out_path} exists; choose another path (not overwritten)")
    t0 = time.time()
    rows, missing = [], []
    for cell in plan(flags):
      row = run_cell(flags, overrides, cell, sys.stdout)
      if row is None:
        print(f"[qat] {cell.name}: not run (--finished_only)", flush=True)
        missing.append(cell.name)
        continue
      print(
        f"[qat] {cell.name}: {100 * row['test_accuracy']:.2f} as trained, "
        f"PTQ int8 {100 * row['ptq_int8_accuracy']:.2f}, int4 {100 * row['ptq_int4_accuracy']:.2f}"
        f", pruned non-zero codes {row['ptq_int8_pruned_nonzero_codes']}"
        f"/{row['ptq_int4_pruned_nonzero_codes']} ({row['wall_s']:.0f} s)",
        flush=True,
      )
      rows.append(row)
  except (harness.ConfigError, ckpt.CheckpointError, data.DatasetNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  markdown, summary = table(rows)
  print(markdown)
  os.makedirs(os.path.dirname(out_path), exist_ok=True)
  datasets = sorted({r["dataset"] for r in rows})
  flags_out = {k: v for k, v in flags.items() if k not in ("out", "plot", "from", "finished_only")}
  results = {
    "flags": flags_out,
    "overrides": overrides,
    "table": summary,
    "missing": missing,
    "rows": rows,
  }
  write_json(out_path, results)
  if flags["plot"]:
    plot(summary, flags["plot"])
  nonzero = sum(
    r["ptq_int8_pruned_nonzero_codes"] + r["ptq_int4_pruned_nonzero_codes"] for r in rows
  )
  line = {
    "out": out_path,
    "runs": len(rows),
    "missing": missing,
    "dataset": datasets,
    "pruned_nonzero_codes": nonzero,
    "wall_s": round(time.time() - t0, 1),
    "table": summary,
  }
  print(json.dumps(line))
  return 0


if __name__ == "__main__":
  sys.exit(main())
