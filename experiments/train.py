"""Trains a model of an experiment config with a jaxprune algorithm.

    python -m experiments.train --config=experiments/configs/fmnist_mlp.py \\
        --config.algorithm=rigl --config.sparsity=0.9 --config.steps=2000 \\
        --config.workdir=/tmp/run1

Every key of the config file can be overridden with `--config.KEY=VALUE`
(nested: `--config.model_kwargs.features="(300,100)"`), among them every
`jaxprune.create` key (sparsity, distribution, include, start_step, end_step,
update_every, drop_fraction, sparsity_type, initial_sparsity, power, seed);
unknown keys are an error naming the key.

What a run does:

- Data parallel on every visible device (all hosts' on a pod): a
  ("data", "model") `Mesh`, the batch split along "data", params, optimizer
  state (masks included) and BatchNorm statistics placed explicitly; with
  `--config.model_parallel=True` large kernels (and their masks and optimizer
  state) are also split along "model" (see `experiments.sharding`). The
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
- Checkpoints (`experiments.checkpoint`) every `checkpoint_every` steps and at
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
  of `experiments.accounting`: `inference_flops_ratio` (final masks),
  `training_flops_ratio` (the run over dense training of the same length) and
  the absolute counts.

Sparsity is measured on the final params: `sparsity` is the fraction of exact
zeros among the entries of the leaves the algorithm prunes (leaves with a
full-shape mask; for `dense`, all kernels, ndim >= 2); `overall_sparsity` is
over every parameter (biases and BatchNorm scales included).

Small datasets (fixed-size images, under `IN_MEMORY_MAX_BYTES` of pixels, e.g.
Fashion-MNIST and CIFAR) are read once through their TFDS source into memory;
the batches are the same either way.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxprune
from experiments import accounting, data, models
from experiments import checkpoint as ckpt
from experiments import sharding as shd
from experiments.configs import common

IN_MEMORY_MAX_BYTES = 1 << 28
# How many dispatched steps (or evaluation batches) may still be running before
# the host waits for the oldest. XLA:CPU runs the per-device parts of a
# multi-device program on a pool of max(cores, devices) threads, and a launch
# that finds 32 computations in flight on a device waits for a free slot *on one
# of those threads*. With 2 devices on 2 cores, that blocked thread is the one
# the other device's half of an all-reduce needs: the all-reduce never completes
# (XLA aborts after its rendezvous timeout). Unbounded asynchronous dispatch gets
# there whenever the host outruns the devices, e.g. with batches prefetched.
MAX_IN_FLIGHT = 4
METRICS_FILE = "metrics.jsonl"
RESULT_FILE = "result.json"
CONFIG_FILE = "config.json"


class InFlight:
  """Keeps at most `limit` dispatched computations running (see `MAX_IN_FLIGHT`).

  `add(outputs)` after each dispatch; it blocks until the computation `limit`
  dispatches back has finished. Dispatch still runs `limit` steps ahead of the
  devices, so the host's work (batches, logging) overlaps theirs.
  """

  def __init__(self, limit: int = MAX_IN_FLIGHT):
    if limit < 1:
      raise ValueError(f"limit must be >= 1, got {limit}")
    self.limit = limit
    self._outputs: collections.deque = collections.deque()

  def add(self, outputs) -> None:
    self._outputs.append(outputs)
    while len(self._outputs) > self.limit:
      jax.block_until_ready(self._outputs.popleft())


class Interrupted(Exception):
  """The run got SIGTERM/SIGINT and saved a checkpoint at `step`."""

  def __init__(self, signum: int, step: int):
    super().__init__(
      f"stopped by {signal.Signals(signum).name} at step {step}; "
      "checkpoint saved, rerun the same command to resume"
    )
    self.signum, self.step = signum, step

  @property
  def exit_code(self) -> int:
    return 128 + self.signum


class TrainState(NamedTuple):
  """Everything a run carries from step to step (and checkpoints)."""

  step: jax.Array  # int32 scalar: the number of steps done.
  params: Any
  batch_stats: Any  # {} for models without BatchNorm.
  opt_state: Any  # jaxprune.sparsify state: masks, inner and algorithm state.
  rng: jax.Array  # Raw uint32 key; per-step keys are fold_in(rng, step).


# ------------------------------------------------------------------------- config


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
  if kwargs is None:
    return
  if jax.config.jax_cpu_collectives_implementation is None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)


def create_algorithm(config) -> jaxprune.Algorithm:
  """`jaxprune.create(config.algorithm, ...)`; errors name the config key."""
  try:
    return jaxprune.create(config.algorithm, **common.create_kwargs(config))
  except (ValueError, TypeError) as e:
    raise ConfigError(f"config.algorithm={config.algorithm!r}: {e}") from None


# --------------------------------------------------------------------------- data


_MEMORY: dict = {}


def in_memory(source: data.Source) -> data.Source:
  """`source` read once into numpy arrays (cached per process)."""
  from experiments.datasets.digits import ArraySource

  if isinstance(source.records, ArraySource):
    return source
  key = (source.origin, source.split)
  if key not in _MEMORY:
    images, labels = [], []
    for lo in range(0, len(source), 4096):
      records = source.__getitems__(range(lo, min(lo + 4096, len(source))))
      images.append(np.stack([np.asarray(r["image"]) for r in records]))
      labels.append(np.asarray([r["label"] for r in records], np.int64))
    _MEMORY[key] = ArraySource({"image": np.concatenate(images), "label": np.concatenate(labels)})
  return dataclasses.replace(source, records=_MEMORY[key], origin=f"{source.origin}, in memory")


def load_split(config, split: str) -> data.Source:
  """A split of the config's dataset, in memory when small (see module doc)."""
  source = data.load(config, split)
  spec = source.spec
  size = len(source) * math.prod(spec.image_shape)
  if spec.preprocessing != "imagenet" and size <= IN_MEMORY_MAX_BYTES:
    return in_memory(source)
  return source


# ------------------------------------------------------------------ model and step


def loss_fn(logits, labels, num_classes: int, label_smoothing: float):
  """Mean softmax cross-entropy against (smoothed) one-hot labels."""
  targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()


def pruned_selection(params, masks) -> Any:
  """Per leaf, whether it counts for `sparsity`: leaves with a full-shape mask;
  if there are none (dense), every kernel (ndim >= 2)."""
  full = jax.tree.map(lambda m: jnp.ndim(m) > 0, masks)
  if any(jax.tree.leaves(full)):
    return full
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def zero_fraction(params, selection) -> jax.Array:
  """Fraction of exact zeros among the selected leaves (on device, traceable)."""
  chosen = [p for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(selection)) if s]
  if not chosen:
    return jnp.float32(0.0)
  zeros = sum(jnp.sum(p == 0, dtype=jnp.float32) for p in chosen)
  return zeros / float(sum(p.size for p in chosen))


def _variables(params, batch_stats) -> dict:
  return {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}


class Init(NamedTuple):
  """The initial train state in two jit-able parts (plus their composition).

  `model(rng) -> (params, batch_stats, state_rng)` does not depend on the
  algorithm or the seed value (the key is an argument), so its compiled form is
  shared by every run of a sweep (with a persistent compilation cache);
  `optimizer(params) -> (params, opt_state)` builds the sparse optimizer state
  and applies the first masks; `state(rng)` composes both.
  """

  model: Callable
  optimizer: Callable
  state: Callable


def make_init(model, tx, input_shape, rescale: bool = False) -> Init:
  """The initialisation of a run: params with the algorithm's first masks applied
  (and with `rescale`, `jaxprune.rescale_init`: each unit's weights scaled to its
  active fan-in)."""

  def init_model(rng):
    init_rng, state_rng = jax.random.split(rng)
    variables = model.init(init_rng, jnp.zeros((1, *input_shape), jnp.float32), train=False)
    return variables["params"], variables.get("batch_stats", {}), state_rng

  def init_optimizer(params):
    opt_state = tx.init(params)
    masks = jaxprune.get_masks(opt_state)
    params = jaxprune.apply_masks(params, masks)
    return (jaxprune.rescale_init(params, masks) if rescale else params), opt_state

  def init_state(rng) -> TrainState:
    params, batch_stats, state_rng = init_model(rng)
    params, opt_state = init_optimizer(params)
    return TrainState(jnp.zeros((), jnp.int32), params, batch_stats, opt_state, state_rng)

  return Init(init_model, init_optimizer, init_state)


def initial_state(init: Init, seed: int, shardings: TrainState) -> TrainState:
  """Runs `init` on device, every array placed with `shardings`."""
  rng = jax.random.PRNGKey(seed)
  params, batch_stats, state_rng = jax.jit(
    init.model, out_shardings=(shardings.params, shardings.batch_stats, shardings.rng)
  )(rng)
  params, opt_state = jax.jit(
    init.optimizer, out_shardings=(shardings.params, shardings.opt_state)
  )(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
  return TrainState(step, params, batch_stats, opt_state, state_rng)


def make_train_step(model, tx, schedule, num_classes: int, label_smoothing: float):
  """`(state, batch) -> (state, metrics)`, all on device (no host syncs)."""

  def train_step(state: TrainState, batch):
    step_rng = jax.random.fold_in(state.rng, state.step)

    def compute_loss(params):
      logits, updated = model.apply(
        _variables(params, state.batch_stats),
        batch["image"],
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": step_rng},
      )
      return loss_fn(logits, batch["label"], num_classes, label_smoothing), (logits, updated)

    (loss, (logits, updated)), grads = jax.value_and_grad(compute_loss, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    sparse = jaxprune.get_sparse_state(opt_state)
    metrics = {
      "loss": loss,
      "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
      "sparsity": zero_fraction(params, pruned_selection(params, sparse.masks)),
      "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
    }
    if hasattr(sparse.algo_state, "drop_fraction"):
      metrics["drop_fraction"] = sparse.algo_state.drop_fraction
    new_state = TrainState(
      state.step + 1, params, updated.get("batch_stats", state.batch_stats), opt_state, state.rng
    )
    return new_state, metrics

  return train_step


def make_eval_step(model, num_classes: int):
  """`(params, batch_stats, batch) -> sums` of correct, loss and real examples."""

  def eval_step(params, batch_stats, batch):
    logits = model.apply(_variables(params, batch_stats), batch["image"], train=False)
    mask = batch["mask"].astype(jnp.float32)
    labels = batch["label"]
    losses = optax.softmax_cross_entropy(
      logits.astype(jnp.float32), jax.nn.one_hot(labels, num_classes)
    )
    return {
      "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
      "loss": jnp.sum(losses * mask),
      "count": jnp.sum(mask),
    }

  return eval_step


def evaluate(eval_step, state: TrainState, batches: Iterator, mesh) -> dict:
  """Test accuracy and loss over one pass of padded eval batches."""
  sums, in_flight = None, InFlight()
  for batch in batches:
    out = eval_step(state.params, state.batch_stats, shd.put_batch(batch, mesh))
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    in_flight.add(sums)
  sums = jax.device_get(sums)
  count = max(float(sums["count"]), 1.0)
  return {"accuracy": float(sums["correct"]) / count, "loss": float(sums["loss"]) / count}


def to_host(tree):
  """numpy copies of (possibly sharded, possibly multi-host) arrays."""
  leaves = jax.tree.leaves(tree)
  if all(getattr(x, "is_fully_addressable", True) for x in leaves):
    return jax.device_get(tree)
  from jax.experimental import multihost_utils

  return multihost_utils.process_allgather(tree, tiled=True)


# ------------------------------------------------------------------------ files


def truncate_metrics(path: str, last_step: int) -> int:
  """Keeps the lines of `path` with step <= last_step (and drops unreadable
  ones, e.g. half-written by a killed run); returns how many were removed."""
  if not os.path.exists(path):
    return 0
  kept, removed = [], 0
  with open(path) as f:
    for line in f:
      try:
        ok = json.loads(line)["step"] <= last_step
      except (ValueError, KeyError, TypeError):
        ok = False
      if ok:
        kept.append(line if line.endswith("\n") else line + "\n")
      else:
        removed += 1
  if removed:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, path)
  return removed


def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


class _StopOnSignal:
  """Records SIGTERM/SIGINT instead of dying; a second one acts as usual."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict = {}

  def _handle(self, signum, frame):
    if self.signum is not None:  # Second signal: the previous behaviour.
      previous = self._previous.get(signum)
      signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
      os.kill(os.getpid(), signum)
      return
    self.signum = signum

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in self.SIGNALS:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, previous in self._previous.items():
      signal.signal(s, previous)
    return False


def _any_host(flag: bool) -> bool:
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils

  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


# -------------------------------------------------------------------------- run


def run(config, *, out=None) -> dict:
  """Trains (or resumes) the run of `config`; returns the result dict.

  Prints progress to `out` (default stdout), the sparsity table and, last,
  the result as one JSON line. See `train` for the errors.
  """
  return train(config, out=out)[1]


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

  @property
  def num_classes(self) -> int:
    return self.train_source.num_classes


def build(config) -> Setup:
  """Checks the config, builds the mesh, data, model, optimizer and placements."""
  algorithm = create_algorithm(config)
  mesh = shd.make_mesh(config.model_parallel)
  shd.check_batch_size(config.batch_size, mesh)
  shd.check_batch_size(config.eval_batch_size, mesh, key="eval_batch_size")
  spec = data.get_spec(config)
  train_source = load_split(config, spec.train_split)
  test_source = load_split(config, spec.eval_split)
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
  model = models.get_model(config, num_classes=train_source.num_classes)
  schedule = common.learning_rate_schedule(config)
  tx = jaxprune.sparsify(common.optimizer(config, schedule), algorithm)
  init = make_init(model, tx, data.input_shape(config), rescale=bool(config.rescale_init))
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
  )


def restore_or_init(setup: Setup, checkpointer: ckpt.Checkpointer) -> tuple[TrainState, int]:
  """The newest checkpoint's state and step, or a fresh state at step 0."""
  target = ckpt.abstract_state(setup.shapes, setup.shardings)
  restored = checkpointer.restore_latest(target, setup.config)
  if restored is not None:
    return restored
  return initial_state(setup.init, int(setup.config.seed), setup.shardings), 0


def train_loop(
  setup: Setup, state: TrainState, start: int, checkpointer: ckpt.Checkpointer, metrics_file, out
) -> tuple[TrainState, dict | None]:
  """Steps `start + 1 .. steps` with logging, evaluation and checkpoints.

  Returns the final state and the last evaluation (None if no step ran).
  Raises Interrupted after saving a checkpoint when SIGTERM/SIGINT arrives.
  """
  from tqdm import tqdm

  config, mesh, steps = setup.config, setup.mesh, int(setup.config.steps)
  train_step = jax.jit(
    make_train_step(
      setup.model, setup.tx, setup.schedule, setup.num_classes, float(config.label_smoothing)
    ),
    in_shardings=(setup.shardings, shd.batch_sharding(mesh)),
    out_shardings=(setup.shardings, shd.replicated(mesh)),
    donate_argnums=0,
  )
  eval_step = jax.jit(
    make_eval_step(setup.model, setup.num_classes), out_shardings=shd.replicated(mesh)
  )
  evaluate_now = lambda s: evaluate(
    eval_step, s, data.eval_batches(config, source=setup.test_source), mesh
  )

  pending, last_eval, in_flight = [], None, InFlight()
  t_log, step_log = time.time(), start
  bar = tqdm(
    total=steps,
    initial=start,
    disable=None,
    dynamic_ncols=True,
    leave=False,
    desc=setup.algorithm.name,
    file=sys.stderr,
  )
  batches = data.prefetch(
    data.train_batches(config, start_step=start, source=setup.train_source), 2
  )
  try:
    with _StopOnSignal() as stop:
      for step in range(start + 1, steps + 1):
        state, metrics = train_step(state, shd.put_batch(next(batches), mesh))
        pending.append(metrics)
        in_flight.add(metrics)
        bar.update(1)
        do_eval = step % config.eval_every == 0 or step == steps
        if do_eval or step % config.log_every == 0:
          line = _summarise(jax.device_get(pending), step)
          now = time.time()
          line["steps_per_s"] = (step - step_log) / max(now - t_log, 1e-9)
          t_log, step_log, pending = now, step, []
          if do_eval:
            last_eval = evaluate_now(state)
            line["eval_loss"] = last_eval["loss"]
            line["eval_accuracy"] = last_eval["accuracy"]
            bar.write(
              f"[train] step {step}: eval accuracy {last_eval['accuracy']:.4f}, "
              f"loss {line['loss']:.4f}, sparsity {line['sparsity']:.4f}",
              file=out,
            )
          bar.set_postfix(
            loss=f"{line['loss']:.4f}",
            acc=f"{line['accuracy']:.3f}",
            sparsity=f"{line['sparsity']:.3f}",
            refresh=False,
          )
          if metrics_file is not None:
            metrics_file.write(json.dumps(line) + "\n")
            metrics_file.flush()
        if step % config.checkpoint_every == 0 or step == steps:
          checkpointer.save(step, state, config)
        # On pods all hosts must agree to stop (saving is collective).
        check_now = jax.process_count() == 1 or step % config.log_every == 0
        if check_now and _any_host(stop.signum is not None):
          checkpointer.save(step, state, config)
          raise Interrupted(stop.signum or signal.SIGTERM, step)
    if start == steps and checkpointer.latest_step() != steps:  # steps=0.
      checkpointer.save(steps, state, config)
  finally:
    bar.close()
    batches.close()
  return state, last_eval if last_eval is not None else evaluate_now(state)


def final_result(
  setup: Setup, state: TrainState, evaluation: dict, start: int, wall_s: float
) -> tuple[dict, jaxprune.Summary]:
  """The run's result dict (see module doc) and its per-layer sparsity table."""
  config = setup.config
  params = to_host(state.params)
  masks = to_host(jaxprune.get_masks(state.opt_state))
  table = jaxprune.summary(params, algorithm=setup.algorithm)
  selection = pruned_selection(params, masks)
  measured = [
    (np.size(p), np.count_nonzero(p))
    for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(selection))
    if s
  ]
  total = sum(n for n, _ in measured)
  prunes = any(np.ndim(m) > 0 for m in jax.tree.leaves(masks))
  result = {
    "config": config.name,
    "dataset": setup.train_source.dataset,
    "algorithm": setup.algorithm.name,
    "target_sparsity": config.sparsity if prunes else None,
    "seed": int(config.seed),
    "test_accuracy": evaluation["accuracy"],
    "test_loss": evaluation["loss"],
    "sparsity": 1.0 - sum(nz for _, nz in measured) / total if total else 0.0,
    "overall_sparsity": table.total.sparsity,
    "layer_sparsity": table.as_dict(),
    "steps": int(config.steps),
    "resumed_from": start,
    "devices": jax.device_count(),
    "processes": jax.process_count(),
    "wall_s": round(wall_s, 2),
    "workdir": os.path.abspath(config.workdir),
  }
  result.update(
    accounting.run_flops(
      setup.model, setup.algorithm, config, params, to_host(state.batch_stats), masks
    )
  )
  return result, table


def train(config, *, out=None) -> tuple[TrainState, dict]:
  """Trains (or resumes) the run of `config`; returns the final state and result.

  Raises:
    ConfigError, ValueError: bad config values (named).
    checkpoint.CheckpointError: unreadable or mismatching checkpoint (nothing
      is deleted or overwritten).
    Interrupted: SIGTERM/SIGINT arrived; a checkpoint was saved first.
  """
  out = out or sys.stdout
  say = lambda *a: print(*a, file=out, flush=True)
  t_start = time.time()
  check_config(config)
  init_distributed(config)
  setup = build(config)
  primary = jax.process_index() == 0
  workdir = os.path.abspath(config.workdir)
  os.makedirs(workdir, exist_ok=True)
  metrics_path = os.path.join(workdir, METRICS_FILE)

  checkpointer = ckpt.Checkpointer(workdir)
  try:
    state, start = restore_or_init(setup, checkpointer)
    if primary:
      _write_json(os.path.join(workdir, CONFIG_FILE), ckpt.config_dict(config))
      truncate_metrics(metrics_path, start)
    say(
      f"[train] {config.name}: {setup.algorithm.name} sparsity={config.sparsity} "
      f"seed={config.seed}, {shd.describe(setup.mesh)}, data {setup.train_source!r}, "
      + (f"resumed from step {start}" if start else "from scratch")
      + f", workdir {workdir}"
    )
    with open(metrics_path, "a") if primary else contextlib.nullcontext() as metrics_file:
      state, evaluation = train_loop(setup, state, start, checkpointer, metrics_file, out)
    result, table = final_result(setup, state, evaluation, start, time.time() - t_start)
  finally:
    checkpointer.close()
  if primary:
    _write_json(os.path.join(workdir, RESULT_FILE), result)
  say(str(table))
  say(json.dumps(result))
  return state, result


def _summarise(pending: list[dict], step: int) -> dict:
  """One metrics.jsonl line from the per-step metrics since the last line."""
  line = {"step": step}
  for key in ("loss", "accuracy"):
    line[key] = float(np.mean([m[key] for m in pending]))
  for key in ("sparsity", "learning_rate", "drop_fraction"):
    if key in pending[-1]:
      line[key] = float(pending[-1][key])
  return line


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; returns the process exit status."""
  argv = list(sys.argv if argv is None else argv)
  try:
    config = parse_config(argv)
    run(config)
  except Interrupted as e:
    print(f"[train] {e}", file=sys.stderr, flush=True)
    return e.exit_code
  except (ConfigError, ckpt.CheckpointError, data.DatasetNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
