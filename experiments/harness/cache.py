"""Skip what is already finished: one JSON file per finished piece of work.

`cached(path, compute)` returns the JSON object stored at `path` when there is
one (and `matches(obj)` accepts it), else runs `compute()`, stores what it
returns atomically and returns it. A rerun of the same command thus skips every
finished run and resumes the unfinished one from its checkpoint.
`finished_run(workdir, config)` is the test for a run folder: its
`result.json`, if the run finished with this very config.
"""

from __future__ import annotations

import json
import os
from typing import Callable

from experiments.harness import checkpoint
from experiments.harness.result import CONFIG_FILE, RESULT_FILE, write_json


def load(path: str, matches: Callable[[dict], bool] | None = None) -> dict | None:
  """The JSON object at `path`, or None when there is none or `matches` rejects it."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    obj = json.load(f)
  return obj if matches is None or matches(obj) else None


def cached(
  path: str, compute: Callable[[], dict], matches: Callable[[dict], bool] | None = None
) -> dict:
  """`load(path, matches)`, or else `compute()` stored at `path` (see module doc)."""
  found = load(path, matches)
  if found is not None:
    return found
  obj = compute()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  write_json(path, obj)
  return obj


def finished_run(workdir: str, config) -> dict | None:
  """The run's result.json if it finished with this very config, else None."""
  saved = load(os.path.join(workdir, CONFIG_FILE))
  result = load(os.path.join(workdir, RESULT_FILE))
  if saved is None or result is None:
    return None
  same = not checkpoint.differences(checkpoint.fingerprint(saved), checkpoint.fingerprint(config))
  if same and result.get("steps") == config.steps and saved.get("steps") == config.steps:
    # Results written before runs recorded their dataset are redone (the run
    # resumes from its final checkpoint, so only the evaluation is repeated).
    return result if result.get("dataset") else None
  return None
