"""jaxprune.training_flops against hand-computed schedules (Evci et al. 2020, App. H)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxprune
from jaxprune import training_cost as tf
from jaxprune.flops import NO_PARAMETER, Flops, LayerFlops

# Registered algorithms of the 'ste' family (Algorithm.family).
STE_FAMILY = [
  n
  for n in sorted(jaxprune.REGISTRY)
  if jaxprune.create(n, sparsity=0.5, end_step=10).family == "ste"
]

# One example's forward pass: a layer of 100 FLOPs at density 0.5, a dense one
# of 50 FLOPs (final sparsity 0), and 10 FLOPs of products without parameters.
FORWARD = Flops(
  dense=160,
  sparse=110.0,
  layers=(LayerFlops("a", 100, 50.0), LayerFlops("b", 50, 50.0), LayerFlops(NO_PARAMETER, 10, 10)),
)
F_D, F_S = 160.0, 110.0


def test_dense_is_three_forward_passes_per_example():
  out = jaxprune.training_flops(jaxprune.create("dense"), FORWARD, steps=7, batch_size=4)
  assert out.dense == 3 * F_D * 7 * 4
  # The final masks are dense for a dense run; with sparse rows the default
  # schedule keeps them, so pass a dense forward here.
  dense_forward = FORWARD._replace(
    sparse=160.0, layers=tuple(r._replace(sparse=float(r.dense)) for r in FORWARD.layers)
  )
  out = jaxprune.training_flops(jaxprune.create("dense"), dense_forward, steps=7, batch_size=4)
  assert out.sparse == out.dense and out.ratio == 1.0 and out.dense_gradient_steps == 0


@pytest.mark.parametrize("name", ["static", "set"])
def test_static_and_set_are_three_sparse_passes(name):
  algo = jaxprune.create(name, sparsity=0.5, end_step=750)
  out = jaxprune.training_flops(algo, FORWARD, steps=1000, batch_size=2)
  assert out.sparse == pytest.approx(3 * F_S * 1000 * 2)
  assert out.ratio == pytest.approx(F_S / F_D)
  assert out.dense_gradient_steps == 0


def test_rigl_pays_a_dense_gradient_on_update_steps():
  # Updates at steps 100, 200, ..., 700 (step > 0, step < end_step = 750).
  algo = jaxprune.create("rigl", sparsity=0.5, end_step=750, update_every=100)
  out = jaxprune.training_flops(algo, FORWARD, steps=1000)
  assert out.dense_gradient_steps == 7
  assert out.sparse == pytest.approx(3 * F_S * 993 + 7 * (2 * F_S + F_D))


def test_rigl_matches_the_paper_formula_per_period():
  # The paper's (3 f_S dT + 2 f_S + f_D) / (dT + 1) averages a period of dT
  # sparse steps and one update step: update_every = dT + 1 in our counting.
  dt, periods = 9, 6
  steps = periods * (dt + 1)
  algo = jaxprune.create("rigl", sparsity=0.5, end_step=steps, update_every=dt + 1)
  out = jaxprune.training_flops(algo, FORWARD, steps=steps)
  paper = (3 * F_S * dt + 2 * F_S + F_D) / (dt + 1)
  # Step 0 is never an update: the first period is all sparse steps.
  assert out.sparse == pytest.approx((periods - 1) * (dt + 1) * paper + (dt + 1) * 3 * F_S)


def test_gradual_magnitude_integrates_its_schedule():
  # Updates at 2, 4, 6; step t uses the masks of the last update before t.
  algo = jaxprune.create(
    "gradual_magnitude", sparsity=0.5, start_step=2, end_step=6, update_every=2
  )
  sparsity, dense_grad = algo.flops_schedule(np.arange(10), 0.5)
  s4 = 0.5 * (1 - (1 - 0.5) ** 3)
  np.testing.assert_allclose(sparsity, [0, 0, 0, 0, 0, s4, s4, 0.5, 0.5, 0.5])
  assert not dense_grad.any()
  out = jaxprune.training_flops(algo, FORWARD, steps=10)
  f = [160] * 5 + [100 * (1 - s4) + 60] * 2 + [110] * 3
  assert out.sparse == pytest.approx(3 * sum(f))
  assert out.dense == 3 * 160 * 10


def test_one_shot_magnitude_is_dense_until_the_step_after_pruning():
  algo = jaxprune.create("magnitude", sparsity=0.5, start_step=3)
  out = jaxprune.training_flops(algo, FORWARD, steps=10)
  assert out.sparse == pytest.approx(3 * (4 * F_D + 6 * F_S))
  algo = jaxprune.create("random", sparsity=0.5, start_step=3)
  assert jaxprune.training_flops(algo, FORWARD, steps=10) == out


def test_global_magnitude_scales_each_layer_by_the_total_progress():
  algo = jaxprune.create("global_magnitude", sparsity=0.8, start_step=0, end_step=4, update_every=2)
  sparsity, _ = algo.flops_schedule(np.arange(6), 0.4)
  p2 = 1 - (1 - 0.5) ** 3
  np.testing.assert_allclose(sparsity, [0, 0, 0, 0.4 * p2, 0.4 * p2, 0.4], rtol=1e-6)


def test_straight_through_schedule_has_dense_gradients_every_step():
  algo = jaxprune.create("static", sparsity=0.5)._replace(flops_schedule=tf.always_dense_gradient())
  out = jaxprune.training_flops(algo, FORWARD, steps=5, batch_size=3)
  assert out.sparse == pytest.approx(5 * 3 * (2 * F_S + F_D))
  assert out.dense_gradient_steps == 5


@pytest.mark.parametrize("name", STE_FAMILY)
def test_ste_and_sr_ste_pay_a_dense_weight_gradient_every_step(name):
  algo = jaxprune.create(name, sparsity=0.5)
  out = jaxprune.training_flops(algo, FORWARD, steps=4, batch_size=2)
  assert out.sparse == pytest.approx(4 * 2 * (2 * F_S + F_D))
  assert out.dense_gradient_steps == 4


def test_default_field_is_constant_sparsity():
  algo = jaxprune.Algorithm("custom", {}, None, None, None)
  assert algo.flops_schedule is tf.constant_sparsity
  assert jaxprune.training_flops(algo, FORWARD, steps=4).ratio == pytest.approx(F_S / F_D)


@settings(max_examples=25, deadline=None)
@given(
  every=st.integers(1, 50),
  steps=st.integers(0, 400),
  end=st.floats(0.05, 1.0),
  density=st.floats(0.01, 1.0),
)
def test_rigl_cost_lies_between_sparse_and_update_step_cost(every, steps, end, density):
  forward = Flops(100, 100 * density, (LayerFlops("w", 100, 100 * density),))
  end_step = max(1, int(end * steps))
  algo = jaxprune.create("rigl", sparsity=0.5, end_step=end_step, update_every=every)
  out = jaxprune.training_flops(algo, forward, steps=steps)
  per_step = out.sparse / max(steps, 1)
  assert 3 * 100 * density - 1e-6 <= per_step or steps == 0
  assert per_step <= 2 * 100 * density + 100 + 1e-6
  expected_updates = len([t for t in range(1, min(steps, end_step)) if t % every == 0])
  assert out.dense_gradient_steps == expected_updates


def test_bad_arguments_are_named():
  algo = jaxprune.create("static", sparsity=0.5)
  with pytest.raises(ValueError, match="steps"):
    jaxprune.training_flops(algo, FORWARD, steps=-1)
  with pytest.raises(ValueError, match="batch_size"):
    jaxprune.training_flops(algo, FORWARD, steps=3, batch_size=0)
