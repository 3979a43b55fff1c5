"""Fan-in of every output unit in the final masks of runs (where growth went).

    python -m experiments.fan_in runs/E_protocol/base/rigl_sparsity0.9_seed0 ...

For each run folder of `experiments.train`, reads the masks of the newest
checkpoint and prints, per pruned kernel, the active inputs of each output unit
(last axis): min / median / max, the coefficient of variation, and the share of
connections held by the 10% most connected units. Even spreads (static, SET)
have a small coefficient of variation; RigL's growth on a few hub units shows
up as a large one. Ends with one JSON line of the same figures.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np


def final_masks(workdir: str) -> dict:
  """``{kernel path: bool mask}`` of the full-shape masks in the newest checkpoint."""
  import orbax.checkpoint as ocp

  from experiments.harness import checkpoint

  manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, checkpoint.SUBDIR)))
  try:
    restored = manager.restore(
      manager.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore())
    )
  finally:
    manager.close()
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(restored["state"]["opt_state"])[0]:
    x = np.asarray(x)
    if x.dtype == np.bool_ and x.ndim >= 2:
      keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
      name = "/".join(keys[-2:])
      out[name] = x
  return out


def fan_in_stats(mask: np.ndarray) -> dict:
  """Active inputs per output unit (last axis) of one mask."""
  fan_in = mask.reshape(-1, mask.shape[-1]).sum(0).astype(np.float64)
  top = np.sort(fan_in)[::-1][: max(1, fan_in.size // 10)]
  return {
    "min": int(fan_in.min()),
    "median": float(np.median(fan_in)),
    "max": int(fan_in.max()),
    "cv": float(fan_in.std() / max(fan_in.mean(), 1e-12)),
    "top10_share": float(top.sum() / max(fan_in.sum(), 1.0)),
  }


def main(argv: list[str]) -> int:
  if not argv:
    print(__doc__)
    return 2
  report = {}
  for workdir in argv:
    stats = {name: fan_in_stats(m) for name, m in sorted(final_masks(workdir).items())}
    report[workdir] = stats
    for name, s in stats.items():
      print(
        f"{os.path.basename(workdir.rstrip('/'))} {name}: fan-in {s['min']}/{s['median']:.0f}/"
        f"{s['max']} (min/median/max), cv {s['cv']:.2f}, top-10% units hold "
        f"{s['top10_share']:.2f}"
      )
  print(json.dumps(report))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
