"""Markdown table of the JSON lines written by run_all.sh (python results/quantisation/table.py)."""

import json
import pathlib
import sys

HERE = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).parent)
ROWS = [  # (name, label)
  ("dense_f16", "dense, F16 export"),
  ("rtn_q8_0", "RTN Q8_0"),
  ("gptq_q8_0", "GPTQ Q8_0"),
  ("rtn_q4_0", "RTN Q4_0"),
  ("gptq_q4_0", "GPTQ Q4_0"),
  ("sgpt50", "SparseGPT 50%, F16 export"),
  ("sgpt50_q8_0", "SparseGPT 50% + Q8_0 (joint)"),
  ("sgpt50_q4_0", "SparseGPT 50% + Q4_0 (joint)"),
  ("sgpt24", "SparseGPT 2:4, F16 export"),
  ("sgpt24_q8_0", "SparseGPT 2:4 + Q8_0 (joint)"),
  ("sgpt24_q4_0", "SparseGPT 2:4 + Q4_0 (joint)"),
  ("wanda50_q4_0", "Wanda 50% + GPTQ Q4_0"),
]


def load(name):
  p = HERE / name
  return json.loads(p.read_text()) if p.exists() and p.stat().st_size else None


def main():
  print(
    "| model | sparsity | file MB | Flax in memory | Flax read back | read-back diff "
    "| llama.cpp | llama.cpp diff |"
  )
  print("|---|---|---|---|---|---|---|---|")
  src = load("source_q4_1.llamacpp.json")
  if src:
    print(
      f"| source Q4_1 (the wheel's file) | 0 | {src['file_bytes'] / 1e6:.1f} | "
      f"{src['flax_ppl']:.2f} | (loader) | | {src['llamacpp_ppl']:.2f} | "
      f"{100 * src['rel_diff']:+.2f}% |"
    )
  for name, label in ROWS:
    r = load(f"{name}.prune.json")
    if r is None:
      print(f"| {label} | not run | | | | | | |")
      continue
    c = load(f"{name}.llamacpp.json")
    rb = 100 * (r["export_ppl"] / r["ppl"] - 1)
    cc = "not run | "
    if c is not None:
      cc = f"{c['llamacpp_ppl']:.2f} | {100 * (c['llamacpp_ppl'] / r['export_ppl'] - 1):+.2f}%"
    print(
      f"| {label} | {r['sparsity']:.3f} | {r['export_bytes'] / 1e6:.1f} | {r['ppl']:.2f} | "
      f"{r['export_ppl']:.2f} | {rb:+.3f}% | {cc} |"
    )


if __name__ == "__main__":
  main()
