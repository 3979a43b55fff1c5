"""Dynamic sparse training: SET (Mocanu et al. 2018) and RigL (Evci et al. 2020).

Both start from random masks drawn with ``distribution`` (ERK by default) and,
every ``update_every`` steps after ``start_step`` and before ``end_step``,
replace a fraction of each pruned leaf's active connections:

1. drop: the ``n_drop = floor(d_t * n_active)`` active connections of smallest
   magnitude (``n_drop`` is capped at the number of inactive positions);
2. grow: ``n_drop`` connections among the positions that were inactive before
   this update -- at random (SET) or where the dense gradient is largest (RigL).

So the number of active connections per leaf never changes, nothing dropped is
regrown in the same update, and the drop fraction follows RigL's cosine decay
``d_t = d/2 (1 + cos(pi t / end_step))`` (``drop_schedule="cosine"``, the
default) or stays at ``d`` (``"constant"``, the SET paper's fixed zeta).
Regrown weights start at ``grow_init``: exactly 0.0 (``"zeros"``, the default),
normal with the standard deviation of the leaf's active weights before the
update (``"random"``, as in SET; RigL's ``random_normal`` takes the std of the
whole weight variable, whose masked entries keep stale values), or normal with a
given float standard deviation. Either way their inner-optimizer state restarts
at zero (:func:`jaxprune.sparsify`). Over many updates ``"random"`` ratchets the
weight scale up: the drop keeps the largest draws, and the next draws use the
larger standard deviation (measured in ``docs/results/toolbox.md``); a float
``grow_init`` is a fixed scale and does not ratchet.

Non-finite scores never win: a NaN weight ranks below every finite active
weight for keeping, and nothing is ever grown at a NaN or inf growth score:
``n_drop`` is also capped at the number of inactive positions with a finite
score, so masks stay valid (counts unchanged) whatever the gradients hold.
With ``sparsity=0`` every mask is all True, nothing can be grown, and training
is dense.

Reference rules (``reference=True``). The code of the RigL paper
(google-research/rigl, ``sparse_optimizers_base.py``) and
google-research/jaxpruner (``sparse_trainers.py``, ``base_updater.py``,
``sparsity_schedules.py``) differ from the defaults above in three ways, each
also a key of its own (``reference`` sets the ones not given):

* ``regrow_dropped``: growth ranks every position that is not kept, so a
  connection dropped in this update can be regrown at once, keeping its value
  and optimizer state (the default grows only where the mask was off, the
  public contract, so that every update really replaces ``n_drop``
  connections);
* ``skip_optimizer_step``: a mask-update step changes the masks only; the inner
  optimizer does not step and its state is kept (zeroed at the entries the new
  masks prune, as on every step);
* ``update_at_ends``: updates at ``start_step`` (also step 0) and at
  ``end_step`` too, ``start_step <= t <= end_step``; the default updates only
  where ``0 < t`` and ``start_step <= t < end_step``.

The drop fraction's cosine decay ``t / end_step`` is the paper's formula and
jaxpruner's (``optax.cosine_decay_schedule(d, end_step)`` of the absolute
step), so ``reference`` leaves ``drop_schedule`` alone; ``"cosine_from_start"``
decays over ``(t - start_step) / (end_step - start_step)`` instead (the two
agree for ``start_step=0``). See ``docs/dst_reference.md``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxprune import config as config_lib
from jaxprune import schedules, structured, training_cost
from jaxprune.algorithms import base
from jaxprune.config import Distribution
from jaxprune.masks import hashed_scores, is_pruned_mask, random_scores
from jaxprune.paths import Include
from jaxprune.structured import SparsityTypeLike

DROP_SCHEDULES = ("cosine", "cosine_from_start", "constant")
REFERENCE_FLAGS = ("regrow_dropped", "skip_optimizer_step", "update_at_ends")


class DSTState(NamedTuple):
  """Telemetry of the last mask update (readable inside and outside jit).

  Attributes:
    drop_fraction: the drop fraction ``d_t`` used at the last update.
    changed: per leaf, the fraction of active connections replaced at the last
      update (0.0 for leaves that are not pruned).
    updates: number of mask updates so far.
  """

  drop_fraction: jax.Array
  changed: Any
  updates: jax.Array


def replace_connections(mask, weights, grow_scores, drop_fraction, regrow_dropped=False):
  """One SET/RigL update of a single leaf's mask.

  Args:
    mask: bool array, the active connections.
    weights: the leaf's parameters (drop the smallest ``|w|`` among active).
    grow_scores: growth priority (higher ``|score|`` first), consulted only at
      positions inactive in ``mask`` (or, with ``regrow_dropped``, at every
      position not kept).
    drop_fraction: fraction of active connections to replace (scalar).
    regrow_dropped: the reference rule: a connection dropped in this update
      may be grown again at once.

  Returns:
    ``(new_mask, n_replaced)`` with ``sum(new_mask) == sum(mask)``. Nothing is
    grown at a non-finite ``grow_scores`` entry that was inactive: ``n_drop``
    is capped at the number of inactive positions with a finite score (with
    ``regrow_dropped``, a dropped entry with a non-finite score may take its
    own place back, ranked below every finite score).
  """
  return structured.replace_connections(
    mask, weights, grow_scores, drop_fraction, "unstructured", regrow_dropped=regrow_dropped
  )


def _grow_values(cfg):
  """``grow_values`` for :class:`jaxprune.algorithms.base.Algorithm`, or None for zeros.

  ``(step, params, old_masks) -> values``: normal draws (``fold_in(step key, 2)``,
  then the leaf index) scaled by the standard deviation of each pruned leaf's
  active weights (``"random"``) or by the given float.
  """
  grow_init = cfg["grow_init"]
  if isinstance(grow_init, str) and grow_init == "zeros":
    return None

  def values(step, params, masks):
    key = jax.random.fold_in(base.step_key(cfg, step), 2)

    def leaf(i, p, m):
      if not is_pruned_mask(m):
        return jnp.zeros((), jnp.result_type(p))
      if isinstance(grow_init, str):  # "random": std of the active weights
        w = jnp.asarray(p, jnp.float32)
        n = jnp.maximum(jnp.sum(m, dtype=jnp.float32), 1.0)
        mean = jnp.sum(jnp.where(m, w, 0.0)) / n
        std = jnp.sqrt(jnp.sum(jnp.where(m, jnp.square(w - mean), 0.0)) / n)
      else:
        std = jnp.float32(grow_init)
      draw = jax.random.normal(jax.random.fold_in(key, i), jnp.shape(p), jnp.float32)
      return (std * draw).astype(jnp.result_type(p))

    leaves, treedef = jax.tree.flatten(params)
    return jax.tree.unflatten(
      treedef, [leaf(i, p, m) for i, (p, m) in enumerate(zip(leaves, jax.tree.leaves(masks)))]
    )

  return values


def _check_dst_keys(cfg):
  grow_init = cfg["grow_init"]
  if isinstance(grow_init, str):
    if grow_init not in ("zeros", "random"):
      raise ValueError(f"grow_init must be 'zeros', 'random' or a float std, got {grow_init!r}")
  elif isinstance(grow_init, bool) or not isinstance(grow_init, (int, float)) or grow_init < 0:
    raise ValueError(f"grow_init must be 'zeros', 'random' or a float std >= 0, got {grow_init!r}")
  if cfg["drop_schedule"] not in DROP_SCHEDULES:
    raise ValueError(
      f"drop_schedule must be one of {', '.join(map(repr, DROP_SCHEDULES))}, "
      f"got {cfg['drop_schedule']!r}"
    )
  for key in ("reference", *REFERENCE_FLAGS):
    if cfg[key] is not None and not isinstance(cfg[key], bool):
      raise TypeError(f"{key} must be True or False, got {cfg[key]!r}")
  for key in REFERENCE_FLAGS:  # unset flags follow ``reference``
    cfg[key] = bool(cfg["reference"]) if cfg[key] is None else cfg[key]
  if cfg["regrow_dropped"] and cfg["sparsity_type"] != "unstructured":
    raise ValueError(
      f"regrow_dropped (set by reference=True) supports only sparsity_type='unstructured', "
      f"got sparsity_type={cfg['sparsity_type']!r}"
    )


def _drop_schedule(cfg):
  d, t0, t1 = cfg["drop_fraction"], cfg["start_step"], cfg["end_step"]
  if cfg["drop_schedule"] == "constant":
    return schedules.constant(d)
  if cfg["drop_schedule"] == "cosine_from_start":
    cosine = schedules.cosine_drop_fraction(d, t1 - t0)
    return lambda step: cosine(jnp.asarray(step) - t0)
  return schedules.cosine_drop_fraction(d, t1)


def _is_update_step(cfg):
  """Mask-update steps: every ``update_every`` from ``start_step``, with
  ``0 < t < end_step`` (default) or ``t <= end_step`` (``update_at_ends``)."""
  t0, t1, every = cfg["start_step"], cfg["end_step"], cfg["update_every"]
  if cfg["update_at_ends"]:
    return lambda step: (step >= t0) & (step <= t1) & ((step - t0) % every == 0)
  return lambda step: (step > 0) & (step >= t0) & (step < t1) & ((step - t0) % every == 0)


def _dst(name: str, factory, given, grow_scores_fn, dense_gradient=False) -> base.Algorithm:
  cfg = config_lib.from_signature(name, factory, given)
  config_lib.require_sparsity(name, cfg)
  config_lib.require(name, cfg, "end_step")
  _check_dst_keys(cfg)
  drop_schedule = _drop_schedule(cfg)
  is_update_step = _is_update_step(cfg)
  regrow_dropped = cfg["regrow_dropped"]

  def init(params):
    # Every selected leaf gets a full-shape mask, also one that ERK leaves
    # dense: the mask's shape says which leaves the algorithm prunes, and the
    # kernels' overall sparsity is the target.
    pruned, sparsities = base.targets(cfg, params)
    scores = random_scores(base.step_key(cfg, 0), params)
    masks = base.select(cfg, scores, pruned, base.keep_counts(cfg, params, sparsities))
    changed = jax.tree.map(lambda p: jnp.zeros((), jnp.float32), params)
    return masks, DSTState(jnp.float32(cfg["drop_fraction"]), changed, jnp.int32(0))

  def update(step, params, grads, masks, state):
    d = drop_schedule(step)
    key = base.step_key(cfg, step)
    grow = grow_scores_fn(key, params, grads)
    flat_m, treedef = jax.tree.flatten(masks)
    new_masks, changed = [], []
    for m, w, g in zip(flat_m, jax.tree.leaves(params), jax.tree.leaves(grow)):
      if not is_pruned_mask(m):
        new_masks.append(m)
        changed.append(jnp.zeros((), jnp.float32))
        continue
      new_m, n_drop = structured.replace_connections(
        m, w, g, d, cfg["sparsity_type"], cfg["axis"], regrow_dropped=regrow_dropped
      )
      new_masks.append(new_m)
      changed.append(n_drop.astype(jnp.float32) / jnp.maximum(jnp.sum(m, dtype=jnp.float32), 1.0))
    return (
      jax.tree.unflatten(treedef, new_masks),
      DSTState(d, jax.tree.unflatten(treedef, changed), state.updates + 1),
    )

  # RigL's growth ranks the dense gradient: its update steps pay for it.
  schedule = (
    training_cost.dense_gradient_on(is_update_step)
    if dense_gradient
    else training_cost.constant_sparsity
  )
  return base.Algorithm(
    name,
    cfg,
    init,
    is_update_step,
    update,
    flops_schedule=schedule,
    grow_values=_grow_values(cfg),
    skip_optimizer_step=cfg["skip_optimizer_step"],
    family="dst",
  )


def _random_growth(key, params, grads):
  del grads
  return hashed_scores(jax.random.fold_in(key, 1), params)


def _gradient_growth(key, params, grads):
  del key, params
  return grads


def set_(
  *,
  sparsity: float | None = None,
  distribution: Distribution = "erk",
  include: Include = None,
  start_step: int = 0,
  end_step: int | None = None,
  update_every: int = 100,
  drop_fraction: float = 0.3,
  seed: int = 0,
  sparsity_type: SparsityTypeLike = "unstructured",
  axis: int | None = None,
  grow_init: str | float = "zeros",
  drop_schedule: str = "cosine",
  reference: bool = False,
  regrow_dropped: bool | None = None,
  skip_optimizer_step: bool | None = None,
  update_at_ends: bool | None = None,
) -> base.Algorithm:
  """Sparse Evolutionary Training (Mocanu et al. 2018, "Scalable training of
  artificial neural networks with adaptive sparse connectivity inspired by
  network science"): drop the smallest-magnitude active weights, regrow as many
  uniformly at random among inactive positions (randomness from
  ``fold_in(PRNGKey(seed), step)``, through the counter-based
  :func:`jaxprune.masks.hashed_scores`).

  ``end_step`` is required. The keys after ``axis`` (``grow_init``,
  ``drop_schedule``, ``reference`` and its three rules; None follows
  ``reference``) are described in the module docstring.
  """
  return _dst("set", set_, dict(locals()), _random_growth)


def rigl(
  *,
  sparsity: float | None = None,
  distribution: Distribution = "erk",
  include: Include = None,
  start_step: int = 0,
  end_step: int | None = None,
  update_every: int = 100,
  drop_fraction: float = 0.3,
  seed: int = 0,
  sparsity_type: SparsityTypeLike = "unstructured",
  axis: int | None = None,
  grow_init: str | float = "zeros",
  drop_schedule: str = "cosine",
  reference: bool = False,
  regrow_dropped: bool | None = None,
  skip_optimizer_step: bool | None = None,
  update_at_ends: bool | None = None,
) -> base.Algorithm:
  """RigL (Evci et al. 2020, "Rigging the Lottery: Making All Tickets
  Winners"): drop the smallest-magnitude active weights, regrow as many where
  the dense gradient magnitude ``|dL/dw|`` is largest among inactive positions.
  The dense gradient is the one handed to ``tx.update``, before masking.

  ``end_step`` is required; the other keys are those of :func:`set_`.
  """
  return _dst("rigl", rigl, dict(locals()), _gradient_growth, dense_gradient=True)
