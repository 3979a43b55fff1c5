"""Per-kernel one-shot pruning solvers: magnitude, Wanda and SparseGPT.

Each solver is a pure, jit-able function of one kernel in Flax layout ``(in, out)``
(a kernel with more dimensions is first viewed as 2-D by the caller, see
:mod:`jaxprune.oneshot.calibration`) plus the calibration statistics of its
inputs, and returns ``(new_kernel, mask)``; ``mask`` is a bool array of the
kernel's shape, True where a weight is kept, and ``new_kernel`` is exactly zero
where ``mask`` is False.

Every solver takes either ``sparsity=s`` (unstructured) or ``sparsity_type="N:M"``
(keep ``N`` of every ``M`` consecutive inputs, along the input axis -2 as
everywhere in jaxprune). Rounding follows the library rule ``n - floor(s * n)``
kept:

* :func:`magnitude`: one threshold per kernel, over all its entries.
* :func:`wanda`: each output unit (kernel column) keeps exactly
  ``d_in - floor(s * d_in)`` inputs.
* :func:`sparsegpt`: each column block of the input axis keeps exactly
  ``numel - floor(s * numel)`` of its entries.

Statistics: ``sq_norms[i] = sum_t x_ti**2`` (the squared input-feature norms
Wanda uses) and ``hessian = 2/n X^T X`` (SparseGPT's layer-wise Hessian).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from jaxprune import structured, topk

__all__ = ["magnitude", "wanda", "sparsegpt", "SparseGPTInfo", "parse_target"]


class Target(NamedTuple):
  """A parsed pruning target: unstructured ``sparsity`` or N:M (``n`` kept of ``m``)."""

  sparsity: float
  n: int = 0
  m: int = 0

  @property
  def is_nm(self) -> bool:
    return self.m > 0


def parse_target(sparsity: Optional[float] = None, sparsity_type: Optional[str] = None) -> Target:
  """Checks ``sparsity`` / ``sparsity_type`` and returns a :class:`Target`.

  Raises:
    ValueError: naming the bad key (both or neither given for unstructured,
      sparsity outside [0, 1), a sparsity_type that is neither unstructured nor N:M).
  """
  if sparsity_type is not None and str(sparsity_type).strip().lower() != "unstructured":
    st = structured.parse_sparsity_type(sparsity_type)
    if not isinstance(st, structured.NM):
      raise ValueError(
        f"sparsity_type={sparsity_type!r}: one-shot solvers support 'unstructured' or 'N:M'"
      )
    implied = 1.0 - st.n / st.m
    if sparsity is not None and abs(float(sparsity) - implied) > 1e-9:
      raise ValueError(
        f"sparsity={sparsity} contradicts sparsity_type={sparsity_type!r} (implies {implied})"
      )
    return Target(implied, st.n, st.m)
  if sparsity is None:
    raise ValueError("give sparsity=s (unstructured) or sparsity_type='N:M'")
  s = float(sparsity)
  if not 0.0 <= s < 1.0:
    raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
  return Target(s)


def _check_kernel(kernel, target: Target, name: str):
  if jnp.ndim(kernel) != 2:
    raise ValueError(f"{name}: expected a 2-D (in, out) kernel, got shape {jnp.shape(kernel)}")
  if target.is_nm and kernel.shape[0] % target.m:
    raise ValueError(
      f"{name}: input size {kernel.shape[0]} is not divisible by M={target.m} "
      f"(sparsity_type='{target.n}:{target.m}')"
    )


def _column_topk(scores: jax.Array, k: int) -> jax.Array:
  """Keeps the ``k`` highest scores of every column; lower input index wins ties.

  The library's exact top-k (bit bisection, no sort) mapped over the columns.
  """
  return jax.vmap(lambda column: topk.topk_mask(column, k), in_axes=1, out_axes=1)(scores)


def magnitude(
  kernel: jax.Array, sparsity: Optional[float] = None, sparsity_type: Optional[str] = None
):
  """Magnitude pruning with one threshold per kernel (or N:M by magnitude).

  Keeps the ``n - floor(s * n)`` largest ``|W|`` of the whole kernel.

  Returns:
    ``(new_kernel, mask)``.
  """
  t = parse_target(sparsity, sparsity_type)
  _check_kernel(kernel, t, "magnitude")
  k = topk.keep_count(jnp.size(kernel), t.sparsity)
  return _magnitude(jnp.asarray(kernel, jnp.float32), k, (t.n, t.m))


# The kept counts k are computed in Python (the library's float64 rounding) and
# passed traced, so one compilation serves every sparsity; only N:M is static.
@functools.partial(jax.jit, static_argnums=2)
def _magnitude(w, k, nm):
  score = jnp.abs(w)
  if nm[1]:
    mask = structured.nm_mask_from_scores(score, nm[0], nm[1], axis=-2)
  else:
    mask = topk.topk_mask(score, k)
  return jnp.where(mask, w, 0.0), mask


def wanda(
  kernel: jax.Array,
  sq_norms: jax.Array,
  sparsity: Optional[float] = None,
  sparsity_type: Optional[str] = None,
):
  """Wanda: pruning by weights and activations (Sun et al. 2023,
  "A Simple and Effective Pruning Approach for Large Language Models").

  The score of ``W[i, j]`` is ``|W[i, j]| * ||X_i||_2`` with ``X_i`` the i-th input
  feature over the calibration tokens. Each output unit (column ``j``) keeps
  exactly ``d_in - floor(s * d_in)`` inputs (the paper's per-output comparison
  group); N:M keeps the ``N`` best of every ``M`` inputs. Weights are not updated.

  Args:
    kernel: ``(in, out)`` kernel.
    sq_norms: ``(in,)`` sums of squared inputs, ``sum_t x_ti**2``.
    sparsity: the target sparsity (see :func:`parse_target`).
    sparsity_type: ``"N:M"`` such as ``"2:4"``, instead of ``sparsity``.

  Returns:
    ``(new_kernel, mask)``.
  """
  t = parse_target(sparsity, sparsity_type)
  _check_kernel(kernel, t, "wanda")
  if jnp.shape(sq_norms) != (kernel.shape[0],):
    raise ValueError(
      f"wanda: sq_norms has shape {jnp.shape(sq_norms)}, expected ({kernel.shape[0]},)"
    )
  k = topk.keep_count(kernel.shape[0], t.sparsity)
  w, sq = jnp.asarray(kernel, jnp.float32), jnp.asarray(sq_norms, jnp.float32)
  return _wanda(w, sq, k, (t.n, t.m))


@functools.partial(jax.jit, static_argnums=3)
def _wanda(w, sq_norms, k, nm):
  score = jnp.abs(w) * jnp.sqrt(jnp.maximum(sq_norms, 0.0))[:, None]
  if nm[1]:
    mask = structured.nm_mask_from_scores(score, nm[0], nm[1], axis=-2)
  else:
    mask = _column_topk(score, k)
  return jnp.where(mask, w, 0.0), mask


class SparseGPTInfo(NamedTuple):
  """Diagnostics of one SparseGPT solve.

  Attributes:
    damp: the damping finally added to the diagonal of ``H`` (absolute value).
    damp_increased: True when the requested damping left ``H`` numerically
      singular and was multiplied by 10 (up to 8 times) until the Cholesky
      factorisations succeeded.
    dead: number of dead inputs (``H_jj == 0``), whose weights were zeroed.
  """

  damp: jax.Array
  damp_increased: jax.Array
  dead: jax.Array


def sparsegpt(
  kernel: jax.Array,
  hessian: jax.Array,
  sparsity: Optional[float] = None,
  sparsity_type: Optional[str] = None,
  *,
  blocksize: int = 128,
  damp: float = 0.01,
  return_info: bool = False,
):
  """SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can
  Be Accurately Pruned in One-Shot"), in float32.

  With ``H = 2/n X^T X`` (``hessian``):

  1. dead inputs (``H_jj == 0``) get ``H_jj = 1`` and their weights are zeroed;
  2. ``damp * mean(diag H)`` is added to the diagonal;
  3. ``U``, the upper Cholesky factor of ``H^-1``, is computed; if it is not finite
     (singular or ill-conditioned ``H``) the damping is multiplied by 10 and the
     factorisation retried, up to 8 times (reported in :class:`SparseGPTInfo`);
  4. the input axis is processed in blocks of ``blocksize`` columns of ``H``. The
     unstructured mask of a block prunes the ``floor(s * numel)`` lowest
     ``w**2 / U_jj**2`` over the whole block (ties: lower flat index pruned last);
     N:M masks are chosen every ``M`` inputs, pruning the ``M - N`` lowest per group.
     Each input row is then quantised to its mask and its error
     ``(w - q) / U_jj`` spread over the remaining rows of the block
     (optimal brain surgeon), and the block's errors update all later rows at
     once (lazy batch update).

  Args:
    kernel: ``(in, out)`` kernel.
    hessian: ``(in, in)`` matrix ``2/n X^T X``.
    sparsity: the target sparsity.
    sparsity_type: ``"N:M"`` such as ``"2:4"``, instead of ``sparsity``.
    blocksize: column block size (the paper's 128); a multiple of ``M`` for N:M.
    damp: relative dampening (the paper's 0.01).
    return_info: also return a :class:`SparseGPTInfo`.

  Returns:
    ``(new_kernel, mask)``, or ``(new_kernel, mask, info)``.
  """
  t = parse_target(sparsity, sparsity_type)
  _check_kernel(kernel, t, "sparsegpt")
  d_in = kernel.shape[0]
  if jnp.shape(hessian) != (d_in, d_in):
    raise ValueError(f"sparsegpt: hessian has shape {jnp.shape(hessian)}, expected {(d_in, d_in)}")
  if blocksize < 1 or (t.is_nm and blocksize % t.m):
    raise ValueError(f"sparsegpt: blocksize={blocksize} must be >= 1 and a multiple of M")
  if damp < 0:
    raise ValueError(f"sparsegpt: damp must be >= 0, got {damp}")
  d_out, bs = kernel.shape[1], int(blocksize)
  rem = d_in - (-(-d_in // bs) - 1) * bs  # real rows of the last block
  k_full = topk.keep_count(bs * d_out, t.sparsity)
  k_last = topk.keep_count(rem * d_out, t.sparsity) + (bs - rem) * d_out  # padding kept
  w, mask, info = _sparsegpt(
    jnp.asarray(kernel, jnp.float32),
    jnp.asarray(hessian, jnp.float32),
    k_full,
    k_last,
    (t.n, t.m),
    bs,
    float(damp),
  )
  return (w, mask, info) if return_info else (w, mask)


def _inverse_upper_cholesky(h, damp: float):
  """Upper Cholesky factor of ``(H + damp*mean(diag H) I)^-1``, raising the damping
  tenfold until it is finite."""
  d = h.shape[0]
  eye = jnp.eye(d, dtype=jnp.float32)
  base = damp * jnp.mean(jnp.diag(h))
  base = jnp.where(base > 0, base, 1e-8 * jnp.maximum(jnp.mean(jnp.diag(h)), 1.0))

  def factor(lam):
    low = jnp.linalg.cholesky(h + lam * eye)
    hinv = jax.scipy.linalg.cho_solve((low, True), eye)
    hinv = 0.5 * (hinv + hinv.T)
    return jnp.linalg.cholesky(hinv).T

  def cond(c):
    k, _, u = c
    return (k < 8) & ~jnp.all(jnp.isfinite(u))

  def body(c):
    k, lam, _ = c
    lam = jnp.maximum(lam * 10.0, base)
    return k + 1, lam, factor(lam)

  lam0 = jnp.where(damp > 0, base, 0.0) if damp > 0 else jnp.zeros((), jnp.float32)
  k, lam, u = lax.while_loop(cond, body, (0, lam0, factor(lam0)))
  return u, lam, k > 0


def _sparsegpt(w, h, k_full, k_last, nm, blocksize: int, damp: float):
  w, mask, _, _, info = column_solve(w, h, None, k_full, k_last, nm, blocksize, damp, None)
  return w, mask, info


@functools.partial(jax.jit, static_argnums=(5, 6, 7, 8))
def column_solve(w, h, fixed_keep, k_full, k_last, nm, blocksize: int, damp: float, grid):
  """The column loop shared by SparseGPT, GPTQ and the joint solver.

  Walks the input axis of ``w`` (``(in, out)``, the columns of the reference
  code's ``(out, in)`` weight) in blocks of ``blocksize`` rows. Each row is
  replaced by its pruned and/or quantised value ``q`` and the error
  ``(w - q) / U_jj`` is spread over the block's later rows (optimal brain
  surgeon with ``U`` the upper Cholesky factor of ``H^-1``); the block's errors
  then update all later rows at once (lazy batch update).

  Which entries are kept: ``fixed_keep`` (a bool ``(in, out)`` array) when given;
  else SparseGPT's choice, N:M every ``M`` rows when ``nm = (N, M)`` has ``M > 0``,
  else the ``k_full`` (last block: ``k_last``) entries of each block with the
  highest ``w**2 / U_jj**2``.

  ``grid`` is None (no quantisation) or a static object with ``bits``, ``group``
  (rows sharing a scale, a divisor of ``blocksize``; None for one scale per
  output column), ``scales(rows)`` (one scale per column of ``rows``) and
  ``round(values, scale) -> (values_on_grid, codes)``. A group's scales are
  taken when the loop reaches its first row, from the group's current (already
  error-updated) weights restricted to the entries kept (for N:M: the mask
  that the current weights would give); pruned entries get code 0.

  Returns:
    ``(w, mask, codes, scales, info)``; ``codes`` and ``scales`` are None
    without a grid.
  """
  t = Target(0.0, *nm)
  d_in, d_out = w.shape
  dead = jnp.diag(h) == 0
  h = h + jnp.diag(jnp.where(dead, 1.0, 0.0))
  w = jnp.where(dead[:, None], 0.0, w)
  u, lam, increased = _inverse_upper_cholesky(h, damp)

  # Pad the input axis to whole blocks with inputs that are independent of the
  # others (identity rows of U, zero weights): they change nothing and are kept.
  B = blocksize
  nb = -(-d_in // B)
  pad = nb * B - d_in
  w = jnp.pad(w, ((0, pad), (0, 0)))
  u = jnp.pad(u, ((0, pad), (0, pad))) + jnp.diag(jnp.arange(d_in + pad) >= d_in)
  real = jnp.arange(d_in + pad) < d_in
  fixed = fixed_keep is not None
  if fixed:
    fixed_keep = jnp.pad(jnp.asarray(fixed_keep, bool), ((0, pad), (0, 0)), constant_values=True)
  quant = grid is not None
  per_channel = quant and grid.group is None
  g = grid.group if quant and not per_channel else B
  if quant:
    if per_channel:  # one scale per output column, from the whole (kept) kernel
      scales = grid.scales(jnp.where(fixed_keep, w, 0.0) if fixed else w)[None]
    else:
      scales = jnp.zeros(((d_in + pad) // g, d_out), jnp.float32)
    codes = jnp.zeros(w.shape, jnp.int8)
  else:
    scales = codes = None

  def nm_keep(rows, du_rows):
    return structured.nm_mask_from_scores(rows**2 / (du_rows**2)[:, None], t.n, t.m, axis=0)

  def block(b, c):
    w, keep, codes, scales = c
    i1 = b * B
    w1 = lax.dynamic_slice_in_dim(w, i1, B, 0)
    u_rows = lax.dynamic_slice_in_dim(u, i1, B, 0)
    u1 = lax.dynamic_slice_in_dim(u_rows, i1, B, 1)
    du = jnp.diag(u1)
    real1 = lax.dynamic_slice_in_dim(real, i1, B, 0)
    if fixed:
      keep1 = lax.dynamic_slice_in_dim(fixed_keep, i1, B, 0)
    elif t.is_nm:
      keep1 = jnp.zeros(w1.shape, bool)
    else:
      k = jnp.where(b == nb - 1, k_last, k_full)
      tmp = jnp.where(real1[:, None], w1**2 / (du**2)[:, None], jnp.inf)
      keep1 = topk.topk_mask(tmp, k)

    def group(j, c):
      w1, keep1, err1, codes1, scales = c
      r0 = j * g
      scale = None
      if per_channel:
        scale = scales[0]
      elif quant:
        likely = keep1 if fixed or not t.is_nm else nm_keep(w1, du)  # N:M: provisional
        rows = lax.dynamic_slice_in_dim(jnp.where(likely, w1, 0.0), r0, g, 0)
        scale = grid.scales(rows)
        scales = lax.dynamic_update_slice_in_dim(scales, scale[None], (i1 + r0) // g, 0)

      def step(r, c):
        w1, keep1, err1, codes1 = c
        i = r0 + r
        if t.is_nm and not fixed:
          gs = (i // t.m) * t.m
          rows = lax.dynamic_slice_in_dim(w1, gs, t.m, 0)
          gmask = nm_keep(rows, lax.dynamic_slice_in_dim(du, gs, t.m, 0))
          new = lax.dynamic_update_slice_in_dim(keep1, gmask, gs, 0)
          keep1 = jnp.where(i % t.m == 0, new, keep1)
        row = w1[i]
        q = jnp.where(keep1[i], row, 0.0)
        if quant:
          q, code = grid.round(q, scale)
          codes1 = codes1.at[i].set(code)
        err = (row - q) / du[i]
        w1 = w1 - u1[i][:, None] * err[None, :]
        w1 = w1.at[i].set(q)
        err1 = err1.at[i].set(err)
        return w1, keep1, err1, codes1

      w1, keep1, err1, codes1 = lax.fori_loop(0, g, step, (w1, keep1, err1, codes1))
      return w1, keep1, err1, codes1, scales

    codes1 = jnp.zeros(w1.shape, jnp.int8) if quant else None
    w1, keep1, err1, codes1, scales = lax.fori_loop(
      0, B // g, group, (w1, keep1, jnp.zeros_like(w1), codes1, scales)
    )
    # Lazy batch update of all later rows (U is upper triangular, so earlier rows
    # get zero), then the block's own rows.
    w = w - u_rows.T @ err1
    w = lax.dynamic_update_slice_in_dim(w, w1, i1, 0)
    keep = lax.dynamic_update_slice_in_dim(keep, keep1, i1, 0)
    if quant:
      codes = lax.dynamic_update_slice_in_dim(codes, codes1, i1, 0)
    return w, keep, codes, scales

  w, keep, codes, scales = lax.fori_loop(0, nb, block, (w, jnp.zeros(w.shape, bool), codes, scales))
  mask = keep[:d_in]
  w = jnp.where(mask, w[:d_in], 0.0)
  if quant:
    codes = jnp.where(mask, codes[:d_in], 0)
    if not per_channel:
      scales = scales[: d_in // g]
  return w, mask, codes, scales, SparseGPTInfo(lam, increased, jnp.sum(dead))
