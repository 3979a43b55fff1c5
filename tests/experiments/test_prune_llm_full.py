"""Full-size one-shot pruning of SmolLM2-135M (slow: minutes per run on 2 CPU cores).

The protocol of docs/results/oneshot_llm.md: seqlen 128, 16 calibration + 16 evaluation segments.
"""

import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from helpers import run_prune_llm as _run  # noqa: E402

from experiments import prune_llm  # noqa: E402
from experiments.llm import data, loader  # noqa: E402

pytestmark = pytest.mark.slow


def test_fifty_percent_ranking(smollm2_dense_ppl):
  dense = smollm2_dense_ppl
  sgpt = _run("--method=sparsegpt", "--sparsity=0.5")
  wanda = _run("--method=wanda", "--sparsity=0.5")
  mag = _run("--method=magnitude", "--sparsity=0.5")
  for r in (sgpt, wanda, mag):
    assert r["sparsity"] == pytest.approx(0.5, abs=1e-3)
  assert dense < sgpt["ppl"] < wanda["ppl"] < mag["ppl"]
  assert sgpt["ppl"] <= 1.6 * dense and wanda["ppl"] <= 2.2 * dense and mag["ppl"] >= 10 * dense


def test_two_four(smollm2_dense_ppl):
  dense = smollm2_dense_ppl
  sgpt = _run("--method=sparsegpt", "--sparsity_type=2:4")
  wanda = _run("--method=wanda", "--sparsity_type=2:4")
  assert sgpt["ppl"] < wanda["ppl"] and sgpt["ppl"] <= 2.8 * dense


def test_layer_removal_influence_beats_baselines():
  infl = _run("--method=dense", "--remove_blocks=3", "--block_score=influence")["ppl"]
  last = _run("--method=dense", "--remove_blocks=3", "--block_score=last")["ppl"]
  rand = [
    _run("--method=dense", "--remove_blocks=3", "--block_score=random", f"--seed={s}")["ppl"]
    for s in range(5)
  ]
  assert infl < np.mean(rand) and infl < last


def test_saved_model_reloads_with_the_same_perplexity(tmp_path):
  r = _run("--method=wanda", "--sparsity_type=2:4", f"--out={tmp_path}")
  cfg, params = prune_llm.load_pruned(str(tmp_path))
  _, evals = data.segments(loader.load_tokenizer(), 128, 16, 16)
  fwd = prune_llm.forward_fn(cfg)
  assert data.perplexity(lambda t: fwd(params, t), evals) == pytest.approx(r["ppl"], rel=1e-4)
