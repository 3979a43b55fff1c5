"""Moved to `experiments.harness.checkpoint`; this module name stays importable."""

import sys

from experiments.harness import checkpoint

sys.modules[__name__] = checkpoint
