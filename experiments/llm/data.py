"""Text from CPython's ``pydoc_data/topics.py``, segments and perplexity.

The file ships with every Python. It is tokenized whole and cut into
non-overlapping ``seqlen``-token segments: calibration segments are drawn
(without replacement, by ``seed``) from the first half, evaluation segments are
the last ``n_eval`` segments. Perplexity is ``exp`` of the mean next-token NLL
over every predicted position of the evaluation segments.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np


def topics_text() -> str:
  import pydoc_data

  return (pathlib.Path(pydoc_data.__file__).parent / "topics.py").read_text(encoding="utf-8")


def segments(tokenizer, seqlen: int = 128, n_calib: int = 16, n_eval: int = 16, seed: int = 0):
  """Returns ``(calib, evals)``: int32 arrays ``(n_calib, seqlen)``, ``(n_eval, seqlen)``."""
  ids = np.asarray(tokenizer.encode(topics_text()).ids, np.int32)
  n = len(ids) // seqlen
  segs = ids[: n * seqlen].reshape(n, seqlen)
  half = n // 2
  if n_calib > half or n_eval > n - half:
    raise ValueError(
      f"the text gives {n} segments of {seqlen} tokens: at most {half} calibration and "
      f"{n - half} evaluation segments (asked {n_calib} and {n_eval})"
    )
  pick = np.sort(np.random.default_rng(seed).choice(half, n_calib, replace=False))
  return segs[pick], segs[n - n_eval :]


def nll(logits, tokens):
  """Per-position next-token NLL, ``(B, T-1)``."""
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def perplexity(logits_fn, segs, batch: int = 8) -> float:
  """``exp(mean NLL)`` over all segments; ``logits_fn(tokens) -> logits``."""
  total, count = 0.0, 0
  for i in range(0, len(segs), batch):
    t = jnp.asarray(segs[i : i + batch])
    v = nll(logits_fn(t), t)
    total += float(jnp.sum(v))
    count += v.size
  return float(np.exp(total / count))
