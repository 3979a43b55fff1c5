"""The Dense/Conv(-BatchNorm) chain of a param tree, and paths into nested dicts.

Neuron and channel pruning remove a layer's output unit together with the
parameters that go with it (its bias, the BatchNorm after it) and the next
layer's weights that read it. These helpers name those pieces by ``/``-joined
paths (``"Conv_0/kernel"``) in plain nested dicts, for :mod:`jaxprune.shrink`
and :mod:`jaxprune.unit_scores`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional, Sequence

from jaxprune.compact import infer_layers


def to_dict(tree):
  """``tree`` with every Mapping (a FrozenDict too) as a plain dict."""
  if isinstance(tree, Mapping):
    return {k: to_dict(v) for k, v in tree.items()}
  return tree


def _keys(path: str) -> tuple:
  return tuple(p for p in str(path).split("/") if p)


def get_path(tree, path: str):
  """The node of nested dicts ``tree`` at ``path``, or None where there is none."""
  node = tree
  for k in _keys(path):
    if not isinstance(node, Mapping) or k not in node:
      return None
    node = node[k]
  return node


def replace_path(tree, path: str, value):
  """A copy of the nested dict ``tree`` with the leaf at ``path`` replaced."""
  keys = _keys(path)
  if not keys:
    return value
  out = dict(tree)
  out[keys[0]] = replace_path(tree[keys[0]], "/".join(keys[1:]), value)
  return out


def layer_chain(params, layers: Optional[Sequence[str]]) -> list[tuple[str, Optional[str]]]:
  """``[(Dense/Conv layer, its BatchNorm or None), ...]`` in forward order.

  ``layers`` is the forward order of the layers (None: inferred from Flax
  auto-names, :func:`jaxprune.compact.infer_layers`).

  Raises:
    ValueError: naming a layer that is neither a Dense/Conv layer nor a
      BatchNorm directly after one.
  """
  names = list(layers) if layers is not None else infer_layers(params)
  chain: list[list] = []
  for name in names:
    node = get_path(params, name)
    if isinstance(node, Mapping) and "kernel" in node:
      chain.append([name, None])
    elif chain and chain[-1][1] is None:
      chain[-1][1] = name
    else:
      raise ValueError(
        f"shrink: layer {name!r} is neither a Dense/Conv layer with a kernel nor a "
        "BatchNorm directly after one"
      )
  return [tuple(c) for c in chain]


def tied_leaves(params, lin: str, bn: Optional[str]) -> list[str]:
  """Paths of the per-unit leaves removed with layer ``lin``'s units: its bias and
  every parameter of the BatchNorm ``bn`` after it."""
  paths = [f"{lin}/bias"] if "bias" in get_path(params, lin) else []
  return paths + ([f"{bn}/{k}" for k in get_path(params, bn)] if bn is not None else [])
