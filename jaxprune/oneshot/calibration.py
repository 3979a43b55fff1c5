"""Calibration statistics of the inputs of every prunable kernel.

For each kernel the collector accumulates, over calibration batches, the input
Gram matrix ``X^T X`` (``(d_in, d_in)``), the per-feature sums of squares
``sum_t x_ti**2`` and the token count ``n``. From these, Wanda's feature norms
are ``sqrt(sq)`` and SparseGPT's Hessian is ``2/n X^T X``.

Inputs are captured without changing the user's model:

* Flax Linen: ``nn.intercept_methods`` sees every ``__call__`` of ``nn.Dense``,
  ``nn.DenseGeneral`` and ``nn.Einsum`` submodules (their kernel path is the
  module path plus ``"kernel"``).
* Flax NNX: each ``nnx.Linear`` / ``nnx.LinearGeneral`` / ``nnx.Einsum`` of the
  model is given, for the duration of the call only, a recording subclass of its
  own class (``__class__`` is restored afterwards).

A kernel with more than two dimensions (attention projections of
``DenseGeneral`` or ``Einsum``) is viewed as 2-D ``(d_in, d_out)`` by
:func:`kernel_as_matrix`: its contracted (input) axes first, flattened, then the
others; :func:`matrix_as_kernel` undoes the view.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import struct

__all__ = [
  "KernelStats",
  "linen_stats_fn",
  "nnx_collect",
  "collect",
  "kernel_as_matrix",
  "matrix_as_kernel",
  "hessian",
]


@struct.dataclass
class KernelStats:
  """Accumulated input statistics of one kernel.

  Attributes:
    xtx: ``(d_in, d_in)`` float32 sum of ``x x^T`` over tokens.
    sq: ``(d_in,)`` float32 sum of ``x**2`` over tokens.
    n: number of tokens (input rows) seen.
    in_axes: the kernel axes contracted with the input, in input order.
  """

  xtx: Any
  sq: Any
  n: Any
  in_axes: tuple = struct.field(pytree_node=False)

  def __add__(self, other):  # accumulate two batches
    return KernelStats(self.xtx + other.xtx, self.sq + other.sq, self.n + other.n, self.in_axes)


def hessian(stats: KernelStats):
  """SparseGPT's layer Hessian ``2/n X^T X``."""
  return 2.0 / jnp.maximum(stats.n, 1) * stats.xtx


def kernel_as_matrix(kernel, in_axes: tuple):
  """``kernel`` as ``(prod of in_axes, prod of the rest)``, input axes first in order."""
  rest = [a for a in range(kernel.ndim) if a not in in_axes]
  k = jnp.transpose(kernel, tuple(in_axes) + tuple(rest))
  d_in = math.prod(kernel.shape[a] for a in in_axes)
  return k.reshape(d_in, -1)


def matrix_as_kernel(matrix, shape: tuple, in_axes: tuple):
  """Inverse of :func:`kernel_as_matrix` for a kernel of ``shape``."""
  rest = [a for a in range(len(shape)) if a not in in_axes]
  perm = tuple(in_axes) + tuple(rest)
  k = matrix.reshape(tuple(shape[a] for a in perm))
  return jnp.transpose(k, tuple(np.argsort(perm)))


def _stats_of(x2d, in_axes) -> KernelStats:
  x2d = x2d.astype(jnp.float32)
  return KernelStats(
    x2d.T @ x2d, jnp.sum(x2d * x2d, axis=0), jnp.asarray(x2d.shape[0], jnp.int32), in_axes
  )


def _einsum_view(eq: str, x, kernel_ndim: int):
  """Input rows and kernel input axes for ``einsum(eq, x, kernel)``."""
  eq = eq.replace(" ", "")
  lhs, out = eq.split("->")
  a, b = lhs.split(",")
  if "." in eq:
    raise ValueError(f"Einsum {eq!r}: ellipses are not supported by the one-shot collector")
  contracted = [c for c in b if c in a and c not in out]
  shared = [c for c in b if c in a and c in out]
  if shared:
    raise ValueError(
      f"Einsum {eq!r}: kernel axes {shared} are batch axes of the input; "
      "the one-shot solvers need the kernel's input axes contracted"
    )
  in_axes = tuple(b.index(c) for c in contracted)
  x_axes = [a.index(c) for c in contracted]
  keep = [i for i in range(x.ndim) if i not in x_axes]
  xt = jnp.transpose(x, keep + x_axes)
  return xt.reshape(-1, math.prod(x.shape[i] for i in x_axes)), in_axes


def _dense_general_view(x, axis, kernel_ndim: int):
  axis = (axis,) if isinstance(axis, int) else tuple(axis)
  axis = tuple(a % x.ndim for a in axis)
  keep = [i for i in range(x.ndim) if i not in axis]
  xt = jnp.transpose(x, keep + list(axis))
  return xt.reshape(-1, math.prod(x.shape[i] for i in axis)), tuple(range(len(axis)))


def _linen_record(module, x):
  """(x2d, in_axes) for a Linen kernel layer, or None."""
  if isinstance(module, nn.Dense):
    return x.reshape(-1, x.shape[-1]), (0,)
  if isinstance(module, nn.DenseGeneral):
    if module.batch_dims:
      raise ValueError(f"DenseGeneral at {'/'.join(module.path)}: batch_dims are not supported")
    return _dense_general_view(x, module.axis, None)
  if isinstance(module, nn.Einsum):
    return _einsum_view(module.einsum_str, x, len(module.shape))
  return None


def linen_stats_fn(apply_fn: Callable, include: Callable[[str], bool] | None = None):
  """Wraps a Linen ``apply_fn(params, *args)`` to also return kernel statistics.

  Returns ``f(params, *args) -> (output, {kernel_path: KernelStats})`` (jit it),
  where ``kernel_path`` is the "/"-joined path of the kernel relative to the
  module applied (e.g. ``"self_attn/q_proj/kernel"``). ``include(path)`` selects
  kernels (default: all). A kernel called several times accumulates all calls.
  """

  def fn(params, *args, **kwargs):
    found = {}

    def interceptor(next_fun, args_, kwargs_, context):
      if context.method_name == "__call__" and args_:
        rec = _linen_record(context.module, args_[0])
        if rec is not None:
          path = "/".join(context.module.path + ("kernel",))
          if include is None or include(path):
            s = _stats_of(*rec)
            found[path] = found[path] + s if path in found else s
      return next_fun(*args_, **kwargs_)

    with nn.intercept_methods(interceptor):
      out = apply_fn(params, *args, **kwargs)
    return out, found

  return fn


def _nnx_classes():
  from flax import nnx

  return nnx, (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)


def _nnx_view(layer, x):
  nnx, _ = _nnx_classes()
  if isinstance(layer, nnx.Linear):
    return x.reshape(-1, x.shape[-1]), (0,)
  if isinstance(layer, nnx.LinearGeneral):
    if getattr(layer, "batch_axis", None):
      raise ValueError("LinearGeneral with batch_axis is not supported by the one-shot collector")
    return _dense_general_view(x, layer.axis, None)
  return _einsum_view(layer.einsum_str, x, layer.kernel.value.ndim)


@contextlib.contextmanager
def nnx_collect(model, include: Callable[[str], bool] | None = None):
  """Records the inputs of an NNX model's kernel layers while the context is open.

  Yields a dict ``{kernel_path: KernelStats}`` that fills as the model is called
  (eagerly, outside ``nnx.jit``). Each layer's class is swapped for a recording
  subclass inside the context and restored on exit, so the model is unchanged.
  """
  nnx, classes = _nnx_classes()
  found: dict = {}
  swapped = []
  for path, layer in nnx.iter_graph(model):
    if not isinstance(layer, classes) or type(layer) not in classes:
      continue
    kpath = "/".join(str(p) for p in path) + "/kernel"
    if include is not None and not include(kpath):
      continue
    cls = type(layer)

    def call(self, x, *a, _kpath=kpath, _cls=cls, **kw):
      s = _stats_of(*_nnx_view(self, x))
      found[_kpath] = found[_kpath] + s if _kpath in found else s
      return _cls.__call__(self, x, *a, **kw)

    object.__setattr__(layer, "__class__", type(cls.__name__, (cls,), {"__call__": call}))
    swapped.append((layer, cls))
  try:
    yield found
  finally:
    for layer, cls in swapped:
      object.__setattr__(layer, "__class__", cls)


def collect(stats_fn: Callable, params, batches) -> tuple[list, dict]:
  """Runs ``stats_fn(params, x)`` (from :func:`linen_stats_fn`) over ``batches``.

  Returns ``(outputs, stats)``: the list of outputs and the statistics summed
  over all batches.
  """
  outs, total = [], {}
  for x in batches:
    y, s = stats_fn(params, x)
    outs.append(y)
    for k, v in s.items():
      total[k] = total[k] + v if k in total else v
  return outs, total
