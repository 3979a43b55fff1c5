"""Random pruning (one-shot) and static random sparsity from initialisation."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxprune import config as config_lib
from jaxprune.algorithms import base
from jaxprune.masks import random_scores


def _random_masks(cfg, params, step):
  pruned, sparsities = base.targets(cfg, params)
  scores = random_scores(base.step_key(cfg, step), params)
  return base.select(cfg, scores, pruned, base.keep_counts(cfg, params, sparsities))


def random(**config) -> base.Algorithm:
  """One-shot random pruning at ``start_step``: each pruned leaf keeps a
  uniformly random subset of exactly ``n - floor(s n)`` entries (the baseline
  of Liu et al. 2022, "The Unreasonable Effectiveness of Random Pruning")."""
  cfg = config_lib.validate("random", config, dict(distribution="uniform"))
  config_lib.require_sparsity("random", cfg)

  def update(step, params, grads, masks, state):
    new = _random_masks(cfg, params, step)
    return jax.tree.map(lambda n, m: n & m, new, masks), state

  return base.Algorithm(
    "random", cfg, base.all_true_init(cfg), lambda step: step == cfg["start_step"], update
  )


def static(**config) -> base.Algorithm:
  """Static sparse training: random masks at initialisation, fixed forever
  (the "Static" baseline of Evci et al. 2020; ERK by default)."""
  cfg = config_lib.validate("static", config, dict(distribution="erk"))
  config_lib.require_sparsity("static", cfg)
  init = lambda params: (_random_masks(cfg, params, 0), ())
  return base.Algorithm("static", cfg, init, base.never, base.no_update, changes_masks=False)


def dense(**config) -> base.Algorithm:
  """No pruning: every mask is a scalar True."""
  cfg = config_lib.validate("dense", config, dict(distribution="uniform"))
  init = lambda params: (jax.tree.map(lambda p: jnp.ones((), jnp.bool_), params), ())
  return base.Algorithm("dense", cfg, init, base.never, base.no_update, changes_masks=False)
