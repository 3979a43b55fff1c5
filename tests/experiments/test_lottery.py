"""A short lottery run (IMP with rewinding and its controls) on the offline digits."""

import io
import json
import os

import jax
import numpy as np

from experiments import lottery, train

ARGS = [
  "lottery",
  "--config=experiments/configs/fmnist_mlp.py",
  "--rounds=1",
  "--prune_fraction=0.5",
  "--rewind_step=4",
  "--config.dataset=digits",
  "--config.model_kwargs.features=(16,)",
  "--config.batch_size=32",
  "--config.eval_batch_size=200",
  "--config.steps=12",
  "--config.log_every=4",
  "--config.eval_every=12",
  "--config.checkpoint_every=8",
]


def _run(workdir):
  flags, rest = lottery.split_argv([*ARGS, f"--config.workdir={workdir}"])
  config = train.parse_config(rest)
  out = io.StringIO()
  summary = lottery.lottery(config, flags, out=out)
  return summary, out.getvalue()


def test_lottery_round_with_controls_json_last_and_resume(tmp_path, monkeypatch):
  summary, text = _run(str(tmp_path))
  assert json.loads(text.strip().splitlines()[-1]) == json.loads(json.dumps(summary))
  rows = summary["rows"]
  assert [r["round"] for r in rows] == [0, 1]
  assert rows[1]["remaining"] == 0.5  # 784x16 and 16x10 kernels, half of each kept
  assert all(0.0 <= rows[1][k] <= 1.0 for k in ("ticket", "reinit", "random"))
  assert "ticket  reinit  random" in text
  # the ticket's weights start from the rewind point, masked; its masks are kept exactly
  ticket = lottery._load(
    os.path.join(tmp_path, "round_1/ticket/final.msgpack"),
    lottery._load(os.path.join(tmp_path, "rewind.msgpack"), None),
  )
  w = np.asarray(ticket["Dense_0"]["kernel"])
  assert np.count_nonzero(w) == w.size // 2
  # ... exactly the entries that pruning round 0's final weights keeps
  flags, _ = lottery.split_argv([*ARGS, f"--config.workdir={tmp_path}"])
  round_0 = lottery._load(os.path.join(tmp_path, "round_0/final.msgpack"), ticket)
  masks = lottery.prune(
    round_0, lottery.dense_masks(round_0), flags["prune_fraction"], flags["scope"]
  )
  for layer in ("Dense_0", "Dense_1"):
    kept = np.asarray(masks[layer]["kernel"])
    np.testing.assert_array_equal(np.asarray(ticket[layer]["kernel"]) != 0, kept, err_msg=layer)

  # a rerun finds every run finished and only reads the results back: nothing trains
  def no_training(*args, **kwargs):
    raise AssertionError("a finished run was trained again")

  monkeypatch.setattr(lottery, "run_one", no_training)
  again, _ = _run(str(tmp_path))
  assert again["rows"] == rows


def test_prune_layer_and_global_counts():
  params = {"a": jax.numpy.arange(1.0, 13.0).reshape(3, 4), "b": jax.numpy.ones((4, 2))}
  masks = lottery.dense_masks(params)
  layer = lottery.prune(params, masks, 0.25, "layer")
  assert int(layer["a"].sum()) == 9 and int(layer["b"].sum()) == 6
  assert not bool(layer["a"][0, 0]) and bool(layer["a"][2, 3])  # smallest magnitudes go first
  glob = lottery.prune(params, masks, 0.25, "global")
  assert int(glob["a"].sum()) + int(glob["b"].sum()) == 15
  assert int(glob["b"].sum()) == 3  # the ones of "b" are below most of "a"
  rand = lottery.random_like(layer, params, jax.random.PRNGKey(0))
  assert int(rand["a"].sum()) == 9 and int(rand["b"].sum()) == 6
