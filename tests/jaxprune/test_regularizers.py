"""L1 and group-lasso penalties and their proximal steps (jaxprune.regularizers)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxprune import regularizers as R


def _params():
  rng = np.random.default_rng(0)
  return {
    "Dense_0": {
      "kernel": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32),
      "bias": jnp.asarray(rng.normal(size=4), jnp.float32),
    },
    "Dense_1": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "bias": jnp.zeros(3)},
  }


def test_penalties_values():
  p = _params()
  k0, k1 = np.asarray(p["Dense_0"]["kernel"]), np.asarray(p["Dense_1"]["kernel"])
  np.testing.assert_allclose(R.l1_penalty(p), np.abs(k0).sum() + np.abs(k1).sum(), rtol=1e-6)
  np.testing.assert_allclose(R.l1_penalty(p, include="Dense_1"), np.abs(k1).sum(), rtol=1e-6)
  gl = np.linalg.norm(k0, axis=0).sum() + np.linalg.norm(k1, axis=0).sum()
  np.testing.assert_allclose(R.group_lasso_penalty(p), gl, rtol=1e-6)
  np.testing.assert_allclose(
    R.group_lasso_penalty(p, include=lambda path, x: path == "Dense_0/kernel"),
    np.linalg.norm(k0, axis=0).sum(),
    rtol=1e-6,
  )


def test_group_lasso_gradient_finite_at_zero_unit():
  p = _params()
  p["Dense_0"]["kernel"] = p["Dense_0"]["kernel"].at[:, 1].set(0.0)
  g = jax.grad(R.group_lasso_penalty)(p)
  gk = np.asarray(g["Dense_0"]["kernel"])
  assert np.all(np.isfinite(gk)) and np.all(gk[:, 1] == 0)
  k = np.asarray(p["Dense_0"]["kernel"])
  np.testing.assert_allclose(gk[:, 0], k[:, 0] / np.linalg.norm(k[:, 0]), rtol=1e-5)


def test_prox_l1_soft_threshold():
  p = _params()
  tx = optax.chain(optax.sgd(0.1), R.prox_l1(0.3))
  state = tx.init(p)
  g = jax.tree.map(jnp.ones_like, p)
  upd, state = tx.update(g, state, p)
  new = optax.apply_updates(p, upd)
  v = np.asarray(p["Dense_0"]["kernel"]) - 0.1
  want = np.sign(v) * np.maximum(np.abs(v) - 0.3, 0)
  np.testing.assert_allclose(new["Dense_0"]["kernel"], want, atol=1e-6)
  assert np.sum(np.asarray(new["Dense_0"]["kernel"]) == 0) == np.sum(np.abs(v) <= 0.3) > 0
  # Biases (1-D) are not selected by default: plain SGD step.
  np.testing.assert_allclose(new["Dense_0"]["bias"], p["Dense_0"]["bias"] - 0.1, atol=1e-6)
  with pytest.raises(ValueError, match="params"):
    tx.update(g, state)


def test_prox_group_lasso_zeroes_whole_units_and_compacts():
  p = _params()
  k = np.asarray(p["Dense_0"]["kernel"])
  norms = np.linalg.norm(k, axis=0)
  t = float(np.sort(norms)[1]) + 1e-4  # the two weakest units fall below t
  tx = R.prox_group_lasso(lambda step: t * (step + 1), include="Dense_0/kernel")
  state = tx.init(p)
  zero = jax.tree.map(jnp.zeros_like, p)
  upd, state = jax.jit(tx.update)(zero, state, p)
  new = optax.apply_updates(p, upd)
  nk = np.asarray(new["Dense_0"]["kernel"])
  dead = norms <= t
  assert dead.sum() == 2 and np.all(nk[:, dead] == 0)
  np.testing.assert_allclose(nk[:, ~dead], k[:, ~dead] * (1 - t / norms[~dead]), rtol=1e-5)
  np.testing.assert_array_equal(new["Dense_1"]["kernel"], p["Dense_1"]["kernel"])
  assert int(state.count) == 1
  # Zeroed units are found without masks and removed.
  from jaxprune.compact import compact

  out = compact(new)
  assert out.widths == [2, 3]
  x = np.random.default_rng(1).normal(size=(3, 5)).astype(np.float32)

  def mlp(q, x):
    h = jax.nn.relu(x @ q["Dense_0"]["kernel"] + q["Dense_0"]["bias"])
    return h @ q["Dense_1"]["kernel"] + q["Dense_1"]["bias"]

  np.testing.assert_allclose(mlp(out.params, x), mlp(new, x), atol=1e-5)


def _bn_params():
  rng = np.random.default_rng(1)
  return {
    "Conv_0": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 1, 4)), jnp.float32)},
    "BatchNorm_0": {
      "scale": jnp.asarray([0.5, -0.2, 0.0, 1.5], jnp.float32),
      "bias": jnp.asarray(rng.normal(size=4), jnp.float32),
    },
  }


def test_add_l1_subgradient_adds_sign_to_selected_leaves_only():
  p = _bn_params()
  g = jax.tree.map(lambda x: jnp.full_like(x, 0.25), p)
  tx = R.add_l1_subgradient(1e-2, r"^BatchNorm_\d+/scale$")
  upd, state = tx.update(g, tx.init(p), p)
  np.testing.assert_allclose(upd["BatchNorm_0"]["scale"], [0.26, 0.24, 0.25, 0.26], rtol=1e-6)
  np.testing.assert_array_equal(upd["BatchNorm_0"]["bias"], g["BatchNorm_0"]["bias"])
  np.testing.assert_array_equal(upd["Conv_0"]["kernel"], g["Conv_0"]["kernel"])
  assert int(state.count) == 1
  with pytest.raises(ValueError, match="params"):
    tx.update(g, state)


def test_add_l1_subgradient_is_the_gradient_of_the_l1_term_and_keeps_zeros():
  # Chained before SGD it is one step on loss + lam * ||scale||_1 away from zero (autodiff's
  # derivative of |x| at 0 is 1, the subgradient used here 0: the zero entry stays zero).
  p = _bn_params()
  lam, lr = 1e-2, 0.1
  loss = lambda q: jnp.sum(q["BatchNorm_0"]["scale"] ** 2) + jnp.sum(q["Conv_0"]["kernel"])
  g = jax.grad(loss)(p)
  tx = optax.chain(R.add_l1_subgradient(lam, "BatchNorm_0/scale"), optax.sgd(lr))
  upd, _ = jax.jit(tx.update)(g, tx.init(p), p)
  full = jax.grad(lambda q: loss(q) + lam * R.l1_penalty(q, include="BatchNorm_0/scale"))(p)
  want = jax.tree.map(lambda x, d: x - lr * d, p, full)
  got = optax.apply_updates(p, upd)
  np.testing.assert_allclose(got["Conv_0"]["kernel"], want["Conv_0"]["kernel"], rtol=1e-6)
  nonzero = np.asarray([0, 1, 3])
  np.testing.assert_allclose(
    np.asarray(got["BatchNorm_0"]["scale"])[nonzero],
    np.asarray(want["BatchNorm_0"]["scale"])[nonzero],
    rtol=1e-6,
  )
  assert float(got["BatchNorm_0"]["scale"][2]) == 0.0


def test_add_l1_subgradient_schedule_switches_off():
  p = _bn_params()
  zero = jax.tree.map(jnp.zeros_like, p)
  tx = R.add_l1_subgradient(lambda c: jnp.where(c < 2, 1.0, 0.0), "BatchNorm_0/scale")
  state = tx.init(p)
  added = []
  for _ in range(3):
    upd, state = jax.jit(tx.update)(zero, state, p)
    added.append(np.asarray(upd["BatchNorm_0"]["scale"]))
  np.testing.assert_array_equal(added[0], np.sign(np.asarray(p["BatchNorm_0"]["scale"])))
  np.testing.assert_array_equal(added[1], added[0])
  np.testing.assert_array_equal(added[2], np.zeros(4))
