"""Plots of sweep results (matplotlib, Agg backend: no display needed).

- `accuracy_vs_sparsity(rows, path)`: mean test accuracy (error bars: one
  standard deviation over seeds) against target sparsity, one line per
  algorithm, dense as a horizontal reference band.
- `layer_sparsity(rows, algorithm, path)`: the measured sparsity of each pruned
  layer at every target sparsity for one algorithm (shows how uniform and ERK
  distributions differ).
- `accuracy_vs_training_flops(rows, path)`: test accuracy against training
  FLOPs relative to dense training (`training_flops` of `experiments.train`).

`rows` are the result dicts of `experiments.train` (as in `results.jsonl`).
"""

from __future__ import annotations

import collections
import os
from typing import Iterable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DENSE = "dense"


def save_figure(fig, path: str, dpi: int = 120) -> str:
  """Lays out `fig`, writes it to `path` (creating its folder) and closes it."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  plt.close(fig)
  return path


def finish_remaining_weights_plot(fig, ax, path: str, title: str) -> str:
  """Test accuracy against weights remaining (%, log scale, fewer to the right); saves."""
  ax.set_xscale("log")
  ax.invert_xaxis()
  ax.set_xlabel("weights remaining (%)")
  ax.set_ylabel("test accuracy")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  return save_figure(fig, path)


def _accuracies(rows: Iterable[dict]) -> dict:
  out = collections.defaultdict(list)
  for r in rows:
    key = (r["algorithm"], None if r["algorithm"] == DENSE else r["target_sparsity"])
    out[key].append(100.0 * r["test_accuracy"])
  return out


def accuracy_vs_sparsity(rows: Sequence[dict], path: str, title: str = "") -> str:
  """Writes the accuracy-vs-sparsity plot to `path`; returns `path`."""
  acc = _accuracies(rows)
  sparsities = sorted({s for (_, s) in acc if s is not None})
  algorithms = sorted({a for (a, s) in acc if s is not None}, key=str)
  fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
  x = np.arange(len(sparsities))
  if (DENSE, None) in acc:
    values = np.asarray(acc[(DENSE, None)])
    mean, std = values.mean(), values.std(ddof=1) if len(values) > 1 else 0.0
    ax.axhline(mean, color="black", linestyle="--", linewidth=1, label="dense")
    ax.axhspan(mean - std, mean + std, color="black", alpha=0.08)
  for algo in algorithms:
    means, stds, xs = [], [], []
    for i, s in enumerate(sparsities):
      values = np.asarray(acc.get((algo, s), []))
      if len(values):
        xs.append(i)
        means.append(values.mean())
        stds.append(values.std(ddof=1) if len(values) > 1 else 0.0)
    ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=algo)
  ax.set_xticks(x, [f"{s:g}" for s in sparsities])
  ax.set_xlabel("target sparsity")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(title or "Test accuracy vs sparsity (mean ± std over seeds)")
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def _pruned_layers(rows: Sequence[dict]) -> list[str]:
  layers = set()
  for r in rows:
    for name in r.get("layer_sparsity", {}):
      if name != "total" and name.endswith("kernel"):
        layers.add(name)
  return sorted(layers)


def layer_sparsity(rows: Sequence[dict], algorithm: str, path: str) -> str:
  """Writes `algorithm`'s per-layer sparsity chart to `path`; returns `path`.

  One group of bars per kernel, one bar per target sparsity (mean over seeds).
  """
  rows = [r for r in rows if r["algorithm"] == algorithm]
  layers = _pruned_layers(rows)
  targets = sorted({r["target_sparsity"] for r in rows}, key=lambda s: -1 if s is None else s)
  fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=100)
  width = 0.8 / max(len(targets), 1)
  for j, target in enumerate(targets):
    chosen = [r for r in rows if r["target_sparsity"] == target]
    means = [np.mean([r["layer_sparsity"].get(layer, 0.0) for r in chosen]) for layer in layers]
    ax.bar(
      np.arange(len(layers)) + (j - (len(targets) - 1) / 2) * width,
      means,
      width,
      label="dense" if target is None else f"target {target:g}",
    )
  ax.set_xticks(np.arange(len(layers)), layers, rotation=20, ha="right", fontsize=8)
  ax.set_ylim(0, 1)
  ax.set_ylabel("measured sparsity")
  ax.set_title(f"{algorithm}: sparsity per layer")
  ax.grid(True, axis="y", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def accuracy_vs_training_flops(rows: Sequence[dict], path: str, title: str = "") -> str:
  """Writes test accuracy against training FLOPs to `path`; returns `path`.

  FLOPs are each run's `training_flops` over the dense runs' (the shortest
  dense schedule among `rows`; absolute FLOPs without a dense run), so a 3x
  schedule lands to the right of its 1x run, as in Evci et al. (2020, Fig. 2).
  One series per algorithm and length (`steps`), one marker per target
  sparsity (mean ± std over seeds). Rows without `training_flops` are skipped.
  """
  rows = [r for r in rows if r.get("training_flops") is not None]
  dense = [r for r in rows if r["algorithm"] == DENSE]
  shortest = min((r["steps"] for r in dense), default=None)
  reference = np.mean([r["training_flops"] for r in dense if r["steps"] == shortest] or [1.0])
  lengths = collections.defaultdict(set)
  for r in rows:
    lengths[r["algorithm"]].add(r.get("steps"))
  series = collections.defaultdict(lambda: collections.defaultdict(list))
  for r in rows:
    name = r["algorithm"]
    if len(lengths[name]) > 1:
      name = f"{name}, {r.get('steps')} steps"
    point = series[name][r["target_sparsity"]]
    point.append((r["training_flops"] / reference, 100.0 * r["test_accuracy"]))
  fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
  for name in sorted(series):
    xs, ys, errs, labels = [], [], [], []
    for target, points in sorted(series[name].items(), key=lambda kv: kv[0] or 0.0):
      values = np.asarray(points)
      xs.append(values[:, 0].mean())
      ys.append(values[:, 1].mean())
      errs.append(values[:, 1].std(ddof=1) if len(values) > 1 else 0.0)
      labels.append("" if target is None else f"{target:g}")
    ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=name)
    for x, y, label in zip(xs, ys, labels):
      ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
  ax.set_xscale("log")
  unit = f"dense training, {shortest} steps" if dense else "FLOPs"
  ax.set_xlabel(f"training FLOPs (x {unit})")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(title or "Test accuracy vs training FLOPs (labels: target sparsity)")
  ax.grid(True, which="both", alpha=0.3)
  if series:
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path
