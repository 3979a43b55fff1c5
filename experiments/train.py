"""Trains a model of an experiment config with a jaxprune algorithm.

    python -m experiments.train --config=experiments/configs/fmnist_mlp.py \\
        --config.algorithm=rigl --config.sparsity=0.9 --config.steps=2000 \\
        --config.workdir=/tmp/run1

Every key of the config file can be overridden with `--config.KEY=VALUE`
(nested: `--config.model_kwargs.features="(300,100)"`), among them every
`jaxprune.create` key (`jaxprune.config_keys()`: sparsity, distribution,
include, start_step, end_step, update_every, drop_fraction, sparsity_type,
grow_init, drop_schedule, ...) and `rescale_init`; unknown keys are an error
naming the key.

The run is `experiments.harness.run(config)`; its module doc says what a run
does: data-parallel (and optionally model-parallel) training on every visible
device, multi-process runs (`--config.distributed=True`, or
`--config.coordinator_address=HOST:PORT --config.num_processes=N
--config.process_id=I`), checkpoints in `<workdir>/checkpoints` with resume on
rerun, SIGTERM/SIGINT handling (a checkpoint, then exit status 128 + the signal
number: 143 for SIGTERM, 130 for SIGINT), `<workdir>/metrics.jsonl`, and at the
end the per-layer sparsity table and, as the last line printed, one JSON object
(`test_accuracy`, `test_loss`, `sparsity`, `overall_sparsity`, `steps`,
`devices`, `wall_s`, `algorithm`, `seed`, `dataset`, the FLOPs figures of
`experiments.harness.result`, ...), also written to `<workdir>/result.json`.
"""

from __future__ import annotations

import sys
from typing import Sequence

from experiments import harness

# Names of the harness that this module has always offered.
from experiments.harness.config import (  # noqa: F401
  ConfigError,
  check_config,
  check_override_keys,
  create_algorithm,
  distributed_kwargs,
  init_distributed,
  parse_config,
)
from experiments.harness.inputs import IN_MEMORY_MAX_BYTES, in_memory, load_split  # noqa: F401
from experiments.harness.loop import (  # noqa: F401
  MAX_IN_FLIGHT,
  METRICS_FILE,
  InFlight,
  Interrupted,
  evaluate,
  train_loop,
  truncate_metrics,
)
from experiments.harness.result import CONFIG_FILE, RESULT_FILE, final_result  # noqa: F401
from experiments.harness.runner import Setup, build, restore_or_init  # noqa: F401
from experiments.harness.state import Init, TrainState, initial_state, make_init  # noqa: F401
from experiments.harness.steps import (  # noqa: F401
  loss_fn,
  make_eval_step,
  make_train_step,
  pruned_selection,
  zero_fraction,
)


def train(config, *, out=None):
  """`experiments.harness.run(config)`: the final state and the result dict."""
  return harness.run(config, out=out)


def run(config, *, out=None) -> dict:
  """Trains (or resumes) the run of `config`; returns the result dict."""
  return harness.run(config, out=out)[1]


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; returns the process exit status."""
  argv = list(sys.argv if argv is None else argv)
  return harness.exit_status("train", lambda: run(parse_config(argv)))


if __name__ == "__main__":
  sys.exit(main())
