"""The experiments' training harness; the entry point is `run` (see `runner`)."""

from experiments.harness.config import ConfigError, parse_config
from experiments.harness.loop import Interrupted
from experiments.harness.runner import (
  Setup,
  build,
  exit_status,
  initial_variables,
  restore_or_init,
  run,
)
from experiments.harness.state import TrainState

__all__ = [
  "ConfigError",
  "Interrupted",
  "Setup",
  "TrainState",
  "build",
  "exit_status",
  "initial_variables",
  "parse_config",
  "restore_or_init",
  "run",
]
