"""Experiment configs: command-line parsing, checks and the algorithm keys.

`parse_config(argv)` reads `--config=PATH` (an `ml_collections` config file whose
`get_config()` starts from `experiments.configs.common.base_config`) and its
`--config.KEY=VALUE` overrides; an unknown key is an error naming it.
`ALGORITHM_KEYS` are the keys of `jaxprune.create`, taken from
`jaxprune.config_keys()` (never a copy), and `create_kwargs(config)` passes the
ones that are set to `jaxprune.create(config.algorithm, ...)`.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax

import jaxprune

# Keys of `jaxprune.create(config.algorithm, **kwargs)`: every key the library
# accepts (`jaxprune.config_keys()`), less `seed` (the run's own seed, passed too)
# and `masks` (arrays, for `fixed`; not a config value).
NOT_ALGORITHM_CONFIG_KEYS = ("seed", "masks")
ALGORITHM_KEYS = tuple(k for k in jaxprune.config_keys() if k not in NOT_ALGORITHM_CONFIG_KEYS)


def create_kwargs(config: Any) -> dict:
  """Keyword arguments of `jaxprune.create(config.algorithm, **kwargs)`.

  The algorithm keys that are set (None placeholders are skipped, so the
  library's defaults apply), plus `seed`.
  """
  kwargs = {k: config[k] for k in ALGORITHM_KEYS if config.get(k) is not None}
  if isinstance(kwargs.get("grow_init"), str) and kwargs["grow_init"] not in ("zeros", "random"):
    try:  # a float std given on the command line as a string
      kwargs["grow_init"] = float(kwargs["grow_init"])
    except ValueError:
      pass  # jaxprune.create names the bad value
  if config.get("seed") is not None:
    kwargs["seed"] = int(config["seed"])
  return kwargs


class ConfigError(ValueError):
  """A bad command line or config value; the message names the key."""


def _load_config_file(path: str):
  import runpy

  if not os.path.isfile(path):
    raise ConfigError(f"--config: no such config file {path!r}")
  return runpy.run_path(path)["get_config"]()


def _config_paths(config, prefix: str = "") -> list[str]:
  out = []
  for k, v in config.items():
    out.append(prefix + k)
    if hasattr(v, "items") and not isinstance(v, (str, bytes)):
      out.extend(_config_paths(v, f"{prefix}{k}."))
  return out


def check_override_keys(config, argv: Sequence[str]) -> None:
  """Raises ConfigError naming any `--config.KEY` that the config lacks."""
  known = set(_config_paths(config))
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    key = arg[len("--config.") :].split("=", 1)[0]
    if key not in known:
      top = sorted(k for k in known if "." not in k)
      raise ConfigError(f"unknown config key {key!r} (from {arg!r}); valid keys: {', '.join(top)}")


def parse_config(argv: Sequence[str]):
  """`[prog, --config=PATH, --config.KEY=VALUE, ...]` -> the ml_collections config."""
  from absl import flags
  from ml_collections import config_flags

  argv = list(argv)
  if "--config" in argv[1:-1]:  # "--config PATH" -> "--config=PATH".
    i = argv.index("--config", 1)
    argv[i : i + 2] = [f"--config={argv[i + 1]}"]
  paths = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")]
  if not paths:
    raise ConfigError("missing --config=PATH (e.g. --config=experiments/configs/fmnist_mlp.py)")
  check_override_keys(_load_config_file(paths[-1]), argv[1:])
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file(
    "config", flag_values=flag_values, sys_argv=argv, lock_config=True
  )
  try:
    flag_values(argv)
  except flags.Error as e:
    raise ConfigError(str(e)) from None
  except (AttributeError, KeyError) as e:
    raise ConfigError(f"unknown config key {e}") from None
  return flag_values.config


def check_config(config) -> None:
  """Cheap checks of loop keys before anything is built (each names its key)."""
  for key in (
    "steps",
    "batch_size",
    "eval_batch_size",
    "log_every",
    "eval_every",
    "checkpoint_every",
  ):
    value = config.get(key)
    minimum = 0 if key == "steps" else 1
    if not isinstance(value, int) or value < minimum:
      raise ConfigError(f"config.{key} must be an integer >= {minimum}, got {value!r}")
  if not config.get("workdir"):
    raise ConfigError("config.workdir must be set")
  if not 0.0 <= float(config.label_smoothing) < 1.0:
    raise ConfigError(f"config.label_smoothing must be in [0, 1), got {config.label_smoothing!r}")


DISTRIBUTED_KEYS = ("coordinator_address", "num_processes", "process_id")


def distributed_kwargs(config) -> dict | None:
  """Keyword arguments of `jax.distributed.initialize`, or None for one process.

  `distributed=True` alone: {} (the cluster is auto-detected, e.g. on TPU pods
  or under SLURM). `coordinator_address`, `num_processes` and `process_id`
  (all three; they imply `distributed`) are passed through, for processes that
  no cluster environment describes, such as several CPU hosts.
  """
  given = {k: config.get(k) for k in DISTRIBUTED_KEYS if config.get(k) is not None}
  if not given:
    return {} if config.get("distributed") else None
  missing = [k for k in DISTRIBUTED_KEYS if k not in given]
  if missing:
    raise ConfigError(
      f"config.{missing[0]} must be set together with "
      + ", ".join(f"config.{k}" for k in given)
      + f" (multi-process runs need all of {', '.join(DISTRIBUTED_KEYS)})"
    )
  host, _, port = given["coordinator_address"].rpartition(":")
  if not host or not port.isdigit():
    raise ConfigError(
      f"config.coordinator_address must be HOST:PORT, got {given['coordinator_address']!r}"
    )
  if given["num_processes"] < 1:
    raise ConfigError(f"config.num_processes must be >= 1, got {given['num_processes']}")
  if not 0 <= given["process_id"] < given["num_processes"]:
    raise ConfigError(
      f"config.process_id must be in [0, num_processes={given['num_processes']}), "
      f"got {given['process_id']}"
    )
  return given


def init_distributed(config) -> None:
  """`jax.distributed.initialize` for multi-process runs (before any JAX work).

  On CPU, cross-process collectives go through gloo (TCP), so processes with
  CPU devices only can train together.
  """
  kwargs = distributed_kwargs(config)
  if kwargs is None or jax.distributed.is_initialized():  # e.g. a lottery's later runs
    return
  if jax.config.jax_cpu_collectives_implementation is None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)


def create_algorithm(config) -> jaxprune.Algorithm:
  """`jaxprune.create(config.algorithm, ...)`; errors name the config key."""
  try:
    return jaxprune.create(config.algorithm, **create_kwargs(config))
  except (ValueError, TypeError) as e:
    raise ConfigError(f"config.algorithm={config.algorithm!r}: {e}") from None
