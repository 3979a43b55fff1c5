"""Finding the per-parameter leaves of any optax state, by tree structure.

A sub-tree of an optimizer state whose structure equals the params' (Adam's
``mu`` and ``nu``, momentum traces, Lion's momentum, ``MultiSteps``'
accumulated gradients, states inside ``chain`` or ``inject_hyperparams``) holds
one entry per parameter entry. No optimizer classes are listed, so optimizers
not named here work too. Leaves of such a sub-tree whose shape differs from
their parameter's (Adafactor's factored row/column statistics) cannot be reset
per entry and are left as they are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxprune.masks import is_pruned_mask


def zero_where_masked(opt_state, masks, params):
  """Zeroes per-parameter optimizer-state entries where ``masks`` is False."""
  pdef = jax.tree.structure(params)
  pshapes = [jnp.shape(p) for p in jax.tree.leaves(params)]
  mleaves = jax.tree.leaves(masks)

  # optax.masked / multi_transform put MaskedNode() where a leaf is not theirs.
  is_masked_node = lambda x: isinstance(x, optax.MaskedNode)

  def matches(node):
    return jax.tree.structure(node, is_leaf=is_masked_node) == pdef

  def reset(node):
    if not matches(node):
      return node
    leaves = jax.tree.leaves(node, is_leaf=is_masked_node)
    out = [
      jnp.where(m, x, jnp.zeros((), x.dtype))
      if not is_masked_node(x) and is_pruned_mask(m) and jnp.shape(x) == shape
      else x
      for x, m, shape in zip(leaves, mleaves, pshapes)
    ]
    return jax.tree.unflatten(pdef, out)

  return jax.tree.map(reset, opt_state, is_leaf=matches)
