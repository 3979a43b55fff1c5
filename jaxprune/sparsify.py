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
  """One inner update under ``masks``; pruned entries get ``-param`` (-> exactly 0).

  The inner transformation sees its per-parameter state zeroed where ``masks``
  is False, and gradients and parameters masked the same way. Its new state is
  then zero at pruned entries for every algorithm and from the first step on,
  also for parameters that were never masked and for weight decay inside the
  inner chain, for any transformation whose state stays zero where state,
  gradient and parameter are zero (sgd, momentum, Adam(W), Lion, RMSProp,
  Adagrad, ``MultiSteps``' accumulators, ...). Resetting the state before the
  update fuses with the inner update for free; zeroing the new state after it
  made XLA recompute the state update inside the parameter-update fusion
  (4 more bytes per parameter with Adam, measured in the compiled HLO).
  """
  inner_state = zero_where_masked(inner_state, masks, params)
  updates, inner_state = inner.update(
    zero_masked(grads, masks), inner_state, zero_masked(params, masks), **extra
  )
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
  its per-parameter state is zero wherever a mask is False, after ``init`` and
  after every update (first step included, for every algorithm; see
  :func:`_inner_step` for the one condition on the inner transformation), and
  entries a mask update adds start at exactly 0.0 with zero state. Mask updates
  run inside the jitted step, in place, on the algorithm's schedule; RigL-style
  algorithms receive the dense gradients given to ``tx.update``. The
  straight-through family (``ste``, ``sr_ste``) is the exception: its
  parameters stay dense and only the forward pass is masked, through
  :func:`jaxprune.straight_through`.

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
    inner_state = zero_where_masked(inner.init(params), masks, params)
    return SparseState(jnp.zeros([], jnp.int32), masks, inner_state, algo_state)

  def update_fn(updates, state, params=None, **extra):
    if params is None:
      raise ValueError(
        "jaxprune.sparsify needs the current params: call tx.update(grads, state, params)"
      )
    check_masks(params, state.masks)
    count = optax.safe_increment(state.count)
    if algorithm.straight_through is not None:
      return _straight_through_step(algorithm, inner, updates, state, params, count, extra)
    if not algorithm.changes_masks:
      new_updates, inner_state = _inner_step(
        inner, updates, state.inner_state, params, state.masks, extra
      )
      return new_updates, SparseState(count, state.masks, inner_state, state.algo_state)

    masks, grads, algo_state, grown = _mask_update(algorithm, state, params, updates)
    new_updates, inner_state = _inner_step(inner, grads, state.inner_state, params, masks, extra)
    if algorithm.skip_optimizer_step:
      new_updates, inner_state = _skip_on_update(
        algorithm.is_update_step(state.count),
        new_updates,
        inner_state,
        state.inner_state,
        params,
        masks,
      )
    if grown is not None:
      new_updates = jax.tree.map(_start_grown, new_updates, grown, masks)
    return new_updates, SparseState(count, masks, inner_state, algo_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _skip_on_update(skip, updates, inner_state, old_inner_state, params, masks):
  """On a mask-update step (``skip``), no optimizer step: updates that only
  zero the entries the new masks prune, and the inner state as before the step,
  zeroed at pruned entries (so it stays zero there, as on every step). Else
  the inner step's ``(updates, inner_state)`` unchanged.

  Selected with ``where`` rather than ``lax.cond``: both sides are elementwise
  and fuse with the inner update, and no branch copies the state.
  """
  kept_state = zero_where_masked(old_inner_state, masks, params)
  only_prune = jax.tree.map(
    lambda u, p, m: _enforce_zero(jnp.zeros_like(u), p, m), updates, params, masks
  )
  pick = lambda a, b: jnp.where(skip, a, b)
  return (
    jax.tree.map(pick, only_prune, updates),
    jax.tree.map(pick, kept_state, inner_state),
  )


def _straight_through_step(algorithm, inner, grads, state, params, count, extra):
  """``ste``/``sr_ste``: masks on schedule, dense params, unmasked inner update.

  The inner transformation gets ``algorithm.straight_through(grads, params,
  masks)`` (the SR-STE decay, or the gradients themselves) and its update is
  returned as is: pruned entries are not zeroed, their state is kept.
  """
  masks, algo_state = lax.cond(
    algorithm.is_update_step(state.count),
    lambda _: algorithm.update(state.count, params, grads, state.masks, state.algo_state),
    lambda _: (state.masks, state.algo_state),
    None,
  )
  masks = place_like(params, masks)
  grads = algorithm.straight_through(grads, params, masks)
  updates, inner_state = inner.update(grads, state.inner_state, params, **extra)
  return updates, SparseState(count, masks, inner_state, algo_state)


def _mask_update(algorithm, state, params, grads):
  """The mask update of a mask-changing algorithm, run only on its update steps.

  Returns ``(masks, grads, algo_state, grown)``. On an update step ``masks``
  are the new masks and ``grads`` are zero where a connection was just added
  (``new & ~old``): such an entry is 0.0 with zero inner state before the step
  (it was pruned), and with a zero gradient the inner update leaves it at 0.0
  with zero state, while dropped entries are zeroed by the new masks. ``grown``
  is None, or with ``algorithm.grow_values``, a tree of the values that grown
  entries start at (0.0 elsewhere).

  The update runs in a ``while_loop`` of zero or one trip rather than under
  ``lax.cond``: a loop updates its carry (masks, gradients, algorithm state) in
  place, so a step without a mask update copies nothing, and the inner update's
  fusions read the masks as they would for ``static``. A ``cond`` must copy the
  masks it passes through, and made every non-update step pay for it. The work
  sits in a ``cond`` inside the loop body so that XLA cannot hoist
  loop-invariant parts of it (random bits, ``|w|``) out of the loop onto every
  step. A ``while_loop`` has no reverse-mode derivative: ``tx.update`` of a
  mask-changing algorithm cannot be differentiated through (forward-mode and
  ``vmap`` work).
  """
  trips = algorithm.is_update_step(state.count).astype(jnp.int32)
  grown = None
  if algorithm.grow_values is not None:
    grown = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.result_type(p)), params)

  def update(carry):
    masks, grads, algo_state, grown = carry
    new, algo_state = algorithm.update(state.count, params, grads, masks, algo_state)
    new = place_like(params, new)
    added = jax.tree.map(lambda n, o: n & ~o if is_pruned_mask(n) else n, new, masks)
    grads = jax.tree.map(
      lambda g, a, n: jnp.where(a, jnp.zeros((), g.dtype), g) if is_pruned_mask(n) else g,
      grads,
      added,
      new,
    )
    if grown is not None:
      values = algorithm.grow_values(state.count, params, masks)
      grown = jax.tree.map(
        lambda v, a, n, z: jnp.where(a, jnp.asarray(v, z.dtype), z) if is_pruned_mask(n) else z,
        values,
        added,
        new,
        grown,
      )
    return new, grads, algo_state, grown

  def body(loop):
    i, carry = loop
    return i + 1, lax.cond(i == 0, update, lambda c: c, carry)

  _, (masks, grads, algo_state, grown) = lax.while_loop(
    lambda loop: loop[0] < trips,
    body,
    (jnp.int32(0), (state.masks, grads, state.algo_state, grown)),
  )
  return masks, grads, algo_state, grown


def _start_grown(u, v, m):
  """Entries added by this step's mask update start at ``v``: they are 0.0
  before the step, so their update is the value; elsewhere ``v`` is 0.0. A
  grown entry whose value is 0.0 gets the update of a zero gradient, 0.0."""
  if not is_pruned_mask(m):
    return u
  return jnp.where(v != 0, v.astype(u.dtype), u)


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
