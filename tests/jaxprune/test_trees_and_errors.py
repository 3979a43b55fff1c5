import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import assert_zeros_where_masked

import jaxprune


def _run(params, loss_fn, algo, steps=6):
  tx = jaxprune.sparsify(optax.adam(1e-2), algo)
  state = tx.init(params)
  params = jaxprune.apply_masks(params, jaxprune.get_masks(state))

  @jax.jit
  def step(p, s):
    g = jax.grad(loss_fn)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  for _ in range(steps):
    params, state = step(params, state)
  masks = jaxprune.get_masks(state)
  assert jax.tree.structure(masks) == jax.tree.structure(params)
  assert_zeros_where_masked(params, masks)
  return params, masks


def test_plain_dict_params():
  params = {
    "w": jax.random.normal(jax.random.PRNGKey(0), (8, 5)),
    "b": jnp.zeros(5),
    "scale": jnp.float32(1.0),
  }
  loss_fn = lambda p: jnp.sum((jnp.ones((2, 8)) @ p["w"] * p["scale"] + p["b"]) ** 2)
  params, masks = _run(params, loss_fn, jaxprune.create("magnitude", sparsity=0.6))
  assert np.asarray(masks["w"]).sum() == 40 - 24
  assert masks["b"].shape == () and bool(masks["b"])
  assert masks["scale"].shape == ()


def test_flax_nnx_state():
  class Model(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(6, 10, rngs=rngs)
      self.l2 = nnx.Linear(10, 3, rngs=rngs)

    def __call__(self, x):
      return self.l2(nnx.relu(self.l1(x)))

  graphdef, state = nnx.split(Model(nnx.Rngs(0)), nnx.Param)
  x = jnp.ones((4, 6))
  loss_fn = lambda s: jnp.mean(nnx.merge(graphdef, s)(x) ** 2)
  algo = jaxprune.create("gradual_magnitude", sparsity=0.5, end_step=4, update_every=2)
  params, masks = _run(state, loss_fn, algo)
  rows = {r.path: r for r in jaxprune.summary(params, masks).rows}
  assert rows["l1/kernel"].nonzeros == 30 and rows["l2/kernel"].nonzeros == 15
  assert rows["l1/bias"].sparsity == 0.0


def test_flax_linen_conv_params():
  class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(4, (3, 3))(x))
      return nn.Dense(2)(x.reshape(x.shape[0], -1))

  m = CNN()
  params = m.init(jax.random.PRNGKey(0), jnp.ones((1, 5, 5, 1)))
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 5, 5, 1))
  loss_fn = lambda p: jnp.mean(m.apply(p, x) ** 2)
  params, masks = _run(params, loss_fn, jaxprune.create("static", sparsity=0.8))
  s = jaxprune.summary(params, masks).total
  assert 0.5 < s.sparsity < 0.85


# --- bad input -----------------------------------------------------------------


@pytest.mark.parametrize("value", [1.0, -0.1, 1.5, float("nan")])
def test_sparsity_out_of_range(value):
  with pytest.raises(ValueError, match="sparsity"):
    jaxprune.create("magnitude", sparsity=value)


def test_sparsity_wrong_type():
  with pytest.raises(TypeError, match="sparsity"):
    jaxprune.create("magnitude", sparsity="0.5")


def test_unknown_algorithm_lists_valid_names():
  with pytest.raises(ValueError, match="unknown algorithm 'rig'.*gradual_magnitude.*magnitude"):
    jaxprune.create("rig", sparsity=0.5)


def test_unknown_key_lists_valid_keys():
  with pytest.raises(ValueError, match="'sparsty'.*valid keys.*sparsity"):
    jaxprune.create("magnitude", sparsty=0.5)


def test_common_keys_accepted_by_every_algorithm():
  common = dict(
    sparsity=0.5,
    distribution="uniform",
    include=None,
    start_step=0,
    end_step=10,
    update_every=5,
    drop_fraction=0.3,
    seed=1,
    sparsity_type="unstructured",
  )
  for name in jaxprune.REGISTRY:
    assert jaxprune.create(name, **common).name == name


def test_end_step_before_start_step():
  with pytest.raises(ValueError, match="end_step"):
    jaxprune.create("gradual_magnitude", sparsity=0.5, start_step=10, end_step=5)


@pytest.mark.parametrize("value", [0, -3])
def test_update_every_not_positive(value):
  with pytest.raises(ValueError, match="update_every"):
    jaxprune.create("gradual_magnitude", sparsity=0.5, end_step=10, update_every=value)


def test_missing_required_keys():
  with pytest.raises(ValueError, match="'sparsity' is required"):
    jaxprune.create("magnitude")
  with pytest.raises(ValueError, match="'end_step' is required"):
    jaxprune.create("gradual_magnitude", sparsity=0.5)


def test_include_matching_nothing_names_paths():
  algo = jaxprune.create("magnitude", sparsity=0.5, include="Conv_9/kernel")
  with pytest.raises(ValueError, match="matched no parameter.*Dense_0/kernel"):
    jaxprune.sparsify(optax.sgd(0.1), algo).init({"Dense_0": {"kernel": jnp.ones((2, 2))}})


def test_integer_leaf_selected_for_pruning():
  algo = jaxprune.create("magnitude", sparsity=0.5, include="counts")
  params = {"counts": jnp.ones((3, 3), jnp.int32), "w": jnp.ones((3, 3))}
  with pytest.raises(TypeError, match="'counts'.*int32"):
    jaxprune.sparsify(optax.sgd(0.1), algo).init(params)


def test_default_include_skips_integer_leaves():
  params = {"counts": jnp.ones((3, 3), jnp.int32), "w": jnp.ones((3, 3))}
  masks, _ = jaxprune.create("magnitude", sparsity=0.5).init(params)
  assert masks["counts"].shape == () and masks["w"].shape == (3, 3)


def test_mask_tree_mismatch_names_path():
  params = {"a": jnp.ones((2, 2)), "b": {"c": jnp.ones((3,))}}
  with pytest.raises(ValueError, match="'b/c'.*'b/d'"):
    jaxprune.apply_masks(params, {"a": jnp.ones((2, 2), bool), "b": {"d": jnp.ones((3,), bool)}})
  with pytest.raises(ValueError, match="'b/c'.*shape"):
    jaxprune.apply_masks(params, {"a": jnp.ones((2, 2), bool), "b": {"c": jnp.ones((4,), bool)}})
  with pytest.raises(ValueError, match="only params have 'b/c'"):
    jaxprune.apply_masks(params, {"a": jnp.ones((2, 2), bool), "b": {}})


def test_bad_distribution_and_include_types():
  with pytest.raises(ValueError, match="distribution"):
    jaxprune.create("magnitude", sparsity=0.5, distribution="gaussian")
  with pytest.raises(ValueError, match="include"):
    jaxprune.create("magnitude", sparsity=0.5, include="(")
  with pytest.raises(TypeError, match="include"):
    jaxprune.create("magnitude", sparsity=0.5, include=3)


def test_summary_table_and_totals():
  params = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0]]), "b": jnp.array([0.0, 1.0])}
  s = jaxprune.summary(params)
  assert s.total.size == 6 and s.total.nonzeros == 3
  text = str(s)
  assert "w" in text and "0.5000" in text and "total" in text


def test_gradual_extra_keys_validated():
  with pytest.raises(ValueError, match="initial_sparsity"):
    jaxprune.create("gradual_magnitude", sparsity=0.5, end_step=10, initial_sparsity=1.2)
  with pytest.raises(ValueError, match="power"):
    jaxprune.create("gradual_magnitude", sparsity=0.5, end_step=10, power=0)
  with pytest.raises(ValueError, match="'power'"):
    jaxprune.create("rigl", sparsity=0.5, end_step=10, power=3)  # not a rigl key


@pytest.mark.parametrize("name", ["magnitude", "gradual_magnitude", "random", "static", "rigl"])
@pytest.mark.parametrize("stype", ["neuron", "channel", "block:4x4", "unstructured"])
def test_structured_types_without_sparsity_name_it(name, stype):
  with pytest.raises(ValueError, match="'sparsity' is required"):
    jaxprune.create(name, sparsity_type=stype, end_step=10)
  jaxprune.create(name, sparsity_type="2:4", end_step=10)  # N:M implies its sparsity


@pytest.mark.parametrize("stype, axis", [("2:4", 5), ("neuron", 2), ("channel", -3)])
def test_out_of_range_axis_names_axis_and_leaf(stype, axis):
  params = {"Dense_0": {"kernel": jnp.ones((8, 8)), "bias": jnp.ones((8,))}}
  algo = jaxprune.create("magnitude", sparsity=0.5, sparsity_type=stype, axis=axis)
  with pytest.raises(ValueError, match=rf"axis={axis} is out of range for 'Dense_0/kernel'"):
    jaxprune.sparsify(optax.sgd(0.1), algo).init(params)


def test_initial_sparsity_above_sparsity_names_it():
  with pytest.raises(ValueError, match="initial_sparsity"):
    jaxprune.create("gradual_magnitude", sparsity=0.5, initial_sparsity=0.6, end_step=10)
  with pytest.raises(ValueError, match="initial_sparsity"):  # 2:4 implies 0.5
    jaxprune.create("gradual_magnitude", sparsity_type="2:4", initial_sparsity=0.75, end_step=10)
  jaxprune.create("gradual_magnitude", sparsity=0.5, initial_sparsity=0.5, end_step=10)


@pytest.mark.parametrize(
  "result, match",
  [
    ({"a": {"kernel": 1.0}, "b": 0.0}, r"returned sparsity 1.0 for 'a/kernel'"),
    ({"a": {"kernel": -0.1}, "b": 0.0}, r"returned sparsity -0.1 for 'a/kernel'"),
    ({"a": {"kernel": float("nan")}, "b": 0.0}, r"returned sparsity nan for 'a/kernel'"),
    ({"a": {"kernel": 0.5}}, "does not match the params"),
    ({"a": 0.5, "b": 0.0}, "does not match the params"),
    ({"a": {"kernel": "0.5"}, "b": 0.0}, r"returned '0.5' for 'a/kernel'"),
  ],
)
def test_callable_distribution_is_validated(result, match):
  params = {"a": {"kernel": jnp.ones((8, 8))}, "b": jnp.ones((8,))}

  def my_distribution(params, sparsity, include):
    return result

  algo = jaxprune.create("magnitude", sparsity=0.5, distribution=my_distribution)
  with pytest.raises(ValueError, match="distribution 'my_distribution'") as e:
    jaxprune.sparsify(optax.sgd(0.1), algo).init(params)
  e.match(match)


def test_callable_distribution_accepts_array_scalars():
  params = {"a": {"kernel": jnp.ones((8, 8))}, "b": jnp.ones((8,))}
  dist = lambda p, s, i: {"a": {"kernel": np.float32(0.25)}, "b": np.float64(0.0)}
  tx = jaxprune.sparsify(
    optax.sgd(0.1), jaxprune.create("magnitude", sparsity=0.5, distribution=dist)
  )
  state = tx.init(params)
  _, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  assert int(np.sum(jaxprune.get_masks(state)["a"]["kernel"])) == 64 - 16
