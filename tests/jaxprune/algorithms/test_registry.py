"""The typed algorithm factories, the registry over them and ``Algorithm.family``."""

import inspect

import jax.numpy as jnp
import pytest

import jaxprune
from jaxprune import config as config_lib

FACTORIES = {
  "dense": jaxprune.dense,
  "magnitude": jaxprune.magnitude,
  "gradual_magnitude": jaxprune.gradual_magnitude,
  "global_magnitude": jaxprune.global_magnitude,
  "random": jaxprune.random,
  "static": jaxprune.static,
  "fixed": jaxprune.fixed,
  "saliency": jaxprune.saliency,
  "global_saliency": jaxprune.global_saliency,
  "ste": jaxprune.ste,
  "sr_ste": jaxprune.sr_ste,
  "set": jaxprune.set_,
  "rigl": jaxprune.rigl,
}
FAMILIES = {
  "dense": "dense",
  "magnitude": "magnitude",
  "gradual_magnitude": "magnitude",
  "global_magnitude": "magnitude",
  "random": "random",
  "static": "static",
  "fixed": "fixed",
  "saliency": "saliency",
  "global_saliency": "saliency",
  "ste": "ste",
  "sr_ste": "ste",
  "set": "dst",
  "rigl": "dst",
}
CONFIG = dict(sparsity=0.5, end_step=10)


def test_every_registered_name_has_its_exported_typed_factory():
  assert {n: jaxprune.REGISTRY[n] for n in FACTORIES} == FACTORIES


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_factories_take_only_typed_keyword_only_arguments(name):
  params = inspect.signature(FACTORIES[name]).parameters.values()
  assert params and all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params)
  assert all(p.annotation is not inspect.Parameter.empty for p in params)
  with pytest.raises(TypeError):
    FACTORIES[name](0.5)  # no positional arguments


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_config_keys_are_the_signature_and_every_common_key(name):
  keys = jaxprune.config_keys(name)
  assert keys == tuple(inspect.signature(FACTORIES[name]).parameters)
  assert set(config_lib.COMMON_KEYS) | set(config_lib.STRUCTURED_KEYS) <= set(keys)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_create_is_the_factory_and_sets_the_family(name):
  by_name, direct = jaxprune.create(name, **CONFIG), FACTORIES[name](**CONFIG)
  assert by_name.name == direct.name == name
  assert by_name.config == direct.config
  assert by_name.family == FAMILIES[name]


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_signature_defaults_fill_the_config_and_none_means_default(name):
  sig = inspect.signature(FACTORIES[name]).parameters
  algo = jaxprune.create(name, **CONFIG, update_every=None, seed=None)
  for key in ("distribution", "update_every", "seed", "start_step", "axis"):
    assert algo.config[key] == sig[key].default, key


def test_defaults_follow_the_contract():
  for name in ("magnitude", "gradual_magnitude", "global_magnitude", "random"):
    assert jaxprune.create(name, **CONFIG).config["distribution"] == "uniform"
  for name in ("static", "set", "rigl"):
    assert jaxprune.create(name, **CONFIG).config["distribution"] == "erk"


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_unknown_keys_name_the_key_and_the_algorithm(name):
  with pytest.raises(ValueError, match=rf"^{name}: unknown config key\(s\) 'sparsty'"):
    jaxprune.create(name, sparsty=0.5)
  with pytest.raises(TypeError, match="sparsty"):
    FACTORIES[name](sparsty=0.5)


def test_out_of_range_values_name_the_key_in_the_typed_factory():
  with pytest.raises(ValueError, match="drop_fraction"):
    jaxprune.rigl(sparsity=0.9, end_step=10, drop_fraction=1.5)
  with pytest.raises(ValueError, match="sparsity"):
    jaxprune.magnitude(sparsity=1.0)


def test_a_pattern_object_is_stored_as_its_string():
  pattern = jaxprune.structured.parse_sparsity_type("2:4")
  algo = jaxprune.magnitude(sparsity_type=pattern)
  assert algo.config["sparsity_type"] == "2:4"


def test_register_reads_keys_from_a_typed_signature_and_keeps_kwargs_factories():
  def mine(*, sparsity: float = 0.5, spice: int = 1) -> jaxprune.Algorithm:
    d = jaxprune.dense()
    return jaxprune.Algorithm("mine", dict(sparsity=sparsity, spice=spice), d.init, *d[3:5])

  def legacy(**config):
    return jaxprune.dense()._replace(name="legacy", config=config)

  try:
    jaxprune.register("mine", mine)
    jaxprune.register("legacy", legacy, keys=("spice",))
    assert jaxprune.config_keys("mine") == ("sparsity", "spice")
    assert "spice" in jaxprune.config_keys("legacy")
    assert "spice" in jaxprune.config_keys()
    assert jaxprune.create("mine", spice=2).config["spice"] == 2
    assert jaxprune.create("mine").family == "custom"
    with pytest.raises(ValueError, match="mine: unknown config key"):
      jaxprune.create("mine", salt=1)
    assert jaxprune.create("legacy", salt=1).config == {"salt": 1}  # checks its own keys
  finally:
    jaxprune.REGISTRY.pop("mine", None)
    jaxprune.REGISTRY.pop("legacy", None)


def test_typed_factory_trains_like_create():
  params = {"w": jnp.arange(16.0).reshape(4, 4)}
  a = jaxprune.magnitude(sparsity=0.5).update(0, params, params, {"w": jnp.ones((4, 4), bool)}, ())
  b = jaxprune.create("magnitude", sparsity=0.5).update(
    0, params, params, {"w": jnp.ones((4, 4), bool)}, ()
  )
  want = jnp.arange(16).reshape(4, 4) >= 8  # the 8 largest of 0..15 kept
  assert bool(jnp.all(a[0]["w"] == want)) and bool(jnp.all(b[0]["w"] == want))
