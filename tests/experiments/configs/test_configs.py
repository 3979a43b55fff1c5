"""Tests of experiments/configs: loading, command-line overrides, helpers, recipes."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

import jaxprune
from experiments import configs, data, models
from experiments.configs import common

CONFIG_DIR = os.path.join(os.path.dirname(configs.__file__))
BASE_KEYS = set(common.base_config("x").keys())


def load_with_flags(name, *overrides):
  """Loads a config file the way the training script does, with overrides."""
  argv = ["train", f"--config={os.path.join(CONFIG_DIR, name + '.py')}", *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


@pytest.mark.parametrize("name", configs.NAMES)
def test_every_config_loads_with_all_keys(name):
  config = configs.get_config(name)
  assert set(config.keys()) == BASE_KEYS
  assert config.name == name
  assert config.distributed is False and config.model_parallel is False
  assert data.num_classes(config) == config.num_classes
  assert config.model in models.MODELS
  assert isinstance(models.get_model(config), models.nn.Module)
  assert 0 < config.end_step <= config.steps
  assert config.batch_size > 0 and config.eval_batch_size > 0
  kwargs = common.create_kwargs(config)
  assert None not in kwargs.values()
  assert kwargs["seed"] == config.seed and kwargs["sparsity"] == config.sparsity
  assert set(kwargs) <= set(common.ALGORITHM_KEYS) | {"seed"}
  # Docstrings cite their sources.
  module = __import__(f"experiments.configs.{name}", fromlist=["get_config"])
  assert re.search(r"et al\.,? \(?\d{4}", module.__doc__)


@pytest.mark.parametrize("name", configs.NAMES)
def test_config_file_loads_through_config_flags(name):
  config = load_with_flags(name)
  assert config.to_dict() == configs.get_config(name).to_dict()


def test_command_line_overrides():
  config = load_with_flags(
    "cifar10_wrn22_2",
    "--config.sparsity=0.95",
    "--config.steps=1000",
    "--config.include=Conv",
    "--config.model_kwargs.width=4",
    "--config.lr_decay_boundaries=(0.5,0.75)",
    "--config.data_dir=/data",
  )
  assert config.sparsity == 0.95
  assert config.steps == 1000 and config.end_step == 750  # end_step follows steps.
  assert config.include == "Conv" and config.model_kwargs.width == 4
  assert config.lr_decay_boundaries == (0.5, 0.75) and config.data_dir == "/data"
  assert common.create_kwargs(config)["include"] == "Conv"
  # An explicit end_step wins over the derived one.
  assert load_with_flags("fmnist_cnn", "--config.end_step=123").end_step == 123


def test_unknown_keys_and_bad_types_raise():
  with pytest.raises(Exception, match="not_a_key"):
    load_with_flags("fmnist_mlp", "--config.not_a_key=1")
  with pytest.raises(flags.IllegalFlagValueError, match="--config.sparsity=lots"):
    load_with_flags("fmnist_mlp", "--config.sparsity=lots")
  config = configs.get_config("fmnist_mlp")
  with pytest.raises(AttributeError):
    config.not_a_key  # noqa: B018
  with pytest.raises(ValueError, match="Unknown config"):
    configs.get_config("mnist_mlp")


def test_create_kwargs_skips_placeholders():
  config = common.base_config("x")
  assert common.create_kwargs(config) == {"seed": 0}
  config.drop_fraction = 0.5
  config.sparsity_type = "2:4"
  assert common.create_kwargs(config) == {"seed": 0, "drop_fraction": 0.5, "sparsity_type": "2:4"}


def test_rigl_cifar_recipe():
  for name, model in (("cifar10_wrn22_2", "wrn"), ("cifar10_resnet18", "resnet18")):
    c = configs.get_config(name)
    assert (c.dataset, c.model, c.batch_size, c.optimizer) == ("cifar10", model, 128, "sgd")
    assert (c.momentum, c.learning_rate, c.weight_decay) == (0.9, 0.1, 5e-4)
    assert (c.algorithm, c.update_every, c.drop_fraction) == ("rigl", 100, 0.3)
    assert c.end_step == int(0.75 * c.steps)
    schedule = common.learning_rate_schedule(c)
    np.testing.assert_allclose(
      [schedule(s) for s in (0, 29_999, 30_000, 60_000, 90_000)],
      [0.1, 0.1, 0.02, 0.004, 0.0008],
      rtol=1e-5,
    )
  assert configs.get_config("cifar10_wrn22_2").model_kwargs.to_dict() == {"depth": 22, "width": 2}


def test_rigl_imagenet_recipe():
  c = configs.get_config("imagenet_resnet50")
  assert (c.batch_size, c.steps, c.label_smoothing, c.weight_decay) == (4096, 32_000, 0.1, 1e-4)
  assert (c.optimizer, c.momentum) == ("sgd", 0.9)
  assert (c.update_every, c.drop_fraction, c.end_step) == (100, 0.3, 25_000)
  assert data.input_shape(c) == (224, 224, 3)
  schedule = common.learning_rate_schedule(c)
  steps_per_epoch = 1_281_167 / 4096
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(schedule(c.warmup_steps), 1.6, rtol=1e-5)
  np.testing.assert_allclose(schedule(c.warmup_steps // 2), 0.8, rtol=1e-2)
  np.testing.assert_allclose(schedule(int(31 * steps_per_epoch)), 0.16, rtol=1e-5)
  np.testing.assert_allclose(schedule(int(71 * steps_per_epoch)), 0.016, rtol=1e-5)
  np.testing.assert_allclose(schedule(31_999), 0.0016, rtol=1e-5)
  cosine = load_with_flags("imagenet_resnet50", "--config.lr_schedule=cosine")
  schedule = common.learning_rate_schedule(cosine)
  np.testing.assert_allclose(schedule(c.warmup_steps), 1.6, rtol=1e-5)
  assert float(schedule(32_000)) < 1e-6


def test_imagenet_include_keeps_only_the_stem_dense():
  c = configs.get_config("imagenet_resnet50")
  model = models.get_model(c)
  params = jax.eval_shape(
    lambda x: model.init(jax.random.key(0), x, train=False),
    jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32),
  )["params"]
  paths = ["/".join(str(k.key) for k in path) for path, _ in jax.tree.flatten_with_path(params)[0]]
  pattern = re.compile(c.include)
  kernels = [p for p in paths if p.endswith("kernel")]
  pruned = [p for p in paths if pattern.search(p)]
  assert len(kernels) == 54  # 53 convolutions and the dense head.
  assert set(kernels) - set(pruned) == {"stem_conv/kernel"}
  assert set(pruned) <= set(kernels)
  assert not pattern.search("params/stem_conv/kernel")
  assert pattern.search("params/head/kernel")


def test_lr_schedule_errors():
  c = common.base_config("x")
  c.lr_schedule = "linear"
  with pytest.raises(ValueError, match="lr_schedule"):
    common.learning_rate_schedule(c)
  c.lr_schedule, c.lr_decay_boundaries = "step", (30,)
  with pytest.raises(ValueError, match="fractions"):
    common.learning_rate_schedule(c)


def test_optimizer_weight_decay_only_on_kernels():
  params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
  zeros = jax.tree.map(jnp.zeros_like, params)
  for name in common.OPTIMIZERS:
    c = common.base_config("x")
    c.optimizer, c.weight_decay, c.learning_rate = name, 0.1, 0.5
    tx = common.optimizer(c)
    updates, _ = tx.update(zeros, tx.init(params), params)
    assert float(jnp.abs(updates["bias"]).max()) == 0.0
    assert float(updates["kernel"].max()) < 0.0  # Shrinks the kernel.
  c.optimizer = "lion"
  with pytest.raises(ValueError, match="optimizer"):
    common.optimizer(c)


@pytest.mark.parametrize("name", configs.NAMES)
def test_configs_are_accepted_by_jaxprune(name):
  config = configs.get_config(name)
  assert config.algorithm in jaxprune.REGISTRY, f"{name}: unknown algorithm {config.algorithm!r}"
  jaxprune.create(config.algorithm, **common.create_kwargs(config))


def test_every_create_key_is_a_config_key():
  """Any jaxprune.create key can be set under --config. (the lists cannot drift)."""
  import jaxprune.config as jcfg
  from experiments.configs import common as cfg_common

  keys = set(jaxprune.config_keys())
  assert set(jcfg.COMMON_KEYS) | {"axis", "grow_init", "drop_schedule", "reference"} <= keys
  settable = keys - set(cfg_common.NOT_ALGORITHM_CONFIG_KEYS)
  assert settable == set(cfg_common.ALGORITHM_KEYS)
  c = cfg_common.base_config("x")
  assert all(k in c for k in settable | {"seed"})
  for name in jaxprune.REGISTRY:  # each algorithm's own keys are among them
    assert set(jaxprune.config_keys(name)) <= keys


def test_dst_keys_pass_from_config_to_create():
  from experiments.configs import common as cfg_common

  c = cfg_common.base_config("x")
  c.algorithm, c.sparsity, c.end_step = "rigl", 0.9, 100
  c.reference, c.update_at_ends, c.drop_schedule, c.grow_init = (
    True,
    False,
    "cosine_from_start",
    "0.05",
  )
  kwargs = cfg_common.create_kwargs(c)
  assert kwargs["grow_init"] == 0.05 and kwargs["reference"] is True
  algo = jaxprune.create("rigl", **kwargs)
  assert algo.config["regrow_dropped"] and algo.config["skip_optimizer_step"]
  assert not algo.config["update_at_ends"] and algo.config["drop_schedule"] == "cosine_from_start"
