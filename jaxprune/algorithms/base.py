"""The value every algorithm is: how to make the first masks, when and how to update them."""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from jaxprune import distributions, structured, topk
from jaxprune.masks import dense_mask
from jaxprune.paths import path_str, pruned_leaves
from jaxprune.training_cost import constant_sparsity, pruned_on_updates


class Algorithm(NamedTuple):
  """A pruning or sparse-training algorithm (layer 2 of jaxprune).

  Attributes:
    name: registry name (``jaxprune.create(name, ...)``).
    config: the validated config, defaults filled in.
    init: ``params -> (masks, algo_state)``: masks before the first step.
    is_update_step: ``step -> bool scalar``; jit-able with a traced step.
    update: ``(step, params, grads, masks, algo_state) -> (masks, algo_state)``;
      ``grads`` are the dense gradients given to ``tx.update``.
    changes_masks: False when ``update`` is never called (dense, static).
    flops_schedule: ``(steps, final_sparsity) -> (sparsity, dense_grad)`` over
      an int array of steps: the sparsity of a leaf with that final target in
      each step's forward pass, and whether the step's weight gradient is
      dense; what :func:`jaxprune.training_flops` integrates. Default: the
      final sparsity throughout, sparse gradients (static, SET).
    straight_through: None (the default: parameters are kept exactly sparse),
      or ``(grads, params, masks) -> grads`` for the straight-through family
      (``ste``, ``sr_ste``): parameters stay dense, the inner optimizer gets
      these gradients unmasked, and the forward pass is expected to use
      :func:`jaxprune.straight_through`.
    grow_values: None (the default: entries a mask update adds start at 0.0),
      or ``(step, params, old_masks) -> values``, a tree like ``params``:
      entries added on an update step start at these values (SET/RigL
      ``grow_init``); their inner optimizer state still restarts at zero.
    skip_optimizer_step: False (the default: a mask-update step also takes
      the inner optimizer step, under the new masks), or True: on a
      mask-update step the parameters change only where the new masks prune
      (to 0.0) or grow (to ``grow_values``), and the inner state is kept, zeroed
      at pruned entries (the reference RigL code, ``reference=True``).
    family: what kind of algorithm it is, for code that treats kinds alike:
      ``"dense"``, ``"magnitude"`` (magnitude, gradual_magnitude,
      global_magnitude: masks only shrink), ``"saliency"`` (saliency,
      global_saliency: masks only shrink), ``"random"`` (one-shot random:
      masks only shrink), ``"static"``, ``"fixed"`` (masks never change),
      ``"dst"`` (set, rigl: active counts constant, connections replaced),
      ``"ste"`` (ste, sr_ste: dense parameters, straight-through forward);
      ``"custom"`` by default.
  """

  name: str
  config: Mapping[str, Any]
  init: Callable
  is_update_step: Callable
  update: Callable
  changes_masks: bool = True
  flops_schedule: Callable = constant_sparsity
  straight_through: Callable | None = None
  grow_values: Callable | None = None
  skip_optimizer_step: bool = False
  family: str = "custom"


def never(step):
  return jnp.zeros((), jnp.bool_)


def no_update(step, params, grads, masks, state):
  return masks, state


def targets(cfg, params):
  """``(pruned, sparsities)``: which leaves are pruned and their final sparsity."""
  pruned = pruned_leaves(params, cfg["include"])
  if cfg["sparsity_type"] != "unstructured":
    pruned = structured.select_compatible(params, pruned, cfg)
  sparsity = cfg["sparsity"] if cfg["sparsity"] is not None else 0.0
  sparsities = distributions.resolve(cfg["distribution"], params, sparsity, _as_include(pruned))
  sparsities = jax.tree.map(lambda s, sel: s if sel else 0.0, sparsities, pruned)
  return pruned, sparsities


def _as_include(pruned):
  """An include predicate that selects exactly the leaves marked in ``pruned``."""
  flat = jax.tree_util.tree_flatten_with_path(pruned)[0]
  chosen = {path_str(p) for p, sel in flat if sel}
  return lambda path, leaf: path in chosen


def full_masks(params, pruned):
  """All-True masks of full shape for pruned leaves, scalar True elsewhere."""
  return jax.tree.map(
    lambda p, sel: jnp.ones(jnp.shape(p), jnp.bool_) if sel else dense_mask(), params, pruned
  )


def select(cfg, scores, pruned, keep):
  """Masks keeping, per leaf, the ``keep`` groups with the highest ``scores``.

  ``keep`` is a tree of per-leaf kept counts (ints or traced ints) of entries,
  or of blocks or units for a structured ``sparsity_type``
  (:func:`jaxprune.structured.group_count`); ignored for N:M.
  """
  pattern = structured.parse_sparsity_type(cfg["sparsity_type"])

  def leaf(s, sel, k):
    if not sel:
      return dense_mask()
    return structured.structured_mask(s, None, pattern, axis=cfg.get("axis"), keep=k)

  return jax.tree.map(leaf, scores, pruned, keep)


def keep_counts(cfg, params, sparsities):
  """Per-leaf kept counts ``G - floor(s G)`` of the ``G`` groups of each leaf:
  entries, or blocks or units for a structured ``sparsity_type`` (what
  :func:`select` expects). Leaves that cannot take the pattern get 0 (they are
  never selected)."""
  pattern = structured.parse_sparsity_type(cfg["sparsity_type"])
  axis = cfg.get("axis")

  def leaf(p, s):
    shape = jnp.shape(p)
    if pattern.incompatibility(shape, axis) is not None:
      return 0
    return topk.keep_count(pattern.group_count(shape, axis), s)

  return jax.tree.map(leaf, params, sparsities)


def all_true_init(cfg):
  """``init`` for algorithms that start dense and prune later: all-True masks."""

  def init(params):
    pruned, _ = targets(cfg, params)
    return full_masks(params, pruned), ()

  return init


def step_key(cfg, step):
  """Per-update randomness: ``fold_in(PRNGKey(seed), step)``."""
  return jax.random.fold_in(jax.random.PRNGKey(cfg["seed"]), step)


def one_shot(name: str, cfg, update, family: str = "custom") -> Algorithm:
  """An algorithm that starts from all-True masks and prunes once, at
  ``start_step``, with ``update`` (its FLOPs: dense until then, final after)."""
  at_start = lambda step: step == cfg["start_step"]
  return Algorithm(
    name,
    cfg,
    all_true_init(cfg),
    at_start,
    update,
    flops_schedule=pruned_on_updates(at_start, lambda u, s: s),
    family=family,
  )
