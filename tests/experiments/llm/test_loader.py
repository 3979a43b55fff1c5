"""The real SmolLM2-135M GGUF: layouts, tokenizer and dense perplexity (catches RoPE layout)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from experiments.llm import data, loader  # noqa: E402
from experiments.llm import model as llm  # noqa: E402


@pytest.fixture(scope="module")
def smollm2():
  try:
    path = loader.smollm2_path()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  cfg, params = loader.load_gguf(path)
  return cfg, params, loader.load_tokenizer(path)


def test_config_and_tokenizer(smollm2):
  cfg, params, tok = smollm2
  assert cfg == llm.SMOLLM2_135M._replace(norm_eps=cfg.norm_eps)
  assert params["layers_0"]["mlp"]["down_proj"]["kernel"].shape == (1536, 576)
  assert params["layers_0"]["self_attn"]["k_proj"]["kernel"].shape == (576, 192)
  assert params["embed_tokens"]["embedding"].shape == (49152, 576)
  enc = tok.encode("def f(x):\n    return 42")
  assert enc.tokens[:2] == ["def", "Ġf"] and "4" in enc.tokens and "2" in enc.tokens
  assert tok.decode(enc.ids) == "def f(x):\n    return 42"
  assert enc.ids[0] != 1  # no BOS: add_bos_token is False for SmolLM2


def test_dense_perplexity_on_two_segments(smollm2):
  cfg, params, tok = smollm2
  _, evals = data.segments(tok, seqlen=128, n_calib=1, n_eval=2)
  fwd = jax.jit(lambda p, t: llm.LLaMA(cfg).apply({"params": p}, t))
  p = jax.tree.map(jnp.asarray, params)
  ppl = data.perplexity(lambda t: fwd(p, t), evals)
  # Measured 14-18 with the right RoPE layout; a wrong layout gives hundreds.
  assert 5.0 < ppl < 30.0, ppl
  assert np.isfinite(ppl)
