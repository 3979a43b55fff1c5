"""Tests of experiments/checkpoint.py: config fingerprints, rules, round trips.

Corrupt checkpoints met by a training run are tested in test_train.py."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune
from experiments import checkpoint, configs


def config_with(**changes):
  config = configs.get_config("fmnist_mlp")
  for key, value in changes.items():
    config[key] = value
  return config


def meta_of(config, step=100):
  return {"format": checkpoint.FORMAT, "step": step, "config": checkpoint.config_dict(config)}


# ---------------------------------------------------------------- fingerprints


def test_fingerprint_resolves_derived_keys_and_drops_operational_ones():
  config = config_with(workdir="/a", log_every=7, steps=2000)
  fp = checkpoint.fingerprint(config)
  assert fp["end_step"] == 1200 and fp["start_step"] == 200  # Follow steps.
  assert not set(fp) & checkpoint.OPERATIONAL_KEYS
  assert fp["model_kwargs"] == {"features": [300, 100]}
  assert checkpoint.fingerprint(config_with(workdir="/b", eval_every=1, steps=2000)) == fp


def test_differences_name_nested_keys_and_treat_missing_as_none():
  a = {"sparsity": 0.9, "model_kwargs": {"features": [300, 100]}, "old": None}
  b = {"sparsity": 0.8, "model_kwargs": {"features": [300]}, "new": None}
  assert checkpoint.differences(a, b) == [
    ("model_kwargs.features", [300, 100], [300]),
    ("sparsity", 0.9, 0.8),
  ]
  assert checkpoint.differences(a, a) == []


def test_check_resumable_rules():
  base = config_with(steps=1000, start_step=100, end_step=600)
  checkpoint.check_resumable(meta_of(base), base, 100, "ckpt")
  # Operational keys may change.
  checkpoint.check_resumable(
    meta_of(base),
    config_with(
      steps=1000, start_step=100, end_step=600, workdir="/x", log_every=1, model_parallel=True
    ),
    100,
    "ckpt",
  )
  # More steps with a constant lr and pinned schedule keys: allowed.
  checkpoint.check_resumable(
    meta_of(base), config_with(steps=3000, start_step=100, end_step=600), 100, "ckpt"
  )
  # Derived keys that follow steps: refused, naming them.
  with pytest.raises(checkpoint.ConfigMismatchError, match="end_step.*start_step"):
    checkpoint.check_resumable(
      meta_of(config_with(steps=1000)), config_with(steps=3000), 100, "ckpt"
    )
  # A schedule that depends on steps: refused, naming steps.
  cosine = config_with(steps=1000, start_step=100, end_step=600, lr_schedule="cosine")
  with pytest.raises(checkpoint.ConfigMismatchError, match="steps: checkpoint 1000 != now 3000"):
    checkpoint.check_resumable(
      meta_of(cosine),
      config_with(steps=3000, start_step=100, end_step=600, lr_schedule="cosine"),
      100,
      "ckpt",
    )
  with pytest.raises(checkpoint.ConfigMismatchError, match="algorithm: checkpoint"):
    checkpoint.check_resumable(
      meta_of(base),
      config_with(steps=1000, start_step=100, end_step=600, algorithm="rigl"),
      100,
      "ckpt",
    )
  with pytest.raises(checkpoint.ConfigMismatchError, match="beyond steps=50"):
    checkpoint.check_resumable(
      meta_of(base), config_with(steps=50, start_step=100, end_step=600), 100, "ckpt"
    )
  with pytest.raises(checkpoint.CheckpointError, match="format"):
    checkpoint.check_resumable({**meta_of(base), "format": 99}, base, 100, "ckpt")


# ---------------------------------------------------------------- round trips


def small_state():
  params = {"Dense_0": {"kernel": jnp.arange(12.0).reshape(3, 4), "bias": jnp.ones(4)}}
  tx = jaxprune.sparsify(optax.adam(1e-3), jaxprune.create("rigl", sparsity=0.5, end_step=10))
  return {
    "params": params,
    "opt_state": tx.init(params),
    "step": jnp.int32(7),
    "rng": jax.random.PRNGKey(3),
  }


def test_save_restore_round_trip_keeps_structure_and_values(tmp_path):
  state = small_state()
  config = config_with(workdir=str(tmp_path))
  ckpts = checkpoint.Checkpointer(str(tmp_path))
  assert ckpts.latest_step() is None
  assert ckpts.restore_latest(state, config) is None
  assert ckpts.save(7, state, config)
  assert not ckpts.save(7, state, config)  # Never overwritten.
  target = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
  )
  restored, step = ckpts.restore_latest(target, config)
  assert step == 7
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  assert isinstance(restored["opt_state"], jaxprune.SparseState)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
    assert a.dtype == b.dtype
  assert ckpts.read_meta(7)["config"]["algorithm"] == "gradual_magnitude"
  ckpts.close()


def test_only_the_newest_checkpoints_are_kept(tmp_path):
  state, config = small_state(), config_with()
  ckpts = checkpoint.Checkpointer(str(tmp_path), max_to_keep=2)
  for step in (1, 2, 3):
    ckpts.save(step, state, config)
  assert ckpts.all_steps() == [2, 3]
  ckpts.close()


def test_unreadable_checkpoint_raises_and_leaves_every_file(tmp_path):
  import os

  state, config = small_state(), config_with()
  ckpts = checkpoint.Checkpointer(str(tmp_path))
  ckpts.save(1, state, config)
  ckpts.save(2, state, config)
  latest = ckpts.path(2)
  with open(os.path.join(latest, "meta", "metadata"), "w") as f:
    f.write("{ not json")
  files = {
    os.path.join(r, n): open(os.path.join(r, n), "rb").read()
    for r, _, ns in os.walk(str(tmp_path))
    for n in ns
  }
  target = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
  )
  with pytest.raises(checkpoint.CheckpointError, match=r"checkpoints/2 is corrupt.*steps \[1\]"):
    ckpts.restore_latest(target, config)
  assert {
    os.path.join(r, n): open(os.path.join(r, n), "rb").read()
    for r, _, ns in os.walk(str(tmp_path))
    for n in ns
  } == files
  assert ckpts.all_steps() == [1, 2]
  restored = ckpts.restore(1, target)
  np.testing.assert_array_equal(
    restored["params"]["Dense_0"]["kernel"], state["params"]["Dense_0"]["kernel"]
  )
  ckpts.close()
