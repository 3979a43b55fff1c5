"""experiments.shrink on the offline digits: the CLI, resume across a compaction, devices."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import jaxprune
from experiments import checkpoint as ckpt
from experiments import sharding as shd
from experiments import shrink, train

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CONFIG = os.path.join(REPO, "experiments", "configs", "fmnist_cnn.py")
# A 4-8-16-10 CNN, 40 steps; pruning 4..24 every 5 steps, compactions after 15 and 25.
TINY = [
  f"--config={CONFIG}",
  "--config.dataset=digits",
  "--config.model_kwargs.channels=(4,8)",
  "--config.model_kwargs.hidden=16",
  "--config.batch_size=32",
  "--config.steps=40",
  "--config.update_every=5",
  "--config.checkpoint_every=1000",
  "--compact_at=0.5,1.0",
]
# The same on a 784-16-8-10 MLP, 30 steps; pruning 3..18 every 3 steps, compactions after 10
# and 19 (cheap to compile: the fast resume test).
MLP_CONFIG = os.path.join(REPO, "experiments", "configs", "fmnist_mlp.py")
TINY_MLP = [
  f"--config={MLP_CONFIG}",
  "--config.dataset=digits",
  "--config.model_kwargs.features=(16,8)",
  "--config.batch_size=32",
  "--config.steps=30",
  "--config.update_every=3",
  "--config.checkpoint_every=1000",
  "--compact_at=0.5,1.0",
]
KEYS = {
  "dense_accuracy",
  "shrink_accuracy",
  "dense_wall_s",
  "shrink_wall_s",
  "speedup_wall",
  "dense_compile_s",
  "shrink_compile_s",
  "final_params_ratio",
  "inference_speedup",
  "compactions",
  "speedup_after_last_compaction",
  "ideal_speedup_flops",
}


def _main(capsys, *argv):
  code = shrink.main(["prog", *argv])
  return code, capsys.readouterr()


def test_cli_prints_json_and_shrinks(capsys):
  code, out = _main(capsys, *TINY, "--chunk=10", "--rounds=2")
  assert code == 0, out.err[-3000:]
  result = json.loads(out.out.strip().splitlines()[-1])
  assert KEYS <= set(result)
  assert result["score"] == "magnitude"
  assert result["schedule"] == [4, 24] and result["update_every"] == 5
  assert [c["step"] for c in result["compactions"]] == [15, 25]
  assert result["widths_before"] == [4, 8, 16]
  # 75% of the units of every hidden layer are gone: 4 - 3, 8 - 6, 16 - 12.
  assert result["widths_after"] == [1, 2, 4]
  assert result["final_params_ratio"] < 0.5
  assert result["compactions"][-1]["masks_dropped"] is True


def test_cli_skip_dense_trains_only_the_shrink_run_with_bn_scale_scores(capsys):
  code, out = _main(capsys, *TINY, "--chunk=10", "--rounds=1", "--skip_dense", "--score=bn_scale")
  assert code == 0, out.err[-3000:]
  result = json.loads(out.out.strip().splitlines()[-1])
  assert result["score"] == "bn_scale" and result["skip_dense"] is True
  for key in ("dense_accuracy", "dense_wall_s", "speedup_wall", "speedup_after_last_compaction"):
    assert result[key] is None, key
  assert 0.0 <= result["shrink_accuracy"] <= 1.0
  assert result["widths_after"] == [1, 2, 4] and result["final_params_ratio"] < 0.5
  assert "dense" not in out.out.split("[shrink] step 40:")[1].splitlines()[0]


def test_cli_conv_layers_shrink_channels_and_keep_the_dense_hidden_layer(capsys):
  code, out = _main(capsys, *TINY, "--chunk=10", "--rounds=1", "--skip_dense", "--layers=conv")
  assert code == 0, out.err[-3000:]
  result = json.loads(out.out.strip().splitlines()[-1])
  assert result["layers"] == "conv"
  assert result["widths_before"] == [4, 8, 16]
  assert result["widths_after"] == [1, 2, 16]  # the Dense 16 keeps every unit
  assert [c["step"] for c in result["compactions"]] == [15, 25]
  # The conv layers' channels, and the Dense kernel's rows that read them, are gone.
  assert 0.1 < result["final_params_ratio"] < 0.5


def test_cli_global_ranking_keeps_a_quarter_of_all_conv_channels(capsys, tmp_path):
  argv = [*TINY, "--chunk=10", "--rounds=1", "--layers=conv", "--score=bn_scale"]
  workdir = f"--workdir={tmp_path}"
  code, out = _main(capsys, *argv, "--skip_dense", "--ranking=global", workdir)
  assert code == 0, out.err[-3000:]
  result = json.loads(out.out.strip().splitlines()[-1])
  assert result["ranking"] == "global" and "global ranking by bn_scale" in out.out
  conv = result["widths_after"][:2]
  # One threshold over the 4 + 8 channels: 12 - floor(0.75 * 12) = 3 kept, >= 1 per conv.
  assert sum(conv) == 3 and min(conv) >= 1, conv
  assert result["widths_after"][2] == 16
  assert [c["step"] for c in result["compactions"]] == [15, 25]
  # The finished run's checkpoint is refused by a per-layer run, naming the ranking.
  code, out = _main(capsys, *argv, "--skip_dense", "--ranking=layer", workdir)
  assert code == 2
  assert "'ranking': 'global'" in out.err and "--ranking" in out.err, out.err[-2000:]


def test_cli_taylor_scores_rank_every_hidden_unit_on_one_threshold(capsys):
  # Taylor estimates are loss changes, comparable across layers (no BatchNorm needed:
  # the Dense hidden layer takes part in the ranking).
  argv = [*TINY, "--chunk=10", "--rounds=1", "--score=taylor", "--ranking=global"]
  code, out = _main(capsys, *argv, "--skip_dense")
  assert code == 0, out.err[-3000:]
  result = json.loads(out.out.strip().splitlines()[-1])
  assert result["score"] == "taylor" and "global ranking by taylor" in out.out
  # One threshold over the 4 + 8 + 16 hidden units: 28 - floor(0.75 * 28) = 7 kept.
  widths = result["widths_after"]
  assert sum(widths) == 7 and min(widths) >= 1, widths
  assert [c["step"] for c in result["compactions"]] == [15, 25]


def test_cli_keep_whole_spares_the_first_conv(capsys):
  argv = [*TINY, "--chunk=10", "--rounds=1", "--skip_dense", "--layers=conv"]
  code, out = _main(capsys, *argv, "--keep_whole=Conv_0")
  assert code == 0, out.err[-3000:]
  result = json.loads(out.out.strip().splitlines()[-1])
  assert result["keep_whole"] == ["Conv_0"] and "conv layers but Conv_0" in out.out
  assert result["widths_after"] == [4, 2, 16]  # only the second conv loses 75%
  assert [c["step"] for c in result["compactions"]] == [15, 25]


@pytest.mark.parametrize(
  "extra, message",
  [
    (
      ["--keep_whole=Dense_0"],
      "--keep_whole='Dense_0' is not one of the layers --layers=conv shrinks: Conv_0, Conv_1",
    ),
    (["--keep_whole=Conv_0,Conv_1"], "--keep_whole keeps every layer --layers=conv would shrink"),
  ],
)
def test_cli_keep_whole_names_a_layer_that_is_not_shrunk(capsys, extra, message):
  code, out = _main(capsys, *TINY, "--layers=conv", *extra)
  assert code == 2
  assert message in out.err, out.err[-2000:]


def test_cli_layer_targets_split_the_channels_by_hand_and_are_part_of_the_recipe(capsys, tmp_path):
  argv = [*TINY, "--chunk=10", "--rounds=1", "--skip_dense", "--layers=conv"]
  workdir = f"--workdir={tmp_path}"
  code, out = _main(capsys, *argv, "--layer_targets=Conv_0=0.5,Conv_1=0.875", workdir)
  assert code == 0, out.err[-3000:]
  result = json.loads(out.out.strip().splitlines()[-1])
  assert result["layer_targets"] == {"Conv_0": 0.5, "Conv_1": 0.875}
  assert "with Conv_0 0.5, Conv_1 0.875" in out.out
  assert result["widths_after"] == [2, 1, 16]  # 4 * (1 - 0.5), 8 * (1 - 0.875); Dense kept
  assert [c["step"] for c in result["compactions"]] == [15, 25]
  # A run with the uniform split refuses the finished run's checkpoint, naming the flag.
  code, out = _main(capsys, *argv, workdir)
  assert code == 2
  assert "'layer_targets': {'Conv_0': 0.5, 'Conv_1': 0.875}" in out.err, out.err[-2000:]
  assert "--layer_targets or --taylor_momentum differ" in out.err


@pytest.mark.parametrize(
  "extra, message",
  [
    (
      ["--layer_targets=Dense_0=0.5"],
      "--layer_targets: 'Dense_0' is not one of the layers this run shrinks (--layers=conv): "
      "Conv_0, Conv_1",
    ),
    (["--layer_targets=Conv_0=1"], "--layer_targets: Conv_0=1.0 must be in (0, 1)"),
    (["--layer_targets=Conv_0"], "expected comma-separated LAYER=FRACTION, got 'Conv_0'"),
    (["--layer_targets=Conv_0=half"], "got 'Conv_0=half'"),
    (["--layer_targets=Conv_0=0.5,Conv_0=0.6"], "'Conv_0' is given twice"),
    (
      ["--layer_targets=Conv_0=0.5", "--score=taylor", "--ranking=global"],
      "--layer_targets sets each named layer's fraction: it needs --ranking=layer",
    ),
  ],
)
def test_cli_layer_targets_name_the_bad_layer_or_value(capsys, extra, message):
  code, out = _main(capsys, *TINY, "--layers=conv", *extra)
  assert code == 2
  assert message in out.err, out.err[-2000:]


@pytest.mark.parametrize(
  "extra, message",
  [
    (
      ["--layers=conv"],
      "--ranking=global needs --score=bn_scale, taylor or taylor_mean (got --score=magnitude)",
    ),
    (["--score=bn_scale"], "layer 'Dense_0' has no BatchNorm scale after it"),
  ],
)
def test_cli_global_ranking_needs_batchnorm_scales(capsys, extra, message):
  code, out = _main(capsys, *TINY, "--ranking=global", *extra)
  assert code == 2
  assert message in out.err, out.err[-2000:]


def test_cli_bn_l1_adds_network_slimming_penalty_and_is_part_of_the_recipe(capsys, tmp_path):
  argv = [*TINY, "--chunk=10", "--rounds=1", "--layers=conv", "--score=bn_scale", "--skip_dense"]
  workdir = f"--workdir={tmp_path}"
  code, out = _main(capsys, *argv, "--ranking=global", "--bn_l1=0.01", workdir)
  assert code == 0, out.err[-3000:]
  result = json.loads(out.out.strip().splitlines()[-1])
  assert result["bn_l1"] == 0.01 and "L1 0.01 on BatchNorm scales" in out.out
  conv = result["widths_after"][:2]
  assert sum(conv) == 3 and min(conv) >= 1, conv
  # The finished run's checkpoint is refused by a run without the penalty, naming it.
  code, out = _main(capsys, *argv, "--ranking=global", workdir)
  assert code == 2
  assert "'bn_l1': 0.01" in out.err and "--bn_l1" in out.err, out.err[-2000:]


@pytest.mark.parametrize(
  "extra, message",
  [
    (["--layers=conv", "--bn_l1=1e-4"], "--bn_l1=0.0001 penalises the BatchNorm scales"),
    (["--score=bn_scale", "--bn_l1=1e-4"], "--bn_l1=0.0001: layer 'Dense_0' has no BatchNorm"),
    (["--bn_l1=-1"], "--bn_l1 must be >= 0, got -1.0"),
    (["--taylor_momentum=0.9"], "--taylor_momentum=0.9 averages the window means"),
    (["--score=taylor_mean", "--taylor_momentum=1"], "--taylor_momentum must be in [0, 1)"),
  ],
)
def test_cli_bn_l1_needs_batchnorm_scales_that_rank_units(capsys, extra, message):
  code, out = _main(capsys, *TINY, *extra)
  assert code == 2
  assert message in out.err, out.err[-2000:]


def test_bn_l1_penalty_acts_on_the_pruned_layers_batchnorm_scales_while_pruning_runs():
  args, config = shrink.parse_args(["prog", *TINY])
  params = shrink.models.init_variables(
    shrink.models.get_model(config, num_classes=10),
    jax.random.PRNGKey(0),
    shrink.data.input_shape(config),
  )["params"]
  params = jax.tree.map(lambda x: x - 0.5, params)  # scales of both signs
  kw = dict(score="bn_scale", layers="conv", keep_whole=("Conv_0",))
  plain = shrink.shrink_algorithm(config, params, 0.75, args.schedule, "channel", **kw)
  assert shrink.bn_l1_penalty(plain) is None
  algo = shrink.shrink_algorithm(config, params, 0.75, args.schedule, "channel", bn_l1=0.5, **kw)
  assert algo.config["bn_l1_layers"] == ["BatchNorm_1"]  # after Conv_1 only
  penalty = shrink.bn_l1_penalty(algo)
  zeros = jax.tree.map(np.zeros_like, params)
  state = penalty.init(params)
  end = int(algo.config["end_step"])
  for count, lam in ((0, 0.5), (end - 1, 0.5), (end, 0.0)):
    added, _ = penalty.update(zeros, state._replace(count=np.int32(count)), params)
    want = jax.tree.map(np.zeros_like, params)
    want["BatchNorm_1"]["scale"] = lam * np.sign(params["BatchNorm_1"]["scale"])
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(added)[0], jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"{count} {path}")


def test_cli_steps_factor_trains_the_shrink_run_longer_and_leaves_dense_alone(capsys):
  code, out = _main(capsys, *TINY_MLP, "--chunk=7", "--rounds=1")
  assert code == 0, out.err[-3000:]
  plain = json.loads(out.out.strip().splitlines()[-1])
  code, out = _main(capsys, *TINY_MLP, "--chunk=7", "--rounds=1", "--steps_factor=2")
  assert code == 0, out.err[-3000:]
  longer = json.loads(out.out.strip().splitlines()[-1])
  assert (plain["steps"], plain["shrink_steps"]) == (30, 30)
  assert (longer["steps"], longer["shrink_steps"]) == (30, 60)
  # The pruning schedule (10% to 60%) and the compactions follow the shrink run's steps.
  assert plain["schedule"] == [3, 18] and longer["schedule"] == [6, 36]
  assert longer["compactions"][-1]["step"] > 30
  assert longer["compactions"][-1]["masks_dropped"] is True
  assert longer["widths_after"] == plain["widths_after"] == [4, 2]
  # Dense trains its own 30 steps either way: the same accuracy to the digit.
  assert longer["dense_accuracy"] == plain["dense_accuracy"]
  # Twice the shrink run's steps against the same dense run: a lower FLOP ratio.
  assert 0.0 < longer["ideal_speedup_flops"] < plain["ideal_speedup_flops"]


def test_cli_steps_factor_resumes_across_a_compaction_and_refuses_another_factor(capsys, tmp_path):
  argv = [*TINY_MLP, "--chunk=7", "--rounds=1", "--steps_factor=2"]
  code, out = _main(capsys, *argv, f"--workdir={tmp_path / 'straight'}")
  assert code == 0, out.err[-3000:]
  straight = json.loads(out.out.strip().splitlines()[-1])
  first, second = (c["step"] for c in straight["compactions"])
  workdir = f"--workdir={tmp_path / 'stopped'}"
  code, out = _main(capsys, *argv, workdir, f"--stop_at={first + 2}")
  assert code == 0, out.err[-3000:]
  assert f"[shrink] stopped at step {first + 2}" in out.out
  # The checkpoint of the 60-step shrink run is refused by a 30-step one (the MLP's
  # constant learning rate lets `steps` change; its pruning schedule may not).
  code, out = _main(capsys, *TINY_MLP, "--chunk=7", "--rounds=1", workdir)
  assert code == 2
  assert "'start_step': 6" in out.err and "'start_step': 3" in out.err, out.err[-2000:]
  assert "--steps_factor" in out.err
  code, out = _main(capsys, *argv, workdir)
  assert code == 0, out.err[-3000:]
  resumed = json.loads(out.out.strip().splitlines()[-1])
  assert [c["step"] for c in resumed["compactions"]] == [second]
  for key in ("shrink_accuracy", "widths_after", "shrink_steps", "dense_accuracy"):
    assert resumed[key] == straight[key], key


@pytest.mark.parametrize("factor", ["0", "-1", "0.001"])
def test_cli_rejects_a_steps_factor_without_steps(capsys, factor):
  code, out = _main(capsys, *TINY_MLP, f"--steps_factor={factor}")
  assert code == 2
  assert "--steps_factor must be > 0" in out.err


def test_cli_conv_layers_need_a_conv_model(capsys):
  code, out = _main(capsys, *TINY_MLP, "--layers=conv")
  assert code == 2
  assert "--layers=conv: the model has no hidden Conv layer" in out.err


def test_cli_rejects_compaction_before_the_schedule(capsys):
  code, out = _main(capsys, *TINY, "--compact_at=0.0,0.5")
  assert code == 2
  assert "compact_at=0.0 is at or before the pruning schedule starts" in out.err


def test_cli_rejects_a_model_compact_cannot_handle(capsys):
  config = os.path.join(REPO, "experiments", "configs", "cifar10_resnet18.py")
  code, out = _main(capsys, f"--config={config}", "--config.steps=20")
  assert code == 2
  assert "error: compact:" in out.err and "'BasicBlock_0' is not an auto-named" in out.err, out.err


def _setup(argv, **algorithm_kwargs):
  args, config = shrink.parse_args(["prog", *argv])
  mesh = shd.make_mesh(False, devices=jax.devices()[:1])
  source = train.load_split(config, "train")
  params = shrink.models.init_variables(
    shrink.models.get_model(config, num_classes=source.num_classes),
    jax.random.PRNGKey(0),
    shrink.data.input_shape(config),
  )["params"]
  algo = shrink.shrink_algorithm(
    config, params, args.target, args.schedule, args.sparsity_type, **algorithm_kwargs
  )
  steps = shrink.shrink.compaction_steps(algo, args.compact_at, int(config.steps))
  return config, mesh, source, algo, steps


def _assert_resume_is_bit_identical(
  tmp_path, argv, stop_at, until, check_recipe=False, on_restore=None, **algorithm_kwargs
):
  """Stops after the first compaction, resumes, and compares with a straight run.
  `on_restore(saved, restored)` gets the state at the stop and the restored one."""
  config, mesh, source, algo, steps = _setup(argv, **algorithm_kwargs)
  assert steps[0] < stop_at < steps[1] <= until
  straight = shrink.Run("shrink", config, mesh, source, algo, steps)
  straight.advance(until)

  first = shrink.Run("shrink", config, mesh, source, algo, steps, ckpt.Checkpointer(str(tmp_path)))
  first.advance(until, stop_at=stop_at)  # after the first compaction
  assert first.step == stop_at and len(first.compactions) == 1
  first.checkpointer.close()
  resumed = shrink.Run(
    "shrink", config, mesh, source, algo, steps, ckpt.Checkpointer(str(tmp_path))
  )
  assert resumed.step == stop_at
  assert resumed.index.to_json() == first.index.to_json()
  if on_restore is not None:
    on_restore(jax.device_get(first.state), jax.device_get(resumed.state))
  resumed.advance(until)
  resumed.checkpointer.close()
  assert len(resumed.compactions) == 1  # the second one
  if check_recipe:  # a checkpoint of another recipe is refused
    other = algo._replace(config={**algo.config, "sparsity": 0.5})
    with pytest.raises(ckpt.ConfigMismatchError, match="sparsity"):
      shrink.Run("shrink", config, mesh, source, other, steps, ckpt.Checkpointer(str(tmp_path)))
  a, b = jax.device_get(straight.state), jax.device_get(resumed.state)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  assert resumed.index.to_json() == straight.index.to_json()
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  return b


def test_resume_after_a_compaction_is_bit_identical_mlp(tmp_path):
  _assert_resume_is_bit_identical(tmp_path, TINY_MLP, stop_at=12, until=24)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_resume_with_taylor_mean_scores_is_bit_identical_mlp(tmp_path, momentum):
  # Stopped after 12 steps, inside a window: the sums of squared estimates hold the
  # batches of steps 10 and 11 (mask updates every 3 steps) and must be restored, with
  # momentum also the moving average of the window means of the updates so far.
  is_avg = lambda x: isinstance(x, jaxprune.shrink.TaylorAverageState)  # noqa: E731

  def sums(state):
    found = [x for x in jax.tree.leaves(state.opt_state, is_leaf=is_avg) if is_avg(x)]
    assert len(found) == 1
    return found[0]

  def on_restore(saved, restored):
    a, b = sums(saved), sums(restored)
    assert int(a.batches) == int(b.batches) == 2
    assert all(np.any(np.asarray(v) > 0) for v in a.total.values())
    for k in a.total:
      np.testing.assert_array_equal(np.asarray(b.total[k]), np.asarray(a.total[k]), err_msg=k)
    if not momentum:
      assert a.averaged is None and b.averaged is None
      return
    assert int(a.decided) == int(b.decided) == 3  # mask updates at counts 3, 6, 9
    assert all(np.any(np.asarray(v) > 0) for v in a.averaged.values())
    for k in a.averaged:
      np.testing.assert_array_equal(np.asarray(b.averaged[k]), np.asarray(a.averaged[k]))

  _assert_resume_is_bit_identical(
    tmp_path,
    TINY_MLP,
    stop_at=12,
    until=24,
    on_restore=on_restore,
    score="taylor_mean",
    taylor_momentum=momentum,
  )
  if momentum:  # a checkpoint of another momentum is refused, naming the flag
    config, mesh, source, algo, steps = _setup(TINY_MLP, score="taylor_mean")
    with pytest.raises(ckpt.ConfigMismatchError, match="taylor_momentum"):
      shrink.Run("shrink", config, mesh, source, algo, steps, ckpt.Checkpointer(str(tmp_path)))


@pytest.mark.slow
def test_resume_after_a_compaction_is_bit_identical_cnn(tmp_path):
  _assert_resume_is_bit_identical(tmp_path, TINY, stop_at=17, until=30, check_recipe=True)


@pytest.mark.slow
def test_resume_with_the_bn_l1_penalty_is_bit_identical_cnn(tmp_path):
  # The penalty's step count (its schedule) is part of the optimizer state that resumes.
  kw = dict(score="bn_scale", layers="conv", ranking="global", bn_l1=0.01)
  state = _assert_resume_is_bit_identical(tmp_path, TINY, stop_at=17, until=30, **kw)
  is_l1 = lambda x: isinstance(x, jaxprune.regularizers.L1SubgradientState)
  found = [x for x in jax.tree.leaves(state.opt_state, is_leaf=is_l1) if is_l1(x)]
  assert len(found) == 1 and int(found[0].count) == 30  # in the step, also after masks dropped


MULTI = r"""
import jax, numpy as np
from experiments import shrink, train
from experiments import sharding as shd
from tests.experiments.test_shrink_cli import TINY, _setup
assert jax.device_count() == 8
config, _, source, algo, steps = _setup(TINY)
runs = {}
for name, devices in (("one", jax.devices()[:1]), ("eight", jax.devices())):
  mesh = shd.make_mesh(False, devices=devices)
  run = shrink.Run("shrink", config, mesh, source, algo, steps)
  run.advance(30)
  runs[name] = run
state = runs["eight"].state
assert len(runs["eight"].compactions) == 2
pdef = jax.tree.structure(state.params)
shardings = {tuple(np.shape(p)): p.sharding for p in jax.tree.leaves(state.params)}
for leaf in jax.tree.leaves(state.opt_state):
  if np.ndim(leaf) > 0:
    assert len(leaf.sharding.device_set) == 8
    assert leaf.sharding.is_equivalent_to(shardings[tuple(np.shape(leaf))], np.ndim(leaf))
for p in jax.tree.leaves(state.params):
  assert len(p.sharding.device_set) == 8
a, b = jax.device_get(runs["one"].state.params), jax.device_get(state.params)
for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
  np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-5)
print("ok")
"""


@pytest.mark.slow
def test_eight_devices_match_one_device():
  out = subprocess.run(
    [sys.executable, "-c", MULTI],
    cwd=REPO,
    env={
      **os.environ,
      "PYTHONPATH": REPO,
      "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
    },
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
