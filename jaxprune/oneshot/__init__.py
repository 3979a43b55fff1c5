"""One-shot (post-training) pruning of pretrained models.

* :mod:`~jaxprune.oneshot.solvers`: per-kernel magnitude, Wanda (Sun et al. 2023)
  and SparseGPT (Frantar & Alistarh 2023), unstructured or N:M.
* :mod:`~jaxprune.oneshot.calibration`: input statistics of every kernel, captured
  by Linen method interception or NNX class swapping.
* :mod:`~jaxprune.oneshot.driver`: layer-sequential and single-pass pruning,
  returning params plus the library's pytree masks; layer-sequential pruning
  and quantisation (:func:`compress_sequential`).
* :mod:`~jaxprune.oneshot.quant`: int4/int8 quantisation on the GGUF Q4_0/Q8_0
  grid: round-to-nearest, GPTQ (Frantar et al. 2022) and SparseGPT with
  quantisation in its column loop.
* :mod:`~jaxprune.oneshot.layers`: block influence and layer removal (ShortGPT,
  Men et al. 2024).
"""

from jaxprune.oneshot.calibration import (
  KernelStats,
  collect,
  hessian,
  kernel_as_matrix,
  linen_stats_fn,
  matrix_as_kernel,
  nnx_collect,
)
from jaxprune.oneshot.driver import (
  METHODS,
  QUANTIZERS,
  compress_kernel,
  compress_params,
  compress_sequential,
  prune_kernel,
  prune_params,
  prune_sequential,
  prune_single_pass,
)
from jaxprune.oneshot.layers import block_influence, choose_blocks, remove_blocks
from jaxprune.oneshot.quant import (
  SCALE_RULES,
  Quantized,
  QuantSpec,
  dequantize,
  gptq,
  quantize_rtn,
  sparsegpt_quant,
)
from jaxprune.oneshot.solvers import SparseGPTInfo, magnitude, parse_target, sparsegpt, wanda

__all__ = [
  "KernelStats",
  "METHODS",
  "QUANTIZERS",
  "QuantSpec",
  "SCALE_RULES",
  "Quantized",
  "SparseGPTInfo",
  "block_influence",
  "choose_blocks",
  "collect",
  "compress_kernel",
  "compress_params",
  "compress_sequential",
  "dequantize",
  "gptq",
  "hessian",
  "kernel_as_matrix",
  "linen_stats_fn",
  "magnitude",
  "matrix_as_kernel",
  "nnx_collect",
  "parse_target",
  "prune_kernel",
  "prune_params",
  "prune_sequential",
  "prune_single_pass",
  "quantize_rtn",
  "remove_blocks",
  "sparsegpt",
  "sparsegpt_quant",
  "wanda",
]
