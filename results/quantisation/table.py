"""Markdown tables of the JSON lines written by run_all.sh.

    python results/quantisation/table.py            # the main table (results/quantisation/*.json)
    python results/quantisation/table.py --rules    # int4 rows: ggml's scale rule against absmax

The int4 (Q4_0) rows of the main table use ggml's scale rule (the default); the same rows
with the ``absmax`` rule (``max|w| / 7``) are kept in ``results/quantisation/absmax/``.
"""

import json
import pathlib
import sys

ARGS = [a for a in sys.argv[1:] if not a.startswith("--")]
HERE = pathlib.Path(ARGS[0] if ARGS else pathlib.Path(__file__).parent)
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


INT4 = [(n, label) for n, label in ROWS if n.endswith("q4_0")]


def load(name, where=None):
  p = (where or HERE) / name
  return json.loads(p.read_text()) if p.exists() and p.stat().st_size else None


def rules():
  """The int4 rows under both scale rules, with the unquantised reference of each."""
  ref = {"rtn_q4_0": "dense_f16", "gptq_q4_0": "dense_f16", "sgpt50_q4_0": "sgpt50"}
  ref.update({"sgpt24_q4_0": "sgpt24", "wanda50_q4_0": None})
  print(
    "| model | absmax (max\\|w\\|/7) | ggml (signed max/-8) | ggml / absmax "
    "| reference (no quantisation) | absmax ratio | ggml ratio |"
  )
  print("|---|---|---|---|---|---|---|")
  for name, label in INT4:
    a, g = load(f"{name}.prune.json", HERE / "absmax"), load(f"{name}.prune.json")
    r = load(f"{ref[name]}.prune.json") if ref[name] else None
    fa = f"{a['ppl']:.2f}" if a else "not run"
    fg = f"{g['ppl']:.2f}" if g else "not run"
    both = f"{g['ppl'] / a['ppl']:.3f}" if a and g else ""
    rp = f"{r['ppl']:.2f}" if r else "n/a"
    ra = f"{a['ppl'] / r['ppl']:.3f}x" if a and r else ""
    rg = f"{g['ppl'] / r['ppl']:.3f}x" if g and r else ""
    print(f"| {label} | {fa} | {fg} | {both} | {rp} | {ra} | {rg} |")


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
  rules() if "--rules" in sys.argv[1:] else main()
