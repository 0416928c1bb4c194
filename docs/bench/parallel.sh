#!/usr/bin/env bash
# Tensor and pipeline parallelism on this machine: one engine built whole, TP=2 and PP=2 (the
# GGUF's Q4_1 weights kept), each run by `trtllm bench` (one process with every core, or
# `mpirun -np 2` with a core per rank), at batch 1 (latency: TPOT) and at 16 concurrent
# requests (throughput). The split runs report rank 0's time inside collectives; on 2 cores TP
# cannot be faster than one rank using both, so the figure that matters is that share.
# Usage: docs/bench/parallel.sh TRTLLM GGUF OUT_DIR   (trtllm built with --features mpi)
set -euo pipefail
B=$1; G=$2; O=$3
mkdir -p "$O"
for s in "1 1" "2 1" "1 2"; do
  set -- $s
  E="$O/tp$1-pp$2"
  [ -f "$E/config.json" ] || "$B" build --checkpoint "$G" --output "$E" --quant keep \
    --max-seq-len 1024 --max-batch-size 16 --tp-size "$1" --pp-size "$2" >/dev/null
done
bench() {  # ranks engine mode requests → json
  local cmd=("$B")
  [ "$1" = 1 ] || cmd=(mpirun --allow-run-as-root -np "$1" "$B")
  "${cmd[@]}" bench "$3" --model "$2" --num-requests "$4" --input-len 128 --output-len 64 \
    --disable-block-reuse --json 2>/dev/null
}
row() {  # name ranks engine
  local lat thr
  lat=$(bench "$2" "$3" latency 4)
  thr=$(bench "$2" "$3" throughput 16)
  python3 - "$1" "$lat" "$thr" <<'PY'
import json, sys
name, lat, thr = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
def comm(r):
    c = r.get("communication")
    if not c:
        return "—"
    return "%.0f %% (all-reduce %.0f, gather %.0f, p2p %.0f, broadcast %.0f ms)" % (
        100 * c["share_of_wall"], c["all_reduce_ms"], c["all_gather_ms"], c["send_recv_ms"],
        c["broadcast_ms"])
print("| %s | %.1f | %s | %.1f | %s |" % (name, lat["tpot_ms"]["mean"], comm(lat),
      thr["output_tokens_per_s"], comm(thr)))
PY
}
echo "| engine | batch 1: TPOT ms | rank 0 in collectives | 16 × 128/64: output tok/s | rank 0 in collectives |"
echo "| --- | --- | --- | --- | --- |"
row "TP=1 (one process, 2 threads)" 1 "$O/tp1-pp1"
row "TP=2 (mpirun -np 2)" 2 "$O/tp2-pp1"
row "PP=2 (mpirun -np 2)" 2 "$O/tp1-pp2"
