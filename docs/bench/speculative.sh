#!/usr/bin/env bash
# Batch-1 and batch-8 decode with and without prompt-lookup speculative decoding, on a prompt
# whose continuation repeats it (a code listing asked for again with one name changed) and on
# synthetic prompts (random ids: nothing to look up, so the cost of drafts that fail).
# Usage: docs/bench/speculative.sh TRTLLM ENGINE OUT_DIR
set -euo pipefail
B=$1; E=$2; O=$3
mkdir -p "$O"
python3 - "$O/repeat.jsonl" <<'PY'
import json, sys
code = '''def parse_header(data):
    if len(data) < 8:
        raise ValueError("header too short")
    magic = data[0:4]
    if magic != b"GGUF":
        raise ValueError("not a GGUF file")
    version = int.from_bytes(data[4:8], "little")
    return {"magic": magic, "version": version}
'''
prompt = ("Here is a Python function:\n\n" + code +
          "\nThe same function with `data` renamed to `buf`:\n\ndef parse_header(buf):\n")
with open(sys.argv[1], "w") as f:
    for _ in range(8):
        f.write(json.dumps({"prompt": prompt, "output_tokens": 96}) + "\n")
PY
run() {  # requests, extra args... → decode tok/s per request (1000 / TPOT p50) and output tok/s
  local n=$1; shift
  "$B" bench latency --model "$E" --num-requests "$n" --json "$@" 2>/dev/null | python3 -c '
import json,sys; r=json.load(sys.stdin); print("%.1f" % (1000 / r["tpot_ms"]["p50"]))'
}
thr() {
  "$B" bench throughput --model "$E" --json "$@" 2>/dev/null | python3 -c '
import json,sys; r=json.load(sys.stdin); print("%.1f" % r["output_tokens_per_s"])'
}
NG=(--ngram-lookup 3 --max-draft-len 4)
echo "| workload | plain | n-gram (N 3, K 4) |"
echo "| --- | --- | --- |"
echo "| repeating prompt, batch 1, decode tok/s | $(run 3 --dataset "$O/repeat.jsonl") | $(run 3 --dataset "$O/repeat.jsonl" "${NG[@]}") |"
echo "| repeating prompt, 8 concurrent, output tok/s | $(thr --dataset "$O/repeat.jsonl" --num-requests 8) | $(thr --dataset "$O/repeat.jsonl" --num-requests 8 "${NG[@]}") |"
echo "| synthetic 128/128, batch 1, decode tok/s | $(run 3 --input-len 128 --output-len 128) | $(run 3 --input-len 128 --output-len 128 "${NG[@]}") |"
echo "| synthetic 128/128, 8 concurrent, output tok/s | $(thr --input-len 128 --output-len 128 --num-requests 8) | $(thr --input-len 128 --output-len 128 --num-requests 8 "${NG[@]}") |"
