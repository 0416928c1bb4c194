#!/usr/bin/env bash
# Decode and prefill of every GGML type kept packed (`--quant keep`) beside llama.cpp on the same
# file: SmolLM2-135M requantized by llama-quantize into each type.
# Usage: kept_types.sh TRTLLM_BIN F32_GGUF LLAMA_BUILD_BIN_DIR OUTDIR [TYPES...]
# (F32_GGUF: e.g. the smol-F32.gguf that ../shared/tools/side-by-side.sh makes.)
set -euo pipefail
B=$1; G=$2; L=$3; O=$4; shift 4
TYPES=${*:-Q8_0 Q6_K Q5_K Q5_1 Q5_0 Q4_K Q4_1 Q4_0 IQ4_XS IQ4_NL Q3_K Q2_K}
T=2
mkdir -p "$O"
echo "| type | file MB | engine MB | trtllm decode | llama.cpp decode | ratio | trtllm prefill512 | llama.cpp pp512 | ratio |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
for t in $TYPES; do
  f="$O/smol-$t.gguf"; e="$O/e-keep-$t"
  # llama-quantize's Q2_K and Q3_K mixes give every tensor those types could hold a larger type
  # on SmolLM2 (its 576-wide matrices take 32-value fallbacks anyway); --pure keeps them.
  pure=""; case $t in Q2_K|Q3_K*) pure=--pure;; esac
  [ -f "$f" ] || "$L/llama-quantize" $pure "$G" "$f" "$t" >/dev/null 2>&1
  [ -d "$e" ] || "$B" build --checkpoint "$f" --output "$e" --quant keep --max-batch-size 8 --max-seq-len 1024 >/dev/null 2>&1
  d=$("$B" bench latency --model "$e" --input-len 8 --output-len 128 --num-requests 3 --disable-block-reuse --json 2>/dev/null | python3 -c 'import json,sys; r=json.load(sys.stdin); print("%.1f" % (1000/r["tpot_ms"]["p50"]))')
  p=$("$B" bench latency --model "$e" --input-len 512 --output-len 1 --num-requests 3 --disable-block-reuse --json 2>/dev/null | python3 -c 'import json,sys; r=json.load(sys.stdin); print("%.1f" % (512000/r["ttft_ms"]["p50"]))')
  read -r ld lp < <("$L/llama-bench" -m "$f" -t $T -p 512 -n 128 -r 3 -o json 2>/dev/null | python3 -c '
import json,sys; r=json.load(sys.stdin); d={x["n_prompt"]>0 and "pp" or "tg": x["avg_ts"] for x in r}; print("%.1f %.1f" % (d["tg"], d["pp"]))')
  fm=$(( $(stat -c %s "$f") / 1000000 )); em=$(( $(stat -c %s "$e/rank0.engine") / 1000000 ))
  python3 -c "print('| $t | $fm | $em | $d | $ld | %.2f | $p | $lp | %.2f |' % ($d/$ld, $p/$lp))"
done
