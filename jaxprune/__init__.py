"""jaxprune: pruning and sparse training for JAX, Flax and optax.

Masks are pytrees alongside params; ``sparsify`` wraps any optax optimizer so
that a jitted training step keeps the parameters sparse.
"""

# Submodules reached as attributes after ``import jaxprune`` (``jaxprune.compact.compact``, ...).
from jaxprune import compact, export, oneshot, regularizers, schedules, structured
from jaxprune.algorithms import REGISTRY, Algorithm, config_keys, create, register
from jaxprune.algorithms.at_init import grasp_masks, snip_masks, synflow_masks
from jaxprune.algorithms.dst import rigl, set_
from jaxprune.algorithms.magnitude import global_magnitude, gradual_magnitude, magnitude
from jaxprune.algorithms.random import dense, fixed, random, static
from jaxprune.algorithms.saliency import global_saliency, saliency
from jaxprune.algorithms.ste import sr_ste, ste, straight_through
from jaxprune.distributions import erk, per_layer, uniform
from jaxprune.flops import Flops, LayerFlops, flops
from jaxprune.masks import apply_masks, check_masks, magnitude_masks, random_masks
from jaxprune.paths import path_str
from jaxprune.sparse_init import rescale_init
from jaxprune.sparsify import SparseState, get_masks, get_sparse_state, sparsify
from jaxprune.summary import Summary, summary
from jaxprune.topk import keep_count, topk_mask, topk_masks
from jaxprune.training_cost import TrainingFlops, training_flops

__version__ = "0.1.0"

__all__ = [
  "Algorithm",
  "Flops",
  "LayerFlops",
  "REGISTRY",
  "SparseState",
  "Summary",
  "TrainingFlops",
  "apply_masks",
  "check_masks",
  "compact",
  "config_keys",
  "create",
  "dense",
  "erk",
  "export",
  "fixed",
  "flops",
  "get_masks",
  "get_sparse_state",
  "global_magnitude",
  "global_saliency",
  "gradual_magnitude",
  "grasp_masks",
  "keep_count",
  "magnitude",
  "magnitude_masks",
  "oneshot",
  "path_str",
  "per_layer",
  "random",
  "random_masks",
  "register",
  "regularizers",
  "rescale_init",
  "rigl",
  "saliency",
  "schedules",
  "set_",
  "snip_masks",
  "sparsify",
  "sr_ste",
  "static",
  "ste",
  "straight_through",
  "structured",
  "summary",
  "synflow_masks",
  "topk_mask",
  "topk_masks",
  "training_flops",
  "uniform",
]
