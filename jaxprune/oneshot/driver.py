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

:func:`compress_sequential` adds quantisation to the same protocol (GPTQ's and
SparseGPT's own: the compressed block's outputs feed the next block): each
kernel is pruned and quantised on the grid of a
:class:`~jaxprune.oneshot.QuantSpec`, jointly for SparseGPT with GPTQ, else
pruned first and quantised with its mask held fixed.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from jaxprune.masks import dense_mask
from jaxprune.oneshot import calibration, solvers
from jaxprune.oneshot import quant as quant_mod
from jaxprune.paths import path_str

__all__ = [
  "METHODS",
  "QUANTIZERS",
  "compress_kernel",
  "compress_params",
  "compress_sequential",
  "prune_kernel",
  "prune_params",
  "prune_sequential",
  "prune_single_pass",
]

METHODS = ("magnitude", "wanda", "sparsegpt")
"""The ``method`` names the drivers accept, one per solver."""
QUANTIZERS = ("gptq", "rtn")
"""The ``quantizer`` names :func:`compress_sequential` accepts."""


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
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  new_params, masks, _, infos = compress_params(
    params, stats, method, sparsity, sparsity_type, **kw
  )
  return new_params, masks, infos


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
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  new_blocks, block_masks, _, xs = compress_sequential(
    block_fn,
    blocks,
    inputs,
    method,
    sparsity,
    sparsity_type,
    include=include,
    progress=progress,
    log=log,
    **solver_kw,
  )
  return new_blocks, block_masks, xs


def compress_kernel(
  kernel,
  stats: Optional[calibration.KernelStats],
  method: str,
  sparsity=None,
  sparsity_type=None,
  *,
  quant: Optional[quant_mod.QuantSpec] = None,
  quantizer: str = "gptq",
  name: str = "kernel",
  blocksize: int = 128,
  damp: float = 0.01,
):
  """Prunes and/or quantises one kernel; returns ``(kernel, mask, quantized, info)``.

  ``method`` is ``"none"`` (no pruning: ``mask`` is a scalar True) or one of
  :data:`METHODS`. With ``quant``, the kernel (viewed as 2-D through
  ``stats.in_axes``) is quantised by ``quantizer``: ``"gptq"``
  (:func:`~jaxprune.oneshot.gptq`; with ``method="sparsegpt"`` the joint solver
  :func:`~jaxprune.oneshot.sparsegpt_quant`) or ``"rtn"``
  (:func:`~jaxprune.oneshot.quantize_rtn`). Magnitude and Wanda prune first, then
  the pruned kernel is quantised with its mask held fixed. ``kernel`` is then the
  dequantised kernel (float32 on the grid, exactly 0 where pruned) and
  ``quantized`` the :class:`~jaxprune.oneshot.Quantized` of its 2-D view; without
  ``quant``, ``quantized`` is None. ``info`` is the solver's
  :class:`~jaxprune.oneshot.SparseGPTInfo` or None. Errors name ``name``.
  """
  if method != "none" and method not in METHODS:
    raise ValueError(f"method must be 'none' or one of {METHODS}, got {method!r}")
  if quant is None:
    if method == "none":
      return kernel, dense_mask(), None, None
    new, mask, info = prune_kernel(
      kernel, stats, method, sparsity, sparsity_type, blocksize=blocksize, damp=damp
    )
    return new, mask, None, info
  if quantizer not in QUANTIZERS:
    raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {quantizer!r}")
  in_axes = stats.in_axes if stats is not None else (0,)
  shape = jnp.shape(kernel)
  w = calibration.kernel_as_matrix(jnp.asarray(kernel, jnp.float32), in_axes)
  quant_mod.check_spec(quant, w.shape[0], name)
  quant_mod.check_finite(w, name)
  if quantizer == "gptq" and stats is None:
    raise ValueError(f"{name}: the gptq quantizer needs calibration statistics")
  solve_kw = dict(blocksize=blocksize, damp=damp)
  info, mask = None, None
  if method == "sparsegpt" and quantizer == "gptq":
    q, mask, info = quant_mod.sparsegpt_quant(
      w, calibration.hessian(stats), quant, sparsity, sparsity_type, **solve_kw
    )
  else:
    if method != "none":
      pruned, mask, info = prune_kernel(
        kernel, stats, method, sparsity, sparsity_type, blocksize=blocksize, damp=damp
      )
      w = calibration.kernel_as_matrix(jnp.asarray(pruned, jnp.float32), in_axes)
      mask = calibration.kernel_as_matrix(mask, in_axes)
    if quantizer == "rtn":
      q = quant_mod.quantize_rtn(w, quant, mask=mask)
    else:
      q, qinfo = quant_mod.gptq(w, calibration.hessian(stats), quant, mask=mask, **solve_kw)
      info = qinfo if info is None else info
  new = calibration.matrix_as_kernel(quant_mod.dequantize(q), shape, in_axes)
  mask = dense_mask() if mask is None else calibration.matrix_as_kernel(mask, shape, in_axes)
  return new, mask, q, info


def compress_params(
  params,
  stats: dict,
  method: str,
  sparsity=None,
  sparsity_type=None,
  *,
  quant: Optional[quant_mod.QuantSpec] = None,
  quantizer: str = "gptq",
  where: str = "",
  **kw,
):
  """:func:`compress_kernel` on every kernel of ``params`` named in ``stats``.

  Returns ``(new_params, masks, quants, infos)``: ``quants`` maps kernel paths
  to :class:`~jaxprune.oneshot.Quantized` (empty without ``quant``), ``infos``
  to solver diagnostics. ``where`` prefixes the paths in error messages.
  """
  if method != "none":
    solvers.parse_target(sparsity, sparsity_type)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  known = {path_str(p) for p, _ in flat}
  missing = sorted(set(stats) - known)
  if missing:
    raise ValueError(f"statistics for kernels not in params: {missing}")
  new_leaves, masks, quants, infos = [], [], {}, {}
  for p, leaf in flat:
    name = path_str(p)
    if name not in stats:
      new_leaves.append(leaf)
      masks.append(dense_mask())
      continue
    new, mask, q, info = compress_kernel(
      leaf,
      stats[name],
      method,
      sparsity,
      sparsity_type,
      quant=quant,
      quantizer=quantizer,
      name=where + name,
      **kw,
    )
    new_leaves.append(new)
    masks.append(mask)
    if q is not None:
      quants[name] = q
    if info is not None:
      infos[name] = info
  return (
    jax.tree.unflatten(treedef, new_leaves),
    jax.tree.unflatten(treedef, masks),
    quants,
    infos,
  )


def compress_sequential(
  block_fn: Callable,
  blocks: Sequence,
  inputs: Sequence,
  method: str,
  sparsity=None,
  sparsity_type=None,
  *,
  quant: Optional[quant_mod.QuantSpec] = None,
  quantizer: str = "gptq",
  include: Optional[Callable[[str], bool]] = None,
  progress: Optional[Callable[[int, int, float], None]] = None,
  log: Callable[[str], None] = print,
  **solver_kw,
):
  """Prunes and/or quantises residual blocks one after the other.

  The protocol of GPTQ (Frantar et al. 2022) and SparseGPT (Frantar & Alistarh
  2023): a block's kernels are compressed on statistics of its calibration
  inputs, and the compressed block's outputs are the next block's inputs.

  Args:
    block_fn: Linen ``block_fn(block_params, x) -> y`` applying one block.
    blocks: the blocks' params, in order.
    inputs: calibration inputs of the first block (a list of batches).
    method: ``"none"`` (dense: quantise only), ``"magnitude"``, ``"wanda"`` or
      ``"sparsegpt"``.
    sparsity: the target sparsity (ignored for ``"none"``).
    sparsity_type: ``"N:M"`` such as ``"2:4"``, instead of ``sparsity``.
    quant: a :class:`~jaxprune.oneshot.QuantSpec`, or None to prune only.
    quantizer: ``"gptq"`` (default; with ``"sparsegpt"`` the joint solver that
      prunes and quantises in one column loop) or ``"rtn"`` (round to nearest);
      magnitude and Wanda prune first and quantise with the mask held fixed.
    include: ``include(kernel_path) -> bool`` (paths relative to a block);
      default: every Dense/DenseGeneral/Einsum kernel.
    progress: called as ``progress(i, n_blocks, seconds)`` after each block.
    log: where damping notes go.
    **solver_kw: ``blocksize``, ``damp`` for SparseGPT and GPTQ.

  Returns:
    ``(new_blocks, block_masks, block_quants, outputs)``: ``new_blocks`` hold the
    dequantised kernels (float32 on the grid, exactly 0 where pruned);
    ``block_quants`` is a list with one dict per block mapping kernel paths
    relative to the block (e.g. ``"mlp/up_proj/kernel"``) to
    :class:`~jaxprune.oneshot.Quantized` (empty dicts without ``quant``);
    ``outputs`` are the last block's outputs on the calibration inputs.

  Raises:
    ValueError: an unknown ``method`` or ``quantizer``, a bad target or
      ``quant`` (bits, a group size that does not divide a kernel's input size,
      naming the block and kernel), NaN/inf in a kernel to quantise.
  """
  if method != "none" and method not in METHODS:
    raise ValueError(f"method must be 'none' or one of {METHODS}, got {method!r}")
  if method == "none" and quant is None:
    raise ValueError("method='none' needs quant=QuantSpec(...): there is nothing to do")
  if method != "none":
    solvers.parse_target(sparsity, sparsity_type)
  if quant is not None:
    if quantizer not in QUANTIZERS:
      raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {quantizer!r}")
    quant_mod.check_spec(quant, quant.group_size or 1, "quant")
  stats_fn = jax.jit(calibration.linen_stats_fn(block_fn, include))
  fwd = jax.jit(block_fn)
  xs = list(inputs)
  new_blocks, block_masks, block_quants = [], [], []
  for i, p in enumerate(blocks):
    t0 = time.perf_counter()
    _, stats = calibration.collect(stats_fn, p, xs)
    new_p, masks, quants, infos = compress_params(
      p,
      stats,
      method,
      sparsity,
      sparsity_type,
      quant=quant,
      quantizer=quantizer,
      where=f"block {i}: ",
      **solver_kw,
    )
    del stats  # only one block's statistics are alive at a time
    _warn_damping(infos, f"block {i}: ", log)
    xs = [fwd(new_p, x) for x in xs]
    new_blocks.append(new_p)
    block_masks.append(masks)
    block_quants.append(quants)
    if progress is not None:
      jax.block_until_ready(xs)
      progress(i, len(blocks), time.perf_counter() - t0)
  return new_blocks, block_masks, block_quants, xs


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
