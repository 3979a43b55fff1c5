"""Validation of algorithm configs: every key named in its error."""

from __future__ import annotations

import inspect
import numbers
from typing import Any, Callable, Mapping, Union

from jaxprune.paths import include_fn

Distribution = Union[str, Callable[..., Any]]
"""A per-leaf sparsity distribution: ``"uniform"``, ``"erk"`` or a callable
``(params, sparsity, include) -> tree of per-leaf sparsities``."""

COMMON_KEYS = (
  "sparsity",
  "distribution",
  "include",
  "start_step",
  "end_step",
  "update_every",
  "drop_fraction",
  "seed",
  "sparsity_type",
)

# Accepted by every algorithm too, next to COMMON_KEYS: the grouping axis of a
# structured sparsity_type (jaxprune.structured).
STRUCTURED_KEYS = ("axis",)

MAX_STEP = 2**31 - 2


def _int(name, value, minimum):
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"{name} must be an integer, got {value!r}")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
  return int(value)


def fraction(name, value, lo, hi, hi_open):
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"{name} must be a number, got {value!r}")
  value = float(value)
  if not (lo <= value and (value < hi if hi_open else value <= hi)):
    raise ValueError(f"{name} must be in [{lo}, {hi}{')' if hi_open else ']'}, got {value!r}")
  return value


def validate(
  name: str,
  config: Mapping[str, Any],
  defaults: Mapping[str, Any],
  extra_keys: Mapping[str, Any] = (),
) -> dict:
  """Checks ``config`` for algorithm ``name`` and fills in ``defaults``.

  Accepts every common key (ignored where it does not apply) and the
  algorithm's ``extra_keys``; anything else raises a ValueError listing the
  valid keys.
  """
  extra_keys = {**{k: None for k in STRUCTURED_KEYS}, **dict(extra_keys)}
  check_known(name, config, (*COMMON_KEYS, *extra_keys))
  cfg = {**extra_keys, **{k: None for k in COMMON_KEYS}, **dict(defaults)}
  cfg.update({k: v for k, v in config.items() if v is not None})
  return _checked(cfg)


def check_known(name: str, config: Mapping[str, Any], valid) -> None:
  """Raises ValueError naming algorithm ``name`` and every key of ``config`` not in ``valid``."""
  unknown = sorted(set(config) - set(valid))
  if unknown:
    raise ValueError(
      f"{name}: unknown config key(s) {', '.join(map(repr, unknown))}; "
      f"valid keys are: {', '.join(sorted(valid))}"
    )


def signature_keys(factory: Callable) -> tuple[str, ...] | None:
  """The keyword-only parameters of a typed algorithm factory, in order; None for a
  factory that takes ``**config`` (its keys are known only to itself)."""
  params = inspect.signature(factory).parameters.values()
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
    return None
  return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def from_signature(name: str, factory: Callable, given: Mapping[str, Any]) -> dict:
  """Checks the keyword arguments ``given`` to the typed factory ``factory`` of
  algorithm ``name``: a None value takes the signature's default; ranges and types
  are checked as in :func:`validate`, each error naming its key."""
  defaults = {
    p.name: p.default
    for p in inspect.signature(factory).parameters.values()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
  }
  check_known(name, given, defaults)
  cfg = {**defaults, **{k: v for k, v in given.items() if v is not None}}
  return _checked(cfg)


def _checked(cfg: dict) -> dict:
  """The range and type checks shared by every algorithm; normalises ``cfg`` in place."""
  stype = cfg.get("sparsity_type") or "unstructured"
  if stype != "unstructured":
    from jaxprune import structured

    pattern = structured.parse_sparsity_type(stype)
    stype = stype if isinstance(stype, str) else pattern.name  # config holds strings
  cfg["sparsity_type"] = stype
  if cfg["axis"] is not None and (
    isinstance(cfg["axis"], bool) or not isinstance(cfg["axis"], numbers.Integral)
  ):
    raise TypeError(f"axis must be an integer, got {cfg['axis']!r}")
  if cfg["sparsity"] is not None:
    cfg["sparsity"] = fraction("sparsity", cfg["sparsity"], 0.0, 1.0, hi_open=True)
  cfg["start_step"] = _int(
    "start_step", cfg["start_step"] if cfg["start_step"] is not None else 0, 0
  )
  if cfg["end_step"] is not None:
    cfg["end_step"] = _int("end_step", cfg["end_step"], 0)
    if cfg["end_step"] < cfg["start_step"]:
      raise ValueError(f"end_step ({cfg['end_step']}) must be >= start_step ({cfg['start_step']})")
  if cfg["update_every"] is not None:
    cfg["update_every"] = _int("update_every", cfg["update_every"], 1)
  for key in ("start_step", "end_step", "update_every"):
    if cfg[key] is not None and cfg[key] > MAX_STEP:
      raise ValueError(
        f"{key} must be at most {MAX_STEP} (the step counter is int32), got {cfg[key]}"
      )
  if cfg["drop_fraction"] is not None:
    cfg["drop_fraction"] = fraction("drop_fraction", cfg["drop_fraction"], 0.0, 1.0, hi_open=False)
  cfg["seed"] = _int("seed", cfg["seed"] if cfg["seed"] is not None else 0, 0)
  dist = cfg["distribution"]
  if not (dist in ("uniform", "erk") or callable(dist)):
    raise ValueError(f"distribution must be 'uniform', 'erk' or a callable, got {dist!r}")
  include_fn(cfg["include"])  # raises for a bad regex or type, naming `include`
  return cfg


def require_sparsity(name: str, cfg: Mapping[str, Any]) -> None:
  """``sparsity`` is required unless an N:M ``sparsity_type`` implies it (``1 - N/M``).

  Unstructured, block and neuron/channel types have no implied sparsity: without
  ``sparsity`` they would prune nothing.
  """
  if cfg.get("sparsity") is not None:
    return
  from jaxprune import structured

  if structured.parse_sparsity_type(cfg["sparsity_type"]).implied_sparsity is None:
    raise ValueError(
      f"{name}: config key 'sparsity' is required with sparsity_type="
      f"{cfg['sparsity_type']!r} (only an N:M sparsity_type implies it)"
    )


def target_sparsity(cfg: Mapping[str, Any]) -> float:
  """The final sparsity: ``sparsity``, or ``1 - N/M`` for an N:M ``sparsity_type``."""
  if cfg.get("sparsity") is not None:
    return float(cfg["sparsity"])
  from jaxprune import structured

  return structured.nm_sparsity(cfg["sparsity_type"])


def require(name: str, cfg: Mapping[str, Any], *keys: str) -> None:
  """Raises ValueError naming the first of ``keys`` that ``cfg`` lacks."""
  for k in keys:
    if cfg.get(k) is None:
      raise ValueError(f"{name}: config key {k!r} is required")
