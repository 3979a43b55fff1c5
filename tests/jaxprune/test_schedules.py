"""Sparsity schedules (jaxprune.schedules), alone and driving gradual magnitude pruning."""

import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tiny_problem, train
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxprune
from jaxprune import schedules


def test_polynomial_schedule_matches_formula():
  f = schedules.polynomial(final=0.9, initial=0.1, start_step=100, end_step=1100)
  for t in [0, 100, 350, 600, 1099, 1100, 5000]:
    frac = min(max((t - 100) / 1000, 0), 1)
    expected = 0.9 + (0.1 - 0.9) * (1 - frac) ** 3
    assert float(jax.jit(f)(t)) == pytest.approx(expected, abs=1e-6)
  assert float(f(1100)) == np.float32(0.9)


def test_schedules_one_shot_constant_cosine_and_periodic():
  assert float(schedules.one_shot(0.8, 5)(4)) == 0.0 and float(
    schedules.one_shot(0.8, 5)(5)
  ) == pytest.approx(0.8)
  assert float(schedules.constant(0.3)(123)) == pytest.approx(0.3)
  d = schedules.cosine_drop_fraction(0.3, 1000)
  assert (
    float(d(0)) == pytest.approx(0.3)
    and float(d(500)) == pytest.approx(0.15)
    and float(d(1000)) == pytest.approx(0.0, abs=1e-7)
  )
  upd = jax.jit(schedules.periodic_updates(10, 45, 10))
  assert [t for t in range(60) if bool(upd(t))] == [10, 20, 30, 40, 45]


def test_gradual_magnitude_reaches_final_exactly_at_end_step_and_stays():
  params, loss_fn = tiny_problem()
  algo = jaxprune.create(
    "gradual_magnitude", sparsity=0.9, start_step=2, end_step=17, update_every=5
  )
  history = {}

  def record(i, p, s):
    history[i] = {r.path: r.nonzeros for r in jaxprune.summary(p, jaxprune.get_masks(s)).rows}

  train(jaxprune.sparsify(optax.sgd(0.1), algo), params, loss_fn, 30, callback=record)
  k = "params/Dense_0/kernel"  # 12 x 32 = 384 entries
  n = 384
  final_keep = n - math.floor(0.9 * n)
  assert history[15][k] > final_keep  # before the update at end_step
  assert history[17][k] == final_keep  # the update at step 17 (= end_step) reaches it
  assert all(history[i][k] == final_keep for i in range(17, 30))
  # intermediate: the cubic schedule at step 7
  s7 = 0.9 * (1 - (1 - 5 / 15) ** 3)
  assert abs(history[7][k] - (n - math.floor(s7 * n))) <= 1


@settings(max_examples=6)
@given(
  n=st.one_of(st.integers(1, 1000), st.integers(2**24, 2**31 - 1)),
  s_i=st.floats(0.0, 0.999),
  s_f=st.floats(0.0, 0.999),
  fracs=st.lists(st.floats(0.0, 1.0, width=32), min_size=1, max_size=8),
)
def test_polynomial_keep_count_exact_end_points_and_within_one(n, s_i, s_f, fracs):
  s_i, s_f = min(s_i, s_f), max(s_i, s_f)
  fracs = np.sort(np.asarray(fracs + [0.0, 1.0], np.float32))
  k = np.asarray(schedules.polynomial_keep_count(n, s_i, s_f, jnp.asarray(fracs)))
  p_i, p_f = math.floor(s_i * n), math.floor(s_f * n)
  assert k[0] == n - p_i and k[-1] == n - p_f  # exact end points
  assert np.all(np.diff(k.astype(np.int64)) <= 0)  # pruning never goes back
  for f, kept in zip(fracs, k):  # within one entry of n - floor(s_t n), s_t from float32 c
    c = Fraction(float(np.float32(1) - (np.float32(1) - f) ** np.float32(3)))
    s_t_n = Fraction(s_i) * n + (Fraction(s_f) - Fraction(s_i)) * n * c
    assert abs((n - int(kept)) - math.floor(s_t_n)) <= 1


def test_polynomial_keep_count_needs_initial_at_most_final():
  with pytest.raises(ValueError, match="initial sparsity"):
    schedules.polynomial_keep_count(10, 0.6, 0.5, 0.0)
