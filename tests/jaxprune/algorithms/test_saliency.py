"""Saliency pruning: the gradual schedule scored by |w * g|, per leaf and global."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune


def _problem():
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
  params = {
    "a": jax.random.normal(k1, (6, 8)),
    "b": jax.random.normal(k2, (8, 5)),
    "bias": jnp.ones((5,)),
  }
  coef = {"a": jax.random.normal(k3, (6, 8)), "b": 10 * jax.random.normal(k4, (8, 5))}
  loss = lambda p: jnp.sum(p["a"] * coef["a"]) + jnp.sum(p["b"] * coef["b"]) + jnp.sum(p["bias"])
  return params, coef, loss


def _run(algo, params, loss, steps):
  tx = jaxprune.sparsify(optax.sgd(0.0), algo)  # lr 0: scores stay |w * coef|
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p))
  history = []
  for _ in range(steps):
    _, state = step(params, state)
    history.append(jax.tree.map(np.asarray, jaxprune.get_masks(state)))
  return history


def _top(scores, keep):
  flat = np.asarray(scores).ravel()
  order = np.lexsort((np.arange(flat.size), -flat))  # descending, lower index on ties
  out = np.zeros(flat.size, bool)
  out[order[:keep]] = True
  return out.reshape(np.shape(scores))


def test_saliency_keeps_highest_w_times_g_per_leaf_on_the_cubic_schedule():
  params, coef, loss = _problem()
  algo = jaxprune.create("saliency", sparsity=0.75, end_step=4, update_every=2)
  history = _run(algo, params, loss, 5)
  for k in ("a", "b"):
    sal = np.abs(np.asarray(params[k]) * np.asarray(coef[k]))
    n = sal.size
    final = history[-1][k]
    assert final.sum() == n - int(np.floor(0.75 * n))
    assert np.array_equal(final, _top(sal, final.sum()))
    assert not np.array_equal(final, _top(np.abs(params[k]), final.sum()))  # not magnitude
    counts = [m[k].sum() for m in history]
    assert counts[0] == n > counts[2] > counts[4]  # gradual, shrinking
  assert history[-1]["bias"].shape == ()
  assert algo.name == "saliency"


def test_global_saliency_one_threshold():
  params, coef, loss = _problem()
  algo = jaxprune.create("global_saliency", sparsity=0.5)
  masks = _run(algo, params, loss, 1)[-1]
  sal = [np.abs(np.asarray(params[k]) * np.asarray(coef[k])).ravel() for k in ("a", "b")]
  n = sum(s.size for s in sal)
  want = _top(np.concatenate(sal), n - n // 2)
  got = np.concatenate([masks["a"].ravel(), masks["b"].ravel()])
  assert np.array_equal(got, want)
  assert masks["b"].mean() > masks["a"].mean()  # the larger gradients of "b" keep more of it


def test_saliency_config_errors_name_the_algorithm_and_key():
  with pytest.raises(ValueError, match="saliency.*'end_step' is required"):
    jaxprune.create("saliency", sparsity=0.5)
  with pytest.raises(ValueError, match="global_saliency.*'powr'"):
    jaxprune.create("global_saliency", sparsity=0.5, powr=2)
