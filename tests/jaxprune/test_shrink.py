"""Shrink while training: compaction of params, BatchNorm statistics and optimizer state."""

import functools
import re

import flax.linen as nn
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings

import jaxprune
from experiments import models
from jaxprune import shrink

HIDDEN = r"^(Conv_\d+|Dense_0)/kernel$"


def _algo(sparsity=0.5, end_step=4, include=HIDDEN, **kw):
  return shrink.tie_units(
    jaxprune.create(
      "gradual_magnitude",
      sparsity=sparsity,
      sparsity_type="channel",
      include=include,
      start_step=0,
      end_step=end_step,
      update_every=2,
      **kw,
    )
  )


def _cnn(channels=(4, 6), hidden=8):
  return models.CNN(channels=channels, hidden=hidden, num_classes=3)


def _batch(i, n=8):
  key = jax.random.fold_in(jax.random.PRNGKey(42), i)
  x = jax.random.normal(key, (n, 8, 8, 1))
  y = jax.random.randint(jax.random.fold_in(key, 1), (n,), 0, 3)
  return x, y


def _step_fn(model, tx):
  @jax.jit
  def step(params, stats, opt_state, x, y):
    def loss(p):
      logits, upd = model.apply(
        {"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
      )
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

    (_, upd), g = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, updates), upd["batch_stats"], opt_state

  return step


def _small_model(model, widths):
  n = len(model.channels)
  return model.clone(channels=tuple(widths[:n]), hidden=widths[n])


def _assert_trees_close(a, b, **kw):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (p, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(p), **kw)


def _kept_by_masks(masks):
  """The output units each layer of the (4, 6) -> 8 CNN keeps: its nonzero kernel columns."""
  unit = lambda m: np.flatnonzero(np.asarray(m).reshape(-1, np.shape(m)[-1]).any(0))
  return {n: unit(masks[n]["kernel"]) for n in ("Conv_0", "Conv_1", "Dense_0")}


def _restrict_by_hand(tree, kept):
  """Every leaf under a layer of the (4, 6) -> 8 CNN sliced to the kept units with np.take:
  a reference written apart from shrink.restrict. Dense_0 reads the flattened (h, w, c) maps
  of Conv_1's 6 channels: row r is channel r % 6."""
  k0, k1, kd = kept["Conv_0"], kept["Conv_1"], kept["Dense_0"]
  read = set(k1.tolist())  # the Conv_1 channels Dense_0 still reads

  def leaf(path, x):
    x = np.asarray(x)
    names = [getattr(k, "key", None) for k in path]
    if x.ndim == 0 or len(names) < 2:
      return x
    layer, name = names[-2], names[-1]
    if layer in ("Conv_0", "BatchNorm_0"):
      return np.take(x, k0, axis=-1)
    if layer == "Conv_1" and name == "kernel":
      return np.take(np.take(x, k0, axis=2), k1, axis=3)
    if layer in ("Conv_1", "BatchNorm_1"):
      return np.take(x, k1, axis=-1)
    if layer == "Dense_0" and name == "kernel":
      rows = [r for r in range(x.shape[0]) if r % 6 in read]
      return np.take(np.take(x, rows, axis=0), kd, axis=1)
    if layer == "Dense_0":
      return np.take(x, kd, axis=-1)
    if layer == "Dense_1" and name == "kernel":
      return np.take(x, kd, axis=0)
    return x

  return jax.tree_util.tree_map_with_path(leaf, tree)


@pytest.mark.parametrize(
  "inner",
  [
    lambda: optax.adam(1e-2),
    lambda: optax.sgd(1e-2, momentum=0.9),
    # Per-leaf norms: the trust ratio sees the weights behind removed units
    # unless tie_units masks them in the full model too.
    lambda: optax.lamb(1e-2),
    lambda: optax.chain(optax.adaptive_grad_clip(0.01), optax.adam(1e-2)),
  ],
  ids=["adam", "sgd_momentum", "lamb", "adaptive_grad_clip"],
)
def test_step_after_compaction_equals_masked_full_step(inner):
  model = _cnn()
  variables = models.init_variables(model, jax.random.PRNGKey(0), (8, 8, 1))
  params, stats = variables["params"], variables["batch_stats"]
  algo = _algo(end_step=4)
  tx = jaxprune.sparsify(inner(), algo)
  opt_state = tx.init(params)
  step = _step_fn(model, tx)
  for i in range(3):  # mask updates at counts 0 and 2
    params, stats, opt_state = step(params, stats, opt_state, *_batch(i))
  out = shrink.compact_state(params, opt_state, stats)
  assert out.widths[0] < 4 and out.widths[1] < 6 and out.widths[2] < 8 and out.widths[3] == 3

  # Compacted state == the full state restricted by hand to the units the masks keep.
  kept = _kept_by_masks(jaxprune.get_masks(opt_state))
  assert [len(kept[n]) for n in ("Conv_0", "Conv_1", "Dense_0")] == out.widths[:3]
  _assert_trees_close(out.params, _restrict_by_hand(params, kept), rtol=0, atol=0)
  _assert_trees_close(out.opt_state, _restrict_by_hand(opt_state, kept), rtol=0, atol=0)
  _assert_trees_close(out.batch_stats, _restrict_by_hand(stats, kept), rtol=0, atol=0)
  # Moments carried, not reset: the inner state's Conv kernels hold nonzero moments.
  inner_state = jaxprune.get_sparse_state(out.opt_state).inner_state
  moments = [x for x in jax.tree.leaves(inner_state) if np.ndim(x) == 4]
  assert moments and all(np.any(np.asarray(x) != 0) for x in moments)

  small = _small_model(model, out.widths)
  tx_small = jaxprune.sparsify(inner(), shrink.on_kept_units(algo, out.index))
  small_step = _step_fn(small, tx_small)
  x, y = _batch(3)
  full = step(params, stats, opt_state, x, y)
  got = small_step(out.params, out.batch_stats, out.opt_state, x, y)
  want = shrink.restrict(out.index, full[0], full[2], full[1])
  _assert_trees_close(got[0], want[0], rtol=1e-5, atol=1e-6)
  _assert_trees_close(got[2], want[1], rtol=1e-5, atol=1e-6)
  _assert_trees_close(got[1], want[2], rtol=1e-5, atol=1e-6)


def test_schedule_keeps_original_counts_after_compaction():
  model = _cnn(channels=(8, 10), hidden=12)
  variables = models.init_variables(model, jax.random.PRNGKey(1), (8, 8, 1))
  params, stats = variables["params"], variables["batch_stats"]
  algo = _algo(sparsity=0.75, end_step=6)
  tx = jaxprune.sparsify(optax.adam(1e-2), algo)
  opt_state = tx.init(params)
  step = _step_fn(model, tx)
  index = None
  for i in range(8):
    params, stats, opt_state = step(params, stats, opt_state, *_batch(i))
    if i in (2, 4):  # compact twice inside the schedule
      out = shrink.compact_state(params, opt_state, stats, index=index)
      params, opt_state, stats, index = out.params, out.opt_state, out.batch_stats, out.index
      model = _small_model(model, out.widths)
      tx = jaxprune.sparsify(optax.adam(1e-2), shrink.on_kept_units(algo, index))
      step = _step_fn(model, tx)
  out = shrink.compact_state(params, opt_state, stats, index=index)
  # 8 - floor(.75 * 8) = 2, 10 - 7 = 3, 12 - 9 = 3 units, as on the full model.
  assert out.widths == [2, 3, 3, 3]
  assert {k: len(v) for k, v in out.index.kept.items()} == {
    "Conv_0": 2,
    "Conv_1": 3,
    "Dense_0": 3,
    "Dense_1": 3,
  }
  assert out.index.kept["Conv_1"].max() < 10
  dense_state = shrink.without_masks(out.opt_state)
  assert all(np.ndim(m) == 0 for m in jax.tree.leaves(dense_state.masks))


def _train(model, params, stats, algo, steps, compact_after=(), inner=lambda: optax.adam(1e-2)):
  """``steps`` steps of ``algo``; compacts after the listed steps; returns the
  final state compacted once more (a :class:`shrink.Shrunk`)."""
  tx = jaxprune.sparsify(inner(), algo)
  opt_state = tx.init(params)
  step, index = _step_fn(model, tx), None
  for i in range(steps):
    params, stats, opt_state = step(params, stats, opt_state, *_batch(i))
    if i in compact_after:
      out = shrink.compact_state(params, opt_state, stats, index=index)
      params, opt_state, stats, index = out.params, out.opt_state, out.batch_stats, out.index
      model = _small_model(model, out.widths)
      step = _step_fn(model, jaxprune.sparsify(inner(), shrink.on_kept_units(algo, index)))
  return shrink.compact_state(params, opt_state, stats, index=index)


@settings(max_examples=6, deadline=None)
@given(
  channels=st.tuples(st.integers(4, 9), st.integers(4, 9)),
  hidden=st.integers(4, 10),
  sparsity=st.sampled_from([0.5, 0.75]),
  seed=st.integers(0, 2**16),
)
def test_compacted_run_chooses_the_units_of_the_masked_full_run(channels, hidden, sparsity, seed):
  # Mask updates at counts 0, 2, 4, 6; compactions after steps 2 and 4, inside the
  # schedule. The units chosen after a compaction are scored on the small model;
  # they must be those the masked full model chooses, and the weights the same.
  model = _cnn(channels=channels, hidden=hidden)
  variables = models.init_variables(model, jax.random.PRNGKey(seed), (8, 8, 1))
  args = (model, variables["params"], variables["batch_stats"], _algo(sparsity, end_step=6), 8)
  full = _train(*args)
  shrunk = _train(*args, compact_after=(2, 4))
  for layer, kept in full.index.kept.items():
    np.testing.assert_array_equal(shrunk.index.kept[layer], kept, err_msg=layer)
  _assert_trees_close(shrunk.params, full.params, rtol=1e-4, atol=1e-5)
  _assert_trees_close(shrunk.batch_stats, full.batch_stats, rtol=1e-4, atol=1e-5)


@settings(max_examples=3, deadline=None)
@given(
  channels=st.tuples(st.integers(4, 8), st.integers(4, 8)),
  sparsity=st.sampled_from([0.5, 0.75]),
  seed=st.integers(0, 2**16),
)
def test_taylor_mean_sums_survive_a_compaction_inside_their_window(channels, sparsity, seed):
  # Mask updates at counts 0, 3, 6 (of 9); compactions after steps 4 and 7, when the sums
  # already hold a batch of the next window. They are kept in the original numbering
  # (on_kept_units scores on the full shapes), so the compacted run ranks on the same
  # means as the masked full run and keeps the same units.
  model = _cnn(channels=channels, hidden=6)
  variables = models.init_variables(model, jax.random.PRNGKey(seed), (8, 8, 1))
  algo = _taylor_mean_algo(sparsity, end_step=9, every=3)
  args = (model, variables["params"], variables["batch_stats"], algo, 9)
  full = _train(*args)
  shrunk = _train(*args, compact_after=(4, 7))
  assert sum(len(v) for v in full.index.kept.values()) < sum(channels) + 6 + 3
  for layer, kept in full.index.kept.items():
    np.testing.assert_array_equal(shrunk.index.kept[layer], kept, err_msg=layer)
  _assert_trees_close(shrunk.params, full.params, rtol=1e-4, atol=1e-5)
  a, b = shrunk.opt_state.algo_state, full.opt_state.algo_state
  assert int(a.batches) == int(b.batches) == 2
  _assert_trees_close(a.total, b.total, rtol=1e-4, atol=1e-7)


def test_tied_masks_mask_the_weights_that_read_a_removed_unit():
  model = _cnn(channels=(4, 6), hidden=8)
  variables = models.init_variables(model, jax.random.PRNGKey(0), (8, 8, 1))
  params = variables["params"]
  masks = jax.tree.map(lambda p: jnp.ones(jnp.shape(p), jnp.bool_), params)
  masks["Dense_1"]["kernel"] = jnp.asarray(True)  # the output layer is not pruned
  masks["Conv_0"]["kernel"] = masks["Conv_0"]["kernel"].at[..., 1].set(False)
  masks["Conv_1"]["kernel"] = masks["Conv_1"]["kernel"].at[..., jnp.array([0, 5])].set(False)
  masks["Dense_0"]["kernel"] = masks["Dense_0"]["kernel"].at[:, 3].set(False)
  tied = shrink.tie_masks(params, masks)
  conv1 = np.asarray(tied["Conv_1"]["kernel"])
  assert not conv1[:, :, 1, :].any() and conv1[:, :, [0, 2, 3], :][..., 1:5].all()
  assert not conv1[..., [0, 5]].any()
  # Conv_1 -> flatten (2x2 positions x 6 channels, row-major) -> Dense_0.
  dense0 = np.asarray(tied["Dense_0"]["kernel"])
  assert dense0.shape == (24, 8)
  live_rows = np.tile([False, True, True, True, True, False], 4)
  np.testing.assert_array_equal(dense0.any(axis=1), live_rows)
  np.testing.assert_array_equal(dense0[live_rows][:, [0, 1, 2, 4, 5, 6, 7]].all(), True)
  dense1 = np.asarray(tied["Dense_1"]["kernel"])  # rows of Dense_0's removed unit 3
  assert dense1.shape == (8, 3) and not dense1[3].any() and np.delete(dense1, 3, 0).all()
  for leaf, unit in (("BatchNorm_0/scale", 1), ("BatchNorm_1/bias", 0), ("Dense_0/bias", 3)):
    layer, name = leaf.split("/")
    assert not np.asarray(tied[layer][name])[unit] and np.asarray(tied[layer][name]).sum() > 1
  compacted = jaxprune.compact.compact(params, tied, variables["batch_stats"])
  assert compacted.widths == [3, 4, 7, 3]


def test_tied_masks_name_a_kernel_that_does_not_read_the_previous_layer():
  params = {
    "Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)},
    "Dense_1": {"kernel": jnp.ones((6, 2)), "bias": jnp.ones(2)},
  }
  masks = {
    "Dense_0": {"kernel": jnp.ones((3, 4), bool).at[:, 0].set(False), "bias": jnp.asarray(True)},
    "Dense_1": {"kernel": jnp.asarray(True), "bias": jnp.asarray(True)},
  }
  with pytest.raises(
    ValueError, match="'Dense_1/kernel' has 6 input rows, not a multiple of the 4"
  ):
    shrink.tie_masks(params, masks)


def test_state_check_names_the_leaf_that_cannot_be_compacted():
  # optax.sm3 keeps one accumulator per axis of each parameter: it has the
  # parameter's shape only for vectors, so slicing by parameter misses the others.
  model = _cnn()
  variables = models.init_variables(model, jax.random.PRNGKey(0), (8, 8, 1))
  params, stats = variables["params"], variables["batch_stats"]
  algo = _algo(end_step=4)
  tx = jaxprune.sparsify(optax.sm3(1e-2), algo)
  opt_state = tx.init(params)
  step = _step_fn(model, tx)
  for i in range(3):
    params, stats, opt_state = step(params, stats, opt_state, *_batch(i))
  with pytest.raises(
    ValueError, match=r"optimizer state leaf .*mu\['BatchNorm_0'\]\['bias'\].* has shape \(4,\)"
  ):
    shrink.compact_state(params, opt_state, stats, tx=tx)
  adam = jaxprune.sparsify(optax.adam(1e-2), algo)
  masks = jaxprune.get_sparse_state(opt_state).masks
  out = shrink.compact_state(params, adam.init(params), stats, masks=masks, tx=adam)
  assert out.widths[0] < 4  # the same compaction passes the check for Adam's state


def test_plain_optax_chain_state_is_compacted_with_given_masks():
  model = nn.Sequential([nn.Dense(6), nn.relu, nn.Dense(5), nn.relu, nn.Dense(2)])
  params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 3)))["params"]
  params = {f"Dense_{i}": v for i, v in enumerate(params.values())}
  keep0 = np.array([1, 0, 1, 1, 0, 1], bool)
  masks = jax.tree.map(lambda _: jnp.asarray(True), params)
  masks["Dense_0"] = {"kernel": jnp.broadcast_to(keep0, (3, 6)), "bias": jnp.asarray(keep0)}
  params = jaxprune.apply_masks(params, masks)
  tx = optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(0.1, momentum=0.9))
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, state = tx.update(grads, state, params)
  out = shrink.compact_state(params, state, masks=masks)
  assert out.widths == [4, 5, 2]
  trace = out.opt_state[1][0].trace
  assert trace["Dense_0"]["kernel"].shape == (3, 4)
  assert trace["Dense_1"]["kernel"].shape == (4, 5)
  assert trace["Dense_2"]["kernel"].shape == (5, 2)


@given(
  widths=st.lists(st.integers(2, 7), min_size=1, max_size=3),
  seed=st.integers(0, 10_000),
)
def test_mlp_compaction_counts_and_function(widths, seed):
  rng = np.random.default_rng(seed)
  sizes = [5, *widths, 3]
  params, masks = {}, {}
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
    params[f"Dense_{i}"] = {
      "kernel": jnp.asarray(rng.normal(size=(a, b)), jnp.float32),
      "bias": jnp.asarray(rng.normal(size=(b,)), jnp.float32),
    }
    if i < len(widths):
      keep = rng.random(b) < 0.5
      keep[rng.integers(b)] = True
      masks[f"Dense_{i}"] = {"kernel": jnp.broadcast_to(keep, (a, b)), "bias": jnp.asarray(keep)}
    else:
      masks[f"Dense_{i}"] = {"kernel": jnp.asarray(True), "bias": jnp.asarray(True)}
  params = jaxprune.apply_masks(params, masks)
  state = optax.adam(1e-3).init(params)
  out = shrink.compact_state(params, state, masks=masks)
  counts = [int(np.asarray(masks[f"Dense_{i}"]["bias"]).sum()) for i in range(len(widths))]
  assert out.widths == [*counts, 3]

  def forward(p, x):
    for i in range(len(p)):
      x = x @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"]
      x = jax.nn.relu(x) if i < len(p) - 1 else x
    return x

  x = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
  np.testing.assert_allclose(forward(out.params, x), forward(params, x), rtol=1e-5, atol=1e-5)
  for leaf in jax.tree.leaves(out.opt_state):
    assert np.ndim(leaf) == 0 or np.shape(leaf) in {
      np.shape(p) for p in jax.tree.leaves(out.params)
    }


def test_untied_masks_raise_naming_the_layer():
  model = _cnn()
  variables = models.init_variables(model, jax.random.PRNGKey(0), (8, 8, 1))
  params, stats = variables["params"], variables["batch_stats"]
  params["BatchNorm_0"]["bias"] = params["BatchNorm_0"]["bias"] + 0.5
  algo = jaxprune.create(
    "gradual_magnitude",
    sparsity=0.5,
    sparsity_type="channel",
    include=HIDDEN,
    start_step=0,
    end_step=2,
    update_every=2,
  )
  tx = jaxprune.sparsify(optax.adam(1e-2), algo)
  opt_state = tx.init(params)
  step = _step_fn(model, tx)
  for i in range(3):  # the update at count 2 prunes
    params, stats, opt_state = step(params, stats, opt_state, *_batch(i))
  with pytest.raises(ValueError, match=re.escape("'Conv_0'")):
    shrink.compact_state(params, opt_state, stats)


def test_unsupported_model_raises_naming_the_layer():
  params = {
    "Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)},
    "LayerNorm_0": {"scale": jnp.ones(4), "bias": jnp.ones(4)},
    "Dense_1": {"kernel": jnp.ones((4, 2)), "bias": jnp.ones(2)},
  }
  masks = jax.tree.map(lambda _: jnp.asarray(True), params)
  with pytest.raises(ValueError, match="LayerNorm_0"):
    shrink.compact_state(params, optax.adam(1e-3).init(params), masks=masks)


def test_output_layer_and_sparsity_type_errors():
  model = _cnn()
  params = models.init_variables(model, jax.random.PRNGKey(0), (8, 8, 1))["params"]
  with pytest.raises(ValueError, match="output layer 'Dense_1'"):
    _algo(include=r"kernel$").init(params)
  with pytest.raises(ValueError, match="sparsity_type"):
    shrink.tie_units(jaxprune.create("gradual_magnitude", sparsity=0.5, end_step=4))


def test_compaction_steps_and_errors():
  algo = jaxprune.create(
    "gradual_magnitude",
    sparsity=0.5,
    sparsity_type="channel",
    start_step=100,
    end_step=500,
    update_every=100,
  )
  assert shrink.compaction_steps(algo, [0.25, 0.5, 0.75, 1.0], 1000) == [201, 301, 401, 501]
  with pytest.raises(ValueError, match=r"compact_at=0.0 is at or before the pruning schedule"):
    shrink.compaction_steps(algo, [0.0, 0.5], 1000)
  with pytest.raises(ValueError, match=r"compact_at=0.1 maps to the mask update at start_step=100"):
    shrink.compaction_steps(algo, [0.1, 0.5], 1000)
  assert shrink.compaction_steps(algo, [0.25], 1000) == [201]
  with pytest.raises(ValueError, match=r"compact_at=1.5 is after it ends"):
    shrink.compaction_steps(algo, [1.5], 1000)
  with pytest.raises(ValueError, match="beyond the 400 training steps"):
    shrink.compaction_steps(algo, [1.0], 400)


def _cnn_params(rng, channels, hidden=8, classes=3):
  """Random params of `_cnn(channels, hidden)` on 8x8x1 inputs, without tracing."""
  c0, c1 = channels
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return {
    "Conv_0": {"kernel": normal(3, 3, 1, c0), "bias": normal(c0)},
    "BatchNorm_0": {"scale": normal(c0), "bias": normal(c0)},
    "Conv_1": {"kernel": normal(3, 3, c0, c1), "bias": normal(c1)},
    "BatchNorm_1": {"scale": normal(c1), "bias": normal(c1)},
    "Dense_0": {"kernel": normal(2 * 2 * c1, hidden), "bias": normal(hidden)},
    "Dense_1": {"kernel": normal(hidden, classes), "bias": normal(classes)},
  }


@given(
  seed=st.integers(0, 2**16),
  channels=st.sampled_from([(2, 3), (5, 4), (8, 9)]),
  sparsity=st.sampled_from([0.25, 0.5, 0.75]),
)
def test_batchnorm_scale_scores_keep_the_largest_gammas_whatever_the_kernel_scale(
  seed, channels, sparsity
):
  # BatchNorm makes a conv's function independent of each channel's kernel scale;
  # the network-slimming ranking must be too: it keeps exactly the channels with the
  # largest |gamma| (ties to the lower index), the hidden Dense (no BatchNorm) by norm.
  rng = np.random.default_rng(seed)
  params = _cnn_params(rng, channels)
  for i, c in enumerate(channels):
    params[f"BatchNorm_{i}"]["scale"] = jnp.asarray(rng.permutation(c) - c / 2 + 0.25)
    params[f"Conv_{i}"]["kernel"] *= jnp.asarray(rng.uniform(0.01, 100.0, c), jnp.float32)
  algo = shrink.tie_units(
    shrink.score_by_batchnorm_scale(
      jaxprune.create("magnitude", sparsity=sparsity, sparsity_type="channel", include=HIDDEN)
    )
  )
  masks, _ = algo.init(params)
  masks, _ = algo.update(0, params, params, masks, ())
  for i, c in enumerate(channels):
    kept = np.asarray(masks[f"Conv_{i}"]["kernel"]).reshape(-1, c).any(axis=0)
    gamma = np.abs(np.asarray(params[f"BatchNorm_{i}"]["scale"]))
    expected = np.zeros(c, bool)
    expected[np.argsort(-gamma, kind="stable")[: c - int(np.floor(sparsity * c))]] = True
    np.testing.assert_array_equal(kept, expected, err_msg=f"Conv_{i}")
    np.testing.assert_array_equal(np.asarray(masks[f"BatchNorm_{i}"]["scale"]), expected)
  dense = np.asarray(params["Dense_0"]["kernel"])
  h = dense.shape[1]
  expected = np.zeros(h, bool)
  expected[
    np.argsort(-np.sqrt((dense**2).sum(0)), kind="stable")[: h - int(np.floor(sparsity * h))]
  ] = True
  np.testing.assert_array_equal(np.asarray(masks["Dense_0"]["kernel"]).any(axis=0), expected)


def test_batchnorm_scale_scores_leave_layers_without_batchnorm_alone():
  params = models.init_variables(_cnn(), jax.random.PRNGKey(0), (8, 8, 1))["params"]
  scored = shrink.batchnorm_scale_scores(params)
  for name in ("Dense_0", "Dense_1"):
    np.testing.assert_array_equal(scored[name]["kernel"], params[name]["kernel"])
  unit_norms = np.sqrt((np.asarray(scored["Conv_1"]["kernel"]) ** 2).reshape(-1, 6).sum(0))
  np.testing.assert_allclose(unit_norms, np.abs(params["BatchNorm_1"]["scale"]), rtol=1e-5)


@functools.lru_cache(maxsize=None)
def _loss_derivatives(channels):
  """Jitted gradient of the CNN's training loss, and its derivative along a direction."""
  model = _cnn(channels)

  def loss(p, stats, x, y):
    logits, _ = model.apply(
      {"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  slope = lambda p, d, *a: jax.jvp(lambda q: loss(q, *a), (p,), (d,))[1]  # noqa: E731
  return jax.jit(jax.grad(loss)), jax.jit(slope)


def _removal_slopes(slope_along, params, *args):
  """For every unit of every Dense/Conv layer: |the derivative of the training loss
  along the direction that removes the unit| (its kernel column, bias and following
  BatchNorm scaled down together), by forward-mode differentiation."""
  slopes = {}
  for lin, bn in [("Conv_0", "BatchNorm_0"), ("Conv_1", "BatchNorm_1"), ("Dense_0", None)]:
    units = params[lin]["kernel"].shape[-1]
    out = []
    for c in range(units):
      onehot = jnp.zeros(units).at[c].set(1.0)
      direction = jax.tree.map(jnp.zeros_like, params)
      for name in [lin] + ([bn] if bn else []):
        direction[name] = jax.tree.map(lambda v: -v * onehot, params[name])
      out.append(float(slope_along(params, direction, *args)))
    slopes[lin] = np.abs(np.asarray(out))
  return slopes


@settings(max_examples=6, deadline=None)
@given(
  seed=st.integers(0, 2**16),
  channels=st.sampled_from([(3, 4), (5, 6)]),
  sparsity=st.sampled_from([0.25, 0.5, 0.75]),
)
def test_taylor_scores_rank_units_by_the_loss_slope_of_removing_them(seed, channels, sparsity):
  # |T_c| must be the first-order loss change of removing unit c with its bias and
  # BatchNorm (checked against forward-mode differentiation of the real model), and
  # score_by_taylor must keep the units with the largest |T_c| in every layer.
  rng = np.random.default_rng(seed)
  params = _cnn_params(rng, channels)
  stats = {
    f"BatchNorm_{i}": {"mean": jnp.zeros(c), "var": jnp.ones(c)} for i, c in enumerate(channels)
  }
  x, y = _batch(seed, n=16)
  grad, slope_along = _loss_derivatives(channels)
  grads = grad(params, stats, x, y)
  slopes = _removal_slopes(slope_along, params, stats, x, y)
  scored = shrink.taylor_unit_scores(params, grads)
  algo = shrink.tie_units(
    shrink.score_by_taylor(
      jaxprune.create("magnitude", sparsity=sparsity, sparsity_type="channel", include=HIDDEN)
    )
  )
  masks, _ = algo.init(params)
  masks, _ = algo.update(0, params, grads, masks, ())
  for lin, slope in slopes.items():
    units = slope.size
    kernel = np.asarray(scored[lin]["kernel"]).reshape(-1, units)
    np.testing.assert_allclose(
      np.sqrt((kernel**2).sum(0)), slope, rtol=2e-3, atol=1e-6, err_msg=lin
    )
    kept = np.asarray(masks[lin]["kernel"]).reshape(-1, units).any(axis=0)
    assert kept.sum() == units - int(np.floor(sparsity * units)), lin
    if not kept.all():
      assert slope[kept].min() >= slope[~kept].max() - 1e-5, (lin, slope, kept)


def _taylor_mean_algo(sparsity, end_step=9, every=3, momentum=0.0):
  return shrink.tie_units(
    shrink.score_by_taylor(
      jaxprune.create(
        "gradual_magnitude",
        sparsity=sparsity,
        sparsity_type="channel",
        include=HIDDEN,
        start_step=0,
        end_step=end_step,
        update_every=every,
      ),
      average=True,
      momentum=momentum,
    )
  )


def _apply_masks(params, masks):
  return jax.tree.map(lambda p, m: jnp.where(m, p, 0.0), params, masks)


def _kept_units(masks, layer):
  m = np.asarray(masks[layer]["kernel"])
  return m.reshape(-1, m.shape[-1]).any(axis=0)


@settings(max_examples=8, deadline=None)
@given(
  seed=st.integers(0, 2**16),
  channels=st.sampled_from([(4, 5), (6, 8)]),
  sparsity=st.sampled_from([0.5, 0.75]),
  momentum=st.sampled_from([0.0, 0.9]),
)
def test_taylor_mean_ranks_on_the_mean_square_since_the_last_update(
  seed, channels, sparsity, momentum
):
  # Mask updates at counts 0, 3, 6, 9. On every other step the masks stay and the
  # estimate's square is added up; at an update the kept units are the top ones by
  # the mean of T_c^2 over the batches since the previous update (that one's own
  # excluded, the update step's included), computed here by hand from per-step
  # estimates, and the sums restart. With momentum the criterion is the moving
  # average of those means over the updates, the first update's mean as is.
  rng = np.random.default_rng(seed)
  params = _cnn_params(rng, channels)
  algo = _taylor_mean_algo(sparsity, momentum=momentum)
  masks, state = algo.init(params)
  update, estimates = jax.jit(algo.update), jax.jit(shrink.taylor_unit_estimates)
  window, ema = [], None
  for step in range(10):
    assert bool(algo.is_update_step(step))  # accumulates on every step
    p = _apply_masks(jax.tree.map(lambda x: x + 0.1 * step, params), masks)
    grads = _cnn_params(rng, channels)
    t = estimates(p, grads)
    window.append({k: np.asarray(v, np.float64) ** 2 for k, v in t.items()})
    old = masks
    masks, state = update(step, p, grads, masks, state)
    if step % 3:
      assert int(state.batches) == len(window)
      for layer in ("Conv_0", "Conv_1", "Dense_0"):
        np.testing.assert_array_equal(_kept_units(masks, layer), _kept_units(old, layer))
      continue
    assert int(state.batches) == 0
    assert all(not np.any(np.asarray(v)) for v in state.total.values())
    means = {k: np.mean([w[k] for w in window], axis=0) for k in window[0]}
    if momentum:
      ema = (
        means if ema is None else {k: momentum * ema[k] + (1 - momentum) * means[k] for k in ema}
      )
      assert int(state.decided) == step // 3 + 1
      for layer, v in ema.items():
        np.testing.assert_allclose(np.asarray(state.averaged[layer]), v, rtol=1e-4, atol=1e-12)
      means = ema
    else:
      assert state.averaged is None and state.decided is None
    for layer in ("Conv_0", "Conv_1", "Dense_0"):
      mean = means[layer]
      kept = _kept_units(masks, layer)
      was = _kept_units(old, layer)
      assert not np.any(kept & ~was), layer  # units only go
      if kept.sum() < was.sum():  # this update removed units: the lowest means went
        assert mean[kept].min() >= mean[was & ~kept].max() * (1 - 1e-5), (layer, step)
    window = []


def test_score_by_taylor_refuses_a_momentum_it_cannot_use():
  algo = jaxprune.create("magnitude", sparsity=0.5, sparsity_type="channel", include=HIDDEN)
  for momentum in (-0.1, 1.0):
    with pytest.raises(ValueError, match="must be in"):
      shrink.score_by_taylor(algo, average=True, momentum=momentum)
  with pytest.raises(ValueError, match="needs average=True"):
    shrink.score_by_taylor(algo, momentum=0.9)


def test_taylor_mean_refuses_an_algorithm_that_skips_the_optimizer_step():
  rigl = jaxprune.create(
    "rigl", sparsity=0.5, update_every=10, end_step=100, reference=True, include=HIDDEN
  )
  assert rigl.skip_optimizer_step
  with pytest.raises(ValueError, match="rigl skips the optimizer step"):
    shrink.score_by_taylor(rigl, average=True)
  shrink.score_by_taylor(rigl, average=False)  # one batch: the schedule is RigL's own


def test_taylor_mean_differs_from_the_last_batch_when_the_batches_disagree():
  # A control: one Conv_0 unit with a large estimate on the first batch of the window
  # only. The last batch alone ranks it last; the mean keeps it.
  rng = np.random.default_rng(0)
  params = _cnn_params(rng, (4, 5))
  params["Conv_0"]["kernel"] = jnp.ones_like(params["Conv_0"]["kernel"])
  params["BatchNorm_0"] = {"scale": jnp.ones(4), "bias": jnp.zeros(4)}
  params["Conv_0"]["bias"] = jnp.zeros(4)
  zero = jax.tree.map(jnp.zeros_like, params)

  def grads(conv0_unit_slopes):
    g = jax.tree.map(jnp.copy, zero)
    g["BatchNorm_0"]["scale"] = jnp.asarray(conv0_unit_slopes, jnp.float32)
    return g

  batches = [grads([9.0, 1.0, 1.0, 1.0]), grads([0.0, 1.0, 1.0, 1.0]), grads([0.0, 2.0, 1.5, 1.2])]
  for average, keeps_unit_0 in ((True, True), (False, False)):
    algo = shrink.tie_units(
      shrink.score_by_taylor(
        jaxprune.create("magnitude", sparsity=0.25, sparsity_type="channel", include=HIDDEN),
        average=average,
      )
    )
    masks, state = algo.init(params)
    if average:  # the two batches before the update step, then the update step's
      for g in batches[:2]:
        masks, state = algo.update(1, params, g, masks, state)
    masks, state = algo.update(0, params, batches[2], masks, state)
    kept = _kept_units(masks, "Conv_0")
    assert kept.sum() == 3 and bool(kept[0]) == keeps_unit_0, (average, kept)
