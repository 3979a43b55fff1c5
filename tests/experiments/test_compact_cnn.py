"""The channel-pruning + compaction example, run in-process on a small budget."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxprune
from experiments import compact_cnn


def test_compacted_cnn_matches_masked_cnn_and_is_smaller(tmp_path, capsys):
  result = compact_cnn.main(
    [
      "--steps",
      "20",
      "--sparsity",
      "0.5",
      "--dataset",
      "digits",
      "--batch-size",
      "64",
      "--eval-examples",
      "200",
      "--rounds",
      "1",
      "--workdir",
      str(tmp_path),
    ]
  )
  stdout = capsys.readouterr().out
  assert json.loads(stdout.strip().splitlines()[-1]) == json.loads(json.dumps(result))

  # Same function: logits within float32 noise, same predictions and accuracy.
  assert result["max_abs_diff_check_batch"] <= 1e-4
  assert result["max_abs_diff_eval"] <= 1e-4
  assert result["prediction_disagreements"] == 0
  assert result["accuracy_compact"] == result["accuracy_masked"]
  assert result["eval_examples"] == 200

  # Every pruned layer keeps G - floor(0.5 G) units; the output layer stays whole;
  # nothing was kept back (the tied BatchNorm makes pruned channels exactly 0).
  assert result["widths_before"] == [32, 64, 128, 10]
  assert result["widths_after"] == [16, 32, 64, 10]
  assert result["notes"] == {}
  # The masked model keeps exactly the weights the compacted one holds (tie_units
  # masks the rows that read a removed unit too).
  assert result["params_compact"] == result["params_masked_kept"] < result["params_dense"]
  assert result["flops_compact"] < result["flops_masked"]
  ckpt = result["checkpoint_bytes"]
  assert ckpt["compact_int8"] < ckpt["compact"] < ckpt["masked"] < ckpt["dense"]
  assert (tmp_path / "compact.jxp").stat().st_size == ckpt["compact"]

  # The training ran through the harness: its result and metrics are in <workdir>/train.
  trained = json.loads((tmp_path / "train" / "result.json").read_text())
  assert trained["algorithm"] == "gradual_magnitude" and trained["steps"] == 20
  assert trained["dataset"] == result["dataset"] == "digits"
  assert (tmp_path / "train" / "metrics.jsonl").read_text().count("\n") >= 5


def test_gradual_channel_pruning_never_revives_a_pruned_channel():
  # Masked entries score -inf; a unit holding them must rank lowest, not highest.
  params = {
    "Dense_0": {"kernel": jax.random.normal(jax.random.key(0), (16, 8)), "bias": jnp.zeros(8)},
    "Dense_1": {"kernel": jax.random.normal(jax.random.key(1), (8, 4)), "bias": jnp.zeros(4)},
  }
  algo = jaxprune.create(
    "gradual_magnitude",
    sparsity=0.75,
    sparsity_type="neuron",
    include="Dense_0/kernel",
    end_step=4,
    update_every=1,
  )
  tx = jaxprune.sparsify(optax.sgd(0.01), algo)
  state = tx.init(params)
  update = jax.jit(tx.update)
  alive = np.ones(8, bool)
  for _ in range(6):
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    now = np.asarray(jaxprune.get_masks(state)["Dense_0"]["kernel"]).any(axis=0)
    assert not np.any(now & ~alive), "a pruned unit came back"
    alive = now
  assert alive.sum() == 2


def test_in_memory_source_keeps_the_dataset_actually_read():
  # Fashion-MNIST's spec with the digits fallback's records: results must say "digits".
  fallback = compact_cnn.data.load("digits", "test")
  source = compact_cnn.data.Source(
    fallback.records, compact_cnn.data.get_spec("fashion_mnist"), "test", "fallback", "digits"
  )
  copy = compact_cnn.in_memory(source, limit=10)
  assert copy.dataset == "digits" and len(copy) == 10
