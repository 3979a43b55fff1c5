"""The optax wrapper that keeps parameters sparse inside the training step."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.experimental.shard_alike import shard_alike

from jaxprune.algorithms.base import Algorithm
from jaxprune.masks import check_masks, is_pruned_mask, zero_masked
from jaxprune.optimizer_state import zero_where_masked


class SparseState(NamedTuple):
  """State of :func:`sparsify`: step count, masks, inner and algorithm state."""

  count: jax.Array
  masks: Any
  inner_state: Any
  algo_state: Any


def _inner_step(inner, grads, inner_state, params, masks, extra):
  """Masked gradients through ``inner``; pruned entries get ``-param`` (-> exactly 0)."""
  updates, inner_state = inner.update(zero_masked(grads, masks), inner_state, params, **extra)
  return jax.tree.map(_enforce_zero, updates, params, masks), inner_state


def _enforce_zero(u, p, m):
  """``-p`` where the mask is False, so that ``p + update`` is exactly 0.0.

  Computed in the promoted dtype of update and parameter: rounding ``-p`` to a
  narrower update dtype (bf16 gradients, f32 params) would leave a residue.
  A NaN or inf parameter cannot be zeroed by an additive update.
  """
  if not is_pruned_mask(m):
    return u
  dt = jnp.promote_types(jnp.result_type(u), jnp.result_type(p))
  return jnp.where(m, u.astype(dt), -p.astype(dt))


def place_like(params, masks):
  """Gives every full-shape mask its parameter's sharding (``shard_alike``).

  Masks drawn from random numbers or computed from scores do not inherit the
  sharding of their parameters by themselves; under a ``Mesh`` this keeps each
  mask next to its parameter shard, so no mask update gathers a parameter.
  """
  return jax.tree.map(lambda p, m: shard_alike(p, m)[1] if is_pruned_mask(m) else m, params, masks)


def sparsify(
  inner: optax.GradientTransformation, algorithm: Algorithm
) -> optax.GradientTransformationExtraArgs:
  """Wraps any optax transformation so that parameters stay sparse.

  After ``updates, state = tx.update(grads, state, params)`` and
  ``optax.apply_updates(params, updates)``, every entry whose mask is False is
  exactly 0.0, at every step. The inner transformation sees masked gradients;
  its per-parameter state is zeroed wherever a mask update removes or adds an
  entry, and added entries start at exactly 0.0. Mask updates run inside the
  jitted step under ``lax.cond`` on the algorithm's schedule; RigL-style
  algorithms receive the dense gradients given to ``tx.update``.

  Args:
    inner: any optax transformation (chains, ``inject_hyperparams``,
      ``MultiSteps``, ...).
    algorithm: from :func:`jaxprune.create`.
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    masks, algo_state = algorithm.init(params)
    check_masks(params, masks)
    masks = place_like(params, masks)
    return SparseState(jnp.zeros([], jnp.int32), masks, inner.init(params), algo_state)

  def update_fn(updates, state, params=None, **extra):
    if params is None:
      raise ValueError(
        "jaxprune.sparsify needs the current params: call tx.update(grads, state, params)"
      )
    check_masks(params, state.masks)
    count = optax.safe_increment(state.count)
    if not algorithm.changes_masks:
      new_updates, inner_state = _inner_step(
        inner, updates, state.inner_state, params, state.masks, extra
      )
      return new_updates, SparseState(count, state.masks, inner_state, state.algo_state)

    # Only the mask update sits under lax.cond; the rest runs every step so that
    # XLA fuses it with the inner update (a cond around the whole inner update
    # measured ~8% slower on CPU). On a step without a mask update ``stable``
    # equals the masks and the resets below change nothing.
    masks, algo_state = lax.cond(
      algorithm.is_update_step(state.count),
      lambda _: _placed(
        algorithm.update(state.count, params, updates, state.masks, state.algo_state), params
      ),
      lambda _: (state.masks, state.algo_state),
      None,
    )
    stable = jax.tree.map(lambda new, old: new & old, masks, state.masks)
    inner_state = zero_where_masked(state.inner_state, stable, params)
    new_updates, inner_state = _inner_step(inner, updates, inner_state, params, stable, extra)
    return new_updates, SparseState(count, masks, inner_state, algo_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _placed(masks_and_state, params):
  masks, algo_state = masks_and_state
  return place_like(params, masks), algo_state


def _sparse_states(opt_state):
  is_sparse = lambda x: isinstance(x, SparseState)
  return [x for x in jax.tree.leaves(opt_state, is_leaf=is_sparse) if is_sparse(x)]


def get_sparse_state(opt_state) -> SparseState:
  """The (outermost) :class:`SparseState` inside any optax state."""
  found = _sparse_states(opt_state)
  if not found:
    raise ValueError(
      "no jaxprune SparseState found in this optimizer state; "
      "was the optimizer built with jaxprune.sparsify?"
    )
  return found[0]


def get_masks(opt_state):
  """The current masks, found even when the sparse state is nested in other optax states."""
  return get_sparse_state(opt_state).masks
