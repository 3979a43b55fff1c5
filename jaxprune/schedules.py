"""Sparsity and drop-fraction schedules; all accept a traced step inside jit."""

from __future__ import annotations

import jax.numpy as jnp


def constant(value: float):
  """``s_t = value`` at every step."""
  return lambda step: jnp.full((), value, jnp.float32)


def one_shot(sparsity: float, at_step: int):
  """0 before ``at_step``, ``sparsity`` from then on."""
  return lambda step: jnp.where(step >= at_step, jnp.float32(sparsity), jnp.float32(0.0))


def progress(step, start_step: int, end_step: int):
  """Fraction of the way from ``start_step`` to ``end_step``, clipped to [0, 1]."""
  if end_step <= start_step:
    return jnp.where(step >= start_step, 1.0, 0.0).astype(jnp.float32)
  t = (jnp.asarray(step, jnp.float32) - start_step) / float(end_step - start_step)
  return jnp.clip(t, 0.0, 1.0)


def polynomial(
  final: float, initial: float = 0.0, start_step: int = 0, end_step: int = 1000, power: float = 3.0
):
  """Zhu & Gupta 2017 ("To prune, or not to prune") gradual pruning schedule.

  ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** 3`` for t0 <= t <= t1,
  ``s_i`` before t0 and exactly ``s_f`` from t1 on. Masks change only on the
  update steps given by :func:`periodic_updates`.

  Examples:
    >>> schedule = polynomial(0.9, start_step=0, end_step=1000)
    >>> [round(float(schedule(t)), 3) for t in (0, 500, 1000, 2000)]
    [0.0, 0.787, 0.9, 0.9]
  """

  def schedule(step):
    frac = progress(step, start_step, end_step)
    value = final + (initial - final) * (1.0 - frac) ** power
    return jnp.where(frac >= 1.0, jnp.float32(final), value.astype(jnp.float32))

  return schedule


def periodic_updates(start_step: int, end_step: int, update_every: int, include_end: bool = True):
  """Step predicate: ``t0 <= t <= t1`` and ``(t - t0) % update_every == 0`` (or ``t == t1``)."""

  def is_update(step):
    step = jnp.asarray(step)
    on_period = (step - start_step) % update_every == 0
    inside = (step >= start_step) & (step <= end_step)
    if include_end:
      return inside & (on_period | (step == end_step))
    return inside & (step < end_step) & on_period

  return is_update


def cosine_drop_fraction(drop_fraction: float, end_step: int):
  """RigL's drop-fraction decay (Evci et al. 2020): ``d/2 (1 + cos(pi t / T_end))``."""

  def schedule(step):
    t = jnp.clip(jnp.asarray(step, jnp.float32) / float(max(end_step, 1)), 0.0, 1.0)
    return (drop_fraction / 2.0) * (1.0 + jnp.cos(jnp.pi * t))

  return schedule


def polynomial_keep_count(n: int, initial: float, final: float, frac, power: float = 3.0):
  """Entries kept out of ``n`` at progress ``frac`` of a polynomial schedule.

  The pruned count interpolates the exact integer end points
  ``P_i = floor(s_i n)`` and ``P_f = floor(s_f n)`` of the library's rounding
  rule with the Zhu & Gupta progress ``c = 1 - (1 - frac) ** power`` (float32):
  ``n - (P_i + floor(c (P_f - P_i)))``, the floor exact for every ``n < 2**31``
  (:func:`jaxprune.rounding.floor_product`). At ``frac = 0`` this is exactly
  ``n - floor(s_i n)``, at ``frac >= 1`` exactly ``n - floor(s_f n)`` (the
  eager count of the Python-float target, also inside jit); in between it is
  within one entry of ``n - floor(s_t n)`` and never decreases the pruned
  count as ``frac`` grows. Needs ``initial <= final``.
  """
  from jaxprune.rounding import floor_product
  from jaxprune.topk import keep_count  # local: topk does not depend on schedules

  if float(initial) > float(final):
    raise ValueError(f"initial sparsity {initial} must be <= final sparsity {final}")
  p_i, p_f = n - keep_count(n, initial), n - keep_count(n, final)
  frac = jnp.asarray(frac, jnp.float32)
  c = 1.0 - (1.0 - frac) ** power
  k = jnp.int32(n - p_i) - floor_product(c, p_f - p_i)
  return jnp.where(frac >= 1.0, jnp.int32(n - p_f), k)
