"""Algorithm registry: ``jaxprune.create(name, **config)`` over the typed factories.

Every training-time algorithm is a function with keyword-only, typed arguments
returning an :class:`Algorithm` (``jaxprune.rigl(sparsity=0.9, end_step=1000)``);
``create`` looks the function up by name. The config keys an algorithm accepts
are its factory's signature (:func:`config_keys`), so they cannot drift apart.
"""

from __future__ import annotations

from typing import Callable, Iterable

from jaxprune.algorithms.base import Algorithm
from jaxprune.algorithms.dst import rigl, set_
from jaxprune.algorithms.magnitude import global_magnitude, gradual_magnitude, magnitude
from jaxprune.algorithms.random import dense, fixed, random, static
from jaxprune.algorithms.saliency import global_saliency, saliency
from jaxprune.algorithms.ste import sr_ste, ste
from jaxprune.config import COMMON_KEYS, STRUCTURED_KEYS, check_known, signature_keys

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

# Keys of factories registered with ``**config`` (no typed signature to read them from).
_DECLARED_KEYS: dict[str, tuple[str, ...]] = {}


def register(name: str, factory: Callable[..., Algorithm], keys: Iterable[str] = ()) -> None:
  """Adds an algorithm under ``name``.

  ``factory`` is best a function with keyword-only arguments (its signature is
  then the list of config keys, as for the built-in algorithms); a factory
  taking ``**config`` checks its own keys, and ``keys`` names those it accepts
  beyond the common ones (for :func:`config_keys`).
  """
  REGISTRY[name] = factory
  _DECLARED_KEYS[name] = tuple(keys)


def _check_name(name: str) -> None:
  if name not in REGISTRY:
    raise ValueError(f"unknown algorithm {name!r}; valid names are: {', '.join(sorted(REGISTRY))}")


def _keys_of(name: str) -> tuple[str, ...]:
  keys = signature_keys(REGISTRY[name])
  if keys is None:
    return (*COMMON_KEYS, *STRUCTURED_KEYS, *_DECLARED_KEYS.get(name, ()))
  return keys


def config_keys(name: str | None = None) -> tuple[str, ...]:
  """Config keys ``jaxprune.create(name, ...)`` accepts (read from the factory's
  signature); with no name, the union over every registered algorithm (what an
  experiment config may set)."""
  if name is not None:
    _check_name(name)
    return _keys_of(name)
  return tuple(dict.fromkeys(k for n in REGISTRY for k in _keys_of(n)))


def create(name: str, **config) -> Algorithm:
  """Builds the algorithm ``name`` from config keys: ``REGISTRY[name](**config)``.

  The names and their common keys are listed in the training-time sparsity
  guide (``docs/training.md``); each factory (:func:`jaxprune.rigl`, ...) documents
  its own keys and defaults.

  Raises ValueError for an unknown name (listing the valid ones), unknown
  config keys and out-of-range values, each naming the key.

  Examples:
    >>> algo = create("gradual_magnitude", sparsity=0.9, end_step=1000)
    >>> algo.name, algo.family, algo.config["sparsity"], algo.config["distribution"]
    ('gradual_magnitude', 'magnitude', 0.9, 'uniform')
    >>> create("gradual_magnitude", sparsity=0.9, end_step=1000, update_evry=100)
    Traceback (most recent call last):
      ...
    ValueError: gradual_magnitude: unknown config key(s) 'update_evry'; valid keys are: ...
  """
  _check_name(name)
  if signature_keys(REGISTRY[name]) is not None:
    check_known(name, config, config_keys(name))
  return REGISTRY[name](**config)
