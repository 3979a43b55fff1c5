"""Per-leaf size, non-zeros and sparsity of a pytree, with a printable table."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import numpy as np

from jaxprune.paths import path_str


class LeafSummary(NamedTuple):
  path: str
  shape: tuple
  size: int
  nonzeros: int
  note: str = ""
  flops_dense: Optional[int] = None  # Forward FLOPs of the products using this leaf.
  flops_sparse: Optional[float] = None

  @property
  def sparsity(self) -> float:
    return 1.0 - self.nonzeros / self.size if self.size else 0.0


class Summary(NamedTuple):
  """Rows per leaf plus the total; ``str(summary)`` is an aligned table."""

  rows: tuple
  total: LeafSummary

  def __str__(self) -> str:
    header = ("parameter", "shape", "size", "nonzeros", "sparsity", "")
    lines = [
      (r.path, str(r.shape), str(r.size), str(r.nonzeros), f"{r.sparsity:.4f}", r.note)
      for r in (*self.rows, self.total)
    ]
    if self.total.flops_dense is not None:  # FLOPs columns before the note.
      header = (*header[:5], "dense FLOPs", "sparse FLOPs", "")
      lines = [
        (*line[:5], *_flops_cells(r), line[5]) for line, r in zip(lines, (*self.rows, self.total))
      ]
    left = (0, 1, len(header) - 1)
    widths = [max(len(x) for x in col) for col in zip(header, *lines)]
    fmt = lambda row: "  ".join(
      c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
    ).rstrip()
    rule = "-" * len(fmt(tuple("-" * w for w in widths)))
    return "\n".join([fmt(header), rule, *map(fmt, lines[:-1]), rule, fmt(lines[-1])])

  def as_dict(self) -> dict:
    """``{path: sparsity}`` plus ``"total"``."""
    return {**{r.path: r.sparsity for r in self.rows}, "total": self.total.sparsity}


def _flops_cells(row: LeafSummary) -> tuple:
  if row.flops_dense is None:
    return ("", "")
  return (f"{row.flops_dense:,}", f"{row.flops_sparse:,.0f}")


def summary(tree, masks=None, notes: Optional[dict] = None, algorithm=None, flops=None) -> Summary:
  """Summarises a tree of arrays (params, or a masks tree on its own).

  Args:
    tree: params (non-zeros counted) or masks (True entries counted).
    masks: optional masks for ``tree``; when given, kept entries are counted
      from the masks (broadcast to each parameter's shape) instead of the values.
    notes: optional ``{path: text}`` shown in the last column.
    algorithm: optional; with a structured ``sparsity_type``, the leaves it
      skipped because their shape cannot take the pattern are noted with the
      reason.
    flops: optional ``jaxprune.flops(...)`` result of the same params; its
      per-layer dense and sparse forward FLOPs are shown next to the sparsity
      (the total row: the whole model, products without a parameter included).
  """
  notes = dict(notes or {})
  if (
    algorithm is not None
    and algorithm.config.get("sparsity_type", "unstructured") != "unstructured"
  ):
    from jaxprune import structured

    cfg = algorithm.config
    notes = {
      **structured.incompatibility_notes(
        tree, cfg["sparsity_type"], cfg["include"], cfg.get("axis")
      ),
      **notes,
    }
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  mflat = [None] * len(flat) if masks is None else jax.tree.leaves(masks)
  if len(mflat) != len(flat):
    raise ValueError(f"summary: masks have {len(mflat)} leaves but the tree has {len(flat)}")
  rows = []
  for (p, x), m in zip(flat, mflat):
    x = np.asarray(x)
    counted = x if m is None else np.broadcast_to(np.asarray(m), x.shape)
    path = path_str(p)
    rows.append(
      LeafSummary(
        path, tuple(x.shape), int(x.size), int(np.count_nonzero(counted)), notes.get(path, "")
      )
    )
  total = LeafSummary("total", (), sum(r.size for r in rows), sum(r.nonzeros for r in rows))
  if flops is not None:
    per_leaf = flops.as_dict()
    rows = [r._replace(flops_dense=per_leaf.get(r.path, (None,))[0]) for r in rows]
    rows = [
      r._replace(flops_sparse=per_leaf[r.path][1]) if r.flops_dense is not None else r for r in rows
    ]
    total = total._replace(flops_dense=flops.dense, flops_sparse=flops.sparse)
  return Summary(tuple(rows), total)
