"""The result of a run: its JSON object, its sparsity and its FLOPs figures.

`final_result(setup, state, evaluation, start, wall_s)` is the dict a run
prints last and writes to `<workdir>/result.json` (`RESULT_FILE`), with the
per-layer sparsity table. Sparsity is measured on the final params: `sparsity`
is the fraction of exact zeros among the entries of the leaves the algorithm
prunes (leaves with a full-shape mask; for `dense`, all kernels, ndim >= 2);
`overall_sparsity` is over every parameter (biases and BatchNorm scales
included).

FLOPs accounting: `run_flops(model, algorithm, config, params, batch_stats,
masks)` gives one example's forward FLOPs dense and with the final masks
(`jaxprune.flops`), and the run's training FLOPs relative to dense training of
the same length (`jaxprune.training_flops`, the RigL paper's appendix H
accounting):

- `inference_flops_dense`, `inference_flops_sparse`, `inference_flops_ratio`;
- `training_flops`, `training_flops_dense`, `training_flops_ratio`.

`from_result(result, config)` computes the same figures after the fact for a
result written before runs recorded them, from its recorded per-layer sparsity
(masks of the same densities; only densities enter the counts).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxprune
from experiments import data, models
from experiments.harness import config as config_lib
from experiments.harness.state import TrainState, to_host
from experiments.harness.steps import pruned_selection, variables

RESULT_FILE = "result.json"
CONFIG_FILE = "config.json"

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
  forward = jaxprune.flops(
    lambda p, x: model.apply(variables(p, batch_stats), x, train=False), params, masks, example
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
  algorithm = jaxprune.create(config.algorithm, **config_lib.create_kwargs(config))
  masks = masks_of_sparsity(shapes["params"], result.get("layer_sparsity", {}))
  # Closed-over statistics must be concrete; their values do not enter the counts.
  batch_stats = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes.get("batch_stats", {}))
  return run_flops(model, algorithm, config, shapes["params"], batch_stats, masks)


def final_result(
  setup, state: TrainState, evaluation: dict, start: int, wall_s: float
) -> tuple[dict, jaxprune.Summary]:
  """The run's result dict (see module doc) and its per-layer sparsity table."""
  config = setup.config
  params = to_host(state.params)
  masks = to_host(jaxprune.get_masks(state.opt_state))
  table = jaxprune.summary(params, algorithm=setup.algorithm)
  selection = pruned_selection(params, masks)
  measured = [
    (np.size(p), np.count_nonzero(p))
    for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(selection))
    if s
  ]
  total = sum(n for n, _ in measured)
  prunes = any(np.ndim(m) > 0 for m in jax.tree.leaves(masks))
  result = {
    "config": config.name,
    "dataset": setup.train_source.dataset,
    "algorithm": setup.algorithm.name,
    "target_sparsity": config.sparsity if prunes else None,
    "seed": int(config.seed),
    "test_accuracy": evaluation["accuracy"],
    "test_loss": evaluation["loss"],
    "sparsity": 1.0 - sum(nz for _, nz in measured) / total if total else 0.0,
    "overall_sparsity": table.total.sparsity,
    "layer_sparsity": table.as_dict(),
    "steps": int(config.steps),
    "resumed_from": start,
    "devices": jax.device_count(),
    "processes": jax.process_count(),
    "wall_s": round(wall_s, 2),
    "workdir": os.path.abspath(config.workdir),
  }
  result.update(
    run_flops(setup.model, setup.algorithm, config, params, to_host(state.batch_stats), masks)
  )
  return result, table


def write_json(path: str, obj) -> None:
  """Writes `obj` to `path` atomically (a temporary file, then a rename)."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)
