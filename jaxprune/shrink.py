"""Shrink while training: physically compact the whole training state, keep training.

Neuron and channel pruning (Li et al. 2017, "Pruning Filters for Efficient
ConvNets"; Liu et al. 2017, "Learning Efficient Convolutional Networks through
Network Slimming") on the gradual schedule of Zhu & Gupta (2017, "To prune, or
not to prune") makes training cheaper only once the pruned units are gone. The
pure pieces here let a training loop remove them at a few chosen steps and go on
with smaller arrays, computing what the masked full-size model computes:

* :func:`tie_units` wraps a neuron/channel algorithm so that a unit's bias and
  the BatchNorm scale and offset that follow it share the kernel's unit mask. A
  removed unit then outputs exactly 0 in training mode (batch statistics) and in
  inference mode (running averages) alike, so removing it needs no folding of
  constants into the next layer and works before SAME-padded convolutions. The
  next layer's weights that read a removed unit are masked too, so the masked
  full-size model holds exactly the weights the compacted one keeps (no stale
  weight enters a unit's score, a norm or an optimizer statistic).
* :func:`score_by_batchnorm_scale` ranks the units of a layer followed by a
  BatchNorm by the absolute BatchNorm scale (network slimming's criterion)
  instead of the kernel's norm, which BatchNorm makes meaningless.
  :func:`score_by_taylor` ranks units by the first-order Taylor estimate of
  the loss change when the unit and its bias and BatchNorm are removed
  (Molchanov et al. 2019), from the gradients of the update step or, as in the
  paper, averaged over the batches between mask updates (``average=True``).
  Both live in :mod:`jaxprune.unit_scores` and are re-exported here.
* :func:`compact_state` removes the pruned units from params, BatchNorm
  statistics and the optimizer state -- every leaf of an optimizer-state
  sub-tree shaped like the params (Adam's moments, momentum traces, the masks of
  :func:`jaxprune.sparsify`) is sliced with its parameter; scalars (step counts)
  are kept. Nothing is reset: the next step on the small model equals the next
  step of the masked full model restricted to the kept units, and a run
  compacted at any steps chooses the same units as the masked full run.
* :func:`on_kept_units` runs an algorithm on the compacted model as if on the
  full one: on update steps the small params, gradients and masks are scattered
  back into the original shapes (removed units pruned), the algorithm updates
  the masks there, and the result is sliced again. Keep counts therefore follow
  the original widths: a schedule that keeps ``G - floor(s G)`` of a layer's
  ``G`` units keeps exactly as many after a compaction.
* :class:`UnitIndex` records which original units every axis of every leaf
  holds (composed over successive compactions); :func:`restrict` applies it to a
  full-size state (checkpoint targets, tests).

The model must be a plain Dense/Conv(-BatchNorm) chain that
:func:`jaxprune.compact.compact` supports; anything else raises its error
naming the layer. See docs/shrink.md for a guide.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune.algorithms.base import Algorithm
from jaxprune.compact import compact
from jaxprune.layer_chain import get_path, layer_chain, replace_path, tied_leaves, to_dict
from jaxprune.masks import dense_mask, is_pruned_mask
from jaxprune.paths import path_str
from jaxprune.sparsify import SparseState, get_sparse_state
from jaxprune.structured import Units, parse_sparsity_type
from jaxprune.unit_scores import (
  TaylorAverageState,
  batchnorm_scale_scores,
  score_by_batchnorm_scale,
  score_by_taylor,
  taylor_unit_estimates,
  taylor_unit_scores,
  unit_scores_as_kernels,
)

__all__ = [
  "UnitIndex",
  "Shrunk",
  "tie_units",
  "tie_masks",
  "batchnorm_scale_scores",
  "score_by_batchnorm_scale",
  "taylor_unit_estimates",
  "unit_scores_as_kernels",
  "taylor_unit_scores",
  "TaylorAverageState",
  "score_by_taylor",
  "identity_index",
  "index_from_kept",
  "compact_state",
  "restrict",
  "on_kept_units",
  "compaction_steps",
  "without_masks",
]


class UnitIndex(NamedTuple):
  """Which original units the current (compacted) arrays hold.

  Attributes:
    full_shapes: ``{param path: original shape}`` of every parameter leaf.
    params_axes: ``{param path: per-axis original indices}``: a tuple with one
      entry per axis, an int array of the kept original indices or None (all).
    stats_axes: the same for the ``batch_stats`` leaves.
    kept: ``{layer path: original indices of its kept output units}``.
  """

  full_shapes: dict
  params_axes: dict
  stats_axes: dict
  kept: dict

  def to_json(self) -> dict:
    """The kept units per layer, JSON-ready (what a checkpoint records)."""
    return {k: [int(i) for i in v] for k, v in self.kept.items()}


class Shrunk(NamedTuple):
  """Result of :func:`compact_state`.

  Attributes:
    params, opt_state, batch_stats: the compacted training state.
    index: the cumulative :class:`UnitIndex` (original numbering).
    features: ``{layer path: new output width}`` of the Dense/Conv layers.
    widths: the new output widths in forward order (the last one unchanged).
  """

  params: Any
  opt_state: Any
  batch_stats: Any
  index: UnitIndex
  features: dict
  widths: list


# ---------------------------------------------------------------- tree helpers


def _take(x, axes):
  for a, idx in enumerate(axes):
    if idx is not None:
      x = (
        jnp.take(x, jnp.asarray(idx), axis=a)
        if isinstance(x, jax.core.Tracer)
        else (np.take(np.asarray(x), idx, axis=a))
      )
  return x


def _expand(x, axes, full_shape, mask: bool = False):
  """``x`` scattered into an array of ``full_shape``.

  The rest is 0, or for a mask (``mask=True``) False on the removed output
  units (last axis) and True on the removed inputs of kept units: a kept unit
  stays whole, its weights from removed inputs are 0.
  """
  if np.ndim(x) == 0 or all(a is None for a in axes):
    return x
  idx = np.ix_(*[np.arange(n) if a is None else np.asarray(a) for a, n in zip(axes, full_shape)])
  if not mask:
    return jnp.zeros(full_shape, jnp.result_type(x)).at[idx].set(x)
  alive = np.ones(full_shape[-1], bool)
  if axes[-1] is not None:
    alive[:] = False
    alive[np.asarray(axes[-1])] = True
  base = jnp.broadcast_to(jnp.asarray(alive), full_shape)
  return base.at[idx].set(x)


def _is_masked_node(x):
  return isinstance(x, optax.MaskedNode)


def _restrict_like_params(tree, params, axes: dict, what: str):
  """Slices every leaf of every sub-tree of ``tree`` shaped like ``params``.

  A leaf is sliced when its parameter has an entry in ``axes`` and the leaf has
  the parameter's shape; scalar leaves (scalar masks, counts) are kept; a
  non-scalar leaf of another shape cannot be sliced and raises ValueError.
  """
  pdef = jax.tree.structure(params)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  plan = [(path_str(p), np.shape(x), axes.get(path_str(p))) for p, x in flat]

  def matches(node):
    return jax.tree.structure(node, is_leaf=_is_masked_node) == pdef

  def leaf(x, path, shape, ax):
    if ax is None or _is_masked_node(x) or np.ndim(x) == 0:
      return x
    if np.shape(x) != shape:
      raise ValueError(
        f"shrink: the {what} leaf of {path!r} has shape {np.shape(x)}, not the parameter's "
        f"{shape}; per-parameter state of another shape (e.g. factored statistics) "
        "cannot be compacted"
      )
    return _take(x, ax)

  def restrict_node(node):
    if not matches(node):
      return node
    leaves = jax.tree.leaves(node, is_leaf=_is_masked_node)
    return jax.tree.unflatten(pdef, [leaf(x, *p) for x, p in zip(leaves, plan)])

  return jax.tree.map(restrict_node, tree, is_leaf=matches)


def _restrict_by_path(tree, axes: dict):
  if tree is None:
    return None
  return jax.tree_util.tree_map_with_path(
    lambda p, x: _take(x, axes[path_str(p)]) if path_str(p) in axes else x, tree
  )


# ------------------------------------------------------------------ tied masks


def _unit_vector(kernel_mask):
  m = jnp.asarray(kernel_mask)
  return jnp.any(m.reshape(-1, m.shape[-1]), axis=0)


def tie_masks(
  params, masks, layers: Optional[Sequence[str]] = None, pruned: Optional[Sequence[str]] = None
):
  """``masks`` with every pruned unit's bias, BatchNorm and outgoing weights masked too.

  For each Dense/Conv layer of the chain whose kernel mask is full-shape, the
  layer's bias mask and the masks of the BatchNorm parameters that follow it
  become the kernel's unit vector (True where a kernel column has a True entry),
  and the input rows of the next layer's kernel that read a pruned unit are
  masked (through a Conv -> Dense flatten, every spatial position's row). The
  masked full-size model then holds exactly the weights the compacted model
  keeps: no stale weight behind a removed unit enters a score, a norm or an
  optimizer statistic, so a run compacted at any step chooses the same units
  and takes the same steps as the masked full-size run.

  ``pruned`` names the layers whose units are pruned; by default those whose
  kernel mask is full-shape (pass it when a masks tree that was tied before
  comes back: the next layers' kernel masks are full-shape then).

  Raises:
    ValueError: when the output layer's kernel is pruned (its units are the
      model's outputs and are never removed; exclude it with ``include``), and
      naming the layer whose kernel does not read the previous layer's units.
  """
  chain = layer_chain(params, layers)
  masks = to_dict(masks)
  if pruned is None:
    pruned = [lin for lin, _ in chain if is_pruned_mask(get_path(masks, f"{lin}/kernel"))]
  for i, (lin, bn) in enumerate(chain):
    if lin not in pruned:
      continue
    kmask = get_path(masks, f"{lin}/kernel")
    if i == len(chain) - 1:
      raise ValueError(
        f"shrink: the output layer {lin!r} is pruned; its units are the model's "
        "outputs and cannot be removed -- exclude it with include= (e.g. a regex on "
        "the hidden layers' kernels)"
      )
    unit = _unit_vector(kmask)
    for path in tied_leaves(params, lin, bn):
      masks = replace_path(masks, path, unit)
    nxt = f"{chain[i + 1][0]}/kernel"
    masks = replace_path(
      masks, nxt, _mask_inputs(get_path(params, nxt), get_path(masks, nxt), unit, nxt)
    )
  return masks


def _untie_inputs(params, masks, layers, pruned):
  """Undoes the input-row masking of :func:`tie_masks` for the layers in
  ``pruned``: the next kernel's mask is whole units again (the rows that read a
  removed unit take their column's value; their weights are exactly 0), or
  dense when that layer is not pruned -- the masks the algorithm made, as it
  would see them on the compacted model."""
  chain = layer_chain(params, layers)
  masks = to_dict(masks)
  for i, (lin, _) in enumerate(chain[:-1]):
    if lin not in pruned:
      continue
    nxt_layer = chain[i + 1][0]
    nxt = f"{nxt_layer}/kernel"
    if nxt_layer not in pruned:
      masks = replace_path(masks, nxt, dense_mask())
      continue
    nmask = get_path(masks, nxt)
    unit = _unit_vector(get_path(masks, f"{lin}/kernel"))
    rows = jnp.tile(unit, nmask.shape[-2] // unit.shape[0])[:, None]
    masks = replace_path(masks, nxt, jnp.where(rows, nmask, _unit_vector(nmask)))
  return masks


def _pruned_layers(algorithm: Algorithm, params, layers) -> list[str]:
  """The chain's layers whose kernels ``algorithm`` prunes (full-shape masks
  from its ``init``; shapes only, nothing computed)."""
  masks = jax.eval_shape(lambda p: algorithm.init(p)[0], params)
  return [lin for lin, _ in layer_chain(params, layers) if get_path(masks, f"{lin}/kernel").shape]


def _mask_inputs(kernel, kmask, unit, path: str):
  """The full-shape mask of ``kernel`` with the input rows that read a False
  entry of ``unit`` masked (``unit`` tiled over the spatial positions of a
  Conv -> Dense flatten, whose rows are ``(position, channel)`` row-major)."""
  shape = jnp.shape(kernel)
  n_in, n_units = shape[-2], unit.shape[0]
  if n_in % n_units:
    raise ValueError(
      f"shrink: {path!r} has {n_in} input rows, not a multiple of the {n_units} units "
      "of the layer before it; the layers do not form a chain"
    )
  rows = jnp.tile(unit, n_in // n_units)[:, None]
  return jnp.broadcast_to(jnp.asarray(kmask, jnp.bool_), shape) & rows


def tie_units(algorithm: Algorithm, layers: Optional[Sequence[str]] = None) -> Algorithm:
  """``algorithm`` with each pruned unit's bias and BatchNorm parameters pruned with it.

  Network slimming (Liu et al. 2017) prunes a channel together with its
  BatchNorm scale; here the bias and BatchNorm offset go too, so a pruned unit's
  output is exactly 0 in training and inference mode (see the module doc).

  Args:
    algorithm: a neuron/channel algorithm (``sparsity_type="neuron"`` or
      ``"channel"``), e.g. ``jaxprune.create("gradual_magnitude", ...)``.
    layers: the forward order of the layers as in
      :func:`jaxprune.compact.compact`; None infers it from Flax auto-names.

  Raises:
    ValueError: for another ``sparsity_type``.
  """
  stype = algorithm.config.get("sparsity_type", "unstructured")
  if not isinstance(parse_sparsity_type(stype), Units):
    raise ValueError(
      f"tie_units: {algorithm.name} has sparsity_type={stype!r}; shrinking needs whole "
      "units: sparsity_type='neuron' or 'channel'"
    )

  def init(params):
    masks, state = algorithm.init(params)
    return tie_masks(params, masks, layers, _pruned_layers(algorithm, params, layers)), state

  def update(step, params, grads, masks, state):
    pruned = _pruned_layers(algorithm, params, layers)
    masks = _untie_inputs(params, masks, layers, pruned)
    masks, state = algorithm.update(step, params, grads, masks, state)
    return tie_masks(params, masks, layers, pruned), state

  return algorithm._replace(init=init, update=update)


# -------------------------------------------------------------------- indices


def identity_index(params, batch_stats=None) -> UnitIndex:
  """The :class:`UnitIndex` of an uncompacted model (every unit kept)."""
  shapes = {
    path_str(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
  }
  return UnitIndex(shapes, {}, {}, {})


def index_from_kept(
  params, kept: Mapping, batch_stats=None, *, layers: Optional[Sequence[str]] = None
) -> UnitIndex:
  """The :class:`UnitIndex` of full-size ``params`` keeping ``kept`` units.

  ``kept`` is ``{layer path: original indices of its kept output units}`` (as
  :meth:`UnitIndex.to_json` records it); layers not listed keep every unit.
  With :func:`restrict` this rebuilds a compacted state's shapes, e.g. the
  restore target of a checkpoint written after a compaction.
  """
  params = to_dict(params)
  chain = layer_chain(params, layers)
  names = {lin for lin, _ in chain}
  for name in kept:
    if name not in names:
      raise ValueError(f"index_from_kept: {name!r} is not a Dense/Conv layer of the chain")
  kept = {k: np.asarray(v, np.int64) for k, v in kept.items()}
  params_axes, stats_axes = _current_axes(params, chain, kept)
  full = identity_index(params).full_shapes
  kept_all = {
    lin: kept.get(lin, np.arange(np.shape(get_path(params, lin)["kernel"])[-1])) for lin, _ in chain
  }
  return UnitIndex(full, params_axes, stats_axes, kept_all)


def _current_axes(params, chain, kept: dict):
  """Per-axis indices (current numbering) of every leaf after keeping ``kept`` units."""
  params_axes, stats_axes = {}, {}
  prev = None  # (indices or None, current width, is conv)
  for i, (lin, bn) in enumerate(chain):
    kernel = get_path(params, lin)["kernel"]
    nd, n_out = np.ndim(kernel), np.shape(kernel)[-1]
    keep = np.asarray(kept.get(lin, np.arange(n_out)))
    out_idx = None if i == len(chain) - 1 or keep.size == n_out else keep
    in_idx = None
    if prev is not None and prev[0] is not None:
      p_idx, p_width, p_conv = prev
      if p_conv and nd == 2:  # flatten (or global pooling) between a Conv and a Dense
        spatial = np.shape(kernel)[0] // p_width
        in_idx = (np.arange(spatial)[:, None] * p_width + p_idx[None, :]).reshape(-1)
      else:
        in_idx = p_idx
    axes = [None] * nd
    axes[-1], axes[-2] = out_idx, in_idx
    if any(a is not None for a in axes):
      params_axes[f"{lin}/kernel"] = tuple(axes)
    if out_idx is not None:
      if "bias" in get_path(params, lin):
        params_axes[f"{lin}/bias"] = (out_idx,)
      if bn is not None:
        for k in get_path(params, bn):
          params_axes[f"{bn}/{k}"] = (out_idx,)
        for k in ("mean", "var"):
          stats_axes[f"{bn}/{k}"] = (out_idx,)
    prev = (out_idx, n_out, nd > 2)
  return params_axes, stats_axes


def _compose_axes(old: dict, new: dict, ndims: dict) -> dict:
  out = {}
  for path in set(old) | set(new):
    o = old.get(path, (None,) * ndims[path])
    n = new.get(path, (None,) * ndims[path])
    out[path] = tuple(
      b if a is None else (a if b is None else np.asarray(a)[np.asarray(b)]) for a, b in zip(o, n)
    )
  return out


def restrict(index: UnitIndex, params, opt_state=None, batch_stats=None):
  """A full-size training state sliced to the units ``index`` keeps.

  Returns ``(params, opt_state, batch_stats)``, the optimizer state sliced as in
  :func:`compact_state`. Used to build checkpoint restore targets and to compare
  a compacted run with the masked full-size one.
  """
  small = _restrict_by_path(params, index.params_axes)
  opt = None
  if opt_state is not None:
    opt = _restrict_like_params(opt_state, params, index.params_axes, "optimizer state")
  return small, opt, _restrict_by_path(batch_stats, index.stats_axes)


# ------------------------------------------------------------------ compaction


def compact_state(
  params,
  opt_state,
  batch_stats=None,
  *,
  masks=None,
  layers: Optional[Sequence[str]] = None,
  index: Optional[UnitIndex] = None,
  tx: Optional[optax.GradientTransformation] = None,
) -> Shrunk:
  """Removes the pruned units from params, optimizer state and BatchNorm statistics.

  Args:
    params: the params (nested dicts of a Dense/Conv(-BatchNorm) chain).
    opt_state: any optax state: of ``jaxprune.sparsify(...)`` (its masks are
      used and compacted too) or of a plain optax transformation (pass
      ``masks``). Every leaf of a sub-tree shaped like ``params`` with its
      parameter's shape is sliced with the parameter (Adam's moments, momentum,
      masks); everything else (counts, scalar masks) is kept as it is. The
      next step then equals that of the masked full model for transformations
      that act per entry or through norms (SGD, Adam, LAMB, LARS, gradient
      clipping; tested); one that averages over a leaf (``optax.centralize``)
      sees the smaller size and differs.
    batch_stats: the BatchNorm statistics, when the model has BatchNorm.
    masks: the masks; default those of the sparse state in ``opt_state``. The
      units must be pruned whole, with their bias and BatchNorm parameters
      (:func:`tie_units`).
    layers: forward order of the layers (:func:`jaxprune.compact.compact`).
    index: the :class:`UnitIndex` of the state as given (after earlier
      compactions); None for an uncompacted state.
    tx: the transformation ``opt_state`` belongs to (optional). When given, the
      sliced state is checked against ``tx.init`` of the small params (shapes
      only, nothing computed), so per-parameter state that cannot be sliced
      (the factored statistics of ``optax.sm3``, ``optax.adafactor``) raises
      naming the state leaf instead of failing inside the next step.

  Returns:
    :class:`Shrunk`. Rebuild the model with ``widths`` (or ``features``).

  Raises:
    ValueError: from :func:`jaxprune.compact.compact` for a model it cannot
      handle (naming the layer), and naming the layer whose removed units do not
      output exactly 0 (bias or BatchNorm not pruned with the unit).
  """
  params = to_dict(params)
  batch_stats = to_dict(batch_stats) if batch_stats else None
  if masks is None:
    masks = get_sparse_state(opt_state).masks
  out = compact(params, masks, batch_stats, layers=layers)
  for name, note in out.notes.items():
    raise ValueError(
      f"shrink: layer {name!r}: {note}. Prune each unit with its bias and BatchNorm "
      "parameters (jaxprune.shrink.tie_units) so that removed units output exactly 0"
    )
  chain = layer_chain(params, layers)
  params_axes, stats_axes = _current_axes(params, chain, out.kept)
  small = _restrict_by_path(params, params_axes)
  for (p, expected), got in zip(
    jax.tree_util.tree_flatten_with_path(out.params)[0], jax.tree.leaves(small)
  ):
    if not np.array_equal(np.asarray(expected), np.asarray(got)):
      layer = path_str(p).rsplit("/", 1)[0]
      raise ValueError(
        f"shrink: layer {layer!r}: removing its pruned inputs changes {path_str(p)!r} "
        "(their constant output is not 0). Prune each unit with its bias and BatchNorm "
        "parameters (jaxprune.shrink.tie_units)"
      )
  opt = _restrict_like_params(opt_state, params, params_axes, "optimizer state")
  if tx is not None:
    _check_like_init(tx, small, opt)
  stats = _restrict_by_path(batch_stats, stats_axes)

  index = index if index is not None else identity_index(params)
  ndims = {k: len(v) for k, v in index.full_shapes.items()}
  kept = {}
  for lin, _ in chain:
    old = index.kept.get(lin)
    cur = np.asarray(out.kept[lin])
    kept[lin] = cur if old is None else np.asarray(old)[cur]
  stat_ndims = {k: 1 for k in set(index.stats_axes) | set(stats_axes)}
  new_index = UnitIndex(
    index.full_shapes,
    _compose_axes(index.params_axes, params_axes, ndims),
    _compose_axes(index.stats_axes, stats_axes, stat_ndims),
    kept,
  )
  to_jnp = lambda t: jax.tree.map(jnp.asarray, t)
  return Shrunk(
    to_jnp(small),
    to_jnp(opt),
    to_jnp(stats) if stats is not None else batch_stats,
    new_index,
    dict(out.features),
    list(out.widths),
  )


def _check_like_init(tx, params, opt_state) -> None:
  """Raises ValueError naming the first leaf of ``opt_state`` whose shape differs
  from that of ``tx.init(params)``."""
  want = jax.eval_shape(tx.init, params)
  got_flat, got_def = jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=_is_masked_node)
  want_flat, want_def = jax.tree_util.tree_flatten_with_path(want, is_leaf=_is_masked_node)
  if got_def != want_def:
    raise ValueError(
      "shrink: the compacted optimizer state is not structured like tx.init of the "
      f"small params: {got_def} vs {want_def}"
    )
  for (path, x), (_, y) in zip(got_flat, want_flat):
    if not _is_masked_node(x) and np.shape(x) != tuple(y.shape):
      raise ValueError(
        f"shrink: optimizer state leaf {jax.tree_util.keystr(path)} has shape "
        f"{np.shape(x)} after compaction, but the small model's state needs {tuple(y.shape)}: "
        "per-parameter state of another shape than its parameter (e.g. factored "
        "statistics) cannot be compacted"
      )


# ---------------------------------------------------------------- the schedule


def on_kept_units(algorithm: Algorithm, index: UnitIndex) -> Algorithm:
  """``algorithm`` run on a compacted model as if on the original full-size one.

  On each update step the small params, gradients and masks are scattered back
  into the original shapes (removed units: zero weights, False masks), the
  algorithm updates the masks there (keep counts of the original widths; removed
  units score -inf and never return) and the new masks are sliced again. The
  scatter costs full-size work on update steps only. The algorithm only ever
  sees the original shapes, so its state (per-unit accumulators such as
  :class:`TaylorAverageState` included) stays in the original numbering and
  passes through compactions unchanged.

  Returns the algorithm with the same name, config and schedule.
  """
  axes, shapes = index.params_axes, index.full_shapes

  def expand(tree, mask=False):
    return jax.tree_util.tree_map_with_path(
      lambda p, x: (
        _expand(x, axes[path_str(p)], shapes[path_str(p)], mask) if path_str(p) in axes else x
      ),
      tree,
    )

  def shrink(tree):
    return jax.tree_util.tree_map_with_path(
      lambda p, x: _take(x, axes[path_str(p)]) if path_str(p) in axes and np.ndim(x) > 0 else x,
      tree,
    )

  def init(params):
    masks, state = algorithm.init(expand(params))
    return shrink(masks), state

  def update(step, params, grads, masks, state):
    new, state = algorithm.update(
      step, expand(params), expand(grads), expand(masks, mask=True), state
    )
    return shrink(new), state

  return algorithm._replace(init=init, update=update)


def compaction_steps(algorithm: Algorithm, fractions: Sequence[float], total_steps: int) -> list:
  """Steps (counts of completed steps) after which to compact.

  A fraction ``f`` of the pruning schedule ``[start_step, end_step]`` maps to
  the last mask update at or before ``start_step + f (end_step - start_step)``;
  the compaction follows the step that applied it. Duplicates are merged.

  Raises:
    ValueError: naming the fraction, for ``f <= 0`` (at or before the schedule
      starts: nothing is pruned yet), an ``f`` whose last update is the one at
      ``start_step`` (which prunes nothing from ``initial_sparsity=0``),
      ``f > 1`` (after it ends), or a step
      beyond ``total_steps``; and for an algorithm without ``end_step``.
  """
  cfg = algorithm.config
  t0, t1, every = cfg.get("start_step") or 0, cfg.get("end_step"), cfg.get("update_every") or 1
  if t1 is None or t1 <= t0:
    raise ValueError(
      f"compact_at needs a gradual schedule with end_step > start_step; {algorithm.name} "
      f"has start_step={t0}, end_step={t1}"
    )
  steps = []
  for f in fractions:
    f = float(f)
    if not 0.0 < f <= 1.0:
      where = "at or before the pruning schedule starts" if f <= 0 else "after it ends"
      raise ValueError(
        f"compact_at={f} is {where} (fractions of the schedule start_step={t0} .. "
        f"end_step={t1} must be in (0, 1]); nothing would be compacted there"
      )
    t = t0 + f * (t1 - t0)
    last_update = t1 if t >= t1 else t0 + int((t - t0) // every) * every
    if last_update == t0 and not cfg.get("initial_sparsity"):
      raise ValueError(
        f"compact_at={f} maps to the mask update at start_step={t0}, which prunes nothing "
        f"yet (the schedule starts at initial_sparsity=0); the first update that prunes is "
        f"at step {t0 + every} (compact_at >= {every / (t1 - t0):g})"
      )
    step = int(last_update) + 1
    if step > total_steps:
      raise ValueError(
        f"compact_at={f}: the mask update at step {last_update} is applied after "
        f"{step} steps, beyond the {total_steps} training steps"
      )
    steps.append(step)
  return sorted(set(steps))


def without_masks(opt_state: SparseState, algo_state=()) -> SparseState:
  """The sparse state with scalar-True masks, once every mask is all True.

  After the last compaction of a finished schedule every remaining unit is kept:
  training can go on with ``jaxprune.sparsify(inner, jaxprune.create("dense"))``
  at no masking cost, with this state (its inner state untouched).

  Raises:
    ValueError: naming the first leaf whose mask still prunes entries.
  """
  for p, m in jax.tree_util.tree_flatten_with_path(opt_state.masks)[0]:
    if is_pruned_mask(m) and not bool(np.all(np.asarray(m))):
      raise ValueError(f"without_masks: the mask of {path_str(p)!r} still prunes entries")
  masks = jax.tree.map(lambda _: dense_mask(), opt_state.masks)
  return opt_state._replace(masks=masks, algo_state=algo_state)
