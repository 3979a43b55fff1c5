"""rescale_init: each unit's incoming weights scaled by sqrt(fan_in / active_fan_in)."""

import jax
import jax.numpy as jnp
import numpy as np

import jaxprune


def test_rescale_per_output_unit_and_variance_restored():
  key = jax.random.PRNGKey(0)
  w = jax.random.normal(key, (400, 6))
  m = np.zeros((400, 6), bool)
  for j, k in enumerate([400, 200, 100, 40, 4, 0]):
    m[:k, j] = True
  params = {"w": w, "b": jnp.ones((6,))}
  masks = {"w": jnp.asarray(m), "b": jnp.ones((), bool)}
  out = jaxprune.rescale_init(params, masks)
  for j, k in enumerate([400, 200, 100, 40, 4]):
    np.testing.assert_allclose(out["w"][:k, j], w[:k, j] * np.sqrt(400 / k), rtol=1e-6)
  assert np.all(np.asarray(out["w"])[~m] == 0.0)
  np.testing.assert_array_equal(out["b"], params["b"])
  # the pre-activation variance of a sparse unit matches the dense one's (on average)
  x = jax.random.normal(jax.random.PRNGKey(1), (2000, 400))
  dense_var = np.var(np.asarray(x @ w[:, 0]))
  sparse_var = np.var(np.asarray(x @ out["w"][:, 3]))
  assert 0.6 < sparse_var / dense_var < 1.6


def test_conv_kernel_fan_in_is_all_but_last_axis():
  w = jnp.ones((3, 3, 4, 2))
  m = jnp.zeros((3, 3, 4, 2), bool).at[0, 0, :, 0].set(True).at[:, :, :, 1].set(True)
  out = jaxprune.rescale_init({"k": w}, {"k": m})["k"]
  np.testing.assert_allclose(out[0, 0, :, 0], np.sqrt(36 / 4))
  np.testing.assert_allclose(out[..., 1], 1.0)
