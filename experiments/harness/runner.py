"""One training harness: `run(config, ...)` trains (or resumes) one run.

    state, result = harness.run(config)                       # config.algorithm
    state, result = harness.run(config, algorithm=jaxprune.create("fixed", masks=m),
                                params0=rewound, start_step=k)  # any algorithm, params

Every experiment CLI is argument parsing plus `run`: `experiments.train`,
`sweep`, `lottery`, `toolbox`, `demo`, ... The pieces live in one module each:
`config` (parsing and checks; the algorithm keys come from
`jaxprune.config_keys`), `inputs` (dataset splits), `state`, `steps` (the
jitted train and eval steps, the forward-params hook), `loop`, `result` (with
the FLOPs accounting), `cache` (skip what is finished), `checkpoint` and
`sharding`.

What a run does:

- Data parallel on every visible device (all hosts' on a pod): a
  ("data", "model") `Mesh`, the batch split along "data", params, optimizer
  state (masks included) and BatchNorm statistics placed explicitly; with
  `--config.model_parallel=True` large kernels (and their masks and optimizer
  state) are also split along "model" (see `experiments.harness.sharding`). The
  jitted step sees the global batch, so BatchNorm statistics are computed over
  the whole global batch, exactly as on one device. `--config.distributed=True`
  calls `jax.distributed.initialize()` first (multi-host pods where the cluster
  is auto-detected); elsewhere pass `--config.coordinator_address=HOST:PORT
  --config.num_processes=N --config.process_id=I` to each of the N processes
  (CPU hosts included: their collectives go through gloo). Each process reads
  its own slice of every global batch; the result is that of one process with
  all the devices (same global batch). Process 0 writes `config.json`,
  `metrics.jsonl` and `result.json`; checkpoints are written by orbax, every
  process its part, in the shared workdir.
- Loss: softmax cross-entropy with `label_smoothing`; weight decay comes with
  the optimizer (`experiments.configs.common.optimizer`), wrapped by
  `jaxprune.sparsify`.
- Checkpoints (`experiments.harness.checkpoint`) every `checkpoint_every` steps and at
  the end in `<workdir>/checkpoints`; rerunning the same command resumes from
  the newest one (refused if it was made with a different config). On SIGTERM
  or SIGINT the run saves a checkpoint at the current step and exits with
  status 128 + the signal number (143 for SIGTERM, 130 for SIGINT); rerunning
  continues exactly where it stopped (bit-identical on CPU). The signal is
  acted on after the current step (on multi-host pods at the next multiple of
  `log_every`, so that all hosts stop at the same step); a second signal
  acts as usual.
- Logging: a tqdm progress bar (loss, accuracy, sparsity) when stderr is a
  terminal; `<workdir>/metrics.jsonl` gets one JSON object per logged step
  (every `log_every` and `eval_every` steps and the last one) with `step`,
  `loss` and `accuracy` (means since the previous line), `sparsity`,
  `learning_rate`, `drop_fraction` (SET/RigL) and, at evaluation steps,
  `eval_loss` and `eval_accuracy`. On resume, lines past the restored step are
  removed first, so the file never holds duplicate or stale steps (the first
  new line's means then cover only the steps since the restored one).
- At the end: the per-layer sparsity table (`jaxprune.summary`), then, as the
  last line printed, one JSON object: `test_accuracy`, `test_loss`, `sparsity`,
  `overall_sparsity`, `steps`, `devices`, `wall_s`, `algorithm`, `seed`,
  `dataset` (the data actually read: "digits" when Fashion-MNIST fell back to
  them), ... (also written to `<workdir>/result.json`), with the FLOPs figures
  of `experiments.harness.result`: `inference_flops_ratio` (final masks),
  `training_flops_ratio` (the run over dense training of the same length) and
  the absolute counts.

Sparsity is measured on the final params: `sparsity` is the fraction of exact
zeros among the entries of the leaves the algorithm prunes (leaves with a
full-shape mask; for `dense`, all kernels, ndim >= 2); `overall_sparsity` is
over every parameter (biases and BatchNorm scales included).

Small datasets (fixed-size images, under `IN_MEMORY_MAX_BYTES` of pixels, e.g.
Fashion-MNIST and CIFAR) are read once through their TFDS source into memory;
the batches are the same either way.

With `algorithm=`, the run trains that algorithm instead of
`config.algorithm` (the config records its name); with `params0=`, it starts
from those params (BatchNorm statistics and the state key still come from the
model's init) at step `start_step`; with `stop_at=`, it stops after that step
with the learning-rate schedule and algorithm of the full `config.steps`; with
`model=`, it trains that model object (same `init`/`apply` as the config's).
Straight-through algorithms (`ste`, `sr_ste`) run their forward pass on
`jaxprune.straight_through(params, masks)` (see `steps.forward_params`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable

import jax

import jaxprune
from experiments import data, models
from experiments.configs import common
from experiments.harness import checkpoint as ckpt
from experiments.harness import config as config_lib
from experiments.harness import inputs, loop, result, steps
from experiments.harness import sharding as shd
from experiments.harness.config import ConfigError
from experiments.harness.state import Init, TrainState, initial_state, make_init


@dataclasses.dataclass
class Setup:
  """Everything a run builds from its config before touching any state."""

  config: Any
  algorithm: jaxprune.Algorithm
  mesh: Any
  model: Any
  tx: Any
  schedule: Callable
  train_source: data.Source
  test_source: data.Source
  init: Init
  shapes: TrainState  # jax.ShapeDtypeStructs of the state.
  shardings: TrainState  # NamedShardings of the state.
  forward: Callable | None = None  # params -> the params of the forward pass.

  @property
  def num_classes(self) -> int:
    return self.train_source.num_classes


def build(config, *, algorithm=None, params0=None, model=None) -> Setup:
  """Checks the config, builds the mesh, data, model, optimizer and placements
  (`algorithm`, `params0`, `model`: see the module doc)."""
  if algorithm is None:
    algorithm = config_lib.create_algorithm(config)
  mesh = shd.make_mesh(config.model_parallel)
  shd.check_batch_size(config.batch_size, mesh)
  shd.check_batch_size(config.eval_batch_size, mesh, key="eval_batch_size")
  spec = data.get_spec(config)
  train_source = inputs.load_split(config, spec.train_split)
  test_source = inputs.load_split(config, spec.eval_split)
  if train_source.dataset != test_source.dataset:
    raise ConfigError(
      f"config.dataset={config.dataset!r}: the train split was read from "
      f"{train_source.dataset!r} but the test split from {test_source.dataset!r}"
    )
  if config.get("num_classes") is not None and config.num_classes != train_source.num_classes:
    raise ConfigError(
      f"config.num_classes={config.num_classes} but the dataset has "
      f"{train_source.num_classes} classes"
    )
  if model is None:
    model = models.get_model(config, num_classes=train_source.num_classes)
  schedule = common.learning_rate_schedule(config)
  tx = jaxprune.sparsify(common.optimizer(config, schedule), algorithm)
  init = make_init(
    model, tx, data.input_shape(config), rescale=bool(config.rescale_init), params0=params0
  )
  shapes = jax.eval_shape(init.state, jax.random.PRNGKey(0))
  return Setup(
    config,
    algorithm,
    mesh,
    model,
    tx,
    schedule,
    train_source,
    test_source,
    init,
    shapes,
    shd.state_shardings(shapes, mesh),
    steps.forward_params(algorithm),
  )


def restore_or_init(
  setup: Setup, checkpointer: ckpt.Checkpointer, start_step: int = 0
) -> tuple[TrainState, int]:
  """The newest checkpoint's state and step, or a fresh state at `start_step`."""
  target = ckpt.abstract_state(setup.shapes, setup.shardings)
  restored = checkpointer.restore_latest(target, setup.config)
  if restored is not None:
    return restored
  state = initial_state(setup.init, int(setup.config.seed), setup.shardings, start_step)
  return state, start_step


def initial_variables(config, seed: int) -> tuple[Setup, Any, Any]:
  """`(setup, params, batch_stats)`: the model's initial variables for `seed`, on
  the host (the setup is that of dense training)."""
  setup = build(config, algorithm=jaxprune.create("dense"))
  params, batch_stats, _ = jax.jit(setup.init.model)(jax.random.PRNGKey(int(seed)))
  return setup, jax.device_get(params), jax.device_get(batch_stats)


def _run_config(config, algorithm, stop_at):
  """`config` resolved, naming `algorithm`; `steps` cut to `stop_at`."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    if algorithm is not None:
      config.algorithm = algorithm.name
    if stop_at is not None:
      config.steps = int(stop_at)
  return config


def run(
  config,
  *,
  algorithm: jaxprune.Algorithm | None = None,
  params0: Any = None,
  start_step: int = 0,
  stop_at: int | None = None,
  model: Any = None,
  out=None,
) -> tuple[TrainState, dict]:
  """Trains (or resumes) the run of `config`; returns the final state and result.

  Prints progress to `out` (default stdout), the sparsity table and, last,
  the result as one JSON line.

  Raises:
    ConfigError, ValueError: bad config values (named).
    checkpoint.CheckpointError: unreadable or mismatching checkpoint (nothing
      is deleted or overwritten).
    loop.Interrupted: SIGTERM/SIGINT arrived; a checkpoint was saved first.
  """
  out = out or sys.stdout
  say = lambda *a: print(*a, file=out, flush=True)
  t_start = time.time()
  config_lib.check_config(config)
  config_lib.init_distributed(config)
  setup = build(config, algorithm=algorithm, params0=params0, model=model)
  if algorithm is not None or stop_at is not None:
    # The loop runs to `stop_at`; tx and schedule stay those of config.steps.
    config = _run_config(config, algorithm, stop_at)
    setup = dataclasses.replace(setup, config=config)
  primary = jax.process_index() == 0
  workdir = os.path.abspath(config.workdir)
  os.makedirs(workdir, exist_ok=True)
  metrics_path = os.path.join(workdir, loop.METRICS_FILE)

  checkpointer = ckpt.Checkpointer(workdir)
  try:
    state, start = restore_or_init(setup, checkpointer, start_step)
    if primary:
      result.write_json(os.path.join(workdir, result.CONFIG_FILE), ckpt.config_dict(config))
      loop.truncate_metrics(metrics_path, start)
    say(
      f"[train] {config.name}: {setup.algorithm.name} sparsity={config.sparsity} "
      f"seed={config.seed}, {shd.describe(setup.mesh)}, data {setup.train_source!r}, "
      + (f"resumed from step {start}" if start else "from scratch")
      + f", workdir {workdir}"
    )
    with open(metrics_path, "a") if primary else contextlib.nullcontext() as metrics_file:
      state, evaluation = loop.train_loop(setup, state, start, checkpointer, metrics_file, out)
    res, table = result.final_result(setup, state, evaluation, start, time.time() - t_start)
  finally:
    checkpointer.close()
  if primary:
    result.write_json(os.path.join(workdir, result.RESULT_FILE), res)
  say(str(table))
  say(json.dumps(res))
  return state, res


def exit_status(name: str, main: Callable[[], Any]) -> int:
  """Runs a CLI's `main()`; returns its exit status: 0, 128 + the signal number
  after SIGTERM/SIGINT (a checkpoint was saved), 2 for a bad config, dataset or
  checkpoint (the message, naming the key or file, goes to stderr)."""
  try:
    main()
  except loop.Interrupted as e:
    print(f"[{name}] {e}", file=sys.stderr, flush=True)
    return e.exit_code
  except (ConfigError, ckpt.CheckpointError, data.DatasetNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  return 0
