"""Multi-process training: two local processes with one CPU device each (gloo
collectives) against one process with two simulated devices, same global batch."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from test_train import REPO, TINY, subprocess_env

from experiments import checkpoint, train

STEPS = 300
ARGS = [
  *TINY,
  f"--config.steps={STEPS}",
  "--config.eval_every=100",
  "--config.checkpoint_every=100",
]


# Restores step argv[4] of workdirs argv[2] and argv[3] as the run of config
# argv[1] would, and prints the largest difference of every state leaf.
COMPARE = r"""
import json, sys
import jax, numpy as np
from experiments import checkpoint, train

config = train.parse_config(["train", *json.loads(sys.argv[1]), f"--config.workdir={sys.argv[2]}"])
setup = train.build(config)
target = checkpoint.abstract_state(setup.shapes, setup.shardings)
states = []
for workdir in sys.argv[2:4]:
  saved = checkpoint.Checkpointer(workdir)
  states.append(jax.tree.leaves(saved.restore(int(sys.argv[4]), target)))
  saved.close()
print(json.dumps([
  float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)), initial=0.0))
  for a, b in zip(*states)
]))
"""


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch(workdir, *, processes=1, devices=1, port=None, log_prefix="run"):
  """Starts `processes` training processes on `workdir`; returns their Popens."""
  flags = os.environ.get("XLA_FLAGS", "")
  env = subprocess_env(XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}")
  procs = []
  for i in range(processes):
    argv = [sys.executable, "-m", "experiments.train", *ARGS, f"--config.workdir={workdir}"]
    if processes > 1:
      argv += [
        f"--config.coordinator_address=localhost:{port}",
        f"--config.num_processes={processes}",
        f"--config.process_id={i}",
      ]
    log = open(f"{workdir}.{log_prefix}{i}.log", "w")
    procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env))
  return procs


def wait_all(procs, timeout=900):
  deadline = time.time() + timeout
  codes = []
  for p in procs:
    try:
      codes.append(p.wait(timeout=max(deadline - time.time(), 1)))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  return codes


def last_json(path):
  with open(path) as f:
    return json.loads(f.read().strip().splitlines()[-1])


def test_distributed_keys_are_checked_and_passed_through():
  def kwargs(*overrides):
    return train.distributed_kwargs(train.parse_config(["train", *TINY, *overrides]))

  assert kwargs() is None
  assert kwargs("--config.distributed=True") == {}  # Auto-detected cluster.
  assert kwargs(
    "--config.coordinator_address=10.0.0.1:1234",
    "--config.num_processes=2",
    "--config.process_id=1",
  ) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}
  with pytest.raises(train.ConfigError, match="config.process_id must be set together"):
    kwargs("--config.coordinator_address=h:1", "--config.num_processes=2")
  with pytest.raises(train.ConfigError, match="config.coordinator_address must be HOST:PORT"):
    kwargs("--config.coordinator_address=h", "--config.num_processes=2", "--config.process_id=0")
  with pytest.raises(train.ConfigError, match=r"config.process_id must be in \[0, num_processes"):
    kwargs("--config.coordinator_address=h:1", "--config.num_processes=2", "--config.process_id=2")
  # Where the processes meet is not part of what a checkpoint's run computes.
  assert {"coordinator_address", "num_processes", "process_id"} <= checkpoint.OPERATIONAL_KEYS


@pytest.mark.slow
def test_two_processes_match_two_devices_and_resume(tmp_path):
  """Two processes x one CPU device == one process x two devices (same global
  batch); stopped by SIGTERM, the same two commands resume from the checkpoint."""
  reference, multi = str(tmp_path / "one_process"), str(tmp_path / "two_processes")
  ref_procs = launch(reference, devices=2)
  assert wait_all(ref_procs) == [0], open(f"{reference}.run0.log").read()[-3000:]

  port = free_port()
  procs = launch(multi, processes=2, port=port, log_prefix="first")
  metrics = os.path.join(multi, train.METRICS_FILE)
  while all(p.poll() is None for p in procs):  # Stop both once training runs.
    if os.path.exists(metrics) and os.path.getsize(metrics) > 0:
      for p in procs:
        p.send_signal(signal.SIGTERM)
      break
    time.sleep(0.02)
  codes = wait_all(procs)
  assert codes == [128 + signal.SIGTERM] * 2, open(f"{multi}.first0.log").read()[-3000:]
  stopped = checkpoint.Checkpointer(multi)
  stopped_at = stopped.latest_step()
  stopped.close()
  assert 0 < stopped_at < STEPS

  # Each process wrote its own part of the checkpoint (orbax's OCDBT layout).
  state_dir = os.path.join(multi, checkpoint.SUBDIR, str(stopped_at), "state")
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(state_dir))

  procs = launch(multi, processes=2, port=free_port(), log_prefix="again")
  assert wait_all(procs) == [0, 0], open(f"{multi}.again0.log").read()[-3000:]
  results = [last_json(f"{multi}.again{i}.log") for i in range(2)]
  expected = last_json(f"{reference}.run0.log")
  assert results[0] == results[1] | {"wall_s": results[0]["wall_s"]}
  assert (results[0]["processes"], results[0]["devices"]) == (2, 2)
  assert (expected["processes"], expected["devices"]) == (1, 2)
  assert results[0]["resumed_from"] == stopped_at
  for key in ("test_accuracy", "sparsity", "layer_sparsity", "dataset"):
    assert results[0][key] == expected[key], key
  assert results[0]["test_loss"] == pytest.approx(expected["test_loss"], rel=1e-5)
  with open(os.path.join(multi, train.RESULT_FILE)) as f:
    assert json.load(f)["test_accuracy"] == expected["test_accuracy"]
  # Same final train state (params, masks, optimizer state), restored on two
  # devices in one process, as a resumed run would.
  flags = os.environ.get("XLA_FLAGS", "")
  proc = subprocess.run(
    [sys.executable, "-c", COMPARE, json.dumps(ARGS), reference, multi, str(STEPS)],
    capture_output=True,
    text=True,
    cwd=REPO,
    env=subprocess_env(XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count=2"),
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  differences = json.loads(proc.stdout.strip().splitlines()[-1])
  assert len(differences) > 10 and max(differences) <= 1e-6, differences
  # Only the files a run writes (process 0's), nothing per host besides orbax's.
  assert sorted(os.listdir(multi)) == sorted(
    [checkpoint.SUBDIR, train.CONFIG_FILE, train.METRICS_FILE, train.RESULT_FILE]
  )
