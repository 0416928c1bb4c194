"""A random Mixtral-shaped checkpoint with realistic expert sizes, for timing the MoE step.

    python3 docs/bench/make_moe_checkpoint.py OUT_DIR [--layers 4]

8 experts of 576x1536 (SmolLM2's MLP shape), top-2 routing, hidden 576, 9 heads over 3 KV heads,
float32, the tiny fixtures' 1024-token tokenizer. Weights are random (N(0, 0.02)): the figures are
for speed and bytes read, not text. Needs numpy.
"""
import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np


def main():
    out = Path(sys.argv[1])
    layers = int(sys.argv[sys.argv.index("--layers") + 1]) if "--layers" in sys.argv else 4
    h, inter, experts, heads, kv_heads, vocab = 576, 1536, 8, 9, 3, 1024
    hd = h // heads
    rng = np.random.default_rng(0)
    tensors = {}

    def w(name, *shape):
        tensors[name] = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)

    w("model.embed_tokens.weight", vocab, h)
    w("lm_head.weight", vocab, h)
    tensors["model.norm.weight"] = np.ones(h, np.float32)
    for i in range(layers):
        p = f"model.layers.{i}"
        tensors[f"{p}.input_layernorm.weight"] = np.ones(h, np.float32)
        tensors[f"{p}.post_attention_layernorm.weight"] = np.ones(h, np.float32)
        w(f"{p}.self_attn.q_proj.weight", heads * hd, h)
        w(f"{p}.self_attn.k_proj.weight", kv_heads * hd, h)
        w(f"{p}.self_attn.v_proj.weight", kv_heads * hd, h)
        w(f"{p}.self_attn.o_proj.weight", h, heads * hd)
        w(f"{p}.block_sparse_moe.gate.weight", experts, h)
        for e in range(experts):
            q = f"{p}.block_sparse_moe.experts.{e}"
            w(f"{q}.w1.weight", inter, h)
            w(f"{q}.w3.weight", inter, h)
            w(f"{q}.w2.weight", h, inter)

    out.mkdir(parents=True, exist_ok=True)
    header, offset, blobs = {}, 0, []
    for name, t in tensors.items():
        b = t.tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        offset += len(b)
        blobs.append(b)
    meta = json.dumps(header).encode()
    meta += b" " * (-len(meta) % 8)
    with open(out / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(meta)))
        f.write(meta)
        for b in blobs:
            f.write(b)
    config = {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_size": h,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "num_local_experts": experts,
        "num_experts_per_tok": 2,
        "vocab_size": vocab,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    fixture = Path(__file__).resolve().parents[2] / "tests/fixtures/tiny-mixtral"
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(fixture / f, out / f)


if __name__ == "__main__":
    main()
