"""Pruning at initialisation: SNIP, GraSP, SynFlow (exact global counts, ties, hand examples)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxprune
from jaxprune.algorithms import at_init


def _count(masks, params):
  return sum(
    int(np.sum(np.broadcast_to(np.asarray(m), np.shape(p))))
    for m, p in zip(jax.tree.leaves(masks), jax.tree.leaves(params))
    if np.ndim(m)
  )


def _sum_loss(p, batch):  # gradient 1 everywhere: SNIP scores |θ|
  return sum(jnp.sum(x) for x in jax.tree.leaves(p)) * batch


def _square_loss(p, batch):  # g = θ, H = I: GraSP keeps the lowest -θ², i.e. the largest |θ|
  return 0.5 * sum(jnp.sum(x * x) for x in jax.tree.leaves(p)) * batch


def _linear_apply(p, x):  # product of the kernels: every entry has the same synaptic flow
  for k in sorted(p):
    x = x @ p[k]
  return x


@settings(max_examples=3, deadline=None)
@given(
  shapes=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=3),
  sparsity=st.floats(0.0, 0.99),
  method=st.sampled_from(["snip", "grasp"]),
)
def test_exact_global_count_and_tie_order(shapes, sparsity, method):
  params = {f"w{i}": jnp.ones(s) for i, s in enumerate(shapes)}
  params["bias"] = jnp.ones((3,))
  fn = dict(snip=jaxprune.snip_masks, grasp=jaxprune.grasp_masks)[method]
  loss = dict(snip=_sum_loss, grasp=_square_loss)[method]
  masks = fn(params, loss, [1.0, 2.0], sparsity)
  n = sum(a * b for a, b in shapes)
  keep = n - int(np.floor(sparsity * n))
  assert _count(masks, params) == keep
  assert masks["bias"].shape == ()
  # all scores tie: the first `keep` entries in flattening order (leaves in key order, row-major)
  flat = np.concatenate([np.asarray(masks[k]).ravel() for k in sorted(masks) if k != "bias"])
  assert flat[:keep].all() and not flat[keep:].any()


def test_synflow_exact_count_and_ties():
  params = {"a": jnp.ones((4, 4)), "b": jnp.ones((4, 4))}
  # square all-ones layers: every weight carries the same flow, the first ones are kept
  masks = jaxprune.synflow_masks(params, _linear_apply, (1, 4), 0.5, rounds=1)
  flat = np.concatenate([np.asarray(masks[k]).ravel() for k in ("a", "b")])
  assert flat.sum() == 16 and flat[:16].all()
  params = {"a": jnp.ones((4, 5)), "b": jnp.ones((5, 3))}
  masks = jaxprune.synflow_masks(params, _linear_apply, (1, 4), 0.7, rounds=5)
  assert _count(masks, params) == 35 - int(np.floor(0.7 * 35))


def _two_layer():
  x = np.array([1.0, -2.0])
  y = 0.5
  w1 = np.array([[0.3, -0.7], [0.5, 0.2]])
  w2 = np.array([0.9, -0.4])

  def loss(p, batch, temperature=1.0):
    bx, by = batch
    f = bx @ p["w1"] @ p["w2"] / temperature
    return 0.5 * (f - by) ** 2

  # by hand: f = x W1 w2, df/dW1 = x w2^T, df/dw2 = W1^T x; L = (f-y)^2 / 2
  f = x @ w1 @ w2
  r = f - y
  g1, g2 = r * np.outer(x, w2), r * (w1.T @ x)
  # Hg = df (df . g) + r * (d2f g); d2f/dW1_ij dw2_k = x_i [j == k]
  dot = np.sum(np.outer(x, w2) * g1) + np.sum((w1.T @ x) * g2)
  hg1 = np.outer(x, w2) * dot + r * np.outer(x, g2)
  hg2 = (w1.T @ x) * dot + r * (g1.T @ x)
  params = {"w1": jnp.asarray(w1), "w2": jnp.asarray(w2)}
  return params, loss, (jnp.asarray(x), y), (g1, g2), (hg1, hg2)


def test_snip_and_grasp_against_hand_computed_two_layer_net():
  params, loss, batch, (g1, g2), (hg1, hg2) = _two_layer()
  snip = at_init.snip_scores(params, loss, [batch])
  np.testing.assert_allclose(snip["w1"], np.abs(params["w1"] * g1), rtol=1e-5)
  np.testing.assert_allclose(snip["w2"], np.abs(params["w2"] * g2), rtol=1e-5)
  grasp = at_init.grasp_scores(params, loss, [batch], temperature=None)
  np.testing.assert_allclose(grasp["w1"], -params["w1"] * hg1, rtol=1e-5)
  np.testing.assert_allclose(grasp["w2"], -params["w2"] * hg2, rtol=1e-5)
  # masks: the w2 vector is included with include=lambda path, leaf: True
  inc = lambda path, leaf: True
  want = np.concatenate([np.abs(params["w1"] * g1).ravel(), np.abs(params["w2"] * g2)])
  m = jaxprune.snip_masks(params, loss, [batch], 0.5, include=inc)
  got = np.concatenate([np.asarray(m["w1"]).ravel(), np.asarray(m["w2"])])
  assert set(np.flatnonzero(got)) == set(np.argsort(-want)[:3])
  want = np.concatenate([(-params["w1"] * hg1).ravel(), -params["w2"] * hg2])
  m = jaxprune.grasp_masks(params, loss, [batch], 0.5, include=inc, temperature=None)
  got = np.concatenate([np.asarray(m["w1"]).ravel(), np.asarray(m["w2"])])
  assert set(np.flatnonzero(got)) == set(np.argsort(want)[:3])  # GraSP keeps the lowest
  # the temperature is passed to a loss that takes it: T=200 scales g by 1/T, Hg by 1/T^2
  hot = at_init.grasp_scores(params, loss, [batch])
  cold = at_init.grasp_scores(params, lambda p, b: loss(p, b, temperature=200.0), [batch])
  np.testing.assert_allclose(hot["w1"], cold["w1"], rtol=1e-5)


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    for f in (128, 128, 128):
      x = nn.relu(nn.Dense(f)(x))
    return nn.Dense(10)(x)


class _CNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    for f in (16, 32, 32):
      x = nn.relu(nn.Conv(f, (3, 3))(x))
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(10)(x)


@pytest.mark.parametrize("model,shape", [(_MLP(), (1, 64)), (_CNN(), (1, 6, 6, 1))])
def test_synflow_keeps_a_path_at_999(model, shape):
  params = model.init(jax.random.PRNGKey(0), jnp.ones(shape))
  masks = jaxprune.synflow_masks(params, model.apply, shape, 0.999, rounds=100)
  sizes = [int(np.size(p)) for p in jax.tree.leaves(params) if np.ndim(p) >= 2]
  assert _count(masks, params) == sum(sizes) - int(np.floor(0.999 * sum(sizes)))
  # a path from input to output: positive flow through the masked |θ| with zero biases
  kept = jax.tree.map(lambda p, m: jnp.abs(p) * m * (jnp.ndim(p) >= 2), params, masks)
  assert float(jnp.sum(model.apply(kept, jnp.ones(shape)))) > 0
  for m in jax.tree.leaves(masks):
    assert np.ndim(m) == 0 or np.asarray(m).any()  # no layer cut off


def test_synflow_scaling_keeps_deep_nets_finite():
  depth = 60
  params = {f"w{i:02d}": jnp.full((64, 64), 10.0) for i in range(depth)}
  scores = at_init.synflow_scores(params, _linear_apply, (1, 64))
  assert all(np.isfinite(np.asarray(s)).all() for s in jax.tree.leaves(scores))
  assert all(np.asarray(s).min() > 0 for s in jax.tree.leaves(scores))


def test_bad_arguments():
  params = {"w": jnp.ones((3, 3))}
  with pytest.raises(ValueError, match="sparsity"):
    jaxprune.snip_masks(params, _sum_loss, [1.0], 1.0)
  with pytest.raises(ValueError, match="empty"):
    jaxprune.snip_masks(params, _sum_loss, [], 0.5)
  with pytest.raises(ValueError, match="rounds"):
    jaxprune.synflow_masks(params, _linear_apply, (1, 3), 0.5, rounds=0)
  with pytest.raises(ValueError, match="matched no parameter"):
    jaxprune.snip_masks(params, _sum_loss, [1.0], 0.5, include="nothing")
