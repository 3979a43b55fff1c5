"""Shared defaults and helpers of the experiment configs.

Every recipe's `get_config()` starts from `base_config()` and changes what the paper
says. All keys exist in every config (typed, so `--config.key=value` overrides from
the command line are checked), unknown keys are rejected by `config_flags`, and
keys whose library default should apply hold typed `None` placeholders.

Schedules scale with `steps`: learning-rate decay boundaries are fractions of
`steps`, and recipes define `start_step` / `end_step` as lazy references to
`steps` (so `--config.steps=500` gives a short run with the same shape; they can
still be overridden directly).

Helpers: `create_kwargs(config)` -> keyword arguments of `jaxprune.create`;
`learning_rate_schedule(config)` and `optimizer(config)` -> optax objects.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax
from ml_collections import config_dict

from experiments.harness.config import (  # noqa: F401  (keys derived from jaxprune)
  ALGORITHM_KEYS,
  NOT_ALGORITHM_CONFIG_KEYS,
  create_kwargs,
)

SCHEDULES = ("constant", "step", "cosine")
OPTIMIZERS = ("sgd", "adam", "adamw")


def base_config(name: str) -> ml_collections.ConfigDict:
  """All keys with neutral defaults (dense training, Adam, constant lr)."""
  c = ml_collections.ConfigDict()
  c.name = name

  # Data (see experiments/data.py).
  c.dataset = "fashion_mnist"
  c.tfds_name = config_dict.placeholder(str)  # Override the TFDS name/version.
  c.data_dir = config_dict.placeholder(str)  # None: data.default_data_dir().
  c.image_size = config_dict.placeholder(int)  # None: the dataset's own size.
  c.num_classes = 10

  # Model (see experiments/models.py): MODELS[model](**model_kwargs).
  c.model = "mlp"
  c.model_kwargs = ml_collections.ConfigDict()
  c.dtype = "float32"  # Computation dtype: float32 | bfloat16 | float16.

  # Optimisation.
  c.batch_size = 128  # Global batch size (all hosts together).
  c.eval_batch_size = 1000
  c.steps = 1000
  c.optimizer = "adam"  # sgd | adam | adamw
  c.momentum = 0.9  # sgd only.
  c.nesterov = False  # sgd only.
  c.lr_schedule = "constant"  # constant | step | cosine (after linear warmup).
  c.learning_rate = 1e-3  # Peak learning rate.
  c.warmup_steps = 0
  c.lr_decay_boundaries = ()  # step: fractions of `steps` where lr *= factor.
  c.lr_decay_factor = 0.1
  c.weight_decay = 0.0  # L2 on kernels (ndim >= 2); decoupled for adamw.
  c.label_smoothing = 0.0

  # Loop.
  c.eval_every = 500
  c.log_every = 100
  c.checkpoint_every = 1000
  c.workdir = f"/tmp/jaxprune/{name}"
  c.seed = 0
  c.distributed = False  # jax.distributed.initialize() (multi-host pods).
  # Multi-process without cluster auto-detection (e.g. processes on CPU hosts):
  # set all three; they are passed to jax.distributed.initialize.
  c.coordinator_address = config_dict.placeholder(str)  # "HOST:PORT" of process 0.
  c.num_processes = config_dict.placeholder(int)
  c.process_id = config_dict.placeholder(int)
  c.model_parallel = False  # Shard parameters (and masks) over a model axis.

  # jaxprune: jaxprune.create(algorithm, **create_kwargs(config)).
  c.algorithm = "dense"
  c.sparsity = config_dict.placeholder(float)
  c.distribution = config_dict.placeholder(str)  # uniform | erk; None: default.
  c.include = config_dict.placeholder(str)  # Regex on parameter paths.
  c.start_step = config_dict.placeholder(int)
  c.end_step = config_dict.placeholder(int)
  c.update_every = config_dict.placeholder(int)
  c.drop_fraction = config_dict.placeholder(float)
  c.sparsity_type = config_dict.placeholder(str)  # unstructured | "N:M" ...
  c.initial_sparsity = config_dict.placeholder(float)  # gradual_magnitude only.
  c.power = config_dict.placeholder(float)  # gradual_magnitude only.
  c.axis = config_dict.placeholder(int)  # grouping axis of a structured sparsity_type.
  c.decay = config_dict.placeholder(float)  # sr_ste only.
  # set / rigl only: "zeros" | "random" | a float std written as a string ("0.01").
  c.grow_init = config_dict.placeholder(str)
  c.drop_schedule = config_dict.placeholder(str)  # cosine | cosine_from_start | constant
  c.reference = config_dict.placeholder(bool)  # the reference code's rules (docs/dst_reference.md)
  c.regrow_dropped = config_dict.placeholder(bool)
  c.skip_optimizer_step = config_dict.placeholder(bool)
  c.update_at_ends = config_dict.placeholder(bool)
  # Not a jaxprune.create key: jaxprune.rescale_init on the first masked params.
  c.rescale_init = False
  return c


def fashion_mnist_config(name: str, model: str, steps: int) -> ml_collections.ConfigDict:
  """Fashion-MNIST (Xiao et al., 2017, offline) recipes: `model` trained for
  `steps` with base_config's Adam, lr 1e-3, batch 128 and intervals."""
  c = base_config(name)
  c.dataset = "fashion_mnist"
  c.num_classes = 10
  c.model = model
  c.steps = steps
  return c


def fraction_of_steps(config: ml_collections.ConfigDict, fraction: float):
  """A lazy int reference `int(fraction * config.steps)`; follows `steps`."""
  return (config.get_ref("steps") * float(fraction)).to_int()


def learning_rate_schedule(config: Any) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate` over `warmup_steps`, then:

  - "constant": `learning_rate`;
  - "step": multiplied by `lr_decay_factor` at each fraction in
    `lr_decay_boundaries` of `steps` (Goyal et al., 2017, style);
  - "cosine": cosine decay to 0 at `steps` (Loshchilov & Hutter, 2017).
  """
  name, base = config.lr_schedule, float(config.learning_rate)
  steps, warmup = int(config.steps), int(config.warmup_steps)
  if name not in SCHEDULES:
    raise ValueError(f"Unknown lr_schedule {name!r}; one of {SCHEDULES}.")
  if not 0 <= warmup <= steps:
    raise ValueError(f"warmup_steps={warmup} must be in [0, steps={steps}].")
  if name == "constant":
    main = optax.constant_schedule(base)
  elif name == "step":
    scales: dict[int, float] = {}
    for fraction in config.lr_decay_boundaries:
      if not 0.0 < fraction < 1.0:
        raise ValueError(f"lr_decay_boundaries are fractions of steps in (0, 1), got {fraction}.")
      step = max(int(round(fraction * steps)) - warmup, 0)
      scales[step] = scales.get(step, 1.0) * float(config.lr_decay_factor)
    main = optax.piecewise_constant_schedule(base, scales)
  else:
    main = optax.cosine_decay_schedule(base, decay_steps=max(steps - warmup, 1))
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, base, warmup), main], boundaries=[warmup])


def _kernels(params):
  return jax.tree.map(lambda p: getattr(p, "ndim", 0) >= 2, params)


def optimizer(config: Any, schedule: optax.Schedule | None = None) -> optax.GradientTransformation:
  """The dense optax optimizer of the config (wrap it with `jaxprune.sparsify`).

  sgd: (Nesterov) momentum SGD; adam; adamw. For sgd and adam, `weight_decay` is
  an L2 penalty on kernels (ndim >= 2) added to the gradients, as in the papers;
  for adamw it is decoupled (Loshchilov & Hutter, 2019), also on kernels only.
  """
  lr = schedule if schedule is not None else learning_rate_schedule(config)
  name, wd = config.optimizer, float(config.weight_decay)
  if name not in OPTIMIZERS:
    raise ValueError(f"Unknown optimizer {name!r}; one of {OPTIMIZERS}.")
  if name == "adamw":
    return optax.adamw(lr, weight_decay=wd, mask=_kernels)
  if name == "sgd":
    inner = optax.sgd(lr, momentum=float(config.momentum) or None, nesterov=bool(config.nesterov))
  else:
    inner = optax.adam(lr)
  if wd == 0.0:
    return inner
  return optax.chain(optax.add_decayed_weights(wd, mask=_kernels), inner)


# The CIFAR-10 sparse-training recipe of RigL, shared by the CIFAR configs.
# Evci, Gale, Menick, Castro & Elsen (2020), "Rigging the Lottery: Making All
# Tickets Winners", ICML, CIFAR-10 setup (and its reference code): batch 128 for
# 97,656 steps (250 epochs), SGD with Nesterov momentum 0.9, lr 0.1 divided by 5 at
# steps 30k, 60k and 90k, L2 weight decay 5e-4, standard augmentation (4-pixel pad,
# random crop, horizontal flip; He et al., 2016). Sparse training: RigL with the ERK
# distribution, mask updates every 100 steps with drop fraction 0.3, ending at 75%
# of training.
CIFAR_STEPS = 97_656  # 250 epochs of 50,000 images at batch size 128.
CIFAR_LR_BOUNDARIES = tuple(b / CIFAR_STEPS for b in (30_000, 60_000, 90_000))


def use_rigl(
  c: ml_collections.ConfigDict, sparsity: float, end_fraction: float = 0.75
) -> ml_collections.ConfigDict:
  """RigL with the paper's hyper-parameters (Evci et al., 2020, "Rigging the
  Lottery: Making All Tickets Winners"): the ERK distribution, a mask update
  every 100 steps, drop fraction 0.3 (cosine decay), updates ending at
  `end_fraction` of the steps (a lazy reference: follows `c.steps`)."""
  c.algorithm = "rigl"
  c.sparsity = sparsity
  c.distribution = "erk"
  c.end_step = fraction_of_steps(c, end_fraction)
  c.update_every = 100
  c.drop_fraction = 0.3
  return c


def cifar10_rigl_config(name: str, model: str) -> ml_collections.ConfigDict:
  """The RigL CIFAR-10 recipe (see above) for `model`; add its model_kwargs."""
  c = base_config(name)
  c.dataset = "cifar10"
  c.num_classes = 10
  c.model = model
  c.eval_batch_size = 1000
  c.steps = CIFAR_STEPS
  return apply_rigl_cifar_recipe(c)


def apply_rigl_cifar_recipe(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Sets the recipe's optimisation and sparse-training keys (see above) on `c`;
  its learning-rate boundaries and `end_step` follow `c.steps`."""
  c.batch_size = 128
  c.optimizer = "sgd"
  c.momentum = 0.9
  c.nesterov = True
  c.learning_rate = 0.1
  c.lr_schedule = "step"
  c.lr_decay_boundaries = CIFAR_LR_BOUNDARIES
  c.lr_decay_factor = 0.2
  c.weight_decay = 5e-4

  c.eval_every = 2_000  # log_every, checkpoint_every: base_config's
  return use_rigl(c, sparsity=0.9)
