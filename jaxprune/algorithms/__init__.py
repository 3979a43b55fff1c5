"""Algorithm registry: ``jaxprune.create(name, **config)``."""

from __future__ import annotations

from typing import Callable, Iterable

from jaxprune.algorithms.base import Algorithm
from jaxprune.algorithms.dst import EXTRA_KEYS as DST_KEYS
from jaxprune.algorithms.dst import rigl, set_
from jaxprune.algorithms.magnitude import (
  GRADUAL_KEYS,
  global_magnitude,
  gradual_magnitude,
  magnitude,
)
from jaxprune.algorithms.random import FIXED_KEYS, dense, fixed, random, static
from jaxprune.algorithms.saliency import global_saliency, saliency
from jaxprune.algorithms.ste import SR_STE_KEYS, sr_ste, ste
from jaxprune.config import COMMON_KEYS, STRUCTURED_KEYS

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


# Config keys each algorithm accepts beyond COMMON_KEYS and STRUCTURED_KEYS: the
# same dicts its factory validates with, so this table cannot drift from them.
EXTRA_KEYS: dict[str, tuple[str, ...]] = {
  "gradual_magnitude": tuple(GRADUAL_KEYS),
  "saliency": tuple(GRADUAL_KEYS),
  "fixed": tuple(FIXED_KEYS),
  "sr_ste": tuple(SR_STE_KEYS),
  "set": tuple(DST_KEYS),
  "rigl": tuple(DST_KEYS),
}


def register(name: str, factory: Callable[..., Algorithm], keys: Iterable[str] = ()) -> None:
  """Adds an algorithm under ``name`` (``factory(**config) -> Algorithm``);
  ``keys``: the config keys it accepts beyond the common ones."""
  REGISTRY[name] = factory
  EXTRA_KEYS[name] = tuple(keys)


def config_keys(name: str | None = None) -> tuple[str, ...]:
  """Config keys ``jaxprune.create(name, ...)`` accepts; with no name, the
  union over every registered algorithm (what an experiment config may set)."""
  if name is not None and name not in REGISTRY:
    raise ValueError(f"unknown algorithm {name!r}; valid names are: {', '.join(sorted(REGISTRY))}")
  extras = EXTRA_KEYS.get(name, ()) if name is not None else sum(EXTRA_KEYS.values(), ())
  return tuple(dict.fromkeys((*COMMON_KEYS, *STRUCTURED_KEYS, *extras)))


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
