"""One-shot (post-training) pruning of pretrained models.

* :mod:`~jaxprune.oneshot.solvers`: per-kernel magnitude, Wanda and SparseGPT.
"""

from jaxprune.oneshot.solvers import SparseGPTInfo, magnitude, parse_target, sparsegpt, wanda

__all__ = ["SparseGPTInfo", "magnitude", "parse_target", "sparsegpt", "wanda"]
