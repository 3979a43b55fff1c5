"""Moved to `experiments.harness.sharding`; this module name stays importable."""

import sys

from experiments.harness import sharding

sys.modules[__name__] = sharding
