"""Layer removal by block influence (Men et al. 2024, "ShortGPT: Layers in Large
Language Models are More Redundant Than You Expect").

The block influence of a residual block is ``BI = 1 - mean_t cos(x_in_t, x_out_t)``
over calibration tokens: a block that barely turns its input is redundant.
Removing the ``k`` blocks of lowest influence shortens the model; ``random`` and
``last`` choices are the baselines. Removal drops the blocks' params (the model
gets shorter), it does not zero them.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["block_influence", "choose_blocks", "remove_blocks"]


def block_influence(block_fn: Callable, blocks: Sequence, inputs: Sequence) -> np.ndarray:
  """``1 - mean cos(x_in, x_out)`` of every block, blocks run in sequence.

  Args:
    block_fn: ``block_fn(block_params, x) -> y`` (x: ``(..., d)``).
    blocks: the blocks' params, in order.
    inputs: the first block's calibration inputs (batches).
  """

  @jax.jit
  def step(p, x):
    y = block_fn(p, x)
    a, b = x.astype(jnp.float32), y.astype(jnp.float32)
    cos = jnp.sum(a * b, -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1) + 1e-12)
    return y, jnp.sum(cos), cos.size

  xs, scores = list(inputs), []
  for p in blocks:
    total, count, nxt = 0.0, 0, []
    for x in xs:
      y, c, n = step(p, x)
      total += float(c)
      count += int(n)
      nxt.append(y)
    xs = nxt
    scores.append(1.0 - total / count)
  return np.asarray(scores)


def choose_blocks(n_blocks: int, k: int, how: str = "influence", scores=None, seed: int = 0):
  """Indices (sorted) of the ``k`` blocks to remove.

  ``how``: ``"influence"`` (the ``k`` lowest ``scores``, ties to the later block),
  ``"random"`` (uniform without replacement, from ``seed``) or ``"last"``.
  """
  if not 0 <= k < n_blocks:
    raise ValueError(f"remove_blocks must be in [0, {n_blocks}), got {k}")
  if how == "influence":
    if scores is None or len(scores) != n_blocks:
      raise ValueError("how='influence' needs one score per block")
    order = np.lexsort((-np.arange(n_blocks), np.asarray(scores)))
    return sorted(int(i) for i in order[:k])
  if how == "random":
    return sorted(int(i) for i in np.random.default_rng(seed).choice(n_blocks, k, replace=False))
  if how == "last":
    return list(range(n_blocks - k, n_blocks))
  raise ValueError(f"block_score must be 'influence', 'random' or 'last', got {how!r}")


def remove_blocks(tree: dict, remove: Sequence[int], prefix: str = "layers_") -> dict:
  """A copy of ``tree`` (params or masks) without blocks ``{prefix}{i}`` for i in ``remove``.

  The remaining blocks are renumbered ``0..n-k-1`` in order, so the model is
  rebuilt with ``n - k`` blocks. Other keys are kept as they are.
  """
  pat = re.compile(re.escape(prefix) + r"(\d+)$")
  idx = sorted(int(m.group(1)) for k in tree if (m := pat.match(str(k))))
  bad = sorted(set(remove) - set(idx))
  if bad:
    raise ValueError(f"no blocks {[prefix + str(b) for b in bad]} in the tree")
  kept = [i for i in idx if i not in set(remove)]
  out = {k: v for k, v in tree.items() if not pat.match(str(k))}
  for new, old in enumerate(kept):
    out[f"{prefix}{new}"] = tree[f"{prefix}{old}"]
  return out
