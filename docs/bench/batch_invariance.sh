#!/usr/bin/env bash
# Throughput, prefill and batch-1 decode with and without --batch-invariant, per engine.
# Usage: docs/bench/batch_invariance.sh TRTLLM ENGINE...
set -euo pipefail
T=$1
shift
for E in "$@"; do
  for mode in "" "--batch-invariant"; do
    echo "== $E $mode throughput 32x128/128"
    $T bench throughput --model "$E" --num-requests 32 --input-len 128 --output-len 128 $mode 2>&1 |
      grep -E "output throughput|TPOT"
    echo "== $E $mode prefill 512 (3 requests, 2 output tokens)"
    $T bench latency --model "$E" --num-requests 3 --input-len 512 --output-len 2 $mode 2>&1 |
      grep -E "input throughput"
    echo "== $E $mode decode batch 1 (128/128)"
    $T bench latency --model "$E" --num-requests 2 --input-len 128 --output-len 128 $mode 2>&1 |
      grep -E "per-request"
  done
done
