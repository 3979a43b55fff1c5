"""Shrink while training, against dense training of the same model, side by side.

    python -m experiments.shrink --config=experiments/configs/fmnist_cnn.py \\
        [--target=0.75] [--compact_at=0.25,0.5,0.75,1.0] [--score=magnitude|bn_scale|taylor|taylor_mean]
        [--layers=hidden|conv] [--layer_targets=Conv_0=0.5,...] [--steps_factor=1.0]
        [--seed=0] [--config.KEY=VALUE ...]

Two runs of the config's model, optimizer, learning-rate schedule, data order
and number of steps, with the same seed:

- dense: the plain model (`jaxprune.create("dense")`);
- shrink: gradual neuron/channel pruning to `--target` of the units of every
  hidden layer (`--layers=hidden`, the default; the output layer is kept whole)
  or of the Conv layers only (`--layers=conv`; Dense hidden layers keep their
  width; `--layer_targets` gives named layers a fraction of their own), ranked by
  the L2 norm of their
  kernel (`--score=magnitude`, the default) or, in a layer followed by a
  BatchNorm, by the absolute BatchNorm scale (`--score=bn_scale`, network
  slimming's criterion; BatchNorm makes the kernel's scale irrelevant to the
  function), or by the first-order Taylor estimate of the loss change when the
  unit is removed, from the gradients of the update step's batch
  (`--score=taylor`, Molchanov et al. 2019) or, as in the paper, its square
  averaged over every batch since the previous mask update (`--score=taylor_mean`;
  `--taylor_momentum` adds the reference code's moving average over the updates),
  on the cubic schedule of Zhu & Gupta (2017) from `--schedule`
  (fractions of the steps, default 10% to 60% as in the fmnist_mlp recipe), a mask update every
  `update_every` steps (the config's, default 100). Each unit's bias and
  BatchNorm parameters are pruned with it (`jaxprune.shrink.tie_units`). After
  the mask updates at the `--compact_at` fractions of the schedule the run
  removes the pruned units from params, BatchNorm statistics and optimizer state
  (`jaxprune.shrink.compact_state`; Adam moments and momentum are sliced, not
  reset), rebuilds the model with the new widths, compiles the step for the new
  shapes and goes on. The schedule keeps the original widths' keep counts
  (`jaxprune.shrink.on_kept_units`). After the last compaction of a finished
  schedule the masks are dropped (`jaxprune.shrink.without_masks`): the small
  model trains like a dense one. With `--steps_factor=F` the shrink run trains
  F times the config's steps (schedule, compactions and learning-rate schedule
  scaled with them; data order unchanged) while dense trains the config's steps:
  the smaller model trained longer in less wall-clock than dense, RigL's extended
  training (Evci et al. 2020).

Timing. Both runs live in one process and advance in turns of `--chunk` steps
(A B, B A, A B, ...), so background load hits both alike. A run's wall-clock
`*_wall_s` is everything its training costs: initialisation, every compilation
(timed separately as `*_compile_s`; steps are compiled ahead of time), batches,
steps and compactions; evaluation is left out. `speedup_wall` = dense / shrink.
`speedup_after_last_compaction` compares the step time of both runs over the
steps after the last compaction (compiles excluded); `ideal_speedup_flops` is
the ratio of training FLOPs (forward FLOPs of the model in use at each step, the
backward pass being a fixed multiple), what the speedup would be if time
followed FLOPs. `inference_speedup` is the median latency ratio of the final
dense and shrunk models at batch 256 (jitted, interleaved).

Checkpoints (with `--workdir`): the shrink run saves its state every
`checkpoint_every` steps and at the end; the checkpoint's meta records the kept
units of every layer, so a rerun rebuilds the compacted shapes, restores and
continues bit-identically (the dense run is not checkpointed).

The last line printed is one JSON object with the figures. With `--skip_dense`
only the shrink run trains (for a variant whose dense run of the same seed and
config is already known: it is deterministic on CPU); the dense figures
(`dense_accuracy`, `dense_wall_s`, `speedup_wall`, ...) are then null and the
size, FLOPs and inference figures compare with the untrained dense model.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxprune
from experiments import checkpoint as ckpt
from experiments import data, models, train
from experiments import sharding as shd
from experiments.configs import common
from experiments.harness import steps as harness_steps
from jaxprune import shrink
from jaxprune.compact import infer_layers

DEFAULT_COMPACT_AT = (0.25, 0.5, 0.75, 1.0)
DEFAULT_SCHEDULE = (0.1, 0.6)
INFERENCE_BATCH = 256


# ------------------------------------------------------------------- the model


def hidden_layers(params) -> list[str]:
  """The Dense/Conv layers of the chain except the output layer.

  Raises ValueError (from :func:`jaxprune.compact.infer_layers`) naming a layer
  that is not part of a plain Dense/Conv(-BatchNorm) chain.
  """
  names = [n for n in infer_layers(params) if "kernel" in params[n]]
  return names[:-1]


LAYERS = ("hidden", "conv")


def pruned_layers(params, layers: str = "hidden", keep_whole: Sequence[str] = ()) -> list[str]:
  """The layers whose units shrink: every hidden layer (`"hidden"`), or only the
  convolutions (`"conv"`: channel sparsity in the strict sense; Dense hidden
  layers keep their width), less the layers named in `keep_whole` (e.g. the
  first conv, which sparse-training papers leave dense: Gale et al. 2019,
  Evci et al. 2020)."""
  if layers not in LAYERS:
    raise ValueError(f"--layers={layers!r}: expected one of {', '.join(LAYERS)}")
  names = hidden_layers(params)
  if layers == "conv":
    names = [n for n in names if np.ndim(params[n]["kernel"]) > 2]
    if not names:
      raise train.ConfigError("--layers=conv: the model has no hidden Conv layer")
  for name in keep_whole:
    if name not in names:
      raise train.ConfigError(
        f"--keep_whole={name!r} is not one of the layers --layers={layers} shrinks: "
        f"{', '.join(names)}"
      )
  names = [n for n in names if n not in keep_whole]
  if not names:
    raise train.ConfigError(f"--keep_whole keeps every layer --layers={layers} would shrink")
  return names


def resized(model, widths: Sequence[int]):
  """`model` rebuilt with the hidden widths of a compaction (`Shrunk.widths`)."""
  if isinstance(model, models.CNN):
    n = len(model.channels)
    return model.clone(channels=tuple(int(w) for w in widths[:n]), hidden=int(widths[n]))
  if isinstance(model, models.MLP):
    return model.clone(features=tuple(int(w) for w in widths[:-1]))
  raise ValueError(
    f"shrink: cannot rebuild a {type(model).__name__} with new widths; supported models: "
    "MLP and CNN (plain Dense/Conv-BatchNorm chains)"
  )


SCORES = ("magnitude", "bn_scale", "taylor", "taylor_mean")
RANKINGS = ("layer", "global")


def leaf_pattern(layers: Sequence[str], leaf: str) -> str:
  """The `include` pattern of the `leaf` (e.g. "kernel") of each of `layers`."""
  return "^(" + "|".join(re.escape(n) for n in layers) + f")/{leaf}$"


def batchnorms_after(params, names: Sequence[str], flag: str, hint: str) -> list[str]:
  """The BatchNorm after each of `names` (the layer whose scales rank its units);
  a ConfigError naming `flag` and the layer where there is none."""
  order = infer_layers(params)
  out = []
  for n in names:
    i = order.index(n)
    after = order[i + 1] if i + 1 < len(order) else None
    if after is None or "scale" not in params[after]:
      raise train.ConfigError(
        f"{flag}: layer {n!r} has no BatchNorm scale after it to rank its units by; {hint}"
      )
    out.append(after)
  return out


def check_global_ranking(params, names: Sequence[str], score: str) -> None:
  """`--ranking=global` compares units across layers: kernel norms are not comparable
  there (they depend on fan-in and, under BatchNorm, mean nothing), so it needs
  `--score=bn_scale` with a BatchNorm after every pruned layer, or `--score=taylor`
  or `taylor_mean` (estimated loss changes, comparable in any layer)."""
  if score not in ("bn_scale", "taylor", "taylor_mean"):
    raise train.ConfigError(
      "--ranking=global needs --score=bn_scale, taylor or taylor_mean "
      f"(got --score={score}): "
      "kernel norms of different layers are not comparable"
    )
  if score == "bn_scale":
    batchnorms_after(params, names, "--ranking=global", "use --layers=conv or --ranking=layer")


def bn_l1_penalty(algorithm) -> optax.GradientTransformation | None:
  """Network slimming's sparsity term for the shrink run, or None (`bn_l1` 0).

  `bn_l1 * sign(gamma)` added to the gradients of the scales of the BatchNorms
  after the pruned layers (`jaxprune.regularizers.add_l1_subgradient`; Liu et al.
  2017, whose reference code uses 1e-4) while the pruning schedule runs, 0 from its
  end step on: train with the penalty, prune, fine-tune without it, as the paper.
  """
  cfg = algorithm.config if algorithm is not None else {}
  lam = float(cfg.get("bn_l1") or 0.0)
  if lam == 0.0:
    return None
  end = int(cfg["end_step"])
  include = leaf_pattern(cfg["bn_l1_layers"], "scale")
  return jaxprune.regularizers.add_l1_subgradient(
    lambda count: jnp.where(count < end, lam, 0.0), include
  )


def shrink_algorithm(
  config,
  params,
  target: float,
  schedule: Sequence[float],
  sparsity_type: str,
  score: str = "magnitude",
  layers: str = "hidden",
  ranking: str = "layer",
  keep_whole: Sequence[str] = (),
  bn_l1: float = 0.0,
  layer_targets: Optional[Mapping[str, float]] = None,
  taylor_momentum: float = 0.0,
):
  """Tied gradual pruning of the units of every hidden layer (or of the Conv
  layers only, `layers="conv"`), ranked by the L2 norm of their kernel
  (`score="magnitude"`) or, for a layer followed by a BatchNorm, by the absolute
  BatchNorm scale (`"bn_scale"`, network slimming, Liu et al. 2017;
  `jaxprune.shrink.score_by_batchnorm_scale`) or by the first-order Taylor
  estimate of the loss change when the unit is removed (`"taylor"`, Molchanov
  et al. 2019; `jaxprune.shrink.score_by_taylor`): of the update step's batch
  (`"taylor"`) or its square averaged over the batches since the previous mask
  update (`"taylor_mean"`, the paper's). `ranking="layer"` removes
  `target` of each layer's units (`gradual_magnitude`); `"global"` removes
  `target` of all their units on one threshold of |BatchNorm scale| (network
  slimming's global ranking) or of the Taylor estimate (`global_magnitude` with neuron/channel units;
  each layer keeps at least one unit). `bn_l1 > 0` adds network slimming's L1
  term on those BatchNorm scales while pruning runs (`bn_l1_penalty`; needs
  `score="bn_scale"`). `layer_targets` gives named layers a fraction of their
  own instead of `target` (`jaxprune.per_layer`; per-layer ranking only).
  `taylor_momentum` in (0, 1) ranks `"taylor_mean"` units on a moving average of the
  window means over the mask updates (the reference code's `pruning_momentum`)."""
  if score not in SCORES:
    raise ValueError(f"--score={score!r}: expected one of {', '.join(SCORES)}")
  if ranking not in RANKINGS:
    raise ValueError(f"--ranking={ranking!r}: expected one of {', '.join(RANKINGS)}")
  steps = int(config.steps)
  start, end = (int(round(f * steps)) for f in schedule)
  names = pruned_layers(params, layers, keep_whole)
  if ranking == "global":
    check_global_ranking(params, names, score)
  layer_targets = dict(layer_targets or {})
  if layer_targets and ranking != "layer":
    raise train.ConfigError(
      "--layer_targets sets each named layer's fraction: it needs --ranking=layer "
      f"(got --ranking={ranking}, one threshold over all layers)"
    )
  for name, fraction in layer_targets.items():
    if name not in names:
      raise train.ConfigError(
        f"--layer_targets: {name!r} is not one of the layers this run shrinks "
        f"(--layers={layers}): {', '.join(names)}"
      )
    if not 0.0 < fraction < 1.0:
      raise train.ConfigError(f"--layer_targets: {name}={fraction} must be in (0, 1)")
  if taylor_momentum and score != "taylor_mean":
    raise train.ConfigError(
      f"--taylor_momentum={taylor_momentum} averages the window means of "
      f"--score=taylor_mean (got --score={score})"
    )
  if not 0.0 <= taylor_momentum < 1.0:
    raise train.ConfigError(f"--taylor_momentum must be in [0, 1), got {taylor_momentum}")
  bn_l1_layers = []
  if bn_l1:
    if score != "bn_scale":
      raise train.ConfigError(
        f"--bn_l1={bn_l1} penalises the BatchNorm scales that rank units: it needs "
        f"--score=bn_scale (got --score={score})"
      )
    bn_l1_layers = batchnorms_after(params, names, f"--bn_l1={bn_l1}", "use --layers=conv")
  include = leaf_pattern(names, "kernel")
  algo = jaxprune.create(
    "gradual_magnitude" if ranking == "layer" else "global_magnitude",
    sparsity=float(target),
    distribution=jaxprune.per_layer({f"{n}/kernel": float(f) for n, f in layer_targets.items()})
    if layer_targets
    else "uniform",
    sparsity_type=sparsity_type,
    include=include,
    start_step=start,
    end_step=end,
    update_every=int(config.update_every or 100),
  )
  if score == "bn_scale":
    algo = shrink.score_by_batchnorm_scale(algo)
  elif score == "taylor":
    algo = shrink.score_by_taylor(algo)
  elif score == "taylor_mean":
    algo = shrink.score_by_taylor(algo, average=True, momentum=float(taylor_momentum))
  extra = dict(
    score=score,
    layers=layers,
    ranking=ranking,
    keep_whole=list(keep_whole),
    bn_l1=float(bn_l1),
    bn_l1_layers=bn_l1_layers,
    layer_targets={n: float(f) for n, f in sorted(layer_targets.items())},
    taylor_momentum=float(taylor_momentum),
  )
  return shrink.tie_units(algo)._replace(config={**algo.config, **extra})


def shrink_run_config(config, steps_factor: float):
  """`config` for the shrink run: `steps_factor` times its steps (the same config at 1).

  Training the shrunk model longer than dense, in the time dense training takes or
  less, is the extended-training protocol of RigL (Evci et al. 2020, "RigL 2x/5x").
  Data order does not depend on the number of steps, so the first `config.steps`
  batches are those of the dense run.
  """
  if steps_factor == 1.0:
    return config
  small = config.copy_and_resolve_references()
  small.steps = int(round(steps_factor * int(config.steps)))
  return small


def forward_flops(model, params, batch_stats, input_shape) -> int:
  apply = lambda p, x: model.apply(harness_steps.variables(p, batch_stats), x, train=False)
  return int(jaxprune.flops(apply, params, None, jnp.zeros((1, *input_shape))).dense)


def count(tree) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


# -------------------------------------------------------------------- one run


class Run:
  """One training run that advances in chunks and times itself.

  Args:
    name: "dense" or "shrink".
    config: the experiment config.
    mesh: the device mesh.
    algorithm: the (tied) pruning algorithm, or None for dense training.
    compact_steps: counts of completed steps after which to compact.
    checkpointer: where to save (and resume) the run, or None.
  """

  def __init__(
    self, name, config, mesh, train_source, algorithm=None, compact_steps=(), checkpointer=None
  ):
    t0 = time.perf_counter()
    self.name, self.config, self.mesh = name, config, mesh
    self.train_source = train_source
    self.algorithm = algorithm
    self.compact_steps = sorted(compact_steps)
    self._all_compact_steps = list(self.compact_steps)
    self.checkpointer = checkpointer
    self.schedule = common.learning_rate_schedule(config)
    self.model = models.get_model(config, num_classes=train_source.num_classes)
    self.input_shape = data.input_shape(config)
    self.index = None
    self.dense_mode = algorithm is None
    self.wall_s = self.compile_s = 0.0
    self.compactions: list[dict] = []
    self.phases: list[dict] = []  # [{"from": step, "model": ..., "params": ...}]
    self.chunk_times: list[tuple[int, int, float]] = []  # (first, last, seconds) of steps only
    tx = self._tx(algorithm)
    init = train.make_init(self.model, tx, self.input_shape)
    shapes = jax.eval_shape(init.state, jax.random.PRNGKey(0))
    self.state = train.initial_state(init, int(config.seed), shd.state_shardings(shapes, mesh))
    self.full_params, self.full_stats = self.state.params, self.state.batch_stats
    self.step = 0
    if checkpointer is not None:
      tx = self._restore(tx)
    self._compile(tx)
    self.batches = data.train_batches(config, start_step=self.step, source=train_source)
    jax.block_until_ready(self.state)
    self.wall_s += time.perf_counter() - t0

  # -- pieces

  def _tx(self, algorithm):
    inner = common.optimizer(self.config, self.schedule)
    penalty = bn_l1_penalty(self.algorithm)  # the run's, also once its masks are dropped
    if penalty is not None:
      inner = optax.chain(penalty, inner)
    if algorithm is None:
      return jaxprune.sparsify(inner, jaxprune.create("dense"))
    return jaxprune.sparsify(inner, algorithm)

  def _compile(self, tx) -> float:
    t0 = time.perf_counter()
    shardings = shd.state_shardings(self.state, self.mesh)
    self.state = jax.device_put(self.state, shardings)
    fn = train.make_train_step(
      self.model,
      tx,
      self.schedule,
      self.train_source.num_classes,
      float(self.config.label_smoothing),
    )
    batch = jax.ShapeDtypeStruct(
      (int(self.config.batch_size), *self.input_shape),
      jnp.float32,
      sharding=shd.batch_sharding(self.mesh),
    )
    labels = jax.ShapeDtypeStruct(
      (int(self.config.batch_size),), jnp.int32, sharding=shd.batch_sharding(self.mesh)
    )
    jitted = jax.jit(
      fn,
      in_shardings=(shardings, shd.batch_sharding(self.mesh)),
      out_shardings=(shardings, shd.replicated(self.mesh)),
      donate_argnums=0,
    )
    self.step_fn = jitted.lower(self.state, {"image": batch, "label": labels}).compile()
    seconds = time.perf_counter() - t0
    self.compile_s += seconds
    self.phases.append(
      {
        "from": self.step,
        "model": self.model,
        "params": self.state.params,
        "batch_stats": self.state.batch_stats,
      }
    )
    return seconds

  def _put(self, batch):
    batch = {
      "image": np.asarray(batch["image"], np.float32),
      "label": np.asarray(batch["label"], np.int32),
    }
    return shd.put_batch(batch, self.mesh)

  def _recipe(self) -> dict:
    """What defines the shrink run beyond the config (checked on resume)."""
    keys = (
      "sparsity",
      "sparsity_type",
      "include",
      "start_step",
      "end_step",
      "update_every",
      "score",
      "layers",
      "ranking",
      "keep_whole",
      "bn_l1",
      "layer_targets",
      "taylor_momentum",
    )
    cfg = self.algorithm.config if self.algorithm is not None else {}
    return {
      "algorithm": {k: cfg.get(k) for k in keys},
      "compact_steps": [int(s) for s in self._all_compact_steps],
    }

  def _meta(self) -> dict:
    kept = self.index.to_json() if self.index is not None else {}
    dense_mode = bool(self.dense_mode and self.algorithm is not None)
    return {"shrink": {"kept": kept, "dense_mode": dense_mode, **self._recipe()}}

  def _restore(self, tx):
    """Restores the newest checkpoint (its compacted shapes rebuilt); returns the tx."""
    step = self.checkpointer.latest_step()
    if step is None:
      return tx
    self.checkpointer.verify(step)
    meta = self.checkpointer.read_meta(step)
    ckpt.check_resumable(meta, self.config, step, self.checkpointer.path(step))
    saved = meta.get("shrink", {})
    if "algorithm" in saved:  # checkpoints from before --score / --layers / --ranking
      defaults = {
        "score": "magnitude",
        "layers": "hidden",
        "ranking": "layer",
        "keep_whole": [],
        "bn_l1": 0.0,
        "layer_targets": {},
        "taylor_momentum": 0.0,
      }
      saved["algorithm"] = {**defaults, **saved["algorithm"]}
    recipe = self._recipe()
    for key in recipe:
      if saved.get(key) != recipe[key]:
        raise ckpt.ConfigMismatchError(
          f"checkpoint {self.checkpointer.path(step)} was written by a shrink run with "
          f"{key}={saved.get(key)!r}, this run has {recipe[key]!r} (--target, --schedule, "
          "--compact_at, --steps_factor, --sparsity_type, --score, --layers, --ranking, --keep_whole, "
          "--bn_l1, --layer_targets or --taylor_momentum differ); use another --workdir"
        )
    host = jax.device_get(self.state)
    if saved.get("kept"):
      self.index = shrink.index_from_kept(host.params, saved["kept"], host.batch_stats)
      params, opt_state, stats = shrink.restrict(
        self.index, host.params, host.opt_state, host.batch_stats
      )
      self.model = resized(self.model, [len(self.index.kept[n]) for n in self.index.kept])
      if saved.get("dense_mode"):
        opt_state = shrink.without_masks(opt_state)
        tx = self._tx(None)
      else:
        tx = self._tx(shrink.on_kept_units(self.algorithm, self.index))
      host = host._replace(params=params, opt_state=opt_state, batch_stats=stats)
      self.dense_mode = bool(saved.get("dense_mode"))
    target = ckpt.abstract_state(
      jax.eval_shape(lambda s: s, host), shd.state_shardings(host, self.mesh)
    )
    self.state = self.checkpointer.restore(step, target)
    self.step = step
    self.compact_steps = [s for s in self.compact_steps if s > step]
    return tx

  def _compact(self) -> None:
    t0 = time.perf_counter()
    host = jax.device_get(self.state)
    out = shrink.compact_state(host.params, host.opt_state, host.batch_stats, index=self.index)
    self.index = out.index
    self.model = resized(self.model, out.widths)
    opt_state = out.opt_state
    finished = self.step > int(self.algorithm.config["end_step"]) and not self.compact_steps
    if finished:
      opt_state = shrink.without_masks(opt_state)
      tx = self._tx(None)
      self.dense_mode = True
    else:
      tx = self._tx(shrink.on_kept_units(self.algorithm, self.index))
    self.state = host._replace(params=out.params, opt_state=opt_state, batch_stats=out.batch_stats)
    compact_s = time.perf_counter() - t0
    compile_s = self._compile(tx)
    self.compactions.append(
      {
        "step": self.step,
        "widths": [int(w) for w in out.widths],
        "params": count(out.params),
        "compact_s": round(compact_s, 3),
        "compile_s": round(compile_s, 3),
        "masks_dropped": finished,
      }
    )

  # -- driving

  def advance(self, until: int, stop_at: int | None = None) -> None:
    """Trains up to `until` completed steps (compacting on the way), timed."""
    t0 = time.perf_counter()
    in_flight = train.InFlight()
    while self.step < until:
      if self.compact_steps and self.compact_steps[0] == self.step:
        self.compact_steps.pop(0)
        self._compact()
      t_steps = time.perf_counter()
      first = self.step
      while self.step < until and not (self.compact_steps and self.compact_steps[0] == self.step):
        self.state, metrics = self.step_fn(self.state, self._put(self.batches.batch_at(self.step)))
        in_flight.add(metrics)
        self.step += 1
        if self.checkpointer is not None and (
          self.step % int(self.config.checkpoint_every) == 0 or self.step == int(self.config.steps)
        ):
          jax.block_until_ready(self.state)
          self.checkpointer.save(self.step, self.state, self.config, extra=self._meta())
        if stop_at is not None and self.step >= stop_at:
          until = self.step
          if self.checkpointer is not None:
            jax.block_until_ready(self.state)
            self.checkpointer.save(self.step, self.state, self.config, extra=self._meta())
      jax.block_until_ready(self.state)
      if self.step > first:
        self.chunk_times.append((first, self.step, time.perf_counter() - t_steps))
    if self.compact_steps and self.compact_steps[0] == self.step == int(self.config.steps):
      self.compact_steps.pop(0)
      self._compact()
    jax.block_until_ready(self.state)
    self.wall_s += time.perf_counter() - t0

  def seconds_per_step(self, lo: int, hi: int) -> float | None:
    """Mean seconds per step over the timed chunks entirely inside steps lo+1..hi."""
    inside = [(b - a, t) for a, b, t in self.chunk_times if a >= lo and b <= hi]
    n = sum(k for k, _ in inside)
    return sum(t for _, t in inside) / n if n else None

  def training_flops(self) -> float:
    """Sum over the steps of the forward FLOPs of the model in use at that step."""
    total, steps = 0.0, int(self.config.steps)
    bounds = [p["from"] for p in self.phases] + [steps]
    for phase, lo, hi in zip(self.phases, bounds[:-1], bounds[1:]):
      f = forward_flops(phase["model"], phase["params"], phase["batch_stats"], self.input_shape)
      total += f * max(hi - lo, 0)
    return total


# --------------------------------------------------------------------- results


def evaluate(run: Run, test_source) -> float:
  eval_step = jax.jit(
    train.make_eval_step(run.model, test_source.num_classes), out_shardings=shd.replicated(run.mesh)
  )
  batches = data.eval_batches(run.config, source=test_source)
  return train.evaluate(eval_step, run.state, batches, run.mesh)["accuracy"]


def inference_speedup(dense: Run, small: Run, rounds: int) -> dict:
  """Median latency (ms) of both final models at batch 256, interleaved A B / B A."""
  x = jnp.zeros((INFERENCE_BATCH, *dense.input_shape), jnp.float32)
  fns = {}
  for run in (dense, small):
    variables = harness_steps.variables(run.state.params, run.state.batch_stats)
    f = jax.jit(lambda v, x, m=run.model: m.apply(v, x, train=False))
    fns[run.name] = (f, variables)
  for f, v in fns.values():
    for _ in range(3):
      jax.block_until_ready(f(v, x))
  times = {k: [] for k in fns}
  for r in range(rounds):
    for k in list(fns) if r % 2 == 0 else list(fns)[::-1]:
      f, v = fns[k]
      t0 = time.perf_counter()
      jax.block_until_ready(f(v, x))
      times[k].append(time.perf_counter() - t0)
  ms = {k: 1e3 * statistics.median(t) for k, t in times.items()}
  return {"latency_ms": ms, "speedup": ms["dense"] / ms["shrink"]}


# ------------------------------------------------------------------------- CLI


def _fractions(text: str, flag: str) -> tuple:
  try:
    return tuple(float(x) for x in text.split(",") if x.strip())
  except ValueError:
    raise train.ConfigError(f"{flag}={text!r}: expected comma-separated numbers") from None


def _layer_targets(text: str) -> dict:
  """`--layer_targets` "Conv_0=0.5,Conv_1=0.875" as {layer: fraction}."""
  out = {}
  for item in (t.strip() for t in text.split(",")):
    if not item:
      continue
    name, eq, value = item.partition("=")
    try:
      fraction = float(value)
    except ValueError:
      fraction = None
    if not eq or not name.strip() or fraction is None:
      raise train.ConfigError(
        f"--layer_targets={text!r}: expected comma-separated LAYER=FRACTION, got {item!r}"
      )
    if name.strip() in out:
      raise train.ConfigError(f"--layer_targets={text!r}: {name.strip()!r} is given twice")
    out[name.strip()] = fraction
  return out


def parse_args(argv: Sequence[str]):
  p = argparse.ArgumentParser(
    prog="python -m experiments.shrink", description=__doc__.split("\n")[0]
  )
  p.add_argument(
    "--target", type=float, default=0.75, help="fraction of units removed per hidden layer"
  )
  p.add_argument(
    "--compact_at",
    default=",".join(map(str, DEFAULT_COMPACT_AT)),
    help="fractions of the pruning schedule",
  )
  p.add_argument(
    "--schedule",
    default=",".join(map(str, DEFAULT_SCHEDULE)),
    help="start,end of pruning as fractions of the steps",
  )
  p.add_argument("--sparsity_type", default="channel", choices=("channel", "neuron"))
  p.add_argument(
    "--layers",
    default="hidden",
    choices=LAYERS,
    help="shrink every hidden layer, or the Conv layers only (Dense hidden layers keep their width)",
  )
  p.add_argument(
    "--score",
    default="magnitude",
    choices=SCORES,
    help="unit ranking: kernel L2 norm, |BatchNorm scale| where a BatchNorm follows, or the "
    "first-order Taylor estimate of the loss change when the unit is removed (taylor: the "
    "update step's batch; taylor_mean: its square averaged over the batches since the "
    "previous mask update, the paper's)",
  )
  p.add_argument(
    "--keep_whole",
    default="",
    help="comma-separated layers (e.g. Conv_0) that --layers would shrink but keep every unit",
  )
  p.add_argument(
    "--layer_targets",
    default="",
    help="comma-separated LAYER=FRACTION (e.g. Conv_0=0.5,Conv_1=0.875): the fraction of "
    "those layers' units removed instead of --target (per-layer ranking)",
  )
  p.add_argument(
    "--ranking",
    default="layer",
    choices=RANKINGS,
    help="remove --target of each layer's units, or of all pruned units on one global "
    "threshold (needs --score=bn_scale, network slimming, or --score=taylor/taylor_mean)",
  )
  p.add_argument(
    "--bn_l1",
    type=float,
    default=0.0,
    help="network slimming's L1 weight on the BatchNorm scales of the pruned layers, "
    "added while pruning runs (the paper's 1e-4; needs --score=bn_scale)",
  )
  p.add_argument(
    "--taylor_momentum",
    type=float,
    default=0.0,
    help="with --score=taylor_mean, rank on a moving average (this momentum) of the window "
    "means over the mask updates, as the paper's reference code (0.9 in its configs); "
    "0: the window's mean alone",
  )
  p.add_argument(
    "--steps_factor",
    type=float,
    default=1.0,
    help="the shrink run trains this many times config.steps (its pruning schedule, "
    "compactions and learning-rate schedule span its own steps); dense trains config.steps",
  )
  p.add_argument("--seed", type=int, default=None, help="overrides config.seed")
  p.add_argument("--chunk", type=int, default=100, help="steps per turn of the interleaving")
  p.add_argument("--rounds", type=int, default=20, help="inference latency rounds")
  p.add_argument("--workdir", default=None, help="checkpoint (and resume) the shrink run here")
  p.add_argument(
    "--skip_dense",
    action="store_true",
    help="train only the shrink run (dense figures null; compare with an earlier run of the seed)",
  )
  p.add_argument("--stop_at", type=int, default=None, help=argparse.SUPPRESS)
  args, rest = p.parse_known_args(argv[1:])
  unknown = [a for a in rest if not a.startswith("--config")]
  if unknown:
    p.error(f"unrecognised arguments: {' '.join(unknown)}")
  config = train.parse_config([argv[0], *rest])
  if args.seed is not None:
    config.seed = int(args.seed)
  if not 0.0 < args.target < 1.0:
    raise train.ConfigError(f"--target must be in (0, 1), got {args.target}")
  args.compact_at = _fractions(args.compact_at, "--compact_at")
  args.keep_whole = tuple(n.strip() for n in args.keep_whole.split(",") if n.strip())
  args.layer_targets = _layer_targets(args.layer_targets)
  args.schedule = _fractions(args.schedule, "--schedule")
  if len(args.schedule) != 2 or not 0.0 <= args.schedule[0] < args.schedule[1] <= 1.0:
    raise train.ConfigError(
      f"--schedule must be start,end with 0 <= start < end <= 1, got {args.schedule}"
    )
  if not args.steps_factor > 0.0 or int(round(args.steps_factor * int(config.steps))) < 1:
    raise train.ConfigError(
      f"--steps_factor must be > 0 and leave the shrink run at least one step, got "
      f"{args.steps_factor} (config.steps={config.steps})"
    )
  if not args.bn_l1 >= 0.0:
    raise train.ConfigError(f"--bn_l1 must be >= 0, got {args.bn_l1}")
  if args.chunk < 1:
    raise train.ConfigError(f"--chunk must be >= 1, got {args.chunk}")
  return args, config


def run(args, config, out=None) -> dict:
  out = out or sys.stdout
  say = lambda *a: print(*a, file=out, flush=True)
  mesh = shd.make_mesh(False)
  shd.check_batch_size(int(config.batch_size), mesh)
  steps = int(config.steps)
  small_config = shrink_run_config(config, args.steps_factor)
  small_steps = int(small_config.steps)

  # Validate before reading data: the model must be a chain compact handles.
  model = models.get_model(config)
  shapes = jax.eval_shape(
    lambda: models.init_variables(model, jax.random.PRNGKey(0), data.input_shape(config))
  )
  variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  algorithm = shrink_algorithm(
    small_config,
    variables["params"],
    args.target,
    args.schedule,
    args.sparsity_type,
    args.score,
    args.layers,
    args.ranking,
    args.keep_whole,
    args.bn_l1,
    args.layer_targets,
    args.taylor_momentum,
  )
  compact_steps = shrink.compaction_steps(algorithm, args.compact_at, small_steps)
  probe = jaxprune.sparsify(common.optimizer(config), algorithm)
  shrink.compact_state(
    variables["params"], probe.init(variables["params"]), variables.get("batch_stats")
  )
  resized(model, [1] * 8)
  del variables, probe

  spec = data.get_spec(config)
  train_source = train.load_split(config, spec.train_split)
  test_source = train.load_split(config, spec.eval_split)
  if train_source.num_classes != model.num_classes:
    raise train.ConfigError(
      f"config.num_classes={config.num_classes} but the dataset has "
      f"{train_source.num_classes} classes"
    )

  checkpointer = ckpt.Checkpointer(args.workdir) if args.workdir else None
  say(
    f"[shrink] {config.name}: target {args.target} {args.sparsity_type} sparsity "
    f"({args.layers} layers"
    + (f" but {', '.join(args.keep_whole)}" if args.keep_whole else "")
    + (
      " with " + ", ".join(f"{n} {f}" for n, f in args.layer_targets.items())
      if args.layer_targets
      else ""
    )
    + f", {args.ranking} ranking by {args.score}"
    + (f" (momentum {args.taylor_momentum})" if args.taylor_momentum else "")
    + (f", L1 {args.bn_l1} on BatchNorm scales" if args.bn_l1 else "")
    + "), schedule "
    f"{algorithm.config['start_step']}..{algorithm.config['end_step']} every "
    f"{algorithm.config['update_every']}, compactions after steps {compact_steps}, "
    f"{small_steps} steps (dense {steps}), seed {config.seed}, {shd.describe(mesh)}, data {train_source!r}"
  )
  try:
    dense = Run("dense", config, mesh, train_source) if args.stop_at is None else None
    small = Run("shrink", small_config, mesh, train_source, algorithm, compact_steps, checkpointer)
    runs = [small] if dense is None or args.skip_dense else [dense, small]
    last_step = max(int(r.config.steps) for r in runs)
    for i, lo in enumerate(range(0, last_step, args.chunk)):
      hi = min(lo + args.chunk, last_step)
      for r in runs if i % 2 == 0 else runs[::-1]:
        until = min(hi, int(r.config.steps))
        if r.step < until:
          r.advance(until, stop_at=args.stop_at if r.name == "shrink" else None)
      if (i + 1) % 10 == 0 or hi == last_step:
        say(
          f"[shrink] step {hi}: "
          + ", ".join(f"{r.name} {r.wall_s:.1f} s (compile {r.compile_s:.1f} s)" for r in runs)
        )
      if args.stop_at is not None and runs[-1].step >= args.stop_at:
        say(f"[shrink] stopped at step {runs[-1].step}")
        return {"stopped_at": runs[-1].step}
  finally:
    if checkpointer is not None:
      checkpointer.close()
  trained = dense is not None and not args.skip_dense  # else: dense only gives shapes
  for c in small.compactions:
    say(
      f"[shrink] compaction after step {c['step']}: widths {c['widths']}, compact {c['compact_s']} s, compile {c['compile_s']} s"
    )
  last = small.compactions[-1]["step"] if small.compactions else small_steps
  tail_dense = dense.seconds_per_step(last, steps) if trained else None
  tail_shrink = small.seconds_per_step(last, small_steps)
  latency = inference_speedup(dense, small, args.rounds)
  dense_flops = dense.training_flops()
  result = {
    "config": config.name,
    "dataset": train_source.dataset,
    "seed": int(config.seed),
    "steps": steps,
    "shrink_steps": small_steps,
    "target": args.target,
    "sparsity_type": args.sparsity_type,
    "score": args.score,
    "layers": args.layers,
    "ranking": args.ranking,
    "keep_whole": list(args.keep_whole),
    "layer_targets": dict(args.layer_targets),
    "bn_l1": args.bn_l1,
    "taylor_momentum": args.taylor_momentum,
    "schedule": [int(algorithm.config["start_step"]), int(algorithm.config["end_step"])],
    "update_every": int(algorithm.config["update_every"]),
    "compact_at": list(args.compact_at),
    "dense_accuracy": evaluate(dense, test_source) if trained else None,
    "shrink_accuracy": evaluate(small, test_source),
    "dense_wall_s": round(dense.wall_s, 3) if trained else None,
    "shrink_wall_s": round(small.wall_s, 3),
    "speedup_wall": dense.wall_s / small.wall_s if trained else None,
    "dense_compile_s": round(dense.compile_s, 3) if trained else None,
    "shrink_compile_s": round(small.compile_s, 3),
    "compactions": small.compactions,
    "speedup_after_last_compaction": tail_dense / tail_shrink
    if tail_dense and tail_shrink
    else None,
    "ideal_speedup_flops": dense_flops / small.training_flops(),
    "final_params_ratio": count(small.state.params) / count(dense.state.params),
    "final_flops_ratio": forward_flops(
      small.model, small.state.params, small.state.batch_stats, small.input_shape
    )
    / forward_flops(dense.model, dense.state.params, dense.state.batch_stats, dense.input_shape),
    "inference_speedup": latency["speedup"],
    "inference_latency_ms": {k: round(v, 4) for k, v in latency["latency_ms"].items()},
    "widths_before": [
      int(np.shape(dense.state.params[n]["kernel"])[-1]) for n in hidden_layers(dense.state.params)
    ],
    "widths_after": [
      int(np.shape(small.state.params[n]["kernel"])[-1]) for n in hidden_layers(small.state.params)
    ],
    "devices": jax.device_count(),
    "chunk": args.chunk,
    "skip_dense": bool(args.skip_dense),
  }
  say(json.dumps(result))
  return result


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv if argv is None else argv)
  try:
    args, config = parse_args(argv)
    run(args, config)
  except (train.ConfigError, ckpt.CheckpointError, data.DatasetNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
