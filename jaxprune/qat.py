"""Quantisation-aware training (QAT) with qwix, composed with `jaxprune.sparsify`.

qwix (Google's JAX quantisation library, optional extra ``jaxprune[quant]``)
intercepts ``dot_general`` and ``conv_general_dilated`` inside a Flax model and
quantises the weights in the forward pass ("fake" quantisation with a
straight-through gradient; Jacob et al. 2018, "Quantization and Training of
Neural Networks for Efficient Integer-Arithmetic-Only Inference", CVPR). The
param tree stays float and unchanged, so ``jaxprune.sparsify`` wraps the
optimizer exactly as for a float model and nothing in it is patched::

    model = qwix.quantize_model(MyModel(), qwix.QtProvider(qat.qat_rules(4, group_size=32)))
    tx = jaxprune.sparsify(optax.adam(1e-3), jaxprune.create("magnitude", sparsity=0.5))

The grid is qwix's: one scale per output channel (the kernel's last axis, as
Flax Dense and Conv lay it out) or, with ``group_size``, per group of
``group_size`` consecutive weights along the input axis of 2-D (Dense) kernels;
qwix does not group convolution kernels, so these stay per-channel. Symmetric
("absmax"): ``code = round(w / scale)`` with ``scale = absmax / (qmax + 0.5)``,
codes in ``[-2**(bits-1), 2**(bits-1) - 1]``. Asymmetric ("minmax"): the range
``[min(w, 0), max(w, 0)]`` over ``[qmin, qmax]`` with an *integer* zero point,
``code = round(w / scale + zero_point)``.

Guarantee: a pruned weight is exactly 0.0 (``sparsify``), and 0.0 lands on the
zero code of either grid, so it dequantises to exactly 0.0: its symmetric code
is 0 and its asymmetric code is the zero point. `integer_codes` returns codes
relative to the zero point, 0 exactly where the weight dequantises to 0.0. A
format whose offset is a float rather than an integer code (GGUF Q4_1, scale +
min) has no such code: a sparse model must not be stored in it.

Everything here imports qwix lazily, so ``import jaxprune`` works without it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxprune.paths import path_str

__all__ = [
  "qat_rules",
  "ptq_rules",
  "ptq",
  "fake_quantize",
  "quantize_kernel",
  "integer_codes",
  "tree_codes",
  "qtype",
  "calibration",
]

BITS = (4, 8)
CONV_OPS = ("conv_general_dilated",)
DOT_OPS = ("dot_general", "einsum")


def _qwix():
  try:
    import qwix
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
      "jaxprune.qat needs qwix: pip install 'jaxprune[quant]' (qwix==0.1.8, flax>=0.12)"
    ) from e
  return qwix


def _check(bits: int, group_size: int | None) -> None:
  if bits not in BITS:
    raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
  if group_size is not None and (
    isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1
  ):
    raise ValueError(f"group_size must be a positive integer or None, got {group_size!r}")


def qtype(bits: int):
  """The qwix weight type of `bits`: ``jnp.int8`` or ``jnp.int4``."""
  _check(bits, None)
  return jnp.int8 if bits == 8 else jnp.int4


def calibration(asymmetric: bool) -> str:
  """qwix's weight calibration method: "minmax" (asymmetric) or "absmax"."""
  return "minmax" if asymmetric else "absmax"


def _rules(rule_cls, bits, group_size, asymmetric, module_path):
  _check(bits, group_size)
  common = dict(
    module_path=module_path,
    weight_qtype=qtype(bits),
    weight_calibration_method=calibration(asymmetric),
  )
  return [
    rule_cls(op_names=CONV_OPS, **common),
    rule_cls(op_names=DOT_OPS, tile_size=group_size, **common),
  ]


def qat_rules(
  bits: int, *, group_size: int | None = None, asymmetric: bool = False, module_path: str = ".*"
) -> list:
  """qwix QAT rules (``qwix.QtRule``) quantising weights to `bits` (8 or 4).

  Per output channel, or with `group_size` per group along the input axis of
  Dense kernels (convolutions stay per-channel: qwix does not group them).
  Activations stay float. Use with ``qwix.QtProvider``.
  """
  return _rules(_qwix().QtRule, bits, group_size, asymmetric, module_path)


def ptq_rules(
  bits: int, *, group_size: int | None = None, asymmetric: bool = False, module_path: str = ".*"
) -> list:
  """The post-training (``qwix.PtqProvider``) rules of the same grid as `qat_rules`."""
  return _rules(_qwix().QuantizationRule, bits, group_size, asymmetric, module_path)


def _how(kernel, group_size):
  """(channelwise_axes, tiled_axes) of `kernel` as qwix quantises it in a layer."""
  ndim = jnp.ndim(kernel)
  if ndim < 2:
    raise ValueError(f"expected a kernel with ndim >= 2, got shape {jnp.shape(kernel)}")
  if group_size is None or ndim != 2:  # qwix groups Dense kernels only.
    return [ndim - 1], {}
  if kernel.shape[0] % group_size:
    raise ValueError(
      f"group_size={group_size} does not divide the input dimension {kernel.shape[0]} "
      f"of a kernel of shape {kernel.shape}"
    )
  return [1], {0: group_size}


def quantize_kernel(
  kernel: jax.Array, bits: int, *, group_size: int | None = None, asymmetric: bool = False
):
  """`kernel` quantised on the grid qwix uses for it in a QAT/PTQ layer (a ``qwix.QArray``).

  The last axis is the output channel (Flax Dense and Conv layout); `group_size`
  groups the input axis of 2-D kernels, other kernels are per output channel
  (as in the layers `qat_rules` quantise).
  """
  _check(bits, group_size)
  channelwise, tiled = _how(kernel, group_size)
  return _qwix().quantize(
    jnp.asarray(kernel),
    qtype(bits),
    channelwise_axes=channelwise,
    tiled_axes=tiled,
    calibration_method=calibration(asymmetric),
  )


def integer_codes(
  kernel: jax.Array, bits: int, *, group_size: int | None = None, asymmetric: bool = False
) -> jax.Array:
  """The integer codes of `kernel` minus the zero point (int32, `kernel`'s shape).

  Zero exactly where the weight dequantises to 0.0; for a symmetric grid these
  are the stored codes themselves.
  """
  q = quantize_kernel(kernel, bits, group_size=group_size, asymmetric=asymmetric)
  codes = q.qvalue.astype(jnp.int32)
  if q.zero_point is None:
    return codes
  return codes - _expand(q.zero_point.astype(jnp.int32), codes.shape)


def _expand(per_group: jax.Array, shape) -> jax.Array:
  """Repeats a per-group array (scale or zero point) up to the kernel's `shape`."""
  for axis, (n, g) in enumerate(zip(shape, per_group.shape)):
    per_group = jnp.repeat(per_group, n // g, axis=axis)
  return per_group


def _map_kernels(fn, params: Any) -> dict[str, jax.Array]:
  """`fn(kernel)` of every leaf with ndim >= 2, by path string; errors name the path."""
  out = {}
  for keypath, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if jnp.ndim(leaf) < 2:
      continue
    path = path_str(keypath)
    try:
      out[path] = fn(leaf)
    except ValueError as e:
      raise ValueError(f"{path}: {e}") from None
  return out


def tree_codes(
  params: Any, bits: int, *, group_size: int | None = None, asymmetric: bool = False
) -> dict[str, jax.Array]:
  """`integer_codes` of every kernel (leaf with ndim >= 2) of `params`, by path string."""
  return _map_kernels(
    lambda k: integer_codes(k, bits, group_size=group_size, asymmetric=asymmetric), params
  )


def fake_quantize(
  params: Any, bits: int, *, group_size: int | None = None, asymmetric: bool = False
) -> Any:
  """`params` with every kernel (ndim >= 2) rounded to the nearest point of its grid.

  Weight-only round-to-nearest post-training quantisation on the grid of
  `quantize_kernel` (what a QAT layer computes with in its forward pass); other
  leaves unchanged. Pruned (0.0) entries stay exactly 0.0.
  """
  qwix = _qwix()
  rounded = _map_kernels(
    lambda k: qwix.dequantize(
      quantize_kernel(k, bits, group_size=group_size, asymmetric=asymmetric)
    ).astype(jnp.asarray(k).dtype),
    params,
  )
  return jax.tree_util.tree_map_with_path(lambda p, x: rounded.get(path_str(p), x), params)


def ptq(model, params: Any, *example_args, rules: list, **example_kwargs):
  """Post-training quantisation of a Linen `model` with qwix (integer weights in memory).

  qwix's PTQ convolutions also need integer activations (rules with ``act_qtype``);
  for weight-only PTQ of a model with convolutions use `fake_quantize`.

  `example_args`/`example_kwargs` are what ``model.init`` takes after the key
  (e.g. a batch and ``train=False``). Returns ``(ptq_model, qparams)``: apply
  with ``ptq_model.apply({"params": qparams, ...}, x)``. The kernels of
  `qparams` hold integer codes (``qparams[...]["kernel"].array.qvalue``).
  """
  qwix = _qwix()
  ptq_model = qwix.quantize_model(model, qwix.PtqProvider(rules))
  abstract = jax.eval_shape(
    lambda: ptq_model.init(jax.random.PRNGKey(0), *example_args, **example_kwargs)
  )["params"]
  return ptq_model, qwix.quantize_params(params, abstract)
