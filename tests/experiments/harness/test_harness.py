"""Tests of experiments/harness: config keys, the forward-params hook, the cache."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune
from experiments import harness
from experiments.harness import cache, config, steps

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
CONFIG = os.path.join(REPO, "experiments", "configs", "fmnist_mlp.py")
NOT_CONFIG_VALUES = ("seed", "masks")  # the run's own seed; arrays (fixed)


MINIMAL = ({}, {"sparsity": 0.5}, {"sparsity": 0.5, "end_step": 100})


def _default_algorithm(name):
  """`(jaxprune.create(name, **kw), kw)` with the fewest config keys `kw` it needs."""
  if name == "fixed":
    return jaxprune.create(name, masks={"w": np.ones((4, 4), bool)}), {}
  for kw in MINIMAL:
    try:
      return jaxprune.create(name, **kw), kw
    except ValueError:
      continue
  raise AssertionError(f"{name}: no minimal config among {MINIMAL}")


def _flag(value) -> str:
  return f"({','.join(map(str, value))})" if isinstance(value, tuple) else str(value)


@pytest.mark.parametrize("name", sorted(jaxprune.REGISTRY))
def test_an_experiment_config_can_set_every_key_the_library_accepts(name):
  """Every key of `jaxprune.config_keys(name)` is a config key; set on the command
  line to the library's own resolved value, it reaches `jaxprune.create` as is."""
  algo, required = _default_algorithm(name)
  keys = [k for k in jaxprune.config_keys(name) if k not in NOT_CONFIG_VALUES]
  assert set(keys) <= set(config.ALGORITHM_KEYS)
  checked = 0
  for key in keys:
    value = algo.config.get(key)
    if value is None or callable(value):
      assert key in harness.parse_config(["train", f"--config={CONFIG}"])
      continue
    argv = ["train", f"--config={CONFIG}", f"--config.algorithm={name}"]
    given = {"start_step": 0, **required}  # the config file's recipe starts at 10%
    argv += [f"--config.{k}={v}" for k, v in given.items() if k != key]
    c = harness.parse_config([*argv, f"--config.{key}={_flag(value)}"])
    kwargs = config.create_kwargs(c)
    assert kwargs[key] == value, key
    if name == "fixed":
      kwargs["masks"] = algo.config["masks"]
    assert jaxprune.create(name, **kwargs).config[key] == value, key
    checked += 1
  assert checked >= 1


def test_dst_options_and_rescale_init_are_config_keys():
  c = harness.parse_config(
    [
      "train",
      f"--config={CONFIG}",
      "--config.algorithm=set",
      "--config.sparsity=0.9",
      "--config.grow_init=random",
      "--config.drop_schedule=constant",
      "--config.rescale_init=True",
    ]
  )
  algo = config.create_algorithm(c)
  assert algo.config["grow_init"] == "random" and algo.config["drop_schedule"] == "constant"
  assert c.rescale_init is True


def test_forward_params_is_straight_through_for_ste_algorithms_only():
  params = {"Dense_0": {"kernel": jax.random.normal(jax.random.PRNGKey(0), (8, 4))}}
  assert steps.forward_params(jaxprune.create("rigl", sparsity=0.5, end_step=100)) is None
  algo = jaxprune.create("sr_ste", sparsity_type="2:4")
  forward = steps.forward_params(algo)
  sparse = forward(params)
  masks, _ = algo.init(params)
  np.testing.assert_array_equal(
    sparse["Dense_0"]["kernel"], jaxprune.apply_masks(params, masks)["Dense_0"]["kernel"]
  )
  assert int(jnp.sum(sparse["Dense_0"]["kernel"] == 0)) == 16
  # The gradient reaches every entry (straight-through), masked or not.
  grads = jax.grad(lambda p: jnp.sum(forward(p)["Dense_0"]["kernel"]))(params)
  np.testing.assert_array_equal(grads["Dense_0"]["kernel"], np.ones((8, 4)))


def test_variables_adds_batch_stats_only_when_there_are_some():
  assert steps.variables({"a": 1}, {}) == {"params": {"a": 1}}
  assert steps.variables({"a": 1}, {"b": 2}) == {"params": {"a": 1}, "batch_stats": {"b": 2}}


def test_cached_computes_once_and_recomputes_what_does_not_match(tmp_path):
  path = str(tmp_path / "sub" / "done.json")
  calls = []

  def compute():
    calls.append(1)
    return {"n": len(calls)}

  assert cache.cached(path, compute) == {"n": 1}
  assert cache.cached(path, compute) == {"n": 1} and len(calls) == 1
  assert cache.cached(path, compute, matches=lambda obj: obj["n"] > 1) == {"n": 2}
  assert cache.load(path) == {"n": 2} and not os.path.exists(path + ".tmp")
  assert cache.load(str(tmp_path / "missing.json")) is None
