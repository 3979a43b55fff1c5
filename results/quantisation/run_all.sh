#!/usr/bin/env bash
# Every configuration of docs/results/quantisation.md: prune_llm (+ GGUF export, read back by
# the project's loader), then llama.cpp's perplexity of each exported file.
# Usage (repository root): bash results/quantisation/run_all.sh [OUT_DIR]
set -u
OUT=${1:-results/quantisation}
TMP=${TMPDIR:-/tmp}/jaxprune_gguf
mkdir -p "$OUT" "$TMP"
prune() {  # prune NAME ARGS...: the model, its export and the read-back perplexity
  local name=$1; shift
  [ -s "$OUT/$name.prune.json" ] && return
  echo "== $(date +%T) prune $name: $*" >&2
  python -m experiments.prune_llm --quiet "$@" --export="$TMP/$name.gguf" | tail -1 \
    > "$OUT/$name.prune.json.part" && mv "$OUT/$name.prune.json.part" "$OUT/$name.prune.json"
}
cross() {  # cross NAME: llama.cpp on the exported file
  local name=$1
  [ -s "$OUT/$name.llamacpp.json" ] || [ ! -f "$TMP/$name.gguf" ] && return
  echo "== $(date +%T) llama.cpp $name" >&2
  python -m experiments.llm.crosscheck --gguf="$TMP/$name.gguf" | tail -1 \
    > "$OUT/$name.llamacpp.json.part" && mv "$OUT/$name.llamacpp.json.part" "$OUT/$name.llamacpp.json"
}
[ -s "$OUT/source_q4_1.llamacpp.json" ] || \
  python -m experiments.llm.crosscheck --flax | tail -1 > "$OUT/source_q4_1.llamacpp.json"
prune sgpt50_q4_0 --method=sparsegpt --sparsity=0.5 --quant=q4_0
prune gptq_q4_0 --method=dense --quant=q4_0
prune rtn_q4_0 --method=dense --quant=q4_0 --quantizer=rtn
cross sgpt50_q4_0
cross gptq_q4_0
prune gptq_q8_0 --method=dense --quant=q8_0
prune rtn_q8_0 --method=dense --quant=q8_0 --quantizer=rtn
prune wanda50_q4_0 --method=wanda --sparsity=0.5 --quant=q4_0
prune sgpt50 --method=sparsegpt --sparsity=0.5
prune sgpt50_q8_0 --method=sparsegpt --sparsity=0.5 --quant=q8_0
prune sgpt24_q4_0 --method=sparsegpt --sparsity_type=2:4 --quant=q4_0
prune dense_f16 --method=dense
prune sgpt24 --method=sparsegpt --sparsity_type=2:4
prune sgpt24_q8_0 --method=sparsegpt --sparsity_type=2:4 --quant=q8_0
for n in rtn_q4_0 gptq_q8_0 sgpt50 wanda50_q4_0 dense_f16 rtn_q8_0 sgpt50_q8_0 sgpt24_q4_0 \
  sgpt24 sgpt24_q8_0; do cross $n; done
echo "== $(date +%T) done" >&2
