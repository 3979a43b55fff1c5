"""Shared fixtures and hypothesis profiles for the whole suite.

The layout mirrors the code: tests/jaxprune/ (with algorithms/ and oneshot/) for the library,
tests/experiments/ (with configs/, harness/ and llm/) for the experiment scripts, tests/docs/
for the documentation. Test directories have no __init__.py (pytest's default import mode),
so every test file's basename is unique across the tree; ``helpers`` imports from any
directory because this file's directory is on sys.path.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")

import pytest
from hypothesis import settings

settings.register_profile("ci", max_examples=25, deadline=None)
# HYPOTHESIS_PROFILE=slow: tests that follow the profile draw many more examples.
settings.register_profile("slow", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def smollm2_dense_ppl():
  """Perplexity of the dense SmolLM2-135M on the protocol of docs/results (slow tests)."""
  from helpers import run_prune_llm

  return run_prune_llm("--method=dense")["ppl"]
