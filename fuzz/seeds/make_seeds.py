#!/usr/bin/env python3
"""The fuzzer's GGUF seed: tests/fixtures/tiny-llama written as llama.cpp's converter writes a
Llama checkpoint (q/k rows permuted for GGML's RoPE, llama.cpp tensor names, the byte-level BPE
vocabulary in tokenizer.ggml.*), with one tensor family per storage type (F32, F16, Q8_0, Q4_0,
Q4_1) so mutations reach every block decoder.

    python3 -m pip install gguf==0.19.0 safetensors torch
    python3 fuzz/seeds/make_seeds.py
"""

import json
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter, quants
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
SRC = HERE.parent.parent / "tests" / "fixtures" / "tiny-llama"

# Tensor name in the checkpoint -> (GGUF name, storage type).
LAYER = {
    "input_layernorm.weight": ("attn_norm.weight", T.F32),
    "self_attn.q_proj.weight": ("attn_q.weight", T.Q8_0),
    "self_attn.k_proj.weight": ("attn_k.weight", T.Q8_0),
    "self_attn.v_proj.weight": ("attn_v.weight", T.Q4_1),
    "self_attn.o_proj.weight": ("attn_output.weight", T.F16),
    "post_attention_layernorm.weight": ("ffn_norm.weight", T.F32),
    "mlp.gate_proj.weight": ("ffn_gate.weight", T.Q4_0),
    "mlp.up_proj.weight": ("ffn_up.weight", T.Q4_0),
    "mlp.down_proj.weight": ("ffn_down.weight", T.Q8_0),
}
GLOBAL = {
    "model.embed_tokens.weight": ("token_embd.weight", T.F16),
    "model.norm.weight": ("output_norm.weight", T.F32),
    "lm_head.weight": ("output.weight", T.Q8_0),
}


def permute(w, heads):
    """llama.cpp's converter reorders q/k rows from halves to interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def main():
    cfg = json.loads((SRC / "config.json").read_text())
    tok = json.loads((SRC / "tokenizer.json").read_text())
    weights = {k: v.float().numpy() for k, v in load_file(str(SRC / "model.safetensors")).items()}

    w = GGUFWriter(str(HERE / "tiny-llama.gguf"), "llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])

    model = tok["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in model["merges"]])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_add_bos_token(False)

    def add(name, data, kind):
        if kind == T.F32:
            w.add_tensor(name, data)
        elif kind == T.F16:
            w.add_tensor(name, data.astype(np.float16))
        else:
            w.add_tensor(name, quants.quantize(data, kind), raw_dtype=kind)

    for src, (name, kind) in GLOBAL.items():
        add(name, weights[src], kind)
    for i in range(cfg["num_hidden_layers"]):
        for src, (name, kind) in LAYER.items():
            data = weights[f"model.layers.{i}.{src}"]
            if "q_proj" in src:
                data = permute(data, cfg["num_attention_heads"])
            elif "k_proj" in src:
                data = permute(data, cfg["num_key_value_heads"])
            add(f"blk.{i}.{name}", data, kind)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print((HERE / "tiny-llama.gguf").stat().st_size, "bytes")


if __name__ == "__main__":
    main()
