"""Gradual saliency pruning: the magnitude schedules scored by ``|w ⊙ g|``.

The first-order Taylor estimate of the loss change when a weight is removed
(Mozer & Smolensky 1989; Molchanov et al. 2017, "Pruning Convolutional Neural
Networks for Resource Efficient Inference"), with ``g`` the dense gradient given
to ``tx.update`` on the update step. The schedules, keys and exactness are those
of ``gradual_magnitude`` (per leaf) and ``global_magnitude`` (one threshold);
masks only shrink.
"""

from __future__ import annotations

import jax

from jaxprune.algorithms import base
from jaxprune.algorithms.magnitude import _global, _gradual
from jaxprune.config import Distribution
from jaxprune.paths import Include
from jaxprune.structured import SparsityTypeLike


def _scored_by_saliency(algo: base.Algorithm, name: str) -> base.Algorithm:
  """``algo`` with its magnitude scores ``|w|`` replaced by ``|w ⊙ g|``."""

  def update(step, params, grads, masks, state):
    saliency = jax.tree.map(lambda w, g: w * g.astype(w.dtype), params, grads)
    return algo.update(step, saliency, grads, masks, state)

  return algo._replace(name=name, update=update, family="saliency")


def saliency(
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
  """Gradual pruning by saliency ``|w ⊙ g|``, per leaf.

  The same keys and cubic schedule as ``gradual_magnitude`` (``end_step``
  required; ``initial_sparsity``, ``power``; unstructured or structured
  ``sparsity_type``): every ``update_every`` steps from ``start_step`` to
  ``end_step`` each leaf keeps its ``n - floor(s_t n)`` highest saliencies among
  the entries still active.
  """
  return _scored_by_saliency(_gradual("saliency", saliency, dict(locals())), "saliency")


def global_saliency(
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
  """Saliency ``|w ⊙ g|`` with one threshold across all pruned leaves: the
  ``global_magnitude`` schedule (one-shot at ``start_step``, or cubic up to
  ``end_step`` when it is later)."""
  algo = _global("global_saliency", global_saliency, dict(locals()))
  return _scored_by_saliency(algo, "global_saliency")
