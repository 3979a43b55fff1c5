"""SmolLM2-135M quantised, pruned, exported to GGUF and read back by the project's loader and by
llama.cpp (slow: minutes per run on 2 CPU cores). The protocol of docs/results/quantisation.md."""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from helpers import run_prune_llm as _run  # noqa: E402

from experiments.llm import loader  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def joint_q4_0(tmp_path_factory):
  path = tmp_path_factory.mktemp("gguf") / "sparsegpt50_q4_0.gguf"
  return path, _run("--method=sparsegpt", "--sparsity=0.5", "--quant=q4_0", f"--export={path}")


def test_joint_q4_0_export_reads_back(joint_q4_0):
  path, r = joint_q4_0
  assert r["export_bytes"] == path.stat().st_size and r["quant"] == "q4_0"
  assert r["sparsity"] == pytest.approx(0.5, abs=1e-3)
  assert r["export_ppl"] == pytest.approx(r["ppl"], rel=0.005)
  reader = gguf.GGUFReader(str(path))
  types = {t.name: t.tensor_type.name for t in reader.tensors}
  assert types["blk.7.ffn_up.weight"] == "Q4_0" and types["token_embd.weight"] == "Q8_0"
  _, params = loader.load_gguf(path)
  for i in (0, 29):
    k = params[f"layers_{i}"]["mlp"]["down_proj"]["kernel"]
    assert np.mean(k == 0.0) >= 0.5  # the pruned half reads back exactly 0


def test_gptq_q4_0_beats_rtn_and_stays_near_dense(smollm2_dense_ppl):
  dense = smollm2_dense_ppl
  gptq = _run("--method=dense", "--quant=q4_0")["ppl"]
  rtn = _run("--method=dense", "--quant=q4_0", "--quantizer=rtn")["ppl"]
  assert gptq <= rtn and gptq <= 1.15 * dense


def test_llamacpp_agrees_with_the_flax_model(joint_q4_0):
  try:
    import llama_cpp  # noqa: F401
  except ImportError:
    pytest.skip("llama-cpp-python is not installed (optional extra llamacpp; docs/gguf_export.md)")
  from experiments.llm import crosscheck

  path, r = joint_q4_0
  out = crosscheck.run(crosscheck.parse_args([f"--gguf={path}"]))
  assert out["llamacpp_ppl"] == pytest.approx(r["export_ppl"], rel=0.03)
