"""Shared pieces of the benchmarks: the MLP, a batch, and interleaved timing."""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


class MLP(nn.Module):
  """784-1024-1024-10 ReLU MLP."""

  features: tuple = (1024, 1024, 10)

  @nn.compact
  def __call__(self, x):
    for f in self.features[:-1]:
      x = nn.relu(nn.Dense(f)(x))
    return nn.Dense(self.features[-1])(x)


def setup(batch_size: int = 256, seed: int = 0):
  """Model, params and one batch of random data."""
  model = MLP()
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  params = model.init(k1, jnp.ones((1, 784)))
  x = jax.random.normal(k2, (batch_size, 784))
  y = jax.random.randint(k3, (batch_size,), 0, 10)
  return model, params, (x, y)


def make_step(model, tx):
  """A jitted training step ``(params, opt_state, batch) -> (params, opt_state, loss)``."""

  def loss_fn(params, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(model.apply(params, x), y).mean()

  @jax.jit
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def interleaved_times(fns: dict, rounds: int, reps: int = 1) -> dict:
  """Runs each ``fn()`` in turn (A B A B ...) ``rounds`` times; returns per-round seconds.

  Each fn runs ``reps`` times per timing and must block until its result is ready.
  """
  for fn in fns.values():  # compile and warm up
    fn()
    fn()
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      t = time.perf_counter()
      for _ in range(reps):
        fn()
      times[name].append((time.perf_counter() - t) / reps)
  return {name: np.asarray(ts) for name, ts in times.items()}


def interleaved(fns: dict, rounds: int, reps: int = 1) -> dict:
  """Median seconds per ``fn`` of :func:`interleaved_times`."""
  return {name: float(np.median(ts)) for name, ts in interleaved_times(fns, rounds, reps).items()}


def paired_ratios(times: dict, base: str = "dense") -> dict:
  """Per name, ``(median, 25th, 75th percentile)`` of the per-round ratio to ``base``.

  Each round times every variant back to back, so a ratio within a round is
  less exposed to load that drifts over the run than a ratio of medians.
  """
  out = {}
  for name, ts in times.items():
    r = ts / times[base]
    out[name] = tuple(float(x) for x in (np.median(r), *np.percentile(r, [25, 75])))
  return out
