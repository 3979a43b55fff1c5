"""Layer-sequential one-shot pruning (SparseGPT and Wanda's driver).

Both papers prune a transformer block by block: the calibration inputs of a
block's kernels are captured, all of the block's kernels are pruned, and the
*pruned* block's outputs become the next block's inputs (Frantar & Alistarh
2023, Sec. 3; Sun et al. 2023, Sec. 3). Only one block's statistics are alive
at a time. :func:`prune_single_pass` instead captures every kernel's inputs in
one pass of the dense model and prunes them all, for small models.

The result is the library's own pytree masks plus the new params: masks have
the params' tree structure, a bool array for each pruned kernel and a scalar
True elsewhere, ready for ``jaxprune.create("fixed", masks=masks)``.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from jaxprune.masks import dense_mask
from jaxprune.oneshot import calibration, solvers
from jaxprune.paths import path_str

__all__ = ["METHODS", "prune_kernel", "prune_params", "prune_sequential", "prune_single_pass"]

METHODS = ("magnitude", "wanda", "sparsegpt")
"""The ``method`` names the drivers accept, one per solver."""


def prune_kernel(
  kernel,
  stats: Optional[calibration.KernelStats],
  method: str,
  sparsity=None,
  sparsity_type=None,
  *,
  blocksize: int = 128,
  damp: float = 0.01,
):
  """Prunes one kernel of any rank with ``method``; returns ``(kernel, mask, info)``.

  The kernel is viewed as 2-D through ``stats.in_axes`` (``(0,)`` without stats),
  solved, and reshaped back. ``info`` is a :class:`~jaxprune.oneshot.SparseGPTInfo`
  for SparseGPT, else None.
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  in_axes = stats.in_axes if stats is not None else (0,)
  shape = jnp.shape(kernel)
  w = calibration.kernel_as_matrix(jnp.asarray(kernel, jnp.float32), in_axes)
  info = None
  if method == "magnitude":
    new, mask = solvers.magnitude(w, sparsity, sparsity_type)
  elif stats is None:
    raise ValueError(f"{method} needs calibration statistics for every pruned kernel")
  elif method == "wanda":
    new, mask = solvers.wanda(w, stats.sq, sparsity, sparsity_type)
  else:
    new, mask, info = solvers.sparsegpt(
      w,
      calibration.hessian(stats),
      sparsity,
      sparsity_type,
      blocksize=blocksize,
      damp=damp,
      return_info=True,
    )
  new = calibration.matrix_as_kernel(new, shape, in_axes).astype(jnp.result_type(kernel))
  return new, calibration.matrix_as_kernel(mask, shape, in_axes), info


def prune_params(params, stats: dict, method: str, sparsity=None, sparsity_type=None, **kw):
  """Prunes every kernel of ``params`` named in ``stats`` (paths relative to ``params``).

  Returns ``(new_params, masks, infos)``; ``infos`` maps kernel paths to solver
  diagnostics (SparseGPT) and lists damping increases.
  """
  solvers.parse_target(sparsity, sparsity_type)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  known = {path_str(p) for p, _ in flat}
  missing = sorted(set(stats) - known)
  if missing:
    raise ValueError(f"statistics for kernels not in params: {missing}")
  new_leaves, masks, infos = [], [], {}
  for p, leaf in flat:
    name = path_str(p)
    if name not in stats:
      new_leaves.append(leaf)
      masks.append(dense_mask())
      continue
    new, mask, info = prune_kernel(leaf, stats[name], method, sparsity, sparsity_type, **kw)
    new_leaves.append(new)
    masks.append(mask)
    if info is not None:
      infos[name] = info
  return jax.tree.unflatten(treedef, new_leaves), jax.tree.unflatten(treedef, masks), infos


def _warn_damping(infos, where: str, log):
  for name, info in infos.items():
    if bool(info.damp_increased):
      log(f"{where}{name}: H was numerically singular; damping raised to {float(info.damp):.3g}")


def prune_sequential(
  block_fn: Callable,
  blocks: Sequence,
  inputs: Sequence,
  method: str,
  sparsity=None,
  sparsity_type=None,
  *,
  include: Optional[Callable[[str], bool]] = None,
  progress: Optional[Callable[[int, int, float], None]] = None,
  log: Callable[[str], None] = print,
  **solver_kw,
):
  """Prunes residual blocks one after the other on their calibration inputs.

  Args:
    block_fn: Linen ``block_fn(block_params, x) -> y`` applying one block (the
      same function for every block).
    blocks: the blocks' params, in order.
    inputs: calibration inputs of the first block (a list of batches).
    method: ``"magnitude"``, ``"wanda"`` or ``"sparsegpt"``.
    sparsity: the target sparsity of every pruned kernel (unstructured).
    sparsity_type: ``"N:M"`` such as ``"2:4"``, instead of ``sparsity``.
    include: ``include(kernel_path) -> bool`` (paths relative to a block,
      e.g. ``"mlp/up_proj/kernel"``); default: every Dense/DenseGeneral/Einsum kernel.
    progress: called as ``progress(i, n_blocks, seconds)`` after each block.
    log: where damping notes go.
    **solver_kw: ``blocksize``, ``damp`` for SparseGPT.

  Returns:
    ``(new_blocks, block_masks, outputs)``: lists like ``blocks`` and the last
    block's outputs on the calibration inputs.
  """
  solvers.parse_target(sparsity, sparsity_type)
  stats_fn = jax.jit(calibration.linen_stats_fn(block_fn, include))
  fwd = jax.jit(block_fn)
  xs = list(inputs)
  new_blocks, block_masks = [], []
  for i, p in enumerate(blocks):
    t0 = time.perf_counter()
    _, stats = calibration.collect(stats_fn, p, xs)
    new_p, masks, infos = prune_params(p, stats, method, sparsity, sparsity_type, **solver_kw)
    del stats  # only one block's statistics are alive at a time
    _warn_damping(infos, f"block {i}: ", log)
    xs = [fwd(new_p, x) for x in xs]
    new_blocks.append(new_p)
    block_masks.append(masks)
    if progress is not None:
      jax.block_until_ready(xs)
      progress(i, len(blocks), time.perf_counter() - t0)
  return new_blocks, block_masks, xs


def prune_single_pass(
  apply_fn: Callable,
  params,
  batches: Sequence,
  method: str,
  sparsity=None,
  sparsity_type=None,
  *,
  include: Optional[Callable[[str], bool]] = None,
  log: Callable[[str], None] = print,
  **solver_kw,
):
  """Captures every kernel's inputs in one pass of the dense model, then prunes all.

  ``apply_fn(params, x)`` is a Linen apply; kernel paths are relative to
  ``params``. Returns ``(new_params, masks)``.
  """
  stats_fn = jax.jit(calibration.linen_stats_fn(apply_fn, include))
  _, stats = calibration.collect(stats_fn, params, batches)
  new_params, masks, infos = prune_params(
    params, stats, method, sparsity, sparsity_type, **solver_kw
  )
  _warn_damping(infos, "", log)
  return new_params, masks
