"""Regenerates the result tables of ``docs/results/*.md`` from the data in ``results/``.

A page marks each generated table with two lines::

  <!-- generated: NAME -->
  | ... the table ... |
  <!-- /generated -->

and ``python -m experiments.report`` rewrites the text between them with
``TABLES[NAME]()``, computed from the JSON the experiment scripts wrote
(``experiments.sweep``, ``experiments.toolbox``, ``experiments.lottery``).
``python -m experiments.report --check`` changes nothing and exits 1 naming
every stale table (the test suite runs it). Tables with no data under
``results/`` are written by hand on the pages, outside such markers.

Conventions: sweep tables are in percent with the sample standard deviation
over seeds (as ``experiments.sweep`` writes them); toolbox and lottery tables
are fractions with the population standard deviation (``numpy.std``), as
``experiments.toolbox`` prints them. The best mean of a column is in bold.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
from typing import Callable, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "results")
PAGES = os.path.join(ROOT, "docs", "results")
REGION = re.compile(r"(<!-- generated: ([\w-]+) -->\n)(.*?)(<!-- /generated -->)", re.S)


@functools.lru_cache(maxsize=None)
def _json(name: str):
  with open(os.path.join(RESULTS, name)) as f:
    return json.load(f)


def _jsonl(name: str) -> list[dict]:
  with open(os.path.join(RESULTS, name)) as f:
    return [json.loads(line) for line in f if line.strip()]


def _mean_std(values) -> tuple[float, float]:
  v = np.asarray(values, float)
  return float(v.mean()), float(v.std())


def _cell(values) -> str:
  mean, std = _mean_std(values)
  return f"{mean:.4f}" + (f" ± {std:.4f}" if len(values) > 1 else "")


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines)


def _bold_best(rows: list[list[str]], means: list[list[float | None]], first: int) -> None:
  """Puts the best mean of every column from ``first`` on in bold, in place."""
  for j in range(first, len(rows[0])):
    col = [m[j] for m in means if m[j] is not None]
    if not col:
      continue
    best = max(col)
    for row, m in zip(rows, means):
      if m[j] is not None and m[j] == best:
        row[j] = f"**{row[j].split(' (')[0]}**" + (
          " (" + row[j].split(" (", 1)[1] if " (" in row[j] else ""
        )


def _pct(s: float) -> str:
  return f"{100 * s:g}%"


# ------------------------------------------------------------------ sweeps


def with_inferred_dataset(rows: list[dict]) -> list[dict]:
  """Rows that predate the ``dataset`` field, given ``fashion_mnist`` where that is provable.

  Fashion-MNIST has 10,000 test images and the digits fallback 297: every
  accuracy of a Fashion-MNIST run is a multiple of 1/10,000, and (being
  none of 1/297) not a digits result. Anything else raises.
  """
  out = []
  for r in rows:
    if "dataset" not in r:
      hits = r["test_accuracy"] * 10_000
      if abs(hits - round(hits)) > 1e-6 or abs(r["test_accuracy"] * 297 % 1) < 1e-6:
        raise ValueError(f"{r.get('workdir')}: no dataset recorded, and none can be inferred")
      r = {**r, "dataset": "fashion_mnist"}
    out.append(r)
  return out


def sweep_accuracy(path: str, algorithms: Sequence[str] | None = None) -> str:
  from experiments import sweep

  rows = with_inferred_dataset(_jsonl(path))
  return sweep.markdown_table(
    rows, algorithms, sorted({r["target_sparsity"] for r in rows} - {None})
  )


def sweep_flops(path: str, algorithms: Sequence[str] | None = None) -> str:
  from experiments import sweep

  return sweep.flops_table(with_inferred_dataset(_jsonl(path)), algorithms)


LENET_ORDER = ("dense", "gradual_magnitude", "static", "set", "rigl")
PROTOCOL = "rigl_protocol/results.jsonl"
PROTOCOL_ORDER = (
  "dense",
  "static",
  "static_uniform",
  "set",
  "set_uniform",
  "rigl",
  "rigl_uniform",
  "gradual_magnitude",
  "set_3x",
  "rigl_3x",
)

# ----------------------------------------------------------------- toolbox

AT_INIT_METHODS = ("snip", "grasp", "synflow", "magnitude", "random")
AT_INIT_NAMES = {"magnitude": "magnitude (global, at init)", "random": "random (uniform per layer)"}


def at_init(name: str) -> str:
  rows = _json(name)["rows"]
  sparsities = sorted({r["sparsity"] for r in rows})
  out, means = [], []
  for method in AT_INIT_METHODS:
    row, mrow = [AT_INIT_NAMES.get(method, method)], [None]
    for s in sparsities:
      sel = [r for r in rows if r["method"] == method and r["sparsity"] == s]
      acc = [r["test_accuracy"] for r in sel]
      text = _cell(acc)
      collapsed = [r for r in sel if r["collapsed"]]
      if collapsed:
        empty = sorted({layer.split("/")[0] for r in collapsed for layer in r["empty_layers"]})
        why = f": {', '.join(empty)} empty" if empty else ": no path, no layer empty"
        text += f" (collapsed {len(collapsed)}/{len(sel)}{why})"
      row.append(text)
      mrow.append(_mean_std(acc)[0])
    out.append(row)
    means.append(mrow)
  _bold_best(out, means, 1)
  return _table(["method"] + [_pct(s) for s in sparsities], out)


# Row labels of the variant studies (dst_options, sr_ste).
VARIANT_LABELS = {
  "default": "default (zeros, cosine)",
  "default+rescale": "default + rescale_init",
  "random+constant": "grow_init=random, drop_schedule=constant",
  "random+constant+rescale": "random + constant + rescale_init",
  "dense": "dense",
  "gradual_2:4": "gradual 2:4 (cubic ramp 4:4 -> 3:4 -> 2:4)",
  "sr_ste_2:4": "sr_ste 2:4 (decay 2e-4, masks every step)",
  "ste_2:4": "ste 2:4 (no decay)",
}
DST_VARIANTS = ("default", "default+rescale", "random+constant", "random+constant+rescale")


def dst_options(name: str) -> str:
  rows = _json(name)["rows"]
  sparsities = sorted({r["sparsity"] for r in rows})
  table = []
  for algorithm in ("set", "rigl"):
    out, means = [], []
    for variant in DST_VARIANTS:
      row, mrow = [algorithm, VARIANT_LABELS[variant]], [None, None]
      for s in sparsities:
        acc = [
          r["test_accuracy"]
          for r in rows
          if (r["algorithm"], r["variant"], r["sparsity"]) == (algorithm, variant, s)
        ]
        row.append(_cell(acc) if acc else "-")
        mrow.append(_mean_std(acc)[0] if acc else None)
      out.append(row)
      means.append(mrow)
    _bold_best(out, means, 2)
    table += out
  return _table(["algorithm", "variant"] + [_pct(s) for s in sparsities], table)


def regrowth(name: str) -> str:
  rows = _json(name)["rows"]
  layers = list(rows[0]["median_active_abs_w"])
  table = []
  for algorithm in ("set", "rigl"):
    keys = dict.fromkeys(
      (r["grow_init"], r["drop_schedule"]) for r in rows if r["algorithm"] == algorithm
    )
    out, means = [], []
    for grow, schedule in keys:
      sel = [
        r
        for r in rows
        if (r["algorithm"], r["grow_init"], r["drop_schedule"]) == (algorithm, grow, schedule)
      ]
      acc = [r["test_accuracy"] for r in sel]
      med = [np.mean([r["median_active_abs_w"][k] for r in sel]) for k in layers]
      out.append([algorithm, str(grow), schedule, _cell(acc)] + [f"{m:.3g}" for m in med])
      means.append([None, None, None, _mean_std(acc)[0]] + [None] * len(layers))
    _bold_best(out, means, 3)
    table += out
  head = ["algorithm", "grow_init", "drop_schedule", "test accuracy"]
  head += [f"median active \\|w\\| {k.split('/')[0]}" for k in layers]
  return _table(head, table)


def sr_ste(name: str) -> str:
  rows = _json(name)["rows"]
  out, means = [], []
  for variant in dict.fromkeys(r["variant"] for r in rows):
    sel = [r for r in rows if r["variant"] == variant]
    acc = [r["test_accuracy"] for r in sel]
    flags = [r.get("nm_exact") for r in sel]
    exact = "yes" if all(f is True for f in flags) else "no" if False in flags else "not recorded"
    exact = "-" if variant == "dense" else exact
    out.append([VARIANT_LABELS.get(variant, variant), _cell(acc), exact])
    means.append([None, _mean_std(acc)[0], None])
  _bold_best(out, means, 1)
  return _table(["variant", "test accuracy", "masks exactly 2:4 along the input axis"], out)


def rescale(name: str) -> str:
  rows = _json(name)["rows"]
  layers = list(rows[0]["std"])
  out = []
  for r in rows:
    masks, _, how = r["variant"].partition(" ")
    label = "dense" if masks == "dense" else f"{masks if masks == 'uniform' else 'ERK'}, "
    label += {"masked": "masked", "rescaled": "rescale_init"}.get(how, "")
    out.append([_pct(r["sparsity"]), label] + [f"{r['std'][k]:.4f}" for k in layers])
  names = [f"std {k}" + (" (logits)" if k == layers[-1] else "") for k in layers]
  return _table(["sparsity", "masks"] + names, out)


# ----------------------------------------------------------------- lottery


def _remaining(x: float) -> str:
  return f"{100 * x:.3g}%"


def lottery(runs: Sequence[dict]) -> str:
  """Accuracy per round of one or more lottery runs (mean ± std over runs); the
  best of ticket, reinit and random mask per round in bold."""
  out, means = [], []
  for i, row in enumerate(runs[0]["rows"]):
    cells, mrow = [str(row["round"]), _remaining(row["remaining"])], [None, None]
    for kind in ("ticket", "reinit", "random"):
      values = [run["rows"][i][kind] for run in runs]
      if values[0] is None:
        cells.append("-")
        mrow.append(None)
        continue
      cells.append(_cell(values) + (" (dense)" if i == 0 else ""))
      mrow.append(_mean_std(values)[0])
    out.append(cells)
    means.append(mrow)
  for row, m in zip(out[1:], means[1:]):  # the best of the three, per round
    best = max(v for v in m[2:] if v is not None)
    for j in range(2, 5):
      if m[j] == best:
        row[j] = f"**{row[j]}**"
  return _table(["round", "remaining", "ticket", "reinit", "random mask"], out)


# ------------------------------------------------------------------ shrink


def _spread(values, fmt: str = "{:.2f}") -> str:
  """``median [min, max]`` (the value alone for one run)."""
  v = sorted(values)
  if len(v) == 1:
    return fmt.format(v[0])
  return f"{fmt.format(float(np.median(v)))} [{fmt.format(v[0])}, {fmt.format(v[-1])}]"


SHRINK_VARIANTS = {
  "magnitude": ("shrink/fmnist_cnn_c75.jsonl", "kernel L2 norm (default)"),
  "early": (
    "shrink/fmnist_cnn_c75_sched05_35.jsonl",
    "kernel L2 norm, schedule 5% to 35% of the steps (`--schedule=0.05,0.35`)",
  ),
  "bn_scale": (
    "shrink/fmnist_cnn_c75_bn_scale.jsonl",
    "\\|BatchNorm scale\\| (`--score=bn_scale`)",
  ),
  "conv": (
    "shrink/fmnist_cnn_c75_conv.jsonl",
    "kernel L2 norm, Conv layers only (`--layers=conv`; Dense 128 kept)",
  ),
  "conv_early": (
    "shrink/fmnist_cnn_c75_conv_sched05_35.jsonl",
    "Conv layers only, schedule 5% to 35% of the steps (`--layers=conv --schedule=0.05,0.35`)",
  ),
  "conv_earlier": (
    "shrink/fmnist_cnn_c75_conv_sched02_20.jsonl",
    "Conv layers only, schedule 2% to 20% of the steps (`--layers=conv --schedule=0.02,0.2`)",
  ),
  "conv_early_x15": (
    "shrink/fmnist_cnn_c75_conv_sched05_35_x15.jsonl",
    "Conv layers only, schedule 5% to 35%, shrink run trained 1.5x the steps (6000; dense "
    "4000) (`--layers=conv --schedule=0.05,0.35 --steps_factor=1.5`)",
  ),
  "conv_early_tied": (
    "shrink/fmnist_cnn_c75_conv_sched05_35_tied.jsonl",
    "Conv layers only, 5% to 35%, rerun after the fix of `tie_units` (the second conv's and "
    "the Dense layer's weights that read a removed channel are masked, so they no longer "
    "count in the second conv's channel norms) (`--layers=conv --schedule=0.05,0.35`)",
  ),
  "conv_early_taylor": (
    "shrink/fmnist_cnn_c75_conv_taylor_sched05_35.jsonl",
    "Conv layers only, 5% to 35%, first-order Taylor estimate per layer (`--layers=conv "
    "--schedule=0.05,0.35 --score=taylor`; `--skip_dense`, paired with the dense runs of "
    "the row above)",
    "shrink/fmnist_cnn_c75_conv_sched05_35_tied.jsonl",
  ),
  "conv_early_taylor_mean": (
    "shrink/fmnist_cnn_c75_conv_taylor_mean_sched05_35.jsonl",
    "Conv layers only, 5% to 35%, the Taylor estimate squared and averaged over the batches "
    "since the previous mask update, per layer (the paper's estimate; `--layers=conv "
    "--schedule=0.05,0.35 --score=taylor_mean`)",
  ),
  "conv_early_taylor_mean_global": (
    "shrink/fmnist_cnn_c75_conv_taylor_mean_global_sched05_35.jsonl",
    "Conv layers only, 5% to 35%, the averaged Taylor estimate on one threshold over both "
    "convs (the paper's global ranking; `--layers=conv --schedule=0.05,0.35 "
    "--score=taylor_mean --ranking=global`; `--skip_dense`, paired with the dense runs of "
    "the `tie_units` rerun)",
    "shrink/fmnist_cnn_c75_conv_sched05_35_tied.jsonl",
  ),
  "conv_early_taylor_mean_x15": (
    "shrink/fmnist_cnn_c75_conv_taylor_mean_sched05_35_x15.jsonl",
    "Conv layers only, 5% to 35%, averaged Taylor estimate per layer, shrink run trained "
    "1.5x the steps (6000; dense 4000) (`--layers=conv --schedule=0.05,0.35 "
    "--score=taylor_mean --steps_factor=1.5`)",
  ),
  "conv_early_taylor_mean_m09": (
    "shrink/fmnist_cnn_c75_conv_taylor_mean_m09_sched05_35.jsonl",
    "Conv layers only, 5% to 35%, averaged Taylor estimate per layer with the reference "
    "code's criterion momentum 0.9 over the mask updates (`--layers=conv "
    "--schedule=0.05,0.35 --score=taylor_mean --taylor_momentum=0.9`; `--skip_dense`, "
    "paired with the dense runs of the `tie_units` rerun)",
    "shrink/fmnist_cnn_c75_conv_sched05_35_tied.jsonl",
  ),
  "conv_early_taylor_mean_f30": (
    "shrink/fmnist_cnn_c75_conv_taylor_mean_f30_sched05_35.jsonl",
    "Conv layers only, 5% to 35%, averaged Taylor estimate per layer, a mask update every "
    "30 steps as in the reference code (`--layers=conv --schedule=0.05,0.35 "
    "--score=taylor_mean --config.update_every=30`; `--skip_dense`, paired with the dense "
    "runs of the `tie_units` rerun)",
    "shrink/fmnist_cnn_c75_conv_sched05_35_tied.jsonl",
  ),
  "conv_early_bn": (
    "shrink/fmnist_cnn_c75_conv_bn_sched05_35.jsonl",
    "Conv layers only, 5% to 35%, \\|BatchNorm scale\\| per layer "
    "(`--layers=conv --schedule=0.05,0.35 --score=bn_scale`; `--skip_dense`, paired with "
    "the dense runs of the `--layers=conv --schedule=0.05,0.35` row)",
    "shrink/fmnist_cnn_c75_conv_sched05_35.jsonl",
  ),
  "conv_early_global": (
    "shrink/fmnist_cnn_c75_conv_global_sched05_35.jsonl",
    "Conv layers only, 5% to 35%, \\|BatchNorm scale\\| on one threshold over both convs "
    "(`--layers=conv --schedule=0.05,0.35 --score=bn_scale --ranking=global`)",
  ),
  "conv_early_slim": (
    "shrink/fmnist_cnn_c75_conv_slim_sched05_35.jsonl",
    "Conv layers only, 5% to 35%, network slimming: the global \\|BatchNorm scale\\| "
    "ranking with the L1 term 1e-4 on the scales while pruning runs "
    "(`--layers=conv --schedule=0.05,0.35 --score=bn_scale --ranking=global --bn_l1=1e-4`)",
  ),
  "conv2_early": (
    "shrink/fmnist_cnn_c75_conv2_sched05_35.jsonl",
    "second conv only (first conv kept whole, so 50% of all conv channels), 5% to 35% "
    "(`--layers=conv --keep_whole=Conv_0 --schedule=0.05,0.35`)",
  ),
}


def _widths(rows) -> str:
  """The final hidden widths, once if every seed has the same, else per seed."""
  each = ["-".join(str(w) for w in r["widths_after"]) for r in rows]
  return each[0] if len(set(each)) == 1 else ", ".join(each)


def shrink_cnn() -> str:
  """fmnist_cnn at 75% channels, one row per variant, medians [min, max] over
  seeds. A `--skip_dense` run is paired with the dense run of its seed in the
  variant's third entry, else in the default variant's file (deterministic on
  CPU: same seed, data order, steps)."""
  dense = {r["seed"]: r for r in _jsonl(SHRINK_VARIANTS["magnitude"][0])}
  out = []
  for name, label, *paired in SHRINK_VARIANTS.values():
    if not os.path.exists(os.path.join(RESULTS, name)):
      continue
    rows = _jsonl(name)
    acc = [100 * r["shrink_accuracy"] for r in rows]
    pairs = {r["seed"]: r for r in _jsonl(paired[0])} if paired else dense
    base = lambda r: r["dense_accuracy"] or pairs[r["seed"]]["dense_accuracy"]
    diff = [100 * (r["shrink_accuracy"] - base(r)) for r in rows]
    timed = [r for r in rows if r["speedup_wall"] is not None]
    speed = _spread([r["speedup_wall"] for r in timed]) if timed else "not timed"
    tail = [r["speedup_after_last_compaction"] for r in timed]
    out.append(
      [
        label,
        ", ".join(str(r["seed"]) for r in rows),
        _spread(acc),
        _spread(diff, "{:+.2f}"),
        _widths(rows),
        _spread([100 * r["final_params_ratio"] for r in rows], "{:.1f}"),
        speed,
        _spread(tail) if tail else "-",
        _spread([r["shrink_compile_s"] for r in rows], "{:.1f}"),
        _spread([r["ideal_speedup_flops"] for r in rows]),
        _spread([r["inference_speedup"] for r in rows]),
      ]
    )
  dense_acc = _spread([100 * r["dense_accuracy"] for r in dense.values()])
  head = [
    f"variant (dense: {dense_acc} %)",
    "seeds",
    "shrink acc (%)",
    "vs dense (points)",
    "final widths",
    "final params (%)",
    "speedup_wall",
    "step speedup after last compaction",
    "shrink compile s",
    "ideal (FLOPs)",
    "inference speedup",
  ]
  return _table(head, out)


SHRINK_TARGETS = {
  0.5: "shrink/fmnist_cnn_c50.jsonl",
  0.75: "shrink/fmnist_cnn_c75.jsonl",
  0.9: "shrink/fmnist_cnn_c90.jsonl",
}

SHRINK_CONV_TARGETS = {
  0.625: "shrink/fmnist_cnn_c625_conv_taylor_mean_sched05_35.jsonl",
  0.75: "shrink/fmnist_cnn_c75_conv_taylor_mean_sched05_35.jsonl",
}


def shrink_targets(targets: dict, first: str = "target") -> str:
  """One row per target of ``{target: JSONL}`` (fmnist_cnn runs of one recipe),
  medians [min, max] over seeds, dense and shrink paired within each run."""
  out = []
  for target, name in targets.items():
    if not os.path.exists(os.path.join(RESULTS, name)):
      continue
    rows = _jsonl(name)
    diff = [100 * (r["shrink_accuracy"] - r["dense_accuracy"]) for r in rows]
    out.append(
      [
        f"{target:.1%}".replace(".0%", "%"),
        _widths(rows),
        ", ".join(str(r["seed"]) for r in rows),
        _spread([100 * r["final_params_ratio"] for r in rows], "{:.1f}"),
        _spread([100 * r["dense_accuracy"] for r in rows]),
        _spread([100 * r["shrink_accuracy"] for r in rows]),
        _spread(diff, "{:+.2f}"),
        ", ".join(f"{d:+.2f}" for d in diff),
        _spread([r["speedup_wall"] for r in rows]),
        _spread([r["speedup_after_last_compaction"] for r in rows]),
        _spread([r["ideal_speedup_flops"] for r in rows]),
        _spread([r["inference_speedup"] for r in rows]),
      ]
    )
  head = [
    first,
    "widths after",
    "seeds",
    "final params (%)",
    "dense acc (%)",
    "shrink acc (%)",
    "vs dense (points)",
    "vs dense by seed",
    "speedup_wall",
    "step speedup after last compaction",
    "ideal (FLOPs)",
    "inference speedup",
  ]
  return _table(head, out)


# ------------------------------------------------------------------ tables

TABLES: dict[str, Callable[[], str]] = {
  "lenet-sweep": lambda: sweep_accuracy("results.jsonl", LENET_ORDER),
  "protocol-accuracy": lambda: sweep_accuracy(PROTOCOL, PROTOCOL_ORDER),
  "protocol-flops": lambda: sweep_flops(PROTOCOL, PROTOCOL_ORDER),
  "at-init-mlp": lambda: at_init("toolbox_at_init_fmnist_mlp.json"),
  "at-init-mlp-3000": lambda: at_init("toolbox_at_init_fmnist_mlp_3000.json"),
  "at-init-cnn": lambda: at_init("toolbox_at_init_fmnist_cnn.json"),
  "lottery-3seeds": lambda: lottery(_json("lottery_fmnist_mlp_3seeds.json")["runs"]),
  "lottery-p02": lambda: lottery([_json("lottery_p02_fmnist_mlp.json")]),
  "rescale": lambda: rescale("toolbox_rescale_fmnist_mlp.json"),
  "dst-options": lambda: dst_options("toolbox_dst_options_fmnist_mlp.json"),
  "dst-options-3000": lambda: dst_options("toolbox_dst_options_fmnist_mlp_3000.json"),
  "dst-options-long": lambda: dst_options("toolbox_dst_options_long_fmnist_mlp.json"),
  "regrowth": lambda: regrowth("toolbox_regrowth_fmnist_mlp.json"),
  "sr-ste-mlp": lambda: sr_ste("toolbox_sr_ste_fmnist_mlp.json"),
  "sr-ste-cnn": lambda: sr_ste("toolbox_sr_ste_fmnist_cnn.json"),
  "shrink-cnn": shrink_cnn,
  "shrink-cnn-targets": lambda: shrink_targets(SHRINK_TARGETS),
  "shrink-cnn-conv-targets": lambda: shrink_targets(SHRINK_CONV_TARGETS, "target (convs)"),
}


def render(text: str, where: str = "<page>") -> str:
  """``text`` with every generated region rewritten from ``results/``."""

  def fill(m):
    name = m.group(2)
    if name not in TABLES:
      raise ValueError(f"{where}: unknown generated table {name!r}; known: {sorted(TABLES)}")
    return m.group(1) + TABLES[name]() + "\n" + m.group(4)

  return REGION.sub(fill, text)


def pages() -> list[str]:
  return sorted(os.path.join(PAGES, name) for name in os.listdir(PAGES) if name.endswith(".md"))


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if stale")
  args = parser.parse_args(argv)
  stale = []
  for path in pages():
    with open(path) as f:
      text = f.read()
    new = render(text, os.path.relpath(path, ROOT))
    if new == text:
      continue
    stale.append(os.path.relpath(path, ROOT))
    if not args.check:
      tmp = path + ".tmp"
      with open(tmp, "w") as f:
        f.write(new)
      os.replace(tmp, path)
  verb = "stale" if args.check else "rewritten"
  print(json.dumps({verb: stale}))
  return 1 if (args.check and stale) else 0


if __name__ == "__main__":
  sys.exit(main())
