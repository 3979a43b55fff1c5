"""Sparse-aware initialisation: rescale each unit's incoming weights to its active fan-in."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxprune.masks import check_masks, is_pruned_mask


def rescale_init(params, masks):
  """Scales each output unit's incoming weights by ``sqrt(fan_in / active_fan_in)``.

  A dense init (He, LeCun, Glorot) sets the weight variance from the fan-in;
  after pruning a unit sees only ``active_fan_in`` of its inputs and its
  pre-activation variance shrinks by that ratio. Rescaling restores the scale
  the dense init intended (Evci et al. 2022, "Gradient Flow in Sparse Neural
  Networks and How Lottery Tickets Win"; Liu et al. 2019 use the same fan-in
  correction). Output units are the last axis (Flax Dense and Conv kernels);
  the fan-in is the product of the other axes. Leaves with a scalar mask, and
  units with no active input, are left as they are. Masked entries stay 0.0.
  """
  check_masks(params, masks)

  def leaf(p, m):
    if not is_pruned_mask(m) or jnp.ndim(p) < 2:
      return p
    fan_in = math.prod(jnp.shape(p)[:-1])
    axes = tuple(range(jnp.ndim(p) - 1))
    active = jnp.sum(m, axis=axes, dtype=jnp.float32)
    scale = jnp.where(active > 0, jnp.sqrt(fan_in / jnp.maximum(active, 1.0)), 1.0)
    return jnp.where(m, p * scale.astype(jnp.result_type(p)), jnp.zeros((), jnp.result_type(p)))

  return jax.tree.map(leaf, params, masks)
