"""Experiment recipes as `ml_collections` configs; each module has `get_config()`.

Load one by path with `ml_collections.config_flags` (e.g.
`--config=experiments/configs/cifar10_wrn22_2.py --config.sparsity=0.95`) or by
name with `get_config(name)`.
"""

from __future__ import annotations

import importlib

import ml_collections

NAMES = ("fmnist_mlp", "fmnist_cnn", "cifar10_wrn22_2", "cifar10_resnet18", "imagenet_resnet50")


def get_config(name: str) -> ml_collections.ConfigDict:
  """The config of recipe `name` (one of `NAMES`)."""
  if name not in NAMES:
    raise ValueError(f"Unknown config {name!r}; one of {NAMES}.")
  return importlib.import_module(f"experiments.configs.{name}").get_config()
