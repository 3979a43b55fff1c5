"""Forward-pass FLOPs of a model, dense and with masks.

``flops(apply_fn, params, masks, example_input)`` traces ``apply_fn(params,
example_input)`` to a jaxpr and counts the multiply-adds of every
``dot_general`` (``Dense``, ``einsum``, ``matmul``) and ``conv_general_dilated``
at 2 FLOPs each. Elementwise work (biases, normalisation, activations, pooling)
is not counted: it is small next to the products and does not change with
sparsity. When one operand of a product is a masked parameter, followed through
reshapes, dtype conversions, transposes, broadcasts and masking products, its
sparse count is the dense count times that mask's density: the convention of
Evci et al. (2020, "Rigging the Lottery: Making All Tickets Winners", Appendix
H), where a sparse layer costs its density times the dense layer.

Sub-jaxprs are counted where they run: ``jit``/``pjit``, ``custom_jvp``,
``custom_vjp``, remat and other calls once, a ``scan`` body ``length`` times,
the most expensive branch of a ``cond``, and a ``while`` body once (its trip
count is not known when tracing). Convolutions count every output position in
full, also those whose window covers padding.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import numpy as np

from jaxprune.masks import check_structure, shape_mismatch
from jaxprune.paths import path_str

NO_PARAMETER = "(no parameter)"

# Primitives whose output is the same parameter, rearranged or retyped.
_FOLLOW = frozenset(
  {
    "reshape",
    "convert_element_type",
    "transpose",
    "broadcast_in_dim",
    "squeeze",
    "expand_dims",
    "copy",
    "copy_p",
    "reduce_precision",
    "rev",
    "sharding_constraint",
    "device_put",
    "optimization_barrier",
    "stop_gradient",
    "real",
  }
)
# Elementwise primitives that mask a parameter when only one operand is one.
_MASKING = frozenset({"mul", "select_n"})


class LayerFlops(NamedTuple):
  """FLOPs of the products that use one parameter (or none: ``NO_PARAMETER``).

  Attributes:
    path: the parameter path (``jaxprune.path_str``), or ``NO_PARAMETER`` for
      products of activations only (attention scores, ...).
    dense: FLOPs without masks.
    sparse: FLOPs with the parameter's mask density applied.
  """

  path: str
  dense: int
  sparse: float

  @property
  def density(self) -> float:
    return self.sparse / self.dense if self.dense else 1.0


class Flops(NamedTuple):
  """Forward FLOPs of one call of ``apply_fn`` on ``example_input``.

  Attributes:
    dense: FLOPs with every mask all True.
    sparse: FLOPs with the masks' densities applied.
    layers: one ``LayerFlops`` per parameter used by a product, in order of
      first use, then ``NO_PARAMETER`` if any product used no parameter.
  """

  dense: int
  sparse: float
  layers: tuple

  @property
  def ratio(self) -> float:
    """``sparse / dense`` (1.0 for a model without products)."""
    return self.sparse / self.dense if self.dense else 1.0

  def as_dict(self) -> dict:
    """``{path: (dense, sparse)}``."""
    return {r.path: (r.dense, r.sparse) for r in self.layers}

  def __str__(self) -> str:
    rows = [(r.path, f"{r.dense:,}", f"{r.sparse:,.0f}", f"{r.density:.4f}") for r in self.layers]
    rows.append(("total", f"{self.dense:,}", f"{self.sparse:,.0f}", f"{self.ratio:.4f}"))
    header = ("parameter", "dense FLOPs", "sparse FLOPs", "ratio")
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    fmt = lambda row: "  ".join(
      c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
    )
    rule = "-" * len(fmt(header))
    return "\n".join([fmt(header), rule, *map(fmt, rows[:-1]), rule, fmt(rows[-1])])


def dot_general_flops(lhs_shape, rhs_shape, dimension_numbers) -> int:
  """2 x multiply-adds of ``lax.dot_general``: every lhs entry meets every
  free (non-contracting, non-batch) rhs entry once."""
  (_, rhs_contract), (_, rhs_batch) = dimension_numbers
  rhs_free = [d for i, d in enumerate(rhs_shape) if i not in rhs_contract and i not in rhs_batch]
  return 2 * math.prod(lhs_shape) * math.prod(rhs_free)


def conv_flops(out_shape, rhs_shape, rhs_out_dim: int) -> int:
  """2 x multiply-adds of ``lax.conv_general_dilated``: each output entry
  takes one kernel slice of ``in_features / groups x window`` entries."""
  return 2 * math.prod(out_shape) * (math.prod(rhs_shape) // max(rhs_shape[rhs_out_dim], 1))


def _is_var(v) -> bool:
  return not isinstance(v, jax.extend.core.Literal)


def _shape(v) -> tuple:
  return tuple(v.aval.shape)


def _sub_jaxprs(eqn):
  """``[(jaxpr, consts)]`` of the sub-jaxprs in ``eqn.params`` (cond branches,
  scan and while bodies, calls)."""
  out = []
  for key, value in eqn.params.items():
    if eqn.primitive.name == "while" and key == "cond_jaxpr":
      continue
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(v, jax.extend.core.ClosedJaxpr):
        out.append(v.jaxpr)
      elif isinstance(v, jax.extend.core.Jaxpr):
        out.append(v)
  return out


def _count(jaxpr, origin: dict, add: Callable, scale: float) -> dict:
  """Walks ``jaxpr``; ``origin`` maps vars to parameter indices. Calls
  ``add(lhs_index, rhs_index, dense_flops)`` per product (an index is None for
  an operand that is no parameter) and returns the origins it found."""
  origin = dict(origin)

  def src(v):
    return origin.get(v) if _is_var(v) else None

  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    ins = [src(v) for v in eqn.invars]
    if name == "dot_general":
      dense = dot_general_flops(
        _shape(eqn.invars[0]), _shape(eqn.invars[1]), eqn.params["dimension_numbers"]
      )
      add(ins[0], ins[1], dense * scale)
    elif name == "conv_general_dilated":
      rhs_out_dim = eqn.params["dimension_numbers"].rhs_spec[0]
      dense = conv_flops(_shape(eqn.outvars[0]), _shape(eqn.invars[1]), rhs_out_dim)
      add(ins[0], ins[1], dense * scale)
    elif name in _FOLLOW and ins and ins[0] is not None:
      origin[eqn.outvars[0]] = ins[0]
    elif name in _MASKING and len([i for i in ins if i is not None]) == 1:
      origin[eqn.outvars[0]] = next(i for i in ins if i is not None)
    else:
      subs = _sub_jaxprs(eqn)
      if not subs:
        continue
      if name == "cond":
        # The most expensive branch: the index is not known when tracing.
        best, best_rows = -1.0, []
        for sub in subs:
          rows = []
          _count(sub, _bind(sub, eqn.invars[1:], ins[1:]), lambda *r: rows.append(r), scale)
          total = sum(r[2] for r in rows)
          if total > best:
            best, best_rows = total, rows
        for r in best_rows:
          add(*r)
        continue
      times = eqn.params.get("length", 1) if name == "scan" else 1
      for sub in subs:
        sub_origin = _count(sub, _bind(sub, eqn.invars, ins), add, scale * times)
        if len(sub.outvars) == len(eqn.outvars) and name != "scan":
          for outer, inner in zip(eqn.outvars, sub.outvars):
            if _is_var(inner) and sub_origin.get(inner) is not None:
              origin[outer] = sub_origin[inner]
  return origin


def _bind(sub, outer_vars, outer_origins) -> dict:
  """Origins of ``sub``'s invars: the last ``len(sub.invars)`` outer operands
  (calls and scan pass all; cond drops its index, while its cond consts)."""
  n = len(sub.invars)
  pairs = zip(sub.invars, list(outer_origins)[len(outer_origins) - n :]) if n else ()
  return {v: o for v, o in pairs if o is not None}


def _density(mask, param, path: str) -> float:
  m = np.asarray(mask)
  if m.dtype != np.bool_:
    raise ValueError(f"flops: mask of {path!r} must be boolean, got {m.dtype}")
  shape = tuple(getattr(param, "shape", np.shape(param)))
  try:
    m = np.broadcast_to(m, shape)
  except ValueError:
    raise shape_mismatch(path, m.shape, shape, "flops") from None
  return float(m.mean()) if m.size else 1.0


def flops(apply_fn: Callable, params: Any, masks: Optional[Any], example_input: Any) -> Flops:
  """Forward FLOPs of ``apply_fn(params, example_input)``, dense and sparse.

  Args:
    apply_fn: ``(params, example_input) -> outputs``; e.g. for Linen
      ``lambda p, x: model.apply({"params": p}, x)`` (other collections such as
      ``batch_stats`` closed over), for NNX ``lambda s, x: nnx.merge(graphdef,
      s)(x)`` with ``s`` the ``nnx.State`` of the parameters.
    params: the pytree of parameters whose masks are given (arrays or
      ``jax.ShapeDtypeStruct``s: only shapes and dtypes are used, e.g.
      ``jax.eval_shape(model.init, ...)``).
    masks: a masks tree of exactly ``params``' structure (bool leaves, scalar
      ``True`` for leaves that are not pruned), or None for dense.
    example_input: any pytree of arrays (or ``jax.ShapeDtypeStruct``); its
      batch size is counted, so pass one example for per-example FLOPs.

  Returns:
    ``Flops(dense, sparse, layers)``. A product of two masked parameters is
    scaled by both densities and listed under the first.

  Raises:
    ValueError: masks whose structure or shapes do not match ``params``
      (naming the path).
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [path_str(p) for p, _ in flat]
  leaves = [x for _, x in flat]
  if masks is None:
    densities = [1.0] * len(leaves)
  else:
    check_structure(params, masks, "flops")
    densities = [_density(m, x, p) for m, x, p in zip(jax.tree.leaves(masks), leaves, paths)]

  def fn(leaves, x):
    return apply_fn(jax.tree.unflatten(treedef, leaves), x)

  closed = jax.make_jaxpr(fn)(leaves, example_input)
  jaxpr = closed.jaxpr
  origin = {v: i for i, v in enumerate(jaxpr.invars[: len(leaves)])}
  dense_by, sparse_by, order = {}, {}, []

  def add(lhs, rhs, dense):
    operands = [i for i in (lhs, rhs) if i is not None]
    key = paths[operands[0]] if operands else NO_PARAMETER
    density = math.prod(densities[i] for i in operands)
    if key not in dense_by:
      order.append(key)
      dense_by[key], sparse_by[key] = 0, 0.0
    dense_by[key] += int(round(dense))
    sparse_by[key] += dense * density

  _count(jaxpr, origin, add, 1)
  order.sort(key=lambda k: k == NO_PARAMETER)
  layers = tuple(LayerFlops(k, dense_by[k], sparse_by[k]) for k in order)
  return Flops(sum(r.dense for r in layers), sum(r.sparse for r in layers), layers)
