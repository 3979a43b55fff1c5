"""experiments.train on 4 simulated CPU devices (a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=4) against one device."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from test_train import REPO, TINY, compile_cache, run_quiet, subprocess_env, tiny_config  # noqa: F401 (fixture)

import jaxprune
from experiments import train

DEVICES = 4
CNN_KWARGS = {"channels": (4,), "hidden": 16}
CNN = ["--config.model=cnn", "--config.algorithm=static"]  # model_kwargs: CNN_KWARGS.

# Runs in the 4-device subprocess: trains, checks placements, saves arrays.
SCRIPT = r"""
import json, sys
import jax, numpy as np
import jaxprune
from experiments import train
out_dir, runs, CNN_KWARGS = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
report = {"devices": jax.device_count()}
for name, argv in runs.items():
    config = train.parse_config(["train", *argv])
    if name == "cnn":
        config.unlock()
        config.model_kwargs = CNN_KWARGS
    state, result = train.train(config, out=open(f"{out_dir}/{name}.log", "w"))
    masks = jaxprune.get_masks(state.opt_state)
    placements = {}
    flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
    for (path, p), m in zip(flat, jax.tree.leaves(masks)):
        key = jax.tree_util.keystr(path)
        placements[key] = {
            "param": str(p.sharding.spec), "mask": str(getattr(m.sharding, "spec", None)),
            "full_mask": m.ndim > 0,
            "same": m.ndim == 0 or m.sharding.is_equivalent_to(p.sharding, p.ndim),
            "mesh": dict(p.sharding.mesh.shape)}
    arrays = {"p" + k: np.asarray(v) for k, v in zip(placements, jax.tree.leaves(state.params))}
    arrays.update({"m" + k: np.asarray(v) for k, v in zip(placements, jax.tree.leaves(masks))})
    arrays.update({"b" + str(i): np.asarray(v) for i, v in enumerate(jax.tree.leaves(state.batch_stats))})
    np.savez(f"{out_dir}/{name}.npz", **arrays)
    report[name] = {"placements": placements, "result": result}
print(json.dumps(report))
"""


def run_on_devices(runs, out_dir, devices=DEVICES):
  flags = os.environ.get("XLA_FLAGS", "")
  env = subprocess_env(XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}")
  proc = subprocess.run(
    [sys.executable, "-c", SCRIPT, str(out_dir), json.dumps(runs), json.dumps(CNN_KWARGS)],
    capture_output=True,
    text=True,
    cwd=REPO,
    env=env,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def flat_arrays(state):
  masks = jaxprune.get_masks(state.opt_state)
  flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
  keys = [jax.tree_util.keystr(p) for p, _ in flat]
  out = {"p" + k: np.asarray(v) for k, (_, v) in zip(keys, flat)}
  out.update({"m" + k: np.asarray(v) for k, v in zip(keys, jax.tree.leaves(masks))})
  out.update(
    {"b" + str(i): np.asarray(v) for i, v in enumerate(jax.tree.leaves(state.batch_stats))}
  )
  return out


def assert_close_runs(single, multi):
  assert set(single) == set(multi)
  for key in sorted(single):
    a, b = single[key], multi[key]
    if key.startswith("m"):
      # Masks: equal except, at most, a few near-ties in RigL's growth.
      assert np.mean(a == b) >= 0.999, key
    else:
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-4, err_msg=key)


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
  out = tmp_path_factory.mktemp("multi")
  runs = {
    # RigL, 2 (data) x 2 (model) mesh: large kernels and masks split.
    "model": [
      *TINY,
      "--config.steps=40",
      "--config.model_parallel=True",
      f"--config.workdir={out / 'model'}",
    ],
    # BatchNorm CNN, 4 (data) x 1 mesh: pure data parallel.
    "cnn": [*TINY, *CNN, "--config.steps=20", f"--config.workdir={out / 'cnn'}"],
  }
  report = run_on_devices(runs, out)
  return out, report


def test_runs_on_all_devices_with_masks_placed_like_params(four_devices):
  _, report = four_devices
  assert report["devices"] == DEVICES
  for name in ("model", "cnn"):
    assert report[name]["result"]["devices"] == DEVICES
    placements = report[name]["placements"]
    assert any(p["full_mask"] for p in placements.values())
    for key, p in placements.items():
      assert p["same"], (name, key, p)
  cnn, model = report["cnn"]["placements"], report["model"]["placements"]
  dense = cnn["['Dense_0']['kernel']"]
  assert dense["mesh"] == {"data": 4, "model": 1}
  assert dense["param"] == dense["mask"] == str(P())
  # model_parallel: a 2 x 2 mesh; the large kernel is split along "model",
  # its mask exactly alike; the small one stays replicated.
  big, small = model["['Dense_0']['kernel']"], model["['Dense_1']['kernel']"]
  assert big["mesh"] == {"data": 2, "model": 2}
  assert big["param"] == big["mask"] == str(P(None, "model"))
  assert small["param"] == small["mask"] == str(P())


def test_multi_device_rigl_matches_one_device(four_devices, tmp_path):
  out, report = four_devices
  state, result, _ = run_quiet(tiny_config(str(tmp_path), "--config.steps=40"))
  assert_close_runs(flat_arrays(state), dict(np.load(out / "model.npz")))
  multi = report["model"]["result"]
  assert abs(multi["test_accuracy"] - result["test_accuracy"]) <= 0.02
  assert multi["sparsity"] == pytest.approx(result["sparsity"], abs=1e-9)


def test_batchnorm_statistics_match_one_device(four_devices, tmp_path):
  """The global batch is split over 4 devices, yet BatchNorm's batch
  statistics (and so its running averages) are those of the whole batch."""
  out, report = four_devices
  config = tiny_config(str(tmp_path), *CNN, "--config.steps=20")
  config.unlock()
  config.model_kwargs = CNN_KWARGS
  state, result, _ = run_quiet(config)
  single = flat_arrays(state)
  assert any(k.startswith("b") for k in single)
  assert_close_runs(single, dict(np.load(out / "cnn.npz")))


def test_batch_size_not_divisible_by_devices_is_a_clear_error(tmp_path):
  flags = os.environ.get("XLA_FLAGS", "")
  env = subprocess_env(XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={DEVICES}")
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.train",
      *TINY,
      "--config.batch_size=30",
      f"--config.workdir={tmp_path}",
    ],
    capture_output=True,
    text=True,
    cwd=REPO,
    env=env,
    timeout=300,
  )
  assert proc.returncode == 2
  assert "batch_size=30 is not divisible by the number of devices" in proc.stderr
  assert "(4; 4 devices)" in proc.stderr
  assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


# Dispatches many steps of a 2-device program with an all-reduce, as fast as the
# host can, through `train.InFlight(limit)` (limit 0: no bound at all).
DISPATCH = r"""
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from experiments import train

limit, steps = int(sys.argv[1]), int(sys.argv[2])
mesh = Mesh(np.array(jax.devices()), ("data",))
w = jax.device_put(jnp.ones((512, 512)), NamedSharding(mesh, P()))
x = jax.device_put(np.random.rand(256, 512).astype(np.float32), NamedSharding(mesh, P("data")))

@jax.jit
def step(w, x):
  g = jnp.mean(jnp.tanh(x @ w), axis=0)  # Mean over the split batch: an all-reduce.
  return w - 1e-3 * g[None, :], jnp.sum(g)

in_flight = train.InFlight(limit) if limit else None
for _ in range(steps):
  w, metric = step(w, x)
  if in_flight is not None:
    in_flight.add(metric)
jax.block_until_ready(w)
print("done", flush=True)
"""


def run_dispatch(limit, steps=300, timeout_s=10):
  """The DISPATCH script on 2 CPU devices; XLA aborts a stuck collective after
  `timeout_s` seconds. Returns the finished process."""
  flags = os.environ.get("XLA_FLAGS", "")
  env = subprocess_env(
    XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count=2 "
    f"--xla_cpu_collective_timeout_seconds={timeout_s} "
    f"--xla_cpu_collective_call_terminate_timeout_seconds={timeout_s}"
  )
  return subprocess.run(
    [sys.executable, "-c", DISPATCH, str(limit), str(steps)],
    capture_output=True,
    text=True,
    cwd=REPO,
    env=env,
    timeout=300,
  )


def test_bounded_dispatch_never_deadlocks_a_collective():
  """Issue 8, defect 9: the training loop's bound on steps in flight keeps
  XLA:CPU's launch pacing from taking the thread an all-reduce needs."""
  # A deadlock is permanent, so a generous abort time still catches it while a
  # loaded machine (other test workers) cannot starve a healthy all-reduce past it.
  proc = run_dispatch(train.MAX_IN_FLIGHT, timeout_s=60)
  assert proc.returncode == 0 and "done" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.slow
def test_unbounded_dispatch_deadlocks_a_collective():
  """The control: without the bound, the same loop hangs in an all-reduce on 2
  CPU devices until XLA aborts it (SIGABRT)."""
  proc = run_dispatch(0)
  assert proc.returncode == -signal.SIGABRT, (proc.returncode, proc.stderr[-2000:])
  assert "Expected 2 threads to join the rendezvous" in proc.stderr
