"""The jitted pieces of a run: loss, train step, eval step, sparsity measure.

`variables(params, batch_stats)` is the one place that builds a Flax variables
dict. `forward_params(algorithm)` is the hook through which the forward pass
sees other params than the stored ones: for the straight-through algorithms
(`ste`, `sr_ste`; Bengio et al. 2013, Zhou et al. 2021) it is
`jaxprune.straight_through(params, masks)` with the algorithm's magnitude masks
of those very params (its masks at `update_every=1`), so the params stay dense
while the loss, its gradient and the evaluation see the sparse model.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

import jaxprune
from experiments.harness.state import TrainState


def variables(params, batch_stats) -> dict:
  """The Flax variables of a model: params, plus batch_stats when there are any."""
  return {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}


def forward_params(algorithm: jaxprune.Algorithm) -> Callable | None:
  """`params -> params` the forward pass runs on, or None (the params as they are).

  Straight-through algorithms: `jaxprune.straight_through(params, masks)` with
  `masks` the algorithm's masks of `params` (see module doc).
  """
  if algorithm.straight_through is None:
    return None
  return lambda params: jaxprune.straight_through(params, algorithm.init(params)[0])


def _forward(forward: Callable | None, params):
  return params if forward is None else forward(params)


def loss_fn(logits, labels, num_classes: int, label_smoothing: float):
  """Mean softmax cross-entropy against (smoothed) one-hot labels."""
  targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()


def pruned_selection(params, masks) -> Any:
  """Per leaf, whether it counts for `sparsity`: leaves with a full-shape mask;
  if there are none (dense), every kernel (ndim >= 2)."""
  full = jax.tree.map(lambda m: jnp.ndim(m) > 0, masks)
  if any(jax.tree.leaves(full)):
    return full
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def zero_fraction(params, selection) -> jax.Array:
  """Fraction of exact zeros among the selected leaves (on device, traceable)."""
  chosen = [p for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(selection)) if s]
  if not chosen:
    return jnp.float32(0.0)
  zeros = sum(jnp.sum(p == 0, dtype=jnp.float32) for p in chosen)
  return zeros / float(sum(p.size for p in chosen))


def make_train_step(
  model, tx, schedule, num_classes: int, label_smoothing: float, forward: Callable | None = None
):
  """`(state, batch) -> (state, metrics)`, all on device (no host syncs); the
  forward pass runs on `forward(params)` (see `forward_params`)."""

  def train_step(state: TrainState, batch):
    step_rng = jax.random.fold_in(state.rng, state.step)

    def compute_loss(params):
      logits, updated = model.apply(
        variables(_forward(forward, params), state.batch_stats),
        batch["image"],
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": step_rng},
      )
      return loss_fn(logits, batch["label"], num_classes, label_smoothing), (logits, updated)

    (loss, (logits, updated)), grads = jax.value_and_grad(compute_loss, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    sparse = jaxprune.get_sparse_state(opt_state)
    metrics = {
      "loss": loss,
      "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
      "sparsity": zero_fraction(params, pruned_selection(params, sparse.masks)),
      "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
    }
    if hasattr(sparse.algo_state, "drop_fraction"):
      metrics["drop_fraction"] = sparse.algo_state.drop_fraction
    new_state = TrainState(
      state.step + 1, params, updated.get("batch_stats", state.batch_stats), opt_state, state.rng
    )
    return new_state, metrics

  return train_step


def make_eval_step(model, num_classes: int, forward: Callable | None = None):
  """`(params, batch_stats, batch) -> sums` of correct, loss and real examples
  (the forward pass on `forward(params)`)."""

  def eval_step(params, batch_stats, batch):
    logits = model.apply(
      variables(_forward(forward, params), batch_stats), batch["image"], train=False
    )
    mask = batch["mask"].astype(jnp.float32)
    labels = batch["label"]
    losses = optax.softmax_cross_entropy(
      logits.astype(jnp.float32), jax.nn.one_hot(labels, num_classes)
    )
    return {
      "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
      "loss": jnp.sum(losses * mask),
      "count": jnp.sum(mask),
    }

  return eval_step
