"""experiments.fan_in: the fan-in statistics of a mask."""

import numpy as np
import pytest


def test_fan_in_stats_of_a_hand_mask():
  from experiments.fan_in import fan_in_stats

  mask = np.zeros((10, 4), bool)
  mask[:, 0] = True  # a hub: 10 inputs
  mask[:2, 1:] = True  # three units with 2 inputs each
  s = fan_in_stats(mask)
  assert (s["min"], s["median"], s["max"]) == (2, 2.0, 10)
  assert s["top10_share"] == pytest.approx(10 / 16)
  assert s["cv"] == pytest.approx(np.std([10, 2, 2, 2]) / 4.0)
