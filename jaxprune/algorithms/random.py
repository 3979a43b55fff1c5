"""Static masks: random pruning (one-shot), static random sparsity, user-given fixed masks."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import config as config_lib
from jaxprune.algorithms import base
from jaxprune.config import Distribution
from jaxprune.masks import check_structure, dense_mask, random_scores, shape_mismatch
from jaxprune.paths import Include, path_str
from jaxprune.structured import SparsityTypeLike


def _random_masks(cfg, params, step):
  pruned, sparsities = base.targets(cfg, params)
  scores = random_scores(base.step_key(cfg, step), params)
  return base.select(cfg, scores, pruned, base.keep_counts(cfg, params, sparsities))


def random(
  *,
  sparsity: float | None = None,
  distribution: Distribution = "uniform",
  include: Include = None,
  start_step: int = 0,
  end_step: int | None = None,
  update_every: int | None = None,
  drop_fraction: float | None = None,
  seed: int = 0,
  sparsity_type: SparsityTypeLike = "unstructured",
  axis: int | None = None,
) -> base.Algorithm:
  """One-shot random pruning at ``start_step``: each pruned leaf keeps a
  uniformly random subset of exactly ``n - floor(s n)`` entries (the baseline
  of Liu et al. 2022, "The Unreasonable Effectiveness of Random Pruning")."""
  cfg = config_lib.from_signature("random", random, dict(locals()))
  config_lib.require_sparsity("random", cfg)

  def update(step, params, grads, masks, state):
    new = _random_masks(cfg, params, step)
    return jax.tree.map(lambda n, m: n & m, new, masks), state

  return base.one_shot("random", cfg, update, family="random")


def static(
  *,
  sparsity: float | None = None,
  distribution: Distribution = "erk",
  include: Include = None,
  start_step: int = 0,
  end_step: int | None = None,
  update_every: int | None = None,
  drop_fraction: float | None = None,
  seed: int = 0,
  sparsity_type: SparsityTypeLike = "unstructured",
  axis: int | None = None,
) -> base.Algorithm:
  """Static sparse training: random masks at initialisation, fixed forever
  (the "Static" baseline of Evci et al. 2020; ERK by default)."""
  cfg = config_lib.from_signature("static", static, dict(locals()))
  config_lib.require_sparsity("static", cfg)
  init = lambda params: (_random_masks(cfg, params, 0), ())
  return base.Algorithm(
    "static", cfg, init, base.never, base.no_update, changes_masks=False, family="static"
  )


def dense(
  *,
  sparsity: float | None = None,
  distribution: Distribution = "uniform",
  include: Include = None,
  start_step: int = 0,
  end_step: int | None = None,
  update_every: int | None = None,
  drop_fraction: float | None = None,
  seed: int = 0,
  sparsity_type: SparsityTypeLike = "unstructured",
  axis: int | None = None,
) -> base.Algorithm:
  """No pruning: every mask is a scalar True. Every key is accepted and ignored."""
  cfg = config_lib.from_signature("dense", dense, dict(locals()))
  init = lambda params: (jax.tree.map(lambda p: jnp.ones((), jnp.bool_), params), ())
  return base.Algorithm(
    "dense", cfg, init, base.never, base.no_update, changes_masks=False, family="dense"
  )


def _as_bool_masks(masks):
  """User masks as bool leaves; 0/1 numbers are accepted only if exactly 0 and 1."""

  def leaf(path, m):
    m = np.asarray(m)
    if m.dtype == np.bool_:
      return m
    if not (np.issubdtype(m.dtype, np.floating) or np.issubdtype(m.dtype, np.integer)):
      raise ValueError(f"fixed: mask at {path_str(path)!r} has dtype {m.dtype}; use bool or 0/1")
    if not np.all((m == 0) | (m == 1)):
      bad = m[(m != 0) & (m != 1)].ravel()[0]
      raise ValueError(
        f"fixed: mask at {path_str(path)!r} holds {bad!r}; numeric masks must be exactly 0 or 1"
      )
    return m == 1

  return jax.tree_util.tree_map_with_path(leaf, masks)


def fixed(
  *,
  sparsity: float | None = None,
  distribution: Distribution = "uniform",
  include: Include = None,
  start_step: int = 0,
  end_step: int | None = None,
  update_every: int | None = None,
  drop_fraction: float | None = None,
  seed: int = 0,
  sparsity_type: SparsityTypeLike = "unstructured",
  axis: int | None = None,
  masks: Any = None,
) -> base.Algorithm:
  """Trains with user-given masks, kept exactly: lottery tickets (Frankle & Carbin
  2019), masks from a sparse checkpoint or from one-shot pruning, masks from
  :func:`jaxprune.snip_masks` and the other pruning-at-init functions.

  Config: ``masks`` (required), a tree with exactly the params' structure whose
  leaves are bool arrays of the parameter's shape, or numeric arrays holding
  exactly 0 and 1, or scalars (a scalar True leaves its parameter dense; a
  scalar False prunes all of it). Every common key is accepted and ignored, so
  that a sweep can pass one config to every algorithm; a missing ``masks`` is
  reported by ``init``. A structure or shape mismatch raises a ValueError
  naming the path.
  """
  cfg = config_lib.from_signature("fixed", fixed, dict(locals()))
  given = None if cfg["masks"] is None else _as_bool_masks(cfg["masks"])

  def init(params):
    if given is None:
      raise ValueError("fixed: config key 'masks' is required")
    check_structure(params, given, "fixed")

    def leaf(path, p, m):
      if m.ndim == 0:
        return dense_mask() if bool(m) else jnp.zeros(jnp.shape(p), jnp.bool_)
      if m.shape != jnp.shape(p):
        raise shape_mismatch(path_str(path), m.shape, jnp.shape(p), "fixed")
      return jnp.asarray(m)

    return jax.tree_util.tree_map_with_path(leaf, params, given), ()

  return base.Algorithm(
    "fixed", cfg, init, base.never, base.no_update, changes_masks=False, family="fixed"
  )
