"""Physically remove pruned neurons and channels from a chain of layers.

Neuron/channel pruning (Li et al. 2017, "Pruning Filters for Efficient
ConvNets"; Liu et al. 2017, "Learning Efficient Convolutional Networks through
Network Slimming") only saves time once the pruned units are gone. Given params
and masks, :func:`compact` deletes every hidden output unit whose kernel mask
column is all False, the matching input rows (channels) of the next layer, and
the matching BatchNorm scale/bias/mean/var entries. The result has the same
nesting; rebuild the model with the returned widths and it computes the same
function as the masked large model.

Supported models (a plain chain; nothing else is assumed)::

  x -> [Conv -> (BatchNorm) -> act]* -> (flatten | global pool) -> [Dense -> (BatchNorm) -> act]* -> Dense -> y

* Dense kernels are ``(in, out)``, Conv kernels ``(..., in, out)`` (Flax).
* ``act`` is one elementwise activation (``activation=``, default ReLU).
  Max pooling, VALID average pooling, dropout at inference, global mean pooling
  and a row-major NHWC flatten may sit between layers: each maps a constant
  channel to the same constant.
* BatchNorm is used with running averages (``use_running_average=True``) and
  needs ``batch_stats``; ``epsilon`` must match the model's.

The layer order is ``layers=[...]`` (path strings such as ``"Conv_0"`` or
``"encoder/Dense_1"``, BatchNorm layers included). Without it, the order is
inferred from Flax auto-names at the top level: ``Conv_0, BatchNorm_0, Conv_1,
BatchNorm_1, ..., Dense_0, Dense_1, ...`` -- each Conv followed by the BatchNorm
of the same index when there are as many BatchNorms as Convs, or, in an MLP
without Convs and with one BatchNorm fewer than Dense layers, each hidden
Dense_i followed by BatchNorm_i. Anything else needs ``layers``.

Exactness. A removed unit still has a bias ``b``: its output is the constant
``a = act(BN(b))`` (``act(b)`` without BatchNorm), not 0. The constant is folded
into the next layer's bias: ``bias += a * W_next[row]`` (summed over the spatial
positions after a flatten). Into a next Conv this is exact only without padding
effects at the borders, so it is done only for ``conv_padding="VALID"``; with
``"SAME"`` (default) a channel feeding a Conv is removed only if its constant
output is exactly 0 (e.g. ReLU of a non-positive constant) and kept otherwise --
the reason is reported in ``notes``. The same holds when the next layer has no
bias. The output layer's units are never removed. Units whose remaining kernel
column becomes all-pruned after the inputs they read were removed (their output
is now a constant too) are removed as well.

Refusals. Whatever cannot be proven equivalent raises ValueError naming the
path: unknown or unsupported modules (LayerNorm, DenseGeneral, ConvTranspose,
Embed, nested blocks), parameters not covered by ``layers``, layers whose sizes
do not chain (residual adds, concatenations, grouped/depthwise convs), a Dense
before a Conv. Note that a residual add between two same-width Dense layers is
invisible in the params; call :func:`compact` only on plain chains.

Example::

  out = jaxprune.compact.compact(params, masks)
  small = MLP(features=out.widths)
  small.apply({"params": out.params}, x)     # == big.apply({"params": masked}, x)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.masks import check_structure, shape_mismatch
from jaxprune.paths import path_str

__all__ = ["Compacted", "compact", "infer_layers"]


class Compacted(NamedTuple):
  """Result of :func:`compact`.

  Attributes:
    params: the smaller params, same nesting as the input (plain dicts).
    batch_stats: the sliced BatchNorm statistics (None if none were given).
    masks: the masks sliced the same way (None if ``masks`` was None).
    widths: new output width of every Dense/Conv layer, in forward order (the
      last one unchanged) -- e.g. ``MLP(features=out.widths)``.
    features: ``{layer path: new output width}`` for the Dense/Conv layers.
    kept: ``{layer path: indices of the kept output units}`` (original numbering).
    notes: ``{layer path: why some all-pruned units were kept}``.
  """

  params: Any
  batch_stats: Any
  masks: Any
  widths: list
  features: dict
  kept: dict
  notes: dict


_AUTO = re.compile(r"^([A-Za-z]+)_(\d+)$")
_SUPPORTED = ("Dense", "Conv", "BatchNorm")
_CHAIN_HELP = (
  "compact handles plain chains of Dense / Conv (-> BatchNorm) layers; residual "
  "adds, branches, concatenations, grouped convs and other modules cannot be "
  "proven equivalent"
)


def _to_dict(tree):
  if isinstance(tree, Mapping):
    return {k: _to_dict(v) for k, v in tree.items()}
  return tree


def _split(path: str) -> tuple:
  return tuple(p for p in str(path).split("/") if p)


def _get(tree, keys: tuple):
  node = tree
  for k in keys:
    if not isinstance(node, Mapping) or k not in node:
      return None
    node = node[k]
  return node


def _set(tree, keys: tuple, value):
  node = tree
  for k in keys[:-1]:
    node = node[k]
  node[keys[-1]] = value


def _leaf_paths(tree) -> list[str]:
  if tree is None:
    return []
  return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def infer_layers(params, batch_stats=None) -> list[str]:
  """The forward order of a chain, inferred from Flax auto-names (see module doc).

  Raises:
    ValueError: naming the first top-level path that is not an auto-named
      Dense_i, Conv_i or BatchNorm_i module, or when the order is ambiguous.
  """
  names = list(params.keys()) + [k for k in (batch_stats or {}) if k not in params]
  by_type: dict[str, dict[int, str]] = {t: {} for t in _SUPPORTED}
  for name in names:
    m = _AUTO.match(str(name))
    if not m or m.group(1) not in _SUPPORTED:
      raise ValueError(
        f"compact: cannot infer the layer order: {name!r} is not an auto-named "
        f"Dense_i, Conv_i or BatchNorm_i module; pass layers=[...] in forward order. " + _CHAIN_HELP
      )
    by_type[m.group(1)][int(m.group(2))] = name
  for t, found in by_type.items():
    if sorted(found) != list(range(len(found))):
      raise ValueError(
        f"compact: {t} layers are numbered {sorted(found)}, not 0..{len(found) - 1}; "
        "pass layers=[...] in forward order"
      )
  convs = [by_type["Conv"][i] for i in range(len(by_type["Conv"]))]
  denses = [by_type["Dense"][i] for i in range(len(by_type["Dense"]))]
  bns = [by_type["BatchNorm"][i] for i in range(len(by_type["BatchNorm"]))]
  if not bns:
    return convs + denses
  if convs and len(bns) == len(convs):
    return [x for pair in zip(convs, bns) for x in pair] + denses
  if not convs and len(bns) == len(denses) - 1:
    return [x for pair in zip(denses[:-1], bns) for x in pair] + denses[-1:]
  raise ValueError(
    f"compact: cannot infer where {len(bns)} BatchNorm layers sit among "
    f"{len(convs)} Conv and {len(denses)} Dense layers; pass layers=[...]"
  )


class _Leaf:
  """A parameter being sliced: masked value plus its mask (None: no mask)."""

  def __init__(self, value, mask):
    self.value = np.asarray(value)
    self.dtype = self.value.dtype
    self.mask = None if mask is None else np.asarray(mask, bool)
    if self.mask is not None:
      self.value = np.where(
        np.broadcast_to(self.mask, self.value.shape), self.value, np.zeros((), self.dtype)
      )

  def full_mask(self):
    if self.mask is None:
      return self.value != 0
    return np.broadcast_to(self.mask, self.value.shape)

  def take(self, idx, axis):
    self.value = np.take(self.value, idx, axis=axis)
    if self.mask is not None and self.mask.ndim > 0:
      self.mask = np.take(self.mask, idx, axis=axis)

  def reshape_rows(self, s, c, idx):
    """Dense kernel (S*C, out) after a flatten: keeps channels ``idx`` at every position."""
    out = self.value.shape[-1]
    self.value = self.value.reshape(s, c, out)[:, idx, :].reshape(-1, out)
    if self.mask is not None and self.mask.ndim > 0:
      m = np.broadcast_to(self.mask, (s * c, out))
      self.mask = m.reshape(s, c, out)[:, idx, :].reshape(-1, out)


class _Layer(NamedTuple):
  kind: str  # "dense" | "conv" | "bn"
  name: str
  keys: tuple


def _classify(name: str, params, batch_stats) -> _Layer:
  keys = _split(name)
  if not keys:
    raise ValueError(f"compact: empty layer name {name!r}")
  p = _get(params, keys)
  s = _get(batch_stats, keys) if batch_stats is not None else None
  if p is None and s is None:
    raise ValueError(
      f"compact: layer {name!r} is not in params"
      + ("" if batch_stats is not None else " (and no batch_stats were given)")
    )
  auto = _AUTO.match(keys[-1])
  if auto and auto.group(1) not in _SUPPORTED:
    raise ValueError(
      f"compact: {name!r} is a {auto.group(1)} layer, which is not supported. " + _CHAIN_HELP
    )
  if p is not None and not isinstance(p, Mapping):
    raise ValueError(f"compact: {name!r} is a single array, not a layer with kernel/bias")
  pk = set(p) if p is not None else set()
  if "kernel" in pk:
    if pk - {"kernel", "bias"}:
      raise ValueError(
        f"compact: {name!r} has parameters {sorted(pk)}; only kernel and bias "
        "are understood. " + _CHAIN_HELP
      )
    if s is not None:
      raise ValueError(f"compact: {name!r} has a kernel and batch_stats; not a Dense/Conv layer")
    ndim = np.ndim(p["kernel"])
    kind = "dense" if ndim == 2 else "conv" if ndim >= 3 else None
    if kind is None or (
      auto and {"Dense": "dense", "Conv": "conv"}.get(auto.group(1), kind) != kind
    ):
      raise ValueError(
        f"compact: {name!r}/kernel has shape {np.shape(p['kernel'])}, which is "
        "neither a Dense (in, out) nor a Conv (..., in, out) kernel"
      )
    return _Layer(kind, name, keys)
  if pk - {"scale", "bias"}:
    raise ValueError(
      f"compact: {name!r} has parameters {sorted(pk)}; not a Dense, Conv or "
      "BatchNorm layer. " + _CHAIN_HELP
    )
  if not isinstance(s, Mapping) or not {"mean", "var"} <= set(s):
    raise ValueError(
      f"compact: {name!r} looks like a normalisation layer without batch_stats mean/var. "
      "LayerNorm/GroupNorm normalise across units, so removing units changes them; for "
      "BatchNorm pass batch_stats=variables['batch_stats']"
    )
  if auto and auto.group(1) != "BatchNorm":
    raise ValueError(
      f"compact: {name!r} holds BatchNorm statistics but is named like a {auto.group(1)}"
    )
  return _Layer("bn", name, keys)


def _check_coverage(layers: Sequence[_Layer], params, batch_stats):
  prefixes = [layer.keys for layer in layers]
  for tree, what in ((params, "parameter"), (batch_stats, "batch_stats entry")):
    for path in _leaf_paths(tree):
      keys = _split(path)
      if not any(keys[: len(pre)] == pre for pre in prefixes):
        raise ValueError(
          f"compact: {what} {path!r} belongs to no layer of the chain "
          f"{[layer.name for layer in layers]}. " + _CHAIN_HELP
        )


def _mask_of(masks, keys, leaf):
  if masks is None:
    return None
  m = _get(masks, keys)
  if m is None:  # not reached after check_structure; the same message if it were
    raise ValueError(f"compact: masks do not match params: only params have {'/'.join(keys)!r}")
  m = np.asarray(m, bool)
  if m.ndim and m.shape != np.shape(leaf):
    raise shape_mismatch("/".join(keys), m.shape, np.shape(leaf), "compact")
  return m


def _bn_constant(z, bn: dict, epsilon: float) -> np.ndarray:
  """BatchNorm (running averages) of a per-channel constant, as Flax computes it."""
  z = jnp.asarray(z, jnp.float32)
  y = z - jnp.asarray(bn["mean"], jnp.float32)
  mul = jax.lax.rsqrt(jnp.asarray(bn["var"], jnp.float32) + epsilon)
  if bn.get("scale") is not None:
    mul = mul * jnp.asarray(bn["scale"], jnp.float32)
  y = y * mul
  if bn.get("bias") is not None:
    y = y + jnp.asarray(bn["bias"], jnp.float32)
  return y


def compact(
  params,
  masks=None,
  batch_stats=None,
  *,
  layers: Optional[Sequence[str]] = None,
  activation: Optional[Callable] = jax.nn.relu,
  epsilon: float = 1e-5,
  conv_padding: str = "SAME",
) -> Compacted:
  """Removes all-pruned hidden units of a Dense/Conv chain (see the module doc).

  Args:
    params: the params collection (``variables["params"]``), nested dicts.
    masks: masks with the params' tree structure (scalar True = not pruned). A
      unit is removed when its kernel mask column is all False. None: a unit is
      removed when its kernel column is all exactly 0 (e.g. after
      :func:`jaxprune.regularizers.prox_group_lasso`).
    batch_stats: ``variables["batch_stats"]`` when the chain has BatchNorm.
    layers: forward order of the layers as path strings, BatchNorms included;
      None infers it from Flax auto-names (module doc).
    activation: the elementwise activation after every hidden layer (after its
      BatchNorm); None for identity.
    epsilon: the BatchNorm epsilon of the model (Flax default 1e-5).
    conv_padding: ``"SAME"`` or ``"VALID"``, the padding of the Conv layers.
      Only with ``"VALID"`` is a constant channel folded into a next Conv.

  Returns:
    :class:`Compacted` with the smaller params, batch_stats, masks, widths.

  Raises:
    ValueError: naming the path, for anything not provably equivalent.
  """
  if conv_padding not in ("SAME", "VALID"):
    raise ValueError(f"conv_padding must be 'SAME' or 'VALID', got {conv_padding!r}")
  act = activation if activation is not None else (lambda x: x)
  params = _to_dict(params)
  batch_stats = _to_dict(batch_stats) if batch_stats is not None else None
  if masks is not None:
    masks = _to_dict(masks)
    check_structure(params, masks, "compact")
  names = list(layers) if layers is not None else infer_layers(params, batch_stats)
  if not names:
    raise ValueError("compact: no layers")
  specs = [_classify(n, params, batch_stats) for n in names]
  _check_coverage(specs, params, batch_stats)
  stages = _stages(specs)
  lin, bns = _working_copies(stages, params, masks, batch_stats)
  spatial = _spatial_factors(stages, lin)  # checks the chain's sizes before changing anything

  kept, notes = {}, {}
  for i in range(len(lin) - 1):
    name = stages[i][0].name
    kept[name], note = _remove_dead_units(
      stages[i + 1][0], lin[i], lin[i + 1], bns[i], spatial[i], act, epsilon, conv_padding
    )
    if note:
      notes[name] = note

  new_params, new_stats, new_masks = _write_back(params, masks, batch_stats, stages, lin, bns)
  widths = [int(rec["kernel"].value.shape[-1]) for rec in lin]
  features = {spec.name: w for (spec, _), w in zip(stages, widths)}
  kept[stages[-1][0].name] = np.arange(widths[-1])
  return Compacted(new_params, new_stats, new_masks, widths, features, kept, notes)


def _stages(specs) -> list[list]:
  """The layers grouped into ``[linear, batchnorm-or-None]`` stages, in order."""
  stages: list[list] = []
  for spec in specs:
    if spec.kind == "bn":
      if not stages or stages[-1][1] is not None:
        raise ValueError(
          f"compact: BatchNorm {spec.name!r} must directly follow a Dense or Conv layer in `layers`"
        )
      stages[-1][1] = spec
    else:
      if stages and stages[-1][0].kind == "dense" and spec.kind == "conv":
        raise ValueError(
          f"compact: Conv {spec.name!r} follows Dense {stages[-1][0].name!r}; "
          "only Conv stacks followed by Dense layers are supported"
        )
      stages.append([spec, None])
  return stages


def _working_copies(stages, params, masks, batch_stats):
  """``(lin, bns)``: per stage, the linear layer's and the BatchNorm's leaves as
  :class:`_Leaf` working copies (BatchNorm None where there is none), shapes checked."""
  lin, bns = [], []
  for spec, bn in stages:
    p = _get(params, spec.keys)
    rec = {"kernel": _Leaf(p["kernel"], _mask_of(masks, spec.keys + ("kernel",), p["kernel"]))}
    if "bias" in p:
      rec["bias"] = _Leaf(p["bias"], _mask_of(masks, spec.keys + ("bias",), p["bias"]))
    lin.append(rec)
    if bn is None:
      bns.append(None)
      continue
    bp = _get(params, bn.keys) or {}
    bs = _get(batch_stats, bn.keys)
    brec = {k: _Leaf(bp[k], _mask_of(masks, bn.keys + (k,), bp[k])) for k in bp}
    brec.update({k: _Leaf(bs[k], None) for k in ("mean", "var")})
    out = lin[-1]["kernel"].value.shape[-1]
    for k, leaf in brec.items():
      if leaf.value.shape != (out,):
        raise ValueError(
          f"compact: {bn.name}/{k} has shape {leaf.value.shape}, but "
          f"{spec.name!r} has {out} outputs"
        )
    bns.append(brec)
  for i, rec in enumerate(lin):
    out = rec["kernel"].value.shape[-1]
    if "bias" in rec and rec["bias"].value.shape != (out,):
      raise ValueError(
        f"compact: {stages[i][0].name}/bias has shape {rec['bias'].value.shape}, expected ({out},)"
      )
  return lin, bns


def _spatial_factors(stages, lin) -> list[int]:
  """Per link between stages, how many input rows of the next kernel each unit
  feeds: 1, or the spatial size of a Conv -> Dense flatten; raises for a chain
  whose sizes do not connect."""
  spatial = []
  for i in range(len(lin) - 1):
    c = lin[i]["kernel"].value.shape[-1]
    nxt = lin[i + 1]["kernel"].value
    a, b = stages[i][0], stages[i + 1][0]
    if b.kind == "conv" or a.kind == "dense":
      if nxt.shape[-2] != c:
        raise ValueError(
          f"compact: {a.name!r} has {c} outputs but {b.name!r}/kernel reads "
          f"{nxt.shape[-2]} inputs (shape {nxt.shape}). " + _CHAIN_HELP
        )
      spatial.append(1)
    else:  # conv -> dense through flatten or global pooling
      if nxt.shape[0] % c:
        raise ValueError(
          f"compact: {b.name!r}/kernel has {nxt.shape[0]} inputs, not a multiple "
          f"of the {c} channels of {a.name!r} (flatten or pooling expected). " + _CHAIN_HELP
        )
      spatial.append(nxt.shape[0] // c)
  return spatial


def _constant_outputs(rec, bn, act, epsilon) -> np.ndarray:
  """What every unit outputs when its kernel column is all zero: ``act(bias)``,
  through the BatchNorm when there is one (float64)."""
  n_out = rec["kernel"].value.shape[-1]
  z = rec["bias"].value.astype(np.float32) if "bias" in rec else np.zeros(n_out, np.float32)
  if bn is not None:
    z = _bn_constant(z, {k: v.value for k, v in bn.items()}, epsilon)
  return np.asarray(act(jnp.asarray(z, jnp.float32)), np.float64)


def _why_no_fold(nxt_spec, nxt, conv_padding) -> str:
  """Why a constant unit output cannot be folded into the next layer ("" if it can)."""
  if "bias" not in nxt:
    return f"{nxt_spec.name!r} has no bias to fold it into"
  if nxt_spec.kind == "conv" and conv_padding != "VALID":
    return (
      f"{nxt_spec.name!r} is a Conv with {conv_padding} padding, where "
      "a constant input is not constant at the borders"
    )
  return ""


def _fold_into_next(nxt_spec, nxt, gone, const, keep, n_out, spatial):
  """Drops the input rows of removed units ``gone`` from the next layer's kernel,
  adding their constant output ``const`` times those rows to its bias."""
  a_gone = const[gone]
  w = nxt["kernel"].value.astype(np.float64)
  if nxt_spec.kind == "conv":
    delta = (np.take(w, gone, axis=-2) * a_gone[:, None]).reshape(-1, w.shape[-1]).sum(0)
    nxt["kernel"].take(keep, axis=-2)
  else:
    wr = w.reshape(spatial, n_out, w.shape[-1])
    delta = np.einsum("c,sco->o", a_gone, wr[:, gone, :])
    nxt["kernel"].reshape_rows(spatial, n_out, keep)
  if np.any(delta != 0):
    bias = nxt["bias"]
    bias.value = (bias.value.astype(np.float64) + delta).astype(bias.dtype)
    if bias.mask is not None and bias.mask.ndim > 0:
      bias.mask = bias.mask | (delta != 0)


def _remove_dead_units(nxt_spec, rec, nxt, bn, spatial, act, epsilon, conv_padding):
  """Removes one stage's all-pruned units that can go (constant output 0, or
  foldable into the next layer's bias), in place: ``(kept unit indices, note)``
  where the note says why some all-pruned units stay ("" when none do)."""
  kern = rec["kernel"]
  n_out = kern.value.shape[-1]
  dead = ~kern.full_mask().reshape(-1, n_out).any(axis=0)
  const = _constant_outputs(rec, bn, act, epsilon)
  why = _why_no_fold(nxt_spec, nxt, conv_padding)
  removable = dead & ((const == 0) | (why == ""))
  note = ""
  if np.any(dead & ~removable):
    note = (
      f"{int(np.sum(dead & ~removable))} all-pruned units kept: their "
      f"constant output is not 0 and {why}"
    )
  keep = np.flatnonzero(~removable)
  if keep.size == n_out:
    return keep, note
  _fold_into_next(nxt_spec, nxt, np.flatnonzero(removable), const, keep, n_out, spatial)
  kern.take(keep, axis=-1)
  if "bias" in rec:
    rec["bias"].take(keep, axis=0)
  if bn is not None:
    for leaf in bn.values():
      leaf.take(keep, axis=0)
  return keep, note


def _write_back(params, masks, batch_stats, stages, lin, bns):
  """``(params, batch_stats, masks)``: copies of the trees with the stages' new leaves."""
  new_params = _to_dict(params)
  new_masks = _to_dict(masks) if masks is not None else None
  new_stats = _to_dict(batch_stats) if batch_stats is not None else None
  for (spec, bn_spec), rec, bn in zip(stages, lin, bns):
    for k, leaf in rec.items():
      _set(new_params, spec.keys + (k,), jnp.asarray(leaf.value, leaf.dtype))
      if new_masks is not None:
        _set(new_masks, spec.keys + (k,), jnp.asarray(leaf.mask))
    if bn is None:
      continue
    for k, leaf in bn.items():
      if k in ("mean", "var"):
        _set(new_stats, bn_spec.keys + (k,), jnp.asarray(leaf.value, leaf.dtype))
      else:
        _set(new_params, bn_spec.keys + (k,), jnp.asarray(leaf.value, leaf.dtype))
        if new_masks is not None:
          _set(new_masks, bn_spec.keys + (k,), jnp.asarray(leaf.mask))
  return new_params, new_stats, new_masks
