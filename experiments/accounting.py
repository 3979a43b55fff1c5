"""FLOPs figures of a training run: inference (final masks) and the whole run.

`run_flops(model, algorithm, config, params, batch_stats, masks)` is what
`experiments.train` adds to its result: one example's forward FLOPs dense and
with the final masks (`jaxprune.flops`), and the run's training FLOPs relative
to dense training of the same length (`jaxprune.training_flops`, the RigL
paper's appendix H accounting):

- `inference_flops_dense`, `inference_flops_sparse`, `inference_flops_ratio`;
- `training_flops`, `training_flops_dense`, `training_flops_ratio`.

`from_result(result, config)` computes the same figures after the fact for a
result written before runs recorded them, from its recorded per-layer sparsity
(masks of the same densities; only densities enter the counts).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxprune
from experiments import data, models
from experiments.configs import common

FIELDS = (
  "inference_flops_dense",
  "inference_flops_sparse",
  "inference_flops_ratio",
  "training_flops",
  "training_flops_dense",
  "training_flops_ratio",
)


def run_flops(model, algorithm, config, params, batch_stats, masks) -> dict:
  """The FLOPs fields of a run (see module doc); per example, 2 per multiply-add."""
  example = jax.ShapeDtypeStruct((1, *data.input_shape(config)), jnp.float32)
  variables = lambda p: {"params": p, **({"batch_stats": batch_stats} if batch_stats else {})}
  forward = jaxprune.flops(
    lambda p, x: model.apply(variables(p), x, train=False), params, masks, example
  )
  run = jaxprune.training_flops(algorithm, forward, int(config.steps), int(config.batch_size))
  return {
    "inference_flops_dense": int(forward.dense),
    "inference_flops_sparse": float(forward.sparse),
    "inference_flops_ratio": float(forward.ratio),
    "training_flops": float(run.sparse),
    "training_flops_dense": float(run.dense),
    "training_flops_ratio": float(run.ratio),
  }


def masks_of_sparsity(params, layer_sparsity: dict) -> Any:
  """Masks whose leaf densities are ``1 - layer_sparsity[path]`` (scalar True
  for leaves without a recorded sparsity or with none)."""

  def leaf(path, p):
    s = layer_sparsity.get(jaxprune.path_str(path), 0.0)
    if not s:
      return np.ones((), np.bool_)
    n = math.prod(p.shape)
    kept = n - int(round(s * n))
    return (np.arange(n) < kept).reshape(p.shape)

  return jax.tree_util.tree_map_with_path(leaf, params)


def from_result(result: dict, config) -> dict:
  """The FLOPs fields of a finished run from its `result.json` and config
  (e.g. `config.json` loaded into an `ml_collections.ConfigDict`)."""
  model = models.get_model(config, num_classes=int(config.num_classes))
  shapes = jax.eval_shape(
    lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, *data.input_shape(config))), train=False
    )
  )
  algorithm = jaxprune.create(config.algorithm, **common.create_kwargs(config))
  masks = masks_of_sparsity(shapes["params"], result.get("layer_sparsity", {}))
  # Closed-over statistics must be concrete; their values do not enter the counts.
  batch_stats = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes.get("batch_stats", {}))
  return run_flops(model, algorithm, config, shapes["params"], batch_stats, masks)
