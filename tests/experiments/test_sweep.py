"""Tests of experiments/sweep.py and experiments/plots.py."""

import json
import os

import pytest
from test_train import CONFIG, TINY, compile_cache  # noqa: F401 (fixture)

from experiments import plots, sweep


def row(algorithm, sparsity, seed, accuracy, dataset="fashion_mnist"):
  return {
    "dataset": dataset,
    "algorithm": algorithm,
    "target_sparsity": sparsity,
    "seed": seed,
    "test_accuracy": accuracy,
    "sparsity": sparsity or 0.0,
    "layer_sparsity": {
      "Dense_0/kernel": sparsity or 0.0,
      "Dense_0/bias": 0.0,
      "Dense_1/kernel": (sparsity or 0.0) / 2,
      "total": 0.5,
    },
  }


ROWS = [
  row("dense", None, 0, 0.88),
  row("dense", None, 1, 0.90),
  row("rigl", 0.9, 0, 0.87),
  row("rigl", 0.9, 1, 0.86),
  row("rigl", 0.98, 0, 0.80),
  row("set", 0.9, 0, 0.85),
]


def test_plan_runs_dense_once_per_seed():
  runs = sweep.plan(["dense", "rigl", "static"], [0.8, 0.9], [0, 1])
  assert len(runs) == 2 * (1 + 2 + 2)
  assert [r.name for r in runs[:3]] == [
    "dense_seed0",
    "rigl_sparsity0.8_seed0",
    "rigl_sparsity0.9_seed0",
  ]
  assert len({r.name for r in runs}) == len(runs)


def test_run_argv_applies_the_recipe_and_extra_overrides():
  spec = sweep.RunSpec("rigl", 0.9, 2)
  argv = sweep.run_argv(
    spec,
    config="c.py",
    steps=2000,
    workdir="/w",
    extra=["batch_size=64", "--config.update_every=50"],
  )
  assert argv[:5] == [
    "--config=c.py",
    "--config.algorithm=rigl",
    "--config.seed=2",
    "--config.steps=2000",
    "--config.workdir=/w/rigl_sparsity0.9_seed2",
  ]
  assert "--config.sparsity=0.9" in argv and "--config.end_step=1500" in argv
  assert "--config.start_step=0" in argv and argv[-2:] == [
    "--config.batch_size=64",
    "--config.update_every=50",
  ]
  gm = sweep.run_argv(
    sweep.RunSpec("gradual_magnitude", 0.8, 0), config="c.py", steps=2000, workdir="/w"
  )
  assert "--config.start_step=200" in gm and "--config.end_step=1500" in gm
  dense = sweep.run_argv(sweep.RunSpec("dense", None, 0), config="c.py", steps=10, workdir="/w")
  assert not any("sparsity" in a or "end_step" in a for a in dense)


def test_aggregate_and_markdown_table():
  stats = sweep.aggregate(ROWS)
  mean, std, n = stats[("dense", None)]
  assert (mean, n) == (pytest.approx(89.0), 2) and std == pytest.approx(1.41421356, rel=1e-6)
  assert stats[("rigl", 0.98)] == (pytest.approx(80.0), 0.0, 1)
  table = sweep.markdown_table(ROWS, ["dense", "set", "rigl"], [0.9, 0.98])
  lines = table.splitlines()
  assert lines[0] == "| algorithm | 0.9 | 0.98 |"
  assert lines[2] == "| dense (reference) | 89.00 ± 1.41 (2) | 89.00 ± 1.41 (2) |"
  assert lines[3] == "| set | 85.00 ± 0.00 (1) | – |"
  assert lines[4] == "| rigl | 86.50 ± 0.71 (2) | 80.00 ± 0.00 (1) |"


def test_runs_on_different_datasets_never_share_a_table(tmp_path):
  mixed = [*ROWS, row("rigl", 0.9, 2, 0.95, dataset="digits")]
  with pytest.raises(ValueError, match="different datasets.*digits.*fashion_mnist"):
    sweep.markdown_table(mixed)
  results = str(tmp_path / "results")
  with pytest.raises(ValueError, match="different datasets"):
    sweep.write_outputs(mixed, results, ["dense", "rigl"], [0.9])
  assert not os.path.exists(results)  # Nothing written.
  unrecorded = [{k: v for k, v in r.items() if k != "dataset"} for r in ROWS]
  with pytest.raises(ValueError, match="without a recorded dataset"):
    sweep.markdown_table(unrecorded)
  paths = sweep.write_outputs(ROWS, results, ["dense", "rigl"], [0.9], title="t")
  assert "Dataset: fashion_mnist" in open(paths["table"]).read()


def test_plots_write_png_files(tmp_path):
  path = plots.accuracy_vs_sparsity(ROWS, str(tmp_path / "acc.png"))
  layer = plots.layer_sparsity(ROWS, "rigl", str(tmp_path / "layers.png"))
  for p in (path, layer):
    with open(p, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_flops_table_and_plot_keep_lengths_apart(tmp_path):
  flops = lambda r, inference, training, steps: {
    **r,
    "steps": steps,
    "inference_flops_ratio": inference,
    "training_flops_ratio": training,
    "training_flops": training * steps,
  }
  rows = [
    flops(row("dense", None, 0, 0.88), 1.0, 1.0, 100),
    flops(row("rigl", 0.9, 0, 0.86), 0.12, 0.13, 100),
    flops(row("rigl", 0.9, 1, 0.84), 0.12, 0.15, 100),
    flops(row("rigl", 0.9, 0, 0.87), 0.12, 0.125, 300),
    row("set", 0.9, 0, 0.85),  # No FLOPs recorded.
  ]
  lines = sweep.flops_table(rows, ["dense", "set", "rigl"], [0.9]).splitlines()
  assert lines[2] == "| dense | – | 100 | 88.00 ± 0.00 (1) | 1.000 | 1.000 |"
  assert "| set | 0.9 | None | 85.00 ± 0.00 (1) | – | – |" in lines
  assert "| rigl | 0.9 | 100 | 85.00 ± 1.41 (2) | 0.120 | 0.140 |" in lines
  assert "| rigl | 0.9 | 300 | 87.00 ± 0.00 (1) | 0.120 | 0.125 |" in lines
  path = plots.accuracy_vs_training_flops(rows, str(tmp_path / "flops.png"))
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_tiny_sweep_end_to_end_and_resumable(tmp_path, compile_cache, capsys):  # noqa: F811
  workdir, results = str(tmp_path / "sweep"), str(tmp_path / "results")
  # TINY's settings after the recipe's, so RigL's programs are those of
  # test_train's runs (compiled once per session).
  extra = [
    a.removeprefix("--config.")
    for a in TINY[1:]
    if not a.startswith(("--config.algorithm", "--config.sparsity="))
  ]
  argv = [
    "--algorithms=dense,rigl",
    "--sparsities=0.8",
    "--seeds=0",
    "--steps=12",
    f"--workdir={workdir}",
    f"--results_dir={results}",
    f"--config={CONFIG}",
    f"--compile_cache={compile_cache}",
    *[f"--set={e}" for e in extra],
  ]
  assert sweep.main(argv) == 0
  out = capsys.readouterr().out
  assert "[sweep] 1/2 dense_seed0" in out and "[sweep] 2/2 rigl_sparsity0.8_seed0" in out
  rows = [json.loads(line) for line in open(os.path.join(results, "results.jsonl"))]
  assert sorted(r["algorithm"] for r in rows) == ["dense", "rigl"]
  assert all(r["steps"] == 12 and r["dataset"] == "digits" for r in rows)
  table = open(os.path.join(results, "results.md")).read()
  assert "Dataset: digits" in table
  assert "| dense (reference) |" in table and "| rigl |" in table and "(1)" in table
  for name in ("accuracy_vs_sparsity.png", "layer_sparsity_rigl.png"):
    assert os.path.getsize(os.path.join(results, name)) > 1000
  # Both FLOPs ratios as columns, and the accuracy-vs-training-FLOPs plot.
  assert "| inference FLOPs (x dense) | training FLOPs (x dense) |" in table
  dense_line = next(line for line in table.splitlines() if line.startswith("| dense | – | 12 |"))
  assert dense_line.endswith("| 1.000 | 1.000 |")
  rigl = next(r for r in rows if r["algorithm"] == "rigl")
  assert 0.0 < rigl["inference_flops_ratio"] < 0.3 and 0.0 < rigl["training_flops_ratio"] < 1.0
  assert f"| {rigl['training_flops_ratio']:.3f} |" in table
  assert os.path.getsize(os.path.join(results, "accuracy_vs_training_flops.png")) > 1000
  # Resumable: finished runs are skipped, not retrained.
  assert sweep.main(argv) == 0
  out = capsys.readouterr().out
  assert out.count("(done before)") == 2
  # A result written before runs recorded their dataset is redone (evaluation only).
  old = os.path.join(workdir, "dense_seed0", "result.json")
  result = json.load(open(old))
  del result["dataset"]
  json.dump(result, open(old, "w"))
  assert sweep.main(argv) == 0
  assert capsys.readouterr().out.count("(done before)") == 1
  assert json.load(open(old))["dataset"] == "digits"


def test_bad_sweep_flags_are_rejected(capsys):
  with pytest.raises(SystemExit):
    sweep.parse_args(["--algorithms=dense,lottery"])
  assert "unknown algorithm" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    sweep.parse_args(["--sparsities=0.9,1.0"])
