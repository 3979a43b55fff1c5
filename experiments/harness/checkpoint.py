"""Checkpoints of training runs (orbax), tied to the config that made them.

A checkpoint lives in `<workdir>/checkpoints/<step>/` and holds two items:

- "state": the whole train state -- params, BatchNorm statistics, the full
  optimizer state (jaxprune masks, step count and algorithm state included),
  the step and the RNG key -- saved and restored with each array's sharding;
- "meta": JSON with the format version, the step and the run's config.

The data position needs no saving: training batches are a pure function of
(seed, step) (see `experiments.data`).

Resuming is refused, with a message naming the differing keys, when the
workdir's checkpoint was made with a different *run-defining* config: every key
except the operational ones in `OPERATIONAL_KEYS` (where files go, how often to
log, evaluate and checkpoint, the device layout). Keys derived from others are
compared after resolution, so `--config.steps=N` on a recipe whose `end_step`
follows `steps` shows up as a changed `end_step`.

`steps` may be increased to continue a finished run when nothing else changes,
i.e. when the recipe's learning-rate schedule does not depend on `steps`
(`lr_schedule="constant"`) and derived keys such as `end_step` keep their values
(pin them on the command line). A checkpoint beyond `steps` is refused.

Nothing is ever deleted or overwritten on failure: a checkpoint that cannot be
read raises `CheckpointError` naming its folder and leaves every checkpoint in
place. Saves are atomic (orbax writes a temporary folder, then renames it; a
process killed mid-save leaves only the temporary folder, which is never
restored); the newest `MAX_TO_KEEP` checkpoints are kept. After each save,
`FILES_MANIFEST` records every file's size and CRC32; before a restore, a
truncated, altered or missing file is reported by name (files that orbax never
reads, and damage that tensorstore would not notice, are caught the same way).
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

FORMAT = 1
MAX_TO_KEEP = 2
SUBDIR = "checkpoints"
# Written by process 0 into each committed checkpoint folder: the size and CRC32
# of every file of the checkpoint, checked before it is restored.
FILES_MANIFEST = "jaxprune_files.json"
# Keys that do not change what is computed: where files live, how often to log,
# evaluate and checkpoint, the evaluation batch size and the device layout.
# `steps` is handled separately (see the module docstring).
OPERATIONAL_KEYS = frozenset(
  {
    "workdir",
    "data_dir",
    "eval_every",
    "log_every",
    "checkpoint_every",
    "eval_batch_size",
    "distributed",
    "coordinator_address",
    "num_processes",
    "process_id",
    "model_parallel",
    "steps",
  }
)
# lr schedules whose values do not depend on `steps`.
STEPS_FREE_SCHEDULES = ("constant",)


class CheckpointError(RuntimeError):
  """A checkpoint cannot be used (unreadable, or from a different run)."""


class ConfigMismatchError(CheckpointError):
  """The workdir holds a checkpoint made with a different config."""


# ---------------------------------------------------------------------- configs


def _plain(value: Any) -> Any:
  """JSON-compatible copy: tuples -> lists, ConfigDicts -> dicts."""
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, (bool, int, float, str)) or value is None:
    return value
  return repr(value)


def config_dict(config: Any) -> dict:
  """The config as a JSON-compatible dict, derived (lazy) values resolved."""
  return json.loads(json.dumps(_plain(config)))


def fingerprint(config: Any) -> dict:
  """The run-defining part of a config: all but `OPERATIONAL_KEYS`."""
  return {k: v for k, v in config_dict(config).items() if k not in OPERATIONAL_KEYS}


def _flatten(d: Mapping, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping) and v:
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def differences(saved: Mapping, current: Mapping) -> list[tuple[str, Any, Any]]:
  """`(dotted key, saved value, current value)` for every key that differs.

  A key missing on one side counts as None there, so adding an optional key
  (default None) to the configs keeps older checkpoints resumable.
  """
  a, b = _flatten(saved), _flatten(current)
  out = []
  for key in sorted(set(a) | set(b)):
    va, vb = a.get(key), b.get(key)
    if va != vb:
      out.append((key, va, vb))
  return out


def check_resumable(meta: Mapping, config: Any, step: int, path: str) -> None:
  """Raises ConfigMismatchError unless `config` may resume the checkpoint.

  Args:
    meta: the checkpoint's "meta" item.
    config: the current config.
    step: the checkpoint's step.
    path: the checkpoint folder (for messages).
  """
  if meta.get("format") != FORMAT:
    raise CheckpointError(
      f"checkpoint {path} has format {meta.get('format')!r}; this "
      f"version reads format {FORMAT}. Use a fresh workdir."
    )
  saved = meta.get("config", {})
  diffs = differences(fingerprint(saved), fingerprint(config))
  current = config_dict(config)
  saved_steps, steps = saved.get("steps"), current.get("steps")
  if saved_steps != steps and current.get("lr_schedule") not in STEPS_FREE_SCHEDULES:
    diffs.append(("steps", saved_steps, steps))
    diffs.sort()
  if diffs:
    listed = "; ".join(f"{k}: checkpoint {a!r} != now {b!r}" for k, a, b in diffs)
    hint = ""
    if saved_steps != steps:
      hint = (
        " (`steps` may only change when the lr schedule is 'constant' and "
        "no derived key such as start_step/end_step changes; pin them with "
        "--config.KEY=VALUE)"
      )
    raise ConfigMismatchError(
      f"workdir {config_dict(config).get('workdir')!r} holds a checkpoint ({path}) "
      f"from a different config. Differing keys: {listed}{hint}. Use another "
      "--config.workdir, or rerun with the checkpoint's config to resume it."
    )
  if steps is not None and step > steps:
    raise ConfigMismatchError(
      f"checkpoint {path} is at step {step}, beyond steps={steps}; raise "
      "--config.steps or use another workdir."
    )


# ------------------------------------------------------------------ checkpoints


def abstract_state(shapes: Any, shardings: Any) -> Any:
  """`jax.ShapeDtypeStruct`s with shardings: the restore target of a state."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
  )


class Checkpointer:
  """Saves and restores train states in `<workdir>/checkpoints` with orbax.

  Args:
    workdir: the run's folder.
    max_to_keep: how many of the newest checkpoints to keep.
  """

  def __init__(self, workdir: str, max_to_keep: int = MAX_TO_KEEP):
    self.directory = os.path.abspath(os.path.join(workdir, SUBDIR))
    try:
      self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep,
          create=True,
          enable_async_checkpointing=False,
          cleanup_tmp_directories=False,
        ),
      )
    except Exception as e:  # noqa: BLE001 -- re-raised with the folder named.
      raise CheckpointError(
        f"cannot open the checkpoint folder {self.directory}: {type(e).__name__}: {e}"
      ) from e

  def path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: Any, config: Any, extra: Mapping | None = None) -> bool:
    """Writes a checkpoint at `step`; False (nothing written) if it exists.

    `extra`: more JSON-ready entries for the "meta" item (e.g. the current
    shapes of a model compacted during training), read back by `read_meta`.
    """
    if step in self.all_steps():
      return False
    meta = {"format": FORMAT, "step": int(step), "config": config_dict(config)}
    for key, value in (extra or {}).items():
      if key in meta:
        raise ValueError(f"checkpoint meta key {key!r} is reserved")
      meta[key] = value
    self._manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
      force=True,
    )
    self._manager.wait_until_finished()
    if jax.process_index() == 0:
      write_manifest(self.path(step))
    return True

  def verify(self, step: int) -> None:
    """Checks checkpoint `step`'s files against its manifest (when it has one).

    Raises:
      CheckpointError: naming the first file that is missing, truncated or
        altered since the save.
    """
    problem = check_manifest(self.path(step))
    if problem is not None:
      raise self._corrupt(step, problem)

  def read_meta(self, step: int) -> dict:
    """The "meta" item of checkpoint `step`; CheckpointError if unreadable."""
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      meta = dict(meta["meta"])
    except Exception as e:  # noqa: BLE001
      raise self._corrupt(step, _cannot_read("its metadata", e)) from e
    if meta.get("step") != step:
      raise self._corrupt(
        step, _cannot_read("its metadata", ValueError(f"metadata says step {meta.get('step')!r}"))
      )
    return meta

  def restore(self, step: int, target: Any) -> Any:
    """Checkpoint `step`'s state, shaped and sharded like `target`."""
    try:
      restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
      )
      state = restored["state"]
    except Exception as e:  # noqa: BLE001
      raise self._corrupt(step, _cannot_read("its state", e)) from e
    if jax.tree.structure(state) != jax.tree.structure(target):
      raise self._corrupt(
        step,
        _cannot_read(
          "its state", ValueError("the restored tree does not match the train state's structure")
        ),
      )
    return state

  def restore_latest(self, target: Any, config: Any) -> tuple[Any, int] | None:
    """`(state, step)` of the newest checkpoint after checking its config,
    or None when there is none."""
    step = self.latest_step()
    if step is None:
      return None
    self.verify(step)
    check_resumable(self.read_meta(step), config, step, self.path(step))
    return self.restore(step, target), step

  def _corrupt(self, step: int, problem: str) -> CheckpointError:
    others = [s for s in self.all_steps() if s != step]
    keep = (
      f"Other checkpoints (steps {others}) are left as they are; move "
      f"{self.path(step)} aside to resume from step {others[-1]}"
      if others
      else "Nothing was deleted; move it aside or use another workdir"
    )
    return CheckpointError(
      f"checkpoint {self.path(step)} is corrupt or incomplete: {problem}. {keep}."
    )

  def close(self) -> None:
    self._manager.close()


def _cannot_read(what: str, error: Exception) -> str:
  return f"cannot read {what} ({type(error).__name__}: {_first_line(error)})"


def _checkpoint_files(folder: str) -> list[str]:
  out = []
  for root, _, files in os.walk(folder):
    out.extend(os.path.relpath(os.path.join(root, f), folder) for f in files)
  return sorted(f for f in out if f != FILES_MANIFEST)


def _crc32(path: str) -> int:
  crc = 0
  with open(path, "rb") as f:
    while chunk := f.read(1 << 20):
      crc = zlib.crc32(chunk, crc)
  return crc


def write_manifest(folder: str) -> None:
  """Records the size and CRC32 of every file of the checkpoint in `folder`."""
  files = {
    name: [os.path.getsize(os.path.join(folder, name)), _crc32(os.path.join(folder, name))]
    for name in _checkpoint_files(folder)
  }
  path = os.path.join(folder, FILES_MANIFEST)
  with open(path + ".tmp", "w") as f:
    json.dump({"format": 1, "files": files}, f, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(path + ".tmp", path)


def check_manifest(folder: str) -> str | None:
  """What is wrong with the files of the checkpoint in `folder` (naming the
  file), or None when they match its manifest or it has none (a checkpoint
  written before manifests, or one whose process died right after the commit)."""
  path = os.path.join(folder, FILES_MANIFEST)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      files = json.load(f)["files"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"its file list {path} is unreadable ({type(e).__name__}: {_first_line(e)})"
  for name, (size, crc) in sorted(files.items()):
    file = os.path.join(folder, name)
    if not os.path.isfile(file):
      return f"file {file} is missing"
    actual = os.path.getsize(file)
    if actual != size:
      how = "truncated" if actual < size else "grown"
      return f"file {file} is {actual} bytes, {size} when saved ({how})"
    if _crc32(file) != crc:
      return f"file {file} differs from the one saved (CRC32 mismatch)"
  return None


def _first_line(error: Exception, limit: int = 300) -> str:
  text = str(error).strip().splitlines()
  return text[0][:limit] if text else ""
