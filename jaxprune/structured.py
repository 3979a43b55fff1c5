"""Structured sparsity patterns: N:M, blocks, and whole neurons/channels.

A ``sparsity_type`` string names the pattern a mask must follow:

``"unstructured"``
  Any entries (the library default; handled by :mod:`jaxprune.topk`).
``"N:M"`` (``"2:4"``, ``"1:4"``, ``"4:8"``, ...)
  Fine-grained structured sparsity: in every group of ``M`` consecutive weights
  along the contraction (input) axis exactly ``N`` are kept, the ``N`` with the
  highest scores. Sparse tensor cores run 2:4 at twice the dense rate
  (Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks",
  arXiv:2104.08378; Zhou et al. 2021, "Learning N:M Fine-grained Structured
  Sparse Neural Networks From Scratch", ICLR). The per-layer sparsity is fixed
  at ``1 - N/M`` (:func:`nm_sparsity`); the ``sparsity`` argument is ignored.
``"block:RxC"`` (``"block:4x4"``, ``"block:1x32"``, ...)
  Whole ``R x C`` tiles are kept or dropped by tile score, the sum of the
  scores in the tile (Gray, Radford & Kingma 2017, "GPU Kernels for
  Block-Sparse Weights").
``"neuron"`` / ``"channel"`` (synonyms)
  Whole output units are kept or dropped by the L2 norm of their scores; for
  ``|w|`` scores that is the L2 norm of the unit's weights (filter pruning,
  Li et al. 2017, "Pruning Filters for Efficient ConvNets", ICLR; network
  slimming, Liu et al. 2017, ICCV). The per-layer ``sparsity`` (from the
  uniform or ERK distribution) is the fraction of units removed.

Axes follow Flax's kernel layout ``(..., in, out)``: a Dense kernel is
``(in, out)`` and a Conv kernel ``(H, W, in, out)``. By default N:M groups run
along ``axis=-2`` (the input axis for both: axis 0 of a Dense kernel, the
input-channel axis of a Conv kernel; axis 0 for 1-D leaves), and neurons and
channels are slices along ``axis=-1`` (output units). Blocks tile the matrix
view of a kernel, ``prod(shape[:-1]) x shape[-1]`` -- the ``(in, out)`` matrix
of a Dense layer and the im2col matrix ``(H*W*in, out)`` of a Conv layer;
``axis`` is not used for blocks.

Counts follow the library-wide rounding rule: a layer with ``G`` blocks or units
at sparsity ``s`` keeps ``G - floor(s * G)`` of them (:func:`jaxprune.topk.keep_count`).
Ties are broken deterministically: among equal scores, the lower index wins
(within an N:M group, the lower position; among blocks, the lower row-major tile
index; among units, the lower unit index). A NaN score ranks below every real
score (a tile or unit holding one, below every real tile or unit), but above
-inf, which excludes an entry (its tile or unit): pruning by ``masked_magnitude``
scores never brings back a pruned entry ahead of an active NaN weight.

Each string parses once (:func:`parse_sparsity_type`) into a small frozen
pattern value, :class:`Unstructured`, :class:`NM`, :class:`Block` or
:class:`Units`, which every function here also accepts in place of the string
(``sparsity_type=NM(2, 4)``); the pattern holds the per-kind rules (which shapes
fit, how groups are counted, masks, drop-and-grow).

Every mask-producing function here is jit-able: shapes are static, and the
``sparsity`` of block and neuron masks may be a traced scalar.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.masks import keep_count_of
from jaxprune.rounding import floor_product
from jaxprune.topk import topk_mask

__all__ = [
  "SparsityType",
  "Unstructured",
  "NM",
  "Block",
  "Units",
  "parse_sparsity_type",
  "nm_sparsity",
  "incompatibility",
  "structured_mask",
  "select_compatible",
  "incompatibility_notes",
  "nm_mask_from_scores",
  "replace_connections",
  "replace_groups",
  "block_mask_from_scores",
  "unit_mask_from_scores",
  "unit_norms",
  "group_count",
  "is_nm_sparse",
  "group_counts",
]


class _PatternMeta(type):
  """Lets ``SparsityType(kind, n, m, block, name)``, the constructor of the former
  NamedTuple, keep building the matching pattern (deprecated: build :class:`NM`,
  :class:`Block`, :class:`Units` or :class:`Unstructured`, or parse a string)."""

  def __call__(cls, *args, **kwargs):
    if cls is SparsityType:
      return _from_fields(*args, **kwargs)
    return super().__call__(*args, **kwargs)


class SparsityType(metaclass=_PatternMeta):
  """A parsed ``sparsity_type``: one of :class:`Unstructured`, :class:`NM`,
  :class:`Block` or :class:`Units`, each a small frozen value that knows which
  shapes it fits, how it counts groups, how it makes a mask from scores and how
  SET/RigL replace connections within it.

  Attributes:
    kind: ``"unstructured"``, ``"nm"``, ``"block"`` or ``"unit"`` (neurons and
      channels).
    n: kept entries per group (N:M only, else 0).
    m: group size (N:M only, else 0).
    block: ``(R, C)`` tile shape (blocks only, else ``()``).
    name: the canonical string (``"2:4"``, ``"block:4x4"``, ``"neuron"``...).
    implied_sparsity: ``1 - N/M`` for N:M, else None (the pattern does not fix it).
    uses_axis: whether ``axis`` applies (N:M groups, neuron/channel units).
  """

  kind = ""
  name = ""
  n = 0
  m = 0
  block = ()
  implied_sparsity = None
  uses_axis = False

  def default_axis(self, ndim: int) -> int:
    return -2 if ndim >= 2 else 0

  def resolve_axis(self, ndim: int, axis: Optional[int]) -> int:
    """Non-negative axis on an array of rank ``ndim`` (may raise)."""
    a = self.default_axis(ndim) if axis is None else int(axis)
    if not -ndim <= a < ndim:
      raise ValueError(f"axis={axis} is out of range for a rank-{ndim} leaf")
    return a % ndim

  def incompatibility(self, shape: tuple, axis: Optional[int]) -> Optional[str]:
    """Why a leaf of ``shape`` cannot take the pattern, or None."""
    return None

  def group_count(self, shape: tuple, axis: Optional[int]) -> int:
    """How many groups a ``sparsity`` counts (entries by default)."""
    return math.prod(shape)

  def mask(self, scores: jax.Array, sparsity, axis: Optional[int], keep) -> jax.Array:
    """The mask of ``scores`` (of a compatible shape) keeping ``keep`` groups, or
    ``G - floor(s G)`` when ``keep`` is None."""
    raise NotImplementedError

  def replace(self, mask, weights, grow_scores, drop_fraction, axis, regrow_dropped):
    """One drop-and-grow update of a compatible ``mask``: ``(new_mask, n_replaced)``."""
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Unstructured(SparsityType):
  """Any entries (the library default)."""

  kind = "unstructured"
  name = "unstructured"

  def mask(self, scores, sparsity, axis, keep):
    return topk_mask(scores, _count_to_keep(scores.size, sparsity) if keep is None else keep)

  def replace(self, mask, weights, grow_scores, drop_fraction, axis, regrow_dropped):
    # In the leaf's own shape: a reshape of a sharded leaf would gather it.
    return replace_groups(
      mask,
      _group_rank(weights, growth=False),
      _group_rank(grow_scores, growth=True),
      drop_fraction,
      regrow_dropped,
    )


@dataclasses.dataclass(frozen=True)
class NM(SparsityType):
  """``n`` kept in every group of ``m`` consecutive entries along ``axis``."""

  n: int
  m: int
  kind = "nm"
  uses_axis = True

  def __post_init__(self):
    if not 1 <= self.n <= self.m:
      raise ValueError(f"N:M needs 1 <= N <= M (got N={self.n}, M={self.m})")

  @property
  def name(self) -> str:
    return f"{self.n}:{self.m}"

  @property
  def implied_sparsity(self) -> float:
    return 1.0 - self.n / self.m

  def incompatibility(self, shape, axis):
    if not shape:
      return f"{self.name} needs an array, got a scalar"
    try:
      a = self.resolve_axis(len(shape), axis)
    except ValueError as e:
      return f"{self.name}: {e}"
    if shape[a] % self.m:
      return f"{self.name}: axis {a} has size {shape[a]}, not divisible by M={self.m}"
    return None

  def mask(self, scores, sparsity, axis, keep):
    return nm_mask_from_scores(scores, self.n, self.m, self.resolve_axis(scores.ndim, axis))

  def replace(self, mask, weights, grow_scores, drop_fraction, axis, regrow_dropped):
    if regrow_dropped:
      raise ValueError(f"regrow_dropped is not supported for sparsity_type={self.name!r}")
    ax = self.resolve_axis(mask.ndim, axis)
    return _nm_replace(mask, weights, grow_scores, drop_fraction, self.n, self.m, ax)


@dataclasses.dataclass(frozen=True)
class Block(SparsityType):
  """Whole ``rows x cols`` tiles of the matrix view ``(prod(shape[:-1]), shape[-1])``."""

  rows: int
  cols: int
  kind = "block"

  def __post_init__(self):
    if self.rows < 1 or self.cols < 1:
      raise ValueError(f"block sizes must be >= 1 (got {self.rows}x{self.cols})")

  @property
  def block(self) -> tuple:
    return (self.rows, self.cols)

  @property
  def name(self) -> str:
    return f"block:{self.rows}x{self.cols}"

  def incompatibility(self, shape, axis):
    if len(shape) < 2:
      return f"{self.name} needs a kernel with ndim >= 2, got shape {shape}"
    rows, cols = math.prod(shape[:-1]), shape[-1]
    reasons = []
    if rows % self.rows:
      reasons.append(f"{rows} rows (prod of all but the last axis) not divisible by R={self.rows}")
    if cols % self.cols:
      reasons.append(f"{cols} columns (last axis) not divisible by C={self.cols}")
    return f"{self.name}: " + " and ".join(reasons) if reasons else None

  def group_count(self, shape, axis):
    return (math.prod(shape[:-1]) // self.rows) * (shape[-1] // self.cols)

  def mask(self, scores, sparsity, axis, keep):
    return block_mask_from_scores(scores, sparsity, self.block, keep=keep)

  def replace(self, mask, weights, grow_scores, drop_fraction, axis, regrow_dropped):
    r, c = self.block
    rows, cols = math.prod(mask.shape[:-1]), mask.shape[-1]
    tiles = lambda red: (
      lambda x: red(x.reshape(rows // r, r, cols // c, c), axis=(1, 3)).reshape(-1)
    )
    active = tiles(jnp.any)(mask)
    mag = _group_rank(weights, False, tiles(jnp.sum), tiles(jnp.any))
    grow = _group_rank(grow_scores, True, tiles(jnp.sum), tiles(jnp.any))
    new, n_drop = replace_groups(active, mag, grow, drop_fraction, regrow_dropped)
    full = jnp.broadcast_to(new.reshape(rows // r, 1, cols // c, 1), (rows // r, r, cols // c, c))
    return full.reshape(mask.shape), n_drop * (r * c)


@dataclasses.dataclass(frozen=True)
class Units(SparsityType):
  """Whole output units (slices along ``axis``, default -1); ``name`` is
  ``"neuron"`` or ``"channel"`` (synonyms)."""

  name: str = "neuron"
  kind = "unit"
  uses_axis = True

  def __post_init__(self):
    if self.name not in ("neuron", "channel"):
      raise ValueError(f"Units name must be 'neuron' or 'channel', got {self.name!r}")

  def default_axis(self, ndim):
    return -1

  def incompatibility(self, shape, axis):
    if len(shape) < 2:
      return f"{self.name} pruning needs a kernel with ndim >= 2, got shape {shape}"
    try:
      self.resolve_axis(len(shape), axis)
    except ValueError as e:
      return f"{self.name}: {e}"
    return None

  def group_count(self, shape, axis):
    return shape[self.resolve_axis(len(shape), axis)]

  def mask(self, scores, sparsity, axis, keep):
    return unit_mask_from_scores(scores, sparsity, self.resolve_axis(scores.ndim, axis), keep=keep)

  def replace(self, mask, weights, grow_scores, drop_fraction, axis, regrow_dropped):
    ax = self.resolve_axis(mask.ndim, axis)
    other = tuple(i for i in range(mask.ndim) if i != ax)
    active = jnp.any(mask, axis=other)
    norm = lambda x: jnp.sqrt(jnp.sum(jnp.square(x), axis=other))
    any_ = lambda x: jnp.any(x, axis=other)
    mag = _group_rank(weights, False, norm, any_)
    grow = _group_rank(grow_scores, True, norm, any_)
    new, n_drop = replace_groups(active, mag, grow, drop_fraction, regrow_dropped)
    shape = [1] * mask.ndim
    shape[ax] = mask.shape[ax]
    unit_size = mask.size // max(mask.shape[ax], 1)
    return jnp.broadcast_to(new.reshape(shape), mask.shape), n_drop * unit_size


def _from_fields(kind, n=0, m=0, block=(), name="unstructured") -> SparsityType:
  """The pattern the former ``SparsityType(kind, n, m, block, name)`` NamedTuple named."""
  if kind == "unstructured":
    return Unstructured()
  if kind == "nm":
    return NM(n, m)
  if kind == "block":
    return Block(*block)
  if kind == "unit":
    return Units(name)
  raise ValueError(f"unknown sparsity pattern kind {kind!r}")


SparsityTypeLike = Union[str, SparsityType]
"""A ``sparsity_type`` argument: one of the strings above or a parsed pattern."""


class SparsityTypeError(ValueError, TypeError):
  """A ``sparsity_type`` that is not a string: both a ValueError and a TypeError."""


_NM_RE = re.compile(r"^(\d+):(\d+)$")
_BLOCK_RE = re.compile(r"^block:(\d+)x(\d+)$")
_HELP = (
  'expected "unstructured", "N:M" with 1 <= N <= M (e.g. "2:4"), '
  '"block:RxC" with R, C >= 1 (e.g. "block:4x4"), "neuron" or "channel"'
)


def parse_sparsity_type(sparsity_type) -> SparsityType:
  """Parses and validates a ``sparsity_type`` string into its pattern.

  Accepts ``"unstructured"``, ``"N:M"`` (``1 <= N <= M``), ``"block:RxC"``
  (``R, C >= 1``), ``"neuron"`` and ``"channel"``; case and surrounding
  whitespace are ignored. A pattern (:class:`SparsityType`) passes through
  unchanged. Strings are parsed once (cached).

  Raises:
    ValueError: naming ``sparsity_type`` and the bad value, for ``"3:2"``,
      ``"0:4"``, ``"2:0"``, ``"2:4:8"``, ``"block:0x4"``, unknown words, and
      non-strings (those raise :class:`SparsityTypeError`, which is both a
      ValueError and a TypeError).
  """
  if isinstance(sparsity_type, SparsityType):
    return sparsity_type
  if not isinstance(sparsity_type, str):
    raise SparsityTypeError(
      f"sparsity_type must be a string, got {sparsity_type!r} "
      f"of type {type(sparsity_type).__name__}; {_HELP}"
    )
  return _parse_string(sparsity_type)


@functools.lru_cache(maxsize=64)
def _parse_string(sparsity_type: str) -> SparsityType:
  s = sparsity_type.strip().lower()
  if s == "unstructured":
    return Unstructured()
  if s in ("neuron", "channel"):
    return Units(s)
  match = _NM_RE.match(s)
  if match:
    n, m = int(match.group(1)), int(match.group(2))
    if not 1 <= n <= m:
      raise ValueError(
        f"sparsity_type={sparsity_type!r}: N:M needs 1 <= N <= M (got N={n}, M={m}); {_HELP}"
      )
    return NM(n, m)
  match = _BLOCK_RE.match(s)
  if match:
    r, c = int(match.group(1)), int(match.group(2))
    if r < 1 or c < 1:
      raise ValueError(
        f"sparsity_type={sparsity_type!r}: block sizes must be >= 1 (got {r}x{c}); {_HELP}"
      )
    return Block(r, c)
  raise ValueError(f"sparsity_type={sparsity_type!r} is not a known sparsity type; {_HELP}")


def nm_sparsity(sparsity_type) -> float:
  """The sparsity ``1 - N/M`` an N:M pattern implies (``0.5`` for ``"2:4"``).

  Examples:
    >>> nm_sparsity("2:4"), nm_sparsity("1:8")
    (0.5, 0.875)

  Raises:
    ValueError: if ``sparsity_type`` is not an N:M pattern.
  """
  implied = parse_sparsity_type(sparsity_type).implied_sparsity
  if implied is None:
    raise ValueError(
      f"sparsity_type={sparsity_type!r} is not an N:M pattern; only N:M types fix the sparsity"
    )
  return implied


def incompatibility(
  shape: Sequence[int], sparsity_type, axis: Optional[int] = None
) -> Optional[str]:
  """Why a leaf of ``shape`` cannot take ``sparsity_type``, or None if it can.

  The reason is a short human-readable sentence, e.g. ``"axis 0 has size 10,
  not divisible by M=4"``, suitable for a summary table or an error message.
  ``sparsity_type`` itself must be valid (else ValueError from
  :func:`parse_sparsity_type`).
  """
  return parse_sparsity_type(sparsity_type).incompatibility(tuple(int(d) for d in shape), axis)


# ----------------------------------------------------------------------------
# Selection primitives (jit-able).


_LOWEST = float(np.finfo(np.float32).min)  # rank of a NaN: below every other finite score


def _rank_key(scores: jax.Array) -> jax.Array:
  """float32 scores with NaN -> the lowest finite float32 (below every real
  score, above the -inf that excludes entries) and -0.0 -> +0.0 (ties then
  compare equal)."""
  x = jnp.asarray(scores, jnp.float32)
  return jnp.where(jnp.isnan(x), _LOWEST, x) + 0.0


def _group_key(x: jax.Array, reduce, any_) -> jax.Array:
  """Ranking key of groups of scores (tiles, units): ``reduce`` over the group.

  A group holding a -inf score (an excluded entry, as ``masked_magnitude``
  marks pruned ones) is -inf; else a group holding a NaN (or the lowest finite
  float32, a NaN already ranked by :func:`_rank_key`) ranks just above, at the
  lowest finite float32, so it never outranks a real group nor ties with an
  excluded one.
  """
  x = jnp.asarray(x, jnp.float32)
  low = jnp.isnan(x) | (x == _LOWEST)
  excluded = x == -jnp.inf
  value = reduce(jnp.where(low | excluded, 0.0, x))
  return jnp.where(any_(excluded), -jnp.inf, jnp.where(any_(low), _LOWEST, value))


def _count_to_keep(n_groups: int, sparsity) -> jax.Array | int:
  """``G - floor(s * G)`` (:func:`jaxprune.masks.keep_count_of`), with ``s`` checked
  when concrete and clipped to [0, 1] when traced."""
  if sparsity is None:
    raise ValueError("sparsity is required for block, neuron and channel masks (got None)")
  if isinstance(sparsity, jax.core.Tracer):
    return keep_count_of(n_groups, jnp.clip(jnp.asarray(sparsity, jnp.float32), 0.0, 1.0))
  s = float(sparsity)
  if not 0.0 <= s <= 1.0:
    raise ValueError(f"sparsity must be in [0, 1], got {s}")
  return keep_count_of(n_groups, s)


def _keep_highest(scores: jax.Array, k) -> jax.Array:
  """Mask of the ``k`` highest of a small score array (blocks or units).

  A stable sort of the negated keys: equal scores keep index order, so the lower
  row-major index wins; NaN ranks lowest. Same selection as
  :func:`jaxprune.topk.topk_mask`, cheaper to compile for the few hundred to
  few thousand groups of a layer. ``k`` may be traced.
  """
  key = _rank_key(scores).reshape(-1)
  order = jnp.argsort(0.0 - key, stable=True)
  keep = jnp.arange(key.size) < k
  return jnp.zeros(key.shape, bool).at[order].set(keep).reshape(scores.shape)


def nm_mask_from_scores(scores: jax.Array, n: int, m: int, axis: int = -2) -> jax.Array:
  """Keeps the ``n`` highest scores in every group of ``m`` along ``axis``.

  Groups are ``m`` consecutive positions along ``axis`` (positions
  ``[g*m, (g+1)*m)``) at fixed indices of all other axes. Exactly ``n`` entries
  per group are True; among equal scores the lower position wins; NaN ranks
  lowest. This is the primitive dynamic sparse training calls with combined
  drop/grow scores to stay N:M (Zhou et al. 2021).

  Args:
    scores: float array; ``scores.shape[axis]`` must be divisible by ``m``.
    n: kept entries per group, a Python int with ``0 <= n <= m``.
    m: the group size, a Python int.
    axis: the grouping axis (default -2, the input axis of Flax kernels).

  Returns:
    bool array of ``scores.shape``.
  """
  scores = jnp.asarray(scores)
  m = int(m)
  if isinstance(n, jax.core.Tracer):  # a traced N (gradual N:M ramp): clipped to [0, M]
    n = jnp.clip(n, 0, m)
  else:
    n = int(n)
    if not (m >= 1 and 0 <= n <= m):
      raise ValueError(f"N:M needs 0 <= N <= M and M >= 1, got N={n}, M={m}")
  if scores.ndim == 0:
    raise ValueError("N:M masks need an array, got a scalar")
  ax = axis % scores.ndim
  d = scores.shape[ax]
  if d % m:
    raise ValueError(f"axis {ax} has size {d}, not divisible by M={m}")
  return _nm_impl(scores, n, m, ax)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _nm_impl(scores, n, m: int, ax: int):
  d = scores.shape[ax]
  x = jnp.moveaxis(_rank_key(scores), ax, -1)
  lead = x.shape[:-1]
  g = x.reshape(lead + (d // m, m))
  if m <= 16:
    # rank_i = #{j : s_j > s_i} + #{j < i : s_j == s_i}: m compares per entry.
    si = g[..., :, None]
    sj = g[..., None, :]
    pos = jnp.arange(m)
    earlier = pos[None, :] < pos[:, None]  # [i, j]: j < i
    rank = jnp.sum((sj > si) | ((sj == si) & earlier), axis=-1)
  else:
    # Large groups: a stable sort of the negated keys (ties keep index order).
    order = jnp.argsort(0.0 - g, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1, stable=True)
  keep = (rank < n).reshape(lead + (d,))
  return jnp.moveaxis(keep, -1, ax)


def block_mask_from_scores(
  scores: jax.Array, sparsity, block: tuple[int, int], *, keep=None
) -> jax.Array:
  """Keeps whole ``R x C`` tiles of the matrix view by the sum of their scores.

  The matrix view of a leaf of shape ``(..., out)`` is
  ``(prod(shape[:-1]), out)``. A leaf with ``G`` tiles keeps ``G - floor(s*G)``
  of them (or ``keep`` tiles, an int or traced int, when given; ``sparsity`` is
  then ignored); ties go to the lower row-major tile index; a tile whose sum is
  NaN ranks lowest.
  """
  scores = jnp.asarray(scores)
  r, c = (int(b) for b in block)
  shape = scores.shape
  rows, cols = math.prod(shape[:-1]), shape[-1]
  if scores.ndim < 2 or rows % r or cols % c:
    raise ValueError(f"shape {shape} cannot be tiled by {r}x{c} blocks")
  k = _count_to_keep((rows // r) * (cols // c), sparsity) if keep is None else keep
  return _block_impl(scores, k, (r, c))


@functools.partial(jax.jit, static_argnums=(2,))
def _block_impl(scores, k, block):
  r, c = block
  shape = scores.shape
  rows, cols = math.prod(shape[:-1]), shape[-1]
  x = jnp.asarray(scores, jnp.float32).reshape(rows // r, r, cols // c, c)
  tile = _group_key(x, lambda y: jnp.sum(y, axis=(1, 3)), lambda y: jnp.any(y, axis=(1, 3)))
  keep = _keep_highest(tile, k)
  full = jnp.broadcast_to(keep[:, None, :, None], (rows // r, r, cols // c, c))
  return full.reshape(shape)


def unit_norms(scores: jax.Array, axis: int = -1) -> jax.Array:
  """L2 norm of ``scores`` over all axes but ``axis``: one value per unit.

  Computed in float32; a unit with a NaN score has a NaN norm and ranks lowest.
  A unit with a ``-inf`` score (an entry masked out, as in
  ``masked_magnitude``) has norm ``-inf`` and ranks lowest too, so an update
  never brings back a pruned unit ahead of a live one.
  """
  x = jnp.asarray(scores, jnp.float32)
  ax = axis % x.ndim
  other = tuple(i for i in range(x.ndim) if i != ax)
  norms = jnp.sqrt(jnp.sum(jnp.square(x), axis=other))
  return jnp.where(jnp.any(x == -jnp.inf, axis=other), -jnp.inf, norms)


def unit_mask_from_scores(scores: jax.Array, sparsity, axis: int = -1, *, keep=None) -> jax.Array:
  """Keeps whole output units (slices along ``axis``) by their L2 norm.

  A leaf with ``G`` units keeps ``G - floor(s*G)`` (or ``keep`` units, an int or
  traced int, when given; ``sparsity`` is then ignored); ties go to the lower
  unit index. The mask is True on every entry of a kept unit and False on every
  entry of a removed one.
  """
  scores = jnp.asarray(scores)
  ax = axis % scores.ndim
  k = _count_to_keep(scores.shape[ax], sparsity) if keep is None else keep
  return _unit_impl(scores, k, ax)


def unit_rank_keys(scores: jax.Array, ax: int) -> jax.Array:
  """One ranking key per unit (slice along ``ax``): the L2 norm of its scores,
  -inf for a unit holding an excluded (-inf) entry, the lowest finite float32
  for one holding a NaN (:func:`_group_key`)."""
  other = tuple(i for i in range(jnp.ndim(scores)) if i != ax)
  return _group_key(
    scores,
    lambda y: jnp.sqrt(jnp.sum(jnp.square(y), axis=other)),
    lambda y: jnp.any(y, axis=other),
  )


def units_to_entries(keep: jax.Array, shape: Sequence[int], ax: int) -> jax.Array:
  """A per-unit mask along ``ax`` broadcast to every entry of ``shape``."""
  along = [1] * len(shape)
  along[ax] = shape[ax]
  return jnp.broadcast_to(keep.reshape(along), tuple(shape))


@functools.partial(jax.jit, static_argnums=(2,))
def _unit_impl(scores, k, ax):
  keep = _keep_highest(unit_rank_keys(scores, ax), k)
  return units_to_entries(keep, scores.shape, ax)


def structured_mask(
  scores: jax.Array, sparsity, sparsity_type, axis: Optional[int] = None, *, keep=None
) -> jax.Array:
  """A bool mask of ``scores.shape`` following ``sparsity_type``.

  Args:
    scores: float array shaped like the parameter (e.g. ``|w|`` or ``|grad|``).
    sparsity: fraction of blocks/units (or entries, for ``"unstructured"``) to
      remove; a Python float or a traced scalar. Ignored for N:M.
    sparsity_type: see the module docstring.
    axis: grouping axis for N:M (default -2, 0 for 1-D) or the unit axis for
      neurons/channels (default -1). Unused for blocks.
    keep: instead of ``sparsity``, the number of entries, blocks or units to
      keep (an int or traced int; out of :func:`group_count` groups). Ignored
      for N:M.

  Returns:
    bool array; jit-able (shapes static, ``sparsity`` may be traced).

  Raises:
    ValueError: bad ``sparsity_type`` or a shape it cannot apply to (the reason
      from :func:`incompatibility`).
  """
  st = parse_sparsity_type(sparsity_type)
  scores = jnp.asarray(scores)
  _check_fits(st, scores.shape, axis)
  return st.mask(scores, sparsity, axis, keep)


def _check_fits(st: SparsityType, shape: tuple, axis: Optional[int]) -> None:
  reason = st.incompatibility(tuple(shape), axis)
  if reason is not None:
    raise ValueError(f"sparsity_type={st.name!r} cannot apply to shape {tuple(shape)}: {reason}")


def group_count(shape: Sequence[int], sparsity_type, axis: Optional[int] = None) -> int:
  """How many groups a ``sparsity`` counts for a leaf of ``shape``: entries
  (unstructured), tiles (blocks) or units (neurons/channels); for N:M, the
  number of entries. ``G - floor(s * G)`` of them are kept."""
  return parse_sparsity_type(sparsity_type).group_count(tuple(int(d) for d in shape), axis)


# ----------------------------------------------------------------------------
# Dynamic sparse training within a pattern (SET / RigL drop-and-grow).


_NEVER = -1.0
"""Rank of an entry (group) that must never win a drop-and-grow selection: below every
real magnitude (>= 0), above the -inf that takes entries out of a selection."""


def _group_rank(x, growth: bool, reduce=None, any_=None) -> jax.Array:
  """Ranking key of every group of ``x``: ``reduce(|x|)`` in float32.

  A group holding a value that must never win ranks at :data:`_NEVER`: a NaN
  weight, and for growth (``growth=True``) also a NaN or +-inf score. The
  reduction sees only the other entries (set to 0), so a NaN can neither
  propagate nor, squared or summed, raise the group's score. ``reduce`` and
  ``any_`` map an entry array to group values (default: each entry a group).
  """
  a = jnp.abs(jnp.asarray(x, jnp.float32))
  bad = ~jnp.isfinite(a) if growth else jnp.isnan(a)
  if reduce is None:
    return jnp.where(bad, _NEVER, a)
  return jnp.where(any_(bad), _NEVER, reduce(jnp.where(bad, 0.0, a)))


def replace_groups(active, magnitude, growth, drop_fraction, regrow_dropped: bool = False):
  """Drop-and-grow over whole groups: the one SET/RigL selection rule.

  The arrays hold one value per group, in any shape (entries of a leaf in the
  leaf's shape, or one per block or unit); ties go to the lower flat index.

  ``floor(d * n_active)`` active groups with the lowest ``magnitude`` are
  dropped and as many grown with the highest ``growth`` among the groups
  inactive before the update (with ``regrow_dropped``, among every group not
  kept, so a dropped group may come straight back). Keys come from
  :func:`_group_rank`: a group at :data:`_NEVER` is never grown in place of
  one with a finite key; without ``regrow_dropped`` the drops are capped at
  the number of inactive groups with a finite growth key, so nothing is ever
  grown at a non-finite score; with it, a dropped group with a non-finite key
  can only take its own place back (inactive ones rank below it). Ties go to
  the lower index. Returns ``(new_active, n_dropped)``, ``sum(new_active) ==
  sum(active)``.
  """
  n_active = jnp.sum(active, dtype=jnp.int32)
  n_drop = floor_product(drop_fraction, n_active)  # exact for any n_active
  finite = growth >= 0
  if not regrow_dropped:
    n_drop = jnp.minimum(n_drop, jnp.sum(~active & finite, dtype=jnp.int32))
  kept = topk_mask(jnp.where(active, magnitude, -jnp.inf), n_active - n_drop)
  excluded = kept if regrow_dropped else active
  # Below the dropped groups' _NEVER: inactive groups at a non-finite growth key.
  growth = jnp.where(active | finite, growth, _NEVER - 1.0)
  grown = topk_mask(jnp.where(excluded, -jnp.inf, growth), n_drop)
  return kept | grown, n_drop


def _pairwise_rank(key: jax.Array, descending: bool) -> jax.Array:
  """Rank of every entry within its last-axis group; ties go to the lower index."""
  m = key.shape[-1]
  ki, kj = key[..., :, None], key[..., None, :]
  pos = jnp.arange(m)
  earlier = pos[None, :] < pos[:, None]
  better = (kj > ki) if descending else (kj < ki)
  return jnp.sum(better | ((kj == ki) & earlier), axis=-1)


def _nm_replace(mask, weights, grow_scores, drop_fraction, n, m, ax):
  move = lambda x: jnp.moveaxis(jnp.asarray(x), ax, -1)
  shape = move(mask).shape
  groups = lambda x: x.reshape(-1, m)
  act = groups(move(mask).astype(bool))
  # An inf weight ranks as the largest finite float32: +-inf mark slots out of a selection.
  mag = jnp.minimum(groups(move(_group_rank(weights, growth=False))), -_LOWEST)
  grow = groups(move(_group_rank(grow_scores, growth=True)))
  # A group can drop at most min(n, m - n): it regrows among its own inactive
  # slots; and at most as many as it has inactive slots with a finite growth
  # score (_NEVER marks a NaN or inf one), so nothing is grown at a non-finite score.
  finite_slots = jnp.sum(~act & (grow >= 0), axis=-1, dtype=jnp.int32)
  cap = jnp.minimum(min(n, m - n), finite_slots)[:, None]
  eligible = act & (_pairwise_rank(jnp.where(act, mag, jnp.inf), descending=False) < cap)
  n_active = jnp.sum(act, dtype=jnp.int32)
  n_drop = floor_product(drop_fraction, n_active)
  n_drop = jnp.minimum(n_drop, jnp.sum(eligible, dtype=jnp.int32))
  drop = topk_mask(jnp.where(eligible, -mag, -jnp.inf), n_drop)
  per_group = jnp.sum(drop, axis=-1, dtype=jnp.int32)
  grow_rank = _pairwise_rank(jnp.where(act, -jnp.inf, grow), descending=True)
  grown = ~act & (grow_rank < per_group[:, None])
  new = ((act & ~drop) | grown).reshape(shape)
  return jnp.moveaxis(new, -1, ax), jnp.sum(per_group)


def replace_connections(
  mask,
  weights,
  grow_scores,
  drop_fraction,
  sparsity_type,
  axis: Optional[int] = None,
  *,
  regrow_dropped: bool = False,
):
  """One SET/RigL drop-and-grow update that keeps the ``sparsity_type`` pattern.

  * N:M: the ``floor(d * active)`` active weights with the smallest ``|w|`` are
    dropped (at most ``min(N, M - N)`` per group), and every group regrows as
    many among its previously inactive positions with the highest
    ``|grow_scores|``, so each group keeps exactly N (Zhou et al. 2021 train
    N:M masks from scratch the same way, group by group).
  * blocks / neurons / channels: whole groups are dropped and grown. A group's
    magnitude is the sum of ``|w|`` over the tile (blocks) or the L2 norm of
    the unit (neurons), its growth score the same reduction of
    ``|grow_scores|``; ``floor(d * active groups)`` are replaced.
  * unstructured: entry by entry.

  Regrowth happens only at positions (groups) inactive before the update; ties go
  to the lower index. Non-finite values never win: a NaN weight makes its entry
  (group) rank lowest for keeping, so it is dropped first, and nothing is ever
  grown at a NaN or +-inf growth score: the drops are capped at the number of
  inactive positions (groups) with a finite score -- for N:M, per group, so a
  group whose inactive slots all hold non-finite scores keeps its connections.
  The number of active entries (per N:M group: exactly N) never changes. ``floor(d * active)`` is exact
  (:func:`jaxprune.rounding.floor_product`). jit-able, with traced
  ``drop_fraction``.

  Args:
    mask: bool array, the active connections (following the pattern).
    weights: the leaf's parameters.
    grow_scores: growth priority (gradient for RigL, random for SET).
    drop_fraction: fraction of active connections (groups) to replace.
    sparsity_type: the pattern.
    axis: as in :func:`structured_mask`.
    regrow_dropped: the reference RigL rule (:func:`replace_groups`): growth
      ranks every position (group) not kept, so one dropped in this update may
      be grown again at once. Not for N:M.

  Returns:
    ``(new_mask, n_replaced)``: the new mask, with as many True entries as
    ``mask``, and the number of entries replaced (int32 scalar).
  """
  st = parse_sparsity_type(sparsity_type)
  mask = jnp.asarray(mask, bool)
  _check_fits(st, mask.shape, axis)
  return st.replace(mask, weights, grow_scores, drop_fraction, axis, regrow_dropped)


# ----------------------------------------------------------------------------
# Which leaves can take a pattern.


def incompatibility_notes(params, sparsity_type, include=None, axis: Optional[int] = None) -> dict:
  """``{path: reason}`` for leaves selected by ``include`` that cannot take the pattern.

  Suitable as the ``notes`` of :func:`jaxprune.summary`.
  """
  from jaxprune.paths import include_fn, path_str

  st = parse_sparsity_type(sparsity_type)
  pred = include_fn(include)
  notes = {}
  for keypath, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    path = path_str(keypath)
    if pred(path, leaf):
      reason = incompatibility(np.shape(leaf), st, axis)
      if reason is not None:
        notes[path] = f"skipped: {reason}"
  return notes


def select_compatible(params, pruned, cfg) -> Any:
  """Drops the leaves that cannot take ``cfg["sparsity_type"]`` from ``pruned``.

  Args:
    params: the parameter tree.
    pruned: a tree of bools like ``params``: leaves selected for pruning.
    cfg: the algorithm config; reads ``sparsity_type``, ``include`` and (if
      present) ``axis``.

  Returns:
    ``pruned`` with False where the leaf's shape is incompatible (see
    :func:`incompatibility`; :func:`incompatibility_notes` gives the reasons).

  Raises:
    ValueError: when ``include`` was given explicitly and selects an
      incompatible leaf -- naming the path, ``sparsity_type`` and the reason;
      and when ``axis`` is out of range for a selected leaf (N:M, neurons and
      channels) -- naming ``axis`` and the leaf's path, whatever ``include``.
  """
  st = parse_sparsity_type(cfg["sparsity_type"])
  axis = cfg.get("axis")
  explicit = cfg.get("include") is not None
  from jaxprune.paths import path_str

  def check(keypath, leaf, sel):
    if not sel:
      return False
    ndim = np.ndim(leaf)
    if axis is not None and st.uses_axis and ndim > 0 and not -ndim <= axis < ndim:
      raise ValueError(
        f"axis={axis} is out of range for {path_str(keypath)!r} (shape "
        f"{tuple(np.shape(leaf))}, rank {ndim}), a leaf selected for "
        f"sparsity_type={st.name!r}; valid axes are {-ndim}..{ndim - 1}"
      )
    reason = incompatibility(np.shape(leaf), st, axis)
    if reason is None:
      return True
    if explicit:
      raise ValueError(
        f"sparsity_type={st.name!r} cannot apply to {path_str(keypath)!r} "
        f"(shape {tuple(np.shape(leaf))}), selected by include="
        f"{cfg['include']!r}: {reason}"
      )
    return False

  return jax.tree_util.tree_map_with_path(check, params, pruned)


# ----------------------------------------------------------------------------
# Checks.


def group_counts(mask, m: int, axis: int = -2) -> np.ndarray:
  """Number of True (non-zero) entries in every N:M group of ``m`` along ``axis``.

  Returns an integer array shaped like ``mask`` with ``axis`` shrunk to
  ``size // m``.
  """
  x = np.asarray(mask) != 0
  ax = axis % x.ndim
  x = np.moveaxis(x, ax, -1)
  counts = x.reshape(x.shape[:-1] + (x.shape[-1] // m, m)).sum(-1)
  return np.moveaxis(counts, -1, ax)


def is_nm_sparse(x, n: int, m: int, axis: int = -2) -> bool:
  """True when every group of ``m`` along ``axis`` has at most ``n`` non-zeros."""
  x = np.asarray(x)
  if x.ndim == 0 or x.shape[axis % x.ndim] % m:
    return False
  return bool(np.all(group_counts(x, m, axis) <= n))
