"""Flax Linen models of the experiments.

Every model is called as `model.apply(variables, images, train=...)` on NHWC images
and returns logits; models with BatchNorm keep running statistics in the
"batch_stats" collection (pass `mutable=["batch_stats"]` when `train=True`).

- `MLP`: fully connected; the default 300-100 hidden widths are LeNet-300-100
  (LeCun et al., 1998), the standard pruning benchmark of Han et al. (2015).
- `CNN`: a small Conv -> BatchNorm -> ReLU stack then Dense, for Fashion-MNIST;
  one BatchNorm per conv so channels can be pruned and the model compacted.
- `WideResNet`: WRN-d-k of Zagoruyko & Komodakis (2016), "Wide Residual Networks"
  (pre-activation blocks); WRN-22-2 is the CIFAR model of RigL (Evci et al., 2020).
- `ResNet`: He et al. (2016), "Deep Residual Learning for Image Recognition";
  ResNet-18 with the CIFAR stem (3x3 conv, no max-pool) and ResNet-50 with the
  ImageNet stem (7x7/2 conv, 3x3/2 max-pool), stride on the 3x3 conv of bottleneck
  blocks ("v1.5", as in Goyal et al., 2017).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

ModuleDef = Any

# He-normal on fan-out for convolutions, as in He et al. (2015, "Delving Deep into
# Rectifiers") and torchvision's ResNets.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _batch_norm(train: bool, dtype: Any, **kwargs) -> ModuleDef:
  return functools.partial(
    nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, **kwargs
  )


class MLP(nn.Module):
  """Flatten, then Dense + ReLU for each width in `features`, then Dense logits."""

  features: Sequence[int] = (300, 100)
  num_classes: int = 10
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # No BatchNorm or dropout; accepted for a uniform signature.
    x = x.reshape((x.shape[0], -1)).astype(self.dtype)
    for width in self.features:
      x = nn.relu(nn.Dense(width, dtype=self.dtype)(x))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x)


class CNN(nn.Module):
  """[Conv 3x3 -> BatchNorm -> ReLU -> 2x2 max-pool] per entry of `channels`,
  then Dense(`hidden`) + ReLU and Dense logits."""

  channels: Sequence[int] = (32, 64)
  hidden: int = 128
  num_classes: int = 10
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = _batch_norm(train, self.dtype)
    x = x.astype(self.dtype)
    for c in self.channels:
      x = nn.Conv(c, (3, 3), use_bias=False, kernel_init=conv_init, dtype=self.dtype)(x)
      x = nn.relu(norm()(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype)(x))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x)


class WideBlock(nn.Module):
  """Pre-activation wide residual block: (BN, ReLU, conv3x3) x 2 plus shortcut."""

  filters: int
  strides: int
  norm: ModuleDef
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=conv_init, dtype=self.dtype)
    y = nn.relu(self.norm()(x))
    shortcut = x
    if x.shape[-1] != self.filters or self.strides != 1:
      # Projection from the pre-activated input, as in the reference WRN.
      shortcut = conv(self.filters, (1, 1), (self.strides, self.strides), name="shortcut")(y)
    y = conv(self.filters, (3, 3), (self.strides, self.strides))(y)
    y = nn.relu(self.norm()(y))
    y = conv(self.filters, (3, 3))(y)
    return y + shortcut


class WideResNet(nn.Module):
  """WRN-`depth`-`width` for 32x32 inputs; depth = 6n + 4 (n blocks per group)."""

  depth: int = 22
  width: int = 2
  num_classes: int = 10
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    if (self.depth - 4) % 6:
      raise ValueError(f"WideResNet depth must be 6n + 4, got {self.depth}.")
    blocks = (self.depth - 4) // 6
    norm = _batch_norm(train, self.dtype)
    x = nn.Conv(
      16, (3, 3), use_bias=False, kernel_init=conv_init, dtype=self.dtype, name="stem_conv"
    )(x.astype(self.dtype))
    for group, filters in enumerate((16 * self.width, 32 * self.width, 64 * self.width)):
      for i in range(blocks):
        strides = 2 if group > 0 and i == 0 else 1
        x = WideBlock(filters, strides, norm, self.dtype)(x)
    x = nn.relu(norm(name="final_bn")(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)


class ResNetBlock(nn.Module):
  """The fields of a ResNet block; `parts()` gives its conv and last BN scale init."""

  filters: int
  strides: int
  norm: ModuleDef
  zero_init_residual: bool = False
  dtype: Any = jnp.float32

  def parts(self):
    """`(conv, last_scale)`: bias-free He-initialised convs; the last BatchNorm's
    scale init (zeros with `zero_init_residual`, Goyal et al. 2017)."""
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=conv_init, dtype=self.dtype)
    last_scale = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    return conv, last_scale


class BasicBlock(ResNetBlock):
  """ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU."""

  @nn.compact
  def __call__(self, x):
    conv, last_scale = self.parts()
    y = conv(self.filters, (3, 3), (self.strides, self.strides))(x)
    y = nn.relu(self.norm()(y))
    y = conv(self.filters, (3, 3))(y)
    y = self.norm(scale_init=last_scale)(y)
    if x.shape[-1] != self.filters or self.strides != 1:
      x = conv(self.filters, (1, 1), (self.strides, self.strides), name="shortcut_conv")(x)
      x = self.norm(name="shortcut_bn")(x)
    return nn.relu(x + y)


class BottleneckBlock(ResNetBlock):
  """ResNet bottleneck: 1x1, 3x3 (strided), 1x1 (x4 expansion) plus shortcut."""

  @nn.compact
  def __call__(self, x):
    conv, last_scale = self.parts()
    y = nn.relu(self.norm()(conv(self.filters, (1, 1))(x)))
    y = conv(self.filters, (3, 3), (self.strides, self.strides))(y)
    y = nn.relu(self.norm()(y))
    y = self.norm(scale_init=last_scale)(conv(4 * self.filters, (1, 1))(y))
    if x.shape[-1] != 4 * self.filters or self.strides != 1:
      x = conv(4 * self.filters, (1, 1), (self.strides, self.strides), name="shortcut_conv")(x)
      x = self.norm(name="shortcut_bn")(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """ResNet with `stage_sizes` blocks per stage, widths num_filters * 2**stage.

  `stem="imagenet"`: 7x7/2 conv + 3x3/2 max-pool; `stem="cifar"`: one 3x3 conv.
  `zero_init_residual` starts each block's last BatchNorm scale at zero
  (Goyal et al., 2017), which helps very large batches.
  """

  stage_sizes: Sequence[int]
  block: str = "bottleneck"
  num_classes: int = 1000
  num_filters: int = 64
  stem: str = "imagenet"
  zero_init_residual: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    blocks = {"basic": BasicBlock, "bottleneck": BottleneckBlock}
    if self.block not in blocks:
      raise ValueError(f"Unknown block {self.block!r}; one of {sorted(blocks)}.")
    if self.stem not in ("imagenet", "cifar"):
      raise ValueError(f"Unknown stem {self.stem!r}; 'imagenet' or 'cifar'.")
    norm = _batch_norm(train, self.dtype)
    x = x.astype(self.dtype)
    imagenet = self.stem == "imagenet"  # 7x7 stride 2 and a max-pool; cifar: 3x3 stride 1
    x = nn.Conv(
      self.num_filters,
      (7, 7) if imagenet else (3, 3),
      (2, 2) if imagenet else (1, 1),
      padding=[(3, 3), (3, 3)] if imagenet else "SAME",
      use_bias=False,
      kernel_init=conv_init,
      dtype=self.dtype,
      name="stem_conv",
    )(x)
    x = nn.relu(norm(name="stem_bn")(x))
    if imagenet:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    block_cls = blocks[self.block]
    for stage, size in enumerate(self.stage_sizes):
      for i in range(size):
        strides = 2 if stage > 0 and i == 0 else 1
        x = block_cls(
          self.num_filters * 2**stage, strides, norm, self.zero_init_residual, self.dtype
        )(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block="basic")
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block="basic")
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block="bottleneck")
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block="bottleneck")

MODELS: dict[str, Callable[..., nn.Module]] = {
  "mlp": MLP,
  "cnn": CNN,
  "wrn": WideResNet,
  "resnet18": functools.partial(ResNet18, stem="cifar"),
  "resnet34": functools.partial(ResNet34, stem="cifar"),
  "resnet50": ResNet50,
  "resnet101": ResNet101,
}


def _field(config: Any, key: str, default: Any = None) -> Any:
  value = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
  return default if value is None else value


def get_model(config: Any, num_classes: int | None = None) -> nn.Module:
  """Builds `MODELS[config.model](num_classes=..., dtype=..., **config.model_kwargs)`.

  `num_classes` defaults to `config.num_classes`; `config.dtype` ("float32",
  "bfloat16", "float16") is the computation dtype (parameters stay float32).
  ResNet-18/34 here use the CIFAR stem; pass `stem="imagenet"` in
  `model_kwargs` for the ImageNet one.
  """
  name = _field(config, "model")
  if name not in MODELS:
    raise ValueError(f"Unknown model {name!r}; known: {sorted(MODELS)}.")
  num_classes = num_classes or _field(config, "num_classes")
  if not num_classes:
    raise ValueError("num_classes is needed (argument or config.num_classes).")
  dtype_name = _field(config, "dtype", "float32")
  if dtype_name not in DTYPES:
    raise ValueError(f"Unknown dtype {dtype_name!r}; one of {sorted(DTYPES)}.")
  kwargs = _field(config, "model_kwargs", {})
  kwargs = dict(kwargs.to_dict() if hasattr(kwargs, "to_dict") else kwargs)
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  return MODELS[name](num_classes=int(num_classes), dtype=DTYPES[dtype_name], **kwargs)


def init_variables(
  model: nn.Module, rng: jax.Array, input_shape: Sequence[int], batch_size: int = 1
) -> dict:
  """`model.init` on zeros of shape (batch_size, *input_shape), eval mode.

  Returns the variables dict: {"params": ...} and, with BatchNorm,
  {"batch_stats": ...}.
  """
  x = jnp.zeros((batch_size, *input_shape), jnp.float32)
  return jax.jit(functools.partial(model.init, train=False))(rng, x)
