#!/usr/bin/env bash
# LoRA's cost: output tok/s of 32 concurrent 128/128 requests over four rank-16 adapters (every
# projection of every layer) against the same requests on the base alone, one engine, one run.
# The adapters are random (PEFT's layout, made with transformers + peft from the same GGUF);
# speed does not depend on their values.
# Usage: docs/bench/lora.sh TRTLLM ENGINE GGUF OUT_DIR   (python3 with torch, transformers, gguf, peft)
set -euo pipefail
B=$1; E=$2; G=$3; O=$4
PY=${PYTHON:-python3}
mkdir -p "$O"
[ -f "$O/a3/adapter_model.safetensors" ] || "$PY" - "$G" "$O" <<'PY'
import math, sys
from pathlib import Path
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
gguf, out = Path(sys.argv[1]), Path(sys.argv[2])
base = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
for i in range(4):
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=16, target_modules=targets))
    g = torch.Generator().manual_seed(i)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=g) * (0.1 / math.sqrt(p.shape[1]))
    model.save_pretrained(out / f"a{i}")
    base = model.unload()
PY
run() {  # extra args... → output tok/s
  "$B" bench throughput --model "$E" --num-requests 32 --input-len 128 --output-len 128 \
    --disable-block-reuse --json "$@" 2>/dev/null |
    python3 -c 'import json,sys; print("%.1f" % json.load(sys.stdin)["output_tokens_per_s"])'
}
base=$(run)
lora=$(run --lora "$O/a0" --lora "$O/a1" --lora "$O/a2" --lora "$O/a3")
python3 -c "print('| 32 × 128/128, output tok/s | base | 4 adapters (rank 16, all projections) | ratio |'); print('| --- | --- | --- | --- |'); print('| $E | $base | $lora | %.2f |' % ($lora / $base))"
