"""experiments.toolbox: flag parsing, the collapse check and the tables' markdown."""

import jax.numpy as jnp
import pytest

from experiments import toolbox, train


def test_split_flags_and_bad_table():
  flags, rest = toolbox._split(["toolbox", "--table=dst", "--seeds=0,1", "--config=x.py"])
  assert (
    flags["table"] == "dst" and flags["seeds"] == "0,1" and rest == ["toolbox", "--config=x.py"]
  )
  with pytest.raises(train.ConfigError, match="--table"):
    toolbox._split(["toolbox", "--table=nope"])


def test_has_path_detects_a_cut_layer():
  params = {"a": jnp.ones((3, 4)), "b": jnp.ones((4, 2))}
  apply = lambda p, x: x @ p["a"] @ p["b"]
  keep = {"a": jnp.zeros((3, 4), bool).at[0, 1].set(True), "b": jnp.ones((4, 2), bool)}
  assert toolbox.has_path(apply, params, keep, (1, 3))
  cut = {"a": keep["a"], "b": jnp.ones((4, 2), bool).at[1].set(False)}
  assert not toolbox.has_path(apply, params, cut, (1, 3))


def test_markdown_tables():
  rows = [
    {"method": m, "sparsity": s, "seed": 0, "test_accuracy": 0.5, "collapsed": m == "random"}
    for m in ("snip", "grasp", "synflow", "magnitude", "random")
    for s in (0.9, 0.999)
  ]
  text = toolbox.markdown("at_init", rows)
  assert "| method | 90% | 99.9% |" in text and "(collapsed 1/1)" in text
  rows = [{"variant": "dense", "seed": 0, "test_accuracy": 0.8}]
  rows.append({"variant": "sr_ste_2:4", "seed": 0, "test_accuracy": 0.7, "nm_exact": True})
  assert "| sr_ste_2:4 | 0.7000 | yes |" in toolbox.markdown("sr_ste", rows)


def test_regrowth_table_and_median_active_magnitude():
  params = {"Dense_0": {"kernel": jnp.array([[0.0, -3.0], [1.0, 0.0]]), "bias": jnp.ones(2)}}
  assert toolbox.median_active_magnitude(params) == {"Dense_0/kernel": 2.0}
  assert toolbox.median_active_magnitude({"k": jnp.zeros((2, 2))}) == {"k": 0.0}
  rows = [
    {
      "algorithm": "set",
      "grow_init": grow,
      "drop_schedule": "constant",
      "sparsity": 0.98,
      "seed": seed,
      "test_accuracy": acc,
      "median_active_abs_w": {"Dense_0/kernel": med},
    }
    for grow, seed, acc, med in (
      ("random", 0, 0.1, 100.0),
      ("random", 1, 0.3, 50.0),
      (0.05, 0, 0.8, 0.3),
    )
  ]
  text = toolbox.markdown("regrowth", rows).splitlines()
  assert text[0].startswith("| algorithm | grow_init | drop_schedule | sparsity | test accuracy |")
  assert text[2] == "| set | random | constant | 98% | 0.2000 ± 0.1000 | 75 |"
  assert text[3] == "| set | 0.05 | constant | 98% | 0.8000 | 0.3 |"
  flags, _ = toolbox._split(["toolbox", "--table=regrowth"])
  assert flags["table"] == "regrowth"
