"""Magnitude pruning: one-shot, gradual (Zhu & Gupta 2017) and global.

Masks only shrink: an entry pruned once is never revived (its score is -inf).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import config as config_lib
from jaxprune import schedules, structured, topk, training_cost
from jaxprune.algorithms import base
from jaxprune.config import Distribution
from jaxprune.masks import is_pruned_mask
from jaxprune.paths import Include
from jaxprune.rounding import floor_product
from jaxprune.structured import SparsityTypeLike

_LOWEST = float(np.finfo(np.float32).min)


def masked_magnitude(params, masks):
  """``|w|`` where the mask is True, -inf where it is False.

  A NaN weight at an active entry scores the lowest finite float32: below every
  real magnitude, above the pruned entries, so a pruned entry never comes back
  ahead of it (top-k ranks NaN below -inf).
  """

  def leaf(p, m):
    a = jnp.abs(p).astype(jnp.float32)
    a = jnp.where(jnp.isnan(a), _LOWEST, a)
    return jnp.where(m, a, -jnp.inf) if is_pruned_mask(m) else a

  return jax.tree.map(leaf, params, masks)


def magnitude(
  *,
  sparsity: float | None = None,
  distribution: Distribution = "uniform",
  include: Include = None,
  start_step: int = 0,
  end_step: int | None = None,
  update_every: int | None = 100,
  drop_fraction: float | None = None,
  seed: int = 0,
  sparsity_type: SparsityTypeLike = "unstructured",
  axis: int | None = None,
) -> base.Algorithm:
  """One-shot magnitude pruning at ``start_step`` (Han et al. 2015, "Learning
  both Weights and Connections"): each pruned leaf keeps its ``n - floor(s n)``
  largest-magnitude entries, with ``s`` from ``distribution``.

  ``end_step``, ``update_every``, ``drop_fraction`` and ``seed`` do not apply
  (accepted so that one config serves every algorithm)."""
  cfg = config_lib.from_signature("magnitude", magnitude, dict(locals()))
  config_lib.require_sparsity("magnitude", cfg)

  def update(step, params, grads, masks, state):
    pruned, sparsities = base.targets(cfg, params)
    keep = base.keep_counts(cfg, params, sparsities)
    return base.select(cfg, masked_magnitude(params, masks), pruned, keep), state

  return base.one_shot("magnitude", cfg, update, family="magnitude")


def gradual_magnitude(
  *,
  sparsity: float | None = None,
  distribution: Distribution = "uniform",
  include: Include = None,
  start_step: int = 0,
  end_step: int | None = None,
  update_every: int | None = 100,
  drop_fraction: float | None = None,
  seed: int = 0,
  sparsity_type: SparsityTypeLike = "unstructured",
  axis: int | None = None,
  initial_sparsity: float = 0.0,
  power: float = 3.0,
) -> base.Algorithm:
  """Gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune").

  Every ``update_every`` steps from ``start_step`` to ``end_step`` (required;
  and at ``end_step`` itself), each leaf is pruned to the cubic schedule
  ``s_t = s_f + (s_i - s_f)(1 - (t - t0)/(t1 - t0))^3`` by magnitude. The final
  sparsity is reached exactly at ``end_step`` and kept. Extra keys:
  ``initial_sparsity`` (``s_i``, default 0.0), ``power`` (default 3).
  """
  return _gradual("gradual_magnitude", gradual_magnitude, dict(locals()))


def _gradual(name, factory, given) -> base.Algorithm:
  """``gradual_magnitude`` under the name and typed signature of ``factory``."""
  cfg = config_lib.from_signature(name, factory, given)
  config_lib.require_sparsity(name, cfg)
  config_lib.require(name, cfg, "end_step")
  s_i = config_lib.fraction("initial_sparsity", cfg["initial_sparsity"], 0.0, 1.0, hi_open=True)
  if s_i > config_lib.target_sparsity(cfg):
    raise ValueError(
      f"gradual_magnitude: initial_sparsity ({s_i}) must be <= the final sparsity "
      f"({config_lib.target_sparsity(cfg)}); masks only shrink"
    )
  if (
    isinstance(cfg["power"], bool)
    or not isinstance(cfg["power"], (int, float))
    or not cfg["power"] > 0
  ):
    raise ValueError(f"power must be a positive number, got {cfg['power']!r}")
  t0, t1 = cfg["start_step"], cfg["end_step"]
  pattern = structured.parse_sparsity_type(cfg["sparsity_type"])

  def update(step, params, grads, masks, state):
    pruned, sparsities = base.targets(cfg, params)
    frac = schedules.progress(step, t0, t1)
    if isinstance(pattern, structured.NM):
      return _nm_ramp(cfg, params, masks, pruned, frac), state
    # Entries, blocks or units: the integer interpolation over the leaf's groups.
    keep = jax.tree.map(
      lambda p, s, sel: (
        schedules.polynomial_keep_count(
          pattern.group_count(jnp.shape(p), cfg["axis"]), min(s_i, s), s, frac, cfg["power"]
        )
        if sel
        else 0
      ),
      params,
      sparsities,
      pruned,
    )
    return base.select(cfg, masked_magnitude(params, masks), pruned, keep), state

  is_update = schedules.periodic_updates(t0, t1, cfg["update_every"])
  sparsity_at = lambda u, s: schedules.polynomial(s, min(s_i, s), t0, t1, cfg["power"])(u)
  return base.Algorithm(
    name,
    cfg,
    base.all_true_init(cfg),
    is_update,
    update,
    flops_schedule=training_cost.pruned_on_updates(is_update, sparsity_at),
    family="magnitude",
  )


def global_magnitude(
  *,
  sparsity: float | None = None,
  distribution: Distribution = "uniform",
  include: Include = None,
  start_step: int = 0,
  end_step: int | None = None,
  update_every: int | None = 100,
  drop_fraction: float | None = None,
  seed: int = 0,
  sparsity_type: SparsityTypeLike = "unstructured",
  axis: int | None = None,
) -> base.Algorithm:
  """Global magnitude pruning: one threshold across all pruned leaves.

  Keeps the ``N - floor(s N)`` largest-magnitude entries among all ``N``
  pruned entries (Frankle & Carbin 2019 prune globally for deep nets). One-shot
  at ``start_step``; when ``end_step > start_step`` the total follows the
  Zhu & Gupta cubic schedule instead, updated every ``update_every`` steps.
  ``distribution`` does not apply.

  ``sparsity_type`` is ``"unstructured"`` or ``"neuron"``/``"channel"``: the
  latter keeps the ``N - floor(s N)`` highest-scoring of all ``N`` units of the
  pruned leaves, scored by their L2 norm (one global threshold over units:
  network slimming, Liu et al. 2017, ranks BatchNorm scales this way, see
  :func:`jaxprune.shrink.score_by_batchnorm_scale`). Every pruned leaf keeps at
  least its best unit, so no layer is cut through; a target that keeps fewer
  units than there are pruned leaves raises ValueError.
  """
  return _global("global_magnitude", global_magnitude, dict(locals()))


def _global(name, factory, given) -> base.Algorithm:
  """``global_magnitude`` under the name and typed signature of ``factory``."""
  cfg = config_lib.from_signature(name, factory, given)
  config_lib.require_sparsity("global_magnitude", cfg)
  pattern = structured.parse_sparsity_type(cfg["sparsity_type"])
  units = isinstance(pattern, structured.Units)
  if not (units or isinstance(pattern, structured.Unstructured)):
    raise ValueError(
      f"{name}: sparsity_type must be 'unstructured', 'neuron' or 'channel' "
      f"(one threshold across leaves), got {cfg['sparsity_type']!r}"
    )
  t0 = cfg["start_step"]
  t1 = cfg["end_step"] if cfg["end_step"] is not None else t0
  s = cfg["sparsity"]

  def update(step, params, grads, masks, state):
    pruned, _ = base.targets(cfg, params)
    scores = masked_magnitude(params, masks)
    leaves, treedef = jax.tree.flatten(scores)
    sel = jax.tree.leaves(pruned)
    chosen = [x for x, c in zip(leaves, sel) if c]
    frac = schedules.progress(step, t0, t1)
    if units:
      kept = iter(_global_unit_masks(name, pattern, cfg["axis"], chosen, s, frac))
    else:
      total = sum(math.prod(jnp.shape(x)) for x in chosen)
      kept = iter(topk.topk_masks(chosen, schedules.polynomial_keep_count(total, 0.0, s, frac)))
    old = jax.tree.leaves(masks)
    return jax.tree.unflatten(treedef, [next(kept) if c else m for c, m in zip(sel, old)]), state

  is_update = (
    schedules.periodic_updates(t0, t1, cfg["update_every"])
    if t1 > t0
    else (lambda step: step == t0)
  )
  # FLOPs accounting: each leaf's sparsity taken as its final one times the
  # total's progress (the global threshold's split across leaves is not known).
  progress = schedules.polynomial(1.0, 0.0, t0, t1)
  return base.Algorithm(
    name,
    cfg,
    base.all_true_init(cfg),
    is_update,
    update,
    flops_schedule=training_cost.pruned_on_updates(is_update, lambda u, s: s * progress(u)),
    family="magnitude",
  )


def _global_unit_masks(name, pattern, axis, scores, s, frac) -> list:
  """Masks of the units with the highest L2 score norm over all ``scores`` leaves.

  The kept count follows the cubic schedule of the total unit count. The best
  unit of every leaf ranks first (+inf, above every real norm: an infinite norm
  is lowered to the largest finite float32 first), so each leaf keeps at least
  one unit while the rest compete on one threshold; removed units (-inf) never
  return.
  """
  axes = [pattern.resolve_axis(jnp.ndim(x), axis) for x in scores]
  keys = []
  for x, ax in zip(scores, axes):
    key = structured.unit_rank_keys(x, ax)  # NaN already mapped below every real norm
    key = jnp.minimum(key, jnp.finfo(jnp.float32).max)  # +inf is reserved for the best unit
    keys.append(key.at[jnp.argmax(key)].set(jnp.inf))
  total = sum(int(k.shape[0]) for k in keys)
  final = topk.keep_count(total, s)
  if final < len(keys):
    raise ValueError(
      f"{name}: sparsity={s} keeps {final} of the {total} units of {len(keys)} pruned leaves; "
      "every leaf keeps at least one unit (lower the sparsity or prune fewer leaves)"
    )
  keep = schedules.polynomial_keep_count(total, 0.0, s, frac)
  kept = topk.topk_masks(keys, keep)
  return [structured.units_to_entries(k, jnp.shape(x), ax) for x, ax, k in zip(scores, axes, kept)]


def _nm_ramp(cfg, params, masks, pruned, frac):
  """Gradual N:M: every group of M keeps ``N_t = M - floor((M - N) c_t)`` entries.

  ``c_t = 1 - (1 - frac)^power`` is the Zhu & Gupta cubic progress, so a 2:4
  target ramps 4:4 -> 3:4 -> 2:4 on the update steps and is exactly N:M from
  ``end_step`` on; masks only shrink within each group.
  """
  st = structured.parse_sparsity_type(cfg["sparsity_type"])
  progress = 1.0 - (1.0 - frac) ** cfg["power"]
  n_t = jnp.where(frac >= 1.0, st.n, st.m - floor_product(progress, st.m - st.n))
  scores = masked_magnitude(params, masks)
  return jax.tree.map(
    lambda s, sel, m: (
      structured.nm_mask_from_scores(s, n_t, st.m, cfg["axis"] if cfg["axis"] is not None else -2)
      if sel
      else m
    ),
    scores,
    pruned,
    masks,
  )
