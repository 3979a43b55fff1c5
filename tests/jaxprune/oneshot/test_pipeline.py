"""Calibration capture, the layer-sequential driver and layer removal on tiny models."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune
from experiments.llm import model as llm
from jaxprune import oneshot

TINY = llm.Config(
  vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=48, rope_base=1e4
)


@pytest.fixture(scope="module")
def tiny():
  params = llm.init(TINY, jax.random.key(0))
  calib = [jax.random.randint(jax.random.key(i), (2, 16), 0, TINY.vocab_size) for i in range(2)]
  return params, calib


class Heads(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.DenseGeneral((2, 4), name="qkv")(x)  # kernel (8, 2, 4)
    y = nn.Einsum((2, 4, 8), "bthd,hdo->bto", name="out")(h)  # kernel (2, 4, 8)
    return nn.Dense(8, name="dense")(y)


def test_linen_stats_capture_dense_general_and_einsum():
  x = jax.random.normal(jax.random.key(1), (3, 5, 8))
  mod = Heads()
  params = mod.init(jax.random.key(0), x)["params"]
  fn = oneshot.linen_stats_fn(lambda p, x: mod.apply({"params": p}, x))
  out, stats = jax.jit(fn)(params, x)
  np.testing.assert_allclose(out, mod.apply({"params": params}, x), rtol=1e-6)
  assert set(stats) == {"qkv/kernel", "out/kernel", "dense/kernel"}
  x2 = np.asarray(x).reshape(-1, 8)
  np.testing.assert_allclose(stats["qkv/kernel"].xtx, x2.T @ x2, rtol=1e-4, atol=1e-4)
  assert stats["out/kernel"].in_axes == (0, 1) and stats["out/kernel"].xtx.shape == (8, 8)
  assert int(stats["dense/kernel"].n) == 15
  # The 2-D view of an attention kernel reproduces the layer: x2d @ W2d == output.
  h = nn.DenseGeneral((2, 4)).apply({"params": params["qkv"]}, x)
  w2 = oneshot.kernel_as_matrix(params["out"]["kernel"], (0, 1))
  np.testing.assert_allclose(
    np.asarray(h).reshape(-1, 8) @ np.asarray(w2),
    np.einsum("bthd,hdo->bto", h, params["out"]["kernel"]).reshape(-1, 8),
    rtol=1e-4,
    atol=1e-5,
  )
  new, masks, _ = oneshot.prune_params(params, stats, "wanda", sparsity_type="2:4")
  assert masks["out"]["kernel"].shape == (2, 4, 8)
  m2 = oneshot.kernel_as_matrix(masks["out"]["kernel"], (0, 1))
  assert jaxprune.structured.is_nm_sparse(np.asarray(m2), 2, 4)
  assert np.ndim(masks["dense"]["bias"]) == 0


def test_nnx_collect_restores_the_model():
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.a = nnx.Linear(6, 5, rngs=rngs)
      self.b = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x):
      return self.b(jax.nn.relu(self.a(x)))

  net = Net(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (7, 6))
  with oneshot.nnx_collect(net) as stats:
    y = net(x)
  assert type(net.a) is nnx.Linear and type(net.b) is nnx.Linear
  np.testing.assert_allclose(y, net(x))
  assert set(stats) == {"a/kernel", "b/kernel"}
  np.testing.assert_allclose(stats["a/kernel"].sq, np.sum(np.asarray(x) ** 2, 0), rtol=1e-5)
  h = jax.nn.relu(net.a(x))
  np.testing.assert_allclose(stats["b/kernel"].xtx, h.T @ h, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["sparsegpt", pytest.param("wanda", marks=pytest.mark.slow)])
def test_sequential_pipeline_on_tiny_llama(tiny, method):
  from experiments import prune_llm
  from experiments.llm import data

  params, calib = tiny
  segs = np.asarray(jnp.concatenate(calib))  # (4, 16) token segments
  new, masks = prune_llm.prune(TINY, params, segs, method, 0.5, log=lambda s: None)
  jaxprune.check_masks(new, masks)
  for k in llm.block_names(new):
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
      m = np.asarray(masks[k]["self_attn"][name]["kernel"])
      if method == "wanda":
        np.testing.assert_array_equal(m.sum(0), m.shape[0] // 2)  # exact per output
      assert m.mean() == 0.5  # 32 inputs: one SparseGPT block, exact count
  assert np.ndim(masks["embed_tokens"]["embedding"]) == 0
  assert prune_llm.sparsity_of(new, masks) == pytest.approx(0.5)
  # Continue into sparse fine-tuning with the library's fixed masks: stays exactly sparse.
  tx = jaxprune.sparsify(optax.adam(1e-2), jaxprune.create("fixed", masks=masks))
  state = tx.init(new)
  tokens = calib[0]
  loss = lambda p: jnp.mean(data.nll(llm.LLaMA(TINY).apply({"params": p}, tokens), tokens))
  upd, state = tx.update(jax.grad(loss)(new), state, new)
  tuned = optax.apply_updates(new, upd)
  for p, m in zip(jax.tree.leaves(tuned), jax.tree.leaves(masks)):
    if np.ndim(m):
      assert np.all(np.asarray(p)[~np.asarray(m)] == 0)
  assert float(loss(tuned)) < float(loss(new))


def test_single_pass_equals_sequential_on_first_block(tiny):
  params, calib = tiny
  apply = lambda p, t: llm.LLaMA(TINY).apply({"params": p}, t)
  incl = lambda path: path.startswith("layers_")
  one, m1 = oneshot.prune_single_pass(apply, params, calib, "sparsegpt", 0.5, include=incl)
  xs = [llm.embed(TINY, params, c) for c in calib]
  seq, m2, _ = oneshot.prune_sequential(
    llm.block_apply(TINY), [params["layers_0"]], xs, "sparsegpt", 0.5
  )
  # The first block sees the same (dense) inputs in both modes.
  for a, b in zip(jax.tree.leaves(one["layers_0"]), jax.tree.leaves(seq[0])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert np.asarray(m1["layers_1"]["mlp"]["up_proj"]["kernel"]).mean() == 0.5


def test_layer_removal(tiny):
  params, calib = tiny
  names = llm.block_names(params)
  xs = [llm.embed(TINY, params, c) for c in calib]
  scores = oneshot.block_influence(llm.block_apply(TINY), [params[k] for k in names], xs)
  assert scores.shape == (3,) and np.all(scores >= 0) and np.all(scores <= 2)
  # By hand: each block's influence, 1 - the mean cosine over every token of every batch
  # between its input and output (the next block's inputs are this block's outputs).
  block = llm.block_apply(TINY)
  h = xs
  for i, k in enumerate(names):
    out = [block(params[k], x) for x in h]
    a = np.concatenate([np.asarray(x, np.float64).reshape(-1, 32) for x in h])
    b = np.concatenate([np.asarray(y, np.float64).reshape(-1, 32) for y in out])
    cos = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert abs(scores[i] - (1 - cos.mean())) < 1e-5, (i, scores[i], 1 - cos.mean())
    h = out
  drop = oneshot.choose_blocks(3, 1, "influence", scores)
  assert drop == [int(np.argmin(scores))]
  assert oneshot.choose_blocks(3, 2, "last") == [1, 2]
  r = oneshot.choose_blocks(30, 3, "random", seed=1)
  assert len(set(r)) == 3 and r == oneshot.choose_blocks(30, 3, "random", seed=1)
  short = oneshot.remove_blocks(params, [1])
  assert llm.block_names(short) == ["layers_0", "layers_1"]
  assert short["layers_1"] is params["layers_2"]
  cfg = TINY._replace(n_layers=2)
  out = llm.LLaMA(cfg).apply({"params": short}, calib[0])
  assert out.shape == (2, 16, TINY.vocab_size)
  with pytest.raises(ValueError, match="layers_7"):
    oneshot.remove_blocks(params, [7])


@pytest.mark.parametrize("sparsity_type", [pytest.param(None, marks=pytest.mark.slow), "2:4"])
def test_save_and_reload_give_the_same_model(tiny, tmp_path, sparsity_type):
  from experiments import prune_llm

  params, calib = tiny
  segs = np.asarray(jnp.concatenate(calib))
  sp = None if sparsity_type else 0.5
  new, masks = prune_llm.prune(
    TINY, params, segs, "magnitude", sp, sparsity_type, log=lambda s: None
  )
  short = oneshot.remove_blocks(new, [0])
  short_masks = oneshot.remove_blocks(masks, [0])
  cfg = TINY._replace(n_layers=2)
  prune_llm.save(str(tmp_path), cfg, short, short_masks, sparsity_type, [0])
  cfg2, back = prune_llm.load_pruned(str(tmp_path))
  assert cfg2 == cfg
  assert jax.tree.structure(back) == jax.tree.structure(short)
  for a, b in zip(jax.tree.leaves(short), jax.tree.leaves(back)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  if sparsity_type:
    assert (tmp_path / "nm.jxp").exists()
