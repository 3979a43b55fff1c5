"""Straight-through sparse training: dense parameters, masked forward pass.

The parameters stay dense. The forward pass runs on
``jaxprune.straight_through(params, masks)``, which applies the masks going
forward and hands the gradient to every entry going back (the straight-through
estimator of Bengio et al. 2013). Masks are recomputed from the dense weights'
magnitudes every ``update_every`` steps, so pruned weights keep learning and can
come back. Unstructured or N:M along the input axis (``sparsity_type="2:4"``);
at the end ``jaxprune.apply_masks(params, masks)`` gives the sparse model.

For these algorithms :func:`jaxprune.sparsify` does *not* keep pruned entries at
zero ("zeros stay zero" does not apply); it leaves the inner optimizer's state
untouched too. Every other guarantee (exact counts, masks placed like their
parameters, jit-able updates) holds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxprune import config as config_lib
from jaxprune import schedules, training_cost
from jaxprune.algorithms import base
from jaxprune.config import Distribution
from jaxprune.masks import is_pruned_mask
from jaxprune.paths import Include
from jaxprune.structured import SparsityTypeLike

SR_STE_DECAY = 2e-4  # λ_W of Zhou et al. 2021


def straight_through(params, masks):
  """``params`` masked in the forward pass, identity in the backward pass.

  Forward: ``where(mask, p, 0)`` exactly. Backward: the gradient reaches every
  entry of ``p``, masked or not (``p + stop_gradient(masked - p)``).
  """

  def leaf(p, m):
    if not is_pruned_mask(m):
      return p
    masked = jnp.where(m, p, jnp.zeros((), jnp.result_type(p)))
    return p + jax.lax.stop_gradient(masked - p)

  return jax.tree.map(leaf, params, masks)


def _magnitude_masks(cfg, params):
  pruned, sparsities = base.targets(cfg, params)
  scores = jax.tree.map(lambda p: jnp.abs(p).astype(jnp.float32), params)
  return base.select(cfg, scores, pruned, base.keep_counts(cfg, params, sparsities))


def _schedule(cfg):
  end = cfg["end_step"] if cfg["end_step"] is not None else config_lib.MAX_STEP
  return schedules.periodic_updates(cfg["start_step"], end, cfg["update_every"])


def _build(name, cfg, grad_fn):
  config_lib.require_sparsity(name, cfg)
  init = lambda params: (_magnitude_masks(cfg, params), ())

  def update(step, params, grads, masks, state):
    return _magnitude_masks(cfg, params), state

  # Every weight of a straight-through net learns: the weight gradient is dense at every step.
  return base.Algorithm(
    name,
    cfg,
    init,
    _schedule(cfg),
    update,
    straight_through=grad_fn,
    flops_schedule=training_cost.always_dense_gradient(),
    family="ste",
  )


def _identity(grads, params, masks):
  return grads


def ste(
  *,
  sparsity: float | None = None,
  distribution: Distribution = "uniform",
  include: Include = None,
  start_step: int = 0,
  end_step: int | None = None,
  update_every: int | None = 1,
  drop_fraction: float | None = None,
  seed: int = 0,
  sparsity_type: SparsityTypeLike = "unstructured",
  axis: int | None = None,
) -> base.Algorithm:
  """Straight-through magnitude pruning on dense weights.

  Masks keep the largest-magnitude entries of the dense weights (per leaf,
  ``n - floor(s n)``, or N:M along the input axis), recomputed every
  ``update_every`` steps (default 1, every step) from ``start_step`` to
  ``end_step`` (default: to the end of training), then kept. Train with
  ``loss(jaxprune.straight_through(params, masks))``.
  """
  cfg = config_lib.from_signature("ste", ste, dict(locals()))
  return _build("ste", cfg, _identity)


def sr_ste(
  *,
  sparsity: float | None = None,
  distribution: Distribution = "uniform",
  include: Include = None,
  start_step: int = 0,
  end_step: int | None = None,
  update_every: int | None = 1,
  drop_fraction: float | None = None,
  seed: int = 0,
  sparsity_type: SparsityTypeLike = "unstructured",
  axis: int | None = None,
  decay: float = SR_STE_DECAY,
) -> base.Algorithm:
  """SR-STE (Zhou et al. 2021, "Learning N:M Fine-grained Structured Sparse Neural
  Networks From Scratch"): :func:`ste` plus the sparse-refined decay.

  The gradient handed to the inner optimizer is ``g + λ (1 - mask) ⊙ w``: pruned
  weights decay towards zero, kept ones are not regularised. Extra key
  ``decay`` (λ, default 2e-4 as in the paper). Usually with an N:M
  ``sparsity_type`` such as ``"2:4"``.
  """
  cfg = config_lib.from_signature("sr_ste", sr_ste, dict(locals()))
  lam = config_lib.fraction("decay", cfg["decay"], 0.0, float("inf"), hi_open=True)

  def refined(grads, params, masks):
    def leaf(g, p, m):
      if not is_pruned_mask(m):
        return g
      decay = jnp.where(m, jnp.zeros((), jnp.result_type(p)), lam * p)
      return g + decay.astype(jnp.result_type(g))

    return jax.tree.map(leaf, grads, params, masks)

  return _build("sr_ste", cfg, refined)
