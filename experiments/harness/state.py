"""The train state of a run, its initialisation and its placement on devices."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

import jaxprune


class TrainState(NamedTuple):
  """Everything a run carries from step to step (and checkpoints)."""

  step: jax.Array  # int32 scalar: the number of steps done.
  params: Any
  batch_stats: Any  # {} for models without BatchNorm.
  opt_state: Any  # jaxprune.sparsify state: masks, inner and algorithm state.
  rng: jax.Array  # Raw uint32 key; per-step keys are fold_in(rng, step).


class Init(NamedTuple):
  """The initial train state in two jit-able parts (plus their composition).

  `model(rng) -> (params, batch_stats, state_rng)` does not depend on the
  algorithm or the seed value (the key is an argument), so its compiled form is
  shared by every run of a sweep (with a persistent compilation cache);
  `optimizer(params) -> (params, opt_state)` builds the sparse optimizer state
  and applies the first masks; `state(rng)` composes both.
  """

  model: Callable
  optimizer: Callable
  state: Callable


def make_init(model, tx, input_shape, rescale: bool = False, params0: Any = None) -> Init:
  """The initialisation of a run: params with the algorithm's first masks applied
  (and with `rescale`, `jaxprune.rescale_init`: each unit's weights scaled to its
  active fan-in). `params0`, when given, replaces the model's initial params
  (BatchNorm statistics and the state key still come from the model's init)."""

  def init_model(rng):
    init_rng, state_rng = jax.random.split(rng)
    variables = model.init(init_rng, jnp.zeros((1, *input_shape), jnp.float32), train=False)
    params = variables["params"] if params0 is None else params0
    return params, variables.get("batch_stats", {}), state_rng

  def init_optimizer(params):
    opt_state = tx.init(params)
    masks = jaxprune.get_masks(opt_state)
    params = jaxprune.apply_masks(params, masks)
    return (jaxprune.rescale_init(params, masks) if rescale else params), opt_state

  def init_state(rng) -> TrainState:
    params, batch_stats, state_rng = init_model(rng)
    params, opt_state = init_optimizer(params)
    return TrainState(jnp.zeros((), jnp.int32), params, batch_stats, opt_state, state_rng)

  return Init(init_model, init_optimizer, init_state)


def initial_state(init: Init, seed: int, shardings: TrainState, start_step: int = 0) -> TrainState:
  """Runs `init` on device, every array placed with `shardings`; the state's
  step is `start_step` (a run that starts part-way, e.g. rewound weights)."""
  rng = jax.random.PRNGKey(seed)
  params, batch_stats, state_rng = jax.jit(
    init.model, out_shardings=(shardings.params, shardings.batch_stats, shardings.rng)
  )(rng)
  params, opt_state = jax.jit(
    init.optimizer, out_shardings=(shardings.params, shardings.opt_state)
  )(params)
  step = jax.device_put(jnp.int32(start_step), shardings.step)
  return TrainState(step, params, batch_stats, opt_state, state_rng)


def to_host(tree):
  """numpy copies of (possibly sharded, possibly multi-host) arrays."""
  leaves = jax.tree.leaves(tree)
  if all(getattr(x, "is_fully_addressable", True) for x in leaves):
    return jax.device_get(tree)
  from jax.experimental import multihost_utils

  return multihost_utils.process_allgather(tree, tiled=True)
