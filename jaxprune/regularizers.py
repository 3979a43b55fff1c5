"""Sparsity-inducing regularisers: loss terms and proximal optax steps.

Two ways to push weights toward (structured) sparsity during training:

* Penalty terms added to the loss, differentiated like the rest of it:
  :func:`l1_penalty` (the lasso, Tibshirani 1996, "Regression Shrinkage and
  Selection via the Lasso", JRSS-B) and :func:`group_lasso_penalty` (Yuan & Lin
  2006, "Model Selection and Estimation in Regression with Grouped Variables",
  JRSS-B), with one group per output unit -- a neuron of a Dense kernel or a
  filter of a Conv kernel, i.e. one slice along the last axis -- as in
  structured sparsity learning (Wen et al. 2016, "Learning Structured Sparsity
  in Deep Neural Networks", NeurIPS).
* :func:`add_l1_subgradient`, an optax transformation placed before the
  optimizer that adds the L1 subgradient ``strength * sign(p)`` to the
  gradients: the L1 term on the loss as network slimming trains it (Liu et al.
  2017, "Learning Efficient Convolutional Networks through Network Slimming",
  ICCV), on BatchNorm scales.
* Proximal steps, optax transformations placed after the optimizer in a chain:
  :func:`prox_l1` (soft-thresholding) and :func:`prox_group_lasso` (group
  soft-thresholding). Unlike a (sub)gradient of the penalty, a proximal step
  sets weights and whole units exactly to zero, which :mod:`jaxprune.compact`
  can then remove.

Example::

  lr, lam = 1e-2, 1e-4
  tx = optax.chain(optax.sgd(lr), jaxprune.regularizers.prox_group_lasso(lr * lam))
  state = tx.init(params)
  updates, state = tx.update(grads, state, params)   # params are required
  params = optax.apply_updates(params, updates)

  # or, as a loss term:
  loss = task_loss(params, batch) + lam * group_lasso_penalty(params)

``include`` selects the leaves, as everywhere in jaxprune: None (floating-point
leaves with ``ndim >= 2``: kernels, not biases or norm scales), a regular
expression searched in the path string (``"Dense_0/kernel"``), or a predicate
``(path, leaf) -> bool``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxprune.paths import Include, include_fn, path_str

__all__ = [
  "l1_penalty",
  "group_lasso_penalty",
  "prox_l1",
  "prox_group_lasso",
  "ProxState",
  "add_l1_subgradient",
  "L1SubgradientState",
  "soft_threshold",
  "group_soft_threshold",
]


def _selected(params, include: Include) -> list:
  pred = include_fn(include)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return [x for p, x in flat if pred(path_str(p), x)]


def _unit_sq_norms(x: jax.Array) -> jax.Array:
  """Squared L2 norm of every slice along the last axis (one per output unit)."""
  x = jnp.asarray(x)
  if x.ndim == 0:
    return jnp.square(x)[None]
  return jnp.sum(jnp.square(x), axis=tuple(range(x.ndim - 1)))


def _safe_sqrt(sq: jax.Array) -> jax.Array:
  """sqrt with gradient 0 at 0 (a valid subgradient of the norm) instead of NaN."""
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def l1_penalty(params, include: Include = None) -> jax.Array:
  """Sum of absolute values of the selected leaves (Tibshirani 1996)."""
  leaves = _selected(params, include)
  return sum((jnp.sum(jnp.abs(x)) for x in leaves), jnp.zeros((), jnp.float32))


def group_lasso_penalty(params, include: Include = None) -> jax.Array:
  """Sum over selected leaves and output units of the unit's L2 norm.

  A unit is one slice along the last axis: a column of a Dense kernel
  ``(in, out)``, a filter of a Conv kernel ``(H, W, in, out)`` (Yuan & Lin
  2006; Wen et al. 2016). Groups are not weighted by size. The gradient at an
  all-zero unit is 0 (a subgradient), never NaN.
  """
  leaves = _selected(params, include)
  return sum((jnp.sum(_safe_sqrt(_unit_sq_norms(x))) for x in leaves), jnp.zeros((), jnp.float32))


def soft_threshold(x: jax.Array, threshold) -> jax.Array:
  """Proximal operator of ``threshold * |x|_1``: ``sign(x) * max(|x| - t, 0)``."""
  return jnp.sign(x) * jnp.maximum(jnp.abs(x) - threshold, 0).astype(x.dtype)


def group_soft_threshold(x: jax.Array, threshold) -> jax.Array:
  """Proximal operator of ``threshold * sum_units ||x_unit||_2`` (units: last axis).

  Each unit is scaled by ``max(0, 1 - t / ||x_unit||)``; units with norm at most
  ``t`` become exactly zero.
  """
  x = jnp.asarray(x)
  norms = _safe_sqrt(_unit_sq_norms(x))
  factor = jnp.where(norms > threshold, 1.0 - threshold / jnp.where(norms > 0, norms, 1.0), 0.0)
  if x.ndim == 0:
    return (x * factor[0]).astype(x.dtype)
  return (x * factor).astype(x.dtype)


class ProxState(NamedTuple):
  """State of a proximal step: the step count (for a ``strength`` schedule)."""

  count: jax.Array


def _per_leaf(new_update, strength, include: Include, name: str, state_cls):
  """A transformation mapping each selected leaf's update ``u`` (param ``p``) to
  ``new_update(u, p, t)``, ``t`` the strength (a schedule of the step count)."""
  pred = include_fn(include)

  def init_fn(params):
    del params
    return state_cls(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(f"{name} needs params: call tx.update(updates, state, params)")
    t = strength(state.count) if callable(strength) else strength

    def step(path, u, p):
      if u is None or not pred(path_str(path), p):
        return u
      return new_update(u, p, t).astype(u.dtype)

    new_updates = jax.tree_util.tree_map_with_path(step, updates, params)
    return new_updates, state_cls(count=optax.safe_int32_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def _prox(prox_fn, strength, include: Include, name: str) -> optax.GradientTransformation:
  return _per_leaf(lambda u, p, t: prox_fn(p + u, t) - p, strength, include, name, ProxState)


def prox_l1(
  strength: optax.ScalarOrSchedule, include: Include = None
) -> optax.GradientTransformation:
  """Proximal L1 step (ISTA): soft-thresholds ``params + updates``.

  Place it after the optimizer: ``optax.chain(opt, prox_l1(lr * lam))``. The
  returned updates move each selected parameter to
  ``sign(p + u) * max(|p + u| - strength, 0)``; weights that fall within
  ``strength`` of zero become exactly zero (Tibshirani 1996). Leaves not
  selected by ``include`` pass through unchanged.

  Args:
    strength: per-step threshold -- the learning rate times the L1 weight -- or
      a schedule ``step -> threshold``.
    include: which leaves (see the module docstring).

  Example::

    tx = optax.chain(optax.sgd(0.1), prox_l1(0.1 * 1e-4))
    updates, state = tx.update(grads, state, params)
  """
  return _prox(soft_threshold, strength, include, "prox_l1")


def prox_group_lasso(
  strength: optax.ScalarOrSchedule, include: Include = None
) -> optax.GradientTransformation:
  """Proximal group-lasso step: group soft-thresholding of output units.

  Each output unit (slice along the last axis) ``v = p + u`` of a selected leaf
  becomes ``v * max(0, 1 - strength / ||v||_2)``: units whose norm is at most
  ``strength`` become exactly zero, the rest shrink toward zero (Yuan & Lin
  2006; Wen et al. 2016). Zeroed units can then be removed with
  :func:`jaxprune.compact.compact`.

  Args:
    strength: per-step threshold (learning rate times the group-lasso weight)
      or a schedule ``step -> threshold``.
    include: which leaves (see the module docstring).

  Example::

    tx = optax.chain(optax.adam(1e-3), prox_group_lasso(1e-3 * 1e-2))
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  """
  return _prox(group_soft_threshold, strength, include, "prox_group_lasso")


class L1SubgradientState(NamedTuple):
  """State of :func:`add_l1_subgradient`: the step count (for a ``strength`` schedule)."""

  count: jax.Array


def add_l1_subgradient(
  strength: optax.ScalarOrSchedule, include: Include = None
) -> optax.GradientTransformation:
  """Adds ``strength * sign(params)`` to the selected leaves of the gradients.

  The subgradient of ``strength * ||p||_1``, added to the gradient of the loss
  before the optimizer -- ``optax.chain(add_l1_subgradient(1e-4, include),
  optax.adam(1e-3))`` -- is the sparsity term of network slimming (Liu et al.
  2017, "Learning Efficient Convolutional Networks through Network Slimming",
  ICCV): its reference code adds ``s * sign(gamma)`` to the gradients of every
  BatchNorm scale, ``s = 1e-4``, then steps the optimizer. The L1 analogue of
  ``optax.add_decayed_weights``. An entry that is exactly zero gets nothing
  (``sign(0) = 0``), so pruned entries stay zero. Leaves not selected by
  ``include`` pass through unchanged.

  Args:
    strength: the L1 weight, or a schedule ``step -> weight`` (e.g. 0 once
      pruning has ended, to fine-tune without the penalty).
    include: which leaves (see the module docstring); for BatchNorm scales a
      pattern such as ``r"^BatchNorm_\\d+/scale$"``.

  Example::

    tx = optax.chain(add_l1_subgradient(1e-4, r"BatchNorm_\\d+/scale$"), optax.adam(1e-3))
    updates, state = tx.update(grads, state, params)   # params are required
  """
  return _per_leaf(
    lambda u, p, t: u + t * jnp.sign(p), strength, include, "add_l1_subgradient", L1SubgradientState
  )
