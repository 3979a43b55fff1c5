"""Parameter paths and the `include` rule that decides which leaves are pruned.

A path string joins the keys of a leaf with "/", as Flax names parameters:
``{"params": {"Dense_0": {"kernel": w}}}`` gives ``"params/Dense_0/kernel"``.
The ``.value`` attribute of Flax NNX variables is left out, so an NNX state leaf
reads ``"linear/kernel"``.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Union

import jax
import jax.numpy as jnp

Include = Union[None, str, Callable[[str, Any], bool]]


def path_str(keypath) -> str:
  """Returns the "/"-joined string of a JAX key path.

  This is the string an ``include`` regex is searched in.

  Examples:
    >>> import jax
    >>> params = {"Dense_0": {"kernel": 1.0}}
    >>> [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    ['Dense_0/kernel']
  """
  parts = []
  for k in keypath:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      if k.name != "value":
        parts.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      parts.append(str(k.key))
    else:
      parts.append(str(k))
  return "/".join(parts)


def leaf_paths(tree) -> list[str]:
  """The path strings of all leaves of ``tree``, in flattening order."""
  return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _default_include(path: str, leaf) -> bool:
  del path
  return jnp.ndim(leaf) >= 2 and jnp.issubdtype(jnp.result_type(leaf), jnp.floating)


def include_fn(include: Include) -> Callable[[str, Any], bool]:
  """Turns ``include`` (None, regex string or predicate) into a predicate.

  None selects floating-point leaves with ``ndim >= 2`` (kernels, not biases or
  norms). A string is a regular expression searched in the path string
  (``"Dense_0/kernel"``). A callable is called as ``include(path_str, leaf)``.
  """
  if include is None:
    return _default_include
  if isinstance(include, str):
    try:
      pattern = re.compile(include)
    except re.error as e:
      raise ValueError(f"include: {include!r} is not a valid regular expression: {e}") from None
    return lambda path, leaf: pattern.search(path) is not None
  if callable(include):
    return lambda path, leaf: bool(include(path, leaf))
  raise TypeError(
    f"include must be None, a regex string or a callable (path, leaf) -> bool; got {include!r}"
  )


def pruned_leaves(params, include: Include = None):
  """A tree like ``params`` whose leaves are Python bools: is this leaf pruned?

  Raises ValueError when an explicit ``include`` selects no leaf, and TypeError
  when it selects a leaf that is not floating point; both name the paths.
  """
  pred = include_fn(include)
  selected = jax.tree_util.tree_map_with_path(lambda p, x: bool(pred(path_str(p), x)), params)
  if include is not None:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    chosen = [(path_str(p), x) for (p, x), s in zip(flat, jax.tree.leaves(selected)) if s]
    if not chosen:
      raise ValueError(
        f"include={include!r} matched no parameter; the parameter paths are: "
        + ", ".join(path_str(p) for p, _ in flat)
      )
    for path, x in chosen:
      if jnp.ndim(x) == 0:
        raise ValueError(
          f"include={include!r} selects the scalar {path!r}: a scalar cannot be pruned "
          "(its mask is a scalar True)"
        )
      if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(
          f"include={include!r} selects {path!r} of dtype {jnp.result_type(x)}: "
          "only floating-point leaves can be pruned"
        )
  return selected
