"""Tests of experiments/models.py: shapes, parameter counts, BatchNorm state."""

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments import models

# The "rbg" generator compiles much faster than threefry on CPU; the random
# initialisers behave the same.
RBG_KEY = jax.random.key(0, impl="rbg")


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def abstract_variables(model, shape):
  x = jax.ShapeDtypeStruct((2, *shape), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


def quick_variables(model, shape, seed=0):
  """Variables of the right structure from numpy (fan-in scaled normal kernels).

  Avoids compiling the random initialisers, which is slow on a busy CPU; the
  real initialisation is exercised separately on the MLP.
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if "kernel" in name:
      fan_in = int(np.prod(leaf.shape[:-1]))
      kernel = rng.standard_normal(leaf.shape, dtype=np.float32)
      return jnp.asarray(kernel / np.float32(np.sqrt(fan_in)))
    if "scale" in name or "var" in name:
      return jnp.ones(leaf.shape, jnp.float32)
    return jnp.zeros(leaf.shape, jnp.float32)

  return jax.tree.map_with_path(fill, abstract_variables(model, shape))


def forward(model, train=False):
  """Jitted apply (compiling once is faster than op-by-op dispatch here)."""
  if train:
    return jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
  return jax.jit(lambda v, x: model.apply(v, x, train=False))


def images(shape, batch=2, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, *shape)), jnp.float32)


@pytest.mark.parametrize(
  "name, shape, num_classes, params",
  [
    ("mlp", (28, 28, 1), 10, 266_610),  # LeNet-300-100.
    ("cnn", (28, 28, 1), 10, 421_738),
    ("wrn", (32, 32, 3), 10, 1_079_642),  # WRN-22-2.
    ("resnet18", (32, 32, 3), 10, 11_173_962),  # CIFAR ResNet-18.
    ("resnet50", (64, 64, 3), 1000, 25_557_032),  # As torchvision's resnet50.
  ],
)
def test_parameter_counts_and_output_shapes(name, shape, num_classes, params):
  kwargs = {"wrn": {"depth": 22, "width": 2}}.get(name, {})
  model = models.get_model({"model": name, "num_classes": num_classes, "model_kwargs": kwargs})
  variables = abstract_variables(model, shape)
  assert count(variables["params"]) == params
  assert ("batch_stats" in variables) == (name != "mlp")
  out = jax.eval_shape(
    lambda v, x: model.apply(v, x, train=False),
    variables,
    jax.ShapeDtypeStruct((2, *shape), jnp.float32),
  )
  assert out.shape == (2, num_classes)


def test_mlp_real_init_and_forward():
  model = models.MLP(features=(300, 100), num_classes=10)
  variables = models.init_variables(model, RBG_KEY, (28, 28, 1))
  shapes = {k: v["kernel"].shape for k, v in variables["params"].items()}
  assert shapes == {"Dense_0": (784, 300), "Dense_1": (300, 100), "Dense_2": (100, 10)}
  assert set(variables) == {"params"}
  logits = model.apply(variables, images((28, 28, 1)), train=True)
  assert logits.shape == (2, 10) and bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize(
  "name, shape, num_classes",
  [
    ("wrn", (32, 32, 3), 10),
    ("resnet18", (32, 32, 3), 10),
    ("resnet50", (32, 32, 3), 1000),
  ],
)
def test_forward_eval_mode(name, shape, num_classes):
  model = models.get_model({"model": name, "num_classes": num_classes})
  variables = quick_variables(model, shape)
  logits = forward(model)(variables, images(shape))
  assert logits.shape == (2, num_classes) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))


def test_batchnorm_state_in_train_and_eval_mode():
  model = models.CNN(channels=(4, 8), hidden=16, num_classes=10)
  shape = (28, 28, 1)
  variables = quick_variables(model, shape)
  x = images(shape, batch=4)

  train_fn, eval_fn = forward(model, train=True), forward(model)
  logits, updates = train_fn(variables, x)
  assert logits.shape == (4, 10)
  old, new = variables["batch_stats"], updates["batch_stats"]
  assert jax.tree.structure(old) == jax.tree.structure(new)
  # Running averages moved towards the batch statistics (momentum 0.9).
  assert not np.allclose(new["BatchNorm_0"]["mean"], old["BatchNorm_0"]["mean"])
  conv = jax.lax.conv_general_dilated(
    x,
    variables["params"]["Conv_0"]["kernel"],
    (1, 1),
    "SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  np.testing.assert_allclose(
    new["BatchNorm_0"]["mean"], 0.1 * conv.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6
  )

  # Eval mode uses the running statistics: an example's logits do not depend on
  # the rest of the batch; in train mode they do.
  updated = {"params": variables["params"], "batch_stats": new}
  eval_all = eval_fn(updated, x)
  eval_one = eval_fn(updated, jnp.concatenate([x[:1], x[:1] * 0 + 5.0]))
  np.testing.assert_allclose(eval_all[:1], eval_one[:1], rtol=1e-5, atol=1e-5)
  train_one, _ = train_fn(updated, jnp.concatenate([x[:1], x[:1] * 0 + 5.0]))
  assert not np.allclose(train_one[:1], logits[:1], atol=1e-4)
  # Train mode needs a mutable batch_stats.
  with pytest.raises(flax.errors.ModifyScopeVariableError, match="batch_stats"):
    model.apply(updated, x, train=True)


def test_bottleneck_resnet_train_mode():
  """ImageNet stem, max-pool, bottleneck blocks and projection shortcuts, training."""
  model = models.ResNet(
    stage_sizes=(1, 1), block="bottleneck", num_filters=4, stem="imagenet", num_classes=3
  )
  variables = quick_variables(model, (16, 16, 3))
  logits, updates = forward(model, train=True)(variables, images((16, 16, 3)))
  assert logits.shape == (2, 3) and bool(jnp.all(jnp.isfinite(logits)))
  assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(variables["batch_stats"])


def test_zero_init_residual_zeroes_last_batchnorm_scale():
  model = models.ResNet(
    stage_sizes=(1,), block="bottleneck", num_filters=4, num_classes=3, zero_init_residual=True
  )
  variables = models.init_variables(model, RBG_KEY, (16, 16, 3))
  block = variables["params"]["BottleneckBlock_0"]
  assert float(jnp.abs(block["BatchNorm_2"]["scale"]).max()) == 0.0
  assert float(block["BatchNorm_0"]["scale"].min()) == 1.0


def test_get_model_from_config_dict_and_errors():
  config = ml_collections.ConfigDict(
    {"model": "mlp", "num_classes": 7, "dtype": "bfloat16", "model_kwargs": {"features": (5,)}}
  )
  model = models.get_model(config)
  assert isinstance(model, models.MLP)
  assert model.features == (5,) and model.num_classes == 7
  assert model.dtype == jnp.bfloat16
  assert models.get_model(config, num_classes=3).num_classes == 3
  resnet = models.get_model({"model": "resnet50", "num_classes": 1000})
  assert (
    resnet.stem == "imagenet" and "stem_conv" in abstract_variables(resnet, (32, 32, 3))["params"]
  )
  assert models.get_model({"model": "resnet18", "num_classes": 10}).stem == "cifar"
  with pytest.raises(ValueError, match="Unknown model"):
    models.get_model({"model": "vgg", "num_classes": 10})
  with pytest.raises(ValueError, match="dtype"):
    models.get_model({"model": "mlp", "num_classes": 10, "dtype": "int8"})
  with pytest.raises(ValueError, match="6n"):
    abstract_variables(models.WideResNet(depth=12), (32, 32, 3))
