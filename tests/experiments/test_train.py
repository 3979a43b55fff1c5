"""End-to-end tests of experiments/train.py on the offline digits (small and fast).

Every run here uses one tiny config (`TINY`), so with the persistent compilation
cache of `compile_cache` each program is compiled once per session.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import jaxprune
from experiments import checkpoint, train

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CONFIG = os.path.join(REPO, "experiments", "configs", "fmnist_mlp.py")
# A 784-32-10 MLP on the digits with RigL: mask updates at steps 10 and 20.
TINY = [
  f"--config={CONFIG}",
  "--config.dataset=digits",
  "--config.model_kwargs.features=(32,)",
  "--config.batch_size=32",
  "--config.eval_batch_size=100",
  "--config.algorithm=rigl",
  "--config.sparsity=0.8",
  "--config.start_step=0",
  "--config.end_step=30",
  "--config.update_every=10",
  "--config.log_every=5",
  "--config.eval_every=20",
  "--config.checkpoint_every=20",
]


# ------------------------------------------------------------------- helpers


@contextlib.contextmanager
def persistent_compile_cache(path):
  """Points JAX's persistent compilation cache (in-process and for
  subprocesses) at `path`, restoring the previous setting afterwards."""
  from jax.experimental.compilation_cache import compilation_cache

  settings = {
    "jax_compilation_cache_dir": str(path),
    "jax_persistent_cache_min_compile_time_secs": 0.0,
  }
  env = {"JAX_COMPILATION_CACHE_DIR": str(path), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  old = {k: getattr(jax.config, k) for k in settings}
  old_env = {k: os.environ.get(k) for k in env}
  for k, v in settings.items():
    jax.config.update(k, v)
  os.environ.update(env)
  compilation_cache.reset_cache()
  try:
    yield str(path)
  finally:
    for k, v in old.items():
      jax.config.update(k, v)
    for k, v in old_env.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    compilation_cache.reset_cache()


def session_cache_dir(tmp_path_factory):
  return tmp_path_factory.getbasetemp() / "jax_compile_cache"


def tiny_config(workdir, *overrides):
  return train.parse_config(["train", *TINY, f"--config.workdir={workdir}", *overrides])


def run_quiet(config):
  """`train.train(config)` with its printed output captured: (state, result, text)."""
  import io

  out = io.StringIO()
  state, result = train.train(config, out=out)
  return state, result, out.getvalue()


def read_metrics(workdir):
  with open(os.path.join(workdir, train.METRICS_FILE)) as f:
    return [json.loads(line) for line in f]


def load_checkpoint(workdir, step=None):
  """The raw (dict) state of a checkpoint, as numpy arrays."""
  import orbax.checkpoint as ocp

  manager = ocp.CheckpointManager(os.path.join(workdir, checkpoint.SUBDIR))
  step = manager.latest_step() if step is None else step
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  manager.close()
  return step, state


def tree_files(root):
  """{relative path: bytes} of every file under `root`."""
  out = {}
  for folder, _, files in os.walk(root):
    for name in files:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


def subprocess_env(**extra):
  env = dict(os.environ)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env.update(extra)
  return env


# ------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
  with persistent_compile_cache(session_cache_dir(tmp_path_factory)) as path:
    yield path


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  """One 40-step RigL run: (workdir, final state, result, printed text)."""
  workdir = str(tmp_path_factory.mktemp("smoke"))
  state, result, text = run_quiet(tiny_config(workdir, "--config.steps=40"))
  return workdir, state, result, text


# ---------------------------------------------------------------------- tests


def test_smoke_run_prints_table_then_json(smoke):
  workdir, state, result, text = smoke
  lines = text.strip().splitlines()
  printed = json.loads(lines[-1])
  assert printed == json.loads(json.dumps(result))
  for key in ("test_accuracy", "sparsity", "steps", "devices", "wall_s", "algorithm", "seed"):
    assert key in printed
  assert printed["algorithm"] == "rigl" and printed["seed"] == 0 and printed["steps"] == 40
  assert printed["dataset"] == "digits"
  with open(os.path.join(workdir, train.RESULT_FILE)) as f:
    assert json.load(f)["dataset"] == "digits"
  assert printed["devices"] == jax.device_count()
  assert printed["test_accuracy"] > 0.3  # Ten classes: chance is 0.1.
  # Kernels keep exactly n - floor(0.8 n) entries each.
  kernels = [784 * 32, 32 * 10]
  kept = sum(n - int(np.floor(0.8 * n)) for n in kernels)
  assert printed["sparsity"] == pytest.approx(1 - kept / sum(kernels), abs=1e-9)
  assert any("Dense_0/kernel" in line for line in lines[:-1])
  assert os.path.exists(os.path.join(workdir, train.RESULT_FILE))


def test_result_carries_inference_and_training_flops(smoke):
  workdir, state, result, _ = smoke
  masks = jax.device_get(jaxprune.get_masks(state.opt_state))
  f_d = 2 * (784 * 32 + 32 * 10)  # One example through the 784-32-10 MLP.
  f_s = 2 * sum(int(np.sum(m)) for m in jax.tree.leaves(masks) if np.ndim(m) == 2)
  assert result["inference_flops_dense"] == f_d
  assert result["inference_flops_sparse"] == pytest.approx(f_s)
  assert result["inference_flops_ratio"] == pytest.approx(f_s / f_d)
  # 40 steps of 32 examples, 3 f_S each, but a dense weight gradient (f_D
  # instead of f_S) on RigL's update steps 10 and 20.
  assert result["training_flops"] == pytest.approx(32 * (3 * f_s * 40 - 2 * f_s + 2 * f_d))
  assert result["training_flops_dense"] == 32 * 3 * f_d * 40
  assert result["training_flops_ratio"] == pytest.approx(
    result["training_flops"] / result["training_flops_dense"]
  )
  with open(os.path.join(workdir, train.RESULT_FILE)) as f:
    saved = json.load(f)
  assert saved["inference_flops_ratio"] == pytest.approx(f_s / f_d)
  assert saved["training_flops_ratio"] == pytest.approx(result["training_flops_ratio"])


def test_params_are_zero_where_masked_and_masks_are_bool(smoke):
  _, state, _, _ = smoke
  masks = jaxprune.get_masks(state.opt_state)
  for p, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(masks)):
    assert m.dtype == np.bool_
    m = np.broadcast_to(np.asarray(m), p.shape)
    assert np.all(np.asarray(p)[~m] == 0.0)
  assert int(state.step) == 40
  # RigL updated the masks at steps 10 and 20 (end_step=30 is exclusive).
  sparse = jaxprune.get_sparse_state(state.opt_state)
  assert int(sparse.algo_state.updates) == 2


def test_metrics_jsonl(smoke):
  workdir = smoke[0]
  rows = read_metrics(workdir)
  assert [r["step"] for r in rows] == list(range(5, 41, 5))
  for r in rows:
    assert {"step", "loss", "accuracy", "sparsity", "learning_rate", "drop_fraction"} <= set(r)
    assert np.isfinite(r["loss"]) and 0.0 <= r["accuracy"] <= 1.0
    assert r["sparsity"] == pytest.approx(smoke[2]["sparsity"], abs=1e-6)
  evals = [r["step"] for r in rows if "eval_accuracy" in r]
  assert evals == [20, 40]
  assert rows[-1]["eval_accuracy"] == pytest.approx(smoke[2]["test_accuracy"])
  assert sorted(os.listdir(os.path.join(workdir, checkpoint.SUBDIR))) == ["20", "40"]


def test_rerun_of_finished_run_only_evaluates(smoke, tmp_path):
  workdir = str(tmp_path / "w")
  shutil.copytree(smoke[0], workdir)
  _, result, _ = run_quiet(tiny_config(workdir, "--config.steps=40"))
  assert result["resumed_from"] == 40
  assert result["test_accuracy"] == smoke[2]["test_accuracy"]
  assert [r["step"] for r in read_metrics(workdir)] == list(range(5, 41, 5))


def test_steps_can_be_increased_to_continue(smoke, tmp_path):
  workdir = str(tmp_path / "w")
  shutil.copytree(smoke[0], workdir)
  _, result, _ = run_quiet(tiny_config(workdir, "--config.steps=50"))
  assert result["resumed_from"] == 40 and result["steps"] == 50
  assert [r["step"] for r in read_metrics(workdir)] == list(range(5, 51, 5))


def test_refuses_checkpoint_from_another_config(smoke):
  workdir = smoke[0]
  before = tree_files(workdir)
  config = tiny_config(
    workdir, "--config.steps=40", "--config.sparsity=0.9", "--config.model_kwargs.features=(16,)"
  )
  with pytest.raises(checkpoint.ConfigMismatchError) as e:
    train.run(config)
  message = str(e.value)
  assert "sparsity: checkpoint 0.8 != now 0.9" in message
  assert "model_kwargs.features" in message and workdir in message
  assert tree_files(workdir) == before  # Nothing touched.


def test_unknown_config_key_is_a_clear_error(capsys):
  with pytest.raises(train.ConfigError, match="unknown config key 'not_a_key'"):
    train.parse_config(["train", *TINY, "--config.not_a_key=3"])
  with pytest.raises(train.ConfigError, match="unknown config key 'model_kwargs.depth'"):
    train.parse_config(["train", *TINY, "--config.model_kwargs.depth=3"])
  assert train.main(["train", *TINY, "--config.sparsityy=0.5"]) == 2
  assert "unknown config key 'sparsityy'" in capsys.readouterr().err


def test_every_jaxprune_key_is_accepted_and_bad_values_are_named(tmp_path):
  config = train.parse_config(
    [
      "train",
      *TINY,
      "--config.algorithm=gradual_magnitude",
      "--config.initial_sparsity=0.1",
      "--config.power=2.0",
      "--config.distribution=erk",
      "--config.include=Dense_0",
      "--config.drop_fraction=0.5",
      "--config.sparsity_type=unstructured",
    ]
  )
  algo = train.create_algorithm(config)
  assert algo.config["initial_sparsity"] == 0.1 and algo.config["include"] == "Dense_0"
  bad = tiny_config(str(tmp_path), "--config.sparsity=1.5")
  with pytest.raises(train.ConfigError, match="sparsity"):
    train.run(bad)
  with pytest.raises(train.ConfigError, match="log_every"):
    train.run(tiny_config(str(tmp_path), "--config.log_every=0"))


def test_label_smoothing_loss():
  logits = jax.numpy.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
  labels = jax.numpy.array([0, 2])
  plain = train.loss_fn(logits, labels, 3, 0.0)
  smooth = train.loss_fn(logits, labels, 3, 0.3)
  logp = jax.nn.log_softmax(logits)
  targets = np.eye(3)[np.asarray(labels)] * 0.7 + 0.1
  assert float(smooth) == pytest.approx(float(-(targets * logp).sum(-1).mean()), rel=1e-6)
  assert float(plain) == pytest.approx(float(-logp[np.arange(2), labels].mean()), rel=1e-6)


def test_truncate_metrics_keeps_steps_up_to_the_checkpoint(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  with open(path, "w") as f:
    for step in (10, 20, 30):
      f.write(json.dumps({"step": step, "loss": 1.0}) + "\n")
    f.write('{"step": 40, "lo')  # Half-written by a killed run.
  assert train.truncate_metrics(path, 20) == 2
  assert [r["step"] for r in read_metrics(str(tmp_path))] == [10, 20]
  assert train.truncate_metrics(path, 20) == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_checkpoints_and_resume_is_bit_identical(tmp_path, sig):
  """A real SIGTERM (or SIGINT) to a training subprocess, then the same command again,
  ends with exactly the params, masks and optimizer state of a run that was
  never stopped."""
  steps = ["--config.steps=300", "--config.checkpoint_every=100", "--config.eval_every=100"]
  reference = str(tmp_path / "reference")
  run_quiet(tiny_config(reference, *steps))

  stopped = str(tmp_path / "stopped")
  argv = [sys.executable, "-m", "experiments.train", *TINY, *steps, f"--config.workdir={stopped}"]
  with open(tmp_path / "log.txt", "w") as log:
    proc = subprocess.Popen(
      argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=subprocess_env()
    )
    metrics = os.path.join(stopped, train.METRICS_FILE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
      if os.path.exists(metrics) and any(
        json.loads(line)["step"] >= 20 for line in open(metrics) if line.endswith("\n")
      ):
        break
      time.sleep(0.02)
    proc.send_signal(sig)
    rc = proc.wait(timeout=120)
  output = (tmp_path / "log.txt").read_text()
  assert rc == 128 + sig, output
  assert f"stopped by {signal.Signals(sig).name}" in output
  saved, _ = load_checkpoint(stopped)
  assert 20 <= saved < 300
  assert all(r["step"] <= saved for r in read_metrics(stopped))

  _, result, _ = run_quiet(tiny_config(stopped, *steps))
  assert result["resumed_from"] == saved
  step_a, state_a = load_checkpoint(reference)
  step_b, state_b = load_checkpoint(stopped)
  assert step_a == step_b == 300
  assert jax.tree.structure(state_a) == jax.tree.structure(state_b)
  flat_a = jax.tree_util.tree_flatten_with_path(state_a)[0]
  flat_b = jax.tree_util.tree_flatten_with_path(state_b)[0]
  for (path, a), (_, b) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  # The metrics file has every logged step exactly once.
  assert [r["step"] for r in read_metrics(stopped)] == [r["step"] for r in read_metrics(reference)]


def _garble(folder, name_filter=lambda path: True):
  """Overwrites every (selected) file under `folder` with junk of its size."""
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      if name_filter(path):
        size = os.path.getsize(path)
        with open(path, "wb") as f:
          f.write((b"not a checkpoint " * (size // 17 + 1))[: max(size, 1)])


# orbax may leave an asyncio callback behind when tensorstore fails to read.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("part", ["state", "metadata"])
def test_corrupt_checkpoint_is_a_clear_error_and_nothing_is_deleted(smoke, tmp_path, part):
  workdir = str(tmp_path / "w")
  shutil.copytree(smoke[0], workdir)
  latest = os.path.join(workdir, checkpoint.SUBDIR, "40")
  if part == "state":
    _garble(os.path.join(latest, "state"), lambda p: f"{os.sep}d{os.sep}" in p)
  else:
    _garble(os.path.join(latest, "meta"))
  before = tree_files(workdir)
  with pytest.raises(checkpoint.CheckpointError) as e:
    train.run(tiny_config(workdir, "--config.steps=40"))
  message = str(e.value)
  # The file list written at save time names the damaged file.
  item = os.path.join(latest, "state" if part == "state" else "meta")
  assert f"file {item}{os.sep}" in message and "CRC32 mismatch" in message, message
  assert "corrupt" in message and "steps [20]" in message
  assert tree_files(workdir) == before  # Nothing deleted, nothing overwritten.
  # Without that list (checkpoints written before it), orbax's own error.
  os.remove(os.path.join(latest, checkpoint.FILES_MANIFEST))
  before = tree_files(workdir)
  with pytest.raises(checkpoint.CheckpointError) as e:
    train.run(tiny_config(workdir, "--config.steps=40"))
  message = str(e.value)
  assert latest in message and "corrupt" in message and f"cannot read its {part}" in message
  assert "steps [20]" in message
  assert tree_files(workdir) == before  # Nothing deleted, nothing overwritten.
  assert train.main(["train", *TINY, "--config.steps=40", f"--config.workdir={workdir}"]) == 2
  assert tree_files(workdir) == before
  # The older checkpoint is intact: moving the corrupt one aside, as the
  # message says, resumes from step 20 and reproduces step 40 exactly.
  shutil.move(latest, str(tmp_path / "corrupt-40"))
  _, result, _ = run_quiet(tiny_config(workdir, "--config.steps=40"))
  assert result["resumed_from"] == 20
  want, got = load_checkpoint(smoke[0], 40)[1], load_checkpoint(workdir, 40)[1]
  assert jax.tree.structure(want) == jax.tree.structure(got)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b)


def test_smoke_on_real_offline_fashion_mnist(tmp_path):
  """A few dozen steps on the real Fashion-MNIST, through the local TFDS builder."""
  from experiments import data
  from experiments.datasets import fashion_mnist_local

  if not fashion_mnist_local.source_files_present(data.FASHION_MNIST_DIR):
    pytest.skip("Debian package dataset-fashion-mnist is not installed")
  config = tiny_config(
    tmp_path / "run",
    "--config.dataset=fashion_mnist",
    "--config.steps=40",
    f"--config.data_dir={tmp_path / 'data'}",
    "--config.eval_batch_size=500",
  )
  _, result, text = run_quiet(config)
  assert "tfds fashion_mnist_local" in text and result["dataset"] == "fashion_mnist"
  assert result["steps"] == 40 and result["test_accuracy"] > 0.3  # 10 classes: chance is 0.1
  assert result["sparsity"] == pytest.approx(0.8, abs=1e-3)


@pytest.mark.slow
def test_rigl_on_real_fashion_mnist(tmp_path):
  """The command-line recipe on the real offline Fashion-MNIST (TFDS path)."""
  from experiments import data
  from experiments.datasets import fashion_mnist_local

  if not fashion_mnist_local.source_files_present(data.FASHION_MNIST_DIR):
    pytest.skip("Debian package dataset-fashion-mnist is not installed")
  argv = [
    f"--config={CONFIG}",
    "--config.algorithm=rigl",
    "--config.sparsity=0.9",
    "--config.start_step=0",
    "--config.end_step=750",
    "--config.steps=1000",
    f"--config.workdir={tmp_path / 'run'}",
    f"--config.data_dir={tmp_path / 'data'}",
  ]
  proc = subprocess.run(
    [sys.executable, "-m", "experiments.train", *argv],
    cwd=REPO,
    capture_output=True,
    text=True,
    env=subprocess_env(),
    timeout=1200,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  result = json.loads(lines[-1])
  assert result["test_accuracy"] > 0.80 and result["dataset"] == "fashion_mnist"
  assert result["sparsity"] == pytest.approx(0.9, abs=1e-4)
  assert any("tfds fashion_mnist_local" in line for line in lines)
  assert any(line.startswith("Dense_0/kernel") for line in lines)
