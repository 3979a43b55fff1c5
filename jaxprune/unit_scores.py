"""Unit scores for neuron/channel pruning: |BatchNorm scale| and the Taylor estimate.

A neuron/channel magnitude algorithm (``gradual_magnitude`` with
``sparsity_type="neuron"`` or ``"channel"``) ranks a layer's units by the L2
norm of their kernel columns. The wrappers here change only that ranking, by
handing the algorithm a scoring copy of the params whose unit norms are the
score; the schedule, keep counts and masks stay the algorithm's:

* :func:`score_by_batchnorm_scale`: ``|gamma|`` of the BatchNorm after the
  layer (Liu et al. 2017, "Learning Efficient Convolutional Networks through
  Network Slimming"), since BatchNorm makes the kernel's norm meaningless.
* :func:`score_by_taylor`: the first-order Taylor estimate of the loss change
  when the unit, its bias and its BatchNorm are removed (Molchanov et al. 2019,
  "Importance Estimation for Neural Network Pruning"), of the update step's
  batch or, as in the paper, averaged over the batches between mask updates.

Compose them inside :func:`jaxprune.shrink.tie_units`, e.g.
``tie_units(score_by_taylor(a, average=True))``; :mod:`jaxprune.shrink`
re-exports every name here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.algorithms.base import Algorithm
from jaxprune.layer_chain import get_path, layer_chain, replace_path, tied_leaves, to_dict

__all__ = [
  "batchnorm_scale_scores",
  "score_by_batchnorm_scale",
  "taylor_unit_estimates",
  "unit_scores_as_kernels",
  "taylor_unit_scores",
  "TaylorAverageState",
  "score_by_taylor",
]


def batchnorm_scale_scores(params, layers: Optional[Sequence[str]] = None):
  """``params`` with each unit of a BatchNorm-followed kernel rescaled to norm |scale|.

  BatchNorm makes a layer's function independent of the scale of each of its
  kernel's units (output channels): multiplying a unit's weights by ``a > 0``
  multiplies its batch mean and standard deviation by ``a`` too, so the kernel's
  magnitude says nothing about the unit's importance. Network slimming (Liu et
  al. 2017, "Learning Efficient Convolutional Networks through Network
  Slimming") ranks channels by the absolute BatchNorm scale ``|gamma|``
  instead. The returned tree, meant only for scoring, holds every such kernel
  with unit ``c`` scaled to L2 norm ``|gamma_c|`` (a zero unit stays zero), so
  the unit norms that neuron/channel magnitude pruning ranks are the ``|gamma|``
  of the network-slimming criterion. Layers without a BatchNorm (or without a
  scale) keep their kernels.
  """
  params = to_dict(params)
  for lin, bn in layer_chain(params, layers):
    scale = get_path(params, f"{bn}/scale") if bn is not None else None
    if scale is None:
      continue
    kernel = get_path(params, f"{lin}/kernel")
    other = tuple(range(jnp.ndim(kernel) - 1))
    norm = jnp.sqrt(jnp.sum(jnp.square(kernel.astype(jnp.float32)), axis=other))
    factor = jnp.abs(scale.astype(jnp.float32)) / jnp.where(norm > 0, norm, 1.0)
    params = replace_path(params, f"{lin}/kernel", (kernel * factor).astype(kernel.dtype))
  return params


def score_by_batchnorm_scale(
  algorithm: Algorithm, layers: Optional[Sequence[str]] = None
) -> Algorithm:
  """``algorithm`` deciding its masks on :func:`batchnorm_scale_scores` of the params.

  For a neuron/channel magnitude algorithm (e.g. ``gradual_magnitude`` with
  ``sparsity_type="channel"``) this ranks the units of every Conv/Dense layer
  followed by a BatchNorm by ``|gamma|`` (network slimming, Liu et al. 2017) and
  the other layers' units by their kernel's L2 norm as before. Only the scores
  change: the params, gradients, schedule and keep counts are the algorithm's.
  Compose it inside :func:`~jaxprune.shrink.tie_units`:
  ``tie_units(score_by_batchnorm_scale(a))``.
  """

  def init(params):
    return algorithm.init(batchnorm_scale_scores(params, layers))

  def update(step, params, grads, masks, state):
    return algorithm.update(step, batchnorm_scale_scores(params, layers), grads, masks, state)

  return algorithm._replace(init=init, update=update)


def taylor_unit_estimates(params, grads, layers: Optional[Sequence[str]] = None) -> dict:
  """``{layer path: T}``, the first-order Taylor estimate of every unit of every
  Dense/Conv layer: ``T_c = sum_theta theta * dL/dtheta`` over every parameter
  that goes with unit ``c`` (:func:`~jaxprune.shrink.tie_units`): its kernel
  column, its bias, and the scale and offset of the BatchNorm after it.

  Removing the unit sets all of them to 0, so ``-T_c`` is the first-order
  estimate of the loss change (Molchanov et al. 2019, "Importance Estimation for
  Neural Network Pruning", the group criterion). Under BatchNorm the kernel's
  share is ~0 (the output does not depend on the kernel's scale) and ``T_c`` is
  that of a gate after the BatchNorm, ``gamma * g_gamma + beta * g_beta``, the
  paper's Taylor-FO-BN. Each ``T`` is a float32 vector, one entry per unit.
  """
  params, grads = to_dict(params), to_dict(grads)

  def theta_g(path):
    return jnp.asarray(get_path(params, path), jnp.float32) * jnp.asarray(
      get_path(grads, path), jnp.float32
    )

  estimates = {}
  for lin, bn in layer_chain(params, layers):
    kernel = get_path(params, f"{lin}/kernel")
    t = jnp.sum(theta_g(f"{lin}/kernel"), axis=tuple(range(jnp.ndim(kernel) - 1)))
    for path in tied_leaves(params, lin, bn):
      t = t + theta_g(path)
    estimates[lin] = t
  return estimates


def unit_scores_as_kernels(params, scores: Mapping[str, Any]):
  """``params`` with the kernel of every layer in ``scores`` replaced by one whose
  unit ``c`` has every entry ``scores[layer][c] / sqrt(fan_in)``: its unit L2
  norms, what neuron/channel magnitude pruning ranks, are ``scores[layer]``
  (non-negative). Meant only for scoring; other leaves are unchanged."""
  scored = to_dict(params)
  for lin, unit in scores.items():
    kernel = get_path(scored, f"{lin}/kernel")
    rows = int(np.prod(jnp.shape(kernel)[:-1]))
    unit = jnp.asarray(unit, jnp.float32) / np.float32(np.sqrt(rows))
    scored = replace_path(
      scored, f"{lin}/kernel", jnp.broadcast_to(unit, jnp.shape(kernel)).astype(kernel.dtype)
    )
  return scored


def taylor_unit_scores(params, grads, layers: Optional[Sequence[str]] = None):
  """``params`` with each unit of every Dense/Conv kernel rescaled to norm ``|T_c|``
  (:func:`taylor_unit_estimates` of one batch's ``grads``).

  The returned tree, meant only for scoring, holds every kernel with all
  entries of unit ``c`` equal to ``|T_c| / sqrt(fan_in)``, so the unit L2 norms
  that neuron/channel magnitude pruning ranks are ``|T_c|``. Other leaves are
  unchanged.
  """
  estimates = taylor_unit_estimates(params, grads, layers)
  return unit_scores_as_kernels(params, {k: jnp.abs(t) for k, t in estimates.items()})


class TaylorAverageState(NamedTuple):
  """State of :func:`score_by_taylor` with ``average=True``.

  Attributes:
    inner: the wrapped algorithm's state.
    total: ``{layer path: sum of T_c^2}`` over the batches since the last mask
      update, one float32 entry per unit of the layer's original width.
    batches: how many batches ``total`` holds (int32 scalar).
    averaged: None, or with ``momentum`` > 0, ``{layer path: EMA}`` of the
      window means over the mask updates so far (one float32 per unit).
    decided: None, or with ``momentum`` > 0, how many mask updates ``averaged``
      holds (int32 scalar).
  """

  inner: Any
  total: dict
  batches: jax.Array
  averaged: Optional[dict] = None
  decided: Optional[jax.Array] = None


def score_by_taylor(
  algorithm: Algorithm,
  layers: Optional[Sequence[str]] = None,
  average: bool = False,
  momentum: float = 0.0,
) -> Algorithm:
  """``algorithm`` deciding its masks on the first-order Taylor estimate of the
  loss change when a unit is removed (Molchanov et al. 2019).

  For a neuron/channel magnitude algorithm this ranks every Dense/Conv layer's
  units by :func:`taylor_unit_estimates` (the unit with its bias and BatchNorm).
  Only the scores change: the schedule and keep counts are the algorithm's; at
  ``init`` (no gradients yet) the kernel norms are used. Compose it inside
  :func:`~jaxprune.shrink.tie_units`: ``tie_units(score_by_taylor(a))``.

  Args:
    algorithm: a neuron/channel magnitude algorithm.
    layers: the forward order of the layers (None: inferred).
    average: False ranks by ``|T_c|`` of the update step's batch alone. True is
      the paper's estimate: ``T_c^2`` is accumulated on every step (the
      returned algorithm's ``is_update_step`` is true on every step up to the
      algorithm's ``end_step``, or on every step without one) and the
      units are ranked on the mean over the batches since the previous mask
      update, the update step's included; the mean restarts after each update.
      The accumulators (:class:`TaylorAverageState`) hold one entry per unit
      of the original widths, so they survive :func:`~jaxprune.shrink.on_kept_units` and
      compaction unchanged. The schedule (``flops_schedule``, ``config``) is
      still the wrapped algorithm's.
    momentum: with ``average=True``, 0.0 ranks on the window's mean alone; ``m``
      in (0, 1) ranks on ``a_k = m * a_{k-1} + (1 - m) * mean_k`` over the mask
      updates ``k``, ``a_0 = mean_0``: the criterion momentum of the paper's
      reference code (NVlabs/Taylor_pruning, ``pruning_momentum``, 0.9 in its
      configs).

  Raises:
    ValueError: ``average=True`` for an algorithm with ``skip_optimizer_step``
      (every step of the window would become a step without an optimizer step);
      ``momentum`` outside [0, 1), or non-zero without ``average=True``.
  """
  if not 0.0 <= momentum < 1.0:
    raise ValueError(f"score_by_taylor: momentum={momentum!r} must be in [0, 1)")
  if momentum and not average:
    raise ValueError(
      f"score_by_taylor: momentum={momentum!r} averages window means; it needs average=True"
    )
  if average and algorithm.skip_optimizer_step:
    raise ValueError(
      f"score_by_taylor(average=True): {algorithm.name} skips the optimizer step on its "
      "mask-update steps (skip_optimizer_step=True), and averaging makes every step up to "
      "its end_step an update step; use a gradual_magnitude/magnitude algorithm"
    )
  if not average:

    def update(step, params, grads, masks, state):
      return algorithm.update(step, taylor_unit_scores(params, grads, layers), grads, masks, state)

    return algorithm._replace(update=update)

  def init(params):
    masks, state = algorithm.init(params)
    total = {
      lin: jnp.zeros(jnp.shape(get_path(to_dict(params), f"{lin}/kernel"))[-1:], jnp.float32)
      for lin, _ in layer_chain(to_dict(params), layers)
    }
    if not momentum:
      return masks, TaylorAverageState(state, total, jnp.zeros([], jnp.int32))
    zero = jnp.zeros([], jnp.int32)
    return masks, TaylorAverageState(state, total, zero, total, zero)  # all zeros at init

  end = algorithm.config.get("end_step")

  def every_step(step):  # up to the schedule's last update, where one is known
    yes = jnp.ones(jnp.shape(step), jnp.bool_)
    return yes if end is None else yes & (jnp.asarray(step) <= end)

  def update(step, params, grads, masks, state):
    estimates = taylor_unit_estimates(params, grads, layers)
    total = {k: v + jnp.square(estimates[k]) for k, v in state.total.items()}
    batches = state.batches + 1

    def decide(_):
      mean = {k: v / batches.astype(jnp.float32) for k, v in total.items()}
      averaged, decided = state.averaged, state.decided
      if momentum:
        first = decided == 0
        mean = {
          k: jnp.where(first, v, momentum * averaged[k] + (1.0 - momentum) * v)
          for k, v in mean.items()
        }
        averaged, decided = mean, decided + 1
      scored = unit_scores_as_kernels(params, jax.tree.map(jnp.sqrt, mean))
      new, inner = algorithm.update(step, scored, grads, masks, state.inner)
      zeros = jax.tree.map(jnp.zeros_like, total)
      return new, TaylorAverageState(inner, zeros, jnp.zeros([], jnp.int32), averaged, decided)

    def accumulate(_):
      return masks, state._replace(total=total, batches=batches)

    # The algorithm may return a scalar mask where it was given a full one (or the
    # reverse): both branches return masks broadcast to the common shapes.
    decided = jax.eval_shape(decide, None)[0]
    shapes = jax.tree.map(lambda n, o: jnp.broadcast_shapes(n.shape, jnp.shape(o)), decided, masks)

    def fit(branch):
      def run(_):
        new, st = branch(None)
        return jax.tree.map(jnp.broadcast_to, new, shapes), st

      return run

    return jax.lax.cond(algorithm.is_update_step(step), fit(decide), fit(accumulate), None)

  return algorithm._replace(init=init, is_update_step=every_step, update=update)
