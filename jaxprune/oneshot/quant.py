"""Weight quantisation on the symmetric integer grid of GGUF's Q4_0 / Q8_0.

A kernel in Flax layout ``(in, out)`` is quantised to integer ``codes`` and float
``scales``: every ``group_size`` consecutive weights along the input axis of one
output column share one scale, and a weight's value is ``code * scale``. The grid
is symmetric (no offset), so code 0 is an exact 0.0 and a pruned weight stays
exactly 0 after quantisation. int4 codes lie in ``[-8, 7]``, int8 codes in
``[-127, 127]``, and every scale is a float16 value (held in float32), so an int4
kernel with groups of 32 is bit-exactly a GGUF Q4_0 tensor (block scale ``d``,
nibble ``code + 8``) and an int8 one a Q8_0 tensor, each transposed to GGUF's
``(out, in)`` rows.

Scales (``QuantSpec.scale_rule``), taken over a group's kept weights and rounded
to the nearest float16:

* ``"ggml"`` (the default; ggml's own ``quantize_row_q4_0`` / ``q8_0`` rules):
  int4 takes the weight ``m`` of largest ``|w|`` *with its sign* (the first one
  on a tie) and ``scale = m / -8``, so that weight gets code -8 exactly and the
  whole code range ``[-8, 7]`` is used; the scale is negative when ``m > 0``
  (Q4_0 stores a signed float16 ``d``). int8 takes ``scale = max |w| / 127``.
* ``"absmax"``: ``scale = max |w| / qmax`` with ``qmax = 7`` (int4) or ``127``
  (int8); always >= 0, int4 code -8 only reached by clipping. For int8 both rules
  are the same.

Codes are ``round(w / scale)`` (half to even) with the stored float16 ``scale``,
clipped to the code range: the nearest points of the grid the file holds. ggml's
reference quantiser divides by the float32 scale before rounding it to float16;
the two agree on the extreme codes (127, -8) wherever the scale is a normal
float16, but a scale below 2^-14 (subnormal: an int8 group with max |w|
under 7.8e-3) is rounded by up to a few tenths of a percent, and there the largest
weight may get 126, nearer to it than ggml's 127. A group of zeros gets scale 0
and codes 0.

Quantisers:

* :func:`quantize_rtn`: round to nearest, with an optional mask of kept entries.
* :func:`gptq`: GPTQ (Frantar et al. 2022), optionally with a fixed mask.
* :func:`sparsegpt_quant`: SparseGPT (Frantar & Alistarh 2023) choosing the mask
  and quantising inside the same column loop (the reference code's ``--wbits``).

GPTQ and the joint solver share SparseGPT's column loop
(:func:`jaxprune.oneshot.solvers.column_solve`): same Hessian, damping and lazy
block updates; only what replaces a weight (its grid value, or 0 if pruned)
differs.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxprune import topk
from jaxprune.oneshot import solvers

__all__ = [
  "SCALE_RULES",
  "QuantSpec",
  "Quantized",
  "dequantize",
  "quantize_rtn",
  "gptq",
  "sparsegpt_quant",
]

_FP16_MAX = 65504.0
SCALE_RULES = ("ggml", "absmax")
"""Values of ``QuantSpec.scale_rule``: ``"ggml"`` (ggml's own rules: int4 scale
``m / -8`` with ``m`` the group's largest-magnitude weight, sign kept; int8
``max|w| / 127``) and ``"absmax"`` (``max|w| / 7`` for int4, ``max|w| / 127``
for int8)."""


class QuantSpec(NamedTuple):
  """How to quantise a kernel.

  Attributes:
    bits: 4 (codes in ``[-8, 7]``, GGUF Q4_0 with ``group_size=32``) or 8 (codes
      in ``[-127, 127]``, GGUF Q8_0 with ``group_size=32``).
    group_size: consecutive weights along the input axis sharing one scale; it
      must divide the input size. ``None``: one scale per output channel (the
      whole input axis).
    scale_rule: ``"ggml"`` (default; int4 ``scale = m / -8`` with ``m`` the
      group's weight of largest magnitude, sign included, so scales may be
      negative; int8 ``max |w| / 127``) or ``"absmax"`` (``max |w| / 7`` or
      ``/ 127``, scales >= 0). See the module docstring.
  """

  bits: int
  group_size: Optional[int] = 32
  scale_rule: str = "ggml"


# A spec is configuration, not data: a pytree node without leaves (so a Quantized
# returned from jit keeps its spec as given, and tree maps leave it alone).
jax.tree_util.register_static(QuantSpec)


class Quantized(NamedTuple):
  """A quantised 2-D kernel in Flax layout ``(in, out)``.

  Attributes:
    codes: int8 array ``(in, out)``; int4 codes in ``[-8, 7]``, int8 codes in
      ``[-127, 127]``; 0 at pruned entries.
    scales: float32 array ``(in // group, out)`` (``(1, out)`` per channel), every
      value exactly representable in float16.
    spec: the :class:`QuantSpec` it was made with.
  """

  codes: jax.Array
  scales: jax.Array
  spec: QuantSpec


def code_range(bits: int) -> tuple[int, int]:
  """The ``(lowest, highest)`` code of a ``bits``-bit symmetric grid."""
  return (-8, 7) if bits == 4 else (-127, 127)


def check_spec(spec: QuantSpec, d_in: int, name: str = "kernel") -> int:
  """Checks ``spec`` against a kernel of ``d_in`` inputs; returns the group size.

  Raises:
    ValueError: naming ``name`` and the parameter (``bits`` not 4 or 8, a
      ``group_size`` that is not a positive divisor of ``d_in``).
  """
  if not isinstance(spec, QuantSpec):
    raise ValueError(f"{name}: spec must be a QuantSpec, got {type(spec).__name__}")
  if isinstance(spec.bits, bool) or spec.bits not in (4, 8):
    raise ValueError(f"{name}: bits must be 4 or 8, got {spec.bits!r}")
  if spec.scale_rule not in SCALE_RULES:
    raise ValueError(f"{name}: scale_rule must be one of {SCALE_RULES}, got {spec.scale_rule!r}")
  if spec.group_size is None:
    return int(d_in)
  g = spec.group_size
  try:
    g = operator.index(g)
  except TypeError:
    g = None
  if g is None or g < 1 or d_in % g:
    raise ValueError(
      f"{name}: group_size={spec.group_size!r} must be a positive divisor of the input size "
      f"{d_in} (or None for one scale per output channel)"
    )
  return g


def check_finite(w, name: str = "kernel"):
  """Raises ValueError naming ``name`` if ``w`` (a concrete array) holds NaN or inf.

  Skipped for traced values (inside jit nothing can be checked eagerly).
  """
  if isinstance(w, jax.core.Tracer):
    return
  bad = int(jnp.size(w) - jnp.sum(jnp.isfinite(w)))
  if bad:
    raise ValueError(f"{name}: {bad} NaN/inf weight(s); cannot quantise")


def _check_mask(mask, shape, name: str):
  if mask is not None and jnp.shape(mask) != tuple(shape):
    raise ValueError(f"{name}: mask has shape {jnp.shape(mask)}, expected {tuple(shape)}")


def group_scales(w: jax.Array, bits: int, rule: str = "ggml") -> jax.Array:
  """Scales of groups over axis -2, rounded to float16 (as float32).

  ``rule="ggml"``: int4 ``m / -8`` with ``m`` the entry of largest ``|w|`` (sign
  kept; the first one on a tie, as ggml's loop), int8 ``max |w| / 127``;
  ``rule="absmax"``: ``max |w| / qmax``. ``w`` is ``(group, out)`` (or batched
  ``(..., group, out)``); returns ``(out,)`` (``(..., out)``). A group of zeros
  gets scale 0.
  """
  if rule == "ggml" and bits == 4:
    i = jnp.argmax(jnp.abs(w), axis=-2, keepdims=True)
    s = jnp.squeeze(jnp.take_along_axis(w, i, axis=-2), -2) / -8.0
  else:
    s = jnp.max(jnp.abs(w), axis=-2) / code_range(bits)[1]
  s = jnp.clip(s, -_FP16_MAX, _FP16_MAX)
  return s.astype(jnp.float16).astype(jnp.float32)


def round_to_grid(w: jax.Array, scale: jax.Array, bits: int):
  """Rounds ``w`` to the grid of ``scale`` (broadcasting); returns ``(values, codes)``.

  ``codes = clip(round(w / scale))`` as int8 (0 where ``scale == 0``; scales may
  be negative) and ``values = codes * scale``, exactly what :func:`dequantize`
  gives.
  """
  lo, hi = code_range(bits)
  ok = scale != 0
  c = jnp.where(ok, jnp.round(w / jnp.where(ok, scale, 1.0)), 0.0)
  codes = jnp.clip(c, lo, hi).astype(jnp.int8)
  return _values(codes, scale), codes


def _values(codes, scale):
  """``codes * scale``, with +0.0 (not -0.0 from a negative scale) where a code is 0."""
  return jnp.where(codes == 0, 0.0, codes.astype(jnp.float32) * scale)


def dequantize(q: Quantized) -> jax.Array:
  """The float32 ``(in, out)`` kernel ``codes * scales``, each scale repeated over its
  group along axis 0; exactly +0.0 where a code is 0 (also under a negative scale)."""
  g = q.codes.shape[0] // q.scales.shape[0]
  return _values(q.codes, jnp.repeat(q.scales, g, axis=0))


def quantize_rtn(w: jax.Array, spec: QuantSpec, *, mask: Optional[jax.Array] = None) -> Quantized:
  """Round-to-nearest quantisation of a ``(in, out)`` kernel on the grid of ``spec``.

  Each group's scale is taken from its kept weights (``mask`` True; all weights
  without a mask); pruned entries get code 0, so they dequantise to exactly 0.

  Args:
    w: ``(in, out)`` kernel.
    spec: the :class:`QuantSpec`.
    mask: optional bool ``(in, out)``, True where a weight is kept.

  Returns:
    A :class:`Quantized`.

  Raises:
    ValueError: a bad ``spec``, a mask of the wrong shape, NaN/inf weights.
  """
  if jnp.ndim(w) != 2:
    raise ValueError(f"quantize_rtn: expected a 2-D (in, out) kernel, got shape {jnp.shape(w)}")
  g = check_spec(spec, w.shape[0], "quantize_rtn")
  _check_mask(mask, w.shape, "quantize_rtn")
  check_finite(w, "quantize_rtn")
  w = jnp.asarray(w, jnp.float32)
  if mask is not None:
    w = jnp.where(mask, w, 0.0)
  d_in, d_out = w.shape
  scales = group_scales(w.reshape(d_in // g, g, d_out), spec.bits, spec.scale_rule)
  _, codes = round_to_grid(w, jnp.repeat(scales, g, axis=0), spec.bits)
  return Quantized(codes, scales, QuantSpec(spec.bits, spec.group_size, spec.scale_rule))


@dataclasses.dataclass(frozen=True)
class _Grid:
  """The row quantiser the shared column loop calls (static, hashable)."""

  bits: int
  group: Optional[int]
  rule: str = "ggml"

  def scales(self, rows):
    return group_scales(rows, self.bits, self.rule)

  def round(self, values, scale):
    return round_to_grid(values, scale, self.bits)


def _check_solve_inputs(w, hessian, spec, mask, blocksize, damp, name):
  if jnp.ndim(w) != 2:
    raise ValueError(f"{name}: expected a 2-D (in, out) kernel, got shape {jnp.shape(w)}")
  d_in = w.shape[0]
  g = check_spec(spec, d_in, name)
  if jnp.shape(hessian) != (d_in, d_in):
    raise ValueError(f"{name}: hessian has shape {jnp.shape(hessian)}, expected {(d_in, d_in)}")
  _check_mask(mask, w.shape, name)
  if blocksize < 1:
    raise ValueError(f"{name}: blocksize must be >= 1, got {blocksize}")
  if damp < 0:
    raise ValueError(f"{name}: damp must be >= 0, got {damp}")
  check_finite(w, name)
  return g


def _whole(blocksize: int, multiple: int) -> int:
  """``blocksize`` rounded up to a multiple of ``multiple``."""
  return -(-int(blocksize) // multiple) * multiple


def gptq(
  w: jax.Array,
  hessian: jax.Array,
  spec: QuantSpec,
  *,
  mask: Optional[jax.Array] = None,
  blocksize: int = 128,
  damp: float = 0.01,
):
  """GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for
  Generative Pre-trained Transformers"), in float32.

  The input axis is quantised one row (one input feature; a column of the
  paper's ``(out, in)`` weight) at a time, in order, and each row's rounding error
  ``(w - q) / U_jj`` is compensated on the rows not yet quantised (``U``: upper
  Cholesky factor of ``H^-1``), lazily in blocks of ``blocksize`` rows. Hessian,
  dead inputs and damping as in :func:`jaxprune.oneshot.sparsegpt`: dead inputs
  (``H_jj == 0``) are zeroed, ``damp * mean(diag H)`` is added to the diagonal and
  raised tenfold while the factorisation fails. A group's scale is chosen when the
  loop reaches the group's first row, from its current (error-updated) weights,
  as the reference code does with ``--groupsize``; one scale per output column
  (``group_size=None``) is chosen from the whole kernel before the loop.

  With ``mask``, pruned entries (False) are replaced by exactly 0 (code 0) as
  SparseGPT does with its mask, and their error is compensated on later kept
  entries like a rounding error, so the result is both sparse and on the grid.

  Args:
    w: ``(in, out)`` kernel.
    hessian: ``(in, in)`` matrix proportional to ``X^T X`` (e.g. ``2/n X^T X``).
    spec: the :class:`QuantSpec`.
    mask: optional bool ``(in, out)``, True where a weight is kept.
    blocksize: rows per lazy block update (the paper's 128), rounded up to a
      multiple of the group size.
    damp: relative dampening (the paper's 0.01).

  Returns:
    ``(quantized, info)``: a :class:`Quantized` and a
    :class:`~jaxprune.oneshot.SparseGPTInfo` (damping, dead inputs).

  Raises:
    ValueError: a bad ``spec``, ``hessian`` or ``mask`` shape, NaN/inf weights.
  """
  g = _check_solve_inputs(w, hessian, spec, mask, blocksize, damp, "gptq")
  bs = _whole(blocksize, g if spec.group_size is not None else 1)
  keep = jnp.ones(w.shape, bool) if mask is None else jnp.asarray(mask, bool)
  _, _, codes, scales, info = solvers.column_solve(
    jnp.asarray(w, jnp.float32),
    jnp.asarray(hessian, jnp.float32),
    keep,
    0,
    0,
    (0, 0),
    bs,
    float(damp),
    _Grid(spec.bits, spec.group_size, spec.scale_rule),
  )
  return Quantized(codes, scales, QuantSpec(spec.bits, spec.group_size, spec.scale_rule)), info


def sparsegpt_quant(
  w: jax.Array,
  hessian: jax.Array,
  spec: QuantSpec,
  sparsity: Optional[float] = None,
  sparsity_type: Optional[str] = None,
  *,
  blocksize: int = 128,
  damp: float = 0.01,
):
  """SparseGPT with quantisation inside its column loop (Frantar & Alistarh 2023,
  Sec. 3.5 "joint sparsification and quantization"; the reference code's ``--wbits``).

  The mask is chosen exactly as by :func:`jaxprune.oneshot.sparsegpt` (same
  targets, counts and tie-breaking: unstructured keeps ``numel - floor(s * numel)``
  entries of every block of ``blocksize`` input rows, N:M keeps ``N`` of every ``M``
  inputs), and each row is then replaced by its kept entries rounded to the grid
  of ``spec`` (pruned entries by 0) before its error is propagated, so pruning
  and rounding errors are compensated together. A group's scale is chosen when
  the loop reaches the group's first row, from its current weights restricted to
  the kept entries (for N:M, to the entries the current weights would keep).

  Args:
    w: ``(in, out)`` kernel.
    hessian: ``(in, in)`` matrix ``2/n X^T X``.
    spec: the :class:`QuantSpec`.
    sparsity: the target sparsity (see :func:`jaxprune.oneshot.parse_target`).
    sparsity_type: ``"N:M"`` such as ``"2:4"``, instead of ``sparsity``.
    blocksize: column block size (the paper's 128), rounded up to a multiple of
      the group size and of ``M``. The unstructured counts are per block of this
      rounded size.
    damp: relative dampening (the paper's 0.01).

  Returns:
    ``(quantized, mask, info)``: a :class:`Quantized` (code 0 wherever ``mask``
    is False), the bool mask and a :class:`~jaxprune.oneshot.SparseGPTInfo`.

  Raises:
    ValueError: a bad target, ``spec`` or ``hessian`` shape, NaN/inf weights.
  """
  t = solvers.parse_target(sparsity, sparsity_type)
  g = _check_solve_inputs(w, hessian, spec, None, blocksize, damp, "sparsegpt_quant")
  solvers._check_kernel(w, t, "sparsegpt_quant")
  multiple = math.lcm(g if spec.group_size is not None else 1, t.m if t.is_nm else 1)
  bs = _whole(blocksize, multiple)
  d_in, d_out = w.shape
  rem = d_in - (-(-d_in // bs) - 1) * bs  # real rows of the last block
  k_full = topk.keep_count(bs * d_out, t.sparsity)
  k_last = topk.keep_count(rem * d_out, t.sparsity) + (bs - rem) * d_out  # padding kept
  _, mask, codes, scales, info = solvers.column_solve(
    jnp.asarray(w, jnp.float32),
    jnp.asarray(hessian, jnp.float32),
    None,
    k_full,
    k_last,
    (t.n, t.m),
    bs,
    float(damp),
    _Grid(spec.bits, spec.group_size, spec.scale_rule),
  )
  return (
    Quantized(codes, scales, QuantSpec(spec.bits, spec.group_size, spec.scale_rule)),
    mask,
    info,
  )
