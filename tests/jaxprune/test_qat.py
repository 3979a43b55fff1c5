"""qwix quantisation-aware training composed with `jaxprune.sparsify` (jaxprune.qat)."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxprune

qwix = pytest.importorskip("qwix")
from jaxprune import qat  # noqa: E402

D_IN, HIDDEN, OUT = 32, 64, 16  # Dense kernels (32, 64) and (64, 16): groups of 16 divide both.
GRIDS = [  # (bits, group_size, asymmetric)
  (8, None, False),
  (4, 16, False),
  (8, None, True),
  (4, 16, True),
]


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(OUT)(nn.relu(nn.Dense(HIDDEN)(x)))


def _data(n=64):
  kx, ky = jax.random.split(jax.random.PRNGKey(1))
  return jax.random.normal(kx, (n, D_IN)), jax.random.randint(ky, (n,), 0, OUT)


def _train_linen(model, algorithm, steps=5):
  x, y = _data()
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  tx = jaxprune.sparsify(optax.adam(1e-3), algorithm)
  state = tx.init(params)
  params = jaxprune.apply_masks(params, jaxprune.get_masks(state))

  def loss(p):
    logits = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(p, s):
    updates, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, updates), s

  for _ in range(steps):
    params, state = step(params, state)
  return params, jaxprune.get_masks(state), x


def _flat(tree):
  return {
    jaxprune.path_str(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _check_sparse_on_grid(params, masks, sparsity, bits, group_size, asymmetric):
  """Exact kept counts, exact zeros, and zero codes (dequantised 0.0) at pruned entries."""
  flat_params, flat_masks = _flat(params), _flat(masks)
  codes = qat.tree_codes(params, bits, group_size=group_size, asymmetric=asymmetric)
  assert set(codes) == {p for p, v in flat_params.items() if v.ndim >= 2}
  for path, kernel in flat_params.items():
    mask = np.broadcast_to(flat_masks[path], kernel.shape)
    if kernel.ndim < 2:
      assert mask.all()
      continue
    n = kernel.size
    assert mask.sum() == n - math.floor(sparsity * n), path
    assert np.all(kernel[~mask] == 0.0), path
    assert np.count_nonzero(kernel[mask]) > 0.9 * mask.sum(), path  # kept ones trained
    c = np.asarray(codes[path])
    assert np.all(c[~mask] == 0), path
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    q = qat.quantize_kernel(kernel, bits, group_size=group_size, asymmetric=asymmetric)
    assert np.all((np.asarray(q.qvalue) >= lo) & (np.asarray(q.qvalue) <= hi))
    assert np.all(np.asarray(qwix.dequantize(q))[~mask] == 0.0), path
    if asymmetric:  # Stored code at a pruned entry: the (integer) zero point, not 0.
      zp = qat._expand(q.zero_point.astype(jnp.int32), kernel.shape)
      assert np.all(np.asarray(q.qvalue, np.int32)[~mask] == np.asarray(zp)[~mask])
    else:
      assert q.zero_point is None
      assert np.all(np.asarray(q.qvalue)[~mask] == 0)
    assert len(np.unique(c[mask])) > 2  # kept weights spread over the grid


@pytest.mark.parametrize("bits,group_size,asymmetric", GRIDS)
def test_qat_linen_sparsify_keeps_exact_zeros_and_zero_codes(bits, group_size, asymmetric):
  rules = qat.qat_rules(bits, group_size=group_size, asymmetric=asymmetric)
  model = qwix.quantize_model(MLP(), qwix.QtProvider(rules))
  algo = jaxprune.create("magnitude", sparsity=0.5)
  params, masks, x = _train_linen(model, algo)
  _check_sparse_on_grid(params, masks, 0.5, bits, group_size, asymmetric)
  # The QAT layers compute with exactly the grid of `fake_quantize`, not with float weights.
  qat_out = model.apply({"params": params}, x)
  rounded = qat.fake_quantize(params, bits, group_size=group_size, asymmetric=asymmetric)
  np.testing.assert_allclose(qat_out, MLP().apply({"params": rounded}, x), rtol=1e-5, atol=1e-5)
  assert not np.allclose(qat_out, MLP().apply({"params": params}, x), atol=1e-4)


def test_qat_linen_gradual_nm_int4_groups():
  rules = qat.qat_rules(4, group_size=16)
  model = qwix.quantize_model(MLP(), qwix.QtProvider(rules))
  algo = jaxprune.create(
    "gradual_magnitude", sparsity_type="2:4", start_step=0, end_step=4, update_every=1
  )
  params, masks, _ = _train_linen(model, algo, steps=6)
  _check_sparse_on_grid(params, masks, 0.5, 4, 16, False)
  for path, mask in _flat(masks).items():  # 2 of every 4 consecutive inputs kept.
    if mask.ndim == 2:
      groups = mask.reshape(mask.shape[0] // 4, 4, mask.shape[1]).sum(axis=1)
      assert np.all(groups == 2), path


class NNXMLP(nnx.Module):
  def __init__(self, rngs):
    self.a = nnx.Linear(D_IN, HIDDEN, rngs=rngs)
    self.b = nnx.Linear(HIDDEN, OUT, rngs=rngs)

  def __call__(self, x):
    return self.b(nnx.relu(self.a(x)))


@pytest.mark.parametrize("bits,group_size,asymmetric", [GRIDS[0], GRIDS[3]])
def test_qat_nnx_sparsify_keeps_exact_zeros_and_zero_codes(bits, group_size, asymmetric):
  x, y = _data()
  rules = qat.qat_rules(bits, group_size=group_size, asymmetric=asymmetric)
  model = qwix.quantize_model(NNXMLP(nnx.Rngs(0)), qwix.QtProvider(rules), x)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = jaxprune.sparsify(optax.adam(1e-3), jaxprune.create("magnitude", sparsity=0.5))
  state = tx.init(params)
  params = jaxprune.apply_masks(params, jaxprune.get_masks(state))

  def loss(p):
    logits = nnx.merge(graphdef, p, rest)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(p, s):
    updates, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, updates), s

  for _ in range(5):
    params, state = step(params, state)
  _check_sparse_on_grid(params, jaxprune.get_masks(state), 0.5, bits, group_size, asymmetric)
  float_model = nnx.merge(*nnx.split(NNXMLP(nnx.Rngs(0))))
  nnx.update(
    float_model, qat.fake_quantize(params, bits, group_size=group_size, asymmetric=asymmetric)
  )
  np.testing.assert_allclose(
    nnx.merge(graphdef, params, rest)(x), float_model(x), rtol=1e-5, atol=1e-5
  )


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 16)])
def test_qat_ptq_of_sparse_model_keeps_pruned_codes_zero(bits, group_size):
  params, masks, x = _train_linen(MLP(), jaxprune.create("magnitude", sparsity=0.5))
  ptq_model, qparams = qat.ptq(MLP(), params, x, rules=qat.ptq_rules(bits, group_size=group_size))
  flat_masks, codes = _flat(masks), qat.tree_codes(params, bits, group_size=group_size)
  for layer in ("Dense_0", "Dense_1"):
    qvalue = np.asarray(qparams[layer]["kernel"].array.qvalue, np.int32)
    mask = flat_masks[f"{layer}/kernel"]
    assert np.all(qvalue[~mask] == 0)
    assert np.array_equal(qvalue, np.asarray(codes[f"{layer}/kernel"]))  # same grid as qwix PTQ
  rounded = qat.fake_quantize(params, bits, group_size=group_size)
  np.testing.assert_allclose(
    ptq_model.apply({"params": qparams}, x),
    MLP().apply({"params": rounded}, x),
    rtol=1e-4,
    atol=1e-4,
  )


@settings(max_examples=15, deadline=None)
@given(
  rows=st.sampled_from([16, 48]),  # few shapes: each new one compiles the eager ops
  cols=st.sampled_from([1, 5]),
  sparsity=st.sampled_from([0.0, 0.5, 0.9]),
  grid=st.sampled_from(GRIDS),
  seed=st.integers(0, 2**16),
)
def test_qat_codes_are_zero_exactly_at_zero_weights(rows, cols, sparsity, grid, seed):
  bits, group_size, asymmetric = grid
  group_size = 8 if group_size else None
  key = jax.random.PRNGKey(seed)
  kernel = jax.random.normal(key, (rows, cols)) + 0.3  # skewed: asymmetric ranges differ
  kept = jaxprune.magnitude_masks({"k": kernel}, {"k": sparsity})["k"]
  kernel = jnp.where(kept, kernel, 0.0)
  codes = np.asarray(qat.integer_codes(kernel, bits, group_size=group_size, asymmetric=asymmetric))
  assert codes.shape == kernel.shape and codes.dtype == np.int32
  assert np.all(codes[~np.asarray(kept)] == 0)
  dequantised = qwix.dequantize(
    qat.quantize_kernel(kernel, bits, group_size=group_size, asymmetric=asymmetric)
  )
  assert np.all((np.asarray(dequantised) == 0.0) == (codes == 0))


def test_qat_bad_input_names_the_problem():
  with pytest.raises(ValueError, match="bits"):
    qat.qat_rules(3)
  with pytest.raises(ValueError, match="group_size"):
    qat.qat_rules(4, group_size=0)
  params = {"Dense_0": {"kernel": jnp.ones((24, 4)), "bias": jnp.ones(4)}}
  with pytest.raises(ValueError, match="Dense_0/kernel.*group_size=16 does not divide.*24"):
    qat.tree_codes(params, 4, group_size=16)
  with pytest.raises(ValueError, match="ndim >= 2"):
    qat.integer_codes(jnp.ones(4), 8)


def test_qat_conv_kernels_are_per_output_channel():
  kernel = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 8, 5))
  q = qat.quantize_kernel(kernel, 4, group_size=16)  # group_size applies to 2-D kernels only
  assert q.scale.shape == (1, 1, 1, 5)


def test_qat_experiment_flags_and_existing_output(tmp_path, capsys):
  from experiments import qat as experiment
  from experiments import train

  with pytest.raises(train.ConfigError, match="--precisions"):
    experiment.parse(["qat", "--precisions=float,int3"])
  with pytest.raises(train.ConfigError, match="--sparsities"):
    experiment.parse(["qat", "--sparsities=0,1.0"])
  with pytest.raises(train.ConfigError, match="unknown argument '--stpes=3'"):
    experiment.parse(["qat", "--stpes=3"])
  flags, overrides = experiment.parse(["qat", "--seeds=0,1", "--config.batch_size=64"])
  assert overrides == ["--config.batch_size=64"]
  cells = experiment.plan(flags)
  assert len(cells) == 18 and {c.seed for c in cells[:9]} == {0}  # seed-major
  out = tmp_path / "done.json"
  out.write_text('{"rows": []}')
  assert experiment.main(["qat", f"--out={out}", f"--workdir={tmp_path}"]) == 2
  assert "exists" in capsys.readouterr().err and out.read_text() == '{"rows": []}'


def test_qat_experiment_table_mean_and_std():
  from experiments import qat as experiment

  rows = [
    {
      "precision": p,
      "sparsity": 0.5,
      "seed": s,
      "test_accuracy": a,
      "ptq_int8_accuracy": a,
      "ptq_int4_accuracy": a - 0.1,
    }
    for p, s, a in [("int4", 0, 0.80), ("int4", 1, 0.82), ("float", 0, 0.9)]
  ]
  markdown, summary = experiment.table(rows)
  assert [e["precision"] for e in summary] == ["float", "int4"]
  assert summary[1]["test_accuracy"] == [81.0, 1.41] and summary[1]["seeds"] == 2
  assert "| QAT int4 | 0.5 | 81.00 ± 1.41 (2) | 81.00 ± 1.41 (2) | 71.00 ± 1.41 (2) |" in markdown


@pytest.mark.slow
def test_qat_experiment_runs_end_to_end(tmp_path):
  import json

  from experiments import qat as experiment

  out = tmp_path / "qat.json"
  argv = [
    "qat",
    "--steps=4",
    "--precisions=float,int4",
    "--sparsities=0.5",
    "--seeds=0",
    f"--workdir={tmp_path / 'runs'}",
    f"--out={out}",
    "--config.eval_batch_size=500",
  ]
  assert experiment.main(argv) == 0
  rows = json.loads(out.read_text())["rows"]
  assert [r["precision"] for r in rows] == ["float", "int4"]
  for r in rows:
    assert r["ptq_int8_pruned_nonzero_codes"] == 0 and r["ptq_int4_pruned_nonzero_codes"] == 0
    assert abs(r["measured_sparsity"] - 0.5) < 0.01
  # QAT int4 evaluates with the PTQ int4 grid: the same accuracy.
  assert rows[1]["test_accuracy"] == pytest.approx(rows[1]["ptq_int4_accuracy"], abs=2e-3)
  assert experiment.main(argv) == 2  # a finished results file is not overwritten
