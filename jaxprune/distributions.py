"""Per-leaf sparsity distributions: uniform and Erdos-Renyi-Kernel (ERK).

Each returns a tree like ``params`` of per-leaf target sparsities (Python
floats), 0.0 for leaves that are not pruned.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from jaxprune.paths import Include, path_str, pruned_leaves


def _check_sparsity(sparsity):
  if (
    not isinstance(sparsity, (int, float))
    or isinstance(sparsity, bool)
    or not 0.0 <= sparsity < 1.0
  ):
    raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")


def uniform(params, sparsity: float, include: Include = None):
  """The same sparsity for every pruned leaf (0.0 for the others).

  Examples:
    >>> import jax.numpy as jnp
    >>> uniform({"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)}, 0.5)
    {'bias': 0.0, 'kernel': 0.5}
  """
  _check_sparsity(sparsity)
  pruned = pruned_leaves(params, include)
  return jax.tree.map(lambda sel: float(sparsity) if sel else 0.0, pruned)


def erk(params, sparsity: float, include: Include = None, power_scale: float = 1.0):
  """Erdos-Renyi-Kernel sparsities (Evci et al. 2020, "Rigging the Lottery").

  The density of a pruned leaf is proportional to ``sum(shape) / prod(shape)``
  (Mocanu et al. 2018 for dense layers; the kernel dims of a convolution count
  too), scaled by one factor ``eps`` chosen so that the total number of kept
  parameters equals that of the uniform distribution. A leaf whose density
  would exceed 1 is made dense and ``eps`` is solved again for the rest, as in
  the RigL reference code.
  """
  _check_sparsity(sparsity)
  pruned = pruned_leaves(params, include)
  flat, treedef = jax.tree.flatten(params)
  sel = jax.tree.leaves(pruned)
  shapes = {i: jnp.shape(x) for i, (x, s) in enumerate(zip(flat, sel)) if s and jnp.size(x) > 0}
  result = [0.0] * len(flat)
  if sparsity == 0.0 or not shapes:
    return jax.tree.unflatten(treedef, result)
  dense: set[int] = set()
  while True:
    rhs, divisor, raw = 0.0, 0.0, {}
    for i, shape in shapes.items():
      n = math.prod(shape)
      if i in dense:
        rhs -= n * sparsity
      else:
        rhs += n * (1.0 - sparsity)
        raw[i] = (sum(shape) / n) ** power_scale
        divisor += raw[i] * n
    if not raw:  # every leaf dense: the target cannot be met
      raise ValueError(f"erk: sparsity={sparsity} cannot be reached with the selected leaves")
    eps = rhs / divisor
    max_raw = max(raw.values())
    if max_raw * eps > 1.0:
      dense.update(i for i, r in raw.items() if r == max_raw)
    else:
      break
  for i in shapes:
    result[i] = 0.0 if i in dense else 1.0 - eps * raw[i]
  return jax.tree.unflatten(treedef, result)


def per_layer(targets: Mapping[str, float]):
  """A distribution with a sparsity of its own for named layers or leaves.

  ``targets`` maps a layer (``"Conv_0"``: every pruned leaf under it) or a leaf
  path (``"Conv_0/kernel"``) to its sparsity; the other pruned leaves get the
  global ``sparsity``, leaves that are not pruned 0.0. Use it to spare a layer
  that the uniform split cuts too deep (the first convolution, say) or to split
  a budget of units by hand. A key that names no pruned leaf is an error.

  Examples:
    >>> import jax.numpy as jnp
    >>> params = {"Conv_0": {"kernel": jnp.ones((3, 3, 1, 32))},
    ...           "Conv_1": {"kernel": jnp.ones((3, 3, 32, 64))}}
    >>> per_layer({"Conv_0": 0.5})(params, 0.75)
    {'Conv_0': {'kernel': 0.5}, 'Conv_1': {'kernel': 0.75}}
  """
  targets = dict(targets)
  for key, value in targets.items():
    try:
      _check_sparsity(value)
    except ValueError:
      raise ValueError(
        f"per_layer: the sparsity of {key!r} must be a number in [0, 1), got {value!r}"
      ) from None

  def distribution(params, sparsity: float, include: Include = None):
    _check_sparsity(sparsity)
    pruned = pruned_leaves(params, include)
    used = set()

    def leaf(path, sel):
      if not sel:
        return 0.0
      name = path_str(path)
      for key, value in targets.items():
        if name == key or name.startswith(key + "/"):
          used.add(key)
          return float(value)
      return float(sparsity)

    out = jax.tree_util.tree_map_with_path(leaf, pruned)
    unused = [k for k in targets if k not in used]
    if unused:
      names = [path_str(p) for p, s in jax.tree_util.tree_flatten_with_path(pruned)[0] if s]
      raise ValueError(
        f"per_layer: {', '.join(map(repr, unused))} names no pruned leaf; pruned leaves: "
        f"{', '.join(names)}"
      )
    return out

  distribution.__name__ = "per_layer"
  return distribution


def resolve(distribution, params, sparsity: float, include: Include = None):
  """Per-leaf sparsities from a distribution name or callable."""
  if distribution == "uniform":
    return uniform(params, sparsity, include)
  if distribution == "erk":
    return erk(params, sparsity, include)
  if callable(distribution):
    return _checked(distribution(params, sparsity, include), params, distribution)
  raise ValueError(f"distribution must be 'uniform', 'erk' or a callable, got {distribution!r}")


def _checked(sparsities, params, distribution):
  """A callable distribution's result, checked: the params' tree structure, and
  per leaf a real number in [0, 1) (returned as Python floats)."""
  name = getattr(distribution, "__name__", repr(distribution))
  p_flat, p_def = jax.tree_util.tree_flatten_with_path(params)
  try:
    values = p_def.flatten_up_to(sparsities)
  except (ValueError, TypeError) as e:
    raise ValueError(
      f"distribution {name!r} returned a tree that does not match the params "
      f"(one number per parameter leaf, at paths "
      f"{', '.join(path_str(p) for p, _ in p_flat)}): {e}"
    ) from None
  out = []
  for (path, _), v in zip(p_flat, values):
    if isinstance(v, bool) or not (isinstance(v, numbers.Real) or getattr(v, "ndim", None) == 0):
      raise ValueError(
        f"distribution {name!r} returned {v!r} for {path_str(path)!r}; expected a number in [0, 1)"
      )
    try:
      f = float(v)
    except TypeError:  # a traced value
      raise ValueError(
        f"distribution {name!r} returned a traced value for {path_str(path)!r}; "
        "per-leaf sparsities must be concrete numbers in [0, 1)"
      ) from None
    if not 0.0 <= f < 1.0:
      raise ValueError(
        f"distribution {name!r} returned sparsity {f!r} for {path_str(path)!r}; "
        "every value must be in [0, 1)"
      )
    out.append(f)
  return jax.tree.unflatten(p_def, out)
