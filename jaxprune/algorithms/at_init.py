"""Pruning at initialisation: SNIP, GraSP and SynFlow masks before any training.

Pure functions that score the included leaves once (SynFlow: over several
rounds) and keep, with one global threshold over all of them, exactly
``n - floor(s * n)`` entries of the ``n`` included entries. Ties go to the lower
flat index, earlier leaves (in tree-flattening order) first, as in
:func:`jaxprune.topk.topk_masks`. Leaves that are not included get a scalar
True mask. The masks feed ``jaxprune.create("fixed", masks=masks)``.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp

from jaxprune import topk
from jaxprune.masks import dense_mask
from jaxprune.paths import Include, pruned_leaves

GRASP_TEMPERATURE = 200.0  # Wang et al. 2020, Appendix (T = 200 on the logits)


def global_masks(scores, pruned, sparsity: float):
  """Masks keeping the ``N - floor(s * N)`` highest ``scores`` jointly over the
  leaves marked in ``pruned`` (a tree of bools); other leaves get a scalar True."""
  flat, treedef = jax.tree.flatten(scores)
  sel = jax.tree.leaves(pruned)
  chosen = [s for s, p in zip(flat, sel) if p]
  total = sum(int(jnp.size(s)) for s in chosen)
  kept = iter(topk.topk_masks(chosen, topk.keep_count(total, sparsity)))
  return jax.tree.unflatten(treedef, [next(kept) if p else dense_mask() for p in sel])


def _check_sparsity(sparsity):
  if isinstance(sparsity, bool) or not (0.0 <= float(sparsity) < 1.0):
    raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
  return float(sparsity)


def _summed_grads(loss_fn, params, batches):
  grad_fn = jax.jit(jax.grad(loss_fn))
  total = None
  for batch in batches:
    g = grad_fn(params, batch)
    total = g if total is None else jax.tree.map(jnp.add, total, g)
  if total is None:
    raise ValueError("batches is empty: SNIP and GraSP need at least one batch")
  return total


def snip_scores(params, loss_fn: Callable[[Any, Any], jax.Array], batches: Iterable):
  """SNIP connection sensitivity ``|θ ⊙ ∇L|`` (Lee et al. 2019, "SNIP: Single-shot
  Network Pruning based on Connection Sensitivity"), with ``∇L`` the gradient
  summed over ``batches`` (as the reference code accumulates it)."""
  grads = _summed_grads(loss_fn, params, batches)
  return jax.tree.map(lambda p, g: jnp.abs(p * g), params, grads)


def snip_masks(params, loss_fn, batches, sparsity: float, *, include: Include = None):
  """SNIP masks: the highest ``|θ ⊙ ∇L|`` kept under one global threshold.

  Args:
    params: the initialised parameters.
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    batches: an iterable of batches (summed gradients).
    sparsity: fraction of the included entries removed, in [0, 1).
    include: which leaves are pruned (see :func:`jaxprune.paths.include_fn`).
  """
  sparsity = _check_sparsity(sparsity)
  pruned = pruned_leaves(params, include)
  return global_masks(snip_scores(params, loss_fn, batches), pruned, sparsity)


def _tempered(loss_fn, temperature):
  """``loss_fn`` with ``temperature=`` bound when it takes that keyword."""
  if temperature is None:
    return loss_fn
  try:
    sig = inspect.signature(loss_fn)
  except (TypeError, ValueError):
    return loss_fn
  takes = "temperature" in sig.parameters or any(
    p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()
  )
  return (lambda p, b: loss_fn(p, b, temperature=temperature)) if takes else loss_fn


def grasp_scores(params, loss_fn, batches, *, temperature: float | None = GRASP_TEMPERATURE):
  """GraSP scores ``-θ ⊙ Hg`` (Wang et al. 2020, "Picking Winning Tickets Before
  Training by Preserving Gradient Flow").

  ``g`` is the gradient summed over ``batches`` and ``Hg`` the Hessian-gradient
  product, ``∂/∂θ Σ_b (∇L_b · stop_gradient(g))``. The paper divides the logits
  by a temperature ``T = 200`` in both passes: a ``loss_fn`` that takes a
  ``temperature`` keyword is called as ``loss_fn(params, batch, temperature=T)``;
  any other ``loss_fn`` is used as given. GraSP removes the *highest* of these
  scores (removing them reduces gradient flow the least); :func:`grasp_masks`
  keeps the lowest.
  """
  batches = list(batches)
  loss = _tempered(loss_fn, temperature)
  g = _summed_grads(loss, params, batches)

  @jax.jit
  def hg(p, batch, g):
    gdot = lambda q: sum(
      jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(jax.grad(loss)(q, batch)), jax.tree.leaves(g))
    )
    return jax.grad(gdot)(p)

  total = None
  for batch in batches:
    h = hg(params, batch, g)
    total = h if total is None else jax.tree.map(jnp.add, total, h)
  return jax.tree.map(lambda p, h: -p * h, params, total)


def grasp_masks(
  params,
  loss_fn,
  batches,
  sparsity: float,
  *,
  include: Include = None,
  temperature: float | None = GRASP_TEMPERATURE,
):
  """GraSP masks: keeps the lowest ``-θ ⊙ Hg`` under one global threshold.

  Arguments as :func:`snip_masks`; ``temperature`` as in :func:`grasp_scores`.
  """
  sparsity = _check_sparsity(sparsity)
  pruned = pruned_leaves(params, include)
  scores = grasp_scores(params, loss_fn, batches, temperature=temperature)
  return global_masks(jax.tree.map(jnp.negative, scores), pruned, sparsity)


def _unit_scale(p):
  """``shape[-1] / Σ|p|``: brings the mean incoming |weight| sum of an output unit
  (Flax kernels keep outputs on the last axis) to one; 1 for an all-zero leaf."""
  total = jnp.sum(p)
  return jnp.where(total > 0, p.shape[-1] / jnp.where(total > 0, total, 1.0), 1.0)


def synflow_scores(params, apply_fn: Callable, input_shape, masks=None, *, pruned=None):
  """SynFlow scores ``θ ⊙ ∂R/∂θ`` with ``R = Σ apply_fn(|θ| ⊙ mask, 1)`` (Tanaka et
  al. 2020, "Pruning neural networks without any data by iteratively conserving
  synaptic flow").

  To keep ``R`` finite on deep nets, each leaf in ``pruned`` (default: every
  array with ``ndim >= 2``) is scaled by a positive constant that brings its
  output units' mean incoming sum to one. ``R`` is linear in each layer's
  weights, so this multiplies every score by the same positive factor and the
  ranking is unchanged, exactly so when the other leaves (biases) are zero, as
  Flax initialises them; with non-zero biases it is a close approximation.
  Scores are returned for the unscaled ``|θ|`` up to that common factor.
  """
  if pruned is None:
    pruned = jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)
  if masks is not None:
    params = jax.tree.map(lambda p, m: jnp.where(m, p, 0), params, masks)
  sel = jax.tree.leaves(pruned)
  flat, treedef = jax.tree.flatten(params)
  x = jnp.ones(tuple(input_shape), jnp.float32)

  def r(q):
    return jnp.sum(apply_fn(q, x))

  absq = [jnp.abs(jnp.asarray(p, jnp.float32)) for p in flat]
  scaled = [a * _unit_scale(a) if s else a for a, s in zip(absq, sel)]
  q = jax.tree.unflatten(treedef, scaled)
  grads = jax.grad(r)(q)
  return jax.tree.map(lambda a, g: a * g, q, grads)


def synflow_masks(
  params,
  apply_fn: Callable,
  input_shape,
  sparsity: float,
  *,
  rounds: int = 100,
  include: Include = None,
):
  """SynFlow masks, built over ``rounds`` rounds on the exponential schedule.

  Round ``k`` (1..rounds) scores the currently kept weights with
  :func:`synflow_scores` and keeps ``N - floor(s_k N)`` of them globally,
  ``s_k = 1 - (1 - s) ** (k / rounds)``; the last round keeps exactly
  ``N - floor(s N)``. Data-free: ``apply_fn(params, x)`` is called on an
  all-ones input of ``input_shape`` (include a batch axis, e.g. ``(1, 28, 28, 1)``).
  Networks with batch norm should be applied in inference mode.
  """
  sparsity = _check_sparsity(sparsity)
  if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
    raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
  pruned = pruned_leaves(params, include)
  sel = jax.tree.leaves(pruned)
  total = sum(int(jnp.size(p)) for p, s in zip(jax.tree.leaves(params), sel) if s)
  keeps = [
    topk.keep_count(total, 1.0 - (1.0 - sparsity) ** (k / rounds)) for k in range(1, rounds)
  ] + [topk.keep_count(total, sparsity)]

  @jax.jit
  def all_rounds(masks, keeps):
    def round_(k, carry):
      masks, finite = carry
      scores = synflow_scores(params, apply_fn, input_shape, masks, pruned=pruned)
      chosen = [s for s, p in zip(jax.tree.leaves(scores), sel) if p]
      kept = iter(topk.topk_masks(chosen, keeps[k]))
      out = [next(kept) if p else m for p, m in zip(sel, jax.tree.leaves(masks))]
      finite = finite & jnp.all(jnp.array([jnp.all(jnp.isfinite(s)) for s in chosen]))
      return jax.tree.unflatten(jax.tree.structure(masks), out), finite

    return jax.lax.fori_loop(0, len(keeps_list), round_, (masks, jnp.bool_(True)))

  keeps_list = keeps
  masks = jax.tree.map(
    lambda p, s: jnp.ones(jnp.shape(p), jnp.bool_) if s else dense_mask(), params, pruned
  )
  masks, finite = all_rounds(masks, jnp.asarray(keeps, jnp.int32))
  if not bool(finite):
    raise FloatingPointError("SynFlow scores are not finite even after per-layer scaling")
  return masks
