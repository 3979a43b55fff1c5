"""Result tables for pruning at init, SR-STE and the SET/RigL options (issue 10).

    python -m experiments.toolbox --table=at_init --config=experiments/configs/fmnist_mlp.py \\
        [--sparsities=0.9,0.99,0.999] [--seeds=0] [--plot=results/at_init_mlp.png] [--config.KEY=V]
    python -m experiments.toolbox --table=sr_ste --config=experiments/configs/fmnist_cnn.py
    python -m experiments.toolbox --table=dst --config=experiments/configs/fmnist_mlp.py \\
        [--sparsities=0.95,0.98]
    python -m experiments.toolbox --table=regrowth --config=experiments/configs/fmnist_mlp.py \\
        [--sparsities=0.98] --config.steps=10000

Tables:
- ``at_init``: SNIP, GraSP, SynFlow, global magnitude at init and uniform random
  masks, trained with ``fixed`` masks; a ``collapsed`` column says whether some
  pruned layer was cut off (no path from input to output, measured as SynFlow's
  R = 0 on the masked |θ|).
- ``sr_ste``: SR-STE 2:4 from scratch (Zhou et al. 2021) against dense training
  and gradual 2:4 magnitude pruning (the cubic ramp 4:4 -> 3:4 -> 2:4).
- ``dst``: SET and RigL with today's defaults against ``grow_init="random"``,
  ``drop_schedule="constant"``, ``jaxprune.rescale_init`` alone, and all three.
- ``regrowth``: the regrown weights' starting value (``grow_init`` zeros, the
  active weights' std, or the fixed std ``REGROWTH_STD``) crossed with the drop
  schedule, for SET and RigL, with the median active ``|w|`` per layer at the
  end: the ablation behind the ``"random"`` ratchet in long runs.

Every run is an `experiments.harness.run` (checkpointed, resumable, finished runs
skipped on a rerun) under ``config.workdir``. Prints a table and ends with one
JSON line.
"""

from __future__ import annotations

import io
import json
import os
import sys
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import jaxprune
from experiments import harness
from experiments.harness import cache
from experiments.harness.config import check_config
from experiments.harness.steps import variables
from jaxprune.paths import path_str

FLAGS = {"table": "", "sparsities": "", "seeds": "0", "plot": ""}
# The fixed standard deviation of the ``regrowth`` table's float ``grow_init``:
# within LeNet-300-100's LeCun-normal init stds (0.036, 0.058, 0.100).
REGROWTH_STD = 0.05


def _split(argv):
  flags, rest = dict(FLAGS), [argv[0]]
  for a in argv[1:]:
    key = a[2:].split("=", 1)[0] if a.startswith("--") else None
    if key in FLAGS and "=" in a:
      flags[key] = a.split("=", 1)[1]
    else:
      rest.append(a)
  if flags["table"] not in TABLES:
    raise harness.ConfigError(f"--table must be one of {', '.join(TABLES)}, got {flags['table']!r}")
  return flags, rest


def _fresh(config, seed):
  c = ml_collections.ConfigDict(config.to_dict())
  c.seed = int(seed)
  return c


def _cached(workdir, fn):
  return cache.cached(os.path.join(workdir, "toolbox_result.json"), fn)


def _train(config, workdir, algorithm, params0):
  """`experiments.harness.run` of ``algorithm`` from ``params0`` in ``workdir``
  (quietly); returns ``(final params, result)``."""
  config = config.copy_and_resolve_references()
  config.workdir = workdir
  state, result = harness.run(config, algorithm=algorithm, params0=params0, out=io.StringIO())
  return jax.device_get(state.params), result


# ----------------------------------------------------------------------- at init


def _loss(setup, batch_stats):
  def loss(params, batch, temperature=1.0):
    logits = setup.model.apply(variables(params, batch_stats), batch["image"], train=False)
    logits = logits / temperature
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

  return loss


def _apply(setup, batch_stats):
  return lambda p, x: setup.model.apply(variables(p, batch_stats), x, train=False)


def has_path(apply_fn, params, masks, input_shape) -> bool:
  """Positive synaptic flow through the masked |θ| on an all-ones input."""
  kept = jax.tree.map(lambda p, m: jnp.abs(p) * m, params, masks)
  return bool(jnp.sum(apply_fn(kept, jnp.ones(input_shape))) > 0)


def at_init_masks(method, setup, params, batch_stats, config, sparsity, seed):
  from experiments import data

  shape = (1, *data.input_shape(config))
  if method == "synflow":
    return jaxprune.synflow_masks(params, _apply(setup, batch_stats), shape, sparsity)
  if method in ("snip", "grasp"):
    it = data.train_batches(config, source=setup.train_source)
    batches = [
      {"image": jnp.asarray(b["image"]), "label": jnp.asarray(b["label"])}
      for b in (next(it) for _ in range(10))
    ]  # 10 batches (GraSP's 10 per class scale)
    fn = jaxprune.snip_masks if method == "snip" else jaxprune.grasp_masks
    return fn(params, _loss(setup, batch_stats), batches, sparsity)
  pruned = jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)
  if method == "magnitude":
    from jaxprune.algorithms.at_init import global_masks

    return global_masks(jax.tree.map(jnp.abs, params), pruned, sparsity)
  if method == "random":
    return jaxprune.random_masks(
      jax.random.PRNGKey(seed), params, jaxprune.uniform(params, sparsity)
    )
  raise ValueError(method)


def table_at_init(config, sparsities, seeds, say):
  rows = []
  root = config.workdir
  for seed in seeds:
    c = _fresh(config, seed)
    setup, params, batch_stats = harness.initial_variables(c, seed)
    for s in sparsities:
      for method in ("snip", "grasp", "synflow", "magnitude", "random"):
        folder = os.path.join(root, f"{method}_s{s}_seed{seed}")

        def run():
          masks = at_init_masks(method, setup, params, batch_stats, c, s, seed)
          from experiments import data

          path = has_path(_apply(setup, batch_stats), params, masks, (1, *data.input_shape(c)))
          empty = [
            jaxprune.path_str(k)
            for k, m in jax.tree_util.tree_flatten_with_path(masks)[0]
            if np.ndim(m) and not np.asarray(m).any()
          ]
          _, result = _train(c, folder, jaxprune.create("fixed", masks=masks), params)
          return {
            "method": method,
            "sparsity": s,
            "seed": seed,
            "test_accuracy": result["test_accuracy"],
            "collapsed": (not path) or bool(empty),
            "empty_layers": empty,
          }

        row = _cached(folder, run)
        say(
          f"[toolbox] {method} s={s} seed={seed}: {row['test_accuracy']:.4f}"
          + (" (collapsed)" if row["collapsed"] else "")
        )
        rows.append(row)
  return rows


# ------------------------------------------------------------------------ SR-STE


def table_sr_ste(config, sparsities, seeds, say):
  rows = []
  steps = int(config.steps)
  variants = {
    "dense": lambda: jaxprune.create("dense"),
    "gradual_2:4": lambda: jaxprune.create(
      "gradual_magnitude",
      sparsity_type="2:4",
      start_step=int(0.1 * steps),
      end_step=int(0.6 * steps),
      update_every=max(1, steps // 40),
    ),
    "sr_ste_2:4": lambda: jaxprune.create("sr_ste", sparsity_type="2:4"),
    "ste_2:4": lambda: jaxprune.create("ste", sparsity_type="2:4"),
  }
  for seed in seeds:
    c = _fresh(config, seed)
    _, params, _ = harness.initial_variables(c, seed)
    for name, make in variants.items():
      folder = os.path.join(config.workdir, f"{name.replace(':', '_')}_seed{seed}")

      def run():
        algo = make()
        final, result = _train(c, folder, algo, params)
        out = {"variant": name, "seed": seed, "test_accuracy": result["test_accuracy"]}
        if algo.straight_through:
          masks, _ = algo.init(final)
          out["nm_exact"] = _nm_exact(masks)
        return out

      row = _cached(folder, run)
      say(f"[toolbox] {name} seed={seed}: {row['test_accuracy']:.4f}")
      rows.append(row)
  return rows


def _nm_exact(masks) -> bool:
  from jaxprune.structured import group_counts

  return all(
    bool(np.all(group_counts(np.asarray(m), 4, axis=-2) == 2))
    for m in jax.tree.leaves(masks)
    if np.ndim(m)
  )


# ------------------------------------------------------------------- SET / RigL


def median_active_magnitude(params) -> dict:
  """Median ``|w|`` over the nonzero entries of each kernel (``ndim >= 2``), by path."""
  out = {}
  for path, w in jax.tree_util.tree_leaves_with_path(params):
    w = np.abs(np.asarray(w, np.float32))
    if w.ndim >= 2:
      active = w[w != 0]
      out[path_str(path)] = float(np.median(active)) if active.size else 0.0
  return out


def _dst_grid(config, sparsities, seeds, say, variants):
  """SET and RigL runs (ΔT = 100, drop fraction 0.3, updates end at 75%) for
  each ``label -> (create kwargs, rescale_init?, row fields)`` of ``variants``."""
  rows = []
  common = dict(update_every=100, end_step=int(0.75 * int(config.steps)), drop_fraction=0.3)
  for seed in seeds:
    c = _fresh(config, seed)
    _, params, _ = harness.initial_variables(c, seed)
    for s in sparsities:
      for name in ("set", "rigl"):
        for label, (extra, rescale, fields) in variants.items():
          folder = os.path.join(config.workdir, f"{name}_{label}_s{s}_seed{seed}")

          def run():
            algo = jaxprune.create(name, sparsity=s, seed=seed, **common, **extra)
            start = params
            if rescale:
              masks, _ = algo.init(params)
              start = jaxprune.rescale_init(params, masks)
            final, result = _train(c, folder, algo, start)
            return {
              "algorithm": name,
              **fields,
              "sparsity": s,
              "seed": seed,
              "test_accuracy": result["test_accuracy"],
              "median_active_abs_w": median_active_magnitude(final),
            }

          row = _cached(folder, run)
          say(f"[toolbox] {name} {label} s={s} seed={seed}: {row['test_accuracy']:.4f}")
          rows.append(row)
  return rows


def table_dst(config, sparsities, seeds, say):
  random_constant = dict(grow_init="random", drop_schedule="constant")
  variants = {
    v: (extra, "rescale" in v, {"variant": v})
    for v, extra in (
      ("default", {}),
      ("default+rescale", {}),
      ("random+constant", random_constant),
      ("random+constant+rescale", random_constant),
    )
  }
  return _dst_grid(config, sparsities, seeds, say, variants)


def table_regrowth(config, sparsities, seeds, say):
  variants = {}
  for grow in ("zeros", "random", REGROWTH_STD):
    for schedule in ("cosine", "constant"):
      label = grow if isinstance(grow, str) else f"float{grow:g}"
      extra = dict(grow_init=grow, drop_schedule=schedule)
      variants[f"{label}_{schedule}"] = (extra, False, extra)
  return _dst_grid(config, sparsities, seeds, say, variants)


# ------------------------------------------------------------------ rescale_init


def table_rescale(config, sparsities, seeds, say):
  """Std of each Dense layer's output at init on 512 uniform inputs: dense,
  masked (static masks) and masked + ``rescale_init``; no training."""
  from experiments import data

  rows = []
  for seed in seeds:
    setup, params, batch_stats = harness.initial_variables(_fresh(config, seed), seed)
    x = jax.random.uniform(jax.random.PRNGKey(seed + 1), (512, *data.input_shape(config)))

    def stds(p):
      _, st = setup.model.apply(
        variables(p, batch_stats),
        x,
        train=False,
        capture_intermediates=True,
        mutable=["intermediates"],
      )
      inter = st["intermediates"]
      return {
        k: float(np.std(np.asarray(v["__call__"][0]))) for k, v in inter.items() if "Dense" in k
      }

    rows.append({"variant": "dense", "sparsity": 0.0, "seed": seed, "std": stds(params)})
    for s in sparsities:
      for dist in ("uniform", "erk"):
        masks, _ = jaxprune.create("static", sparsity=s, distribution=dist, seed=seed).init(params)
        sparse = jaxprune.apply_masks(params, masks)
        for variant, p in (("masked", sparse), ("rescaled", jaxprune.rescale_init(sparse, masks))):
          rows.append({"variant": f"{dist} {variant}", "sparsity": s, "seed": seed, "std": stds(p)})
  for r in rows:
    say(f"[toolbox] {r['variant']} s={r['sparsity']}: {r['std']}")
  return rows


# --------------------------------------------------------------------- reporting


def _mean_std(values):
  v = np.asarray(values, float)
  return f"{v.mean():.4f}" + (f" ± {v.std():.4f}" if len(v) > 1 else "")


def markdown_rescale(rows) -> str:
  layers = list(rows[0]["std"])
  lines = ["| sparsity | masks | " + " | ".join(f"std {k}" for k in layers) + " |"]
  lines.append("|---|---" + "|---" * len(layers) + "|")
  for r in rows:
    cells = " | ".join(f"{r['std'][k]:.4f}" for k in layers)
    lines.append(f"| {100 * r['sparsity']:g}% | {r['variant']} | {cells} |")
  return "\n".join(lines)


def markdown_at_init(rows) -> str:
  sparsities = sorted({r["sparsity"] for r in rows})
  lines = ["| method | " + " | ".join(f"{100 * s:g}%" for s in sparsities) + " |"]
  lines.append("|---" * (len(sparsities) + 1) + "|")
  for method in ("snip", "grasp", "synflow", "magnitude", "random"):
    cells = []
    for s in sparsities:
      sel = [r for r in rows if r["method"] == method and r["sparsity"] == s]
      if not sel:
        cells.append("-")
        continue
      collapsed = sum(r["collapsed"] for r in sel)
      cells.append(
        _mean_std([r["test_accuracy"] for r in sel])
        + (f" (collapsed {collapsed}/{len(sel)})" if collapsed else "")
      )
    lines.append(f"| {method} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def markdown_regrowth(rows) -> str:
  layers = list(rows[0]["median_active_abs_w"])
  head = "| algorithm | grow_init | drop_schedule | sparsity | test accuracy | "
  lines = [head + " | ".join(f"median active \\|w\\| {k}" for k in layers) + " |"]
  lines.append("|---|---|---|---|---" + "|---" * len(layers) + "|")
  cell = lambda r: (r["algorithm"], r["grow_init"], r["drop_schedule"], r["sparsity"])
  for key in dict.fromkeys(cell(r) for r in rows):
    sel = [r for r in rows if cell(r) == key]
    med = [np.mean([r["median_active_abs_w"][k] for r in sel]) for k in layers]
    cells = [_mean_std([r["test_accuracy"] for r in sel])] + [f"{m:.3g}" for m in med]
    name, grow, schedule, s = key
    lines.append(f"| {name} | {grow} | {schedule} | {100 * s:g}% | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def markdown_sr_ste(rows) -> str:
  lines = ["| variant | test accuracy | exact 2:4 |", "|---|---|---|"]
  for v in dict.fromkeys(r["variant"] for r in rows):
    sel = [r for r in rows if r["variant"] == v]
    nm = "yes" if all(r.get("nm_exact", True) for r in sel) else "no"
    nm = nm if v != "dense" else "-"
    lines.append(f"| {v} | {_mean_std([r['test_accuracy'] for r in sel])} | {nm} |")
  return "\n".join(lines)


def markdown_dst(rows) -> str:
  sparsities = sorted({r["sparsity"] for r in rows})
  lines = ["| algorithm | variant | " + " | ".join(f"{100 * s:g}%" for s in sparsities) + " |"]
  lines.append("|---|---" + "|---" * len(sparsities) + "|")
  for name in ("set", "rigl"):
    for v in dict.fromkeys(r["variant"] for r in rows):
      cells = []
      for s in sparsities:
        sel = [r for r in rows if (r["algorithm"], r["variant"], r["sparsity"]) == (name, v, s)]
        cells.append(_mean_std([r["test_accuracy"] for r in sel]) if sel else "-")
      lines.append(f"| {name} | {v} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def markdown(table, rows) -> str:
  """The markdown table of ``rows`` of table ``table``."""
  return TABLES[table].markdown(rows)


def plot_at_init(rows, path, title):
  from experiments import plots  # matplotlib with the Agg backend

  plt = plots.plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for method in ("snip", "grasp", "synflow", "magnitude", "random"):
    sel = sorted((r for r in rows if r["method"] == method), key=lambda r: r["sparsity"])
    xs = sorted({r["sparsity"] for r in sel})
    ys = [np.mean([r["test_accuracy"] for r in sel if r["sparsity"] == x]) for x in xs]
    ax.plot([100 * (1 - x) for x in xs], ys, "o-", label=method)
  return plots.finish_remaining_weights_plot(fig, ax, path, title)


def plot_bars(rows, path, title):
  from experiments import plots  # matplotlib with the Agg backend

  plt = plots.plt
  if "algorithm" not in rows[0]:  # sr_ste: one bar per variant
    labels = list(dict.fromkeys(r["variant"] for r in rows))
    values = [np.mean([r["test_accuracy"] for r in rows if r["variant"] == v]) for v in labels]
  else:
    variant = lambda r: r.get("variant") or f"{r['grow_init']} {r['drop_schedule']}"
    keys = list(dict.fromkeys((r["algorithm"], variant(r), r["sparsity"]) for r in rows))
    labels = [f"{a} {v}\n{100 * s:g}%" for a, v, s in keys]
    values = [
      np.mean(
        [r["test_accuracy"] for r in rows if (r["algorithm"], variant(r), r["sparsity"]) == k]
      )
      for k in keys
    ]
  fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels)), 4))
  ax.bar(range(len(labels)), values)
  ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
  ax.set_ylim(min(values) - 0.05, max(values) + 0.02)
  ax.set_ylabel("test accuracy")
  ax.set_title(title)
  return plots.save_figure(fig, path)


class Table(NamedTuple):
  """A table of this module: default ``--sparsities``, its runs, its markdown, its plot."""

  sparsities: str
  rows: Callable  # (config, sparsities, seeds, say) -> rows
  markdown: Callable  # rows -> markdown text
  plot: Callable | None  # (rows, path, title) -> path


TABLES = {
  "at_init": Table("0.9,0.99,0.999", table_at_init, markdown_at_init, plot_at_init),
  "sr_ste": Table("", table_sr_ste, markdown_sr_ste, plot_bars),
  "dst": Table("0.95,0.98", table_dst, markdown_dst, plot_bars),
  "regrowth": Table("0.98", table_regrowth, markdown_regrowth, plot_bars),
  "rescale": Table("0.95,0.98", table_rescale, markdown_rescale, None),
}


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv if argv is None else argv)
  say = lambda *a: print(*a, flush=True)
  try:
    flags, rest = _split(argv)
    config = harness.parse_config(rest)
    check_config(config)
    seeds = [int(s) for s in flags["seeds"].split(",") if s]
    table = flags["table"]
    sparsities = [
      float(s) for s in (flags["sparsities"] or TABLES[table].sparsities).split(",") if s
    ]
    config = _fresh(config, config.seed)
    config.workdir = os.path.abspath(config.workdir)
    rows = TABLES[table].rows(config, sparsities, seeds, say)
  except (harness.ConfigError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  text = markdown(table, rows)
  say(text)
  summary = {"table": table, "config": config.name, "steps": int(config.steps), "rows": rows}
  if flags["plot"] and TABLES[table].plot is not None:
    title = f"{config.name}: {table} ({int(config.steps)} steps)"
    summary["plot"] = TABLES[table].plot(rows, flags["plot"], title)
  say(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
