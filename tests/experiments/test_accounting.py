"""experiments.accounting: a run's inference and training FLOPs from its result and config."""

import pytest


def test_run_figures_of_the_rigl_protocol_config():
  from experiments import accounting
  from experiments.configs import fmnist_cnn_rigl_protocol

  config = fmnist_cnn_rigl_protocol.get_config()
  sparse = {"Conv_1/kernel": 0.9, "Dense_0/kernel": 0.9}  # ERK leaves the others dense.
  out = accounting.from_result({"layer_sparsity": sparse}, config)
  conv0, conv1 = 2 * 28 * 28 * 32 * 9, 2 * 14 * 14 * 64 * 9 * 32
  dense0, dense1 = 2 * 7 * 7 * 64 * 128, 2 * 128 * 10
  f_d = conv0 + conv1 + dense0 + dense1
  f_s = conv0 + conv1 * 1843 / 18432 + dense0 * 40141 / 401408 + dense1
  assert out["inference_flops_dense"] == f_d
  assert out["inference_flops_sparse"] == pytest.approx(f_s)
  # 469 steps of 128, RigL's updates at steps 100, 200 and 300 (end at 75%: 351).
  assert out["training_flops"] == pytest.approx(128 * (3 * f_s * 469 - 3 * f_s + 3 * f_d))
  assert out["training_flops_dense"] == 128 * 3 * f_d * 469
  assert out["training_flops_ratio"] == pytest.approx(out["training_flops"] / (128 * 3 * f_d * 469))
