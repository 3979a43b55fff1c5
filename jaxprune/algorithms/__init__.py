"""Algorithm registry: ``jaxprune.create(name, **config)``."""

from __future__ import annotations

from typing import Callable

from jaxprune.algorithms.base import Algorithm
from jaxprune.algorithms.dst import rigl, set_
from jaxprune.algorithms.magnitude import global_magnitude, gradual_magnitude, magnitude
from jaxprune.algorithms.random import dense, fixed, random, static
from jaxprune.algorithms.saliency import global_saliency, saliency
from jaxprune.algorithms.ste import sr_ste, ste

REGISTRY: dict[str, Callable[..., Algorithm]] = {
  "dense": dense,
  "magnitude": magnitude,
  "gradual_magnitude": gradual_magnitude,
  "global_magnitude": global_magnitude,
  "random": random,
  "static": static,
  "fixed": fixed,
  "saliency": saliency,
  "global_saliency": global_saliency,
  "ste": ste,
  "sr_ste": sr_ste,
  "set": set_,
  "rigl": rigl,
}
"""Algorithm factories by name: what ``create(name, **config)`` looks up; extend with
``register``."""


def register(name: str, factory: Callable[..., Algorithm]) -> None:
  """Adds an algorithm under ``name`` (``factory(**config) -> Algorithm``)."""
  REGISTRY[name] = factory


def create(name: str, **config) -> Algorithm:
  """Builds the algorithm ``name`` from config keys.

  The names and their common keys are listed in the training-time sparsity
  guide (``docs/training.md``) and the API reference.

  Raises ValueError for an unknown name (listing the valid ones), unknown
  config keys and out-of-range values, each naming the key.

  Examples:
    >>> algo = create("gradual_magnitude", sparsity=0.9, end_step=1000)
    >>> algo.name, algo.config["sparsity"], algo.config["distribution"]
    ('gradual_magnitude', 0.9, 'uniform')
    >>> create("gradual_magnitude", sparsity=0.9, end_step=1000, update_evry=100)
    Traceback (most recent call last):
      ...
    ValueError: gradual_magnitude: unknown config key(s) 'update_evry'; valid keys are: ...
  """
  if name not in REGISTRY:
    raise ValueError(f"unknown algorithm {name!r}; valid names are: {', '.join(sorted(REGISTRY))}")
  return REGISTRY[name](**config)
