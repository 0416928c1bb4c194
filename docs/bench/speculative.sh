#!/usr/bin/env bash
# Batch-1 and batch-8 decode with and without prompt-lookup speculative decoding, on a prompt
# whose continuation repeats it (a code listing asked for again with one name changed) and on
# synthetic prompts (random ids: nothing to look up, so the cost of drafts that fail).
# With a DRAFT engine (same vocabulary; e.g. the same GGUF built with --quant keep), a third
# column drafts with it.
# Usage: docs/bench/speculative.sh TRTLLM ENGINE OUT_DIR [DRAFT]
set -euo pipefail
B=$1; E=$2; O=$3; D=${4:-}
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
DM=(--draft-model "$D" --max-draft-len 4)
row() {  # label, measure function, its args...
  local label=$1 f=$2; shift 2
  local line="| $label | $($f "$@") | $($f "$@" "${NG[@]}") |"
  [ -n "$D" ] && line="$line $($f "$@" "${DM[@]}") |"
  echo "$line"
}
if [ -n "$D" ]; then
  echo "| workload | plain | n-gram (N 3, K 4) | draft model (K 4) |"
  echo "| --- | --- | --- | --- |"
else
  echo "| workload | plain | n-gram (N 3, K 4) |"
  echo "| --- | --- | --- |"
fi
row "repeating prompt, batch 1, decode tok/s" run 3 --dataset "$O/repeat.jsonl"
row "repeating prompt, 8 concurrent, output tok/s" thr --dataset "$O/repeat.jsonl" --num-requests 8
row "synthetic 128/128, batch 1, decode tok/s" run 3 --input-len 128 --output-len 128
row "synthetic 128/128, 8 concurrent, output tok/s" thr --input-len 128 --output-len 128 --num-requests 8
