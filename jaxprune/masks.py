"""Masks as pytrees: building, checking and applying them.

A masks tree has exactly the params' tree structure. Each leaf is a bool array
of its parameter's shape, or a scalar ``True`` for a leaf that is not pruned
(it broadcasts). There are no ``None`` holes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxprune import topk
from jaxprune.paths import path_str
from jaxprune.rounding import floor_product


def dense_mask():
  """The mask of a leaf that is not pruned: a scalar True."""
  return jnp.ones((), jnp.bool_)


def is_pruned_mask(mask) -> bool:
  """A mask leaf prunes its parameter unless it is a scalar (scalar True = dense)."""
  return jnp.ndim(mask) > 0


def _prefix(caller: str) -> str:
  return f"{caller}: " if caller else ""


def check_structure(params, masks, caller: str = "") -> None:
  """Raises ValueError naming the first path where ``masks``' tree structure
  differs from ``params``' (the one message every masks check gives; ``caller``,
  when given, prefixes it: ``"compact: masks do not match params: ..."``)."""
  p_flat, p_def = jax.tree_util.tree_flatten_with_path(params)
  m_flat, m_def = jax.tree_util.tree_flatten_with_path(masks)
  if p_def == m_def:
    return
  head = f"{_prefix(caller)}masks do not match params"
  p_paths = [path_str(p) for p, _ in p_flat]
  m_paths = [path_str(p) for p, _ in m_flat]
  for pp, mp in zip(p_paths, m_paths):
    if pp != mp:
      raise ValueError(f"{head}: params have {pp!r} where masks have {mp!r}")
  if len(p_paths) != len(m_paths):
    longer, name = (p_paths, "params") if len(p_paths) > len(m_paths) else (m_paths, "masks")
    raise ValueError(f"{head}: only {name} have {longer[min(len(p_paths), len(m_paths))]!r}")
  raise ValueError(f"{head}: tree structures differ ({m_def} vs {p_def})")


def shape_mismatch(path: str, mask_shape, param_shape, caller: str = "") -> ValueError:
  """The error for a mask leaf whose shape does not fit its parameter."""
  return ValueError(
    f"{_prefix(caller)}masks do not match params at {path!r}: mask shape "
    f"{tuple(mask_shape)} vs parameter shape {tuple(param_shape)}"
  )


def check_masks(params, masks, caller: str = "") -> None:
  """Raises ValueError naming the first path where ``masks`` does not fit ``params``:
  the tree structure (:func:`check_structure`), then per leaf a bool mask that is
  a scalar or has its parameter's shape."""
  check_structure(params, masks, caller)
  p_flat = jax.tree_util.tree_flatten_with_path(params)[0]
  for (path, p), m in zip(p_flat, jax.tree.leaves(masks)):
    if jnp.ndim(m) and jnp.shape(m) != jnp.shape(p):
      raise shape_mismatch(path_str(path), jnp.shape(m), jnp.shape(p), caller)
    if jnp.result_type(m) != jnp.bool_:
      raise ValueError(
        f"{_prefix(caller)}mask at {path_str(path)!r} has dtype {jnp.result_type(m)}; "
        "masks must be bool"
      )


def zero_masked(tree, masks, skip_scalar_masks: bool = True):
  """``where(mask, x, 0)`` leaf by leaf, without structure checks.

  With ``skip_scalar_masks`` (the per-step path) scalar masks are taken to be
  True, as the algorithms make them, and cost nothing.
  """

  def leaf(x, m):
    if skip_scalar_masks and not is_pruned_mask(m):
      return x
    return jnp.where(m, x, jnp.zeros((), jnp.result_type(x)))

  return jax.tree.map(leaf, tree, masks)


def apply_masks(params, masks):
  """Zeroes every entry of ``params`` whose mask is False (exactly 0.0).

  Examples:
    >>> import jax.numpy as jnp
    >>> params = {"w": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array([5.0])}
    >>> masks = {"w": jnp.array([True, False, True]), "b": jnp.array(True)}
    >>> out = apply_masks(params, masks)
    >>> out["w"].tolist(), out["b"].tolist()
    ([1.0, 0.0, 3.0], [5.0])
  """
  check_masks(params, masks)
  return zero_masked(params, masks, skip_scalar_masks=False)


def keep_count_of(n: int, sparsity):
  """:func:`jaxprune.topk.keep_count`, also for a traced sparsity.

  A traced sparsity (a float32 without x64) gives exactly the count the eager
  rule gives for the same float32 value (:func:`jaxprune.rounding.floor_product`).
  """
  if isinstance(sparsity, jax.core.Tracer):
    return jnp.int32(n) - floor_product(sparsity, n)
  return topk.keep_count(n, sparsity)


def _select(scores, sparsities):
  """Top-k masks leaf by leaf; a leaf with a static sparsity None or 0 stays dense."""

  def leaf(s, sp):
    if sp is None or (not isinstance(sp, jax.core.Tracer) and float(sp) == 0.0):
      return dense_mask()
    return topk.topk_mask(s, keep_count_of(jnp.size(s), sp))

  return jax.tree.map(leaf, scores, sparsities)


def random_scores(key, tree):
  """Uniform [0, 1) scores shaped like each leaf, from ``fold_in(key, leaf_index)``."""
  leaves, treedef = jax.tree.flatten(tree)
  return jax.tree.unflatten(
    treedef,
    [jax.random.uniform(jax.random.fold_in(key, i), jnp.shape(x)) for i, x in enumerate(leaves)],
  )


def _mix32(x: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser (Appleby, "fmix32"): a bijection of uint32
  whose every output bit depends on every input bit."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def hashed_scores(key, tree):
  """Uniform ``[0, 1)`` float32 scores shaped like each leaf, counter-based.

  Entry ``j`` (flat index) of leaf ``i`` scores ``mix(mix(j ^ a) + b) >> 8``
  times ``2**-24``, with ``a, b`` two words drawn from ``fold_in(key, i)`` and
  ``mix`` MurmurHash3's finaliser: a few integer operations an entry where
  threefry's ``jax.random.uniform`` spends ~20x more on XLA:CPU, which matters
  when every mask update draws one score per parameter (SET's growth). Scores
  take ``2**24`` values, so equal draws happen and are broken by flat index,
  as every tie in :mod:`jaxprune.topk`.
  """
  leaves, treedef = jax.tree.flatten(tree)

  def leaf(i, x):
    a, b = jax.random.bits(jax.random.fold_in(key, i), (2,), jnp.uint32)
    shape = jnp.shape(x)
    j = jnp.arange(math.prod(shape), dtype=jnp.uint32).reshape(shape)
    h = _mix32(_mix32(j ^ a) + b)
    return (h >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)

  return jax.tree.unflatten(treedef, [leaf(i, x) for i, x in enumerate(leaves)])


def magnitude_masks(params, sparsities):
  """Keeps the largest-magnitude entries of each leaf.

  Args:
    params: a pytree of arrays.
    sparsities: a tree like ``params`` of per-leaf sparsities (floats in [0, 1));
      a leaf at 0.0 gets a scalar True mask. See :mod:`jaxprune.topk` for the
      exact rounding and tie-break.
  """
  return _select(jax.tree.map(jnp.abs, params), sparsities)


def random_masks(key, params, sparsities):
  """Keeps a uniformly random subset of each leaf, of the exact size.

  Each leaf draws from ``jax.random.fold_in(key, leaf_index)``.
  """
  return _select(random_scores(key, params), sparsities)
