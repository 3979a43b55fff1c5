"""The training loop of a run: steps, logging, evaluation, checkpoints, signals.

- Dispatch runs at most `MAX_IN_FLIGHT` steps ahead of the devices (`InFlight`).
- `<workdir>/metrics.jsonl` gets one JSON object per logged step (every
  `log_every` and `eval_every` steps and the last one) with `step`, `loss` and
  `accuracy` (means since the previous line), `sparsity`, `learning_rate`,
  `drop_fraction` (SET/RigL), `steps_per_s` and, at evaluation steps,
  `eval_loss` and `eval_accuracy`; a tqdm progress bar when stderr is a terminal.
- On SIGTERM or SIGINT the loop saves a checkpoint at the current step and
  raises `Interrupted` (exit status 128 + the signal number). The signal is
  acted on after the current step (on multi-host pods at the next multiple of
  `log_every`, so that all hosts stop at the same step); a second signal acts
  as usual.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import sys
import threading
import time
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from experiments import data
from experiments.harness import sharding as shd
from experiments.harness import steps as steps_lib
from experiments.harness.state import TrainState

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


def _summarise(pending: list[dict], step: int) -> dict:
  """One metrics.jsonl line from the per-step metrics since the last line."""
  line = {"step": step}
  for key in ("loss", "accuracy"):
    line[key] = float(np.mean([m[key] for m in pending]))
  for key in ("sparsity", "learning_rate", "drop_fraction"):
    if key in pending[-1]:
      line[key] = float(pending[-1][key])
  return line


def train_loop(
  setup, state: TrainState, start: int, checkpointer, metrics_file, out
) -> tuple[TrainState, dict | None]:
  """Steps `start + 1 .. steps` with logging, evaluation and checkpoints.

  Returns the final state and the last evaluation (None if no step ran).
  Raises Interrupted after saving a checkpoint when SIGTERM/SIGINT arrives.
  """
  from tqdm import tqdm

  config, mesh, steps = setup.config, setup.mesh, int(setup.config.steps)
  train_step = jax.jit(
    steps_lib.make_train_step(
      setup.model,
      setup.tx,
      setup.schedule,
      setup.num_classes,
      float(config.label_smoothing),
      setup.forward,
    ),
    in_shardings=(setup.shardings, shd.batch_sharding(mesh)),
    out_shardings=(setup.shardings, shd.replicated(mesh)),
    donate_argnums=0,
  )
  eval_step = jax.jit(
    steps_lib.make_eval_step(setup.model, setup.num_classes, setup.forward),
    out_shardings=shd.replicated(mesh),
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
