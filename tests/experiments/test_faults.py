"""Faults with real processes: SIGKILL during a checkpoint save and during
`save_compressed`, and damaged checkpoints on disk."""

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
from test_train import (  # noqa: F401 (fixture)
  REPO,
  TINY,
  compile_cache,
  load_checkpoint,
  run_quiet,
  subprocess_env,
  tiny_config,
  tree_files,
)

from experiments import checkpoint, train
from jaxprune import export

STEPS = ["--config.steps=40", "--config.checkpoint_every=20"]


def wait_for(predicate, proc, timeout=300, what="condition"):
  deadline = time.time() + timeout
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f"process exited with {proc.returncode} before {what}")
    if time.time() > deadline:
      proc.kill()
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(0.002)


# ----------------------------------------------------------- checkpoint saves

# Trains like `python -m experiments.train`, but holds the commit (the rename of
# orbax's temporary folder) of checkpoint `argv[1]` for ten minutes, so that the
# parent can SIGKILL it mid-save with everything but the commit written.
HOLD_COMMIT = r"""
import sys, time
from orbax.checkpoint._src.path import atomicity

finalize = atomicity.AtomicRenameTemporaryPath.finalize

async def held(self, *args, **kwargs):
  if self._final_path.name == sys.argv[1]:
    print("[test] committing", self._final_path, flush=True)
    time.sleep(600)
  return await finalize(self, *args, **kwargs)

atomicity.AtomicRenameTemporaryPath.finalize = held
from experiments import train
sys.exit(train.main(["train", *sys.argv[2:]]))
"""


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The workdir of an uninterrupted 40-step run (checkpoints at 20 and 40)."""
  workdir = str(tmp_path_factory.mktemp("faults") / "reference")
  run_quiet(tiny_config(workdir, *STEPS))
  return workdir


def test_sigkill_during_checkpoint_save_keeps_the_previous_one_and_resumes(reference, tmp_path):
  pytest.importorskip("orbax.checkpoint._src.path.atomicity")

  workdir = str(tmp_path / "killed")
  log_path = tmp_path / "log.txt"
  argv = [*TINY, *STEPS, f"--config.workdir={workdir}"]
  with open(log_path, "w") as log:
    proc = subprocess.Popen(
      [sys.executable, "-c", HOLD_COMMIT, "40", *argv],
      stdout=log,
      stderr=subprocess.STDOUT,
      cwd=REPO,
      env=subprocess_env(),
    )
    wait_for(lambda: "[test] committing" in log_path.read_text(), proc, what="the save of step 40")
    ckpt_dir = os.path.join(workdir, checkpoint.SUBDIR)
    before = tree_files(os.path.join(ckpt_dir, "20"))
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
  # The interrupted save left only a temporary folder; step 20 is intact.
  assert any(".orbax-checkpoint-tmp" in name for name in os.listdir(ckpt_dir))
  assert not os.path.exists(os.path.join(ckpt_dir, "40"))
  assert tree_files(os.path.join(ckpt_dir, "20")) == before

  # Rerunning the command resumes from step 20 and ends exactly where an
  # uninterrupted run ends.
  _, result, _ = run_quiet(tiny_config(workdir, *STEPS))
  assert result["resumed_from"] == 20
  assert tree_files(os.path.join(ckpt_dir, "20")) == before  # Not overwritten.
  step_a, state_a = load_checkpoint(reference)
  step_b, state_b = load_checkpoint(workdir)
  assert step_a == step_b == 40
  assert jax.tree.structure(state_a) == jax.tree.structure(state_b)
  flat_a = jax.tree_util.tree_flatten_with_path(state_a)[0]
  for (path, a), b in zip(flat_a, jax.tree.leaves(state_b)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
  assert [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))] == [
    json.loads(line)["step"] for line in open(os.path.join(reference, "metrics.jsonl"))
  ]


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _flip_last_byte(path):
  with open(path, "r+b") as f:
    f.seek(-1, os.SEEK_END)
    byte = f.read(1)
    f.seek(-1, os.SEEK_END)
    f.write(bytes([byte[0] ^ 0xFF]))


DAMAGE = {"truncated": _truncate, "corrupted": _flip_last_byte, "missing": os.remove}
EXPECTED = {"truncated": "(truncated)", "corrupted": "CRC32 mismatch", "missing": "is missing"}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_checkpoint_file_is_named_and_nothing_is_overwritten(
  reference, tmp_path, capsys, damage
):
  workdir = str(tmp_path / "w")
  shutil.copytree(reference, workdir)
  data = os.path.join(workdir, checkpoint.SUBDIR, "40", "state", "ocdbt.process_0", "d")
  # The smallest data file of the state: damage to it goes unnoticed by a
  # plain orbax restore (checked when this test was written).
  victim = min(
    (os.path.join(data, name) for name in os.listdir(data)), key=lambda p: os.path.getsize(p)
  )
  DAMAGE[damage](victim)
  before = tree_files(workdir)
  assert train.main(["train", *TINY, *STEPS, f"--config.workdir={workdir}"]) == 2
  err = capsys.readouterr().err
  assert f"file {victim} " in err and EXPECTED[damage] in err, err
  assert "steps [20]" in err  # Says which older checkpoint is left.
  assert tree_files(workdir) == before  # Nothing deleted, nothing overwritten.


# ------------------------------------------------------------ save_compressed

# Writes `path` again and again (a counter in w[0, 0]), printing each count
# once its file is in place.
SAVE_LOOP = r"""
import sys
import numpy as np
from jaxprune import export

path = sys.argv[1]
w = np.random.default_rng(0).normal(size=(1024, 1024)).astype(np.float32)
for i in range(10**6):
  w[0, 0] = i
  export.save_compressed(path, {"w": w})
  print(i, flush=True)
"""


def _temporary_files(folder, name):
  return [f for f in os.listdir(folder) if f.startswith(name + ".") and f.endswith(".tmp")]


@pytest.mark.parametrize(
  "existing", [pytest.param(False, marks=pytest.mark.slow), True], ids=["new_file", "replacing"]
)
def test_sigkill_during_save_compressed_leaves_no_partial_file(tmp_path, existing):
  folder = tmp_path / "out"
  folder.mkdir()
  path = str(folder / "model.jxp")
  log_path = tmp_path / "log.txt"
  with open(log_path, "w") as log:
    proc = subprocess.Popen(
      [sys.executable, "-c", SAVE_LOOP, path],
      stdout=log,
      stderr=subprocess.STDOUT,
      cwd=REPO,
      env=subprocess_env(),
    )
    if existing:  # Let a few saves complete, then kill one mid-write.
      wait_for(lambda: len(log_path.read_text().split()) >= 3, proc, what="three saves")
    wait_for(lambda: _temporary_files(folder, "model.jxp"), proc, what="a save in progress")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
  completed = [int(x) for x in log_path.read_text().split()]
  if not existing and not completed:
    assert not os.path.exists(path)  # Killed during the first write: no file at all.
    return
  # The file at `path` is a whole one: the last completed save (or the one
  # whose rename happened just before the kill).
  loaded = export.load_compressed(path)
  assert int(loaded["w"][0, 0]) in (completed[-1], completed[-1] + 1)
  assert loaded["w"].shape == (1024, 1024)
