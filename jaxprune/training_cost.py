"""Training FLOPs of a sparse run, as in the appendix of Evci et al. (2020).

Evci, Gale, Menick, Castro & Elsen (2020), "Rigging the Lottery: Making All
Tickets Winners", ICML, Appendix H: with ``f_D`` and ``f_S`` the dense and sparse
forward FLOPs of one example and a backward pass costing twice the forward (one
product for the activations' gradient, one for the weights' gradient), a step
costs ``3 f_D`` dense, ``3 f_S`` for static sparse training and SET, and
``2 f_S + f_D`` on a step where the weights' gradient must be dense (RigL's
mask updates, the straight-through estimators); dense-to-sparse methods
integrate ``3 f_S(t)`` over their sparsity schedule.

Each algorithm says what the accounting needs through its ``flops_schedule``
field, ``(steps, final_sparsity) -> (sparsity, dense_grad)``: for an int array
of steps, the sparsity of the masks that step's forward pass uses, for a leaf
whose final target is ``final_sparsity``, and whether that step's backward pass
computes the dense weight gradient. Steps are counted from 0, as the
``sparsify`` state counts them: a mask update at step ``u`` takes effect from
step ``u + 1``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np


def constant_sparsity(steps, final_sparsity):
  """The default ``flops_schedule``: the final sparsity from the first step on,
  sparse weight gradients (static sparse training, SET, fixed masks, dense)."""
  steps = np.asarray(steps)
  return np.full(steps.shape, float(final_sparsity)), np.zeros(steps.shape, np.bool_)


def dense_gradient_on(is_update_step: Callable, final_sparsity_schedule=constant_sparsity):
  """A ``flops_schedule`` whose weight gradient is dense on the steps where
  ``is_update_step`` holds (RigL: the dense gradient ranks the growth
  candidates), with the sparsities of ``final_sparsity_schedule``."""

  def schedule(steps, final_sparsity):
    sparsity, dense_grad = final_sparsity_schedule(steps, final_sparsity)
    return sparsity, dense_grad | np.asarray(is_update_step(np.asarray(steps)), np.bool_)

  return schedule


def always_dense_gradient(final_sparsity_schedule=constant_sparsity):
  """A ``flops_schedule`` with a dense weight gradient at every step (the
  straight-through estimators: STE, SR-STE, whose dense weights all learn)."""
  return dense_gradient_on(
    lambda steps: np.ones(np.shape(steps), np.bool_), final_sparsity_schedule
  )


def pruned_on_updates(is_update_step: Callable, target: Callable, initial: float = 0.0):
  """A ``flops_schedule`` for algorithms that start at ``initial`` sparsity and
  prune on update steps: step ``t``'s forward pass uses the masks of the last
  update before ``t``, at sparsity ``target(u, final_sparsity)`` (``u`` an
  array of update steps); sparse weight gradients."""

  def schedule(steps, final_sparsity):
    steps = np.asarray(steps, np.int64)
    if steps.size == 0:
      return np.zeros(0), np.zeros(0, np.bool_)
    horizon = np.arange(int(steps.max()) + 1)
    updates = np.asarray(is_update_step(horizon), np.bool_)
    last = np.maximum.accumulate(np.where(updates, horizon, -1))  # last update <= t
    before = np.concatenate([[-1], last[:-1]])[steps]  # last update < t
    values = np.asarray(target(np.maximum(before, 0), final_sparsity), np.float64)
    sparsity = np.where(before >= 0, values, float(initial))
    return sparsity, np.zeros(steps.shape, np.bool_)

  return schedule


class TrainingFlops(NamedTuple):
  """Training FLOPs of a whole run (all examples of all steps).

  Attributes:
    sparse: FLOPs of the run under its algorithm.
    dense: FLOPs of dense training of the same length (``3 f_D`` per example).
    steps: steps counted.
    dense_gradient_steps: steps whose weight gradient was dense.
  """

  sparse: float
  dense: float
  steps: int
  dense_gradient_steps: int

  @property
  def ratio(self) -> float:
    """``sparse / dense``: the run's cost relative to dense training."""
    return self.sparse / self.dense if self.dense else 1.0


def forward_per_step(schedule: Callable, forward, steps) -> tuple:
  """``(f(t), dense_grad(t))`` over ``steps``: forward FLOPs of one example at
  each step, each layer of ``forward`` (a ``jaxprune.flops`` result with the
  final masks) at its scheduled sparsity, and the dense-gradient flags."""
  steps = np.asarray(steps)
  per_step = np.zeros(steps.shape)
  _, dense_grad = schedule(steps, 0.0)
  for row in forward.layers:
    if row.dense == 0:
      continue
    sparsity, _ = schedule(steps, 1.0 - row.density)
    per_step += row.dense * (1.0 - np.asarray(sparsity, np.float64))
  return per_step, np.asarray(dense_grad, np.bool_)


def training_flops(algorithm, forward, steps: int, batch_size: int = 1) -> TrainingFlops:
  """Training FLOPs of ``steps`` steps of ``batch_size`` examples.

  Per example and step: ``f(t)`` forward, ``f(t)`` for the activations'
  gradient, and ``f(t)`` for the weights' gradient, or ``f_D`` on a step where
  ``algorithm.flops_schedule`` asks for the dense gradient (see module doc).

  Args:
    algorithm: a ``jaxprune.Algorithm`` (its ``flops_schedule`` is used).
    forward: ``jaxprune.flops(apply_fn, params, final_masks, one_example)``:
      the per-layer dense FLOPs and the final densities.
    steps: number of training steps.
    batch_size: examples per step.
  """
  if not isinstance(steps, (int, np.integer)) or steps < 0:
    raise ValueError(f"training_flops: steps must be an integer >= 0, got {steps!r}")
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"training_flops: batch_size must be an integer >= 1, got {batch_size!r}")
  f, dense_grad = forward_per_step(algorithm.flops_schedule, forward, np.arange(steps))
  weight_grad = np.where(dense_grad, float(forward.dense), f)
  per_example = float(np.sum(2.0 * f + weight_grad))
  return TrainingFlops(
    per_example * batch_size,
    3.0 * forward.dense * steps * batch_size,
    int(steps),
    int(np.sum(dense_grad)),
  )
