"""Moved to `experiments.harness.result`; this module name stays importable."""

import sys

from experiments.harness import result

sys.modules[__name__] = result
